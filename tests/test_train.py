"""The training loop, its config and its run folders, on a tiny random BERT and a learnable synthetic task."""

from __future__ import annotations

import csv
import json
import math
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import tiny_bert_config
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertForSequenceClassification,
    BertTokenizerFast,
)

from childtune.data.batching import make_collate
from childtune.data.userfiles import load_files
from childtune.delta import SparseDelta
from childtune.optim.masked import ChildOptimizer
from childtune.outputs import OutputError
from childtune.strategies import (
    ID3,
    BitFit,
    ChildTuningD,
    ChildTuningF,
    DropRegrow,
    FullFineTuning,
    GradualUnfreezing,
    PaFi,
    RandomMasking,
)
from childtune.training.config import ConfigError, TrainConfig, build_strategy
from childtune.training.evaluate import evaluate
from childtune.training.export import apply_delta, export_delta
from childtune.training.loop import Callback, TrainError, TrainState, train, train_step
from childtune.training.methods import METHODS
from childtune.training.runfolder import RunFolder

WORDS = [f"w{i}" for i in range(40)]
LABELS = ("neg", "pos")


def write_tiny_task(root: Path, n_train: int = 192, n_dev: int = 96, n_test: int = 64) -> Path:
    """A tiny random BERT with its tokenizer, and CSVs whose label is which of 'good'/'bad' a text holds.

    The cue is one token anywhere in the text, so the model must attend to it: learnable in seconds,
    but only by training (a random model sits at chance).
    """
    root.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "good", "bad"]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, model_max_length=32).save_pretrained(root)
    torch.manual_seed(0)
    BertForSequenceClassification(tiny_bert_config()).save_pretrained(root)
    rng = random.Random(0)
    for split, n in (("train", n_train), ("dev", n_dev), ("test", n_test)):
        with open(root / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            for i in range(n):
                y = i % 2
                words = [rng.choice(WORDS) for _ in range(rng.randint(3, 8))]
                words.insert(rng.randrange(len(words) + 1), "good" if y else "bad")
                writer.writerow([" ".join(words), LABELS[y]])
    return root


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory) -> Path:
    return write_tiny_task(tmp_path_factory.mktemp("tiny"))


def tiny_config(root: Path, **kw) -> TrainConfig:
    base = dict(task=None, train_file=str(root / "train.csv"), dev_file=str(root / "dev.csv"),
                test_file=str(root / "test.csv"), model=str(root), lr=3e-3, epochs=8, batch_size=16,
                progress=False, warmup=0.1)
    return TrainConfig(**{**base, **kw})


# ------------------------------------------------------------------------------------------- config


def test_config_round_trips_through_json(tmp_path):
    config = TrainConfig(task="subj", method="id3", lr=5e-4, strict=False, metric_extra=("mcc",), train_size=500,
                         max_grad_norm=None, id3_budget=0.02, seed=7)
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    config.save_json(tmp_path / "c.json")
    assert TrainConfig.load_json(tmp_path / "c.json") == config


def test_config_rejects_unknown_and_mistyped_keys():
    with pytest.raises(ConfigError, match="'learning_rate'"):
        TrainConfig.from_dict({"task": "mr", "learning_rate": 1e-4})
    with pytest.raises(ConfigError, match="'epochs'"):
        TrainConfig.from_dict({"epochs": "3"})
    with pytest.raises(ConfigError, match="'strict'"):
        TrainConfig.from_dict({"strict": 1})
    assert TrainConfig.from_dict({"lr": 1}).lr == 1.0  # an int is a fine float


def test_resolved_fills_each_methods_defaults_and_checks_values():
    d = TrainConfig(method="child-d").resolved()
    assert (d.lr, d.strict, d.reserve_p) == (METHODS["child-d"].lr, True, 0.3)
    f = TrainConfig(method="child-f", lr=2e-5, reserve_p=0.2).resolved()
    assert (f.lr, f.strict, f.reserve_p) == (2e-5, False, 0.2)
    assert TrainConfig(method="random").resolved().lr > TrainConfig(method="full").resolved().lr
    with pytest.raises(ConfigError, match="unknown method 'child-x'"):
        TrainConfig(method="child-x").resolved()
    with pytest.raises(ConfigError, match="reserve_p"):
        TrainConfig(method="child-d", reserve_p=1.5).resolved()
    with pytest.raises(ConfigError, match="--train and --dev"):
        TrainConfig(task=None, train_file="a.csv").resolved()


def test_build_strategy_maps_every_method(tiny_bert):
    names = [n for n, _ in tiny_bert.named_parameters()]
    expected = {"full": FullFineTuning, "child-f": ChildTuningF, "child-d": ChildTuningD,
                "child-d-random": ChildTuningD, "random": RandomMasking, "id3": ID3, "gradual": GradualUnfreezing,
                "lora": FullFineTuning, "id3-lora": ID3, "pafi": PaFi, "bitfit": BitFit, "child-dyn": DropRegrow}
    assert set(expected) == set(METHODS)
    for method, kind in expected.items():
        strategy = build_strategy(TrainConfig(method=method, seed=3).resolved(), 40, names)
        assert type(strategy) is kind, method
    assert build_strategy(TrainConfig(method="id3").resolved(), 40, names).total_steps == 40
    # 4 blocks (embeddings, 2 layers, pooler+head): every block unfrozen by mid-training
    gradual = build_strategy(TrainConfig(method="gradual").resolved(), 60, names)
    assert gradual.schedule == 10
    assert build_strategy(TrainConfig(method="child-f", seed=5).resolved(), 1, names).seed == 5
    control = build_strategy(TrainConfig(method="child-d-random", seed=4).resolved(), 1, names)
    assert control.random_within and control.seed == 4 and control.rest == "freeze"


# ------------------------------------------------------------------------------------------ training


def test_full_run_learns_and_writes_its_files(tiny_task, tmp_path):
    out = tmp_path / "run"
    metrics = train(tiny_config(tiny_task, method="full", output=str(out), metric_extra=("mcc",)))
    assert metrics["dev"]["accuracy"] >= 0.85, metrics["dev"]  # chance is 0.5
    assert metrics["test"]["accuracy"] >= 0.85
    assert set(metrics["dev"]) == {"accuracy", "macro_f1", "f1", "mcc"}
    assert sorted(p.name for p in out.iterdir()) == ["childtune-manifest.json", "config.json", "metrics.json",
                                                  "metrics.jsonl", "model"]
    assert not list(tmp_path.glob(".*"))  # no partial folder left behind
    assert json.loads((out / "metrics.json").read_text()) == metrics
    saved = TrainConfig.load_json(out / "config.json")
    assert saved == tiny_config(tiny_task, method="full", output=str(out), metric_extra=("mcc",)).resolved()
    assert (saved.strict, saved.reserve_p, saved.rest, saved.preset) == (False, None, "freeze", "childtune")
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == list(range(10, metrics["steps"] + 1, 10))
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert [r["eval"] for r in log if "eval" in r] == ["dev", "test"]
    assert metrics["steps"] == 8 * math.ceil(192 / 16)
    assert metrics["total_params"] == metrics["trainable_params"] == metrics["child_params"]
    assert metrics["torch_threads"] == torch.get_num_threads()  # what its times were measured with
    # everything moves except what no example reaches: the second token-type embedding row (16 weights)
    assert metrics["changed_params"] == metrics["total_params"] - 16
    reloaded = AutoModelForSequenceClassification.from_pretrained(out / "model")
    assert reloaded.config.id2label == {0: "neg", 1: "pos"}


def test_metrics_give_the_peak_memory_of_each_phase(tiny_task, tmp_path):
    out = tmp_path / "run"
    metrics = train(tiny_config(tiny_task, method="child-d", epochs=1, output=str(out)))
    phases = metrics["peak_rss_mib_by_phase"]
    assert list(phases) == ["data", "model", "base_copy", "setup", "prepare", "train", "evaluate", "count", "save"]
    assert all(0 < peak <= metrics["peak_rss_mib"] for peak in phases.values())
    assert metrics["peak_rss_mib"] == max(phases.values())
    assert json.loads((out / "metrics.json").read_text())["peak_rss_mib_by_phase"] == phases


@pytest.mark.parametrize("method", ["child-d", "random", "id3", "gradual", "pafi", "bitfit", "child-dyn"])
def test_strict_methods_change_only_their_child_network(tiny_task, tmp_path, method):
    out = tmp_path / method
    config = tiny_config(tiny_task, method=method, epochs=2, output=str(out), gradual_every=10,  # 24 steps:
                         dyn_every=5, lr=3e-3 if method in ("child-d", "gradual") else 3e-2)  # embeddings stay frozen
    metrics = train(config)
    assert metrics["changed_outside_child"] == 0
    assert 0 < metrics["changed_params"] <= metrics["child_params"] < metrics["total_params"]
    delta = SparseDelta.load(out / "delta")
    head = sum(v.numel() for v in delta.dense.values())
    assert delta.config.num_changed + head == metrics["changed_params"]
    base = BertForSequenceClassification.from_pretrained(tiny_task)
    in_layer = {n: p.numel() for n, p in base.named_parameters() if ".layer." in n}
    if method == "child-d":  # the top 30% of the blocks' weights, nothing outside them
        assert set(delta.entries) <= set(in_layer)
        assert delta.config.num_changed <= round(0.3 * sum(in_layer.values()))
    if method == "gradual":  # head, pooler and the top two blocks unfrozen in turn; embeddings never
        assert not any("embeddings" in n for n in delta.entries)
        assert any("layer.0." in n for n in delta.entries)
    if method == "bitfit":  # biases only
        assert delta.entries and all(n.endswith(".bias") for n in delta.entries)
    if method == "pafi":  # exactly its p of the maskable weights, at most
        assert delta.config.num_changed <= round(0.005 * sum(
            p.numel() for n, p in base.named_parameters() if "classifier" not in n))
    if method == "child-dyn":  # 3 reselections moved it: more elements changed than its size, all in its union
        size = round(0.01 * sum(p.numel() for n, p in base.named_parameters() if "classifier" not in n))
        assert size < delta.config.num_changed <= metrics["child_params"]
    if method == "id3":
        assert delta.config.num_changed <= round(config.id3_budget * sum(
            p.numel() for n, p in base.named_parameters() if "classifier" not in n))


def test_applying_a_runs_delta_to_the_base_reproduces_its_scores(tiny_task, tmp_path):
    run = tmp_path / "run"
    config = tiny_config(tiny_task, method="child-d", reserve_p=0.5, output=str(run))
    metrics = train(config)
    apply_delta(run, tmp_path / "merged")
    task = load_files(config.train_file, config.dev_file, config.test_file)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    collate = make_collate(AutoTokenizer.from_pretrained(tmp_path / "merged"), config.max_length)
    assert evaluate(model, task.dev, task.spec, collate, config, "dev") == metrics["dev"]
    assert json.loads((tmp_path / "merged" / "childtune.json").read_text())["method"] == "child-d"


def test_export_of_a_full_run_is_an_exact_dense_delta(tiny_task, tmp_path):
    run = tmp_path / "run"
    metrics = train(tiny_config(tiny_task, method="full", epochs=1, output=str(run)))
    delta = export_delta(run, tmp_path / "delta")
    head = sum(v.numel() for v in delta.dense.values())
    assert delta.config.num_changed + head == metrics["changed_params"]
    tuned = AutoModelForSequenceClassification.from_pretrained(run / "model")
    base = AutoModelForSequenceClassification.from_pretrained(tiny_task)
    SparseDelta.load(tmp_path / "delta").apply(base)
    for (name, a), b in zip(base.state_dict().items(), tuned.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_lora_trains_adapters_and_saves_a_merged_model(tiny_task, tmp_path):
    out = tmp_path / "lora"
    metrics = train(tiny_config(tiny_task, method="lora", epochs=2, lr=1e-2, output=str(out)))
    assert metrics["trainable_params"] < metrics["total_params"] / 2
    assert metrics["changed_params"] > 0
    merged = AutoModelForSequenceClassification.from_pretrained(out / "model")
    assert not any("lora" in n for n, _ in merged.named_parameters())


# ---------------------------------------------------------------------------------- failure handling


def _state(model, nonfinite: str) -> TrainState:
    named = list(model.named_parameters())
    opt = ChildOptimizer(named, FullFineTuning(), torch.optim.AdamW, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    config = TrainConfig(nonfinite=nonfinite, max_grad_norm=1.0)
    return TrainState(model, opt, sched, opt.strategy, config, None)


@pytest.mark.parametrize("where", ["loss", "gradient"])
@pytest.mark.parametrize("nonfinite", ["stop", "skip"])
def test_non_finite_loss_or_gradient_never_reaches_the_weights(tiny_bert, where, nonfinite):
    if where == "loss":
        tiny_bert.classifier.register_forward_hook(lambda m, i, o: o * float("nan"))
    else:
        tiny_bert.bert.encoder.layer[0].output.dense.weight.register_hook(lambda g: g * float("inf"))
    state = _state(tiny_bert, nonfinite)
    before = {n: p.detach().clone() for n, p in tiny_bert.named_parameters()}
    batch = {"input_ids": torch.randint(5, 60, (4, 7)), "labels": torch.tensor([0, 1, 0, 1])}
    if nonfinite == "stop":
        with pytest.raises(TrainError, match=f"non-finite {where}"):
            train_step(state, batch)
    else:
        assert train_step(state, batch) is None
        assert state.skipped == 1
    assert state.step == 0 and state.optimizer.steps == 0
    for name, p in tiny_bert.named_parameters():
        assert torch.equal(p, before[name]), name
        assert p.grad is None


def test_a_failed_run_leaves_no_folder(tiny_task, tmp_path):
    class Boom(Callback):
        def on_step(self, state):
            if state.step == 3:
                raise RuntimeError("boom")

    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="boom"):
        train(tiny_config(tiny_task, method="full", epochs=1, output=str(out)), callbacks=[Boom()])
    assert list(tmp_path.iterdir()) == []


def test_run_folder_refuses_existing_results_unless_overwrite(tmp_path):
    out = tmp_path / "run"
    with RunFolder(out) as work:
        (work / "metrics.json").write_text("{}")
    with pytest.raises(OutputError, match="already holds a run; pass --overwrite"):
        RunFolder(out)
    with RunFolder(out, overwrite=True) as work:
        (work / "metrics.json").write_text('{"new": 1}')
    assert json.loads((out / "metrics.json").read_text()) == {"new": 1}
    with pytest.raises(ValueError, match="x"), RunFolder(out, overwrite=True) as work:
        (work / "metrics.json").write_text("half")
        raise ValueError("x")
    assert json.loads((out / "metrics.json").read_text()) == {"new": 1}  # the old run survives a failure
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    with pytest.raises(OutputError, match="refusing to replace"):
        RunFolder(mine, overwrite=True)
    assert (mine / "notes.txt").read_text() == "precious"


def test_a_fresh_run_does_not_wipe_an_interrupted_runs_checkpoint(tmp_path):
    out = tmp_path / "long"
    (tmp_path / ".long.partial" / "checkpoint.old").mkdir(parents=True)  # killed while replacing it
    (tmp_path / ".long.partial" / "checkpoint.old" / "meta.json").write_text("{}")
    with pytest.raises(OutputError, match=r"left a checkpoint .*childtune train --resume .*long"):
        RunFolder(out)
    assert (tmp_path / ".long.partial" / "checkpoint.old" / "meta.json").is_file()
    with RunFolder(out, resume=True) as work:
        assert (work / "checkpoint.old").is_dir()
    (tmp_path / ".other.partial" / "checkpoint").mkdir(parents=True)
    (tmp_path / ".other.partial" / "checkpoint" / "meta.json").write_text("{}")
    with RunFolder(tmp_path / "other", overwrite=True) as work:  # starting over is the user's explicit call
        assert not (work / "checkpoint").exists()


def test_refuses_existing_output_before_doing_any_work(tiny_task, tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    monkeypatch.setattr("childtune.training.loop.load_data", lambda c: pytest.fail("loaded data for a refused run"))
    with pytest.raises(OutputError):
        train(tiny_config(tiny_task, output=str(out)))


@pytest.mark.parametrize("strict", [True, False])
def test_strict_fixed_child_network_skips_gradients_of_wholly_frozen_weights(tiny_task, strict):
    seen = {}

    class Look(Callback):
        def on_step(self, state):
            embeddings = state.model.bert.embeddings.word_embeddings.weight
            seen.setdefault("requires_grad", embeddings.requires_grad)
            seen.setdefault("moments", embeddings in state.optimizer.state)

    metrics = train(tiny_config(tiny_task, method="child-d", epochs=1, strict=strict), callbacks=[Look()])
    assert seen == {"requires_grad": not strict, "moments": not strict}
    if strict:
        assert metrics["changed_outside_child"] == 0


def test_position_limit_reserves_roberta_padding_slots(tiny_bert):
    from transformers import RobertaConfig, RobertaForSequenceClassification

    from childtune.training.models import position_limit

    roberta = RobertaForSequenceClassification(RobertaConfig(
        vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
        max_position_embeddings=514))
    assert position_limit(roberta) == 512
    assert position_limit(tiny_bert) == tiny_bert.config.max_position_embeddings


def _final_params(config: TrainConfig) -> dict[str, torch.Tensor]:
    captured = {}

    class Keep(Callback):
        def on_end(self, state, metrics):
            captured.update({n: p.detach().clone() for n, p in state.model.named_parameters()})

    train(config, [Keep()])
    return captured


@pytest.mark.parametrize("method", ["full", "child-d"])
def test_gradient_accumulation_is_the_same_update(tiny_task, method):
    """N micro-batches, each loss weighted by its share, give the whole batch's gradient: the same run."""
    base = tiny_config(tiny_task, method=method, epochs=1, train_size=40, batch_size=16)  # last batch: 8
    whole = _final_params(base)
    for n in (2, 3):
        accumulated = _final_params(replace(base, grad_accum=n))
        for name, tensor in whole.items():
            torch.testing.assert_close(accumulated[name], tensor, rtol=1e-4, atol=1e-6, msg=f"grad_accum={n}: {name}")


def test_gradient_checkpointing_and_bf16_autocast_train(tiny_task):
    base = tiny_config(tiny_task, method="full", epochs=1, train_size=32)
    plain = _final_params(base)
    checkpointed = _final_params(replace(base, gradient_checkpointing=True))
    for name, tensor in plain.items():  # recomputing activations changes nothing but memory and time
        torch.testing.assert_close(checkpointed[name], tensor, rtol=1e-5, atol=1e-7, msg=name)
    metrics = train(replace(tiny_config(tiny_task, method="full"), bf16=True))
    assert metrics["dev"]["accuracy"] >= 0.85  # bf16 autocast still learns the task (chance is 0.5)


def test_a_run_with_the_optimizer_step_in_backward_equals_the_ordinary_run(tiny_task):
    base = tiny_config(tiny_task, method="child-d", epochs=1, train_size=48, max_grad_norm=None)
    ordinary = _final_params(base)
    hooked = _final_params(replace(base, optimizer_in_backward=True))
    for name, tensor in ordinary.items():
        torch.testing.assert_close(hooked[name], tensor, rtol=0, atol=1e-6, msg=name)
    assert replace(base, optimizer_in_backward=True).resolved().max_grad_norm is None
    id3 = replace(base, method="id3", id3_budget=0.01)
    ordinary, hooked = _final_params(id3), _final_params(replace(id3, optimizer_in_backward=True))
    for name, tensor in ordinary.items():  # ID3's child network grows the same in backward
        torch.testing.assert_close(hooked[name], tensor, rtol=0, atol=1e-6, msg=name)
    f = replace(base, method="child-f")  # per-step masks: torch's AdamW stepped per parameter in its hook
    ordinary, hooked = _final_params(f), _final_params(replace(f, optimizer_in_backward=True))
    for name, tensor in ordinary.items():
        torch.testing.assert_close(hooked[name], tensor, rtol=0, atol=1e-6, msg=name)
    accumulated = replace(base, grad_accum=3)  # child gradients buffered by the hooks until the last micro-batch
    ordinary, hooked = _final_params(accumulated), _final_params(replace(accumulated, optimizer_in_backward=True))
    for name, tensor in ordinary.items():
        torch.testing.assert_close(hooked[name], tensor, rtol=0, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="cannot accumulate gradients"):
        train(replace(id3, grad_accum=2, optimizer_in_backward=True))


def test_a_bf16_run_keeps_fp32_masters_and_learns(tiny_task):
    metrics = train(tiny_config(tiny_task, method="child-d", dtype="bf16", reserve_p=0.5))
    assert metrics["dev"]["accuracy"] >= 0.85, metrics["dev"]
    assert metrics["changed_outside_child"] == 0
    with pytest.raises(ValueError, match="--dtype bf16 keeps fp32 masters"):
        train(tiny_config(tiny_task, method="child-f", dtype="bf16"))
