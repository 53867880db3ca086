"""Models childtune builds itself rather than loading through transformers' Auto classes: the pretrained
EasyOCR CRNN and an image classifier on it (`crnn`)."""
