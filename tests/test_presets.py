"""The `authors` preset against references written here from the authors' published algorithms.

Each reference follows the authors' code as read (commits cited in the strategy modules): Child-Tuning_D's
Fisher in train mode with each tensor's gradient clipped before squaring (AliceMind `ChildTuningD.py`),
ID3 as torch AdamW stepping on masked gradients with the toolkit's schedule, and random masking on the
q/v projection weights only (the Random-Masking repository).
"""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from childtune import ID3, ChildOptimizer, ChildTuningD, RandomMasking
from childtune.cli import main
from childtune.layers import in_layer
from childtune.masks import MASKS_FILE
from childtune.strategies import BitFit, PaFi
from childtune.study.analysis import load_masks
from childtune.training.config import TrainConfig, build_strategy

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_resume import write_task, write_tiny_model


def tiny(dropout: float = 0.0, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=2, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout))


def batches(n: int = 4, size: int = 6, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 64, (size, 10), generator=g),
             "attention_mask": torch.ones(size, 10, dtype=torch.long),
             "labels": torch.randint(0, 2, (size,), generator=g)} for _ in range(n)]


CLIP = 1e-3


def test_authors_fisher_is_train_mode_with_each_tensor_clipped_before_squaring():
    model, data = tiny(dropout=0.1), batches()
    scored = [n for n, _ in model.named_parameters() if in_layer(n)]
    # the reference, as calculate_fisher does it: train mode, backward of the model's loss per batch, each
    # scored tensor's gradient clipped on its own (the authors' max_grad_norm is 1.0; a tiny model's
    # gradients are smaller, so a smaller norm makes the clip bite here), squared, averaged over batches
    reference = copy.deepcopy(model)
    params = dict(reference.named_parameters())
    sums = {n: torch.zeros_like(params[n]) for n in scored}
    clipped = 0
    torch.manual_seed(123)
    reference.train()
    for batch in data:
        reference.zero_grad()
        reference(**batch).loss.backward()
        for n in scored:
            clipped += float(torch.nn.utils.clip_grad_norm_(params[n], CLIP)) > CLIP
            sums[n] += params[n].grad ** 2 / len(data)

    strategy = ChildTuningD.authors(0.3)
    ChildOptimizer(model.named_parameters(), strategy)
    torch.manual_seed(123)  # the same dropout masks, drawn in the same order
    from childtune.fisher import fisher_information

    got = fisher_information(model, data, scored=scored, train_mode=True, clip=CLIP, progress=False)
    for n in scored:
        torch.testing.assert_close(got[n], sums[n], rtol=1e-5, atol=1e-12)
    assert clipped  # some tensor's gradient was above the norm, so the clip did something
    # train mode and clipping both change the scores (so they can change the ranking)
    plain = fisher_information(model, data, scored=scored, progress=False)
    assert any(not torch.allclose(plain[n], got[n]) for n in scored)
    model.eval()
    fisher_information(model, data, scored=scored, train_mode=True, progress=False)
    assert not model.training  # the model's own mode is restored


def test_authors_id3_is_torch_adamw_on_masked_gradients_step_by_step():
    budget, steps, lr = 53, 4, 1e-2
    model, data = tiny(), batches(n=steps)
    reference = copy.deepcopy(model)
    strategy = ID3.authors(budget, steps)
    opt = ChildOptimizer(model.named_parameters(), strategy, torch.optim.AdamW, lr=lr)  # non-strict, wd 0.01

    ref_params = dict(reference.named_parameters())
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=lr)  # torch's defaults, as the toolkit's example
    chosen = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in ref_params.items()}
    base, rem = divmod(budget, steps)
    for step, batch in enumerate(data):
        for net, optimizer in ((model, opt), (reference, ref_opt)):
            optimizer.zero_grad()
            net(**batch).loss.backward()
        # reference: |g| / (eps + |w|)^0 over not-yet-chosen elements (the head included), top-k join
        k = base + (1 if step < rem else 0)
        names = list(ref_params)
        scores = torch.cat([torch.where(chosen[n], -math.inf, ref_params[n].grad.abs()).reshape(-1) for n in names])
        picked = torch.zeros_like(scores, dtype=torch.bool)
        picked[torch.topk(scores, k).indices] = True
        offset = 0
        for n in names:
            size = ref_params[n].numel()
            chosen[n] |= picked[offset: offset + size].view_as(chosen[n])
            ref_params[n].grad[~chosen[n]] = 0.0
            offset += size
        ref_opt.step()
        opt.step()
        for n, p in model.named_parameters():
            torch.testing.assert_close(p, ref_params[n], rtol=0, atol=1e-6, msg=f"step {step}: {n}")
    assert sum(len(i) for i in strategy.chosen.values()) == budget
    assert any("classifier" in n for n in strategy.chosen)  # the head is inside the budget, competing
    # weight decay moved weights outside the child network too, as in the authors' code
    masks = strategy.final_masks(steps)
    changed_outside = sum(int(((p != q) & ~masks[n]).sum())
                          for (n, p), q in zip(model.named_parameters(), tiny().parameters(), strict=True))
    assert changed_outside > 0


def test_authors_id3_schedule_is_budget_over_steps_and_uncapped():
    model = tiny()
    authors = ID3.authors(10, 4)
    ChildOptimizer(model.named_parameters(), authors)
    assert [authors.target(t) for t in range(6)] == [3, 6, 8, 10, 12, 14]  # 2 per step, +1 in the first 2
    ours = ID3(10, 4)
    ChildOptimizer(tiny().named_parameters(), ours)
    assert [ours.target(t) for t in range(6)] == [3, 5, 8, 10, 10, 10]  # capped at the budget


def test_authors_random_masking_touches_only_query_and_value_weights():
    model = tiny()
    strategy = RandomMasking.authors(0.01, seed=2)
    ChildOptimizer(model.named_parameters(), strategy)
    qv = [n for n in strategy.chosen if n.endswith(("query.weight", "value.weight"))]
    assert len(qv) == 4
    for name, index in strategy.chosen.items():
        if name not in qv:
            assert not len(index), name  # everything else frozen (the head is trained in full, unmasked)
    assert not any("classifier" in n for n in strategy.chosen)
    total = sum(p.numel() for p in model.parameters())
    n_qv = sum(strategy.params[n].numel() for n in qv)
    expected = 0.01 * total  # a share of the whole model, spread over the q/v weights
    kept = sum(len(strategy.chosen[n]) for n in qv)
    sd = math.sqrt(n_qv * (expected / n_qv) * (1 - expected / n_qv))
    assert abs(kept - expected) < 5 * sd  # a Bernoulli draw per element, not an exact count


def test_presets_resolve_and_build_what_they_say():
    names = [n for n, _ in tiny().named_parameters()]
    d = TrainConfig(method="child-d", preset="authors").resolved()
    assert (d.lr, d.strict, d.rest, d.fisher_train_mode, d.fisher_clip, d.optimizer, d.weight_decay) == (
        4e-5, False, "train", True, 1.0, "authors", 0.01)
    strategy = build_strategy(d, 10, names)
    assert (strategy.train_mode, strategy.clip, strategy.rest) == (True, 1.0, "train")
    ours = TrainConfig(method="child-d").resolved()
    assert (ours.lr, ours.strict, ours.rest, ours.fisher_train_mode, ours.fisher_clip, ours.optimizer) == (
        2e-4, True, "freeze", False, 0.0, "torch")
    i = TrainConfig(method="id3", preset="authors").resolved()
    assert (i.lr, i.strict, i.id3_exp, i.id3_head, i.id3_schedule, i.bias_correction) == (
        1e-4, False, 0.0, "inside", "authors", "tensor")
    r = TrainConfig(method="random", preset="authors").resolved()
    assert (r.weight_decay, r.random_targets, r.random_sampling, r.random_budget) == (0.0, "qv", "bernoulli", "model")
    assert TrainConfig(method="full", preset="authors").resolved() == replace_preset(
        TrainConfig(method="full").resolved(), "authors")  # no reference code: the presets agree
    mine = TrainConfig(method="child-d", preset="authors", lr=1e-3).resolved()
    assert mine.lr == 1e-3 and mine.fisher_clip == 1.0  # a value given wins over the preset


def replace_preset(config: TrainConfig, preset: str) -> TrainConfig:
    from dataclasses import replace

    return replace(config, preset=preset)


def test_an_authors_run_keeps_its_child_network_and_records_its_preset(tmp_path, capsys):
    train_file, dev_file = write_task(tmp_path)
    model = write_tiny_model(tmp_path / "model", dropout=0.1)
    out = tmp_path / "run"
    assert main(["train", "--model", str(model), "--train", str(train_file), "--dev", str(dev_file), "--epochs", "1",
                 "--batch-size", "4", "--method", "child-d", "--preset", "authors", "--no-progress",
                 "--checkpoint-every", "0", "--output", str(out)]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert (saved["preset"], saved["strict"], saved["optimizer"], saved["fisher_clip"]) == ("authors", False,
                                                                                           "authors", 1.0)
    assert (out / "model").is_dir() and (out / MASKS_FILE).is_file()  # non-strict: whole model, and its masks
    masks = load_masks(out)
    assert masks and all(in_layer(n) for n in masks)  # rest="train": only the scored blocks carry masks
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["changed_outside_child"] > 0  # non-strict: the authors' weight decay moves every weight
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    shown = capsys.readouterr().out
    assert "authors:" in shown and "childtune:" in shown and "4e-05" in shown


def test_pafi_and_bitfit_presets_resolve():
    names = [n for n, _ in tiny().named_parameters()]
    for preset, lr, decay in (("childtune", 5e-3, 0.01), ("authors", 1e-4, 0.0)):  # the toolkit forces decay 0
        c = TrainConfig(method="pafi", preset=preset).resolved()
        assert (c.lr, c.reserve_p, c.strict, c.weight_decay) == (lr, 0.005, True, decay)
        assert isinstance(build_strategy(c, 10, names), PaFi)
    for preset in ("childtune", "authors"):  # no evidence of ours: the toolkit's settings under both
        b = TrainConfig(method="bitfit", preset=preset).resolved()
        assert (b.lr, b.strict, b.weight_decay) == (1e-4, True, 0.0)
        assert isinstance(build_strategy(b, 10, names), BitFit)


@pytest.mark.parametrize(("method", "preset"), [("pafi", "childtune"), ("bitfit", "authors")])
def test_pafi_and_bitfit_train_strict_and_their_delta_applies_back_bit_for_bit(tmp_path, monkeypatch, capsys,
                                                                              method, preset):
    import childtune.training.params as params
    from childtune.optim.sparse import SparseChildAdamW

    built: list[SparseChildAdamW] = []

    class Spy(SparseChildAdamW):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            built.append(self)

    monkeypatch.setattr(params, "SparseChildAdamW", Spy)
    train_file, dev_file = write_task(tmp_path)
    model = write_tiny_model(tmp_path / "model", dropout=0.0)
    run = tmp_path / "run"
    # the whole model kept too (--save model), so the exported delta has something to be checked against
    assert main(["train", "--model", str(model), "--train", str(train_file), "--dev", str(dev_file), "--epochs", "1",
                 "--batch-size", "4", "--method", method, "--preset", preset, "--lr", "1e-2", "--save", "model",
                 "--no-progress", "--checkpoint-every", "0", "--output", str(run)]) == 0
    assert [type(o.strategy) for o in built] == [{"pafi": PaFi, "bitfit": BitFit}[method]]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["changed_outside_child"] == 0 and metrics["changed_params"] > 0
    masks = load_masks(run)
    if method == "bitfit":
        assert all(bool(m.all()) == n.endswith(".bias") for n, m in masks.items())
    assert main(["export", str(run), "--output", str(tmp_path / "delta")]) == 0
    assert main(["apply", str(tmp_path / "delta"), "--output", str(tmp_path / "applied")]) == 0
    from safetensors.torch import load_file

    tuned, applied = (load_file(d / "model.safetensors") for d in (run / "model", tmp_path / "applied"))
    assert tuned.keys() == applied.keys()
    assert all(torch.equal(tuned[k].view(torch.uint8), applied[k].view(torch.uint8)) for k in tuned)
    assert main(["analyze", f"{method}={run}", "--output", str(tmp_path / "analysis")]) == 0
    assert list((tmp_path / "analysis").glob("*.png"))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert f"{method} " in shown and "pafi, bitfit" in shown
