"""ID3, incremental dynamic unmasking (Agarwal et al., 2024, arXiv 2408.14470).

The child network grows during training: at every step the not-yet-chosen elements are ranked by
H = |g| / (|w| + eps)^exp, computed from the gradient just produced, and the best few join. Chosen
elements stay chosen (exploitation) while each step's fresh gradient decides which join (exploration).
After `total_steps` steps exactly `budget` elements have been chosen; the authors' rounding let the
count overshoot the budget, this schedule cannot.

Applied to a peft model's LoRA/adapter parameters instead of the base weights, the same rule gives the
paper's dynamic sparsification of adapters: bind the optimizer to those parameters only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from childtune.masks import Masks, count, top_k
from childtune.strategies.base import NetworkKind
from childtune.strategies.chosen import ChosenStrategy


@dataclass
class ID3(ChosenStrategy):
    """`budget` is a count of elements (an int) or a fraction of the scored elements (a float < 1)."""

    budget: int | float
    total_steps: int
    eps: float = 1e-3
    exp: float = 1.0
    rest: str = field(default="freeze", kw_only=True)

    kind: ClassVar[NetworkKind] = "growing"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.total_steps, int) or self.total_steps < 1:
            raise ValueError(f"total_steps must be a positive integer, got {self.total_steps!r}")
        if isinstance(self.budget, bool) or not isinstance(self.budget, int | float) or self.budget <= 0:
            raise ValueError(f"budget must be a positive count or a fraction in (0, 1), got {self.budget!r}")
        if isinstance(self.budget, float) and self.budget >= 1:
            raise ValueError(f"a fractional budget must be below 1, got {self.budget!r}")

    def bind(self, named_params) -> None:
        super().bind(named_params)
        available = sum(p.numel() for p in self.scored().values())
        self.size = round(self.budget * available) if isinstance(self.budget, float) else self.budget
        if self.size > available:
            raise ValueError(f"budget {self.size} exceeds the {available} parameters it can choose from")
        empty = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in self.scored().items()}
        self.chosen = self.complete(empty)

    def target(self, step: int) -> int:
        """Elements chosen once `step` (0-based) has run: a linear ramp reaching the budget exactly."""
        return min(self.size, math.ceil(self.size * (step + 1) / self.total_steps))

    def masks(self, step: int) -> Masks:
        assert self.chosen is not None
        scored = self.scored()
        grow = self.target(step) - count({n: self.chosen[n] for n in scored})
        if grow > 0:
            importance = {}
            for name, param in scored.items():
                grad = param.grad
                score = torch.zeros_like(param, dtype=torch.float32) if grad is None else (
                    grad.detach().abs().float() / (param.detach().abs().float() + self.eps) ** self.exp
                )
                importance[name] = score.masked_fill_(self.chosen[name], -math.inf)
            for name, new in top_k(importance, grow).items():
                self.chosen[name] |= new
        return self.chosen
