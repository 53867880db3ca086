"""The study ledger: cells recorded once, planned from, and a report rebuilt from it alone."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from test_study import FakeTrain, fake_study

from childtune.study.ledger import Ledger, LedgerError, make_record, settings_hash
from childtune.study.plan import cell_config, plan, study_tasks
from childtune.study.run import run_cells, run_study
from childtune.training.config import TrainConfig


def refuse(config, callbacks=(), resume=False):
    raise AssertionError(f"trained a cell the ledger holds: {config.output}")


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_report_from_the_ledger_alone_equals_the_report_from_run_folders(tmp_path):
    ledger = tmp_path / "docs" / "ledger.jsonl"
    study = fake_study(tmp_path, transfer=True, ledger=str(ledger))
    fake = FakeTrain()
    from_folders = run_study(replace(study, ledger=None), run=fake, results=tmp_path / "a.md", progress=False)
    assert not ledger.exists()
    # the same cells, finished in their folders: read back once and recorded, nothing trained
    run_study(study, run=refuse, results=tmp_path / "b.md", progress=False)
    records = lines(ledger)
    assert len(records) == len(fake.calls) == len(plan(study))
    first = records[0]
    assert {"hash", "config", "metrics", "code_version", "device", "recorded_at", "seed", "task",
            "method"} <= set(first)
    assert first["hash"] == settings_hash(TrainConfig.from_dict(first["config"]))
    transfer = next(r for r in records if r["experiment"] == "transfer")
    assert transfer["context"] == {"transfer_targets": ["other"]} and "transfer" in transfer["metrics"]
    assert "output" not in first["config"] and first["config"]["method"] == first["method"]

    # another machine: no run folders at all, only the committed ledger
    shutil.rmtree(tmp_path / "study")
    from_ledger = run_study(study, run=refuse, results=tmp_path / "c.md", progress=False, train_missing=False)
    assert [(r.task, r.method, r.config, r.scores) for r in from_ledger.main] == \
        [(r.task, r.method, r.config, r.scores) for r in from_folders.main]
    assert [(r.task, r.scores) for r in from_ledger.transfer] == [(r.task, r.scores) for r in from_folders.transfer]
    block = [line for line in (tmp_path / "c.md").read_text().splitlines() if line.startswith("| t")]
    assert block == [line for line in (tmp_path / "a.md").read_text().splitlines() if line.startswith("| t")]
    # planning from it: resuming trains nothing and records nothing twice
    run_study(study, run=refuse, results=tmp_path / "d.md", progress=False)
    assert len(lines(ledger)) == len(records)


@pytest.mark.parametrize("other_finishes", [True, False])
def test_studies_sharing_a_ledger_train_each_cell_once(tmp_path, other_finishes):
    """Another study (here: this test) has claimed the first cell. This study leaves it, trains the rest,
    then waits for it: the other study's record is used as it is, or, if the other died without one,
    the cell is trained here last. Either way the ledger holds each cell once."""
    path = tmp_path / "ledger.jsonl"
    study = fake_study(tmp_path, transfer=False, tasks=("t1",), seeds=(1, 2), ledger=str(path))
    cells = plan(study)
    first = cell_config(study, cells[0])
    theirs = {"primary_metric": "accuracy", "dev": {"accuracy": 0.123}, "test": {"accuracy": 0.456}}
    claim = Ledger(path).claim(first)
    fake = FakeTrain()

    def run(config, callbacks=(), resume=False):
        metrics = fake(config, callbacks, resume)
        if len(fake.calls) == len(cells) - 1:  # this study's last cell: the other study ends meanwhile
            if other_finishes:
                Ledger(path).append(make_record(dict(cells[0].key()), first, theirs))
            claim.release()
        return metrics

    records = run_cells(study, run, progress=False)
    trained = [c.output for c in fake.calls]
    assert first.output not in trained[:-1] and len(set(trained)) == len(trained)
    assert len(trained) == len(cells) - other_finishes
    assert (records[0].metrics == theirs) is other_finishes
    assert [r.cell for r in records] == cells  # in plan order, whoever ran them
    assert sorted(r["hash"] for r in lines(path)) == sorted(settings_hash(cell_config(study, c)) for c in cells)
    assert not list((tmp_path / ".ledger.jsonl.claims").iterdir())  # every claim given back


def test_a_cell_with_other_settings_is_not_served_from_the_ledger(tmp_path):
    ledger = tmp_path / "ledger.jsonl"
    study = fake_study(tmp_path, transfer=False, seeds=(1,), ledger=str(ledger))
    run_study(study, run=FakeTrain(), results=tmp_path / "r.md", progress=False)
    changed = replace(study, base=replace(study.base, epochs=2), output=str(tmp_path / "other"))
    again = FakeTrain()
    run_study(changed, run=again, results=tmp_path / "r2.md", progress=False)
    assert len(again.calls) == len(plan(changed))  # every cell trained anew
    assert len(lines(ledger)) == 2 * len(plan(study))


KEY = {"experiment": "main", "task": "t1", "method": "full", "overrides": [], "seed": 1}


def scores(dev: float, test: float = 0.5, **more) -> dict:
    return {"primary_metric": "accuracy", "dev": {"accuracy": dev}, "test": {"accuracy": test}, **more}


def record(seed: int, metrics: dict) -> dict:
    return make_record({**KEY, "seed": seed}, TrainConfig(task="t1", method="full", seed=seed), metrics)


def test_a_torn_last_line_is_skipped_and_a_bad_middle_line_refused(tmp_path):
    path = tmp_path / "ledger.jsonl"
    config = TrainConfig(task="t1", method="full", seed=1)
    Ledger(path).append(record(1, scores(0.5)))
    with path.open("a") as f:
        f.write('{"version": 1, "hash": "ab')  # a crash half way through an append
    with pytest.warns(UserWarning, match="unfinished last record"):
        ledger = Ledger(path)
    assert ledger.get(config)["metrics"]["dev"] == {"accuracy": 0.5}
    other = replace(config, seed=2)
    ledger.append(record(2, scores(0.7)))  # cuts the torn tail
    assert [r["seed"] for r in lines(path)] == [1, 2]
    assert Ledger(path).get(other)["metrics"]["dev"] == {"accuracy": 0.7}
    path.write_text(path.read_text().replace('"seed": 1', '"seed": "one"'))  # a damaged record, not torn
    with pytest.raises(LedgerError, match=r"ledger.jsonl:1: .*seed"):
        Ledger(path)


def test_train_sizes_make_one_task_per_size(tmp_path):
    study = fake_study(tmp_path, tasks=("t1",), methods=("full",), seeds=(1,), grid={}, transfer=False,
                       train_sizes=(100, 300))
    assert study_tasks(study) == {"t1-n100": {"task": "t1", "train_size": 100},
                                  "t1-n300": {"task": "t1", "train_size": 300}}
    sizes = [cell_config(study, cell).train_size for cell in plan(study)]
    assert sizes == [100, 300]


def test_updates_set_each_sizes_epochs_as_the_loop_counts_updates(tmp_path):
    from childtune.study.plan import StudyError, epochs_for

    study = fake_study(tmp_path, tasks=("t1",), methods=("full",), seeds=(1,), grid={}, transfer=False,
                       train_sizes=(100, 300, 1000, 5000), updates=189)
    configs = [cell_config(study, cell) for cell in plan(study)]
    # batch 16: 7, 19, 63 and 313 updates per epoch (ceil), as train's total_steps counts them
    assert [c.epochs for c in configs] == [27, 10, 3, 1]
    assert [math.ceil(c.train_size / c.batch_size) * c.epochs for c in configs] == [189, 190, 189, 313]
    assert epochs_for(64, batch_size=16, updates=1) == 1  # never fewer than one epoch
    run_study(study, run=FakeTrain(), results=tmp_path / "R.md", progress=False, train_missing=False)
    assert "epochs set per train size for about 189 updates each (100: 27, 300: 10, 1000: 3, 5000: 1)" \
        in (tmp_path / "R.md").read_text()
    with pytest.raises(StudyError, match="updates"):
        plan(replace(study, train_sizes=()))
    with pytest.raises(StudyError, match="updates"):
        plan(replace(study, updates=0))


def test_a_record_with_a_setting_this_version_lacks_is_skipped_not_refused(tmp_path):
    """Another study running newer code (a TrainConfig field added since, same ledger format) appended a
    record: a study still running this version skips it with a warning and goes on appending."""
    path = tmp_path / "ledger.jsonl"
    Ledger(path).append(record(1, scores(0.5)))
    newer = record(3, scores(0.6))
    newer["config"] = {**newer["config"], "a_setting_from_the_future": "x"}
    with path.open("a") as f:
        f.write(json.dumps(newer) + "\n")
    with pytest.warns(UserWarning, match="cannot interpret") as seen:
        ledger = Ledger(path)
    assert len(seen) == 1 and len(ledger.records) == 1
    assert ledger.skipped == ["line 2: a record of a newer childtune (settings a_setting_from_the_future)"]
    ledger.append(record(2, scores(0.7)))
    assert lines(path)[1] == newer and len(lines(path)) == 3


def test_a_newer_record_at_the_end_is_kept_and_appended_after(tmp_path):
    """A newer childtune sharing the ledger wrote the last line: this version skips it with one warning,
    never cuts it, appends after it, and the ledger still reads, every line intact."""
    path = tmp_path / "ledger.jsonl"
    Ledger(path).append(record(1, scores(0.5)))
    newer = {**record(3, scores(0.6)), "version": 2, "config": {"a_setting_from_the_future": 1}}
    with path.open("a") as f:
        f.write(json.dumps(newer) + "\n")
    before = path.read_bytes()
    with pytest.warns(UserWarning, match=r"skipping 1 record\(s\) this childtune cannot interpret.*line 2") as seen:
        ledger = Ledger(path)
    assert len(seen) == 1 and len(ledger.records) == 1 and ledger.skipped == [
        "line 2: a record of a newer ledger format (version 2)"]
    ledger.append(record(2, scores(0.7)))
    assert path.read_bytes().startswith(before) and lines(path)[1] == newer
    with pytest.warns(UserWarning, match="cannot interpret"):
        again = Ledger(path)
    assert sorted(r["seed"] for r in again.records.values()) == [1, 2]


def test_a_complete_last_line_without_its_newline_is_kept(tmp_path):
    path = tmp_path / "ledger.jsonl"
    Ledger(path).append(record(1, scores(0.5)))
    path.write_bytes(path.read_bytes().rstrip(b"\n"))  # e.g. an editor that drops the final newline
    ledger = Ledger(path)
    assert len(ledger.records) == 1
    ledger.append(record(2, scores(0.7)))  # ends that line instead of cutting it
    assert [r["seed"] for r in lines(path)] == [1, 2] and len(Ledger(path).records) == 2
    path.write_text(path.read_text() + "{not json\n")  # damaged, not torn: it has its newline
    with pytest.raises(LedgerError, match=r"ledger.jsonl:3: not a ledger record"):
        Ledger(path)


BAD_SCORES = [
    (scores(7.0), r"'metrics.dev.accuracy' = 7.0 is outside \[0, 1\]"),
    (scores(0.5, math.nan), r"'metrics.test.accuracy' must be a finite number, got nan"),
    (scores(0.5, None), r"'metrics.test.accuracy' must be a finite number, got None"),
    (scores(0.5, "0.9"), r"'metrics.test.accuracy' must be a finite number, got '0.9'"),
    (scores(0.5, True), r"'metrics.test.accuracy' must be a finite number, got True"),
    ({**scores(0.5), "test": {}}, r"'metrics.test' must hold the primary metric 'accuracy'"),
    ({"dev": {"accuracy": 0.5}, "test": {"accuracy": 0.5}}, r"'metrics.primary_metric' must be a metric name"),
    ({**scores(0.5), "test": {"accuracy": 0.5, "f1": -0.1}}, r"'metrics.test.f1' = -0.1 is outside \[0, 1\]"),
    ({"primary_metric": "pearson", "dev": {"pearson": 0.2}, "test": {"pearson": 1.5}},
     r"'metrics.test.pearson' = 1.5 is outside \[-1, 1\]"),
    (scores(0.5, transfer={"other": {"accuracy": math.inf}}), r"'metrics.transfer.other.accuracy' must be a finite"),
    (scores(0.5, total_params="100"), r"'metrics.total_params' must be a finite number, got '100'"),
]


@pytest.mark.parametrize(("metrics", "message"), BAD_SCORES)
def test_invalid_scores_are_never_written(tmp_path, metrics, message):
    path = tmp_path / "ledger.jsonl"
    Ledger(path).append(record(1, scores(0.5)))
    before = path.read_bytes()
    with pytest.raises(LedgerError, match=r"ledger.jsonl: not recording main t1 full seed 2: field " + message):
        Ledger(path).append(record(2, metrics))
    assert path.read_bytes() == before


@pytest.mark.parametrize(("metrics", "message"), BAD_SCORES)
def test_invalid_scores_in_the_ledger_are_skipped_by_line_and_field(tmp_path, metrics, message):
    """A record another tool or an older childtune wrote, or a hand edit: skipped with a warning that
    names its line and field, its cell not served (so trained again), the rest of the ledger read."""
    path = tmp_path / "ledger.jsonl"
    Ledger(path).append(record(1, scores(0.5)))
    with path.open("a") as f:
        f.write(json.dumps(record(2, metrics)) + "\n")
    with pytest.warns(UserWarning, match=r"skipping 1 record\(s\) with invalid scores .*line 2: field " + message):
        ledger = Ledger(path)
    assert [r["seed"] for r in ledger.records.values()] == [1]
    assert len(ledger.skipped) == 1 and ledger.skipped[0].startswith("line 2: field ")


def test_the_report_counts_the_skipped_records(tmp_path):
    ledger = tmp_path / "ledger.jsonl"
    study = fake_study(tmp_path, transfer=False, tasks=("t1",), seeds=(1, 2), ledger=str(ledger))
    run_study(study, run=FakeTrain(), results=tmp_path / "a.md", progress=False)
    damaged = [json.loads(line) for line in ledger.read_text().splitlines()]
    damaged[0]["metrics"]["test"]["accuracy"] = 7.0
    ledger.write_text("".join(json.dumps(r) + "\n" for r in damaged))
    shutil.rmtree(tmp_path / "study")  # another machine: the ledger alone
    with pytest.warns(UserWarning, match="invalid scores"):
        result = run_study(study, run=refuse, results=tmp_path / "b.md", progress=False, train_missing=False)
    text = (tmp_path / "b.md").read_text()
    assert "**1 record(s) of the ledger" in text and "line 1: field 'metrics.test.accuracy' = 7.0" in text
    assert "rest not yet run" in text  # the damaged cell counts as not run, not as a score of 7
    assert all(score <= 1 for row in result.main for score in row.scores)
