"""Resumable runs: atomic checkpoints, and an interrupted run that ends bit-identical to an uninterrupted one.

The runs train a tiny BERT saved to a folder (with dropout on, so the RNG state matters) on a small CSV
task through the real loop, `childtune.training.loop.train`, with `checkpoint.Checkpointer` as its callback.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from childtune.training import checkpoint as ckpt
from childtune.training.checkpoint import Checkpointer, CheckpointError, load_checkpoint, save_checkpoint

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from conftest import tiny_bert_config  # noqa: E402

POSITIVE = ["good", "great", "fun", "fine", "moving", "smart"]
NEGATIVE = ["bad", "dull", "awful", "boring", "flat", "silly"]
FILLER = ["the", "a", "film", "movie", "plot", "very", "was", "is", "and", "not"]


# ------------------------------------------------------------------------------ a tiny run on disk


def write_tiny_model(folder: Path, dropout: float = 0.1) -> Path:
    """A randomly initialised 2-layer BERT and a word-level tokenizer, loadable by `from_pretrained`."""
    from transformers import BertForSequenceClassification, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POSITIVE, *NEGATIVE, *FILLER]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # the vocabulary file is positional: transformers 5 renamed the keyword `vocab_file` to `vocab` and ignores the
    # old one, which gave a tokenizer of the 5 special tokens alone (every word [UNK], nothing to learn from)
    tokenizer = BertTokenizerFast(str(folder / "vocab.txt"), model_max_length=32)
    if len(tokenizer) != len(vocab):
        raise AssertionError(f"the tiny tokenizer has {len(tokenizer)} tokens, not the {len(vocab)} of its vocab.txt")
    tokenizer.save_pretrained(folder)
    config = tiny_bert_config()
    config.vocab_size = len(vocab)
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = dropout
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    return folder


def write_task(folder: Path, n_train: int = 20, n_dev: int = 6) -> tuple[Path, Path]:
    """A sentiment CSV task whose label is carried by one word among fillers."""
    import random

    rng = random.Random(0)

    def rows(n: int) -> str:
        lines = ["text,label"]
        for i in range(n):
            word = rng.choice(POSITIVE if i % 2 else NEGATIVE)
            lines.append(" ".join([*rng.sample(FILLER, 3), word, *rng.sample(FILLER, 2)]) + f",{i % 2}")
        return "\n".join(lines) + "\n"

    train, dev = folder / "train.csv", folder / "dev.csv"
    train.write_text(rows(n_train))
    dev.write_text(rows(n_dev))
    return train, dev


def tiny_cli_files(root: Path) -> dict:
    """A dropout-free tiny model and a task's files under `root`, keyed as the CLI options name them."""
    train_file, dev_file = write_task(root)
    return {"model": str(write_tiny_model(root / "model", dropout=0.0)), "train": str(train_file),
            "dev": str(dev_file)}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> dict:
    """Files of a tiny run, with dropout on: a resume must restore each RNG stream where it was."""
    return tiny_run_files(tmp_path_factory.mktemp("tiny"))


def tiny_run_files(root: Path) -> dict:
    """A tiny model (dropout on) and a task's files under `root`, keyed as `TrainConfig` names them."""
    train, dev = write_task(root)
    return {"model": str(write_tiny_model(root / "model")), "train_file": str(train), "dev_file": str(dev)}


def run_config(tiny_run: dict, method: str, **overrides):
    from childtune.training.config import TrainConfig

    settings = dict(tiny_run, task=None, method=method, epochs=2, batch_size=4, eval_batch_size=8, seed=3,
                    lr=1e-2, id3_budget=0.05, max_length=16, progress=False, warmup=0.2)
    return TrainConfig(**{**settings, **overrides})


class Final:
    """Keeps the trained weights (the loop writes them only with an output folder)."""

    def on_start(self, state) -> None: ...

    def on_step(self, state) -> None: ...

    def on_end(self, state, metrics) -> None:
        self.params = {n: p.detach().clone() for n, p in state.model.named_parameters()}
        self.metrics = metrics


class Crash(Exception):
    pass


class CrashAt:
    """Interrupts the run right after update `step` (the checkpoint of that step is already on disk)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_start(self, state) -> None: ...

    def on_step(self, state) -> None:
        if state.step == self.step:
            raise Crash

    def on_end(self, state, metrics) -> None: ...


def assert_same_params(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ------------------------------------------------------------------------ resume gives the same run


def interrupt_and_resume(files: dict, folder: Path, method: str, crash_at: int, **overrides) -> None:
    """Crash after a checkpoint at `crash_at`, resume, and compare with an uninterrupted run."""
    from childtune.training.loop import train

    config = run_config(files, method, **overrides)
    whole = Final()
    train(config, [whole])
    assert whole.metrics["steps"] == 10

    with pytest.raises(Crash):
        train(config, [Checkpointer(1, directory=folder), CrashAt(crash_at)])
    assert load_checkpoint(folder)["step"] == crash_at
    resumed = Final()
    train(config, [Checkpointer(2, resume=True, directory=folder), resumed])

    assert resumed.metrics["steps"] == 10
    assert_same_params(resumed.params, whole.params)
    assert resumed.metrics["dev"] == whole.metrics["dev"]
    assert not (folder / "checkpoint").exists()  # a finished run drops its checkpoint


def test_resumed_runs_log_has_each_step_once(tiny_run, tmp_path):
    """Steps 5..7 ran after the checkpoint at 4 and are replayed on resume: their records are cut back."""
    from childtune.training.loop import train

    out = tmp_path / "run"
    config = run_config(tiny_run, "child-f", log_every=1, output=str(out))
    with pytest.raises(Crash):
        train(config, [Checkpointer(4), CrashAt(7)])
    with (tmp_path / ".run.partial" / "metrics.jsonl").open("a") as log:
        log.write('{"step": 8, "lo')  # a line torn by the crash
    train(config, [Checkpointer(4, resume=True)], resume=True)
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 11))


@pytest.mark.parametrize(("method", "crash_at"), [("child-f", 3), ("child-d", 5), ("id3", 4), ("full", 7),
                                               ("pafi", 4)])
def test_interrupted_run_resumes_bit_identical(tiny_run, tmp_path, method, crash_at):
    """Mid-epoch (3, 4, 7) and at an epoch boundary (5): weights, optimizer, strategy state, scheduler,
    data position and the dropout RNG all continue where they stopped. PaFi chooses from the weights it is
    bound to: a resume binds it to the base's before restoring the checkpoint, so its network is the same."""
    interrupt_and_resume(tiny_run, tmp_path, method, crash_at)


def test_a_moving_child_network_resumes_bit_identical_from_inside_its_window(tiny_run, tmp_path):
    """child-dyn reselecting at steps 3, 6 and 9 from the 2 steps before each: the checkpoint after step 5
    holds one of the window's two gradients (its statistics), the moved network and its origins."""
    interrupt_and_resume(tiny_run, tmp_path, "child-dyn", 5, dyn_every=3, dyn_window=2, reserve_p=0.2)


def test_resume_refuses_different_settings(tiny_run, tmp_path):
    from childtune.training.loop import train

    with pytest.raises(Crash):
        train(run_config(tiny_run, "id3"), [Checkpointer(2, directory=tmp_path), CrashAt(2)])
    with pytest.raises(CheckpointError, match=r"lr=0\.01"):
        train(run_config(tiny_run, "id3", lr=1e-3), [Checkpointer(2, resume=True, directory=tmp_path)])


def test_resume_without_checkpoint_is_a_clear_error(tiny_run, tmp_path):
    from childtune.training.loop import train

    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(run_config(tiny_run, "full"), [Checkpointer(2, resume=True, directory=tmp_path)])


KILLED = textwrap.dedent("""
    import json, sys, time
    from childtune.training.checkpoint import Checkpointer
    from childtune.training.config import TrainConfig
    from childtune.training.loop import train

    class Hang:  # holds the run after `step` so the test can kill it at a known point
        def on_start(self, state): pass
        def on_step(self, state):
            if state.step == {step}:
                print("ready", flush=True)
                time.sleep(600)
        def on_end(self, state, metrics): pass

    config = TrainConfig(**json.loads(sys.argv[1]))
    train(config, [Checkpointer(2, directory=sys.argv[2]), Hang()])
""")


def test_sigkilled_run_resumes_bit_identical(tiny_run, tmp_path):
    """A real process, killed with SIGKILL (no cleanup, no finally), then resumed here."""
    from childtune.training.loop import train

    config = run_config(tiny_run, "id3")
    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in config.to_dict().items()}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", KILLED.format(step=5), json.dumps(settings), str(tmp_path)],
                             stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert load_checkpoint(tmp_path)["step"] == 4  # every 2 steps: step 5 was not saved

    resumed, whole = Final(), Final()
    train(config, [Checkpointer(2, resume=True, directory=tmp_path), resumed])
    train(config, [whole])
    assert_same_params(resumed.params, whole.params)


# ---------------------------------------------------------------------------- checkpoint files alone


def state(value: float) -> dict:
    return {
        "model": {"w": torch.full((3, 2), value), "b": torch.zeros(2)},
        "optimizer": {"state": {0: {"exp_avg": torch.ones(3)}}, "child_tuning": {"steps": int(value)}},
        "step": int(value), "epoch": 1, "batch": 2, "note": "x",
    }


def test_round_trip_keeps_tensors_scalars_and_nesting(tmp_path):
    save_checkpoint(tmp_path, state(3.0))
    loaded = load_checkpoint(tmp_path)
    assert loaded.keys() == state(3.0).keys()
    assert torch.equal(loaded["model"]["w"], torch.full((3, 2), 3.0))
    assert loaded["optimizer"]["child_tuning"] == {"steps": 3}
    assert (loaded["step"], loaded["epoch"], loaded["batch"], loaded["note"]) == (3, 1, 2, "x")
    meta = json.loads((tmp_path / "checkpoint" / "meta.json").read_text())
    assert meta["scalars"]["step"] == 3  # readable without torch


def test_tied_weights_are_saved(tmp_path):
    shared = torch.randn(4, 2)
    save_checkpoint(tmp_path, {"model": {"a": shared, "b": shared}})
    loaded = load_checkpoint(tmp_path)["model"]
    assert torch.equal(loaded["a"], shared) and torch.equal(loaded["b"], shared)


def test_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, state(1.0))
    real = ckpt.atomic_write
    written = []

    def dies_on_second_file(path, data):
        if written:
            raise OSError("disk full")
        written.append(path)
        return real(path, data)

    monkeypatch.setattr(ckpt, "atomic_write", dies_on_second_file)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, state(2.0))
    assert load_checkpoint(tmp_path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]  # the temp folder is gone


def test_crash_between_the_two_renames_falls_back_to_the_previous(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, state(1.0))
    real = os.rename

    def dies_after_moving_the_old_one(src, dst):
        real(src, dst)
        if Path(dst).name == ckpt.PREVIOUS:
            raise KeyboardInterrupt  # the process dies before the new checkpoint is renamed into place

    monkeypatch.setattr(ckpt.os, "rename", dies_after_moving_the_old_one)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, state(2.0))
    monkeypatch.setattr(ckpt.os, "rename", real)
    assert not (tmp_path / "checkpoint").exists()
    assert load_checkpoint(tmp_path)["step"] == 1
    save_checkpoint(tmp_path, state(3.0))  # the next save recovers the layout
    assert load_checkpoint(tmp_path)["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_leftovers_of_a_killed_write_are_ignored_then_cleaned(tmp_path):
    save_checkpoint(tmp_path, state(1.0))
    stale = tmp_path / ".checkpoint-dead"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    assert load_checkpoint(tmp_path)["step"] == 1
    save_checkpoint(tmp_path, state(2.0))
    assert not stale.exists()


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "meta"])
def test_damaged_checkpoint_is_refused_with_the_file_named(tmp_path, damage):
    folder = save_checkpoint(tmp_path, state(1.0))
    target = folder / ("meta.json" if damage == "meta" else "model.safetensors")
    data = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        target.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    elif damage == "delete":
        target.unlink()
    else:
        target.write_text("{not json")
    with pytest.raises(CheckpointError, match=target.name if damage != "meta" else "meta.json"):
        load_checkpoint(tmp_path)


def test_crafted_state_file_cannot_run_code(tmp_path):
    """Even with hashes that match, state.pt is read with weights_only: a pickled callable is refused."""
    folder = save_checkpoint(tmp_path, state(1.0))

    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    (folder / "state.pt").write_bytes(pickle.dumps({"optimizer": Boom()}, protocol=2))
    meta = json.loads((folder / "meta.json").read_text())
    from childtune.fileio import sha256_file

    meta["files"]["state.pt"] = sha256_file(folder / "state.pt")
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(tmp_path)
    assert not (tmp_path / "pwned").exists()


def test_bad_state_is_refused_before_touching_disk(tmp_path):
    save_checkpoint(tmp_path, state(1.0))
    with pytest.raises(TypeError, match="state_dict"):
        save_checkpoint(tmp_path, {"model": {"w": [1, 2]}})
    assert load_checkpoint(tmp_path)["step"] == 1
    with pytest.raises(CheckpointError, match="nothing to resume"):
        load_checkpoint(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="interval"):
        Checkpointer(0)


def test_rng_states_round_trip():
    import random

    import numpy as np

    saved = ckpt.capture_rng()
    first = (torch.rand(4), random.random(), np.random.rand(3))
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    ckpt.restore_rng(saved)
    again = (torch.rand(4), random.random(), np.random.rand(3))
    assert torch.equal(first[0], again[0]) and first[1] == again[1] and (first[2] == again[2]).all()
    with pytest.raises(CheckpointError, match="2 rank"):
        ckpt.restore_rng(saved * 2)


# ------------------------------------------------------------------------------- through the CLI


def test_cli_resume_after_sigkill_matches_the_uninterrupted_run(tiny_run, tmp_path):
    """`childtune train` killed by SIGKILL once a checkpoint exists; `childtune train --resume` finishes it."""
    import safetensors.torch

    from childtune.cli import main
    from childtune.training.config import TrainConfig
    from childtune.training.loop import train

    run, partial = tmp_path / "run", tmp_path / ".run.partial"
    argv = ["train", "--model", tiny_run["model"], "--train", tiny_run["train_file"], "--dev", tiny_run["dev_file"],
            "--method", "id3", "--epochs", "20", "--batch-size", "4", "--lr", "0.01", "--seed", "3",
            "--save", "model", "--no-progress", "--checkpoint-every", "5", "--output", str(run)]
    child = subprocess.Popen([sys.executable, "-m", "childtune.cli", *argv], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not (partial / "checkpoint" / "meta.json").exists():
            assert child.poll() is None, child.stderr.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.005)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL and not run.exists()
    assert load_checkpoint(partial)["step"] < 100  # killed mid-run

    assert main(["train", "--resume", str(run)]) == 0
    assert not partial.exists() and not (run / "checkpoint").exists()
    assert json.loads((run / "metrics.json").read_text())["steps"] == 100
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    every = TrainConfig.log_every  # each step's record once: the replayed steps' records were cut back
    assert [r["step"] for r in log if "loss" in r] == list(range(every, 101, every))
    assert [(r["eval"], r["step"]) for r in log if "eval" in r] == [("dev", 100)]
    whole = Final()
    config = TrainConfig.load_json(run / "config.json")
    train(TrainConfig(**{**config.to_dict(), "output": None, "metric_extra": ()}), [whole])
    saved = safetensors.torch.load_file(run / "model" / "model.safetensors")
    assert_same_params({n: saved[n] for n in whole.params}, whole.params)


def test_cli_resume_of_nothing_is_a_one_line_error(tmp_path, capsys):
    from childtune.cli import main

    assert main(["train", "--resume", str(tmp_path / "never-ran")]) == 2
    assert "no interrupted run to resume" in capsys.readouterr().err
