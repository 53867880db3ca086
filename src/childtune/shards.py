"""Parameters sharded by FSDP2: each rank's piece of a parameter, and the collectives a global choice needs.

`torch.distributed.fsdp.fully_shard` turns every parameter into a DTensor split along dim 0 over a 1-D
device mesh (`Shard(0)`): rank r holds rows [r*c, (r+1)*c) of the whole tensor, c = ceil(rows / ranks),
the last ranks fewer or none. Its gradients after backward are the same kind of shard. childtune works
on those pieces as plain tensors: a mask is a bool tensor shaped like the rank's *local* rows, strategies
score local rows, optimizers update local rows (`to_local()` is a view of the shard, so writing it
writes the parameter). Only what ranks the whole model needs the other ranks, and it goes through here:
a count summed over ranks (the top-k bisection, ID3's budget), candidates gathered (ID3's admission),
masks gathered on rank 0 for saving (`gather_masks`), child indices gathered whole (`whole_index`: a
child-only weight gradient is computed from the gathered weight, `optim/child_grad.py`).

Because Shard(0) keeps each rank's rows contiguous and in rank order, "tensor order, then flat index"
(how `masks.top_k` breaks ties) is "tensor order, then rank, then local flat index": the same cut as one
process, which is what makes a sharded run choose exactly the child network an unsharded one does.

Every helper is the identity (or a local sum) on ordinary tensors, so code written against it costs one
`isinstance` per call when nothing is sharded.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from types import EllipsisType
from typing import TYPE_CHECKING, TypeGuard

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

_READING = [False]  # a process-wide flag, not a ContextVar: CUDA runs backward hooks on autograd's own threads


@contextmanager
def reading_gradients() -> Iterator[None]:
    """A backward pass that only reads gradients (the Fisher pass on a sharded model, which can reach its
    gradient shards only through `.grad`): optimizers stepping in backward leave it alone."""
    _READING[0] = True
    try:
        yield
    finally:
        _READING[0] = False


def only_reading() -> bool:
    """Whether the running backward is inside `reading_gradients`."""
    return _READING[0]


def _dtensor() -> type[DTensor]:
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(t: torch.Tensor | None) -> TypeGuard[DTensor]:
    """Whether `t` is a DTensor (an FSDP2 parameter or its gradient)."""
    return t is not None and isinstance(t, _dtensor())


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's rows of `t` as a plain tensor, a view (writes go to the shard); `t` itself if unsharded."""
    if not is_sharded(t):
        return t
    with torch.no_grad():
        return t.to_local()


def check_layout(name: str, param: torch.Tensor) -> None:
    """Refuse a sharding childtune does not reason about: it needs a 1-D mesh and Shard(0), FSDP2's layout."""
    if not is_sharded(param):
        return
    from torch.distributed.tensor import Shard

    if param.device_mesh.ndim != 1 or tuple(param.placements) != (Shard(0),):
        raise ValueError(f"parameter {name!r} is sharded as {tuple(param.placements)} over a "
                         f"{param.device_mesh.ndim}-D mesh; childtune supports FSDP2's Shard(0) over a 1-D mesh")


def rows(param: torch.Tensor) -> slice | EllipsisType:
    """The rows of the whole parameter this rank holds, as an index (`...`, all of it, when unsharded)."""
    if not is_sharded(param) or param.dim() == 0:
        return ...
    mesh = param.device_mesh
    total, ranks, me = param.shape[0], mesh.size(), mesh.get_local_rank()
    per = math.ceil(total / ranks)
    start = min(me * per, total)
    stop = min(start + per, total)
    held = local(param).shape[0]
    if stop - start != held:
        raise ValueError(f"a shard of {stop - start} rows was expected on rank {me}, it holds {held}: "
                         "not FSDP2's even split along dim 0")
    return slice(start, stop)


def group_of(params: Iterable[torch.Tensor]) -> dist.ProcessGroup | None:
    """The process group the parameters are sharded over, or None when none of them is sharded."""
    for p in params:
        if is_sharded(p):
            return p.device_mesh.get_group()
    return None


def total(counts: Iterable[int], group: dist.ProcessGroup | None) -> list[int]:
    """`counts` summed over the ranks of `group` (unchanged without one): one all-reduce for the lot."""
    counts = [int(c) for c in counts]
    if group is None:
        return counts
    values = torch.tensor(counts, dtype=torch.int64)
    dist.all_reduce(values, group=group)
    return values.tolist()


def per_rank(counts: Iterable[int], group: dist.ProcessGroup | None) -> list[list[int]]:
    """Every rank's `counts`, in rank order (just ours without a group): one all-gather."""
    counts = [int(c) for c in counts]
    if group is None:
        return [counts]
    mine = torch.tensor(counts, dtype=torch.int64)
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, mine, group=group)
    return [t.tolist() for t in out]


def gather_values(values: torch.Tensor, group: dist.ProcessGroup | None) -> list[torch.Tensor]:
    """A 1-D CPU tensor of any length from every rank of `group`, in rank order."""
    if group is None:
        return [values]
    sizes = [n for (n,) in per_rank([len(values)], group)]
    padded = torch.zeros(max(sizes), dtype=values.dtype)
    padded[: len(values)] = values
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded, group=group)
    return [t[:n] for t, n in zip(out, sizes, strict=True)]


def whole_index(index: torch.Tensor, param: torch.Tensor) -> tuple[torch.Tensor, slice]:
    """Every rank's child elements of `param` as sorted flat indices into the whole parameter (int64, on
    `index`'s device), and where this rank's `index` (sorted flat indices into its own rows) sits among
    them: the identity and all of it when `param` is not sharded (collective otherwise: every rank calls
    it for the same parameters in the same order). Rank order is row order, so the pieces join sorted."""
    if not is_sharded(param):
        return index, slice(0, len(index))
    where = rows(param)
    assert isinstance(where, slice)  # a sharded parameter with rows
    start = where.start * math.prod(param.shape[1:])
    pieces = gather_values(index.to("cpu", torch.int64) + start, param.device_mesh.get_group())
    before = sum(len(piece) for piece in pieces[: param.device_mesh.get_local_rank()])
    return torch.cat(pieces).to(index.device), slice(before, before + len(index))


def full_mask(mask: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The whole-parameter mask from every rank's local rows (collective: every rank calls it)."""
    if not is_sharded(param):
        return mask
    from torch.distributed.tensor import DTensor

    whole = DTensor.from_local(mask.to(torch.uint8), param.device_mesh, param.placements,
                               shape=param.shape, stride=param.stride())
    return whole.full_tensor().bool()


def gather_masks(masks: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole masks for every name, on every rank (collective; in name order so all ranks agree)."""
    return {n: full_mask(masks[n], params[n]) for n in masks}
