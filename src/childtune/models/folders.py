"""What kind of model a folder holds, read from its config.json without importing any model code."""

from __future__ import annotations

import json
from pathlib import Path

CRNN_TYPE = "easyocr-crnn"
"""`model_type` of EasyOCR's CRNN as an image classifier (`models.crnn`)."""
VLM_TYPE = "childtune-vlm"
"""`model_type` of the vision-language model assembled from pretrained parts (`models.vlm`)."""


def model_type(folder: str | Path) -> str | None:
    """config.json's `model_type`, or None where there is none to read."""
    try:
        found = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return found if isinstance(found, str) else None
