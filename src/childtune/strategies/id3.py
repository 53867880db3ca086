"""ID3, incremental dynamic unmasking (Agarwal et al., 2024, arXiv 2408.14470).

The child network grows during training: at every step the not-yet-chosen elements are ranked by
H = |g| / (|w| + eps)^exp, computed from the gradient just produced, and the best few join. Chosen
elements stay chosen (exploitation) while each step's fresh gradient decides which join (exploration).
After `total_steps` steps exactly `budget` elements have been chosen.

The authors' code (Aradhye2002/selective-peft-toolkit, `selective_optimizers/optimizers/id3.py`, read at
commit f87e338) unmasks budget // T elements per step, one more during the first budget % T steps
(`schedule="authors"`): also exactly `budget` at step T, but with no cap, so a run longer than T steps
keeps adding budget // T per step and overshoots; its cut `metric >= topk(...).values[-1]` also keeps
ties. Our default `schedule="ramp"` reaches the budget on a linear ramp and never exceeds it, and ties
never add elements. The authors score every parameter the optimizer holds, the task head included
(`head="inside"`: it competes for the budget like any weight); ours trains the head in full outside the
budget (`head="outside"`). Parameters that do not require gradients are never scored, nor counted in
a fractional budget. Their README example uses exp=0 (the score is plain |g|), eps=1e-3, lr 1e-4.

`every` = K > 1 (ours; K = 1, the default, is the rule above) grows only at steps that are multiples of
K: at step mK the not-yet-chosen are ranked by H from that step's gradient alone and the elements the
schedule adds over the window of steps mK .. mK+K-1 (capped at step T-1, so the budget is still reached
exactly at step T-1) join at once; the other K-1 steps admit nothing and read no unchosen gradient, so
their backward can compute the weight gradient at the chosen elements only (`SparseChildAdamW.
child_only_grads`). Against the authors' rule: the same score, budget, final size and schedule at the
end of every window (after steps K-1, 2K-1, ... and T-1 the count is the per-step rule's), but the
elements of K steps are one top-k of one step's gradient, every K steps, where the authors take K
successive top-(budget/T) cuts, each from its own step's gradient on the weights that step has; and an
element joins up to K-1 steps before its place on the schedule, so it trains that much longer. This is
SpIEL's way of avoiding dense gradients (Ansell et al. 2024, github.com/AlanAnsell/peft,
src/peft/tuners/sft/trainer.py, read at commit 076d920: `SftSelector` hooks dense gradients only during a
selection window of `selection_accumulation_steps` steps once every `reselection_steps` steps and regrows
from the |g| statistics accumulated there), with ID3's score and growth-only schedule instead of SpIEL's
drop-and-regrow, and one step's gradient instead of statistics over several; nothing of it is copied.

Applied to a peft model's LoRA/adapter parameters instead of the base weights, the same rule gives the
paper's dynamic sparsification of adapters: bind the optimizer to those parameters only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from childtune import kernels, shards
from childtune.masks import Indices, empty_index, to_mask, union
from childtune.overlay import values_of
from childtune.strategies.base import NetworkKind
from childtune.strategies.chosen import ChosenStrategy

_BLOCK = 1 << 22  # elements scored at once: a 75M-weight embedding would otherwise need ~1 GiB of temporaries


@dataclass
class ID3(ChosenStrategy):
    """`budget` is a count of elements (an int) or a fraction of the scored elements (a float < 1)."""

    budget: int | float
    total_steps: int
    eps: float = 1e-3
    exp: float = 1.0
    rest: str = field(default="freeze", kw_only=True)
    head: str = field(default="outside", kw_only=True)
    schedule: str = field(default="ramp", kw_only=True)
    every: int = field(default=1, kw_only=True)

    kind: ClassVar[NetworkKind] = "growing"
    needs_gradients: ClassVar[bool] = True

    @classmethod
    def authors(cls, budget: int | float, total_steps: int, **kw: Any) -> ID3:
        """ID3 as the authors' toolkit chooses (their README example): |g| alone (exp=0, eps=1e-3), the
        head inside the budget, budget // T per step. The run-level parts (torch AdamW over every weight
        with its default weight decay 0.01, non-strict, lr 1e-4) are the CLI's `authors` preset."""
        return cls(budget, total_steps, **{"eps": 1e-3, "exp": 0.0, "head": "inside", "schedule": "authors", **kw})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.head not in ("outside", "inside"):
            raise ValueError(f"head must be 'outside' or 'inside', got {self.head!r}")
        if self.schedule not in ("ramp", "authors"):
            raise ValueError(f"schedule must be 'ramp' or 'authors', got {self.schedule!r}")
        if self.head == "inside":
            self.always = ()  # the head competes for the budget like any other weight
        if not isinstance(self.total_steps, int) or self.total_steps < 1:
            raise ValueError(f"total_steps must be a positive integer, got {self.total_steps!r}")
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"every must be a positive integer, got {self.every!r}")
        if isinstance(self.budget, bool) or not isinstance(self.budget, int | float) or self.budget <= 0:
            raise ValueError(f"budget must be a positive count or a fraction in (0, 1), got {self.budget!r}")
        if isinstance(self.budget, float) and self.budget >= 1:
            raise ValueError(f"a fractional budget must be below 1, got {self.budget!r}")
        self._counts: dict[str, int] | None = None  # this rank's chosen count per tensor, derived lazily
        self.joined: dict[str, torch.Tensor] = {}

    def bind(self, named_params: Mapping[str, torch.Tensor]) -> None:
        super().bind(named_params)
        available = self._available = sum(p.numel() for p in self.scored().values())
        self.size = round(self.budget * available) if isinstance(self.budget, float) else self.budget
        if self.size > available:
            raise ValueError(f"budget {self.size} exceeds the {available} parameters it can choose from")
        self._scored = self.scored()  # looked up per tensor per step: matching name patterns each time is O(params^2)
        self.chosen = self.complete({n: empty_index(shards.local(p)) for n, p in self._scored.items()})
        self._counts = None
        self.joined = {}

    def scored(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in super().scored().items() if p.requires_grad}

    def target(self, step: int) -> int:
        """Elements chosen once `step` (0-based) has run: a linear ramp reaching the budget exactly
        (`ramp`), or the authors' budget // T per step plus one in the first budget % T steps, uncapped
        after T (`authors`), at most every scored element. With `every` = K, the count the schedule
        reaches at the last step of `step`'s window of K steps (at most step T-1 while the run is
        within its T steps): it changes only at multiples of K (module docstring)."""
        end = step - step % self.every + self.every - 1
        if step < self.total_steps:
            end = min(end, self.total_steps - 1)
        if self.schedule == "ramp":
            return min(self.size, math.ceil(self.size * (end + 1) / self.total_steps))
        base, extra = divmod(self.size, self.total_steps)
        return min(self._available, (end + 1) * base + min(end + 1, extra))

    def dense_gradients_at(self, step: int) -> bool:
        """Whether elements join at `step` (so it ranks the unchosen, from dense gradients): the schedule's
        count rises there. Known from the schedule alone, before the step's forward pass."""
        return self.target(step) > (self.target(step - 1) if step else 0)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self._counts = None

    def network(self, step: int) -> Indices:
        """Grow the child network to `target(step)` elements by the importance of the not-yet-chosen.

        Only `grow` elements join, so the global top-`grow` is found without ranking every weight: each
        tensor offers its own top min(grow, its unchosen) candidates (`candidates`), and the best `grow`
        of those are exactly the global top-`grow` (an element of the global top-k is in its tensor's
        top-k; `admit`). This replaces one top-k over all scored weights (a copy of them all) by per-tensor
        ones, and lets the optimizer step in backward rank each tensor as its gradient arrives.
        `joined` holds, per tensor, the flat indices that joined at this step (a sparse optimizer appends
        them to its state instead of re-deriving them from the whole index). `masks(step)` (a dense
        optimizer's view) grows the same way.
        """
        grow = self.growth(step)
        self.joined = {}
        if grow > 0:
            offers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
            for name, param in self._scored.items():
                offer = self.candidates(name, param.grad, grow)
                if offer is not None:
                    offers[name] = offer
            self.joined = self.admit(offers, grow)
        return self.require_chosen()

    def growth(self, step: int) -> int:
        """How many elements join at `step`: the target minus what is chosen already."""
        return self.target(step) - shards.total([sum(self.counts().values())], self.group)[0]

    def counts(self) -> dict[str, int]:
        """This rank's number of chosen elements per scored tensor (its rows, when sharded), kept up to date
        by `admit` once derived from the index."""
        if self._counts is None:
            chosen = self.require_chosen()
            self._counts = {n: len(chosen[n]) for n in self.scored()}
        return self._counts

    def candidates(self, name: str, grad: torch.Tensor | None, grow: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This tensor's best min(grow, unchosen) not-yet-chosen elements by H: (scores on the CPU, flat
        indices), or None when it has nothing to offer or is not scored."""
        param = self._scored.get(name)
        if param is None or grow <= 0 or not param.requires_grad:
            return None
        weights = values_of(shards.local(param)).detach().reshape(-1)
        k = min(grow, len(weights) - self.counts()[name])
        if k <= 0:
            return None
        chosen = self.require_chosen()[name]
        grads = None if grad is None else shards.local(grad).detach().reshape(-1)
        if grads is not None and kernels.ranks_unchosen(grads, weights, self.exp):
            # one compiled pass (childtune.kernels), which reads a bool `chosen`: this tensor's dense view, made for it
            fused = kernels.top_unchosen(grads, weights, to_mask(chosen, weights), k, self.eps, self.exp)
            if fused is not None:
                return fused
        starts = torch.arange(0, len(weights) + _BLOCK, _BLOCK, device=chosen.device)  # int64: past 2^31 - 1
        bounds = torch.searchsorted(chosen, starts).tolist()  # each block's run of the sorted chosen indices
        values: list[torch.Tensor] = []
        indices: list[torch.Tensor] = []
        for block, start in enumerate(range(0, len(weights), _BLOCK)):  # scores and top-k buffers a block at a time
            stop = min(len(weights), start + _BLOCK)
            score = torch.zeros(stop - start, dtype=torch.float32, device=param.device) if grads is None else (
                grads[start:stop].abs().float() / (weights[start:stop].abs().float() + self.eps) ** self.exp)
            score[chosen[bounds[block]:bounds[block + 1]].long() - start] = -math.inf  # the block's chosen elements
            top = torch.topk(score, min(k, stop - start), sorted=False)
            values.append(top.values)
            indices.append(top.indices + start)
        if len(values) > 1:  # the tensor's top k lies among its blocks' top k's
            flat, where = torch.cat(values), torch.cat(indices)
            best = torch.topk(flat, k, sorted=False).indices
            values, indices = [flat[best]], [where[best]]
        return values[0].cpu(), indices[0]

    def admit(self, offers: Mapping[str, tuple[torch.Tensor, torch.Tensor]], grow: int) -> dict[str, torch.Tensor]:
        """The best `grow` of all tensors' `candidates` join the child network; returns each tensor's
        joining flat indices. Row shards: every rank's candidates are gathered (at most `grow` per tensor
        per rank), all ranks cut the same global best `grow`, and each admits the ones from its rows."""
        names = list(offers)
        values = [offers[n][0] for n in names]
        everyone = shards.gather_values(torch.cat(values) if values else torch.zeros(0), self.group)
        start = sum(len(v) for v in everyone[: 0 if self.group is None else dist.get_rank(self.group)])
        best = torch.topk(torch.cat(everyone), grow, sorted=False).indices - start
        offsets = torch.tensor([0, *map(len, values)]).cumsum(0)
        chosen, counts = self.require_chosen(), self.counts()  # `chosen` gets grown indices: none is changed in place
        joined: dict[str, torch.Tensor] = {}
        for i, name in enumerate(names):
            mine = best[(best >= offsets[i]) & (best < offsets[i + 1])] - offsets[i]
            if len(mine):
                indices = offers[name][1][mine.to(offers[name][1].device)]
                chosen[name] = union(chosen[name], indices)
                counts[name] += len(mine)
                joined[name] = indices
        return joined
