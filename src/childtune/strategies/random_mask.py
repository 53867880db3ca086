"""Random masking (Xu & Zhang, 2024): a fixed, uniformly random sparse child network.

No data is needed to choose it; what makes it work is a learning rate far larger than full
fine-tuning's, since each surviving parameter has to carry more of the adaptation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from childtune.masks import check_probability, top_fraction
from childtune.strategies.chosen import ChosenStrategy


@dataclass
class RandomMasking(ChosenStrategy):
    """Exactly round(p * n) elements, drawn from `seed` alone so every rank and resume agrees."""

    p: float
    seed: int = 0
    rest: str = field(default="freeze", kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.p = check_probability("p", self.p)

    def bind(self, named_params) -> None:
        super().bind(named_params)
        generator = torch.Generator().manual_seed(self.seed)
        scores = {n: torch.rand(p.shape, generator=generator).to(p.device) for n, p in self.scored().items()}
        self.chosen = self.complete(top_fraction(scores, self.p))
