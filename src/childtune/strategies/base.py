"""The one small interface every way of choosing a child network implements.

A strategy answers a single question for the optimizer: *at this step, which elements of each
parameter may change?* Fixed strategies (Child-Tuning_D, random masking) answer it once; dynamic ones
(Child-Tuning_F, ID3, gradual unfreezing) answer it anew each step, possibly from the gradients the
backward pass just produced. Keeping the answer in one form (see `childtune.masks`) is what lets any
strategy drive any optimizer, save as a sparse delta, and feed the analysis.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from childtune.layers import in_layer
from childtune.masks import Masks

HEAD = ("classifier", "score")
"""Name fragments of task heads: newly initialised, so always trained in full by masking strategies."""


def matches(name: str, patterns: Iterable[str]) -> bool:
    return any(p in name for p in patterns)


def in_scope(name: str, scope: str) -> bool:
    """`layers`: inside the stacked transformer blocks (the authors' choice); `all`: everything."""
    if scope == "layers":
        return in_layer(name)
    if scope == "all":
        return True
    raise ValueError(f"scope must be 'layers' or 'all', got {scope!r}")


@dataclass(kw_only=True)
class Strategy:
    """Base class: a dataclass whose init fields are its config, so every run can be saved and rerun.

    Subclasses override `masks` and, when they need data or parameters up front, `prepare`.
    `always` names parameters (by substring) that are never masked, such as the task head.
    """

    always: tuple[str, ...] = HEAD
    scale: float = field(default=1.0, init=False, repr=False)
    """Factor applied to kept gradients (1/p for Child-Tuning_F, so the expected gradient is unbiased)."""
    params: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False)

    fixed = True
    """True when masks, once prepared, never change: optimizers may then cache or sparsify them."""

    def bind(self, named_params: Mapping[str, torch.Tensor]) -> None:
        """Remember the parameters this strategy chooses among (called by the optimizer)."""
        self.params = dict(named_params)

    def prepare(self, model: torch.nn.Module | None = None, batches: Iterable | None = None) -> None:
        """One-off work before training, such as Fisher estimation. The default needs nothing."""

    def masks(self, step: int) -> Masks:
        """Masks for `step` (0-based), called after backward and before the update.

        Names absent from the result keep their full gradient.
        """
        raise NotImplementedError

    def maskable(self) -> dict[str, torch.Tensor]:
        """The bound parameters that are not in `always`."""
        return {n: p for n, p in self.params.items() if not matches(n, self.always)}

    def config(self) -> dict[str, Any]:
        """Constructor arguments, JSON-ready, so `type(s)(**s.config())` rebuilds the strategy."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self) if f.init}

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs beyond the config (e.g. ID3's chosen set). Default: nothing."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got keys {sorted(state)}")


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
