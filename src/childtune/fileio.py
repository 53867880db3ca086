"""Writing files so that a crash never leaves a half-written one, and hashing them.

Every result childtune writes (metrics, deltas, checkpoints, plots, cached downloads) goes through
`atomic_write`: a reader sees the old file or the new one, never a torn mix, and a failed run leaves
nothing that looks like a finished one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once at import: the only portable way to learn the umask is to set it


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write to a temp file in the same folder, fsync, then `os.replace` it over `path`.

    The file gets the permissions a plain `open` would give it: `mkstemp` makes temp files private
    (0600), and a shared model folder nobody else can read is a surprise.
    """
    path = Path(path)
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
