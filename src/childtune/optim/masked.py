"""`ChildOptimizer`: any `torch.optim` optimizer, updating only the child network a strategy chooses.

The rule is "multiply the gradient by the mask before the optimizer sees it", so Adam's moments only
ever see child gradients, as in the paper. `strict=True` (ours) then keeps the inner optimizer from
moving anything outside the child network (weight decay, momentum), so a fixed-mask run changes
exactly its child network and can be saved as an exact sparse delta.

Strict without copies. In general that takes a copy of every masked tensor before the step and a
`torch.where` after it: two extra passes over the model. For torch's AdamW (and Adam without L2 decay)
under a fixed or growing child network none is needed: a weight outside the child network has had a
zero gradient on every step so far, so its moments are exactly zero and Adam's update there is
`-lr * 0 / (0 + eps)`, which leaves the weight's bits as they were; only decoupled weight decay would
move it. So the decay is taken out of the inner step and applied to the child elements alone
(`p[mask] *= 1 - lr * wd`, AdamW's own formula), and nothing is copied. Per-step masks (Child-Tuning_F),
whose weights had gradients on earlier steps, and other optimizers keep the copy-and-restore.

`in_backward=True` steps each parameter inside backward (a post-accumulate-grad hook: the inner
optimizer then sees this parameter's gradient alone, every other being None) and frees its gradient at
once, so the model's gradients never coexist. Child-Tuning_F draws once per step, at the first hook,
and each hook reads its parameter's share of that draw: the same masks and updates as `step()`. While
`accumulating` is set, hooks leave gradients for autograd to add the next micro-batch to. Gradients
a whole-step choice needs (ID3) belong to `SparseChildAdamW(in_backward=True)`.

The inner optimizer defaults to torch's fastest AdamW for the parameters: `fused=True` when neither
`fused` nor `foreach` is given and every parameter is a floating-point tensor on a CPU or CUDA device
(benchmarks/RESULTS.md measures fused at a quarter of the foreach step on this CPU).

Child-Tuning_F in one pass. Over a fused AdamW (the default), float32 CPU parameters and the compiled
kernels available (`childtune.kernels`), F's step is one pass per tensor: the keep bit is computed in
registers from the element's position and the step's key, the gradient masked and rescaled, and
torch's fused AdamW formula applied, moments and step count kept in the inner optimizer's own state
(so its `state_dict` is the one torch's AdamW would save). The masked gradient is never written back:
after this step `.grad` holds what backward left. Anything else (foreach or another optimizer, CUDA,
bf16, `amsgrad`, `maximize`, `strict`) masks the gradients in place and runs the inner step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, overload

import torch
from torch.optim import Optimizer

from childtune import kernels
from childtune.kernels import scale_where_
from childtune.optim.common import (
    by_name,
    child_block,
    evaluate_closure,
    mask_gradients_,
    named_groups,
    pop_child_block,
    step_in_backward,
    unnamed,
)
from childtune.shards import local, only_reading
from childtune.strategies.base import Strategy
from childtune.strategies.child_f import ChildTuningF


class ChildOptimizer(Optimizer):
    """Wraps any `torch.optim` optimizer so it updates only the child network `strategy` chooses.

    It *is* an `Optimizer` sharing the inner one's `param_groups` and `state`, so LR schedulers,
    gradient clipping, Accelerate and the HF `Trainer` treat it like the optimizer it wraps.
    `named_params` is `model.named_parameters()`, a `{name: param}` dict, or a list of param-group
    dicts whose "params" are (name, param) pairs; names are what strategies reason about.
    """

    def __init__(
        self,
        named_params: Iterable[Any],
        strategy: Strategy,
        optimizer: type[Optimizer] = torch.optim.AdamW,
        *,
        strict: bool = False,
        in_backward: bool = False,
        **optimizer_kwargs: Any,
    ) -> None:
        groups = named_groups(named_params)
        self.named = by_name(groups)
        inner_groups = unnamed(groups)
        self.optimizer = optimizer(inner_groups, **_fastest(optimizer, optimizer_kwargs, self.named.values()))
        super().__init__(inner_groups, self.optimizer.defaults)
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        self.strategy = strategy
        self.strict = strict
        self.steps = 0
        strategy.bind(self.named)
        l2 = optimizer is torch.optim.Adam and any(g.get("weight_decay", 0) for g in self.param_groups)
        # strict without copies (module docstring): zero moments outside the child network, decay taken out
        # (not for a dynamic network: an element that left keeps its moments here, which would move it).
        # Not under `maximize`, whose `+ lr * 0` would turn a -0.0 weight into +0.0.
        self._no_copy = (strict and strategy.kind in ("fixed", "growing") and not l2
                         and optimizer in (torch.optim.AdamW, torch.optim.Adam)
                         and not any(g.get("maximize") for g in self.param_groups))
        self.in_backward = in_backward
        self._names = {id(p): n for n, p in self.named.items()}
        self.accumulating = False  # in backward: True while a micro-batch that is not the update's last runs
        self._drawn: int | None = None  # the step whose F draw the hooks have made
        self._one_pass = self._can_step_f_in_one_pass()
        self._index_groups()
        if in_backward:
            if strict and not self._no_copy:
                raise ValueError("a strict ChildOptimizer that copies and restores weights around the step "
                                 "(per-step masks, or an optimizer other than Adam/AdamW) cannot step in backward")
            if strategy.needs_gradients:
                raise ValueError(f"{type(strategy).__name__} chooses its child network from the whole step's "
                                 "gradients: use SparseChildAdamW(in_backward=True) for it")
            step_in_backward(self.named.values(), self._update_in_backward)

    def state_dict(self) -> dict[str, Any]:
        return {**self.optimizer.state_dict(), "child_tuning": child_block(self.steps, self.strategy)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict, self.steps = pop_child_block(state_dict, self.strategy)
        self.optimizer.load_state_dict(state_dict)
        self.param_groups = self.optimizer.param_groups  # new group dicts: the old ones no longer see the scheduler
        self.state = self.optimizer.state
        self._index_groups()

    def _index_groups(self) -> None:
        """{id(param): its param group}, for a hook stepping one parameter; rebuilt whenever groups are replaced."""
        self._group_of = {id(p): g for g in self.param_groups for p in g["params"]}

    @torch.no_grad()
    def _update_in_backward(self, param: torch.Tensor) -> None:
        """One parameter's masked update as soon as backward has its gradient, which is then freed. The inner
        optimizer steps only this parameter (every other gradient is None), with the mask the whole-model
        step would use: for F, one draw (key) per step shared by all hooks, each computing its parameter's bits."""
        if self.accumulating or only_reading():  # autograd adds the next micro-batch's gradient to this one
            return
        grad = self._dense_grad(param)  # this rank's rows under FSDP2, where masks are rows too (childtune.shards)
        if not torch.isfinite(grad).all():
            raise RuntimeError(f"non-finite gradient for {self._names[id(param)]!r}: with the optimizer step in "
                               "backward, updates already made to other parameters cannot be undone")
        name = self._names[id(param)]
        if isinstance(self.strategy, ChildTuningF):
            if self._drawn != self.steps:
                self.strategy.draw(self.steps)
                self._drawn = self.steps
            if self._one_pass:
                self._adamw_in_one_pass(self.strategy, param, self._group_of[id(param)])
            else:
                if self.strategy.drawn(name) is not None:
                    self.strategy.apply_drawn_(name, grad)
                self.optimizer.step()
        else:
            if self.strategy.dense_gradients_at(self.steps):  # a dynamic network's window
                self.strategy.observe(name, grad)
            index = self.strategy.network(self.steps).get(name)  # this parameter's dense view alone
            mask = None if index is None else self.strategy.dense({name: index})[name]
            if mask is not None:
                mask_gradients_([grad], [mask], self.strategy.scale)
            if self._no_copy:
                self._step_decaying_the_child_only({name: mask} if mask is not None else {})
            else:
                self.optimizer.step()
        param.grad = None

    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = evaluate_closure(closure)
        if self.in_backward:  # the parameters were updated during backward; the next masks see the next step
            self.steps += 1
            return loss
        with torch.no_grad():
            # F: draw, mask and AdamW in one pass per tensor (module docstring); `_one_pass` implies F
            if self._one_pass and isinstance(self.strategy, ChildTuningF):
                self.strategy.draw(self.steps)
                for group in self.param_groups:
                    for param in group["params"]:
                        if param.grad is not None:
                            self._adamw_in_one_pass(self.strategy, param, group)
                self.steps += 1
                return loss
            if isinstance(self.strategy, ChildTuningF) and not self.strict:  # drawn where it is applied
                self.strategy.mask_gradients_(self.steps, {n: self._dense_grad(p) for n, p in
                                                           self.strategy.maskable().items() if p.grad is not None})
                self.optimizer.step()
                self.steps += 1
                return loss
            if self.strategy.dense_gradients_at(self.steps):  # a dynamic network's window
                for name, param in self.named.items():
                    if param.grad is not None:
                        self.strategy.observe(name, self._dense_grad(param))
            masks = self.strategy.masks(self.steps)
            kept = self._mask(masks)
            if self._no_copy:
                self._step_decaying_the_child_only(masks)
            else:
                self.optimizer.step()
            for param, mask, before in kept:  # strict: put back whatever the optimizer moved outside
                param.copy_(torch.where(mask, param, before))  # (the parameter's local rows under FSDP2)
        self.steps += 1
        return loss

    def _can_step_f_in_one_pass(self) -> bool:
        """Whether F's step can be `kernels.adamw_`: torch's fused AdamW (or Adam without decay) and nothing
        that formula leaves out, on parameters the compiled kernel takes."""
        groups = self.param_groups
        adamw = type(self.optimizer) is torch.optim.AdamW or (
            type(self.optimizer) is torch.optim.Adam and not any(g["weight_decay"] for g in groups))
        unusual = ("amsgrad", "maximize", "capturable", "differentiable")
        plain = all(g.get("fused") and not any(g.get(k) for k in unusual) for g in groups)
        return (isinstance(self.strategy, ChildTuningF) and not self.strict and self.strategy.p != 1.0 and adamw
                and plain and kernels.one_pass_ready(*(local(p) for p in self.named.values())))

    def _dense_grad(self, param: torch.Tensor) -> torch.Tensor:
        """`param`'s gradient (its local rows), to be masked element by element in place. A sparse gradient
        (`nn.Embedding(sparse=True)`) has no such elements: refused by name here, where torch would fail with
        a layout error. Construction cannot tell: a parameter's gradient is sparse only once backward ran."""
        if param.grad is None:
            raise RuntimeError(f"{self._names[id(param)]!r} has no gradient to mask")
        grad = local(param.grad)
        if grad.layout != torch.strided:
            raise ValueError(f"{self._names[id(param)]!r} has a sparse gradient ({grad.layout}), which ChildOptimizer "
                             "cannot mask: build its module with sparse=False (e.g. nn.Embedding(..., sparse=False))")
        return grad

    def _adamw_in_one_pass(self, f: ChildTuningF, param: torch.Tensor, group: dict[str, Any]) -> None:
        """`param`'s masked AdamW step with `kernels.adamw_` under the last draw of `f` (the strategy), its
        state kept as torch's fused AdamW keeps it."""
        state = self.state[param]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["step"] += 1
        draw = f.drawn(self._names[id(param)])
        kernels.adamw_(local(param), self._dense_grad(param).contiguous(), local(state["exp_avg"]),
                       local(state["exp_avg_sq"]), draw, f.scale, lr=float(group["lr"]),
                       betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"],
                       step=float(state["step"]))

    def _step_decaying_the_child_only(self, masks: Mapping[str, torch.Tensor]) -> None:
        """AdamW's decoupled decay, `p *= 1 - lr * wd`, on child elements (and unmasked parameters) only;
        then the inner step without decay. The inner step leaves non-child weights bit for bit as they were."""
        mask_of = {id(self.named[n]): m for n, m in masks.items()}
        decays = [g.get("weight_decay", 0.0) for g in self.param_groups]
        try:
            for group, wd in zip(self.param_groups, decays, strict=True):
                if not wd:
                    continue
                factor = 1 - float(group["lr"]) * wd
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    mask = mask_of.get(id(p))
                    if mask is None:
                        p.mul_(factor)
                    else:
                        scale_where_(local(p), mask, factor)  # one compiled pass (childtune.kernels)
                group["weight_decay"] = 0.0
            self.optimizer.step()
        finally:
            for group, wd in zip(self.param_groups, decays, strict=True):
                group["weight_decay"] = wd

    def _mask(self, masks: Mapping[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        grads, kept_masks, kept = [], [], []
        for name, mask in masks.items():
            param = self.named.get(name)
            if param is None:
                raise ValueError(f"strategy gave a mask for {name!r}, which is not in this optimizer")
            if param.grad is None:
                continue
            grads.append(self._dense_grad(param))
            kept_masks.append(mask)
            if self.strict and not self._no_copy:
                kept.append((local(param), mask, local(param).detach().clone()))
        mask_gradients_(grads, kept_masks, self.strategy.scale)
        return kept


def _fastest(optimizer: type[Optimizer], kwargs: dict[str, Any], params: Iterable[torch.Tensor]) -> dict[str, Any]:
    """`kwargs`, plus `fused=True` for torch's Adam/AdamW where the caller chose no implementation and every
    parameter can take the fused kernel (floating point, on a CPU or CUDA device)."""
    if optimizer not in (torch.optim.AdamW, torch.optim.Adam) or {"fused", "foreach"} & kwargs.keys():
        return kwargs
    if all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params):
        return {**kwargs, "fused": True}
    return kwargs
