"""Nothing lost, nothing silently wrong: one test per class of hostile use, run as a user would (the CLI).

Data loss: replacing what we did not write, replaying an old run's intent, two writers on one output,
writing over the input, an empty output name, an interrupted compare. Silently wrong: divergence,
guessed label kinds, a study cell reused under other settings, unchecked knobs, grid values as paths.
Every file we read: fuzzed checkpoint meta files only ever raise our own error.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from childtune.cli import main
from childtune.data.userfiles import load_files
from childtune.fileio import ExclusiveLock
from childtune.outputs import MANIFEST
from childtune.study.compare import compare
from childtune.study.grid import GridError, Job, run_jobs
from childtune.study.plan import Cell, StudyConfig, cell_config, plan
from childtune.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from childtune.training.config import ConfigError, TrainConfig
from childtune.training.loop import train
from childtune.training.runfolder import lock_for

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_resume import tiny_cli_files


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    return tiny_cli_files(tmp_path_factory.mktemp("hostile-runs"))


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def train_args(tiny: dict, output, *extra) -> list:
    return ["train", "--model", tiny["model"], "--train", tiny["train"], "--dev", tiny["dev"], "--epochs", 1,
            "--batch-size", 4, "--no-progress", "--checkpoint-every", 0, "--output", output, *extra]


def config(tiny: dict, **kw) -> TrainConfig:
    return TrainConfig(task=None, model=tiny["model"], train_file=tiny["train"], dev_file=tiny["dev"], epochs=1,
                       batch_size=4, progress=False, **kw)


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------- data loss


def test_overwrite_never_deletes_what_childtune_did_not_write(tiny, tmp_path, capsys):
    project = tmp_path / "proj"  # a DVC-style project with its own metrics.json, notes and code
    (project / "src").mkdir(parents=True)
    (project / "metrics.json").write_text('{"auc": 0.9}')
    (project / "notes.md").write_text("my notes")
    (project / "src" / "model.py").write_text("print('mine')")
    before = tree(project)
    code, _, err = cli(capsys, *train_args(tiny, project, "--overwrite"))
    assert code == 2 and "no childtune manifest" in err
    assert tree(project) == before

    run = tmp_path / "run"  # a real run, to which someone added their own notes
    assert cli(capsys, *train_args(tiny, run))[0] == 0
    assert json.loads((run / MANIFEST).read_text())["childtune"] == "childtune output folder"
    (run / "my-notes.txt").write_text("keep me")
    code, _, err = cli(capsys, *train_args(tiny, run, "--overwrite"))
    assert code == 2 and "my-notes.txt" in err and (run / "my-notes.txt").read_text() == "keep me"
    (run / "my-notes.txt").unlink()
    assert cli(capsys, *train_args(tiny, run, "--overwrite"))[0] == 0  # all ours: replaced

    # export and apply share the check
    code, _, err = cli(capsys, "export", run, "--output", project, "--overwrite")
    assert code == 2 and "no childtune manifest" in err and tree(project) == before


def test_a_saved_config_never_replays_the_act_of_writing(tiny, tmp_path, capsys):
    first, other = tmp_path / "first", tmp_path / "other"
    assert cli(capsys, *train_args(tiny, first))[0] == 0
    assert cli(capsys, *train_args(tiny, first, "--overwrite"))[0] == 0
    saved = json.loads((first / "config.json").read_text())
    assert saved["overwrite"] is False  # what the run computed, not how it was written
    saved["overwrite"] = True  # even a config file that says so by hand
    (tmp_path / "replay.json").write_text(json.dumps(saved))
    assert cli(capsys, *train_args(tiny, other))[0] == 0
    before = tree(other)
    code = main(["train", "--config", str(tmp_path / "replay.json"), "--output", str(other)])
    assert code == 2 and tree(other) == before
    assert "already holds a run" in capsys.readouterr().err


def test_a_second_writer_on_the_same_output_fails_at_once(tiny, tmp_path, capsys):
    out = tmp_path / "busy"
    with ExclusiveLock(lock_for(out), str(out)):  # another process is writing it right now
        code, _, err = cli(capsys, *train_args(tiny, out))
        assert code == 2 and "another childtune process is writing" in err
        code, _, err = cli(capsys, "compare", "--model", tiny["model"], "--train", tiny["train"], "--dev",
                           tiny["dev"], "--methods", "full", "--epochs", 1, "--no-progress", "--output", out)
        assert code == 2 and "another childtune process is writing" in err
    assert not out.exists()
    assert cli(capsys, *train_args(tiny, out))[0] == 0  # the lock is gone with its holder
    assert not lock_for(out).exists()


def test_output_equal_to_or_inside_the_input_and_empty_output_are_refused(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(capsys, *train_args(tiny, run, "--method", "child-d"))[0] == 0
    before = tree(run)
    for target in (run, run / "delta-out", tmp_path):
        code, _, err = cli(capsys, "export", run, "--output", target, "--overwrite")
        assert code == 2 and "would overwrite the input" in err, target
        code, _, err = cli(capsys, "apply", run, "--output", target, "--overwrite")
        assert code == 2 and "would overwrite" in err, target
    assert tree(run) == before
    code, _, err = cli(capsys, *train_args(tiny, ""))
    assert code == 2 and "output" in err
    assert list(Path.cwd().glob(".partial")) == []


def test_an_interrupted_compare_keeps_finished_cells_and_resumes(tiny, tmp_path):
    out, calls = tmp_path / "cmp", []

    def interrupted(config, callbacks=(), resume=False):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(config.output)
        return train(config, callbacks)

    base = config(tiny)
    with pytest.raises(KeyboardInterrupt):
        compare(base, ["full", "child-d"], [1, 2], out, run=interrupted)
    done = sorted(p.name for p in (out / "runs").iterdir())
    assert done == ["full-seed1", "full-seed2"] and all((out / "runs" / d / "metrics.json").is_file() for d in done)
    resumed = []
    result = compare(base, ["full", "child-d"], [1, 2], out,
                     run=lambda c, cb=(), resume=False: resumed.append(c.output) or train(c, cb))
    assert [Path(p).name for p in resumed] == ["child-d-seed1", "child-d-seed2"]
    assert len(result.runs) == 4 and (out / "summary.csv").is_file()
    with pytest.raises(ValueError, match="another comparison"):  # other settings over the same folder
        compare(replace(base, epochs=2), ["full"], [1], out)


# ------------------------------------------------------------------------------------------- silently wrong


def test_divergence_is_an_error_not_a_score(tiny, tmp_path, capsys, monkeypatch):
    # child-d: the sparse optimizer checks only the elements it updated (SparseChildAdamW.nonfinite)
    for method, extra in (("full", ()), ("full", ("--nonfinite", "skip")), ("child-d", ())):
        out = tmp_path / f"diverged-{method}{len(extra)}"
        code, _, err = cli(capsys, *train_args(tiny, out, "--method", method, "--lr", "1e30", *extra))
        assert code == 2 and ("diverged" in err or "non-finite loss" in err), err  # an error, never a score
        assert not out.exists()
    # skipped steps are said in the summary line, not only in metrics.json
    import childtune.training.loop as loop

    real = loop.train

    def skipping(config, callbacks=(), resume=False):
        metrics = real(config, callbacks)
        return {**metrics, "skipped_steps": 3, "steps": 1}

    monkeypatch.setattr(loop, "train", skipping)
    code, out, _ = cli(capsys, *train_args(tiny, tmp_path / "skips"))
    assert code == 0 and "skipped 3 of 4 steps" in out


def test_label_kinds_are_never_guessed_from_mixed_evidence(tmp_path):
    def files(rows: list[str], name: str = "t") -> tuple[Path, Path]:
        path = tmp_path / f"{name}.csv"
        path.write_text("text,label\n" + "\n".join(f"text {i},{r}" for i, r in enumerate(rows)) + "\n")
        return path, path

    with pytest.raises(ValueError, match=r"1 fractional labels \(lines 4\) but 5 whole numbers \(lines 2, 3, 5"):
        load_files(*files(["0", "1", "0.5", "1", "0", "1"], "stray"))
    with pytest.raises(ValueError, match="line 3: label 'nan' is not a finite"):
        load_files(*files(["0", "nan", "1"], "nan"))
    with pytest.raises(ValueError, match=r"fractional labels .* class names"):
        load_files(*files(["good", "0.25", "bad", "0.75"], "mixed"))
    ratings = files(["1", "2", "5", "4", "3"], "ratings")
    assert load_files(*ratings).spec.kind == "classification"
    assert load_files(*ratings, kind="regression").spec.kind == "regression"  # --kind regression
    assert load_files(*files(["0.5", "1.25", "2", "3.5"], "scores")).spec.kind == "regression"
    dup = tmp_path / "dup.csv"
    dup.write_text("text,label,label\na,0,1\nb,1,0\n")
    with pytest.raises(ValueError, match="'label' appears more than once"):
        load_files(dup, dup)
    jsonl = tmp_path / "dup.jsonl"
    jsonl.write_text('{"text": "a", "label": 0, "label": 1}\n{"text": "b", "label": 1}\n')
    with pytest.raises(ValueError, match="line 1: key 'label' appears more than once"):
        load_files(jsonl, jsonl)
    with pytest.raises(ConfigError, match="would read the label"):
        TrainConfig(task=None, train_file="a.csv", dev_file="a.csv", text_col="label").resolved()


def test_a_study_cell_is_reused_only_under_its_own_settings(tiny, tmp_path):
    first = config(tiny, method="full", output=str(tmp_path / "cell"))
    metrics = train(first)
    assert run_jobs([Job(first, "cell")], progress=False) == [metrics]  # same settings: read back
    with pytest.raises(GridError, match=r"other settings.*lr"):
        run_jobs([Job(replace(first, lr=3e-3), "cell")], progress=False)


def test_every_knob_passes_typed_validation(tiny, tmp_path, capsys):
    for flag, value, key in (("--id3-exp", "nan", "id3_exp"), ("--id3-eps", "-1", "id3_eps"),
                             ("--lr", "inf", "lr")):
        code, _, err = cli(capsys, *train_args(tiny, tmp_path / "x", "--method", "id3", flag, value))
        assert code == 2 and key in err, (flag, err)
    study = StudyConfig(tasks=("mr",), methods=("full",), seeds=(1,), grid={"full": {"lr": (True,)}},
                        output=str(tmp_path / "s"), transfer=False)
    with pytest.raises(ConfigError, match="'lr' must be float"):
        cell_config(study, plan(study)[0]).resolved()
    study = replace(study, grid={"full": {"epochs": (1.5,)}})
    with pytest.raises(ConfigError, match="'epochs' must be int"):
        cell_config(study, plan(study)[0]).resolved()


def test_grid_values_never_become_raw_path_segments(tmp_path):
    study = StudyConfig(tasks={"../../escape": {"task": "mr"}}, methods=("full",), seeds=(1,),
                        grid={"full": {"text_col": ("/../../../../tmp/x",)}}, output=str(tmp_path / "s"),
                        transfer=False)
    folder = Path(cell_config(study, plan(study)[0]).output).resolve()
    assert folder.is_relative_to((tmp_path / "s").resolve())
    assert ".." not in folder.relative_to((tmp_path / "s").resolve()).parts
    assert Cell("main", "mr", "full", (("lr", 1e-4),), 1).label == "lr0.0001"  # plain values stay readable


# ------------------------------------------------------------------------------------------- files we read


META = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                 max_size=4), max_leaves=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(meta=META | st.fixed_dictionaries({"format": st.just(2), "files": META, "scalars": META,
                                          "scalars_sha256": st.text(max_size=8)}),
       counters=st.dictionaries(st.sampled_from(["step", "epoch", "batch", "skipped", "log_mark"]), META, max_size=5))
def test_fuzzed_checkpoint_meta_raises_only_checkpoint_error(tmp_path_factory, meta, counters):
    folder = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(folder, {"step": 3, "epoch": 0, "batch": 3, "skipped": 0, "log_mark": 10})
    path = folder / "checkpoint" / "meta.json"
    real = json.loads(path.read_text())
    for candidate in (meta, {**real, "scalars": {**real["scalars"], **counters}}):
        path.write_text(json.dumps(candidate))
        try:
            load_checkpoint(folder)
        except CheckpointError:
            continue
        assert candidate == real or candidate["scalars"] == real["scalars"]  # only an intact file loads


def test_paths_in_a_saved_config_resolve_from_the_file_not_the_working_directory(tiny, tmp_path, capsys,
                                                                                  monkeypatch):
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    for name in ("train", "dev"):
        (project / "data" / f"{name}.csv").write_bytes(Path(tiny[name]).read_bytes())
    monkeypatch.chdir(project)
    assert cli(capsys, "train", "--model", tiny["model"], "--train", "data/train.csv", "--dev", "data/dev.csv",
               "--epochs", 1, "--batch-size", 4, "--no-progress", "--output", "runs/a")[0] == 0
    saved = json.loads((project / "runs" / "a" / "config.json").read_text())
    assert saved["train_file"] == "../../data/train.csv"  # relative to the config file's folder
    monkeypatch.chdir(tmp_path)  # elsewhere: the saved config still finds its data
    assert cli(capsys, "train", "--config", project / "runs" / "a" / "config.json", "--output", "b")[0] == 0
    a, b = (json.loads(p.read_text()) for p in (project / "runs" / "a" / "metrics.json", tmp_path / "b" /
                                                 "metrics.json"))
    assert a["dev"] == b["dev"]
