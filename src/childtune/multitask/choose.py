"""Child networks for several tasks at once, from each task's Fisher information.

Each task's scores are first divided by their own sum, so a task whose gradients are larger (more
classes, a harder loss) does not choose for the others; every rule below then cuts an exact top
fraction (`masks.top_fraction`: ties broken by position), so the shared child network has exactly
`p` of the scored elements whatever the rule:

- `fisher-sum`: the top p of the summed normalised scores (what matters to the tasks together);
- `fisher-intersection`: the top p of their minimum (an element ranks high only if it matters to every
  task: the overlap the Child-Tuning paper measured between tasks' child networks);
- `union`: the top p of their maximum (an element ranks high if it matters to any one task).

A task's own child network (`task_networks`) is the top `p` of its normalised scores among the elements
the shared one left out: the shared elements score 0 for it, and are removed should the cut reach them
(fewer than p of the others scoring above 0), so the task then takes fewer than p.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from childtune.masks import Indices, to_index, top_fraction

RULES = ("fisher-sum", "fisher-intersection", "union")


def normalised(scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`scores` divided by their total over every tensor (unchanged where they are all 0)."""
    total = sum(float(s.double().sum()) for s in scores.values())
    return {n: s / total if total > 0 else s for n, s in scores.items()}


def shared_network(scores: Sequence[Mapping[str, torch.Tensor]], p: float, rule: str) -> Indices:
    """The child network shared by the tasks whose Fisher scores are `scores` (one dict per task, the same
    names and shapes): exactly `p` of the scored elements, by `rule` (module docstring)."""
    if rule not in RULES:
        raise ValueError(f"the shared child network's rule must be one of {', '.join(RULES)}, got {rule!r}")
    if len(scores) < 2:
        raise ValueError(f"a shared child network needs the scores of two tasks or more, got {len(scores)}")
    names = list(scores[0])
    if any(list(s) != names for s in scores):
        raise ValueError("every task must score the same parameters")
    each = [normalised(s) for s in scores]
    combined = {}
    for name in names:
        stacked = torch.stack([s[name] for s in each])
        combined[name] = (stacked.sum(0) if rule == "fisher-sum" else stacked.amin(0) if rule == "fisher-intersection"
                          else stacked.amax(0))
    return {n: to_index(m) for n, m in top_fraction(combined, p).items()}


def task_networks(scores: Sequence[Mapping[str, torch.Tensor]], shared: Indices, p: float) -> list[Indices]:
    """Each task's own child network: the top `p` (of all scored elements) of its normalised scores among
    those `shared` does not hold; nothing where `p` is 0."""
    out = []
    for task in scores:
        if p <= 0:
            out.append({n: to_index(torch.zeros_like(s, dtype=torch.bool)) for n, s in task.items()})
            continue
        free = {}
        for name, s in normalised(task).items():
            s = s.clone().reshape(-1)
            s[shared[name].long()] = 0.0  # the shared elements rank last
            free[name] = s.view_as(task[name])
        chosen = top_fraction(free, p)
        out.append({n: _without(to_index(m), shared[n]) for n, m in chosen.items()})
    return out


def _without(index: torch.Tensor, taken: torch.Tensor) -> torch.Tensor:
    """`index` less the elements of `taken` (both sorted flat indices)."""
    return index[~torch.isin(index, taken)] if len(taken) and len(index) else index
