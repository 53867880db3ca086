"""Shared plumbing for strategies whose child network is a set they hold: chosen once, or grown.

Child-Tuning_D and random masking choose `chosen` once (`kind = "fixed"`); ID3 starts it empty and
adds to it every step (`kind = "growing"`). `chosen` holds it as indices (`childtune.masks.Indices`: 4
bytes per child element, no byte per weight); `masks(step)` is only a dense view made on request. Their
state *is* that index, so saving and restoring it is what makes such a run resumable and distributable:
a resumed run, or another rank, gets the identical child network without re-estimating.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import torch

from childtune import shards
from childtune.masks import Indices, Masks, check_index, empty_index
from childtune.strategies.base import Strategy, in_scope


@dataclass(kw_only=True)
class ChosenStrategy(Strategy):
    """A strategy whose child network lives in `self.chosen` (indices); `rest` says what happens outside `scope`.

    `rest="train"` gives unscored parameters their full gradient (the Child-Tuning authors' behaviour:
    embeddings and pooler keep training under Child-Tuning_D); `rest="freeze"` makes the child
    network the only thing that changes besides `always`.
    """

    scope: str = "all"
    rest: str = "train"

    def __post_init__(self) -> None:
        if self.rest not in ("train", "freeze"):
            raise ValueError(f"rest must be 'train' or 'freeze', got {self.rest!r}")
        in_scope("", self.scope)  # validates the scope name
        self.chosen: Indices | None = None

    def scored(self) -> dict[str, torch.Tensor]:
        """Parameters the child network is chosen among."""
        return {n: p for n, p in self.maskable().items() if in_scope(n, self.scope)}

    def complete(self, chosen: Mapping[str, torch.Tensor]) -> Indices:
        """A choice (per parameter a bool mask, as a top-k cut gives, or an index) as the indices `chosen`
        holds, with empty ones for unscored parameters when `rest` freezes them."""
        out = {n: check_index(n, shards.local(self.params[n]), c) for n, c in chosen.items()}
        if self.rest == "freeze":
            for name, param in self.maskable().items():
                out.setdefault(name, empty_index(shards.local(param)))
        return out

    def budget_scope(self) -> dict[str, torch.Tensor]:
        return self.scored()

    def final_masks(self, steps: int) -> Masks:
        return self.dense(self.chosen) if self.chosen else {}

    def untouched(self) -> list[str]:
        if self.kind != "fixed" or not self.chosen:
            return []
        return super().untouched()

    def masks(self, step: int) -> Masks:
        return self.dense(self.network(step))

    def network(self, step: int) -> Indices:
        return self.require_chosen()

    def require_chosen(self) -> Indices:
        """`chosen`, or a clear error when the child network has not been chosen yet."""
        if self.chosen is None:
            raise RuntimeError(f"{type(self).__name__} has no child network yet: call prepare() first")
        return self.chosen

    def state_dict(self) -> dict[str, Any]:
        return {} if self.chosen is None else {"chosen": {n: m.cpu() for n, m in self.chosen.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `chosen`; a checkpoint that saved it as bool masks (before indices) is converted."""
        unknown = set(state) - {"chosen"}
        if unknown:
            raise ValueError(f"unknown {type(self).__name__} state keys: {sorted(unknown)}")
        if "chosen" in state:
            self.chosen = {
                n: check_index(n, shards.local(self.params[n]), m) if n in self.params else _unknown(n)
                for n, m in state["chosen"].items()
            }


def _unknown(name: str) -> NoReturn:
    raise ValueError(f"saved mask for {name!r}, which is not a parameter of this model")
