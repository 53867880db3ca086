"""Models childtune builds itself: EasyOCR's pretrained CRNN as an image classifier and its image processor
(`crnn`, registered with transformers' Auto classes), a vision-language model assembled from it and SmolLM2
(`vlm`), and what kind of model a folder holds (`folders`)."""
