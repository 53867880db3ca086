"""AdamW whose memory is proportional to the child network, not to the model.

A dense masked optimizer (`ChildOptimizer`, the authors' `ChildTuningAdamW`) keeps two moment tensors
for every weight although only a fraction p of them ever changes. `SparseChildAdamW` keeps, per
parameter, the flat indices of its child elements and moment vectors of that length only: each step it
gathers the child gradients, runs torch's AdamW arithmetic on those vectors (`torch._foreach_*` over all
parameters at once) and scatters the new values back, so work and state scale with p.

That needs a child network that is fixed (Child-Tuning_D, random masking), grows (ID3, gradual
unfreezing) or moves at a fixed size (drop and regrow, `kind="dynamic"`: an element that leaves loses its
moments and master, and keeps its weight's value). Elements that join later are appended with their own step
count, so their Adam bias correction starts at 1 as if they had been chosen from the first step
(`bias_correction="element"`). A dense masked AdamW (and the ID3 authors' code, which steps torch's
AdamW on masked gradients) counts the tensor's steps instead (`bias_correction="tensor"`). With a
constant gradient, a late joiner's first update under tensor counting is 0.48x that of a fresh element
when it joins at step 10, 0.98x at step 100 and 2.5x at step 1000 (Adam's first moment is corrected
too little early on, its second far too little late), so neither choice is harmless.
The state's layout and the AdamW arithmetic on it are in `optim/sparse_state.py`.
Semantics are strict: nothing outside the child network moves, weight decay included. Parameters the
strategy does not mask (the task head) keep dense state; fully frozen ones keep none.

Low-precision weights (bfloat16, float16) get fp32 master copies of their child elements only, and
fp32 moments: each update is computed in fp32 on the masters and written back rounded, so small steps
accumulate instead of vanishing below the weight's precision, at 4 bytes per child element.

`in_backward=True` runs each parameter's update inside backward (a post-accumulate-grad hook) and frees
its gradient at once, so a model's full set of gradients never coexists. It is exact for child networks
chosen without the step's gradients (fixed ones, gradual unfreezing): the same arithmetic as `step()`
on each parameter. ID3 ranks the whole step's gradients, so its hook splits the step in two: it updates
the elements already chosen and keeps only the tensor's best `grow` candidates (scores, flat indices and
their gradient values: at most `grow` of each, and once all tensors' offers pass 2 x `grow`, only those
not below the best `grow` of them all); after backward `step()` admits the global best `grow` of
all candidates (the same set as the global top-k, see `ID3.masks`) and gives those joiners their first
update from the kept gradient values, which is the update `step()` would have given them. Global-norm
clipping needs every gradient before any update, so it is not possible there (the training loop turns
it off and says so). Gradient accumulation: while `accumulating` is set (every micro-batch but the
update's last), a hook adds its parameter's child-element gradient to a buffer of the child's size
and frees the full gradient; the last micro-batch's hook adds its own and updates, the same sums
autograd would have formed. ID3 cannot accumulate in backward (it ranks the whole update's gradient).

`child_only_grads(model)` (opt-in; fixed child networks, and ID3) makes backward compute the gradient of
a model's partially chosen Linear weights at their child elements only (`optim/child_grad.py`: no dense dW
ever exists) and steps those weights from the delivered vectors, in `step()` or, with `in_backward`,
in the same post-accumulate-grad hook (autograd runs it once the weight's uses are all done, with
`.grad` None). The update is the same arithmetic on the same child gradient values, summed in another
order (float32 rounding). ID3 grows only at the steps `ID3.dense_gradients_at` names (every step unless its `every`
is K > 1): those steps run with dense gradients (`ChildGrads.set_dense`), which it ranks; after the step
the grown index goes to `ChildGrads.set_index`, and since the state appends joiners in the order they
joined while the delivered vector follows the sorted index, each weight keeps the positions of its
state's elements in that index (`_order`) to read the vector in the state's order. A dynamic network
is the same with its reselections for growth steps: its `window` steps before each run dense, and its
new index goes to `ChildGrads` once the step before it is done.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, overload

import torch
from torch import nn
from torch.optim import Optimizer

from childtune.optim.child_grad import ChildGrads
from childtune.optim.common import (
    by_name,
    check_adamw,
    child_block,
    evaluate_closure,
    named_groups,
    pop_child_block,
    step_in_backward,
    unnamed,
)
from childtune.optim.sparse_state import LOW_PRECISION, adamw, add_cohort, append, child_grad, drop, size_of
from childtune.overlay import is_overlay
from childtune.shards import local, only_reading
from childtune.strategies.base import Strategy
from childtune.strategies.id3 import ID3

_LAYOUT = ("index", "master", "exp_avg", "exp_avg_sq")
"""State that torch's loader would cast to the parameter's dtype (integers, and fp32 kept for bf16 weights)."""


class SparseChildAdamW(Optimizer):
    """torch.optim.AdamW restricted to a fixed or growing child network, with state only for it.

    `named_params` takes the forms `ChildOptimizer` does. Equal to
    `ChildOptimizer(named_params, strategy, torch.optim.AdamW, strict=True, ...)` to float tolerance
    (for growing strategies with `bias_correction="tensor"`). State per parameter: `exp_avg` and
    `exp_avg_sq` over the child elements, their flat `index` (int32 where it fits), the tensor's `step`
    count and, as plain ints, runs of elements by the tensor step they joined at (`cohort_sizes`,
    `cohort_joined`): one run unless the set grew, so per-element step counts cost almost nothing.
    """

    def __init__(
        self,
        named_params: Iterable[Any],
        strategy: Strategy,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        bias_correction: str = "element",
        in_backward: bool = False,
    ) -> None:
        if in_backward and strategy.needs_gradients and not isinstance(strategy, ID3):
            raise ValueError(f"{type(strategy).__name__} chooses its child network from the whole step's gradients, "
                             "so its update cannot run inside backward one parameter at a time")
        if strategy.kind == "per_step":
            raise ValueError(
                f"SparseChildAdamW needs a child network that is fixed or only grows, but {type(strategy).__name__} "
                "chooses a new one every step, so there is no set of elements to keep moments for; "
                "use ChildOptimizer or ChildTuningAdamW with it"
            )
        if bias_correction not in ("element", "tensor"):
            raise ValueError(f"bias_correction must be 'element' or 'tensor', got {bias_correction!r}")
        check_adamw(lr, betas, eps, weight_decay)
        groups = named_groups(named_params)
        self.named = by_name(groups)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(unnamed(groups), defaults)
        self.names = {p: n for n, p in self.named.items()}
        self.strategy = strategy
        self.bias_correction = bias_correction
        self.in_backward = in_backward
        self._offers: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # ID3 in backward
        self._grow: int | None = None
        self.accumulating = False  # in backward: True while a micro-batch that is not the update's last runs
        self._buffers: dict[torch.Tensor, torch.Tensor] = {}  # child gradients accumulated so far, per parameter
        self._child: ChildGrads | None = None  # child-only weight gradients (`child_only_grads`)
        self._child_name: dict[torch.Tensor, str] = {}  # their parameters' names in the model
        # a grown or reselected state's index and the sorted one, and where the first's elements sit in the second
        self._order: dict[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        if in_backward:
            self._group_of = {p: g for g in self.param_groups for p in g["params"]}
            step_in_backward(self.names, self._update_in_backward)
        self.steps = 0
        self._seen: dict[torch.Tensor, torch.Tensor | None] = {}  # index each parameter was last synced to
        strategy.bind(self.named)

    def child_only_grads(self, model: nn.Module) -> ChildGrads:
        """Opt-in: `model`'s Linear weights whose child network is not the whole weight (where dense dW is
        the cheaper way to the same numbers) get their gradient at the child elements only
        (`optim/child_grad.py`), which this optimizer steps from. Fixed child networks, whose index never
        changes and is the state's own, so the delivered vector and the moments are in one order; or ID3,
        whose index changes only at its growth steps, which run with dense gradients (module docstring).
        Call it once the strategy has its child network (under FSDP2 on every rank: it gathers the ranks'
        child indices)."""
        if self.strategy.kind not in ("fixed", "dynamic") and not isinstance(self.strategy, ID3):
            raise ValueError(f"child-only gradients need a fixed or dynamic child network or ID3; "
                             f"{type(self.strategy).__name__}'s changes at steps it does not announce, and the "
                             "index would have to follow it")
        if self._child is not None:
            raise RuntimeError("child-only gradients are already installed")
        # ID3's `network(step)` would grow it (from no gradient yet): its index so far instead
        network = (self.strategy.require_chosen() if isinstance(self.strategy, ID3)
                   else self.strategy.network(self.steps))
        linear = {m.weight for m in model.modules() if isinstance(m, nn.Linear)} | {
            p for p in model.parameters() if is_overlay(p)}  # (a quantized Linear's weight: `overlay_linear`)
        chosen = {}
        for name, param in model.named_parameters():
            index = network.get(self.names.get(param, ""))
            if param in linear and param.requires_grad and index is not None and len(index) < param.numel():
                chosen[name] = index
        self._child = ChildGrads(model, chosen)
        self._child_name = {site.param: name for name, site in self._child.sites.items()}
        self._follow_network()
        return self._child

    def _follow_network(self) -> None:
        """With child-only gradients, after a step (or at install), for a child network that changes (ID3's
        growth, a dynamic one's reselection, made here when the next step starts with one): give each
        weight's new index to `ChildGrads`, and make the next step dense iff the strategy reads its
        gradients outside the child network (`Strategy.dense_gradients_at`)."""
        if self._child is None or self.strategy.kind == "fixed":
            return
        # ID3's `network(step)` would grow it (from no gradient yet): its index so far instead
        chosen = (self.strategy.require_chosen() if isinstance(self.strategy, ID3)
                  else self.strategy.network(self.steps))
        for param, name in self._child_name.items():
            index = chosen[self.names[param]]
            if index is not self._child.sites[name].index:
                self._child.set_index(name, index)
        self._child.set_dense(self.strategy.dense_gradients_at(self.steps))

    def child_gradients(self) -> list[torch.Tensor]:
        """The child-only gradients backward delivered and no update has taken yet (none without
        `child_only_grads`): the rest of the update's gradient, beside `.grad`, for clipping it."""
        if self._child is None:
            return []
        return [g for g in map(self._child.grad, self._child.sites) if g is not None]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget the gradients, the child-only ones too (a skipped step must not pass them to the next)."""
        super().zero_grad(set_to_none)
        if self._child is not None:
            self._child.zero_grad()

    def _delivered(self, param: torch.Tensor) -> torch.Tensor | None:
        """Take `param`'s child-only gradient (None where it has none: `.grad` holds its gradient), in the
        order of the child network's sorted index."""
        if self._child is None:  # none installed (then `_child_name` is empty too)
            return None
        name = self._child_name.get(param)
        return None if name is None else self._child.pop(name)

    def _in_state_order(self, param: torch.Tensor, state: Mapping[str, Any],
                        delivered: torch.Tensor | None) -> torch.Tensor | None:
        """A delivered gradient in the order of `param`'s synced state. A fixed network's state holds the
        strategy's own index; a grown or reselected one holds its elements in the order they joined, which
        `_order` maps into the sorted index (kept until either index changes)."""
        held = state.get("index")
        if delivered is None or held is None:
            return delivered
        assert self._child is not None  # a delivered gradient comes from it
        index = self._child.sites[self._child_name[param]].index
        if held is index:
            return delivered
        cached = self._order.get(param)
        if cached is None or cached[0] is not held or cached[1] is not index:
            cached = (held, index, torch.searchsorted(index, held))
            self._order[param] = cached
        return delivered.index_select(0, cached[2])

    def nonfinite(self) -> list[str]:
        """Names of the parameters whose updated elements (the child's, or all of a dense state's) hold a
        non-finite value: what a diverged update can have broken, read without a pass over the weights
        that no update touches (that pass over a whole LLM was a fifth of a small step's time)."""
        broken = []
        for param, name in self.names.items():
            state = self.state.get(param)
            if not state or "exp_avg" not in state:
                continue
            p = local(param)
            values = state["master"] if "master" in state else (
                p.view(-1).index_select(0, state["index"]) if "index" in state else p)
            if not bool(torch.isfinite(values).all()):
                broken.append(name)
        return broken

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "child_tuning": child_block(self.steps, self.strategy)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch casts every non-step state tensor to the parameter's dtype; the integer layout is kept aside."""
        state_dict, self.steps = pop_child_block(state_dict, self.strategy)
        saved = state_dict["state"]
        layout = {i: {k: s[k] for k in _LAYOUT if k in s} for i, s in saved.items()}
        state_dict["state"] = {i: {k: v for k, v in s.items() if k not in _LAYOUT} for i, s in saved.items()}
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for i, keys in layout.items():
            self.state[params[i]].update({k: v.to(params[i].device) for k, v in keys.items()})
        if self.in_backward:  # torch made new group dicts: the hooks must read those the scheduler sets the lr in
            self._group_of = {p: g for g in self.param_groups for p in g["params"]}

    @torch.no_grad()
    def _update_in_backward(self, param: torch.Tensor) -> None:
        """The step for one parameter, as soon as backward has its gradient (`.grad`, the child-only one, or
        both); the gradient is then freed, so the whole model's gradients never exist at once (peak
        memory: one parameter's gradient)."""
        if only_reading():  # a sharded Fisher pass reading its gradients (childtune.shards)
            return
        delivered = self._delivered(param)
        if param.grad is None and delivered is None:
            return  # backward gave it no gradient (its every use returned None)
        name = self.names[param]
        reads_dense = self.strategy.dense_gradients_at(self.steps)
        if reads_dense:  # ID3's ranking, a dynamic network's window: the whole gradient is read, so checked
            _check_finite(name, param.grad, delivered)
            if param.grad is not None:
                self.strategy.observe(name, local(param.grad))
        if isinstance(self.strategy, ID3):  # update the chosen; keep this tensor's candidates (module docstring)
            if self.accumulating or self._buffers:
                raise RuntimeError("ID3 ranks the whole update's gradient, which is not known until the last "
                                   "micro-batch: it cannot accumulate gradients with the step in backward")
            if self._grow is None:
                self._grow = self.strategy.growth(self.steps)
            if param.grad is None and self._grow:  # child-only gradients are dense on growth steps
                raise RuntimeError(f"ID3 ranks {name!r}'s dense gradient, but backward left .grad None")
            offer = self.strategy.candidates(name, param.grad, self._grow)
            if offer is not None and param.grad is not None:  # (an offer is made from .grad alone)
                self._offers[name] = (*offer, local(param.grad).reshape(-1)[offer[1]].clone())
                self._keep_best_offers(self._grow)
            index = self.strategy.require_chosen().get(name)
        else:
            index = self.strategy.network(self.steps).get(name)
        state = self._sync(param, index)
        if "exp_avg" in state:
            grad = child_grad(param, state, self._in_state_order(param, state, delivered))
            if not reads_dense:  # what the update reads: the child elements' gradient (a dense pass over an
                _check_finite(name, grad)  # embedding's whole gradient was a fifth of a small step's time)
            if param in self._buffers:  # earlier micro-batches' child gradients, then this one's: as autograd adds
                grad = self._buffers.pop(param).add_(grad)
            if self.accumulating:
                self._buffers[param] = grad  # a gather, or the gradient itself, which autograd will not reuse
                param.grad = None
                return
            state["step"] += 1
            adamw(self._group_of[param], [(param, state)], [grad])
        elif not self.accumulating:
            state["step"] += 1
        param.grad = None

    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One update; with `in_backward` the parameters were already updated during backward, and this
        only advances the step count (so the next masks and LR schedule see the next step)."""
        loss = evaluate_closure(closure)
        if self.in_backward:
            if self._offers:  # made by ID3's hooks alone, each after setting `_grow`
                if not isinstance(self.strategy, ID3) or self._grow is None:
                    raise RuntimeError("candidate offers without ID3's growth for this step")
                admitted = self.strategy.admit({n: o[:2] for n, o in self._offers.items()}, self._grow)
                for name, indices in admitted.items():
                    self._join(name, indices)
            self._offers, self._grow = {}, None
            self.steps += 1
            self._follow_network()
            return loss
        network = self.strategy.network(self.steps)
        joined = self.strategy.joined if isinstance(self.strategy, ID3) else None
        observing = self.strategy.dense_gradients_at(self.steps)
        unknown = set(network) - set(self.named)
        if unknown:
            raise ValueError(f"strategy gave a child network for {sorted(unknown)}, which are not in this optimizer")
        for group in self.param_groups:
            live, grads = [], []
            for p in group["params"]:
                delivered = self._delivered(p)
                if p.grad is None and delivered is None:
                    continue
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError("SparseChildAdamW does not support sparse gradients")
                name = self.names[p]
                if observing and p.grad is not None:
                    self.strategy.observe(name, local(p.grad))  # a dynamic network's window
                if joined is not None and self.state[p]:  # ID3 after its first step
                    state = self._take_joined(p, joined.get(name))
                else:
                    state = self._sync(p, network.get(name))
                state["step"] += 1
                if "exp_avg" in state:
                    live.append((p, state))
                    grads.append(child_grad(p, state, self._in_state_order(p, state, delivered)))
            adamw(group, live, grads)
        self.steps += 1
        self._follow_network()
        return loss

    def _keep_best_offers(self, grow: int) -> None:
        """Once the tensors' offers hold more than 2 x `grow` candidates, drop those below the best `grow` of
        them all (ties at the cut kept): the global best `grow`, which `ID3.admit` takes, is among the rest, so
        the offers stay within about 2 x `grow` candidates, where each tensor keeping its own best `grow` held
        up to `grow` per tensor (at ID3 growing every 10 steps on a 185.6M Llama, 1.2 GB)."""
        if sum(len(o[0]) for o in self._offers.values()) <= 2 * grow:
            return
        cut = torch.topk(torch.cat([o[0] for o in self._offers.values()]), grow, sorted=False).values.min()
        for name, (scores, indices, grads) in list(self._offers.items()):
            keep = scores >= cut
            if not keep.all():
                self._offers[name] = (scores[keep], indices[keep.to(indices.device)], grads[keep.to(grads.device)])

    def _join(self, name: str, indices: torch.Tensor) -> None:
        """ID3 in backward: elements admitted after backward get the first update `step()` would have given
        them, from the gradient values their tensor's hook kept, and join the tensor's state."""
        param = self.named[name]
        _, offered, grads = self._offers[name]
        admitted = torch.isin(offered, indices)
        grad, indices = grads[admitted], offered[admitted]
        state = self.state[param]
        joined = state["step"] - 1 if self.bias_correction == "element" else 0  # the hook counted this step
        append(state, param, indices, joined)
        n = len(indices)  # the joiners' slices of the state: views, so the update below writes into it
        tail = {k: state[k][-n:] for k in ("index", "exp_avg", "exp_avg_sq", "master") if k in state}
        tail.update(step=state["step"], cohort_sizes=[n], cohort_joined=[joined])
        adamw(self._group_of[param], [(param, tail)], [grad.float() if "master" in tail else grad])

    def _take_joined(self, param: torch.Tensor, indices: torch.Tensor | None) -> dict[str, Any]:
        """ID3 after its first step: append the elements its last growth admitted (`ID3.joined`), which is
        what `_sync` would find by comparing the whole index."""
        state: dict[str, Any] = self.state[param]
        if indices is not None and len(indices):
            append(state, param, indices, state["step"] if self.bias_correction == "element" else 0)
        return state

    def _sync(self, param: torch.Tensor, index: torch.Tensor | None) -> dict[str, Any]:
        """Bring `param`'s state in line with its child index (None: all of it), appending elements that joined."""
        state: dict[str, Any] = self.state[param]
        if not state:
            state["step"] = 0
        elif self.strategy.kind in ("fixed", "dynamic") and param in self._seen and self._seen[param] is index:
            return state  # the index the state was synced to (a fixed one never changes; a new one is a new tensor)
        self._seen[param] = index
        if self.strategy.kind == "dynamic" and index is not None and "index" in state:
            drop(state, torch.isin(state["index"], index))  # elements that left: their state goes
        had = size_of(param, state)
        param = local(param)  # the rank's rows under FSDP2: its index and state are of those alone
        now = param.numel() if index is None else len(index)
        if now == had:
            return state  # a set that only grows is unchanged iff its size is
        if now < had or (index is not None and "index" in state and not bool(torch.isin(state["index"], index).all())):
            raise RuntimeError(f"the child network of {self.names[param]!r} lost elements; SparseChildAdamW "
                               "supports only fixed or growing child networks")
        joined = state["step"] if self.bias_correction == "element" else 0  # "tensor": counted from its first step
        if had == 0 and now == param.numel() and not is_overlay(param):  # whole from the start (or the head):
            # dense state, no index (an overlay weight's child is always indexed: its values are the masters)
            low = param.dtype in LOW_PRECISION  # keep an fp32 master, and fp32 moments
            moments = torch.float32 if low else param.dtype
            state.update(exp_avg=torch.zeros_like(param, dtype=moments),
                         exp_avg_sq=torch.zeros_like(param, dtype=moments))
            if low:
                state["master"] = param.detach().float().clone()
            add_cohort(state, joined, now)
        else:  # `had` is 0 or a partial index here: dense state is already whole, so it cannot have grown
            fresh = torch.arange(param.numel(), device=param.device) if index is None else index
            if "index" in state:  # the joiners, in index order (sorted, as the strategy's index is)
                fresh = fresh[~torch.isin(fresh, state["index"])]
            append(state, param, fresh, joined)
        return state


def _check_finite(name: str, *grads: torch.Tensor | None) -> None:
    if not all(torch.isfinite(local(g)).all() for g in grads if g is not None):
        raise RuntimeError(f"non-finite gradient for {name!r}: with the optimizer step in backward, updates "
                           "already made to other parameters cannot be undone")


def state_bytes(optimizer: Optimizer) -> int:
    """Bytes held in an optimizer's state tensors (moments, indices, step counts), for memory accounting."""
    total = 0
    for state in optimizer.state.values():
        total += sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
    return total
