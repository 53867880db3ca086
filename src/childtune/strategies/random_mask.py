"""Random masking (Xu & Zhang, 2024): a fixed, uniformly random sparse child network.

No data is needed to choose it; what makes it work is a learning rate far larger than full
fine-tuning's, since each surviving parameter has to carry more of the adaptation.

Ours, by default, draws exactly round(p * n) elements over every maskable weight. The authors' code
(JingXuTHU/Random-Masking-Finds-Winning-Tickets-for-Parameter-Efficient-Fine-tuning, `PEFT/random_masking.py`
and `utils.py:convert_masking_prob`, read at commit 3f74d05) differs in three ways, each a knob here:
only the attention query and value projection weights are masked (`targets`, everything else frozen),
each element is kept by its own Bernoulli draw (`sampling="bernoulli"`), and the budget p is a share
of the whole model, all of it spread over the targets (`budget="model"`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from childtune import shards
from childtune.layers import matches
from childtune.masks import check_probability, top_fraction
from childtune.strategies.chosen import ChosenStrategy

QV = ("q_proj.weight", "v_proj.weight", "query.weight", "value.weight")
"""Attention query/value projection weights: Llama/OPT-style `q_proj`/`v_proj`, BERT-style `query`/`value`."""


@dataclass
class RandomMasking(ChosenStrategy):
    """Elements drawn from `seed` alone so every rank and resume agrees: exactly round(p * n) of the
    scored weights (`sampling="exact"`), or each kept with probability p (`"bernoulli"`). `targets`
    (name fragments) limits the scored weights; `budget="model"` makes p a share of every bound
    parameter, spread over the targets."""

    p: float
    seed: int = 0
    rest: str = field(default="freeze", kw_only=True)
    targets: tuple[str, ...] = field(default=(), kw_only=True)
    sampling: str = field(default="exact", kw_only=True)
    budget: str = field(default="scored", kw_only=True)

    @classmethod
    def authors(cls, p: float, seed: int = 0, **kw: Any) -> RandomMasking:
        """Random masking as the authors' code chooses: q/v projection weights only, per-element
        Bernoulli, p a share of the whole model. The run-level part (weight decay 0) is the CLI preset."""
        return cls(p, seed, **{"targets": QV, "sampling": "bernoulli", "budget": "model", **kw})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.p = check_probability("p", self.p)
        self.targets = tuple(self.targets)
        if self.sampling not in ("exact", "bernoulli"):
            raise ValueError(f"sampling must be 'exact' or 'bernoulli', got {self.sampling!r}")
        if self.budget not in ("scored", "model"):
            raise ValueError(f"budget must be 'scored' or 'model', got {self.budget!r}")

    def scored(self) -> dict[str, torch.Tensor]:
        scored = super().scored()
        return {n: p for n, p in scored.items() if matches(n, self.targets)} if self.targets else scored

    def bind(self, named_params: Mapping[str, torch.Tensor]) -> None:
        super().bind(named_params)
        scored = self.scored()
        if self.targets and not scored:
            raise ValueError(f"random masking targets {list(self.targets)} match no parameter")
        density = self.p
        if self.budget == "model":
            n_scored = sum(p.numel() for p in scored.values())
            density = min(1.0, self.p * sum(p.numel() for p in self.params.values()) / max(1, n_scored))
        generator = torch.Generator().manual_seed(self.seed)
        # whole tensors drawn on every rank, each keeping its rows (`childtune.shards`): the single-process draw
        scores = {n: torch.rand(p.shape, generator=generator)[shards.rows(p)].to(p.device) for n, p in scored.items()}
        if self.sampling == "bernoulli":
            chosen = {n: s < density for n, s in scores.items()}
        else:
            chosen = top_fraction(scores, density, group=self.group)
        self.chosen = self.complete(chosen)
