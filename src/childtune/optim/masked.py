"""`ChildOptimizer`: any `torch.optim` optimizer, updating only the child network a strategy chooses.

The rule is "multiply the gradient by the mask before the optimizer sees it", so Adam's moments only
ever see child gradients, as in the paper. `strict=True` (ours) then puts back whatever the inner
optimizer moved outside the child network (weight decay, momentum), so a fixed-mask run changes
exactly its child network and can be saved as an exact sparse delta.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch.optim import Optimizer

from childtune.optim.common import (
    by_name,
    child_block,
    evaluate_closure,
    mask_gradients_,
    named_groups,
    pop_child_block,
    unnamed,
)
from childtune.strategies.base import Strategy


class ChildOptimizer(Optimizer):
    """Wraps any `torch.optim` optimizer so it updates only the child network `strategy` chooses.

    It *is* an `Optimizer` sharing the inner one's `param_groups` and `state`, so LR schedulers,
    gradient clipping, Accelerate and the HF `Trainer` treat it like the optimizer it wraps.
    `named_params` is `model.named_parameters()`, a `{name: param}` dict, or a list of param-group
    dicts whose "params" are (name, param) pairs; names are what strategies reason about.
    """

    def __init__(
        self,
        named_params: Iterable,
        strategy: Strategy,
        optimizer: type[Optimizer] = torch.optim.AdamW,
        *,
        strict: bool = False,
        **optimizer_kwargs: Any,
    ) -> None:
        groups = named_groups(named_params)
        self.named = by_name(groups)
        inner_groups = unnamed(groups)
        self.optimizer = optimizer(inner_groups, **optimizer_kwargs)
        super().__init__(inner_groups, self.optimizer.defaults)
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        self.strategy = strategy
        self.strict = strict
        self.steps = 0
        strategy.bind(self.named)

    def state_dict(self) -> dict[str, Any]:
        return {**self.optimizer.state_dict(), "child_tuning": child_block(self.steps, self.strategy)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict, self.steps = pop_child_block(state_dict, self.strategy)
        self.optimizer.load_state_dict(state_dict)
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state

    def step(self, closure=None):
        loss = evaluate_closure(closure)
        with torch.no_grad():
            kept = self._mask(self.strategy.masks(self.steps))
            self.optimizer.step()
            for param, mask, before in kept:  # strict: put back whatever the optimizer moved outside
                param.copy_(torch.where(mask, param, before))
        self.steps += 1
        return loss

    def _mask(self, masks: Mapping[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        grads, kept_masks, kept = [], [], []
        for name, mask in masks.items():
            param = self.named.get(name)
            if param is None:
                raise ValueError(f"strategy gave a mask for {name!r}, which is not in this optimizer")
            if param.grad is None:
                continue
            grads.append(param.grad)
            kept_masks.append(mask)
            if self.strict:
                kept.append((param, mask, param.detach().clone()))
        mask_gradients_(grads, kept_masks, self.strategy.scale)
        return kept
