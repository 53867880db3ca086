"""childtune: selective fine-tuning of pretrained models (Child-Tuning, ID3 and friends)."""
