"""Nothing silently wrong at a run's boundaries: what the command line and a config file say is either
used or refused in one line naming it, and a run that could not save its result never starts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from childtune.cli import main
from childtune.data.userfiles import load_files
from childtune.delta import DeltaError, SparseDelta
from childtune.training.checkpoint import Checkpointer
from childtune.training.config import LARGEST_INT, ConfigError, TrainConfig
from childtune.training.loop import Callback, train
from childtune.training.runfolder import partial_dir

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_families import write_tiny_llama
from test_resume import Crash, CrashAt, tiny_cli_files


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    return tiny_cli_files(tmp_path_factory.mktemp("boundaries"))


def cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip()


def config(tiny: dict, **kw) -> TrainConfig:
    return TrainConfig(task=None, model=tiny["model"], train_file=tiny["train"], dev_file=tiny["dev"], epochs=1,
                       batch_size=4, progress=False, **kw)


# ------------------------------------------------------------------------------------------- --resume


@pytest.fixture
def interrupted(tiny, tmp_path) -> Path:
    """A run stopped after its checkpoint at update 2, as `--resume` finds one."""
    out = tmp_path / "run"
    with pytest.raises(Crash):
        train(config(tiny, method="id3", lr=1e-2, output=str(out)),
              [Checkpointer(2, directory=partial_dir(out)), CrashAt(2)])
    return out


def test_resume_refuses_options_that_would_change_the_run(interrupted, capsys):
    code, err = cli(capsys, "train", "--resume", interrupted, "--lr", 0.5, "--no-strict")
    assert code == 2
    assert err.count("\n") == 0 and "--lr, --strict would change" in err and "--log-every" in err, err
    code, err = cli(capsys, "train", "--resume", interrupted, "--config", interrupted / "config.json")
    assert code == 2 and "--config would change" in err, err
    assert not interrupted.exists() and partial_dir(interrupted).is_dir()  # still there to resume


def test_resume_takes_display_and_logging_options(interrupted, capsys):
    assert cli(capsys, "train", "--resume", interrupted, "--no-progress", "--log-every", 1)[0] == 0
    assert json.loads((interrupted / "config.json").read_text())["lr"] == 1e-2  # the saved settings ran
    logged = [json.loads(line) for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r][-3:] == [3, 4, 5]  # every step after the resume


def test_resuming_a_finished_run_says_it_finished(interrupted, capsys):
    assert cli(capsys, "train", "--resume", interrupted, "--no-progress")[0] == 0
    code, err = cli(capsys, "train", "--resume", interrupted)
    assert code == 2 and "is a finished run: nothing to resume" in err, err


# ------------------------------------------------------------------------------------------ config files


def test_a_key_given_twice_in_a_config_file_is_refused(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text('{"task": "mr", "lr": 0.001, "lr": 0.5}')
    code, err = cli(capsys, "train", "--config", path, "--output", tmp_path / "run")
    assert code == 2 and err == f"childtune: error: {path}: key 'lr' appears more than once; which value is meant?"


def test_a_key_given_twice_in_a_grid_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["study", "--grid", '{"child-d": {"lr": [1e-3]}, "child-d": {"lr": [1e-2]}}', "--output",
              str(tmp_path / "study")])
    assert "--grid: key 'child-d' appears more than once" in capsys.readouterr().err
    assert not (tmp_path / "study").exists()


@pytest.mark.parametrize(("key", "value", "said"), [
    ("batch_size", 1e23, "'batch_size' must be int"),
    ("batch_size", 10**23, f"batch_size must be between -{LARGEST_INT} and {LARGEST_INT}"),
    ("epochs", "3", "'epochs' must be int"),
    ("epochs", True, "'epochs' must be int"),
    ("seed", 1.5, "'seed' must be int"),
    ("lr", [1e-3], "'lr' must be float or null"),
    ("warmup", "0.1", "'warmup' must be float"),
    ("progress", 1, "'progress' must be bool"),
    ("metric_extra", [1], "'metric_extra' must be tuple"),
])
def test_config_file_values_of_the_wrong_type_or_size_are_refused(tmp_path, capsys, key, value, said):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"task": "mr", key: value}))
    code, err = cli(capsys, "train", "--config", path, "--output", tmp_path / "run")
    assert code == 2 and err.startswith("childtune: error:") and said in err and "\n" not in err, err
    assert not (tmp_path / "run").exists()


def test_a_config_built_in_python_is_checked_against_its_types():
    with pytest.raises(ConfigError, match=r"'batch_size' must be int, got 2\.5"):
        TrainConfig(batch_size=2.5).validate()
    with pytest.raises(ConfigError, match=f"max_length must be between -{LARGEST_INT}"):
        TrainConfig(max_length=2**40).resolved()


# ------------------------------------------------------------------------------------ command-line ints


@pytest.mark.parametrize("argv", [["--nproc", "0"], ["--nproc", "-1"], ["--checkpoint-every", "-1"],
                                  ["--nproc", "two"]])
def test_command_line_counts_out_of_range_are_refused(tmp_path, capsys, argv):
    with pytest.raises(SystemExit) as stop:
        main(["train", "--task", "mr", "--output", str(tmp_path / "run"), *argv])
    assert stop.value.code == 2
    assert f"argument {argv[0]}:" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv", [["--batch-size", "0"], ["--max-new-tokens", "0"], ["--max-new-tokens", "-3"]])
def test_generate_counts_out_of_range_are_refused_by_their_flag(capsys, argv):
    with pytest.raises(SystemExit) as stop:
        main(["generate", "smollm2-135m", "--prompt", "hi", *argv])
    assert stop.value.code == 2 and f"argument {argv[0]}: must be at least 1" in capsys.readouterr().err


def test_generate_input_must_be_utf8_text_and_may_start_with_a_bom(tmp_path, capsys, monkeypatch):
    binary = tmp_path / "p.txt"
    binary.write_bytes(b"ok\n\xf0\x28\x8c\x28\n")
    code, err = cli(capsys, "generate", "smollm2-135m", "--input", binary)
    assert code == 2 and err == f"childtune: error: {binary} is not UTF-8 text (byte 3 cannot be decoded)", err
    seen: list[list[str]] = []
    monkeypatch.setattr("childtune.training.generate.complete", lambda source, prompts, settings: seen.append(
        prompts) or ["x"] * len(prompts))
    bom = tmp_path / "b.txt"
    bom.write_bytes("\ufeffwhat is 2+2\n".encode())
    assert cli(capsys, "generate", "smollm2-135m", "--input", bom)[0] == 0
    assert seen == [["what is 2+2"]]


# ------------------------------------------------------------------------------- the end, checked first


def test_a_run_that_could_not_save_fails_before_its_first_step(tiny, tmp_path, monkeypatch):
    """The run's last steps (here: building its delta) are taken on the untrained model first."""

    def refuse(*args, **kwargs):
        raise DeltaError("x.weight: base is torch.bfloat16(2,), tuned is torch.float32(2,)")

    steps = []

    class Steps(Callback):
        def on_step(self, state) -> None:
            steps.append(state.step)

    monkeypatch.setattr(SparseDelta, "from_training", staticmethod(refuse))
    with pytest.raises(ConfigError, match=r"could not save its delta at the end, so it did not start: x\.weight"):
        train(config(tiny, method="child-d", output=str(tmp_path / "run")), [Steps()])
    assert steps == [] and not (tmp_path / "run").exists()



# ------------------------------------------------------------------------------- generation, inferred


def test_prompt_and_target_columns_make_a_generation_task_without_kind(tmp_path, capsys):
    """`--prompt-col/--target-col` without `--kind generation` used to fail with "no column 'text'"."""
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"q": f"{i}+{i}", "a": str(2 * i)}) + "\n" for i in range(8)))
    assert load_files(data, data, prompt_col="q", target_col="a").spec.kind == "generation"
    both = tmp_path / "both.csv"  # a text column too: the labels decide, as before
    both.write_text("text,label,prompt,target\na,0,p,t\nb,1,p,t\n")
    assert load_files(both, both).spec.kind == "classification"
    out = tmp_path / "run"
    code, err = cli(capsys, "train", "--model", write_tiny_llama(tmp_path / "llama"), "--train", data, "--dev",
                    data, "--prompt-col", "q", "--target-col", "a", "--method", "full", "--epochs", 1,
                    "--batch-size", 4, "--max-new-tokens", 2, "--no-progress", "--checkpoint-every", 0,
                    "--output", out)
    assert code == 0, err
    assert json.loads((out / "metrics.json").read_text())["kind"] == "generation"
