"""Gradual unfreezing (Howard & Ruder, 2018): train the top first, then unfreeze one block at a time.

Blocks are found from parameter names (`childtune.layers.blocks`): everything after the stacked
transformer blocks (pooler, task head) is the top block and trains from step 0; then the last
transformer block, and so on down to the embeddings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import ClassVar

import torch

from childtune import shards
from childtune.layers import blocks
from childtune.masks import Indices, Masks, empty_index
from childtune.strategies.base import NetworkKind, Strategy


@dataclass
class GradualUnfreezing(Strategy):
    """`schedule`: steps between unfreezing successive blocks (an int), or the step at which each
    block below the top one unfreezes (an increasing sequence)."""

    schedule: int | Sequence[int]
    always: tuple[str, ...] = field(default=(), kw_only=True)

    kind: ClassVar[NetworkKind] = "growing"

    def __post_init__(self) -> None:
        if isinstance(self.schedule, int):
            if self.schedule < 1:
                raise ValueError(f"schedule must be a positive number of steps, got {self.schedule}")
        else:
            self.schedule = tuple(self.schedule)
            steps = self.schedule
            if any(b <= a for a, b in pairwise(steps)) or min(steps, default=0) < 0:
                raise ValueError(f"schedule must be increasing non-negative steps, got {self.schedule}")
        self._frozen: dict[int, Indices] = {}

    def bind(self, named_params: Mapping[str, torch.Tensor]) -> None:
        super().bind(named_params)
        self.order = list(reversed(blocks(self.maskable())))  # top block first
        self._frozen = {}

    def unfrozen(self, step: int) -> int:
        """How many blocks, counted from the top, train at `step`."""
        below = step // self.schedule if isinstance(self.schedule, int) else sum(step >= s for s in self.schedule)
        return min(len(self.order), 1 + below)

    def network(self, step: int) -> Indices:
        """Empty indices for the blocks still frozen; the unfrozen ones are absent (trained in full)."""
        stage = self.unfrozen(step)
        if stage not in self._frozen:  # one dict per stage, so optimizers see a stable object
            self._frozen = {stage: {
                name: empty_index(shards.local(self.params[name]))
                for block in self.order[stage:] for name in block
            }}
        return self._frozen[stage]

    def masks(self, step: int) -> Masks:
        return self.dense(self.network(step))
