"""Merging sparse deltas trained independently on one base: task arithmetic (`sum`), TIES and DARE.

Each run fine-tuned the same base on its own task, so its delta is a task vector (tuned - base) that is
zero outside its child network. A multi-task user's first try is to merge them into one change of the
base and keep a head per task. The rules are peft's (`peft.utils.merge_utils`, read at commit 0d4d848):

* `sum` (task arithmetic): the weighted sum of the task vectors.
* `ties` (Yadav et al. 2023): trim each vector to its `density` largest magnitudes, elect each element's
  sign from the sum of the trimmed vectors, and average the values that agree with it (a disjoint merge:
  weighted, divided by how many agree).
* `dare` (Yu et al. 2024, peft's `dare_linear`): drop each value with probability 1 - density, rescale
  the kept ones by 1 / density, then the weighted sum.

peft's own `prune`, `calculate_majority_sign_mask` and `disjoint_merge` do the arithmetic here. What is
ours: the vectors are the deltas' changed elements on the union of their indices, one tensor at a time,
never a dense copy of the model. So `density` is a share of each delta's *changed* elements. peft's
dense vectors count the zeros too, so a 1% delta trimmed at 0.5 there would keep everything. DARE's
draws come from `seed`. Merged values are the new delta's values; they have no training result to be
bit-exact to, so they carry no exceptions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from childtune.delta.entry import SparseEntry
from childtune.delta.errors import DeltaError
from childtune.delta.sparse import SparseDelta

HOWS = ("sum", "ties", "dare")


def merge_tasks(deltas: Sequence[SparseDelta], how: str, *, density: float = 1.0,
                weights: Sequence[float] | None = None, seed: int = 0) -> dict[str, SparseEntry]:
    """The merged sparse entries of `deltas` (one base, each its own task) by rule `how`; the heads are
    not merged (each task keeps its own: `SparseDelta.dense`)."""
    if how not in HOWS:
        raise DeltaError(f"merge rule must be one of {', '.join(HOWS)}, got {how!r}")
    if len(deltas) < 2:
        raise DeltaError(f"merging needs at least two deltas, got {len(deltas)}")
    if not 0 < density <= 1:
        raise DeltaError(f"density must be in (0, 1], got {density}")
    w = torch.ones(len(deltas)) if weights is None else torch.tensor(list(weights), dtype=torch.float32)
    if w.shape != (len(deltas),):
        raise DeltaError(f"{len(w)} weights for {len(deltas)} deltas")
    first = deltas[0].config
    for other in deltas[1:]:
        c = other.config
        if (c.base_fingerprint, c.dense_patterns) != (first.base_fingerprint, first.dense_patterns) or (
                c.base_files and first.base_files and c.base_files != first.base_files):
            raise DeltaError(f"cannot merge deltas of different bases: {first.base_model or 'unnamed'!r} "
                             f"({first.base_fingerprint[:12]}) and {c.base_model or 'unnamed'!r} "
                             f"({c.base_fingerprint[:12]})")
    merged: dict[str, SparseEntry] = {}
    with torch.random.fork_rng(devices=[]):  # DARE draws through torch's global generator (peft's `prune`)
        torch.manual_seed(seed)
        for name in sorted({n for d in deltas for n in d.entries}):
            entry = _merge_tensor(name, [d.entries.get(name) for d in deltas], how, density, w)
            if entry is not None:
                merged[name] = entry
    return merged


def _merge_tensor(name: str, entries: list[SparseEntry | None], how: str, density: float,
                  weights: torch.Tensor) -> SparseEntry | None:
    from peft.utils.merge_utils import calculate_majority_sign_mask, disjoint_merge, prune  # peft loads transformers

    present = [e for e in entries if e is not None]
    shapes, dtypes = {e.shape for e in present}, {e.values.dtype for e in present}
    if len(shapes) > 1 or len(dtypes) > 1:
        raise DeltaError(f"{name}: the deltas disagree on its shape or dtype ({shapes}, {dtypes})")
    index = torch.unique(torch.cat([e.indices for e in present]))  # sorted
    vectors = torch.zeros(len(entries), len(index))
    for row, entry in enumerate(entries):
        if entry is None:
            continue
        values = entry.values.float()
        if how == "ties" and density < 1:  # (peft warns at 1 and keeps all)
            values = prune(values, density, method="magnitude")
        elif how == "dare" and density < 1:
            values = prune(values, density, method="random", rescale=True)
        vectors[row, torch.searchsorted(index, entry.indices)] = values
    weighted = vectors * weights.view(-1, 1)
    if how == "ties":
        combined = disjoint_merge(weighted, calculate_majority_sign_mask(vectors, method="total"))
    else:
        combined = weighted.sum(dim=0)
    keep = combined != 0
    if not keep.any():
        return None
    dtype = present[0].values.dtype
    return SparseEntry(present[0].shape, index[keep], combined[keep].to(dtype), torch.zeros(0, dtype=torch.int64),
                       torch.zeros(0, dtype=dtype), torch.zeros(0, dtype=dtype))
