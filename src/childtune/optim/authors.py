"""`ChildTuningAdamW`: a drop-in for the Child-Tuning authors' optimizer (Xu et al., EMNLP 2021).

Same signature and Adam arithmetic as their `ChildTuningAdamW` (alibaba/AliceMind, `ChildTuning/
ChildTuningOptimizer.py`): Hugging Face's classic AdamW, eps added to sqrt(v) before bias correction
and decoupled weight decay applied after the step, vectorised with `torch._foreach_*` instead of a
Python loop per tensor. With `mode=None` it matches `torch.optim.AdamW` to float tolerance at
fine-tuning learning rates: torch decays before the step, the authors after it, a difference of
lr^2 * weight_decay per step.

`strict=True` (our addition) leaves every element outside the child network exactly as it was. The
authors' optimizer does not: its decoupled weight decay shrinks *every* weight each step, so a
"fixed child network" run still moves the rest of the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, overload

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT

from childtune.masks import check_mask, check_probability
from childtune.optim.common import (
    check_adamw,
    child_block,
    evaluate_closure,
    mask_gradients_,
    pop_child_block,
    with_grads,
)
from childtune.strategies.child_f import ChildTuningF

MODES = (None, "ChildTuning-F", "ChildTuning-D")


class ChildTuningAdamW(Optimizer):
    """The Child-Tuning optimizer (Xu et al., EMNLP 2021) with the authors' signature and update.

    `mode="ChildTuning-F"` keeps each gradient element with probability `reserve_p` every step and
    scales kept ones by 1/reserve_p; `mode="ChildTuning-D"` multiplies gradients by the fixed masks
    given to `set_gradient_mask` (parameters without a mask get their full gradient), no rescaling.
    Masks act before the moments are updated, so Adam's statistics only ever see child gradients.
    `seed` makes F's masks a function of (seed, step), identical on every rank; `generator` draws
    them from the caller's generator instead.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        reserve_p: float = 1.0,
        mode: str | None = None,
        *,
        strict: bool = False,
        seed: int = 0,
        generator: torch.Generator | None = None,
    ) -> None:
        check_adamw(lr, betas, eps)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.reserve_p = check_probability("reserve_p", reserve_p)
        self.mode = mode
        self.strict = strict
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias)
        super().__init__(params, defaults)
        self.gradient_mask: dict[torch.Tensor, torch.Tensor] = {}
        self._steps = 0
        self._index = {p: str(i) for i, p in enumerate(self._params())}
        self._f = None
        if mode == "ChildTuning-F":
            self._f = ChildTuningF(reserve_p, seed=seed, generator=generator)
            self._f.bind({i: p for p, i in self._index.items()})

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def set_gradient_mask(self, masks: Mapping[torch.Tensor, torch.Tensor]) -> None:
        """Fix Child-Tuning_D's child network: `{parameter: bool tensor of its shape}`."""
        checked = {}
        for param, mask in masks.items():
            if param not in self._index:
                raise ValueError(f"mask given for a parameter of shape {tuple(param.shape)} not in the optimizer")
            checked[param] = check_mask(f"parameter #{self._index[param]}", param, mask)
        self.gradient_mask = checked

    def _step_masks(self) -> tuple[dict[torch.Tensor, torch.Tensor], float]:
        if self._f is not None:
            drawn = self._f.masks(self._steps)
            return {p: drawn[i] for p, i in self._index.items() if i in drawn}, self._f.scale
        if self.mode == "ChildTuning-D":
            if not self.gradient_mask:
                raise RuntimeError("mode='ChildTuning-D' needs set_gradient_mask(masks) before step()")
            return self.gradient_mask, 1.0
        return {}, 1.0

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "child_tuning": child_block(self._steps)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict, self._steps = pop_child_block(state_dict)
        super().load_state_dict(state_dict)

    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = evaluate_closure(closure)
        masks, scale = self._step_masks()
        for group in self.param_groups:
            params, grads = with_grads(group["params"])
            if any(g.is_sparse for g in grads):
                raise RuntimeError("ChildTuningAdamW does not support sparse gradients")
            masked = [i for i, p in enumerate(params) if p in masks]
            mask_gradients_([grads[i] for i in masked], [masks[params[i]] for i in masked], scale)
            self._update(group, params, grads, masks)
        self._steps += 1
        return loss

    def _update(self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor],
                masks: Mapping[torch.Tensor, torch.Tensor]) -> None:
        if not params:
            return
        beta1, beta2 = group["betas"]
        lr, wd = group["lr"], group["weight_decay"]
        for p in params:
            if not self.state[p]:
                self.state[p] = {"step": 0, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
            self.state[p]["step"] += 1
        exp_avg = [self.state[p]["exp_avg"] for p in params]
        exp_avg_sq = [self.state[p]["exp_avg_sq"] for p in params]
        torch._foreach_mul_(exp_avg, beta1)
        torch._foreach_add_(exp_avg, grads, alpha=1.0 - beta1)
        torch._foreach_mul_(exp_avg_sq, beta2)
        torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1.0 - beta2)
        denom = torch._foreach_sqrt(exp_avg_sq)
        torch._foreach_add_(denom, group["eps"])
        steps = []
        for p in params:
            t = self.state[p]["step"]
            size = lr * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t) if group["correct_bias"] else lr
            steps.append(-size)
        strict = [i for i, p in enumerate(params) if self.strict and p in masks]
        if strict:  # the update, then the decay, are masked too: nothing outside the child moves
            updates = torch._foreach_div(exp_avg, denom)
            torch._foreach_mul_([updates[i] for i in strict], [masks[params[i]] for i in strict])
            torch._foreach_mul_(updates, steps)
            torch._foreach_add_(params, updates)
        else:
            torch._foreach_addcdiv_(params, exp_avg, denom, steps)
        if wd > 0.0:
            decay = [p for i, p in enumerate(params) if i not in set(strict)]
            if decay:
                torch._foreach_add_(decay, torch._foreach_mul(decay, -lr * wd))
            for i in strict:
                params[i].addcmul_(params[i], masks[params[i]], value=-lr * wd)
