"""Masked elementwise updates on the hot path of a step, run block by block so they stay in cache.

Two masked operations are slow as eager torch writes them over whole tensors: Child-Tuning_F's gradient
mask (`g *= bool_mask`, whose CPU kernel converts every bool to a float, one by one: about ten times a
float multiply) and strict AdamW's weight decay restricted to the child network (`p[mask] *= f`
gathers and scatters by index). Each is a few passes over memory; done on blocks of `BLOCK` elements,
every pass after the first reads what the previous one left in the CPU's cache, so together they cost
little more than one pass. Values are the same as the whole-tensor forms, bit for bit. `make bench`
measures them against the whole-tensor forms, the copy-and-restore the decay replaces, and a
`torch.compile`d kernel (inductor's CPU loop for these masked ops was no faster than eager torch here).
"""

from __future__ import annotations

import torch

BLOCK = 1 << 17  # elements: a block of float32 weights, its mask and a temporary fit in a 1-2 MiB cache


def _blocks(*tensors: torch.Tensor):
    """Matching flat blocks of equally sized tensors (whole tensors where one is not contiguous)."""
    if not all(t.is_contiguous() for t in tensors):
        return [tensors]
    return zip(*(t.view(-1).split(BLOCK) for t in tensors), strict=True)


def keep_lanes_(grad: torch.Tensor, lanes: torch.Tensor, threshold: int, scale: float) -> None:
    """In place, `grad <- (lanes < threshold) ? grad * scale : 0`, `lanes` shaped like `grad`."""
    for g, lane in _blocks(grad, lanes):
        g.mul_(lane < threshold).mul_(scale)


def scale_where_(values: torch.Tensor, mask: torch.Tensor, factor: float) -> None:
    """In place, `values <- mask ? values * factor : values` (the same bits as `values[mask] *= factor`)."""
    for v, m in _blocks(values, mask):
        v.copy_(torch.where(m, v * factor, v))
