"""Child-Tuning_F (Xu et al., 2021): a fresh Bernoulli(p) child network every step, task-free.

Kept gradients are scaled by 1/p so the masked gradient is an unbiased estimate of the full one, and
the mask is applied *before* the optimizer's moments see the gradient, as in the authors' optimizer
(AliceMind ChildTuning/ChildTuningOptimizer.py: `Bernoulli(reserve_p)` times grad / reserve_p, in
`step()` before `exp_avg` is updated).

Cost is the point of this file: drawing a mask for every weight every step dominates the method's
overhead. The draw is counter-based (`childtune.kernels`): a weight is kept iff a 32-bit hash of its
position in its parameter, keyed by (seed, step, parameter name), falls below round(p * 2^32). No
generator runs and no random buffer exists, so the mask can be computed where it is used: fused into
the gradient mask (`mask_gradients_`) or into the whole AdamW update (`ChildOptimizer`'s one-pass
path), on any thread, and by each FSDP2 rank for its own rows only. The keep probability is p to
within 2^-32; `keep_probability` reports the exact value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from childtune import kernels, shards
from childtune.kernels import Draw
from childtune.masks import Masks, check_probability
from childtune.strategies.base import NetworkKind, Strategy


@dataclass
class ChildTuningF(Strategy):
    """Task-free Child-Tuning: keep each gradient element with probability `p`, scaled by 1/p.

    With `seed` the mask at step t is a function of (seed, t) only: the same on every rank of a
    distributed run and after a resume, with no generator state to carry. Passing a `generator`
    instead draws from it in sequence, for callers that manage their own random streams.
    """

    p: float
    seed: int = 0
    generator: torch.Generator | None = field(default=None, repr=False, compare=False)
    always: tuple[str, ...] = field(default=(), kw_only=True)

    kind: ClassVar[NetworkKind] = "per_step"

    def __post_init__(self) -> None:
        self.p = check_probability("reserve_p", self.p)
        self.scale = 1.0 / self.p
        self._threshold = min(max(round(self.p * kernels.POSITIONS), 1), kernels.POSITIONS - 1)
        self._starts: dict[str, int] = {}
        self._keys: dict[str, tuple[int, int]] = {}
        self._buffers: dict[str, torch.Tensor] = {}

    @property
    def keep_probability(self) -> float:
        return self._threshold / kernels.POSITIONS

    def bind(self, named_params: Mapping[str, torch.Tensor]) -> None:
        super().bind(named_params)
        # Row shards (FSDP2): a rank draws its own rows only, at their positions in the whole parameter, so
        # the masks are the single-process ones (`childtune.shards`).
        self._starts = {}
        for name, param in self.maskable().items():
            if param.numel() > kernels.POSITIONS:
                raise ValueError(f"{name!r} has {param.numel():,} elements; Child-Tuning_F draws at most 2^32 "
                                 "per parameter (its positions are 32-bit)")
            rows = shards.rows(param)
            self._starts[name] = 0 if rows is ... else rows.start * math.prod(param.shape[1:])
        self._buffers = {}
        self._keys = {}

    def config(self) -> dict[str, Any]:
        config = super().config()
        config.pop("generator")
        return config

    def state_dict(self) -> dict[str, Any]:
        """A caller's generator advances with every draw, so a resumed run needs its state; a seeded
        strategy needs nothing (the mask at step t is a function of (seed, t))."""
        return {} if self.generator is None else {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        unknown = set(state) - {"generator"}
        if unknown:
            raise ValueError(f"unknown ChildTuningF state keys: {sorted(unknown)}")
        if "generator" in state:
            if self.generator is None:
                raise ValueError("saved state has a generator's state, but this ChildTuningF draws from its seed")
            self.generator.set_state(state["generator"])

    def masks(self, step: int) -> Masks:
        if self.p == 1.0:
            return {}
        self.draw(step)
        for name, param in self.maskable().items():
            if name not in self._buffers:
                self._buffers[name] = torch.empty(shards.local(param).shape, dtype=torch.bool, device=param.device)
            kernels.keep_mask_(self._buffers[name], self._draw(name))
        return dict(self._buffers)

    def mask_gradients_(self, step: int, grads: Mapping[str, torch.Tensor]) -> None:
        """In place, `grads[name] <- grads[name] * masks(step)[name] / p`, drawn where it is applied, no bool
        mask built (module docstring). `grads` holds maskable parameters' gradients by name."""
        if self.p == 1.0:
            return
        self.draw(step)
        for name, grad in grads.items():
            self.apply_drawn_(name, grad)

    def apply_drawn_(self, name: str, grad: torch.Tensor) -> None:
        """`grad <- grad * mask / p` for one parameter, with the mask of the last `draw` (an optimizer stepping
        in backward draws once per step and applies it parameter by parameter as gradients arrive)."""
        if self.p != 1.0:
            kernels.mask_grad_(grad, self._draw(name), self.scale)

    def draw(self, step: int) -> None:
        """Key every maskable parameter's mask for `step`: a function of (seed, step), or the caller's
        generator's next 64 bits. Cheap (a hash per parameter); the bits are computed where they are used."""
        if self.generator is None:
            base = kernels.step_base(self.seed, step)
        else:
            base = int(torch.empty((), dtype=torch.int64).random_(generator=self.generator)) & (2**64 - 1)
        self._keys = {name: kernels.draw_key(base, name) for name in self._starts}

    def drawn(self, name: str) -> Draw | None:
        """Where parameter `name`'s keep bits come from under the last `draw` (for kernels fusing the mask
        into the update, `childtune.kernels.adamw_`); None for a parameter that is not masked."""
        key = self._keys.get(name)
        return None if key is None else Draw(self._starts[name], *key, self._threshold)

    def _draw(self, name: str) -> Draw:
        """`drawn(name)` where a draw is required: a clear error for a name that has none."""
        draw = self.drawn(name)
        if draw is None:
            raise ValueError(f"no Child-Tuning_F draw for {name!r}: it is not a maskable parameter bound to this "
                             "strategy, or draw(step) has not run")
        return draw
