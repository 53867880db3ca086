"""The one grid runner: train every cell of a grid that is not done yet, read back the ones that are.

`compare` (one task, methods x seeds) and the study (tasks x methods x hyper-parameters x seeds) are
both lists of `Job`s run here, so they resume the same way. A cell is done when its folder holds
`metrics.json` (and any extra result files the job names). A cell killed half way left only its hidden
`.partial` folder: it resumes from its checkpoint when it has one, else starts again. A done cell is
reused only if the config it was run with is the job's config (up to where it was written and how it
was displayed), so a second grid with other settings over the same folder is refused, never averaged in.

With a `Ledger` (`childtune.study.ledger`), a cell the ledger holds is not trained or read from disk at
all, and every cell finished here is appended to it, so a grid resumes on another machine from the
committed ledger alone.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from childtune.fileio import LockedError
from childtune.multitask.run import train_tasks
from childtune.study.ledger import Ledger, make_record
from childtune.training.checkpoint import checkpoint_dir
from childtune.training.config import NOT_SETTINGS, TrainConfig
from childtune.training.loop import Callback, train
from childtune.training.runfolder import partial_dir


def train_any(config: TrainConfig, callbacks=()) -> dict[str, Any]:
    """A cell's run: several tasks at once (`config.tasks`: `childtune.multitask`, no callbacks) or one."""
    if config.tasks is not None:
        if callbacks:
            raise GridError("a multi-task cell takes no callbacks (no transfer evaluation)")
        return train_tasks(config)
    return train(config, callbacks)


class GridError(ValueError):
    """A grid cell whose folder holds a run made with other settings."""


@dataclass(frozen=True)
class Job:
    """One cell: its full config (`output` is the cell's folder), callbacks, and the JSON result files
    beyond `metrics.json` a finished cell holds (each merged into its metrics under the file's stem)."""

    config: TrainConfig
    label: str
    callbacks: tuple[Callback, ...] = ()
    extras: tuple[str, ...] = ()
    key: tuple[tuple[str, Any], ...] = ()
    """What the ledger records the cell as (experiment, task, method, overrides, seed)."""
    context: tuple[tuple[str, Any], ...] = ()
    """What the cell computes beyond the run (e.g. transfer targets): part of its identity in the ledger."""

    @property
    def folder(self) -> Path:
        if self.config.output is None:
            raise ValueError(f"job {self.label!r} has no output folder")
        return Path(self.config.output)

    def finished(self) -> bool:
        return all((self.folder / name).is_file() for name in ("metrics.json", *self.extras))

    def read_back(self) -> dict[str, Any]:
        saved = TrainConfig.load_json(self.folder / "config.json").to_dict()
        wanted = self.config.resolved().to_dict()
        differ = sorted(k for k in wanted.keys() - NOT_SETTINGS if saved.get(k) != wanted[k])
        if differ:
            shown = ", ".join(f"{k}={saved.get(k)!r} (wanted {wanted[k]!r})" for k in differ[:3])
            raise GridError(f"{self.folder} holds a finished run with other settings ({shown}); "
                            "give the grid another --output, or remove that run")
        metrics = json.loads((self.folder / "metrics.json").read_text(encoding="utf-8"))
        for name in self.extras:
            metrics[Path(name).stem] = json.loads((self.folder / name).read_text(encoding="utf-8"))
        return metrics


def run_jobs(jobs: Sequence[Job], run: Callable[..., dict[str, Any]] | None = None, *, desc: str = "grid",
             progress: bool = True, train_missing: bool = True, ledger: Ledger | None = None,
             ) -> list[dict[str, Any] | None]:
    """Metrics of every job in order: from the ledger or the cell's folder when done, else trained
    (`None` for a job not done when `train_missing` is False). Every config is checked before the first
    cell trains. `run` is the training function (default `train_any`: `childtune.training.loop.train`, or
    the multi-task recipe; called as `run(config, callbacks)`). A cell another study sharing the ledger is
    training is left to it and waited for after the others (see `Ledger.claim`)."""
    run = run or train_any
    for job in jobs:
        job.config.resolved()
    results: list[dict[str, Any] | None] = [None] * len(jobs)
    done = 0
    claimed_elsewhere: list[int] = []
    bar = tqdm(total=len(jobs), desc=desc, unit="run", disable=not progress)
    for index, job in enumerate(jobs):
        bar.set_postfix_str(job.label)
        settled = _settle(job, run, train_missing, ledger, wait=False)
        if settled is None:
            claimed_elsewhere.append(index)
            continue
        results[index], was_done = settled
        done += was_done
        bar.update()
    for index in claimed_elsewhere:
        bar.set_postfix_str(f"waiting for another study's {jobs[index].label}")
        settled = _settle(jobs[index], run, train_missing, ledger, wait=True)
        assert settled is not None  # waited for the claim
        results[index], was_done = settled
        done += was_done
        bar.update()
    bar.close()
    if progress and done:
        print(f"{desc}: {done} of {len(jobs)} runs were already done and were read back", file=sys.stderr)
    return results


def _settle(job: Job, run: Callable[..., dict[str, Any]], train_missing: bool, ledger: Ledger | None, *,
            wait: bool) -> tuple[dict[str, Any] | None, bool] | None:
    """One job's metrics, and whether it was done before: from the ledger, else its folder, else trained
    and recorded, all under the cell's claim (`None` if another study holds it and not `wait`)."""
    context = dict(job.context)
    if ledger is None or not train_missing:
        recorded = ledger.get(job.config, context) if ledger is not None else None
        if recorded is not None:
            return recorded["metrics"], True
        return _folder_or_train(job, run, train_missing)
    try:
        claim = ledger.claim(job.config, context, wait=wait)
    except LockedError:
        return None
    with claim:
        ledger.reload()  # another study sharing the ledger may have recorded the cell since we planned
        recorded = ledger.get(job.config, context)
        if recorded is not None:
            return recorded["metrics"], True
        metrics, was_done = _read_or_train(job, run)
        ledger.append(make_record(dict(job.key), job.config, metrics, context))
    return metrics, was_done


def _folder_or_train(job: Job, run: Callable[..., dict[str, Any]],
                     train_missing: bool) -> tuple[dict[str, Any] | None, bool]:
    if not train_missing and not job.finished():
        return None, False
    return _read_or_train(job, run)


def _read_or_train(job: Job, run: Callable[..., dict[str, Any]]) -> tuple[dict[str, Any], bool]:
    """A finished cell's metrics read back from its folder (True), or the cell trained now (False)."""
    if job.finished():
        return job.read_back(), True
    config = replace(job.config, overwrite=True) if job.folder.exists() else job.config  # unfinished: ours
    resume = checkpoint_dir(partial_dir(job.folder)) is not None  # killed after a checkpoint: go on
    return (run(config, list(job.callbacks), resume=True) if resume else run(config, list(job.callbacks))), False
