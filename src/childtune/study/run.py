"""Running a whole study: plan its cells, train or read them back through the grid runner, report.

Protocol, as in the Child-Tuning paper: for each task and method the hyper-parameters with the best
mean *dev* score over seeds are selected, and that configuration's *test* scores are reported, paired
with the baseline by seed (`childtune.study.report`, `childtune.study.stats`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from childtune.fileio import ExclusiveLock, write_json
from childtune.outputs import OutputError, check_target
from childtune.study.grid import Job, run_jobs
from childtune.study.ledger import Ledger
from childtune.study.plan import Record, StudyConfig, StudyError, cell_config, describe, plan
from childtune.study.report import StudyResult, report
from childtune.study.transfer import TransferEval
from childtune.training.runfolder import lock_for, run_reads


def run_cells(study: StudyConfig, run: Callable[..., dict[str, Any]] | None = None,
              progress: bool = True, train_missing: bool = True, *, ledger: Ledger | None = None) -> list[Record]:
    """Train every cell not yet done (in plan order), read back the done ones; return all records.

    A cell is done when `study.ledger` holds it or its folder holds a finished run of its settings.
    `train_missing=False` only reads back what is done, to report a study that is still under way.
    `ledger` is `study.ledger` already opened (else it is opened here).
    """
    cells = plan(study)
    if not cells:
        raise StudyError("the study has no cells: give at least one task, method and seed")
    jobs = []
    for cell in cells:
        transfer = cell.experiment == "transfer"
        jobs.append(Job(cell_config(study, cell), f"{cell.task} {cell.method} {cell.label} seed{cell.seed}",
                        (TransferEval(study.transfer_targets),) if transfer else (),
                        ("transfer.json",) if transfer else (), cell.key(),
                        (("transfer_targets", list(study.transfer_targets)),) if transfer else ()))
    for job in jobs:
        job.config.resolved()  # before study.json is written: a bad grid leaves nothing behind
    if train_missing:
        write_json(Path(study.output) / "study.json", describe(study))
    if ledger is None and study.ledger:
        ledger = Ledger(study.ledger)
    results = run_jobs(jobs, run, desc="study", progress=progress, train_missing=train_missing, ledger=ledger)
    return [Record(cell, metrics) for cell, metrics in zip(cells, results, strict=True) if metrics is not None]


def _check_output(study: StudyConfig, results: str | Path | None = None) -> None:
    """The output rule (`childtune.outputs`) for a study, before any cell: its folder and report apart
    from what it reads, and an existing folder a study's own (it holds study.json). A study resumes into
    its folder and rewrites its tables there, so a folder of anyone else's is refused."""
    reads = run_reads(study.base)
    output = check_target(study.output, reads=reads)
    if results:
        check_target(results, reads=[*reads, study.ledger])
    if output.is_dir() and any(output.iterdir()) and not (output / "study.json").is_file():
        raise OutputError(f"output folder {output} holds files but no study (no study.json); refusing to write "
                          "a study into it: choose another --output")


def run_study(study: StudyConfig, *, run: Callable[..., dict[str, Any]] | None = None, command: str | None = None,
              results: str | Path | None = None, progress: bool = True, train_missing: bool = True) -> StudyResult:
    """Run (or resume) every cell of `study`, then write its tables, plots, analysis and report.

    `run` is the training function, `childtune.training.loop.train` by default (called as
    `run(config, callbacks)`). With `train_missing=False` nothing is trained: the report covers the
    cells already done and lists the rest as not yet run. The report counts the ledger records this
    version skipped (`Ledger.skipped`).
    """
    _check_output(study, results)
    ledger = Ledger(study.ledger) if study.ledger else None
    if not train_missing:
        records = run_cells(study, run, progress, train_missing, ledger=ledger)
        return report(study, records, command, results, tables=False, skipped=ledger.skipped if ledger else ())
    with ExclusiveLock(lock_for(study.output), study.output):  # one study at a time in a folder
        records = run_cells(study, run, progress, train_missing, ledger=ledger)
    return report(study, records, command, results, skipped=ledger.skipped if ledger else ())
