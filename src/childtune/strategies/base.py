"""The protocol every way of choosing a child network implements, and what callers may rely on.

A strategy answers one question for the optimizer: *at this step, which elements of each parameter may
change?* It also declares, as data, everything the rest of childtune needs to know about it, so no
module outside `childtune.strategies` ever tests a strategy's type:

* `kind`: how its masks change over training. `"fixed"` (chosen once: Child-Tuning_D, random
  masking, and full fine-tuning's empty masks), `"growing"` (elements join, never leave: ID3, gradual
  unfreezing) or `"per_step"` (a fresh draw every step: Child-Tuning_F). Fixed and growing child
  networks are what a sparse optimizer can keep moments for, and what a sparse delta stores exactly.
* `kind="dynamic"`: elements join and leave, the size stays (drop and regrow). Such a strategy reads
  gradients at the steps `dense_gradients_at(step)` names, which the optimizer hands it through
  `observe(name, grad)` before each update.
* `needs_data`: whether `prepare(model, batches)` must run on training data first (Fisher scores);
  `needs_gradients`: whether `network(step)` (and so `masks(step)`) reads the step's gradients (ID3's importance).
* `network(step)`: the child network at `step` as sorted flat indices per parameter
  (`childtune.masks.Indices`), the form a fixed or growing one is held in while it trains; `masks(step)`
  is its dense view (bool tensors), made where an element-by-element product needs one.
* `final_masks(steps)`: the run's child network once training is done (None for a per-step draw),
  which the training loop counts, saves and analyses.
* `budget_scope()`: the parameters a size such as p or ID3's budget is a share of.
* `untouched()`: parameters a fixed child network leaves out entirely, which need no gradient at all.

Keeping the answer itself in one form (`childtune.masks`: indices, with masks as their dense view) is
what lets any strategy drive any optimizer, save as a sparse delta, and feed the analysis. Adding a
method is one module here and one line in `childtune.training.methods.METHODS` (see docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal

import torch
import torch.distributed as dist

from childtune import shards
from childtune.layers import HEAD, in_layer, matches
from childtune.masks import Indices, Masks, to_indices, to_masks

NetworkKind = Literal["fixed", "growing", "dynamic", "per_step"]


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

    Subclasses set `kind` (and `needs_data` when `prepare` needs batches) and override `masks`.
    `always` names parameters (by substring) that are never masked, such as the task head.
    """

    always: tuple[str, ...] = HEAD
    scale: float = field(default=1.0, init=False, repr=False)
    """Factor applied to kept gradients (1/p for Child-Tuning_F, so the expected gradient is unbiased)."""
    params: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False)
    group: dist.ProcessGroup | None = field(default=None, init=False, repr=False, compare=False)
    """The process group the bound parameters are sharded over (FSDP2, `childtune.shards`), else None:
    masks are then each rank's rows, and every global count or cut goes through this group."""

    kind: ClassVar[NetworkKind] = "fixed"
    """How the masks change: once chosen (`fixed`), only ever adding elements (`growing`), or drawn anew
    every step (`per_step`). Optimizers cache, sparsify or refuse on this alone."""
    needs_data: ClassVar[bool] = False
    """True when `prepare(model, batches)` must see training data before the first step."""
    needs_gradients: ClassVar[bool] = False
    """True when `network(step)` reads the step's gradients (ID3): an optimizer cannot then update one
    parameter before backward has produced them all."""

    def bind(self, named_params: Mapping[str, torch.Tensor]) -> None:
        """Remember the parameters this strategy chooses among (called by the optimizer)."""
        self.params = dict(named_params)
        for name, param in self.params.items():
            shards.check_layout(name, param)
        self.group = shards.group_of(self.params.values())

    def prepare(self, model: torch.nn.Module | None = None, batches: Iterable[Mapping[str, Any]] | None = None, *,
                progress: bool = True) -> None:
        """One-off work before training, such as Fisher estimation (with a progress bar unless `progress` is
        False). The default needs nothing."""

    def masks(self, step: int) -> Masks:
        """Masks for `step` (0-based), called after backward and before the update.

        Names absent from the result keep their full gradient.
        """
        raise NotImplementedError

    def network(self, step: int) -> Indices:
        """The child network at `step` as indices (names absent train in full), what a sparse optimizer
        keeps state for. Strategies that hold their network override this (and derive `masks` from it);
        the default converts `masks(step)`, which a per-step draw has no cheaper form of."""
        return to_indices(self.masks(step))

    def dense_gradients_at(self, step: int) -> bool:
        """Whether `step`'s update reads gradients outside the child network (ID3's growth, a dynamic
        network's window): with child-only weight gradients, those steps need the dense ones."""
        return False

    def observe(self, name: str, grad: torch.Tensor) -> None:
        """Take `name`'s gradient at a step `dense_gradients_at` names (a dynamic network's statistics),
        before the optimizer updates and frees it. The default reads nothing."""

    def dense(self, indices: Indices) -> Masks:
        """Masks of `indices` over the bound parameters (each rank's rows under FSDP2): new bool tensors
        each call, which a caller keeps only as long as it needs the dense view."""
        return to_masks(indices, {n: shards.local(self.params[n]) for n in indices})

    def final_masks(self, steps: int) -> Masks | None:
        """The child network a run of `steps` updates ended with; None when there is no single one
        (a per-step draw). Names absent from it were trained in full."""
        if self.kind == "per_step":
            return None
        return self.masks(max(steps - 1, 0))

    def untouched(self) -> list[str]:
        """Parameters a fixed child network leaves out entirely (empty indices): with strict masking
        they never change, so they need no gradient. Empty for any other kind."""
        if self.kind != "fixed":
            return []
        network = self.network(0)
        anywhere = shards.total([len(i) > 0 for i in network.values()], self.group)  # row shards: ask every rank
        return [n for n, hit in zip(network, anywhere, strict=True) if not hit]

    def maskable(self) -> dict[str, torch.Tensor]:
        """The bound parameters that are not in `always`."""
        return {n: p for n, p in self.params.items() if not matches(n, self.always)}

    def budget_scope(self) -> dict[str, torch.Tensor]:
        """The parameters a child-network size (p, a budget) is a share of: by default all maskable ones."""
        return self.maskable()

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
