"""Vanilla fine-tuning, the baseline every selective method is measured against."""

from __future__ import annotations

from dataclasses import dataclass

from childtune.masks import Masks
from childtune.strategies.base import Strategy


@dataclass
class FullFineTuning(Strategy):
    """Masks nothing: with AdamW as the inner optimizer this *is* plain AdamW."""

    def masks(self, step: int) -> Masks:
        return {}
