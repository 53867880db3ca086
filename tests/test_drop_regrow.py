"""Drop and regrow (`DropRegrow`, `--method child-dyn`): the choice against its rule computed by hand, and
SparseChildAdamW on a moving child network against a dense masked AdamW written out element by element."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import pytest
import torch
from conftest import mlp_names, twin_mlps

from childtune.masks import Indices
from childtune.optim.sparse import SparseChildAdamW
from childtune.strategies import DropRegrow
from childtune.strategies.base import NetworkKind
from childtune.strategies.chosen import ChosenStrategy

LR, WD, BETAS, EPS = 1e-2, 0.1, (0.9, 0.999), 1e-8


@dataclass
class Scripted(ChosenStrategy):
    """A dynamic child network given step by step (`script[step]`: {name: index}; the last one holds on)."""

    script: list[dict[str, list[int]]] = field(default_factory=list)
    rest: str = field(default="freeze", kw_only=True)
    kind: ClassVar[NetworkKind] = "dynamic"

    def network(self, step: int) -> Indices:
        now = self.script[min(step, len(self.script) - 1)]
        if getattr(self, "_at", None) != now:  # a new tensor per change, as a reselection makes
            self._at = now
            self.chosen = {n: torch.tensor(i, dtype=torch.int32) for n, i in now.items()}
        return self.require_chosen()


def masked_adamw_by_hand(params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], network: dict[str, list[int]],
                         state: dict[str, dict[str, torch.Tensor]]) -> None:
    """One strict AdamW step, element by element: elements outside `network` do not move (decay included);
    one that left loses its moments and step count; one that joins starts from zero moments and its own
    count (bias correction from its first step). Names absent from `network` are dense."""
    b1, b2 = BETAS
    for name, p in params.items():
        s = state.setdefault(name, {"m": torch.zeros(p.numel(), dtype=torch.float64),
                                    "v": torch.zeros(p.numel(), dtype=torch.float64),
                                    "t": torch.zeros(p.numel(), dtype=torch.int64)})
        chosen = set(range(p.numel())) if name not in network else set(network[name])
        flat, g = p.detach().view(-1), grads[name].reshape(-1).double()
        for e in range(p.numel()):
            if e not in chosen:
                s["m"][e] = s["v"][e] = 0.0
                s["t"][e] = 0
                continue
            s["t"][e] += 1
            t = int(s["t"][e])
            w = float(flat[e]) * (1 - LR * WD)
            s["m"][e] = b1 * s["m"][e] + (1 - b1) * g[e]
            s["v"][e] = b2 * s["v"][e] + (1 - b2) * g[e] ** 2
            denom = math.sqrt(float(s["v"][e]) / (1 - b2**t)) + EPS
            flat[e] = w - LR / (1 - b1**t) * float(s["m"][e]) / denom


SCRIPT = [{"layer.0.w": [0, 3, 7, 12, 20, 29], "layer.0.b": [1, 4], "layer.1.w": [2, 5, 9]},
          {"layer.0.w": [0, 3, 7, 12, 20, 29], "layer.0.b": [1, 4], "layer.1.w": [2, 5, 9]},
          {"layer.0.w": [1, 3, 7, 13, 20, 29], "layer.0.b": [0, 4], "layer.1.w": [2, 5, 9]},  # 0, 12 left
          {"layer.0.w": [0, 1, 3, 7, 20, 29], "layer.0.b": [0, 4], "layer.1.w": [2, 6, 9]},  # 0 back, fresh
          {"layer.0.w": [0, 1, 3, 7, 20, 29], "layer.0.b": [0, 4], "layer.1.w": [2, 6, 9]}]


@pytest.mark.parametrize("in_backward", [False, True])
def test_sparse_adamw_on_a_moving_network_equals_masked_adamw_by_hand(in_backward):
    model, _ = twin_mlps(torch.float32)
    reference = {n: p.detach().clone().double() for n, p in mlp_names(model).items()}
    optimizer = SparseChildAdamW(mlp_names(model), Scripted(script=SCRIPT), lr=LR, weight_decay=WD,
                                 in_backward=in_backward)
    state: dict = {}
    g = torch.Generator().manual_seed(3)
    for step in range(len(SCRIPT)):
        x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
        loss = torch.nn.functional.mse_loss(model(x), y)
        grads = dict(zip(mlp_names(model), torch.autograd.grad(loss, list(mlp_names(model).values()),
                                                               retain_graph=True), strict=True))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        masked_adamw_by_hand(reference, grads, SCRIPT[step], state)
        for name, p in mlp_names(model).items():
            torch.testing.assert_close(p.detach().double(), reference[name], rtol=1e-5, atol=1e-6, msg=name)
        held = {n: sorted(optimizer.state[p]["index"].tolist()) for n, p in mlp_names(model).items()
                if "index" in optimizer.state[p]}
        assert held == SCRIPT[step]  # the state holds exactly the step's child network: the left ones are gone


def bound(p=0.25, total=40, **kw) -> tuple[DropRegrow, dict[str, torch.nn.Parameter]]:
    torch.manual_seed(0)
    params = {"layer.0.w": torch.nn.Parameter(torch.randn(8, 10)), "layer.1.w": torch.nn.Parameter(torch.randn(6, 5)),
              "classifier.w": torch.nn.Parameter(torch.randn(2, 5))}
    strategy = DropRegrow(p, total, **{"every": 10, "drop": 0.5, **kw})
    strategy.bind(params)
    return strategy, params


def test_reselection_drops_the_least_moved_and_regrows_the_largest_mean_gradient_outside_the_kept():
    strategy, params = bound(window=2)
    before = {n: i.clone() for n, i in strategy.network(0).items()}
    assert strategy.dense_gradients_at(8) and strategy.dense_gradients_at(9)
    assert not strategy.dense_gradients_at(7) and not strategy.dense_gradients_at(10)
    g = torch.Generator().manual_seed(5)
    moves = {}
    with torch.no_grad():
        for name, index in before.items():  # each child element moves by a known amount
            moves[name] = torch.rand(len(index), generator=g)
            params[name].view(-1)[index.long()] += moves[name]
    grads = {n: [torch.randn(params[n].shape, generator=g) for _ in range(2)] for n in before}
    for k in range(2):
        for name in before:
            strategy.observe(name, grads[name][k])
    after = strategy.network(10)
    assert strategy.moved == 10 and strategy.fraction(10) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)) / 2)
    for name, index in before.items():
        k = int(strategy.fraction(10) * len(index))
        order = sorted(range(len(index)), key=lambda i: (float(moves[name][i]), i))
        kept = {int(index[i]) for i in order[k:]}
        score = ((grads[name][0] + grads[name][1]) / 2).abs().reshape(-1)
        candidates = [e for e in range(params[name].numel()) if e not in kept]
        grown = set(sorted(candidates, key=lambda e: -float(score[e]))[:k])
        assert set(after[name].tolist()) == kept | grown, name
        assert len(after[name]) == len(index)  # each tensor keeps its size
        assert torch.equal(after[name], torch.sort(after[name]).values)
        assert set(strategy.final_masks(10)[name].view(-1).nonzero().view(-1).tolist()) == \
            set(index.tolist()) | set(after[name].tolist())  # every element that was ever in it
    assert "classifier.w" not in after  # the head trains whole, outside the budget
    assert strategy.swapped[10] == sum(len(set(after[n].tolist()) - set(before[n].tolist())) for n in before)


def test_signal_importance_is_the_mean_less_z_standard_errors():
    strategy, _ = bound(window=3, importance="signal")
    index = strategy.network(0)["layer.1.w"]
    g = torch.Generator().manual_seed(2)
    grads = [torch.randn(6, 5, generator=g) for _ in range(3)]
    for grad in grads:
        strategy.observe("layer.1.w", grad)
    stacked = torch.stack([x.reshape(-1) for x in grads]).double()
    want = stacked.mean(0).abs() - 1.65 * (stacked.var(0, unbiased=True) / 3).sqrt()
    torch.testing.assert_close(strategy._score("layer.1.w").double(), want, rtol=1e-5, atol=1e-6)
    assert 0 < len(index) < 30 and sum(map(len, strategy.network(0).values())) == round(0.25 * 110)  # exact


def test_schedules_and_a_reselection_without_statistics():
    cosine, _ = bound()
    linear, _ = bound(schedule="linear")
    constant, _ = bound(schedule="constant")
    assert [cosine.fraction(s) for s in (0, 20, 40)] == pytest.approx([0.5, 0.25, 0.0])
    assert [linear.fraction(s) for s in (0, 10, 40)] == pytest.approx([0.5, 0.375, 0.0])
    assert constant.fraction(30) == 0.5
    assert [s for s in range(40) if cosine.moves_at(s)] == [10, 20, 30]
    with pytest.raises(RuntimeError, match="no gradient statistics"):
        cosine.network(10)


def test_its_state_resumes_mid_window_to_the_same_reselection():
    first, params = bound(window=3)
    second, _ = bound(window=3)
    g = torch.Generator().manual_seed(9)
    grads = [{n: torch.randn(params[n].shape, generator=g) for n in ("layer.0.w", "layer.1.w")} for _ in range(3)]
    for name, grad in grads[0].items():
        first.observe(name, grad)
    second.load_state_dict(first.state_dict())
    for strategy in (first, second):
        for step in grads[1:]:
            for name, grad in step.items():
                strategy.observe(name, grad)
    a, b = first.network(10), second.network(10)
    assert all(torch.equal(a[n], b[n]) for n in a) and a != {}


@pytest.mark.parametrize("bad", [dict(window=11), dict(importance="signal", window=1), dict(start="lottery"),
                                 dict(drop=1.5), dict(schedule="step")])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError):
        DropRegrow(0.1, 40, **{"every": 10, **bad})


@pytest.mark.parametrize("in_backward", [False, True])
def test_child_only_gradients_follow_the_reselections(in_backward):
    """Dense weight gradients against child-only ones (dense on the window steps only) over three
    reselections: the same child networks and the same weights, to float32 summation order."""
    model, twin = twin_mlps(torch.float32)

    def build(m):
        strategy = DropRegrow(0.3, 12, every=4, drop=0.5, window=2, seed=1)
        return SparseChildAdamW(mlp_names(m), strategy, lr=LR, weight_decay=WD, in_backward=in_backward)

    dense, sparse = build(model), build(twin)
    child = sparse.child_only_grads(twin)
    assert set(child.sites) == {"0.weight", "2.weight"}
    g = torch.Generator().manual_seed(4)
    for step in range(12):
        x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
        for m, opt in ((model, dense), (twin, sparse)):
            torch.nn.functional.mse_loss(m(x), y).backward()
            if not in_backward and m is twin:  # dense .grad exactly on the window steps
                assert (twin[0].weight.grad is not None) == opt.strategy.dense_gradients_at(step), step
            opt.step()
            opt.zero_grad()
        for name, p in mlp_names(model).items():
            torch.testing.assert_close(p, mlp_names(twin)[name], rtol=1e-5, atol=1e-6, msg=f"{name} at step {step}")
        a, b = dense.strategy.network(step + 1), sparse.strategy.network(step + 1)  # (one reselects earlier)
        assert all(torch.equal(a[n], b[n]) for n in a)
    assert sorted(dense.strategy.swapped) == [4, 8] and all(dense.strategy.swapped.values())
