"""The one output rule (`childtune.outputs`), run as a user would against every command that writes.

One table of commands (train, compare, study, export, apply, merge, analyze, generate), and one test per part
of the rule over all of them: what is already there and not ours is never replaced, an output on or
inside (or around) an input is refused, a symbolic link is refused before any work, and a full disk is
one line naming what was being written.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from childtune.cli import main
from childtune.fileio import WriteError, atomic_write, no_room

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_causal import write_generation_task
from test_families import write_tiny_llama
from test_resume import write_task, write_tiny_model


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, Path]:
    """A tiny BERT with a task (for the commands that train) and a finished tiny-Llama generation run
    with a sparse delta (for the commands that read a run), plus a prompts file."""
    root = tmp_path_factory.mktemp("outputs")
    train, dev = write_task(root)
    bert = write_tiny_model(root / "bert", dropout=0.0)
    llama = write_tiny_llama(root / "llama")
    gen_train, gen_dev = write_generation_task(root, n_train=16, n_dev=4)
    for seed, run in enumerate((root / "run", root / "run2")):  # two, for `merge`
        assert main(["train", "--model", str(llama), "--train", str(gen_train), "--dev", str(gen_dev),
                     "--kind", "generation", "--method", "child-d", "--reserve-p", "0.5", "--epochs", "1",
                     "--batch-size", "8", "--max-new-tokens", "2", "--no-progress", "--checkpoint-every", "0",
                     "--seed", str(seed), "--output", str(run)]) == 0
    prompts = root / "prompts.txt"
    prompts.write_text("good day\n")
    return {"bert": bert, "train": train, "dev": dev, "run": root / "run", "run2": root / "run2", "prompts": prompts}


def bert_args(env: dict[str, Path]) -> list[str]:
    return ["--model", str(env["bert"]), "--train", str(env["train"]), "--dev", str(env["dev"]), "--epochs", "1",
            "--no-progress"]


@dataclass(frozen=True)
class Command:
    """How to run one writing command into `out`, what it reads, and what its output is."""

    name: str
    argv: Callable[[dict[str, Path], Path], list[str]]
    reads: Callable[[dict[str, Path]], list[Path]]
    file: bool = False  # its output is one file (else a folder)
    overwrite: bool = True  # it has --overwrite (the study resumes into its folder instead)


COMMANDS = [
    Command("train", lambda e, out: ["train", *bert_args(e), "--checkpoint-every", "0", "--output", str(out)],
            lambda e: [e["bert"], e["train"]]),
    Command("train-tasks", lambda e, out: ["train", "--tasks", "mr,spam", "--model", str(e["bert"]), "--train-size",
                                           "8", "--eval-size", "8", "--batch-size", "4", "--no-progress",
                                           "--output", str(out)],
            lambda e: [e["bert"]]),
    Command("compare", lambda e, out: ["compare", *bert_args(e), "--methods", "full", "--output", str(out)],
            lambda e: [e["bert"], e["dev"]]),
    Command("study", lambda e, out: ["study", "--tasks", "mr", "--methods", "full", "--seeds", "1", "--model",
                                     str(e["bert"]), "--no-transfer", "--no-analysis", "--no-progress",
                                     "--output", str(out)],
            lambda e: [e["bert"]], overwrite=False),
    Command("export", lambda e, out: ["export", str(e["run"]), "--output", str(out)], lambda e: [e["run"]]),
    Command("export-shira", lambda e, out: ["export", str(e["run"]), "--format", "shira", "--output", str(out)],
            lambda e: [e["run"]]),
    Command("apply", lambda e, out: ["apply", str(e["run"]), "--output", str(out)], lambda e: [e["run"]]),
    Command("merge", lambda e, out: ["merge", str(e["run"]), str(e["run2"]), "--output", str(out)],
            lambda e: [e["run"], e["run2"]]),
    Command("analyze", lambda e, out: ["analyze", f"a={e['run']}", "--output", str(out)], lambda e: [e["run"]]),
    Command("generate", lambda e, out: ["generate", str(e["run"]), "--input", str(e["prompts"]),
                                        "--max-new-tokens", "2", "--output", str(out)],
            lambda e: [e["run"], e["prompts"]], file=True),
]
EACH = pytest.mark.parametrize("command", COMMANDS, ids=[c.name for c in COMMANDS])


def cli(capsys, argv: list[str]) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def tree(root: Path) -> dict[str, bytes | str]:
    """Everything under `root`, links as their targets: what a refused command must leave as it was."""
    return {str(p.relative_to(root)): os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else ""
            for p in sorted(root.rglob("*"))}


@EACH
def test_what_is_already_there_and_not_ours_is_never_replaced(command, env, tmp_path, capsys):
    out = tmp_path / "out"
    if command.file:
        out.write_text("my notes\n")
    else:  # a folder of the user's, holding a file of the very name the command writes
        out.mkdir()
        (out / "layer_share.csv").write_text("mine\n")
        (out / "metrics.json").write_text('{"auc": 0.9}')
    before = tree(tmp_path)
    code, err = cli(capsys, command.argv(env, out))
    assert code == 2 and str(out) in err and err.count("\n") == 1, err
    if command.overwrite and not command.file:
        code, err = cli(capsys, [*command.argv(env, out), "--overwrite"])
        assert code == 2 and "refusing to replace it even with --overwrite" in err, err
    assert tree(tmp_path) == before


@EACH
def test_an_output_on_inside_or_around_an_input_is_refused(command, env, tmp_path, capsys):
    inputs = command.reads(env)
    before = {p: tree(p.parent) for p in inputs}
    for source in inputs:
        targets = [source, source.parent] + ([source / "config.json", source / "out"] if source.is_dir() else [])
        for target in targets:
            argv = command.argv(env, target) + (["--overwrite"] if command.overwrite else [])
            code, err = cli(capsys, argv)
            assert code == 2 and "would overwrite the input" in err, (target, err)
    assert {p: tree(p.parent) for p in inputs} == before


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.name in ("train", "compare", "study")],
                         ids=["train", "compare", "study"])
def test_an_output_around_the_config_file_is_refused(command, env, tmp_path, capsys):
    config = tmp_path / "mine" / "config.json"
    config.parent.mkdir()
    config.write_text('{"epochs": 1}')
    code, err = cli(capsys, [*command.argv(env, config.parent), "--config", str(config)])
    assert code == 2 and f"would overwrite the input {config}" in err, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["config.json", "mine"]


@EACH
def test_a_symbolic_link_as_output_is_refused_before_any_work(command, env, tmp_path, capsys):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")  # dangling: renaming a finished folder onto it would fail at the end
    code, err = cli(capsys, command.argv(env, link))
    assert code == 2 and "symbolic link" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link"]  # no .partial, no lock, nothing


@EACH
def test_an_output_under_a_file_is_refused_before_any_work(command, env, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    code, err = cli(capsys, command.argv(env, tmp_path / "notes.txt" / "out"))
    assert code == 2 and "notes.txt is not a folder" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_study_report_is_kept_apart_from_the_model_and_the_ledger(env, tmp_path, capsys):
    study = next(c for c in COMMANDS if c.name == "study").argv(env, tmp_path / "study")
    ledger = tmp_path / "ledger.jsonl"
    ledger.write_text("")
    for results in (env["bert"] / "README.md", ledger):
        code, err = cli(capsys, [*study, "--ledger", str(ledger), "--results", str(results)])
        assert code == 2 and "would overwrite the input" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.jsonl"] and ledger.read_text() == ""


def test_generate_replaces_its_file_only_with_overwrite(env, tmp_path, capsys):
    out = tmp_path / "notes.jsonl"
    out.write_text("my notes\n")
    argv = ["generate", str(env["run"]), "--prompt", "good", "--max-new-tokens", "2", "--output", str(out)]
    code, err = cli(capsys, argv)
    assert code == 2 and "already exists; pass --overwrite" in err and out.read_text() == "my notes\n"
    assert main([*argv, "--overwrite"]) == 0
    assert json.loads(out.read_text())["prompt"] == "good"


def test_analyze_replaces_only_an_analysis_it_wrote(env, tmp_path, capsys):
    out = tmp_path / "analysis"
    argv = ["analyze", f"a={env['run']}", "--output", str(out)]
    assert main(argv) == 0
    assert "already holds an analysis" in cli(capsys, argv)[1]
    assert main([*argv, "--overwrite"]) == 0
    (out / "my-notes.md").write_text("keep me")
    code, err = cli(capsys, [*argv, "--overwrite"])
    assert code == 2 and "my-notes.md" in err and (out / "my-notes.md").read_text() == "keep me"


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   OSError(errno.EFBIG, "File too large", "x/model.safetensors"),
                                   type("SafetensorError", (Exception,), {})(
                                       "Error while serializing: I/O error: File too large (os error 27)")])
def test_no_room_is_one_error_naming_the_file_and_the_cause(error):
    with pytest.raises(WriteError, match=r"^disk full or file size limit while writing x\S* \(.+\)$"), no_room("x"):
        raise error
    with pytest.raises(PermissionError), no_room("x"):  # other errors pass unchanged
        raise PermissionError(errno.EACCES, "Permission denied")


LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]),) * 2)
from childtune.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_a_full_disk_is_one_line_and_the_previous_output_survives(env, tmp_path):
    """A file size limit below the model's size (as a full disk would): saving a whole model (train
    --method full, apply) fails with one line naming the output, exit 2; what was there before stays."""
    run = tmp_path / "full"
    args = ["train", *bert_args(env), "--method", "full", "--checkpoint-every", "0", "--output", str(run)]
    assert main(args) == 0
    before = tree(run)
    limit = str((run / "model" / "model.safetensors").stat().st_size // 2)
    for argv in ([*args, "--overwrite"], ["apply", str(env["run"]), "--output", str(tmp_path / "applied")]):
        done = subprocess.run([sys.executable, "-c", LIMITED, limit, *argv], capture_output=True, text=True,
                              timeout=300)
        err = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(err) == 1, done.stderr
        assert err[0].startswith("childtune: error: disk full or file size limit while writing"), err
        assert "(File too large)" in err[0]
    assert tree(run) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # no partial folder, no lock


def test_atomic_write_names_the_file_when_the_disk_is_full(tmp_path, monkeypatch):
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    target = tmp_path / "metrics.json"
    with pytest.raises(WriteError, match=f"while writing {target} \\(No space left on device\\)"):
        atomic_write(target, "{}")
    assert list(tmp_path.iterdir()) == []  # the temp file is gone too
