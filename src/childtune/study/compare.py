"""`compare`: the grid runner on one task, methods x seeds, with `compare`'s own table, CSVs and plot.

It is the study with one task, each method at its defaults and no transfer or analysis, written to
`runs/<method>-seed<k>/` inside the output folder. Finished cells are results and are kept: a compare
stopped half way (Ctrl-C, a crash) resumes where it stopped when run again with the same settings,
and a compare with other settings over the same folder is refused unless `overwrite` starts it over.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from childtune.fileio import ExclusiveLock, atomic_write, write_json
from childtune.outputs import OutputError, check_replaceable, check_target, write_manifest
from childtune.study.grid import Job, run_jobs
from childtune.study.tables import format_table, plot, runs_csv, summary_csv
from childtune.training.config import TrainConfig
from childtune.training.runfolder import lock_for, run_reads

_DESCRIPTION = "compare.json"
_FILES = (_DESCRIPTION, "runs", "runs.csv", "summary.csv", "summary.png", "table.txt")


@dataclass
class Comparison:
    runs: list[dict[str, Any]]
    table: str
    output: Path


def compare(base: TrainConfig, methods: Sequence[str], seeds: Sequence[int], output: str | os.PathLike, *,
            overwrite: bool = False, run: Callable[..., dict[str, Any]] | None = None) -> Comparison:
    """Train every (method, seed) of the grid from `base` and report them side by side.

    Writes `runs/<method>-seed<k>/` (each a full run folder), `runs.csv` (one row per run),
    `summary.csv` (mean and std per method), `summary.png` and `table.txt`. `run` is the training
    function (default `childtune.training.loop.train`).
    """
    if not methods or not seeds:
        raise ValueError("compare needs at least one method and one seed")
    if len(set(methods)) != len(methods) or len(set(seeds)) != len(seeds):
        raise ValueError("compare got a method or seed twice")
    output = check_target(output, reads=run_reads(base))
    jobs = [Job(replace(base, method=m, seed=s, overwrite=False, output=str(output / "runs" / f"{m}-seed{s}")),
                f"{m} seed{s}") for m in methods for s in seeds]
    for job in jobs:
        job.config.resolved()  # every cell's config is checked before the output is touched
    description = {"methods": list(methods), "seeds": list(seeds),
                   "base": replace(base, output=None, overwrite=False).to_dict()}
    with ExclusiveLock(lock_for(output), str(output)):
        _claim(output, description, overwrite)
        output.mkdir(parents=True, exist_ok=True)
        write_json(output / _DESCRIPTION, description)
        write_manifest(output, "compare", _FILES)
        runs = [r for r in run_jobs(jobs, run, desc="compare", progress=base.progress) if r is not None]
        table = format_table(runs)
        atomic_write(output / "runs.csv", runs_csv(runs))
        atomic_write(output / "summary.csv", summary_csv(runs))
        plot(runs, output / "summary.png")
        atomic_write(output / "table.txt", table + "\n")
    return Comparison(runs, table, output)


def _claim(output: Path, description: dict[str, Any], overwrite: bool) -> None:
    """Make `output` this comparison's folder: new, the same comparison resumed, or (with `overwrite`)
    a childtune result started over. Anything else is refused and left as it is."""
    if output.exists() and not output.is_dir():
        raise OutputError(f"output {output} exists and is not a folder")
    if not output.exists() or not any(output.iterdir()):
        return
    saved = output / _DESCRIPTION
    same = saved.is_file() and _read(saved) == description
    if same and not overwrite:
        check_replaceable(output, "comparison folder")  # resume only into a folder that is all ours
        return
    if not overwrite:
        raise OutputError(f"output folder {output} already holds results of another comparison; "
                             "pass --overwrite to replace them, or choose another --output")
    check_replaceable(output)
    shutil.rmtree(output)


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
