"""A causal LM's run settings: the cheapest exact setting by default for selective methods (bf16 weights
with fp32 child masters, the step in backward, child-only gradients), encoders and full/LoRA runs as
before, every opt-out honoured, one notice line; child-only gradients change no trained weight; LoRA
trains fp32 adapters over a bf16 base."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from torch import nn

from childtune.cli import main
from childtune.optim import SparseChildAdamW
from childtune.strategies import RandomMasking
from childtune.training.config import ConfigError, TrainConfig, build_strategy, causal_lm_notice
from childtune.training.methods import METHODS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_causal import write_generation_task
from test_families import write_tiny_llama

LEAN = ("bf16", True, True)
DENSE = ("fp32", False, False)
CHILD_D = ("fp32", False, True)  # child-d keeps fp32 and the step after backward (its clipping): _CAUSAL_CHILD_D


def run_settings(processes: int = 1, **given) -> tuple[str | None, bool | None, bool | None]:
    done = TrainConfig(**{"model": "x", **given}).resolved(processes=processes)
    return done.dtype, done.optimizer_in_backward, done.child_only_grads


@pytest.mark.parametrize(("method", "task", "want"), [
    ("child-d", "math", CHILD_D), ("child-d-random", "math", CHILD_D), ("random", "math", LEAN),
    ("pafi", "math", LEAN), ("child-dyn", "math", LEAN),
    ("id3", "math", ("bf16", True, False)), ("gradual", "math", ("bf16", True, False)),
    ("full", "math", DENSE), ("lora", "math", DENSE), ("child-f", "math", DENSE), ("id3-lora", "math", DENSE),
    ("child-d", "mr", DENSE), ("random", "snli", DENSE), ("id3", "mr", DENSE),
])
def test_run_settings_resolve_by_task_kind_and_method(method, task, want):
    assert run_settings(method=method, task=task) == want


def test_child_d_on_a_causal_lm_has_its_own_p_and_keeps_clipping(tmp_path):
    done = TrainConfig(model="x", task="math", method="child-d").resolved()
    assert (done.reserve_p, done.max_grad_norm, done.optimizer_in_backward) == (0.05, 1.0, False)
    assert TrainConfig(model="x", task="mr", method="child-d").resolved().reserve_p == 0.3
    assert TrainConfig(model="x", task="math", method="child-d", reserve_p=0.2).resolved().reserve_p == 0.2
    authors = TrainConfig(model="x", task="math", method="child-d", preset="authors").resolved()
    assert (authors.reserve_p, authors.strict, authors.dtype) == (0.3, False, "fp32")  # theirs: non-strict


def test_your_files_are_a_causal_lm_run_when_they_are_generation(tmp_path):
    train, dev = write_generation_task(tmp_path, n_train=4, n_dev=2)
    files = {"task": None, "train_file": str(train), "dev_file": str(dev), "method": "child-d"}
    assert run_settings(**files) == CHILD_D  # prompt and target columns: generation, as load_files reads them
    assert run_settings(**files, kind="classification") == DENSE
    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n')
    assert run_settings(task=None, train_file=str(labelled), dev_file=str(labelled), method="child-d") == DENSE


def test_each_setting_can_be_opted_out_of_alone():
    assert run_settings(task="math", method="random", dtype="fp32") == ("fp32", True, True)
    assert run_settings(task="math", method="random", optimizer_in_backward=False) == ("bf16", False, True)
    assert run_settings(task="math", method="random", child_only_grads=False) == ("bf16", True, False)
    assert TrainConfig(model="x", task="math", method="random", optimizer_in_backward=False).resolved(
    ).max_grad_norm == 1.0  # clipping stays with the step after backward
    assert run_settings(task="math", method="child-d", optimizer_in_backward=True, dtype="bf16") == LEAN  # opt in
    assert run_settings(task="mr", method="child-d", child_only_grads=True) == ("fp32", False, True)  # opt in


def test_what_a_run_cannot_use_is_left_off_or_refused():
    assert run_settings(task="math", method="random", processes=2) == ("bf16", False, False)  # DDP
    assert run_settings(task="math", method="random", processes=2, fsdp=True) == LEAN  # FSDP2 averages the vectors
    assert run_settings(task="math", method="random", nonfinite="skip") == ("bf16", False, True)
    assert run_settings(task="math", method="id3", grad_accum=2) == ("bf16", False, False)
    assert run_settings(task="math", method="random", grad_accum=2) == LEAN
    assert run_settings(task="math", method="child-dyn", grad_accum=2) == ("bf16", False, True)
    for method in ("id3", "gradual", "full", "lora", "child-f"):
        with pytest.raises(ConfigError, match="child_only_grads needs a fixed, strict child network"):
            TrainConfig(model="x", task="math", method=method, child_only_grads=True).resolved()
    assert run_settings(task="math", method="child-d", processes=2, fsdp=True) == CHILD_D


def test_id3_growing_every_k_steps_resolves_to_child_only_gradients():
    """id3_every is 1 (the authors' per-step rule) under both presets, for causal LMs too; at K > 1 a causal
    LM's id3 run takes child-only gradients between its growth steps, and says so."""
    for preset in ("childtune", "authors"):
        assert TrainConfig(model="x", task="math", method="id3", preset=preset).resolved().id3_every == 1
    assert run_settings(task="math", method="id3", id3_every=10) == LEAN
    assert run_settings(task="math", method="id3-lora", id3_every=10) == DENSE
    with pytest.raises(ConfigError, match="or id3 with id3_every > 1"):
        TrainConfig(model="x", task="math", method="id3", child_only_grads=True).resolved()
    with pytest.raises(ConfigError, match="id3_every"):
        TrainConfig(model="x", task="math", method="id3", id3_every=0).resolved()
    assert run_settings(task="mr", method="id3", id3_every=10, child_only_grads=True) == ("fp32", False, True)
    given = TrainConfig(model="x", task="math", method="id3", id3_every=10)
    assert "child-only gradients (dense every 10 steps, where id3 grows)" in causal_lm_notice(given, given.resolved())
    assert build_strategy(given.resolved(), 100, ["layer.0.weight"]).every == 10


def test_resolved_settings_are_saved_and_stable():
    done = TrainConfig(model="x", task="math", method="random").resolved()
    assert done.resolved() == done
    assert {k: done.to_dict()[k] for k in ("dtype", "optimizer_in_backward", "child_only_grads")} == {
        "dtype": "bf16", "optimizer_in_backward": True, "child_only_grads": True}


def test_the_notice_names_what_runs_and_the_opt_outs():
    given = TrainConfig(model="x", task="math", method="random")
    assert causal_lm_notice(given, given.resolved()) == (
        "causal LM: bf16 weights, fp32 child masters, step in backward (no gradient clipping), "
        "child-only gradients (opt out: --dtype fp32, --no-optimizer-in-backward, --no-child-only-grads)")
    child_d = TrainConfig(model="x", task="math", method="child-d")
    assert causal_lm_notice(child_d, child_d.resolved()) == (
        "causal LM: p 0.05, fp32 weights, step after backward, child-only gradients (opt out: --no-child-only-grads)")
    dyn = TrainConfig(model="x", task="math", method="child-dyn", dyn_window=3)
    assert "child-only gradients (dense on the 3 steps before each reselection)" in causal_lm_notice(
        dyn, dyn.resolved())
    id3 = TrainConfig(model="x", task="math", method="id3")
    assert "dense gradients (id3's child network grows from them)" in causal_lm_notice(id3, id3.resolved())
    for quiet in (TrainConfig(model="x", task="mr", method="child-d"), TrainConfig(model="x", task="math"
                  , method="full"), replace(given, dtype="bf16", optimizer_in_backward=True, child_only_grads=True)):
        assert causal_lm_notice(quiet, quiet.resolved()) is None


def test_method_table_knows_each_strategys_network():
    config = TrainConfig(model="x", task="mr", reserve_p=0.3)
    for name, method in METHODS.items():
        strategy = build_strategy(replace(config, method=name).resolved(), 10, ["layer.0.weight"])
        assert method.network == strategy.kind, name


def test_clipping_counts_and_scales_the_child_only_gradients():
    from childtune.training.loop import _clip

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))
    opt = SparseChildAdamW(model.named_parameters(), RandomMasking(0.5, seed=1, always=()), lr=1e-2)
    opt.child_only_grads(model)
    model(torch.randn(4, 6)).square().sum().backward()
    parts = [p.grad for p in model.parameters() if p.grad is not None] + opt.child_gradients()
    assert len(opt.child_gradients()) == 2  # both weights' child gradients, no .grad for them
    whole = torch.cat([g.reshape(-1) for g in parts]).norm()
    before = [g.clone() for g in parts]
    assert torch.allclose(_clip(opt, 0.1), whole)
    for g, b in zip(parts, before, strict=True):
        torch.testing.assert_close(g, b * (0.1 / (whole + 1e-6)))
    opt.zero_grad()
    assert opt.child_gradients() == []  # a skipped step leaves nothing for the next


# --------------------------------------------------------------------------------- through the CLI


@pytest.fixture(scope="module")
def generation(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lean")
    train, dev = write_generation_task(root, n_train=24, n_dev=4)
    return {"model": write_tiny_llama(root / "model"), "train": train, "dev": dev, "root": root}


def cli_run(files: dict[str, Path], out: Path, *extra: str) -> list[str]:
    args = ["train", "--model", str(files["model"]), "--train", str(files["train"]), "--dev", str(files["dev"]),
            "--epochs", "2", "--batch-size", "8", "--eval-batch-size", "4", "--max-new-tokens", "2",
            "--no-progress", "--checkpoint-every", "0", "--save", "model", "--output", str(out), *extra]
    assert main(args) == 0
    return args


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "model.safetensors")


@pytest.mark.parametrize("setting", [("--dtype", "fp32"), ("--dtype", "fp32", "--no-optimizer-in-backward",
                                                          "--max-grad-norm", "1e9"), (),
                                     ("--dtype", "fp32", "--gradient-checkpointing")],
                         ids=["fp32", "fp32-step-after-backward", "defaults-bf16", "fp32-checkpointed"])
def test_child_only_gradients_train_the_same_weights_as_dense_ones(generation, tmp_path, capsys, setting):
    common = ("--method", "child-d", "--reserve-p", "0.3", "--lr", "1e-2", *setting)
    cli_run(generation, tmp_path / "child", *common)
    notices = [line for line in capsys.readouterr().err.splitlines() if line.startswith("causal LM:")]
    assert len(notices) == 1, notices  # something was left to the causal-LM defaults each time
    cli_run(generation, tmp_path / "dense", *common, "--no-child-only-grads")
    child, dense = weights(tmp_path / "child"), weights(tmp_path / "dense")
    metrics = json.loads((tmp_path / "child" / "metrics.json").read_text())
    assert metrics["changed_outside_child"] == 0 and (tmp_path / "child" / "masks.safetensors").is_file()
    saved = json.loads((tmp_path / "child" / "config.json").read_text())
    assert saved["child_only_grads"] is True and json.loads(
        (tmp_path / "dense" / "config.json").read_text())["child_only_grads"] is False
    base = transformers.AutoModelForCausalLM.from_pretrained(generation["model"]).state_dict()
    changed = 0
    for name, tensor in dense.items():
        tol = {"rtol": 2**-7, "atol": 2e-3} if tensor.dtype == torch.bfloat16 else {"rtol": 1e-4, "atol": 1e-5}
        torch.testing.assert_close(child[name], tensor, **tol, msg=name)
        changed += int((tensor.float() != base[name].to(tensor.dtype).float()).sum())
    assert changed > 0


@pytest.mark.parametrize("setting", [("--dtype", "fp32"), ("--dtype", "fp32", "--no-optimizer-in-backward",
                                                          "--max-grad-norm", "1e9")],
                         ids=["in-backward", "step-after-backward"])  # (clipping would measure other norms)
def test_id3_every_k_with_child_only_gradients_trains_the_same_weights_as_dense_ones(generation, tmp_path, setting):
    """6 updates, id3 growing at 0, 2 and 4 (--id3-every 2): child-only gradients between, dense throughout."""
    common = ("--method", "id3", "--id3-every", "2", "--id3-budget", "0.01", "--lr", "1e-2", *setting)
    cli_run(generation, tmp_path / "child", *common)
    cli_run(generation, tmp_path / "dense", *common, "--no-child-only-grads")
    assert json.loads((tmp_path / "child" / "config.json").read_text())["child_only_grads"] is True
    child, dense = weights(tmp_path / "child"), weights(tmp_path / "dense")
    for name, tensor in dense.items():
        torch.testing.assert_close(child[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_the_default_run_prints_one_notice_and_its_delta_applies(generation, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--model", str(generation["model"]), "--train", str(generation["train"]), "--dev",
                 str(generation["dev"]), "--method", "random", "--epochs", "1", "--batch-size", "8",
                 "--max-new-tokens", "2", "--no-progress", "--checkpoint-every", "0", "--output", str(run)]) == 0
    err = capsys.readouterr().err
    assert err.count("causal LM: bf16 weights, fp32 child masters, step in backward") == 1, err
    assert (run / "delta").is_dir()
    assert main(["apply", str(run), "--output", str(tmp_path / "applied")]) == 0  # the base read in bf16
    applied = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "applied")
    assert applied.dtype == torch.bfloat16
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "one two"}) + "\n")
    assert main(["generate", str(run), "--input", str(tmp_path / "p.jsonl"), "--max-new-tokens", "2",
                 "--output", str(tmp_path / "out.jsonl")]) == 0


def test_a_resumed_run_with_child_only_gradients_ends_as_an_uninterrupted_one(generation, tmp_path, capsys):
    """Interrupted after its checkpoint at update 3 of 6 and resumed by `childtune train --resume`, a run at
    the defaults (bf16, step in backward, child-only gradients) ends with the uninterrupted run's weights."""
    from test_resume import Crash, CrashAt

    from childtune.training.checkpoint import Checkpointer
    from childtune.training.loop import train
    from childtune.training.runfolder import partial_dir

    whole, run = tmp_path / "whole", tmp_path / "run"
    cli_run(generation, whole, "--method", "random", "--reserve-p", "0.3", "--lr", "1e-2")
    config = TrainConfig.load_json(whole / "config.json")
    assert (config.dtype, config.optimizer_in_backward, config.child_only_grads) == LEAN
    with pytest.raises(Crash):
        train(replace(config, output=str(run)), [Checkpointer(3, directory=partial_dir(run)), CrashAt(3)])
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0
    assert "causal LM:" not in capsys.readouterr().err  # its config.json holds the resolved settings
    assert json.loads((run / "metrics.json").read_text())["steps"] == 6
    resumed, uninterrupted = weights(run), weights(whole)
    for name, tensor in uninterrupted.items():
        assert torch.equal(resumed[name], tensor), name


def test_lora_trains_fp32_adapters_over_a_bf16_base(generation, tmp_path):
    from childtune.training.loop import setup

    config = TrainConfig(model=str(generation["model"]), task="math", method="lora", dtype="bf16").resolved()
    model = transformers.AutoModelForCausalLM.from_pretrained(generation["model"], dtype=torch.bfloat16)
    model, params, *_ = setup(config, model, 4)
    assert params and all(p.dtype == torch.float32 for p in params.values())  # peft keeps the adapters fp32
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if "lora_" not in n)
    cli_run(generation, tmp_path / "lora", "--method", "lora", "--dtype", "bf16", "--lr", "1e-2")
    tuned = weights(tmp_path / "lora")
    assert all(t.dtype == torch.bfloat16 for t in tuned.values())  # merged into the bf16 base
    base = transformers.AutoModelForCausalLM.from_pretrained(generation["model"], dtype=torch.bfloat16).state_dict()
    assert any(not torch.equal(tuned[n], base[n]) for n in tuned)
