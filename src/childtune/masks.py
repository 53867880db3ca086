"""Child networks as data: a dict from parameter name to a boolean tensor of the parameter's shape.

Every strategy produces, and the optimizers, delta files and analysis consume, this one form. The
helpers here are the few operations they share: validating a mask against its parameter, and picking
the top-k elements of a score spread over many tensors (Fisher, ID3's importance, random scores).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from childtune.fileio import atomic_write
from childtune.layers import layer_index

Masks = dict[str, torch.Tensor]

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


def top_k(scores: Mapping[str, torch.Tensor], k: int) -> Masks:
    """Exactly the `k` highest-scoring elements across all tensors, as masks.

    A percentile threshold (the authors' `score >= np.percentile(...)`) keeps every tie and so can
    overshoot the requested size; selecting indices keeps the count exact.
    """
    names = list(scores)
    flat = torch.cat([scores[n].detach().reshape(-1).float() for n in names]) if names else torch.empty(0)
    if not 0 <= k <= flat.numel():
        raise ValueError(f"cannot choose {k} elements out of {flat.numel()}")
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    if k:
        chosen[torch.topk(flat, k, sorted=False).indices] = True
    out: Masks = {}
    offset = 0
    for n in names:
        numel = scores[n].numel()
        out[n] = chosen[offset : offset + numel].view(scores[n].shape).to(scores[n].device)
        offset += numel
    return out


def top_fraction(scores: Mapping[str, torch.Tensor], p: float, per_layer: bool = False) -> Masks:
    """The top `p` fraction of elements, ranked globally or within each transformer block.

    Global ranking lets important layers take more of the budget (the authors' choice); per-layer
    ranking guarantees every block some capacity.
    """
    check_probability("p", p)
    if not per_layer:
        total = sum(s.numel() for s in scores.values())
        return top_k(scores, round(p * total))
    groups: dict[int | None, dict[str, torch.Tensor]] = {}
    for name, s in scores.items():
        groups.setdefault(layer_index(name), {})[name] = s
    out: Masks = {}
    for group in groups.values():
        out.update(top_k(group, round(p * sum(s.numel() for s in group.values()))))
    return out
