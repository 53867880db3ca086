"""A child network chosen elsewhere and handed over as indices: a multi-task run's shared part, or one
task's own part (`childtune.multitask`), which the sparse optimizer then keeps state for like any fixed one."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from childtune.strategies.chosen import ChosenStrategy


@dataclass
class GivenNetwork(ChosenStrategy):
    """A fixed child network, `given` as sorted flat indices per parameter name; every other maskable
    parameter is frozen (`rest="freeze"`), and the task head (`always`) is trained in full unless
    `always` is emptied."""

    given: Mapping[str, torch.Tensor] = field(repr=False)
    rest: str = field(default="freeze", kw_only=True)

    def bind(self, named_params: Mapping[str, torch.Tensor]) -> None:
        super().bind(named_params)
        unknown = set(self.given) - set(self.maskable())
        if unknown:
            raise ValueError(f"the given child network names parameters this optimizer does not mask: "
                             f"{sorted(unknown)}")
        self.chosen = self.complete(self.given)
