"""What every childtune optimizer shares: named parameter groups, the masked-gradient rule, the
AdamW hyper-parameter checks, and the `child_tuning` block that makes a run resumable.

Three optimizers sit on top (`authors.ChildTuningAdamW`, `masked.ChildOptimizer`, `sparse.SparseChildAdamW`).
They differ in *where* the update arithmetic comes from (the authors' AdamW, any torch optimizer, torch's
AdamW on gathered child elements), not in how they take parameters, validate settings or save their
progress, so those parts live here once.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from childtune.strategies.base import Strategy


def evaluate_closure(closure: Callable[[], float] | None) -> float | None:
    """The `Optimizer.step(closure)` contract (typed as torch types it): re-evaluate the loss with gradients
    enabled."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def step_in_backward(params: Iterable[torch.Tensor], update: Callable[[torch.Tensor], None]) -> None:
    """Run `update` (an optimizer's bound method) on each parameter that requires a gradient as soon as
    backward has accumulated it (a post-accumulate-grad hook), holding the optimizer only weakly.

    A hook that held its optimizer (which holds the parameters) would make a cycle through the tensor,
    and Python's cycle collector does not look inside a tensor that autograd also holds: optimizer,
    state and the parameters' model would then outlive the run. In one study process that kept every
    finished cell's model and optimizer alive (SmolLM2-135M: the process grew about 1.1 GB per cell)."""
    method = weakref.WeakMethod(update)

    def hook(param: torch.Tensor) -> None:
        bound = method()
        if bound is not None:  # a dead optimizer's hook does nothing
            bound(param)

    for param in params:
        if param.requires_grad:
            param.register_post_accumulate_grad_hook(hook)


def mask_gradients_(grads: list[torch.Tensor], masks: list[torch.Tensor], scale: float = 1.0) -> None:
    """In place: g <- g * mask * scale, one fused call per list (no Python loop over elements)."""
    if grads:
        torch._foreach_mul_(grads, masks)
        if scale != 1.0:
            torch._foreach_mul_(grads, scale)


def with_grads(params: Iterable[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The parameters that have a gradient, and their gradients, in order."""
    kept: list[torch.Tensor] = []
    grads: list[torch.Tensor] = []
    for p in params:
        if p.grad is not None:
            kept.append(p)
            grads.append(p.grad)
    return kept, grads


def named_groups(named_params: Iterable[Any]) -> list[dict[str, Any]]:
    """Normalise the accepted forms of named parameters to param-group dicts of (name, param) pairs.

    Accepted: `model.named_parameters()`, a `{name: param}` dict, or a list of param-group dicts whose
    "params" are (name, param) pairs. Names must be unique: strategies reason about names.
    """
    if isinstance(named_params, Mapping):
        named_params = named_params.items()
    items = list(named_params)
    if not items:
        raise ValueError("ChildOptimizer got no parameters")
    groups = [{**g, "params": list(g["params"])} for g in items] if isinstance(items[0], Mapping) else [
        {"params": items}]
    if len({n for g in groups for n, _ in g["params"]}) != sum(len(g["params"]) for g in groups):
        raise ValueError("parameter names must be unique")
    return groups


def by_name(groups: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """{name: parameter} over every group of `named_groups`."""
    return {n: p for g in groups for n, p in g["params"]}


def unnamed(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same groups with bare parameters, as torch optimizers take them."""
    return [{**g, "params": [p for _, p in g["params"]]} for g in groups]


def check_adamw(lr: float, betas: tuple[float, float], eps: float, weight_decay: float = 0.0) -> None:
    """Refuse AdamW settings torch would refuse, before any state is built."""
    if lr < 0.0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be in [0, 1), got {betas}")
    if eps < 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if weight_decay < 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")


def child_block(steps: int, strategy: Strategy | None = None) -> dict[str, Any]:
    """The `child_tuning` entry of an optimizer's state_dict: steps taken and the strategy's own state."""
    block: dict[str, Any] = {"steps": steps}
    if strategy is not None:
        block["strategy"] = strategy.state_dict()
    return block


def pop_child_block(state_dict: Mapping[str, Any], strategy: Strategy | None = None) -> tuple[dict[str, Any], int]:
    """Split a saved state_dict into torch's part and our step count, restoring the strategy's state."""
    state_dict = dict(state_dict)
    child = state_dict.pop("child_tuning", {})
    if strategy is not None:
        strategy.load_state_dict(child.get("strategy", {}))
    return state_dict, child.get("steps", 0)
