"""The one grid runner: train every cell of a grid that is not done yet, read back the ones that are.

`compare` (one task, methods x seeds) and the study (tasks x methods x hyper-parameters x seeds) are
both lists of `Job`s run here, so they resume the same way. A cell is done when its folder holds
`metrics.json` (and any extra result files the job names). A cell killed half way left only its hidden
`.partial` folder: it resumes from its checkpoint when it has one, else starts again. A done cell is
reused only if the config it was run with is the job's config (up to where it was written and how it
was displayed), so a second grid with other settings over the same folder is refused, never averaged in.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from childtune.training.checkpoint import checkpoint_dir
from childtune.training.config import TrainConfig
from childtune.training.loop import Callback, train
from childtune.training.runfolder import partial_dir

_NOT_SETTINGS = frozenset({"output", "overwrite", "progress", "log_every"})
"""Config keys about where and how a run was written or shown, not about what it computed."""


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

    @property
    def folder(self) -> Path:
        return Path(self.config.output)

    def finished(self) -> bool:
        return all((self.folder / name).is_file() for name in ("metrics.json", *self.extras))

    def read_back(self) -> dict[str, Any]:
        saved = TrainConfig.load_json(self.folder / "config.json").to_dict()
        wanted = self.config.resolved().to_dict()
        differ = sorted(k for k in wanted.keys() - _NOT_SETTINGS if saved.get(k) != wanted[k])
        if differ:
            shown = ", ".join(f"{k}={saved.get(k)!r} (wanted {wanted[k]!r})" for k in differ[:3])
            raise GridError(f"{self.folder} holds a finished run with other settings ({shown}); "
                            "give the grid another --output, or remove that run")
        metrics = json.loads((self.folder / "metrics.json").read_text(encoding="utf-8"))
        for name in self.extras:
            metrics[Path(name).stem] = json.loads((self.folder / name).read_text(encoding="utf-8"))
        return metrics


def run_jobs(jobs: Sequence[Job], run: Callable[..., dict[str, Any]] | None = None, *, desc: str = "grid",
             progress: bool = True, train_missing: bool = True) -> list[dict[str, Any] | None]:
    """Metrics of every job in order: read back when done, else trained (`None` for a job not done when
    `train_missing` is False). Every config is checked before the first cell trains. `run` is the
    training function (default `childtune.training.loop.train`, called as `run(config, callbacks)`)."""
    run = run or train
    for job in jobs:
        job.config.resolved()
    results: list[dict[str, Any] | None] = []
    done = 0
    bar = tqdm(jobs, desc=desc, unit="run", disable=not progress)
    for job in bar:
        bar.set_postfix_str(job.label)
        if job.finished():
            results.append(job.read_back())
            done += 1
            continue
        if not train_missing:
            results.append(None)
            continue
        config = replace(job.config, overwrite=True) if job.folder.exists() else job.config  # not finished: ours
        resume = checkpoint_dir(partial_dir(job.folder)) is not None  # killed after a checkpoint: go on
        results.append(run(config, list(job.callbacks), resume=True) if resume else run(config, list(job.callbacks)))
    bar.close()
    if progress and done:
        print(f"{desc}: {done} of {len(jobs)} runs were already done and were read back", file=sys.stderr)
    return results
