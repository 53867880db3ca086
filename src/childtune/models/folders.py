"""What kind of model a folder holds, read from its config.json without importing any model code."""

from __future__ import annotations

import json
from pathlib import Path

CRNN_TYPE = "easyocr-crnn"
"""`model_type` of EasyOCR's CRNN as an image classifier (`models.crnn`)."""
VLM_TYPE = "childtune-vlm"
"""`model_type` of the vision-language model assembled from pretrained parts (`models.vlm`)."""
VLM_NAME = "crnn-smollm2"
"""The built-in assembly of it: `--model crnn-smollm2` (`training.models.model_folder` builds its folder)."""


def is_vision_language(model: str) -> bool:
    """Whether a `--model` value names the vision-language model: the built-in one or an assembly folder."""
    return model == VLM_NAME or model_type(Path(model).expanduser()) == VLM_TYPE


def model_type(folder: str | Path) -> str | None:
    """config.json's `model_type`, or None where there is none to read."""
    try:
        found = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return found if isinstance(found, str) else None
