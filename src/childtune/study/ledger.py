"""The study ledger: one JSON line per finished cell, appended atomically to a file meant to be committed.

Run folders hold weights and do not survive a change of machine; the ledger holds everything a report
needs (the full resolved config, seed, dev/test/transfer metrics, weights changed, train time, peak
memory, optimizer state bytes, the code version and the device), so CPU hours spent on one machine are
kept on the next. The study plans from it: a cell whose settings hash is in the ledger is not trained
again, and `childtune study --report-only` rebuilds the report from the ledger alone.

A cell is identified by the sha256 of its resolved config without the keys about where and how it
was written or shown (`settings_hash`), so a record is reused only for exactly the settings it was
made with. The hash is recomputed from each record's config as this version reads it
(`TrainConfig.from_dict` fills in fields added since), so a new field whose default keeps the old
behaviour does not orphan old records; the `hash` stored in the line is the one it was written with.

Appends take an exclusive `flock` and write each line with one `write` on an `O_APPEND` descriptor,
then `fsync`: two studies sharing a ledger interleave whole lines, and a crash can at worst leave a
torn last line, which reading skips with a warning (it is the one record that was not finished) and
the next append cuts off before writing. Any other line that is not a record is an error.

Several studies can share one ledger at once (one per core, each with its own `--output`): a study
*claims* a cell before training it (`Ledger.claim`, a lock file named by the settings hash beside the
ledger) and rereads the ledger under the claim, so a cell is trained and recorded once however many
studies plan it; a study that finds a cell claimed goes on with the others and waits for it at the end.
"""

from __future__ import annotations

import datetime
import fcntl
import functools
import hashlib
import json
import os
import subprocess
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from childtune.fileio import ExclusiveLock
from childtune.training.config import NOT_SETTINGS, ConfigError, TrainConfig

VERSION = 1


class LedgerError(ValueError):
    """A ledger line that is not a record this version can read."""


def settings(config: TrainConfig) -> dict[str, Any]:
    """The resolved config as a JSON-ready dict, without the keys that do not change the result."""
    return {k: v for k, v in config.resolved().to_dict().items() if k not in NOT_SETTINGS}


def settings_hash(config: TrainConfig, context: Mapping[str, Any] | None = None) -> str:
    """sha256 of the settings, plus `context`: what else the cell computed beyond the run itself (the
    transfer experiment's targets), so a transfer cell never stands in for the plain run it trains."""
    identity = {**settings(config), **({"context": dict(context)} if context else {})}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _index(record: Mapping[str, Any]) -> str:
    return settings_hash(TrainConfig.from_dict(record["config"]), record.get("context") or None)


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The git commit of the childtune source (with `+dirty` for uncommitted changes), else the package version."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", str(here.parent)], cwd=here,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"childtune {version('childtune')}"
        except PackageNotFoundError:
            return "unknown"


def make_record(key: Mapping[str, Any], config: TrainConfig, metrics: Mapping[str, Any],
                context: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One ledger line: the cell's key (experiment, task, method, overrides, seed), its settings, context
    and hash, its metrics, and where and when it was made."""
    return {
        "version": VERSION, "hash": settings_hash(config, context), **key, "config": settings(config),
        "context": dict(context or {}),
        "metrics": dict(metrics), "code_version": code_version(), "device": metrics.get("device", "cpu"),
        "recorded_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


class Ledger:
    """The records of one ledger file, by settings hash as this version computes it (the first record
    of a hash wins: a cell is run once)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.records: dict[str, dict[str, Any]] = {}
        self.reload()

    def reload(self) -> None:
        self.records = {}
        if not self.path.is_file():
            return
        lines = self.path.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = _check(json.loads(line))
            except (ValueError, ConfigError) as err:
                if number == len(lines):  # a torn last line: the one record a crash did not finish
                    warnings.warn(f"{self.path}:{number}: skipping an unfinished last record ({err})", stacklevel=2)
                    continue
                raise LedgerError(f"{self.path}:{number}: not a ledger record: {err}") from None
            self.records.setdefault(_index(record), record)

    def get(self, config: TrainConfig, context: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        return self.records.get(settings_hash(config, context))

    def claim(self, config: TrainConfig, context: Mapping[str, Any] | None = None, *,
              wait: bool = False) -> ExclusiveLock:
        """Hold this cell against other studies sharing the ledger while it is trained and recorded:
        raises `childtune.fileio.LockedError` at once if another holds it, or waits with `wait=True`.
        The kernel drops the claim of a process that dies, so a killed study's cell is not lost."""
        claims = self.path.parent / f".{self.path.name}.claims"
        return ExclusiveLock(claims / f"{settings_hash(config, context)}.lock", "this ledger cell", wait=wait)

    def append(self, record: Mapping[str, Any]) -> None:
        """Add one record as one line, under an exclusive lock, durable when this returns."""
        line = (json.dumps(record, sort_keys=True) + "\n").encode("utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            _cut_torn_tail(fd)
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)  # releases the lock
        self.records.setdefault(_index(record), dict(record))


def _cut_torn_tail(fd: int) -> None:
    """Drop an unfinished last line (no newline: a crash mid-append), so the next record starts a line."""
    size = os.fstat(fd).st_size
    if not size or os.pread(fd, 1, size - 1) == b"\n":
        return
    tail = os.pread(fd, min(size, 1 << 20), max(0, size - (1 << 20)))
    cut = tail.rfind(b"\n")
    os.ftruncate(fd, 0 if cut < 0 and size <= len(tail) else size - len(tail) + cut + 1)


def _check(raw: Any) -> dict[str, Any]:
    """A record's fields and types, and a config this version can run."""
    if not isinstance(raw, dict):
        raise LedgerError("a record must be a JSON object")
    if raw.get("version") != VERSION:
        raise LedgerError(f"record version {raw.get('version')!r}, this childtune reads {VERSION}")
    kinds = {"hash": str, "experiment": str, "task": str, "method": str, "overrides": list, "seed": int,
             "config": dict, "metrics": dict, "code_version": str, "device": str}
    for key, kind in kinds.items():
        if not isinstance(raw.get(key), kind) or isinstance(raw.get(key), bool):
            raise LedgerError(f"field {key!r} must be {kind.__name__}, got {raw.get(key)!r}")
    TrainConfig.from_dict(raw["config"]).resolved()
    return raw
