"""Stacking two sparse deltas into one, and what a delta's parts cost on disk."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from childtune.delta.entry import SparseEntry, extract, flat_view, numel, step
from childtune.delta.errors import DeltaError
from childtune.delta.format import fingerprint, state_of
from childtune.delta.indexcodec import index_sizes
from childtune.delta.sparse import SparseDelta, describe


def merge(
    first: SparseDelta, second: SparseDelta, base: torch.nn.Module | Mapping[str, torch.Tensor] | None = None
) -> SparseDelta:
    """One delta equal to applying `first` then `second` (stacked) on their common base.

    Sparse deltas add; for the dense head the later one wins (a model has one head of each name).
    Where the two children are disjoint the union is exact on its own. Where they overlap, the exact
    float result depends on the base value itself, so `base` (the model or state dict both were made
    from) is required and the merged delta is re-extracted from it, exceptions included.
    """
    a, b = first.config, second.config
    files_differ = bool(a.base_files and b.base_files) and a.base_files != b.base_files  # {}: not recorded
    if a.base_fingerprint != b.base_fingerprint or a.dense_patterns != b.dense_patterns or files_differ:
        raise DeltaError(f"cannot merge deltas on different bases: {a.base_model or 'unnamed'!r} "
                         f"({a.base_fingerprint[:12]}) and {b.base_model or 'unnamed'!r} ({b.base_fingerprint[:12]})")
    base_state = None
    if base is not None:
        base_state = state_of(base)
        if fingerprint(base_state, a.dense_patterns) != a.base_fingerprint:
            raise DeltaError(f"the base given to merge is not {a.base_model or 'the deltas base'!r}")
    entries: dict[str, SparseEntry] = {}
    for name in {**first.entries, **second.entries}:
        x, y = first.entries.get(name), second.entries.get(name)
        if x is None or y is None:  # in one delta only (`name` is in at least one of them)
            entries[name] = first.entries[name] if y is None else y
        elif not np.intersect1d(x.indices.numpy(), y.indices.numpy()).size:
            entries[name] = _union(x, y)
        elif base_state is None:
            raise DeltaError(f"{name}: the deltas change some of the same elements; pass base= to merge exactly")
        else:
            weights = base_state[name].detach().cpu().clone()
            flat = flat_view(weights)
            for entry in (x, y):
                flat[entry.indices] = step(entry, flat, True)
            merged = extract(name, base_state[name], weights)
            if merged is not None:
                entries[name] = merged
    dense = {**first.dense, **second.dense}
    hparams = {f"{tag}.{k}": v for tag, c in (("first", a), ("second", b)) for k, v in c.hparams.items()}
    config = describe(
        entries, dense, method=f"merge({a.method},{b.method})", base_model=a.base_model,
        hparams={"first.method": a.method, "second.method": b.method, **hparams},
        base_fingerprint=a.base_fingerprint, base_files=a.base_files or b.base_files, dense_patterns=a.dense_patterns,
        num_elements=a.num_elements,
    )
    return SparseDelta(config, entries, dense)


def _union(x: SparseEntry, y: SparseEntry) -> SparseEntry:
    """Two disjoint entries of one tensor as one, sorted by index, exceptions carried along."""
    if x.values.dtype != y.values.dtype or x.exc_base.dtype != y.exc_base.dtype:
        raise DeltaError("cannot merge deltas whose values have different dtypes")
    indices = torch.cat([x.indices, y.indices])
    order = torch.argsort(indices)
    flag = torch.zeros(indices.numel(), dtype=torch.bool)
    flag[torch.cat([x.exc_pos, y.exc_pos + x.indices.numel()])] = True
    pos = flag[order].nonzero().squeeze(1)
    base = torch.cat([x.exc_base, y.exc_base])
    tuned = torch.cat([x.exc_tuned, y.exc_tuned])
    exc_index = torch.cat([x.indices[x.exc_pos], y.indices[y.exc_pos]])
    exc_order = torch.argsort(exc_index)
    return SparseEntry(x.shape, indices[order], torch.cat([x.values, y.values])[order], pos,
                       base[exc_order], tuned[exc_order])


def encoded_bytes(delta: SparseDelta) -> dict[str, int]:
    """Payload bytes by part (indices, values, exceptions, dense head) as `save` would write them.

    The safetensors header (a few dozen bytes per stored array) comes on top; the file size on disk is the
    number to compare with a full `model.safetensors`.
    """
    report = {"indices": 0, "values": 0, "exceptions": 0, "dense": 0}
    for name, entry in delta.entries.items():
        layout = delta.config.tensors[name]
        k, m = entry.indices.numel(), entry.exc_pos.numel()
        report["indices"] += index_sizes(numel(entry.shape), k)[layout.encoding]
        report["values"] += (k - m) * entry.values.element_size()
        if m:
            if layout.exceptions is None:
                raise DeltaError(f"{name}: {m} exceptions, but its layout stores none")
            report["exceptions"] += index_sizes(k, m)[layout.exceptions] + 2 * m * entry.exc_base.element_size()
    report["dense"] = sum(v.numel() * v.element_size() for v in delta.dense.values())
    report["total"] = sum(report.values())
    return report
