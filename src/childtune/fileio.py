"""Writing files so that a crash never leaves a half-written one, and hashing them.

Every result childtune writes (metrics, deltas, checkpoints, plots, cached downloads) goes through
`atomic_write`: a reader sees the old file or the new one, never a torn mix, and a failed run leaves
nothing that looks like a finished one. A write that fails for want of room (disk or quota full, a
file size limit) is one `WriteError` naming the file (`no_room`). Where an output may go at all is
`childtune.outputs`' rule.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once at import: the only portable way to learn the umask is to set it


class WriteError(OSError):
    """Writing failed for want of room: the disk or a quota is full, or a file size limit was reached."""

    def __str__(self) -> str:  # the message alone: it is shown to the user as one line
        return str(self.strerror)


_NO_ROOM = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def room_error(err: BaseException, what: str | os.PathLike[str]) -> WriteError | None:
    """`err` as the one `WriteError` that names the file (the failing one when `err` knows it, else
    `what`) and the cause, if it is a failure for want of room; else None. Such a failure is an OSError
    with its errno, or safetensors' SafetensorError (not an OSError) quoting `os error N` when
    `save_pretrained` cannot write; a WriteError already says it all and is not wrapped again."""
    if isinstance(err, WriteError):
        return None
    if isinstance(err, OSError):
        code = err.errno
    else:
        found = re.search(r"os error (\d+)", str(err)) if type(err).__name__ == "SafetensorError" else None
        code = int(found.group(1)) if found else None
    if code not in _NO_ROOM:
        return None
    where = getattr(err, "filename", None) or what
    return WriteError(code, f"disk full or file size limit while writing {where} ({os.strerror(code)})")


@contextlib.contextmanager
def no_room(what: str | os.PathLike[str]) -> Iterator[None]:
    """Raise a failure for want of room while writing `what` as its `room_error`; others pass unchanged."""
    try:
        yield
    except Exception as err:
        error = room_error(err, what)
        if error is None:
            raise
        raise error from err


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write to a temp file in the same folder, fsync, then `os.replace` it over `path`.

    The file gets the permissions a plain `open` would give it: `mkstemp` makes temp files private
    (0600), and a shared model folder nobody else can read is a surprise.
    """
    path = Path(path)
    with no_room(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o666 & ~_UMASK)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data.encode("utf-8") if isinstance(data, str) else data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write(path, json.dumps(obj, indent=2) + "\n")


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def waiting_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive `flock` on `path` (created if missing, left in place), waiting for other holders:
    for read-modify-write updates of one shared file by processes that must all get their turn."""
    import fcntl

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


class LockedError(OSError):
    """Another process holds the lock: what it guards is being written right now."""


class ExclusiveLock:
    """An exclusive, non-blocking `flock` on a lock file beside what it guards, removed on release.

    Taking it fails at once (`LockedError`) when another process holds it, so a second run on the same
    output stops before touching anything; with `wait=True` it waits for the holder instead (a study
    waiting for a cell another study is training). The file is unlinked on release; a process that opened it
    just before that would lock a file no longer at the path, so taking the lock checks that the path
    still names the locked file, and tries again if not. The kernel releases the lock if the process dies.
    """

    def __init__(self, path: str | Path, what: str, *, wait: bool = False) -> None:
        import fcntl

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise LockedError(f"another childtune process is writing {what} (it holds {self.path}); "
                                  "wait for it to finish or choose another --output") from None
            held = os.fstat(fd)
            try:
                now = os.stat(self.path)
            except FileNotFoundError:
                os.close(fd)
                continue
            if (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino):
                self._fd: int | None = fd
                return
            os.close(fd)

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> ExclusiveLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
