"""SparseChildAdamW against the dense masked AdamW and a float64 per-element reference."""

from __future__ import annotations

import copy
import io
import math
from dataclasses import dataclass, field

import pytest
import torch
from conftest import mlp_names, step_side_by_side, twin_mlps

from childtune import ChildOptimizer
from childtune.masks import to_indices
from childtune.optim.sparse import SparseChildAdamW, state_bytes
from childtune.strategies import ID3, ChildTuningD, ChildTuningF, GradualUnfreezing, RandomMasking
from childtune.strategies.chosen import ChosenStrategy

LR, BETAS, EPS, WD = 1e-2, (0.9, 0.999), 1e-8, 0.1
SHAPES = {"layer.0.w": (40, 30), "layer.0.b": (30,), "layer.1.w": (4, 5, 6), "classifier.w": (3, 4)}


@dataclass
class Given(ChosenStrategy):
    """A fixed child network handed in directly (what Child-Tuning_D's Fisher step would produce)."""

    given: dict = field(default_factory=dict, repr=False)

    def network(self, step: int):
        return to_indices(self.given)


@dataclass
class Shrinking(ChosenStrategy):
    kind = "growing"

    def network(self, step: int):
        keep = step == 0
        return to_indices({n: torch.full_like(p, keep, dtype=torch.bool) for n, p in self.maskable().items()})


def make_named(seed: int = 0) -> dict[str, torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.nn.Parameter(torch.randn(*s, generator=g)) for n, s in SHAPES.items()}


def set_grads(named, step: int) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for p in named.values():
        p.grad = torch.randn(p.shape, generator=g)


def run(opt, named, steps: int, start: int = 0) -> None:
    for t in range(start, start + steps):
        set_grads(named, t)
        opt.step()


def given_masks(named) -> dict[str, torch.Tensor]:
    """A partial mask, a fully frozen parameter, a fully-child one; the head is left unmasked (dense)."""
    g = torch.Generator().manual_seed(5)
    return {
        "layer.0.w": torch.rand(SHAPES["layer.0.w"], generator=g) < 0.2,
        "layer.0.b": torch.zeros(SHAPES["layer.0.b"], dtype=torch.bool),
        "layer.1.w": torch.ones(SHAPES["layer.1.w"], dtype=torch.bool),
    }


STRATEGIES = {
    "given": lambda named: Given(given=given_masks(named)),
    "random": lambda named: RandomMasking(0.15, seed=2),
    "random-with-head": lambda named: RandomMasking(0.3, seed=4, always=()),
    "id3-growing": lambda named: ID3(0.3, total_steps=4, scope="all"),
    "gradual": lambda named: GradualUnfreezing(2),
}


def pair(make, bias_correction="tensor"):
    sparse_named, dense_named = make_named(), make_named()
    sparse = SparseChildAdamW(sparse_named, make(sparse_named), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD,
                              bias_correction=bias_correction)
    dense = ChildOptimizer(dense_named, make(dense_named), torch.optim.AdamW, strict=True,
                           lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    return sparse, sparse_named, dense, dense_named


@pytest.mark.parametrize("kind", list(STRATEGIES))
def test_sparse_equals_dense_masked_adamw(kind):
    sparse, a, dense, b = pair(STRATEGIES[kind])
    before = {n: p.detach().clone() for n, p in a.items()}
    run(sparse, a, steps=6)
    run(dense, b, steps=6)
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(a[n], before[n]) for n in a)


def test_param_groups_keep_their_own_weight_decay():
    """The training loop's groups: (name, param) pairs, decay on weights only."""
    def groups(named):
        return [{"params": [(n, p) for n, p in named.items() if n.endswith(".w")], "weight_decay": WD},
                {"params": [(n, p) for n, p in named.items() if not n.endswith(".w")], "weight_decay": 0.0}]

    a, b = make_named(), make_named()
    sparse = SparseChildAdamW(groups(a), RandomMasking(0.3, seed=1, always=()), lr=LR)
    dense = ChildOptimizer(groups(b), RandomMasking(0.3, seed=1, always=()), torch.optim.AdamW, strict=True, lr=LR)
    run(sparse, a, steps=3)
    run(dense, b, steps=3)
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-6, atol=1e-7)
    assert [g["weight_decay"] for g in sparse.param_groups] == [WD, 0.0]


def test_fixed_masks_are_strict_and_state_covers_only_the_child():
    named = make_named()
    masks = given_masks(named)
    before = {n: p.detach().clone() for n, p in named.items()}
    opt = SparseChildAdamW(named, Given(given=masks), lr=LR, weight_decay=WD)
    run(opt, named, steps=3)
    for n, m in masks.items():
        assert torch.equal(named[n].detach()[~m], before[n][~m])  # weight decay did not touch them either
        assert (named[n].detach()[m] != before[n][m]).all()
    partial, frozen, whole, head = (opt.state[named[n]] for n in SHAPES)
    assert len(partial["exp_avg"]) == int(masks["layer.0.w"].sum()) and partial["index"].dtype == torch.int32
    assert set(frozen) == {"step"}  # a frozen parameter keeps no tensors at all
    assert whole["exp_avg"].shape == SHAPES["layer.1.w"] and "index" not in whole
    assert head["exp_avg"].shape == SHAPES["classifier.w"]


def per_element_reference(named, masks_per_step, steps):
    """AdamW in float64 where each element counts its own steps from the one it joined the child network."""
    p = {n: q.detach().double().clone() for n, q in named.items()}
    m = {n: torch.zeros_like(q) for n, q in p.items()}
    v = {n: torch.zeros_like(q) for n, q in p.items()}
    t = {n: torch.zeros_like(q) for n, q in p.items()}
    for step in range(steps):
        g = torch.Generator().manual_seed(100 + step)
        for n in p:
            grad = torch.randn(p[n].shape, generator=g).double()
            inside = masks_per_step[step].get(n, torch.ones_like(p[n], dtype=torch.bool))
            t[n] += inside
            m[n] = torch.where(inside, BETAS[0] * m[n] + (1 - BETAS[0]) * grad, m[n])
            v[n] = torch.where(inside, BETAS[1] * v[n] + (1 - BETAS[1]) * grad * grad, v[n])
            age = t[n].clamp(min=1)
            update = (LR / (1 - BETAS[0] ** age)) * m[n] / (v[n].sqrt() / (1 - BETAS[1] ** age).sqrt() + EPS)
            p[n] = torch.where(inside, p[n] * (1 - LR * WD) - update, p[n])
    return p


def test_id3_new_elements_get_their_own_bias_correction():
    named = make_named()
    strategy = ID3(0.4, total_steps=4, scope="all")
    opt = SparseChildAdamW(named, strategy, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    reference_start = make_named()
    history = []
    for step in range(6):
        set_grads(named, step)
        opt.step()
        history.append(strategy.final_masks(step + 1))  # a fresh dense view of the grown index
    assert len(history[0]) and history[0]["layer.0.w"].sum() < history[-1]["layer.0.w"].sum()  # it did grow
    expected = per_element_reference(reference_start, history, steps=6)
    for n, q in named.items():
        torch.testing.assert_close(q.detach().double(), expected[n], rtol=1e-5, atol=1e-6)
    # joined in several steps, so several runs of step counts; the dense-masked answer differs
    assert len(opt.state[named["layer.0.w"]]["cohort_joined"]) > 1
    tensor_mode, tensor_named, _, _ = pair(STRATEGIES["id3-growing"])
    run(tensor_mode, tensor_named, steps=6)
    assert not torch.allclose(tensor_named["layer.0.w"], named["layer.0.w"])


def test_child_tuning_d_on_a_model_trains_like_dense(tiny_bert):
    torch.manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 64, (4, 8)), "attention_mask": torch.ones(4, 8, dtype=torch.long),
                "labels": torch.randint(0, 2, (4,))} for _ in range(3)]
    twin = type(tiny_bert)(tiny_bert.config)
    twin.load_state_dict(tiny_bert.state_dict())
    opts = []
    for model, sparse in ((tiny_bert, True), (twin, False)):
        strategy = ChildTuningD(0.2)
        kwargs = dict(lr=1e-3, weight_decay=0.01)
        opt = (SparseChildAdamW(model.named_parameters(), strategy, **kwargs) if sparse else
               ChildOptimizer(model.named_parameters(), strategy, torch.optim.AdamW, strict=True, **kwargs))
        strategy.prepare(model, batches)
        for batch in batches:
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
        opts.append(opt)
    for (n, a), b in zip(tiny_bert.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
    sparse, dense = opts
    assert state_bytes(sparse) < 0.75 * state_bytes(dense)  # embeddings and head train in full under D's rest="train"


@pytest.mark.parametrize("p", [0.3, 0.1, 0.01])
def test_state_bytes_scale_with_p(p):
    named = {f"layer.{i}.w": torch.nn.Parameter(torch.randn(200, 100)) for i in range(4)}
    sparse = SparseChildAdamW(named, RandomMasking(p), lr=LR)
    dense = torch.optim.AdamW(named.values(), lr=LR)
    for opt in (sparse, dense):
        run(opt, named, steps=1)
    k = round(p * 80_000)
    assert sum(len(s["exp_avg"]) for s in sparse.state.values()) == k
    # two float32 moments and an int32 index per child element
    assert state_bytes(sparse) == 12 * k
    assert state_bytes(dense) == 8 * 80_000 + 4 * 4  # torch keeps `step` as a float32 tensor
    moments = sum(s["exp_avg"].nbytes + s["exp_avg_sq"].nbytes for s in sparse.state.values())
    assert moments / (8 * 80_000) == pytest.approx(p, abs=1e-4)


@pytest.mark.parametrize("kind", ["random", "id3-growing", "gradual"])
def test_state_dict_round_trip_resumes_exactly(kind):
    make = STRATEGIES[kind]
    whole = make_named()
    straight = SparseChildAdamW(whole, make(whole), lr=LR, weight_decay=WD)
    run(straight, whole, steps=5)

    first = make_named()
    opt = SparseChildAdamW(first, make(first), lr=LR, weight_decay=WD)
    run(opt, first, steps=2)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    resumed_named = {n: torch.nn.Parameter(p.detach().clone()) for n, p in first.items()}
    fresh = make(resumed_named)
    if isinstance(fresh, RandomMasking):
        fresh.seed = 99  # the child network must come from the checkpoint, not be drawn again
    resumed = SparseChildAdamW(resumed_named, fresh, lr=LR, weight_decay=WD)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.steps == 2
    indexed = [s for s in resumed.state.values() if "index" in s]
    assert all(s["index"].dtype == torch.int32 for s in indexed)  # not cast to float by torch's loader
    assert indexed or kind == "gradual"  # gradual unfreezing only ever has whole tensors
    run(resumed, resumed_named, steps=3, start=2)
    for n in whole:
        assert torch.equal(resumed_named[n], whole[n]), n


def test_schedulers_drive_it_like_any_optimizer():
    named = make_named()
    strategy = RandomMasking(0.5)
    opt = SparseChildAdamW(named, strategy, lr=LR, weight_decay=0.0)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.25)
    before = {n: p.detach().clone() for n, p in named.items()}
    run(opt, named, steps=1)
    # Adam's first step moves each updated element by the learning rate: here the scheduled one
    for n, p in named.items():
        moved = (p.detach() - before[n]).abs()
        inside = strategy.final_masks(1).get(n, torch.ones_like(moved, dtype=torch.bool))
        torch.testing.assert_close(moved[inside], torch.full_like(moved[inside], 0.25 * LR), rtol=1e-4, atol=0)
        assert not moved[~inside].any()


def test_strategies_that_redraw_or_shrink_are_refused():
    named = make_named()
    with pytest.raises(ValueError, match=r"ChildTuningF chooses a new one every step"):
        SparseChildAdamW(named, ChildTuningF(0.3))
    with pytest.raises(ValueError, match="bias_correction"):
        SparseChildAdamW(named, RandomMasking(0.3), bias_correction="global")
    opt = SparseChildAdamW(named, Shrinking(), lr=LR)
    run(opt, named, steps=1)
    with pytest.raises(RuntimeError, match="lost elements"):
        run(opt, named, steps=1, start=1)


def test_masks_for_unknown_parameters_are_refused():
    named = make_named()
    opt = SparseChildAdamW(named, Given(given={"nope": torch.ones(2, dtype=torch.bool)}))
    with pytest.raises(ValueError, match="nope"):
        run(opt, named, steps=1)


def test_bias_correction_of_a_late_joiner_starts_at_one():
    """The first update of an element that joins late has size ~lr (as at step 1), not ~lr*(1-beta1)."""
    named = {"layer.0.w": torch.nn.Parameter(torch.zeros(2))}

    @dataclass
    class Late(ChosenStrategy):
        kind = "growing"

        def network(self, step):
            return to_indices({"layer.0.w": torch.tensor([True, step >= 20])})

    opt = SparseChildAdamW(named, Late(), lr=LR, weight_decay=0.0)
    for _ in range(21):
        named["layer.0.w"].grad = torch.ones(2)
        opt.step()
    assert named["layer.0.w"][1].item() == pytest.approx(-LR, rel=1e-6)
    assert math.isclose(named["layer.0.w"][0].item(), -21 * LR, rel_tol=1e-5)


@pytest.mark.parametrize(("make", "correction"), [
    (lambda named: RandomMasking(0.3, seed=2), "element"), (lambda named: GradualUnfreezing(2), "element"),
    (lambda named: ID3(9, total_steps=4), "element"), (lambda named: ID3(9, total_steps=4), "tensor"),
    (lambda named: ID3.authors(0.3, total_steps=5), "tensor")])
def test_the_step_in_backward_equals_the_ordinary_step_and_frees_gradients(make, correction):
    """Each parameter updated by a hook as soon as its gradient exists gives the same weights; for ID3
    (candidates kept per tensor, joiners admitted and updated after backward) the same child network too."""
    model, twin = twin_mlps()
    names, twins = mlp_names(model), mlp_names(twin)
    ordinary = SparseChildAdamW(names, make(names), lr=LR, weight_decay=WD, bias_correction=correction)
    hooked = SparseChildAdamW(twins, make(twins), lr=LR, weight_decay=WD, bias_correction=correction,
                              in_backward=True)

    def same():
        for name in names:
            torch.testing.assert_close(twins[name], names[name], rtol=0, atol=1e-7, msg=name)
        if isinstance(ordinary.strategy, ID3):
            assert all(torch.equal(hooked.strategy.chosen[n], m) for n, m in ordinary.strategy.chosen.items())

    step_side_by_side(model, twin, ordinary, hooked, 5, same)
    if isinstance(ordinary.strategy, ID3):
        chosen = sum(len(i) for n, i in ordinary.strategy.chosen.items() if n in ordinary.strategy.scored())
        assert chosen == ordinary.strategy.size  # grown to its budget, in backward as ordinarily


def test_a_strategy_ranking_the_whole_steps_gradients_cannot_step_in_backward():
    @dataclass
    class Global(ChosenStrategy):
        kind = "growing"
        needs_gradients = True

        def network(self, step):
            return {}

    with pytest.raises(ValueError, match="cannot run inside backward"):
        SparseChildAdamW({"layer.0.w": torch.nn.Parameter(torch.zeros(2))}, Global(), in_backward=True)


def test_bf16_weights_with_fp32_masters_change_only_child_elements_and_track_fp32():
    """50 steps on bf16 weights: child elements follow an fp32 run within bf16 rounding; nothing else moves."""
    torch.manual_seed(0)
    fp32 = make_named()
    bf16 = {n: torch.nn.Parameter(p.detach().to(torch.bfloat16)) for n, p in fp32.items()}
    start = {n: p.detach().clone() for n, p in bf16.items()}
    mask = given_masks(fp32)
    reference = SparseChildAdamW(fp32, Given(given=mask), lr=1e-3, betas=BETAS, eps=EPS, weight_decay=WD)
    masters = SparseChildAdamW(bf16, Given(given=mask), lr=1e-3, betas=BETAS, eps=EPS, weight_decay=WD)
    g = torch.Generator().manual_seed(7)
    for _ in range(50):
        for n in fp32:
            grad = torch.randn(fp32[n].shape, generator=g)
            fp32[n].grad, bf16[n].grad = grad, grad.to(torch.bfloat16)
        reference.step()
        masters.step()
    for n, p in bf16.items():
        m = mask.get(n, torch.ones_like(p, dtype=torch.bool))
        assert torch.equal(p.detach()[~m], start[n][~m]), n  # outside the child network: bit-identical
        # inside: the bf16 weight is its fp32 master rounded, and the master tracks the fp32 run
        torch.testing.assert_close(p.detach()[m].float(), fp32[n].detach()[m], rtol=1e-2, atol=1e-3, msg=n)
        if not m.any():
            continue  # a fully frozen parameter: nothing to track, and no state kept for it
        moved = (p.detach()[m] != start[n][m]).float().mean()
        assert moved > 0.5, n  # steps of 1e-3 are below bf16 resolution at |w| ~ 1 (2^-7), yet accumulate
        state = masters.state[p]
        assert state["exp_avg"].dtype == torch.float32 and state["master"].dtype == torch.float32
    child = sum(int(m.sum()) for m in mask.values())
    assert sum(masters.state[p]["master"].numel() for p in bf16.values() if "master" in masters.state[p]) >= child


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_accumulation_in_backward_buffers_child_gradients_and_equals_the_ordinary_step(dtype):
    """Three micro-batches per update: hooks keep only child-sized buffers, free every gradient, and
    the update equals the ordinary step on the gradients autograd accumulates."""
    model, twin = twin_mlps(dtype)
    named = mlp_names
    ordinary = SparseChildAdamW(named(model), RandomMasking(0.3, seed=2), lr=LR, weight_decay=WD)
    hooked = SparseChildAdamW(named(twin), RandomMasking(0.3, seed=2), lr=LR, weight_decay=WD, in_backward=True)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        parts = [(torch.randn(4, 6, generator=g).to(dtype), torch.randn(4, 3, generator=g).to(dtype)) for _ in range(3)]
        for x, y in parts:
            (torch.nn.functional.mse_loss(model(x), y) / 3).backward()
        ordinary.step()
        ordinary.zero_grad()
        for i, (x, y) in enumerate(parts):
            hooked.accumulating = i < 2
            (torch.nn.functional.mse_loss(twin(x), y) / 3).backward()
            assert all(p.grad is None for p in twin.parameters())
            if i < 2:  # a buffer per parameter, of its child's size (the dense head: its own size)
                sizes = {hooked.names[p]: b.numel() for p, b in hooked._buffers.items()}
                assert sizes["layer.0.w"] == int(hooked.strategy.masks(0)["layer.0.w"].sum())
        hooked.step()
        assert not hooked._buffers
        for name, p in named(model).items():
            torch.testing.assert_close(named(twin)[name], p, rtol=0, atol=1e-7 if dtype == torch.float32 else 0,
                                       msg=name)


@pytest.mark.parametrize("sparse", [True, False])
def test_an_optimizer_stepping_in_backward_dies_with_its_last_reference(sparse):
    """Its hooks on the parameters hold it weakly: a hook holding it strongly made a cycle through tensors
    that autograd also holds, which Python's collector never freed (a study process kept every cell's
    optimizer and model). After it is gone, backward still runs and updates nothing."""
    import gc
    import weakref

    model, _ = twin_mlps(torch.float32)
    make = SparseChildAdamW if sparse else (lambda named, strategy, **kw: ChildOptimizer(
        named, strategy, torch.optim.AdamW, strict=True, **kw))
    optimizer = make(mlp_names(model), RandomMasking(0.3, seed=2), lr=LR, in_backward=True)
    x, y = torch.randn(4, 6), torch.randn(4, 3)
    torch.nn.functional.mse_loss(model(x), y).backward()
    assert optimizer.state, "the hooks stepped while it was alive"
    dead = weakref.ref(optimizer)
    del optimizer
    gc.collect()
    assert dead() is None
    before = [p.detach().clone() for p in model.parameters()]
    torch.nn.functional.mse_loss(model(x), y).backward()
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


def test_id3_in_backward_keeps_its_offers_near_the_growth_and_admits_the_same():
    """Eight tensors each offering its best `grow` would hold 8 x grow candidates; the offers are cut back to
    the best `grow` of them all whenever they pass 2 x grow, and the admitted set is the ordinary step's."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(12, 12) for _ in range(4)]
    model = torch.nn.Sequential(*[m for layer in layers for m in (layer, torch.nn.Tanh())])
    twin = copy.deepcopy(model)

    def named(m):
        return {f"layer.{i}.{kind}": getattr(m[2 * i], attr) for i in range(4)
                for kind, attr in (("w", "weight"), ("b", "bias"))}

    ordinary = SparseChildAdamW(named(model), ID3(40, total_steps=4, scope="all"), lr=LR)
    hooked = SparseChildAdamW(named(twin), ID3(40, total_steps=4, scope="all"), lr=LR, in_backward=True)
    held = []
    keep = hooked._keep_best_offers

    def spy(grow):
        keep(grow)
        held.append((sum(len(o[0]) for o in hooked._offers.values()), grow))

    hooked._keep_best_offers = spy
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        x, y = torch.randn(8, 12, generator=g), torch.randn(8, 12, generator=g)
        for m, opt in ((model, ordinary), (twin, hooked)):
            torch.nn.functional.mse_loss(m(x), y).backward()
            opt.step()
            opt.zero_grad()
        assert all(torch.equal(hooked.strategy.chosen[n], c) for n, c in ordinary.strategy.chosen.items())
    assert max(count for count, _ in held) <= 2 * max(grow for _, grow in held)
    assert len(held) == 4 * 8  # every tensor offered on every growing step


def test_nonfinite_names_the_parameters_whose_updated_elements_broke():
    model, _ = twin_mlps(torch.float32)
    optimizer = SparseChildAdamW(mlp_names(model), RandomMasking(0.3, seed=2), lr=LR)
    torch.nn.functional.mse_loss(model(torch.randn(4, 6)), torch.randn(4, 3)).backward()
    optimizer.step()
    assert optimizer.nonfinite() == []
    index = optimizer.state[model[0].weight]["index"]
    outside = next(i for i in range(model[0].weight.numel()) if i not in set(index.tolist()))
    with torch.no_grad():
        model[0].weight.view(-1)[outside] = math.inf  # outside the child: no update touched it
        assert optimizer.nonfinite() == []
        model[0].weight.view(-1)[index[0]] = math.nan
        model[2].bias[0] = math.inf  # the head, dense state
    assert optimizer.nonfinite() == ["layer.0.w", "classifier.b"]
