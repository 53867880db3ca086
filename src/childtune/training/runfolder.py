"""Run folders on disk: they appear whole or not at all, are replaced only when provably ours, one writer at a time.

Every file a run leaves is written to a temporary name and renamed into place, and a run folder is
built under a hidden name and renamed when complete: a crash, a Ctrl-C or a bad input half way leaves
either the previous results or nothing, never a folder that looks like a run but is not.

Ownership. The last file written into a finished folder is its manifest (`childtune-manifest.json`):
our signature and the list of every entry we wrote. `--overwrite` replaces a folder only when its
manifest is there and the folder holds nothing the manifest does not list; a project folder that merely
holds a `metrics.json` of its own, or a run folder someone added notes to, is refused and left as it is.

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
from typing import Any

from childtune.fileio import ExclusiveLock, write_json
from childtune.training.checkpoint import checkpoint_dir

MANIFEST = "childtune-manifest.json"
SIGNATURE = "childtune output folder"
"""The manifest's `childtune` field: what marks a folder as written, whole, by childtune."""


class RunExistsError(ValueError):
    """The output folder already holds results (or something that is not ours)."""


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


def write_manifest(folder: Path, kind: str, extra: Iterable[str] = ()) -> Path:
    """Sign `folder` as ours: every entry now in it (and `extra`, entries still to come), written last."""
    entries = sorted({p.name for p in folder.iterdir() if p.name != MANIFEST} | set(extra))
    return write_json(folder / MANIFEST, {"childtune": SIGNATURE, "kind": kind, "entries": entries})


def foreign_entries(path: Path) -> list[str] | None:
    """What in `path` childtune did not write: None when it has no valid manifest at all (not ours),
    else the entries the manifest does not list (empty: the whole folder is ours to replace)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("childtune") != SIGNATURE or not isinstance(
            manifest.get("entries"), list):
        return None
    listed = set(manifest["entries"]) | {MANIFEST}
    return sorted(p.name for p in path.iterdir() if p.name not in listed)


def check_replaceable(path: Path, what: str = "output folder") -> None:
    """Refuse to replace `path` unless it is provably a childtune folder with nothing of anyone else's."""
    foreign = foreign_entries(path)
    if foreign is None:
        raise RunExistsError(f"{what} {path} is not empty and has no childtune manifest ({MANIFEST}); "
                             "refusing to replace it even with --overwrite")
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise RunExistsError(f"{what} {path} holds files childtune did not write ({shown}); "
                             "refusing to replace it even with --overwrite: move them first")


def lock_for(output: str | os.PathLike) -> Path:
    output = Path(output)
    return output.parent / f".{output.name}.lock"


def partial_dir(output: str | os.PathLike) -> Path:
    """Where the run for `output` is built, and where an interrupted one keeps its checkpoint for --resume."""
    output = Path(output)
    return output.parent / f".{output.name}.partial"


class RunFolder:
    """A context manager giving a fresh hidden folder that replaces `output` only if the block succeeds.

    The lock and the checks happen at construction, before any work: an `output` holding results is
    refused unless `overwrite`, and even then only a folder childtune provably wrote, whole, is replaced
    (`check_replaceable`). Call `release` (or leave the `with` block) to let the next writer in.
    `kind` names what the folder holds in its manifest (run, delta, model).
    """

    def __init__(self, output: str | os.PathLike, overwrite: bool = False, resume: bool = False,
                 kind: str = "run") -> None:
        if not str(output).strip():
            raise RunExistsError("the output folder name is empty")
        self.output, self.resume, self.kind = Path(output), resume, kind
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
                check_replaceable(self.output)

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
