"""A sparse optimizer state and torch's AdamW arithmetic on it (for `optim/sparse.py`).

Per parameter, `SparseChildAdamW` keeps its child elements' flat `index` (int32 where it fits), their two
moments and, for low-precision weights, fp32 `master` copies, plus runs of elements by the tensor step they
joined at (`cohort_sizes`, `cohort_joined`) for per-element bias correction. Here is how elements join
(`append`) and leave (`drop`), how their gradient is gathered (`child_grad`), and the update itself (`adamw`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from childtune.masks import index_dtype
from childtune.overlay import OverlayWeight, elements
from childtune.shards import local

LOW_PRECISION = (torch.bfloat16, torch.float16)


def append(state: dict[str, Any], param: torch.Tensor, added: torch.Tensor, joined: int) -> None:
    """Append elements `added` (flat indices) to a sparse state: zero moments, fp32 masters for
    low-precision weights, and their cohort (tensor step `joined`)."""
    param = local(param)
    low = has_master(param)  # keep fp32 masters of the child elements, and fp32 moments
    added = added.to(param.device, index_dtype(param.numel()))
    new = torch.zeros(len(added), dtype=torch.float32 if low else param.dtype, device=param.device)
    tails = [("exp_avg", new), ("exp_avg_sq", new)]
    if low:
        tails.append(("master", elements(param, added)))
    for key, tail in tails:
        state[key] = torch.cat([state[key], tail]) if key in state else tail.clone()
    # the first index is the strategy's own tensor (a fixed network's whole index): shared, not copied,
    # since neither side changes an index in place (a grown one is always a new tensor)
    state["index"] = torch.cat([state["index"], added]) if "index" in state else added
    add_cohort(state, joined, len(added))


def has_master(param: torch.Tensor) -> bool:
    """Whether a parameter's child elements get fp32 master copies: low-precision weights, whose own dtype
    would round small steps away, and overlay weights (`childtune.overlay`), whose masters are the values
    their forward reads."""
    return param.dtype in LOW_PRECISION or isinstance(param, OverlayWeight)


def drop(state: dict[str, Any], keep: torch.Tensor) -> None:
    """Remove from a sparse state the elements `keep` (over its index) does not hold: their index entries,
    moments and masters (the weight keeps its value), and their places in the cohorts."""
    for key in ("index", "exp_avg", "exp_avg_sq", "master"):
        if key in state:
            state[key] = state[key][keep]
    joined = torch.repeat_interleave(torch.tensor(state["cohort_joined"]), torch.tensor(state["cohort_sizes"]))
    runs, sizes = torch.unique_consecutive(joined[keep], return_counts=True)
    state["cohort_joined"], state["cohort_sizes"] = runs.tolist(), sizes.tolist()


def child_grad(param: torch.Tensor, state: Mapping[str, Any], delivered: torch.Tensor | None = None) -> torch.Tensor:
    """`param`'s gradient at its child elements (all of it for dense state), fp32 for a master copy: from
    `.grad`, plus the child-only gradient `delivered` by backward (`child_only_grads`; alone where the
    weight has no use outside its Linear layers, so `.grad` is None)."""
    index = state.get("index")
    if delivered is not None and index is None:  # a child network of all of it (an FSDP2 rank whose rows were
        # all chosen): the sorted index is every element in order, and the state is dense
        delivered = delivered.view(local(param).shape).to(state["exp_avg"].dtype)
    if param.grad is None:
        if delivered is None:
            raise RuntimeError("a parameter with neither .grad nor a child-only gradient has no child gradient")
        return delivered
    grad = local(param.grad)
    grad = grad if index is None else grad.reshape(-1).index_select(0, index)
    grad = grad.float() if "master" in state else grad
    return grad if delivered is None else grad + delivered


def add_cohort(state: dict[str, Any], joined: int, count: int) -> None:
    """Record `count` elements appended to the state that joined at tensor step `joined` (runs merged)."""
    sizes, starts = state.setdefault("cohort_sizes", []), state.setdefault("cohort_joined", [])
    if starts and starts[-1] == joined:
        sizes[-1] += count
    else:
        sizes.append(count)
        starts.append(joined)


def size_of(param: torch.Tensor, state: Mapping[str, Any]) -> int:
    if "index" in state:
        return len(state["index"])
    return local(param).numel() if "exp_avg" in state else 0


def adamw(group: Mapping[str, Any], live: list[tuple[torch.Tensor, dict[str, Any]]],
           grads: list[torch.Tensor] | None = None) -> None:
    """torch.optim.AdamW's update on the child elements of every live parameter of one group (their
    gradients gathered from `.grad`, or given in `grads`, one vector per live parameter)."""
    if not live:
        return
    beta1, beta2 = group["betas"]
    lr, wd, eps = float(group["lr"]), group["weight_decay"], group["eps"]
    values, gathered = [], []
    for param, s in live:  # dense parameters are updated in place; sparse ones through gathered copies
        p = local(param)
        index = s.get("index")
        if "master" in s:  # low-precision weights: the update runs on the fp32 master of the child elements
            values.append(s["master"])
        else:
            values.append(p if index is None else p.view(-1).index_select(0, index))
        if grads is None:
            gathered.append(child_grad(param, s))
    grads = gathered if grads is None else grads
    avgs, sqs = [s["exp_avg"] for _, s in live], [s["exp_avg_sq"] for _, s in live]
    if wd:
        torch._foreach_mul_(values, 1.0 - lr * wd)
    torch._foreach_lerp_(avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(sqs, beta2)
    torch._foreach_addcmul_(sqs, grads, grads, 1.0 - beta2)
    denom = torch._foreach_sqrt(sqs)
    one = [i for i, (_, s) in enumerate(live) if len(s["cohort_joined"]) == 1]
    if one:  # one step count per tensor: python-float scalars, exactly as torch computes them
        counts = [live[i][1]["step"] - live[i][1]["cohort_joined"][0] for i in one]
        torch._foreach_div_([denom[i] for i in one], [(1 - beta2**t) ** 0.5 for t in counts])
        torch._foreach_add_([denom[i] for i in one], eps)
        torch._foreach_addcdiv_([values[i] for i in one], [avgs[i] for i in one], [denom[i] for i in one],
                                [-lr / (1 - beta1**t) for t in counts])
    for i, (_, s) in enumerate(live):
        if len(s["cohort_joined"]) > 1:  # elements that joined at different steps: per-element corrections
            t = s["step"] - torch.tensor(s["cohort_joined"], dtype=torch.float64)
            sizes, k = torch.tensor(s["cohort_sizes"]), len(s["exp_avg"])
            bc2 = torch.repeat_interleave((1 - beta2**t).sqrt().float(), sizes, output_size=k)
            size = torch.repeat_interleave((-lr / (1 - beta1**t)).float(), sizes, output_size=k)
            values[i].add_(avgs[i].div(denom[i].div_(bc2).add_(eps)).mul_(size))
    for (p, s), v in zip(live, values, strict=True):
        p = local(p)
        if isinstance(p, OverlayWeight):  # the master is the child's values: the update is the write-back
            p.overlay(s["index"], v)
        elif "index" in s:
            p.view(-1).index_put_((s["index"],), v.to(p.dtype))  # a master is written back rounded
        elif "master" in s:
            p.copy_(v)
