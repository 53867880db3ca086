"""Child-Tuning_D (Xu et al., 2021): the child network is the top-p parameters by Fisher information.

Chosen once, before training, from the task's own data: the parameters whose small changes most move
log p(y|x) are the ones worth updating. Scoring defaults to the transformer blocks only, as the authors
did on BERT; `per_layer` ranks within each block instead of globally.

`passes` bounds the Fisher pass's memory where the float32 scores of every weight are what exceeds
training's: the blocks are scored a group at a time, one pass over the batches each, keeping only each
group's candidates for the top p (`fisher.fisher_in_passes`, `masks.top_fraction_in_parts`). The choice
is the same for every number of passes; only memory (down) and time (up) change.

`parts` (name prefixes, e.g. a vision-language model's `vision.` and `language.`) makes the cut within each
part: the top p of each part's own scored weights, a per-part budget, where the default is one top p over
everything scored (a joint budget).

`random_within=True` is the paper's "task-driven or not" control: Fisher still decides how many
elements each tensor gets, but which ones is drawn uniformly at random from `seed`, so the control has
exactly Child-Tuning_D's per-tensor sizes (and its learning rate and strictness) and differs only in
the choice of elements.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from childtune import shards
from childtune.fisher import fisher_in_passes
from childtune.masks import check_probability, top_fraction_in_parts
from childtune.strategies.chosen import ChosenStrategy


@dataclass
class ChildTuningD(ChosenStrategy):
    p: float
    scope: str = field(default="layers", kw_only=True)
    per_layer: bool = False
    per_example: bool = False
    num_samples: int | None = None
    random_within: bool = field(default=False, kw_only=True)
    seed: int = field(default=0, kw_only=True)
    train_mode: bool = field(default=False, kw_only=True)
    clip: float | None = field(default=None, kw_only=True)
    passes: int = field(default=1, kw_only=True)
    parts: tuple[str, ...] = field(default=(), kw_only=True)

    needs_data: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.p = check_probability("reserve_p", self.p)

    @classmethod
    def authors(cls, p: float, **kw: Any) -> ChildTuningD:
        """Child-Tuning_D as the authors' code chooses it (AliceMind `ChildTuning/ChildTuningD.py`):
        Fisher in train mode with each tensor's gradient clipped to 1.0 before squaring, per-batch
        squares, blocks scored, embeddings/pooler/head trained in full (`rest="train"`). The run-level
        parts (non-strict, lr 4e-5, their AdamW) are the `authors` preset of the CLI's method table."""
        return cls(p, **{"rest": "train", "train_mode": True, "clip": 1.0, **kw})

    def prepare(self, model: torch.nn.Module | None = None, batches: Iterable[Mapping[str, Any]] | None = None, *,
                progress: bool = True) -> None:
        if model is None or batches is None:
            raise ValueError("Child-Tuning_D needs the model and training batches to estimate Fisher scores")
        _check_bound(self.params, model)
        scored = self.scored()
        parts = fisher_in_passes(
            model, batches, self.passes, scored=list(scored), num_samples=self.num_samples,
            per_example=self.per_example, train_mode=self.train_mode, clip=self.clip, progress=progress,
        )
        # in model order, as the passes give the scores: ties are then broken alike however the optimizer
        # grouped the parameters
        sizes = {n: shards.local(scored[n]).numel() for n, _ in model.named_parameters() if n in scored}
        if self.parts:
            chosen = self._per_part(list(parts), sizes)
        else:
            chosen = top_fraction_in_parts(parts, sizes, self.p, self.per_layer, self.group)
        if self.random_within:
            chosen = _same_sizes_at_random(chosen, self.seed, self.params, self.group)
        self.chosen = self.complete(chosen)


    def _per_part(self, scores: list[dict[str, torch.Tensor]], sizes: dict[str, int]) -> dict[str, torch.Tensor]:
        """The top p of each part's scored weights (`parts`), each cut as `top_fraction_in_parts` makes one."""
        chosen: dict[str, torch.Tensor] = {}
        for prefix in self.parts:
            mine = {n: k for n, k in sizes.items() if n.startswith(prefix)}
            if not mine:
                raise ValueError(f"no scored parameter lies in part {prefix!r}")
            pieces = [{n: t for n, t in part.items() if n in mine} for part in scores]
            chosen |= top_fraction_in_parts([p for p in pieces if p], mine, self.p, self.per_layer, self.group)
        outside = sorted(set(sizes) - chosen.keys())
        if outside:
            raise ValueError(f"{outside[0]!r} lies in none of the parts {list(self.parts)}")
        return {n: chosen[n] for n in sizes}


def _check_bound(params: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Refuse to score a model other than the one whose parameters the strategy was bound to (by the
    optimizer): masks chosen on it would not fit, or would fit the wrong weights' shapes by chance."""
    if not params:
        raise ValueError("Child-Tuning_D is bound to no parameters: build the optimizer with it before prepare()")
    given = dict(model.named_parameters())
    for name, param in params.items():
        other = given.get(name)
        if other is None or other.shape != param.shape:
            found = "has no such parameter" if other is None else f"has shape {tuple(other.shape)}"
            raise ValueError(f"prepare() got another model than the optimizer's: {name!r} is {tuple(param.shape)} "
                             f"in the optimizer, but the given model {found}")


def _same_sizes_at_random(chosen: dict[str, torch.Tensor], seed: int, params: dict[str, torch.Tensor],
                          group: dist.ProcessGroup | None) -> dict[str, torch.Tensor]:
    """Each tensor's mask replaced by one with as many elements, drawn uniformly from `seed` (in name order).
    Row shards (`group`): every rank draws the whole tensor's mask from the whole tensor's count, and keeps
    its rows, so the draw is the single-process one."""
    generator = torch.Generator().manual_seed(seed)
    names = sorted(chosen)
    sizes = shards.total([int(chosen[n].sum()) for n in names], group)
    out = {}
    for name, size in zip(names, sizes, strict=True):
        param = params[name]
        flat = torch.zeros(param.numel(), dtype=torch.bool)
        flat[torch.randperm(param.numel(), generator=generator)[:size]] = True
        out[name] = flat.view(param.shape)[shards.rows(param)].to(chosen[name].device)
    return out
