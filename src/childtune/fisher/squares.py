"""From gradients to scores: squared in float32, optionally clipped first as the authors clipped them."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from childtune import shards


def add_squares_in_backward(loss: torch.Tensor, params: dict[str, nn.Parameter], sums: dict[str, torch.Tensor],
                            clip: float | None) -> None:
    """Backward of `loss`, each parameter's gradient squared into its sum (clipped first) and freed the moment
    autograd has accumulated it. `autograd.grad` would hand back every dense gradient together, which with
    the float32 sums made the pass bigger than a training step; this way at most the gradients backward is
    still summing exist at once, as in a training step that frees each gradient as it comes.

    Only `params` get a gradient (backward's `inputs`, so no other weight's is computed); their `.grad` are
    put back afterwards, and optimizers stepping in backward leave this backward alone
    (`shards.reading_gradients`).
    """
    def square(name: str) -> Callable[[nn.Parameter], None]:
        def hook(param: nn.Parameter) -> None:
            add_squares({name: sums[name]}, clipped([param.grad], clip))
            param.grad = None
        return hook

    saved = [p.grad for p in params.values()]
    handles = [p.register_post_accumulate_grad_hook(square(n)) for n, p in params.items()]
    try:
        for p in params.values():
            p.grad = None
        with shards.reading_gradients():
            torch.autograd.backward(loss, inputs=list(params.values()))
    finally:
        for handle in handles:
            handle.remove()
        for p, g in zip(params.values(), saved, strict=True):
            p.grad = g


def add_squares(sums: dict[str, torch.Tensor], gradients: Iterable[torch.Tensor | None], stacked: bool = False) -> None:
    """Accumulate squared gradients in float32, where half-precision squares would underflow.

    `stacked` gradients carry one row per example, each squared before summing.
    """
    for s, g in zip(sums.values(), gradients, strict=True):
        if g is not None:  # a parameter the output does not depend on scores zero
            s += g.float().pow(2).sum(0) if stacked else g.float().pow(2)


def clip_factor(norms: torch.Tensor, clip: float) -> torch.Tensor:
    """`clip_grad_norm_`'s own factor min(1, clip / (norm + 1e-6)), so the authors' scores are reproduced."""
    return (clip / (norms + 1e-6)).clamp(max=1.0)


def clipped(gradients: Sequence[torch.Tensor | None], clip: float | None, stacked: bool = False,
            group: dist.ProcessGroup | None = None) -> Sequence[torch.Tensor | None]:
    """Each gradient scaled to L2 norm at most `clip` (per example row when `stacked`), by `clip_factor`.
    Row shards (`group`): a tensor's norm is summed over its ranks' rows first."""
    if clip is None:
        return gradients
    whole = None
    if group is not None:
        whole = torch.stack([torch.zeros(()) if g is None else g.float().pow(2).sum() for g in gradients])
        dist.all_reduce(whole, group=group)
        whole = whole.sqrt()
    out: list[torch.Tensor | None] = []
    for i, g in enumerate(gradients):
        if g is None:
            out.append(g)
            continue
        g = g.float()
        norms = whole[i] if whole is not None else g.flatten(1).norm(dim=1) if stacked else g.norm()
        factor = clip_factor(norms, clip)
        out.append(g * factor.view(-1, *([1] * (g.dim() - 1))) if stacked else g * factor)
    return out
