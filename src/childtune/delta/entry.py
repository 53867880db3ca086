"""The change to one tensor, and the exact arithmetic that applies and reverts it.

`extract` compares base and tuned weights bit for bit and checks both float round trips of every changed
element, listing the few that fail as exceptions carrying their exact values (the module docstring of
`childtune.delta.sparse` explains why); `step` applies (`w + d`) or reverts (`w - d`) an entry.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from childtune.delta.errors import DeltaError

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT_OF = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern as integers: exact comparison that tells -0.0 from +0.0, unlike `==`."""
    return t.view(_INT_OF[t.element_size()])


def flat_view(t: torch.Tensor) -> torch.Tensor:
    if not t.is_contiguous():
        raise DeltaError("cannot write a delta into a non-contiguous tensor")
    return t.view(-1)


def numel(shape: Iterable[int]) -> int:
    return math.prod(shape)


@dataclass
class SparseEntry:
    """The change to one tensor: sorted flat `indices` (int64, never cast), `values` = tuned - base.

    `exc_pos` are positions into `indices` whose float round trip is not exact; `exc_base`/`exc_tuned`
    hold their exact values (see the module docstring).
    """

    shape: tuple[int, ...]
    indices: torch.Tensor
    values: torch.Tensor
    exc_pos: torch.Tensor
    exc_base: torch.Tensor
    exc_tuned: torch.Tensor


def extract(name: str, base: torch.Tensor, tuned: torch.Tensor) -> SparseEntry | None:
    """Changed elements (bit-exact comparison) of one tensor, with exceptions where arithmetic is lossy."""
    b = base.detach().cpu().reshape(-1)
    t = tuned.detach().cpu().reshape(-1)
    indices = (bits(b) != bits(t)).nonzero().squeeze(1)
    if not indices.numel():
        return None
    bb, tt = b[indices], t[indices]
    if not (torch.isfinite(bb).all() and torch.isfinite(tt).all()):
        raise DeltaError(f"{name}: non-finite weights cannot be stored as a delta")
    values = difference(tt, bb)
    lossy = (bits(bb + values) != bits(tt)) | (bits(tt - values) != bits(bb))
    pos = lossy.nonzero().squeeze(1)
    return SparseEntry(tuple(base.shape), indices, values, pos, bb[pos].clone(), tt[pos].clone())


def difference(tuned: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """`tuned - base`, overflow clamped to the largest float (the round-trip check then makes it exact)."""
    big = torch.finfo(tuned.dtype).max
    return torch.nan_to_num(tuned - base, posinf=big, neginf=-big)


def step(entry: SparseEntry, flat: torch.Tensor, forward: bool) -> torch.Tensor:
    """New values at `entry.indices`: `w + d` forward, `w - d` back, exceptions set exactly.

    An exception is set only where the weight holds its exact starting value; elsewhere (a delta stacked
    on another one) it is added like any other element, which is what makes deltas compose.
    The arithmetic runs on the CPU, where extraction checked it, whatever device the model is on.
    """
    current = flat[entry.indices.to(flat.device)].cpu()
    values = entry.values.to(current.dtype)
    new = current + values if forward else current - values
    if entry.exc_pos.numel():
        start, end = (entry.exc_base, entry.exc_tuned) if forward else (entry.exc_tuned, entry.exc_base)
        at_start = bits(current[entry.exc_pos]) == bits(start)
        new[entry.exc_pos] = torch.where(at_start, end, new[entry.exc_pos])
    return new.to(flat.device)


