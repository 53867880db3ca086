"""Strategies on real (tiny) transformers and on arbitrary modules."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from childtune import ID3, ChildOptimizer, ChildTuningD, ChildTuningF, GradualUnfreezing, RandomMasking
from childtune.layers import blocks, layer_index, parameter_type
from childtune.masks import count, size, top_fraction, top_k
from childtune.strategies import BitFit, PaFi


def batches(n_batches: int = 3, batch: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(1, 64, (batch, 10), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                    "labels": torch.randint(0, 2, (batch,), generator=g)})
    return out


def train(model, opt, data, steps: int) -> None:
    for t in range(steps):
        opt.zero_grad()
        model(**data[t % len(data)]).loss.backward()
        opt.step()


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(model, before):
    return {n: p.detach() != before[n] for n, p in model.named_parameters()}


def test_id3_ends_with_exactly_budget_changed_elements(tiny_bert):
    before, steps, budget = snapshot(tiny_bert), 7, 1001
    strategy = ID3(budget, total_steps=steps)
    opt = ChildOptimizer(tiny_bert.named_parameters(), strategy, lr=1e-2, weight_decay=0.1, strict=True)
    data = batches()
    grown = []
    for t in range(steps):
        train(tiny_bert, opt, [data[t % 3]], 1)
        grown.append(size({n: i for n, i in strategy.chosen.items() if "classifier" not in n}))
    assert grown == [strategy.target(t) for t in range(steps)]
    assert grown[-1] == budget and all(a < b for a, b in itertools.pairwise(grown))
    moved = changed(tiny_bert, before)
    body = {n: m for n, m in moved.items() if "classifier" not in n}
    assert count(body) == budget
    assert all(torch.equal(body[n], strategy.final_masks(steps)[n]) for n in body)
    assert all(m.all() for n, m in moved.items() if "classifier" in n)  # the head trains in full


def test_id3_budget_checks(tiny_bert):
    n = sum(p.numel() for name, p in tiny_bert.named_parameters() if "classifier" not in name)
    with pytest.raises(ValueError, match="exceeds"):
        ChildOptimizer(tiny_bert.named_parameters(), ID3(n + 1, total_steps=5))
    ChildOptimizer(tiny_bert.named_parameters(), ID3(n, total_steps=5))
    for bad in (0, -3, 1.5, True):
        with pytest.raises(ValueError, match="budget"):
            ID3(bad, total_steps=5)
    with pytest.raises(ValueError, match="total_steps"):
        ID3(10, total_steps=0)


def test_child_tuning_d_picks_top_fisher_and_strict_changes_only_them(tiny_bert):
    data = batches()
    strategy = ChildTuningD(0.2, rest="freeze")
    opt = ChildOptimizer(tiny_bert.named_parameters(), strategy, lr=1e-2, weight_decay=0.01, strict=True)
    strategy.prepare(tiny_bert, data)
    scored = [n for n in strategy.chosen if layer_index(n) is not None]
    total = sum(strategy.params[n].numel() for n in scored)
    assert size({n: strategy.chosen[n] for n in scored}) == round(0.2 * total)
    masks = strategy.final_masks(0)
    before = snapshot(tiny_bert)
    train(tiny_bert, opt, data, 3)
    for name, moved in changed(tiny_bert, before).items():
        if "classifier" in name:
            assert moved.all()
        else:
            assert torch.equal(moved & ~masks[name], torch.zeros_like(moved)), name


def test_child_tuning_d_authors_default_trains_unscored_in_full(tiny_bert):
    strategy = ChildTuningD(0.1)
    ChildOptimizer(tiny_bert.named_parameters(), strategy)
    strategy.prepare(tiny_bert, batches())
    assert all(layer_index(n) is not None for n in strategy.chosen)  # embeddings, pooler, head: no mask


def test_random_control_keeps_child_d_sizes_per_tensor_and_draws_other_elements(tiny_bert):
    """The paper's "task-driven or not" ablation: same count in every tensor, elements at random."""
    data = batches()
    fisher, control = ChildTuningD(0.2, rest="freeze"), ChildTuningD(0.2, rest="freeze", random_within=True, seed=3)
    for strategy in (fisher, control):
        ChildOptimizer(tiny_bert.named_parameters(), strategy)
        strategy.prepare(tiny_bert, data)
    assert fisher.chosen.keys() == control.chosen.keys()
    for name, index in fisher.chosen.items():
        assert len(control.chosen[name]) == len(index), name
    big = max(fisher.chosen, key=lambda n: fisher.params[n].numel())
    both = set(fisher.chosen[big].tolist()) & set(control.chosen[big].tolist())
    overlap = len(both) / max(1, len(fisher.chosen[big]))
    assert overlap < 0.5  # chance is the tensor's density (~0.2); Fisher's own choice would be 1.0
    again = ChildTuningD(0.2, rest="freeze", random_within=True, seed=3)
    ChildOptimizer(tiny_bert.named_parameters(), again)
    again.prepare(tiny_bert, data)
    assert all(torch.equal(again.chosen[n], control.chosen[n]) for n in control.chosen)  # a function of the seed


def test_child_tuning_d_needs_data(tiny_bert):
    strategy = ChildTuningD(0.3)
    ChildOptimizer(tiny_bert.named_parameters(), strategy)
    with pytest.raises(ValueError, match="batches"):
        strategy.prepare(tiny_bert, None)
    with pytest.raises(RuntimeError, match="prepare"):
        strategy.masks(0)


@pytest.mark.parametrize("progress", [True, False])
def test_child_tuning_d_progress_bar_follows_the_callers_choice(tiny_bert, capsys, progress):
    strategy = ChildTuningD(0.3)
    ChildOptimizer(tiny_bert.named_parameters(), strategy)
    strategy.prepare(tiny_bert, batches(), progress=progress)
    assert ("Fisher information" in capsys.readouterr().err) == progress


def test_gradual_unfreezing_goes_top_down(tiny_bert):
    names = [n for n, _ in tiny_bert.named_parameters()]
    order = blocks(names)
    assert [layer_index(g[0]) for g in order] == [None, 0, 1, None]
    assert any("embeddings" in n for n in order[0]) and any("classifier" in n for n in order[-1])
    strategy = GradualUnfreezing(2)
    opt = ChildOptimizer(tiny_bert.named_parameters(), strategy, lr=1e-2, strict=True)
    data = batches()
    seen = []
    for t in range(8):
        before = snapshot(tiny_bert)
        train(tiny_bert, opt, [data[t % 3]], 1)
        moved = changed(tiny_bert, before)
        seen.append({i for i, group in enumerate(order) if any(moved[n].any() for n in group)})
    assert seen[:2] == [{3}, {3}]
    assert seen[2:4] == [{2, 3}, {2, 3}]
    assert seen[4:6] == [{1, 2, 3}, {1, 2, 3}]
    assert seen[6] == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="increasing"):
        GradualUnfreezing([5, 3])


def test_strategies_work_on_any_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    for strategy in (RandomMasking(0.3), ID3(20, total_steps=4), ChildTuningF(0.5, seed=1)):
        before = snapshot(model)
        opt = ChildOptimizer(model.named_parameters(), strategy, lr=1e-2, strict=True)
        for _ in range(4):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        assert count(changed(model, before)) > 0
        if isinstance(strategy, ID3):
            assert count(changed(model, before)) == 20


def test_random_masking_is_seeded_and_exact():
    model = nn.Linear(50, 40)

    def chosen(seed):
        s = RandomMasking(0.1, seed=seed, always=())
        ChildOptimizer(model.named_parameters(), s)
        return s.chosen

    a, b, c = chosen(1), chosen(1), chosen(2)
    assert size(a) == round(0.1 * (50 * 40 + 40))
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], c[n]) for n in a)


def test_config_round_trips():
    for strategy in (ChildTuningD(0.3, per_layer=True), ID3(100, total_steps=10, eps=1e-2),
                     RandomMasking(0.05, seed=3), GradualUnfreezing((1, 5)), ChildTuningF(0.2, seed=4), PaFi(0.01),
                     BitFit()):
        again = type(strategy)(**strategy.config())
        assert again.config() == strategy.config()


def test_top_k_is_exact_under_ties_and_per_layer():
    scores = {"a.0.w": torch.ones(10), "a.1.w": torch.ones(30)}
    assert count(top_k(scores, 7)) == 7  # a percentile cut would keep all 40 tied elements
    per_layer = top_fraction(scores, 0.5, per_layer=True)
    assert int(per_layer["a.0.w"].sum()) == 5 and int(per_layer["a.1.w"].sum()) == 15
    with pytest.raises(ValueError):
        top_k(scores, 41)


def test_parameter_types_from_names(tiny_bert):
    kinds = {n: parameter_type(n) for n, _ in tiny_bert.named_parameters()}
    assert kinds["bert.encoder.layer.0.attention.self.query.weight"] == "attention"
    assert kinds["bert.encoder.layer.0.attention.output.LayerNorm.weight"] == "layernorm"
    assert kinds["bert.encoder.layer.0.intermediate.dense.weight"] == "ffn"
    assert kinds["bert.encoder.layer.0.output.dense.weight"] == "ffn"
    assert kinds["bert.embeddings.word_embeddings.weight"] == "embedding"
    assert kinds["classifier.weight"] == "head"


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(st.sampled_from([-2.0, -0.0, 0.0, 0.5, 1.0, 3.0, float("inf")]), min_size=1, max_size=7),
                min_size=1, max_size=4), st.data())
def test_top_k_takes_the_largest_then_ties_by_position(values, data):
    """Exact count; every chosen score >= every unchosen one; at the threshold the first by position."""
    scores = {f"t{i}": torch.tensor(v) for i, v in enumerate(values)}
    flat = torch.cat(list(scores.values()))
    k = data.draw(st.integers(0, flat.numel()))
    chosen = torch.cat([m.reshape(-1) for m in top_k(scores, k).values()])
    assert int(chosen.sum()) == k
    if 0 < k < flat.numel():
        assert flat[chosen].min() >= flat[~chosen].max()
        rank = [(-x, math.copysign(1.0, x) < 0, i) for i, x in enumerate(flat.tolist())]  # +0.0 above -0.0
        assert chosen.nonzero().squeeze(1).tolist() == sorted(i for *_, i in sorted(rank)[:k])


def test_id3_per_tensor_candidates_choose_exactly_the_global_top_k(tiny_bert):
    """The selection that ranks only each tensor's top candidates equals one global top-k (the old way)."""
    import math

    from childtune.masks import top_k

    strategy = ID3(300, total_steps=4, exp=1.0)
    ChildOptimizer(tiny_bert.named_parameters(), strategy)
    g = torch.Generator().manual_seed(3)
    reference = {n: torch.zeros_like(m) for n, m in strategy.final_masks(0).items()}
    for step in range(4):
        for p in strategy.params.values():
            p.grad = torch.randn(p.shape, generator=g)
        scored = strategy.scored()
        grow = strategy.target(step) - sum(int(reference[n].sum()) for n in scored)
        importance = {n: (p.grad.abs() / (p.detach().abs() + strategy.eps) ** strategy.exp).masked_fill(
            reference[n], -math.inf) for n, p in scored.items()}
        for n, new in top_k(importance, grow).items():
            reference[n] |= new
        before = strategy.final_masks(step)
        got = strategy.masks(step)
        assert all(torch.equal(got[n], reference[n]) for n in reference), step
        # `joined` names exactly the elements this step added (what SparseChildAdamW appends to its state)
        for n in reference:
            added = (got[n] & ~before[n]).view(-1).nonzero().squeeze(1)
            assert torch.equal(strategy.joined[n].sort().values, added) if n in strategy.joined else not len(added)
    assert sum(int(m.sum()) for m in got.values()) == 300


def test_id3_candidates_in_blocks_are_the_tensors_top_k(monkeypatch, tiny_bert):
    """Scored block by block (a small block here), a tensor's candidates are its exact top-k by H."""
    from childtune.strategies import id3 as id3_module

    strategy = ID3(0.2, total_steps=3)
    strategy.bind(dict(tiny_bert.named_parameters()))
    name, param = next((n, p) for n, p in strategy.scored().items() if p.numel() > 50)
    grad = torch.randn(param.shape, generator=torch.Generator().manual_seed(0))
    strategy.growth(0)
    whole = strategy.candidates(name, grad, 9)
    monkeypatch.setattr(id3_module, "_BLOCK", 7)
    blocked = strategy.candidates(name, grad, 9)
    assert sorted(blocked[1].tolist()) == sorted(whole[1].tolist())
    score = grad.abs() / (param.detach().abs() + strategy.eps) ** strategy.exp
    assert sorted(blocked[1].tolist()) == sorted(torch.topk(score.reshape(-1), 9).indices.tolist())


@pytest.mark.parametrize("p", [0.01, 0.2, 0.6])
def test_pafi_chooses_exactly_the_budgets_smallest_magnitudes(tiny_bert, p):
    # the reference: every maskable element in model order, a stable sort by |w|, the first round(p * n); so
    # ties (the zero-initialised biases: p=0.01 cuts among them) go to the earlier tensor, then the earlier element
    maskable = {n: w.detach() for n, w in tiny_bert.named_parameters() if "classifier" not in n}
    flat = torch.cat([w.reshape(-1) for w in maskable.values()])
    k = round(p * len(flat))
    reference = torch.zeros(len(flat), dtype=torch.bool)
    reference[torch.sort(flat.abs(), stable=True).indices[:k]] = True
    strategy = PaFi(p)
    ChildOptimizer(tiny_bert.named_parameters(), strategy)
    got = strategy.final_masks(1)
    assert list(got) == list(maskable)  # the head is outside the budget, trained in full
    assert torch.equal(torch.cat([got[n].reshape(-1) for n in maskable]), reference)
    if p == 0.01:
        assert (flat == 0).sum() > k  # the cut fell among exact ties, which position broke


def test_bitfit_chooses_exactly_the_biases(tiny_bert):
    strategy = BitFit()
    ChildOptimizer(tiny_bert.named_parameters(), strategy)
    got = strategy.final_masks(1)
    names = [n for n, _ in tiny_bert.named_parameters() if "classifier" not in n]
    assert sorted(got) == sorted(names)
    biases = [n for n in names if n.endswith(".bias")]
    assert biases and all(bool(got[n].all()) for n in biases)
    assert all(not got[n].any() for n in names if n not in biases)
    assert sorted(strategy.untouched()) == sorted(set(names) - set(biases))  # no gradient for them in a strict run
    with pytest.raises(ValueError, match="no bias"):
        ChildOptimizer(nn.Linear(4, 3, bias=False).named_parameters(), BitFit())


@pytest.mark.parametrize("schedule", ["ramp", "authors"])
def test_id3_every_one_is_the_authors_per_step_schedule(schedule):
    """`every=1` (the default) keeps each step's count as before: the schedule's closed form at that step."""
    strategy = ID3(23, total_steps=7, schedule=schedule)
    strategy.size, strategy._available = 23, 1000  # (set by bind; the schedule needs nothing else)
    for step in range(12):
        want = (min(23, math.ceil(23 * (step + 1) / 7)) if schedule == "ramp" else
                (step + 1) * (23 // 7) + min(step + 1, 23 % 7))
        assert strategy.target(step) == want
        assert strategy.dense_gradients_at(step) == (want > (strategy.target(step - 1) if step else 0))


@pytest.mark.parametrize("schedule", ["ramp", "authors"])
def test_id3_every_k_grows_at_multiples_of_k_by_the_authors_rule_on_that_steps_gradient(tiny_bert, schedule):
    """With every=4 over 10 steps, elements join at steps 0, 4 and 8 only, each time the top of
    |g| / (|w| + eps)^exp over the unchosen from that step's gradient, as many as the every-step schedule
    adds over the window (steps 0-3, 4-7, 8-9), so the budget is reached exactly at the last step."""
    every, steps, budget = 4, 10, 301
    strategy = ID3(budget, total_steps=steps, every=every, schedule=schedule)
    per_step = ID3(budget, total_steps=steps, schedule=schedule)
    ChildOptimizer(tiny_bert.named_parameters(), strategy)
    per_step.bind(dict(tiny_bert.named_parameters()))
    g = torch.Generator().manual_seed(5)
    reference = {n: torch.zeros_like(m) for n, m in strategy.final_masks(0).items()}
    for step in range(steps):
        for p in strategy.params.values():
            p.grad = torch.randn(p.shape, generator=g)
        scored = strategy.scored()
        had = sum(int(reference[n].sum()) for n in scored)
        grow = per_step.target(min(step + every - 1, steps - 1)) - had if step % every == 0 else 0
        assert strategy.dense_gradients_at(step) == (grow > 0)
        if grow:
            importance = {n: (p.grad.abs() / (p.detach().abs() + strategy.eps) ** strategy.exp).masked_fill(
                reference[n], -math.inf) for n, p in scored.items()}
            for n, new in top_k(importance, grow).items():
                reference[n] |= new
        got = strategy.masks(step)
        assert all(torch.equal(got[n], reference[n]) for n in reference), step
        assert sum(int(m.sum()) for n, m in got.items() if n in scored) == (
            per_step.target(step) if (step + 1) % every == 0 or step == steps - 1 else had + grow)
    assert sum(int(m.sum()) for n, m in got.items() if n in scored) == budget
