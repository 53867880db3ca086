"""Child-Tuning_F (Xu et al., 2021): a fresh Bernoulli(p) child network every step, task-free.

Kept gradients are scaled by 1/p so the masked gradient is an unbiased estimate of the full one, and
the mask is applied *before* the optimizer's moments see the gradient, as in the authors' optimizer.

Cost is the point of this file: drawing a mask for every weight every step dominates the method's
overhead. One `random_` call fills a flat int64 buffer, read as 16-bit lanes, one per element, and a
single comparison turns it into the mask: a quarter of the random bits and time of `torch.rand`. The
keep probability is therefore p rounded to a multiple of 2^-16 (|error| <= 7.6e-6), far below the
sampling noise of any real mask; `keep_probability` reports the exact value.

Applying the mask costs more than drawing it when done as `grad *= bool_mask`: torch's CPU kernel
converts the bools to floats one by one (benchmarks/RESULTS.md, the F draw table). `mask_gradients_`
instead reads the random lanes directly, `g <- (lane < threshold) ? g / p : 0`, block by block in
cache (`childtune.kernels`): no bool mask is built, and the values are those of `g * mask / p`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from childtune import shards
from childtune.kernels import keep_lanes_
from childtune.masks import Masks, check_probability
from childtune.strategies.base import NetworkKind, Strategy

_LANES = 4  # 16-bit lanes per int64 draw
_MIX = 0x9E3779B97F4A7C15  # odd constant: spreads (seed, step) pairs over the seed space


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
        self._threshold = round(self.p * 65536) - 32768  # int16 lanes are uniform on [-32768, 32767]
        self._buffer: torch.Tensor | None = None
        self._views: dict[str, torch.Tensor] = {}

    @property
    def keep_probability(self) -> float:
        return (self._threshold + 32768) / 65536

    def bind(self, named_params) -> None:
        super().bind(named_params)
        maskable = self.maskable()
        total = sum(p.numel() for p in maskable.values())
        device = next(iter(maskable.values())).device if maskable else torch.device("cpu")
        self._random = torch.empty((total + _LANES - 1) // _LANES, dtype=torch.int64, device=device)
        self._lanes = self._random.view(torch.int16)[:total]
        self._buffer = torch.empty(total, dtype=torch.bool, device=device)
        sizes = [p.numel() for p in maskable.values()]
        # Row shards (FSDP2): the whole model's lanes are drawn on every rank, each parameter reads its rows
        # (`childtune.shards`), so the masks are the single-process ones; the lanes cost 2 bytes per weight.
        self._views = {n: v.view(p.shape)[shards.rows(p)]
                       for (n, p), v in zip(maskable.items(), self._buffer.split(sizes), strict=True)}
        self._lane_views = {n: v.view(p.shape)[shards.rows(p)]
                            for (n, p), v in zip(maskable.items(), self._lanes.split(sizes), strict=True)}
        if self.generator is None:
            self._own = torch.Generator(device=device)

    def config(self):
        config = super().config()
        config.pop("generator")
        return config

    def state_dict(self):
        """A caller's generator advances with every draw, so a resumed run needs its state; a seeded
        strategy needs nothing (the mask at step t is a function of (seed, t))."""
        return {} if self.generator is None else {"generator": self.generator.get_state()}

    def load_state_dict(self, state) -> None:
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
        torch.lt(self._lanes, self._threshold, out=self._buffer)
        return self._views

    def mask_gradients_(self, step: int, grads: Mapping[str, torch.Tensor]) -> None:
        """In place, `grads[name] <- grads[name] * masks(step)[name] / p`, without building the bool masks
        (module docstring). `grads` holds maskable parameters' gradients by name."""
        if self.p == 1.0:
            return
        self.draw(step)
        for name, grad in grads.items():
            self.apply_drawn_(name, grad)

    def apply_drawn_(self, name: str, grad: torch.Tensor) -> None:
        """`grad <- grad * mask / p` for one parameter, with the mask of the last `draw` (an optimizer stepping
        in backward draws once per step and applies it parameter by parameter as gradients arrive)."""
        if self.p != 1.0:
            keep_lanes_(grad, self._lane_views[name].view(grad.shape), self._threshold, self.scale)

    def draw(self, step: int) -> None:
        """Fill the random lanes for `step`: every parameter's mask at once, a function of (seed, step)."""
        generator = self.generator
        if generator is None:
            generator = self._own.manual_seed((self.seed * _MIX + step) % 2**63)
        self._random.random_(-(2**63), 2**63 - 1, generator=generator)
