"""Run folders on disk: they appear whole or not at all, are replaced only when provably ours, one writer at a time.

Every file a run leaves is written to a temporary name and renamed into place, and a run folder is
built under a hidden name and renamed when complete: a crash, a Ctrl-C or a bad input half way leaves
either the previous results or nothing, never a folder that looks like a run but is not.

Where it may go, and when an existing folder may be replaced, is `childtune.outputs`' rule (checked at
construction, before any work): apart from every input, and `--overwrite` replaces a folder only when
its manifest (`childtune-manifest.json`, written last) lists everything in it.

One writer. A writer takes an exclusive lock (`fileio.ExclusiveLock`, `.NAME.lock` beside the output)
before it looks at the output, and holds it until the folder is in place: a second run on the same
output fails at once with a message that says so.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from childtune.fileio import ExclusiveLock, room_error
from childtune.outputs import OutputError, check_replace, check_target, write_manifest
from childtune.training.checkpoint import checkpoint_dir

if TYPE_CHECKING:
    from childtune.training.config import TrainConfig

# ------------------------------------------------------------------------------------------ run files


class MetricsLog:
    """Append-only JSON lines (per-step loss and LR, per-eval metrics); kept in memory without a path.

    With `tensorboard` (a folder) the same numbers also go to TensorBoard event files, since that is
    where many users watch a run: `train/loss`, `train/lr` by step, `dev/<metric>` and `test/<metric>`.
    """

    def __init__(self, path: Path | None, tensorboard: Path | None = None) -> None:
        self.records: list[dict[str, Any]] = []
        self._file = open(path, "a", encoding="utf-8") if path else None  # noqa: SIM115 (closed in close())
        self._board = None
        if tensorboard is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ImportError("--report-to tensorboard needs TensorBoard: pip install 'childtune[tensorboard]'") \
                    from err
            self._board = SummaryWriter(str(tensorboard))

    def write(self, **record: Any) -> None:
        self.records.append(record)
        if self._file:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if self._board is not None and "step" in record:
            prefix = record.get("eval", "train")
            for key, value in record.items():
                if key not in ("step", "epoch", "eval", "batch", "event") and isinstance(value, int | float):
                    self._board.add_scalar(f"{prefix}/{key}", value, record["step"])

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
        if self._board is not None:
            self._board.close()
            self._board = None

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_reads(config: TrainConfig) -> tuple[str | None, ...]:
    """What a run reads from disk, which its output must keep apart from: its model folder and data files
    (`outputs.check_target` skips those that are names, not paths)."""
    return config.model, config.train_file, config.dev_file, config.test_file


def lock_for(output: str | os.PathLike) -> Path:
    output = Path(output)
    return output.parent / f".{output.name}.lock"


def partial_dir(output: str | os.PathLike) -> Path:
    """Where the run for `output` is built, and where an interrupted one keeps its checkpoint for --resume."""
    output = Path(output)
    return output.parent / f".{output.name}.partial"


class RunFolder:
    """A context manager giving a fresh hidden folder that replaces `output` only if the block succeeds.

    The checks happen at construction, before any work: `outputs.check_target` (a real place, apart from
    every path in `reads`), then under the lock `outputs.check_replace` (an `output` holding results is
    refused unless `overwrite`, and even then only a folder childtune provably wrote, whole, is replaced).
    Call `release` (or leave the `with` block) to let the next writer in. `kind` names what the folder
    holds in its manifest (run, delta, adapter, model, analysis).
    """

    def __init__(self, output: str | os.PathLike, overwrite: bool = False, resume: bool = False,
                 kind: str = "run", reads: Iterable[str | os.PathLike | None] = ()) -> None:
        self.output, self.resume, self.kind = check_target(output, reads=reads), resume, kind
        self.partial = partial_dir(self.output)
        self.lock = ExclusiveLock(lock_for(self.output), str(self.output))
        try:
            self._check(overwrite)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        self.lock.release()

    def _check(self, overwrite: bool) -> None:
        resume = self.resume
        if resume and not self.partial.is_dir():
            raise OutputError(f"no interrupted run to resume for {self.output} ({self.partial} does not exist)")
        if not resume and not overwrite and checkpoint_dir(self.partial) is not None:
            raise OutputError(f"an interrupted run for {self.output} left a checkpoint in {self.partial}; "
                              f"resume it (childtune train --resume {self.output}) or start over with --overwrite")
        check_replace(self.output, overwrite=overwrite, folder=True,
                      holds=f"{'an' if self.kind[0] in 'aeiou' else 'a'} {self.kind}")

    def __enter__(self) -> Path:
        if self.resume:  # the interrupted run's folder, checkpoint and all
            return self.partial
        if self.partial.exists():  # left by a crashed run
            shutil.rmtree(self.partial)
        self.partial.mkdir(parents=True)
        return self.partial

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._finish(exc_type is not None)
        finally:
            self.release()
        error = room_error(exc, self.output) if exc is not None else None
        if error is not None:  # whole models are saved straight into the folder: name it if the disk filled
            raise error from exc

    def _finish(self, failed: bool) -> None:
        if failed:
            if checkpoint_dir(self.partial) is None:  # a checkpointed run stays, for --resume
                shutil.rmtree(self.partial, ignore_errors=True)
            return
        write_manifest(self.partial, self.kind)
        old = None
        if self.output.exists():
            old = self.output.parent / f".{self.output.name}.old-{os.getpid()}"
            self.output.rename(old)
        self.partial.rename(self.output)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def stored_bytes(folder: Path) -> int:
    """The bytes a user stores to keep `folder` (every file under it; 0 when it does not exist)."""
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
