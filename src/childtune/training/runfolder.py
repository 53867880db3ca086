"""Run folders on disk: they appear whole or not at all, are replaced only when they are ours, and log as they go.

Every file a run or a comparison leaves is written to a temporary name and renamed into place, and a
run folder is built under a hidden name and renamed when complete: a crash, a Ctrl-C or a bad input
half way leaves either the previous results or nothing, never a folder that looks like a run but is not.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from childtune.training.checkpoint import checkpoint_dir

MARKERS = ("metrics.json", "compare.json", "delta_config.json", "childtune.json")
"""Files that mark a folder as childtune output, which `--overwrite` may replace (and nothing else)."""


class RunExistsError(ValueError):
    """The output folder already holds results (or something that is not ours)."""


# ------------------------------------------------------------------------------------------ run files


class MetricsLog:
    """Append-only JSON lines (per-step loss and LR, per-eval metrics); kept in memory without a path."""

    def __init__(self, path: Path | None) -> None:
        self.records: list[dict[str, Any]] = []
        self._file = open(path, "a", encoding="utf-8") if path else None  # noqa: SIM115 (closed in close())

    def write(self, **record: Any) -> None:
        self.records.append(record)
        if self._file:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def mark(self) -> int | None:
        """Where the file ends now: a checkpoint keeps it so that a resume can `rewind` to it."""
        return self._file.tell() if self._file else None

    def rewind(self, mark: int | None) -> None:
        """Cut the file back to `mark`: a resumed run replays the steps after its checkpoint, and their
        records (and a line torn by the crash) must not appear twice."""
        if self._file and mark is not None:
            self._file.truncate(mark)  # appends then continue from the new end (the file is in append mode)

    def close(self) -> None:
        if self._file:
            self._file.close()
            self._file = None

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def is_ours(path: Path) -> bool:
    return any((path / marker).exists() for marker in MARKERS)


def partial_dir(output: str | os.PathLike) -> Path:
    """Where the run for `output` is built, and where an interrupted one keeps its checkpoint for --resume."""
    output = Path(output)
    return output.parent / f".{output.name}.partial"


class RunFolder:
    """A context manager giving a fresh hidden folder that replaces `output` only if the block succeeds.

    The check happens at construction, before any work: an `output` holding results is refused unless
    `overwrite`, and even then a non-empty folder that childtune did not write is never deleted.
    """

    def __init__(self, output: str | os.PathLike, overwrite: bool = False, resume: bool = False) -> None:
        self.output, self.resume = Path(output), resume
        self.partial = partial_dir(self.output)
        if resume and not self.partial.is_dir():
            raise RunExistsError(f"no interrupted run to resume for {self.output} ({self.partial} does not exist)")
        if not resume and not overwrite and checkpoint_dir(self.partial) is not None:
            raise RunExistsError(f"an interrupted run for {self.output} left a checkpoint in {self.partial}; "
                                 f"resume it (childtune train --resume {self.output}) or start over with --overwrite")
        if self.output.exists():
            if not self.output.is_dir():
                raise RunExistsError(f"output {self.output} exists and is not a folder")
            if any(self.output.iterdir()):
                if not overwrite:
                    raise RunExistsError(f"output folder {self.output} already holds a run; "
                                         "pass --overwrite to replace it")
                if not is_ours(self.output):
                    raise RunExistsError(f"output folder {self.output} is not empty and holds no childtune "
                                         "results; refusing to replace it even with --overwrite")

    def __enter__(self) -> Path:
        if self.resume:  # the interrupted run's folder, checkpoint and all
            return self.partial
        if self.partial.exists():  # left by a crashed run
            shutil.rmtree(self.partial)
        self.partial.mkdir(parents=True)
        return self.partial

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            if checkpoint_dir(self.partial) is None:  # a checkpointed run stays, for --resume
                shutil.rmtree(self.partial, ignore_errors=True)
            return
        old = None
        if self.output.exists():
            old = self.output.parent / f".{self.output.name}.old-{os.getpid()}"
            self.output.rename(old)
        self.partial.rename(self.output)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
