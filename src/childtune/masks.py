"""Child networks as data, in two forms: indices (name -> sorted flat int index tensor) and masks (name ->
bool tensor of the parameter's shape).

A fixed or growing child network is held as `Indices` while a run trains (strategies, `SparseChildAdamW`,
child-only gradients, checkpoints): 4 bytes per child element, where a mask costs a byte per weight
whatever p is (half of a bfloat16 model's weights' size). Masks are the dense view, made from indices
only where an element-by-element product needs one (a dense masked optimizer, Child-Tuning_F's per-step
draw, counting and saving a finished run's network) and dropped after. The helpers here are the few
operations they share: converting and validating both forms, growing an index, and picking the top-k
elements of a score spread over many tensors (Fisher, ID3's importance, random scores).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
import torch.distributed as dist

from childtune import shards
from childtune.fileio import atomic_write
from childtune.layers import layer_index

Masks = dict[str, torch.Tensor]
Indices = dict[str, torch.Tensor]
"""Per parameter, the sorted, distinct flat indices of its child elements (`index_dtype` of its size)."""

MASKS_FILE = "masks.safetensors"
"""A run's child network, saved in its folder by every method with a fixed or growing one."""


def save_masks(masks: Mapping[str, torch.Tensor], path: str | Path) -> Path:
    """Masks as a safetensors file of bool tensors (`childtune.study.analysis.load_masks` reads it back)."""
    from safetensors.torch import save

    tensors = {n: m.detach().to("cpu", torch.bool).contiguous() for n, m in masks.items()}
    return atomic_write(path, save(tensors, metadata={"childtune": "masks"}))


def check_probability(label: str, p: float) -> float:
    """Refuse a keep-probability outside (0, 1]: p=0 would divide by zero, p>1 is not a probability."""
    if not isinstance(p, int | float) or not 0.0 < float(p) <= 1.0:
        raise ValueError(f"{label} must be in (0, 1], got {p!r}")
    return float(p)


def check_mask(name: str, param: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A mask must be a bool tensor shaped like its parameter; say which one is wrong and how."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask for {name!r} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask for {name!r} must have dtype torch.bool, got {mask.dtype}")
    if mask.shape != param.shape:
        raise ValueError(
            f"mask for {name!r} has shape {tuple(mask.shape)}, parameter has {tuple(param.shape)}"
        )
    return mask.to(param.device)


def count(masks: Mapping[str, torch.Tensor]) -> int:
    """Number of elements in the child network."""
    return int(sum(int(m.sum()) for m in masks.values()))


def index_dtype(numel: int) -> torch.dtype:
    """int32 flat indices where they fit (half the memory), int64 for tensors of 2^31 elements or more."""
    return torch.int32 if numel < 2**31 else torch.int64


def empty_index(param: torch.Tensor) -> torch.Tensor:
    """The index of no element of `param` (a frozen parameter), on its device."""
    return torch.zeros(0, dtype=index_dtype(param.numel()), device=param.device)


def to_index(mask: torch.Tensor) -> torch.Tensor:
    """The sorted flat indices of a bool mask's True elements, in `index_dtype`, on its device."""
    return mask.reshape(-1).nonzero().squeeze(1).to(index_dtype(mask.numel()))


def to_indices(masks: Mapping[str, torch.Tensor]) -> Indices:
    return {n: to_index(m) for n, m in masks.items()}


def to_mask(index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The dense view of `index`: a bool tensor shaped like `like` (its parameter), on the index's device."""
    mask = torch.zeros(like.shape, dtype=torch.bool, device=index.device)
    mask.view(-1)[index] = True
    return mask


def to_masks(indices: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor]) -> Masks:
    """Dense views of `indices` over their parameters (`params`: name -> tensor of the indices' shape)."""
    return {n: to_mask(i, params[n]) for n, i in indices.items()}


def union(index: torch.Tensor, added: torch.Tensor) -> torch.Tensor:
    """A grown index: `index` and `added` (flat indices in any order) as one sorted, distinct index of
    `index`'s dtype (a new tensor: an optimizer or a checkpoint may still hold the old one)."""
    grown: torch.Tensor = torch.unique(torch.cat([index, added.to(index.device, index.dtype)]))  # sorted
    return grown


def size(indices: Mapping[str, torch.Tensor]) -> int:
    """Number of elements in the child network held as indices."""
    return sum(len(i) for i in indices.values())


def check_index(name: str, param: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`index` as sorted, distinct flat indices into `param`, in `index_dtype`, on its device; a bool mask
    (a checkpoint from before child networks were saved as indices) is converted."""
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"the child index of {name!r} must be a torch.Tensor, got {type(index).__name__}")
    if index.dtype == torch.bool:
        return to_index(check_mask(name, param, index))
    if index.dim() != 1 or index.is_floating_point() or index.is_complex():
        raise ValueError(f"the child index of {name!r} must be a 1-D integer tensor")
    in_range = not len(index) or (int(index[0]) >= 0 and int(index[-1]) < param.numel())
    if not in_range or not bool((index[1:] > index[:-1]).all()):
        raise ValueError(f"the child index of {name!r} must be sorted, distinct flat indices in [0, {param.numel()})")
    return index.to(param.device, index_dtype(param.numel()))


def top_k(scores: Mapping[str, torch.Tensor], k: int, group: dist.ProcessGroup | None = None) -> Masks:
    """Exactly the `k` highest-scoring elements across all tensors, as masks.

    A percentile threshold (the authors' `score >= np.percentile(...)`) keeps every tie and so can
    overshoot the requested size; this cut keeps the count exact, breaking ties at the threshold by
    position (tensor order, then flat index), so the choice is deterministic.

    Memory: one bool per element, the masks themselves. A global `torch.topk` would need a copy of
    every score plus its sort buffers (about 20 bytes per weight on the CPU: more than the weights,
    gradients and AdamW state of dense training together, and what made a 0.67B model's Fisher pass run
    out of memory in `make bench`). Instead the k-th largest value is found by bisection on the scores'
    order-preserving integer keys, 32 counting passes over the tensors as they are, then every element
    above it and the first ones at it are marked.

    With `group` the scores are each rank's rows of FSDP2-sharded tensors (`childtune.shards`) and `k`
    counts over all ranks: each counting pass is summed over ranks (one all-reduce of one integer), and
    the ties at the threshold are taken in tensor order, then rank order, then local position, which for
    row shards is the single-process order. Every rank gets the masks of its own rows.
    """
    names = list(scores)
    total = shards.total([sum(scores[n].numel() for n in names)], group)[0]
    if not 0 <= k <= total:
        raise ValueError(f"cannot choose {k} elements out of {total}")
    nan, negative = shards.total([any(bool(torch.isnan(scores[n]).any()) for n in names),
                                  any(bool((scores[n] < 0).any()) for n in names)], group)
    if nan:
        raise ValueError("scores hold NaN, which has no rank")
    signed = negative > 0  # Fisher scores never are: keys are their bits

    def key(n: str) -> torch.Tensor:
        return _key(scores[n], signed)

    def above(t: int, strictly: bool = False) -> int:
        mine = sum(int((key(n) > t if strictly else key(n) >= t).sum()) for n in names)
        return shards.total([mine], group)[0]

    if k == 0:
        return {n: torch.zeros_like(scores[n], dtype=torch.bool) for n in names}
    low, high = -(2**31), 2**31 - 1  # invariant: above(low) >= k > above(high + 1)
    while low < high:
        mid = (low + high + 1) // 2
        if above(mid) >= k:
            low = mid
        else:
            high = mid - 1
    ties = k - above(low, strictly=True)  # at the threshold still to take, by position
    everyone = shards.per_rank([int((key(n) == low).sum()) for n in names], group)
    me = 0 if group is None else dist.get_rank(group)
    out: Masks = {}
    for i, n in enumerate(names):
        keys = key(n)
        mask = keys > low
        for rank, counts in enumerate(everyone):
            take = min(ties, counts[i])
            if rank == me and take:
                mask.view(-1)[(keys == low).reshape(-1).nonzero().squeeze(1)[:take]] = True
            ties -= take
        out[n] = mask
    return out


def _key(t: torch.Tensor, signed: bool) -> torch.Tensor:
    """Integer keys ordered as the float32 values are: the IEEE bits as int32 for values >= 0 (a view, no
    copy); with negative values, int64 keys with the negative half reflected (-0.0 just below +0.0)."""
    bits = t.detach().float().contiguous().view(torch.int32)
    if not signed:
        return bits
    bits = bits.long()
    return torch.where(bits < 0, -(2**31) - 1 - bits, bits)


def top_fraction(scores: Mapping[str, torch.Tensor], p: float, per_layer: bool = False,
                 group: dist.ProcessGroup | None = None) -> Masks:
    """The top `p` fraction of elements, ranked globally or within each transformer block.

    Global ranking lets important layers take more of the budget (the authors' choice); per-layer
    ranking guarantees every block some capacity. `group`: row shards, as in `top_k`.
    """
    return top_fraction_in_parts([scores], {n: s.numel() for n, s in scores.items()}, p, per_layer, group)


def top_fraction_in_parts(parts: Iterable[Mapping[str, torch.Tensor]], sizes: Mapping[str, int], p: float,
                          per_layer: bool = False, group: dist.ProcessGroup | None = None) -> Masks:
    """`top_fraction` of scores that come a part at a time (`fisher.fisher_in_passes`), never all at once.

    `sizes` names every scored tensor, in the order ties are broken by, with its (local) element count;
    `parts` are disjoint dicts of those scores, each holding whole blocks. Per block, each block's cut is
    made in its part. Globally, the top k of everything is the top k of (the top k so far, plus the next
    part), so the only scores kept between parts are those k candidates, in their tensors' order: the
    choice, ties included, is the one `top_fraction` makes on all the scores together. Memory: the part,
    k float32 candidates and the masks (a bool per element), where all the scores take 4 bytes per element.
    """
    check_probability("p", p)
    out: Masks = {}
    if per_layer:
        seen: set[int | None] = set()
        for part in parts:
            blocks = _blocks(part)
            if seen & blocks.keys():
                raise ValueError("a block's scores are split over several parts: per-layer cuts need whole blocks")
            seen |= blocks.keys()
            out.update({n: m for block in blocks.values() for n, m in top_k(
                block, round(p * shards.total([sum(s.numel() for s in block.values())], group)[0]), group).items()})
            del part, blocks  # before the next part is made: only the masks stay
        return {n: out[n] for n in sizes}
    k = round(p * shards.total([sum(sizes.values())], group)[0])
    kept: dict[str, torch.Tensor] = {}  # the candidates' scores, in the order of their masks' elements
    for part in parts:
        pool = {n: kept[n] if n in kept else part[n] for n in sizes if n in kept or n in part}
        last = len(pool) == len(sizes)  # the part that completes `sizes`: no candidates to keep after it
        available = shards.total([sum(s.numel() for s in pool.values())], group)[0]
        for n, chosen in top_k(pool, min(k, available), group).items():
            if n in part:
                out[n] = chosen
            else:
                flat = out[n].view(-1)
                flat[flat.nonzero().squeeze(1)[~chosen]] = False
            if not last:
                kept[n] = pool[n][chosen]
        del part, pool  # before the next part is made (a pass, in `fisher_in_passes`): only the candidates stay
    return {n: out[n] for n in sizes}


def _blocks(scores: Mapping[str, torch.Tensor]) -> dict[int | None, dict[str, torch.Tensor]]:
    """Scores by transformer block (`layer_index`); every rank holds a shard of every tensor, so they agree."""
    blocks: dict[int | None, dict[str, torch.Tensor]] = {}
    for name, s in scores.items():
        blocks.setdefault(layer_index(name), {})[name] = s
    return blocks
