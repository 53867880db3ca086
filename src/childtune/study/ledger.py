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
torn last line: one without its newline that is not JSON (a prefix of a JSON object never is).
Reading skips it with a warning (it is the one record that was not finished) and the next append cuts
it off before writing; a complete last line that only lacks its newline is kept and ended instead.
Any other line that is not a record is an error naming its line and field.

A shared ledger must stay readable by every version that shares it, so two kinds of complete record
are skipped with one warning each and kept in the file, never cut or refused: a record of a newer
format (`version` above `VERSION`: this version cannot interpret it) or of a newer childtune (a setting
this version's `TrainConfig` lacks: a study still running older code reads its neighbours' records), and
a record whose scores are
not valid (missing, null, NaN, not a number, or outside their range: accuracy 7.0), whose cell then
counts as not run and is trained again (the first valid record of a cell wins). `Ledger.skipped`
lists both, and the study's report says how many it skipped and why. Refusing the whole ledger
instead would stop every study sharing it over one line. `append` checks a record the same way first,
so this version never writes one it would skip.

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
import math
import os
import subprocess
import warnings
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from childtune.data.metrics import RANGES
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
        "recorded_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


class Ledger:
    """The records of one ledger file, by settings hash as this version computes it (the first record
    of a hash wins: a cell is run once)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.records: dict[str, dict[str, Any]] = {}
        self.skipped: list[str] = []
        """`line N: why` for each complete record this version skipped (newer format, invalid scores)."""
        self.reload()

    def reload(self) -> None:
        self.records, self.skipped = {}, []
        if not self.path.is_file():
            return
        *lines, tail = self.path.read_bytes().split(b"\n")
        if tail and _parse(tail) is None:  # a torn last line: the one record a crash did not finish
            warnings.warn(f"{self.path}:{len(lines) + 1}: skipping an unfinished last record", stacklevel=2)
        elif tail:
            lines.append(tail)  # complete, only its newline missing
        newer, invalid = [], []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            raw = _parse(line)
            if _version(raw) > VERSION:
                newer.append(f"line {number}: a record of a newer ledger format (version {raw['version']})")
                continue
            if unknown := _unknown_settings(raw):
                newer.append(f"line {number}: a record of a newer childtune (settings {', '.join(unknown)})")
                continue
            try:
                record = _check(raw)
                check_metrics(record["metrics"])
            except MetricsError as err:
                invalid.append(f"line {number}: {err}")
                continue
            except (LedgerError, ConfigError) as err:
                raise LedgerError(f"{self.path}:{number}: not a ledger record: {err}") from None
            self.records.setdefault(_index(record), record)
        self.skipped = newer + invalid
        self._warn(newer, invalid)

    def _warn(self, newer: list[str], invalid: list[str]) -> None:
        """One warning per kind of skipped record, naming the first few."""
        if newer:
            warnings.warn(f"{self.path}: skipping {len(newer)} record(s) this childtune cannot interpret (it reads "
                          f"version {VERSION}; they are kept as they are, upgrade to use them): {_few(newer)}",
                          stacklevel=3)
        if invalid:
            warnings.warn(f"{self.path}: skipping {len(invalid)} record(s) with invalid scores (their cells count "
                          f"as not run): {_few(invalid)}", stacklevel=3)

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
        """Add one record as one line, under an exclusive lock, durable when this returns. The record is
        checked as a reader will see it first: one that reading would refuse or skip is refused here."""
        try:
            check_metrics(record.get("metrics"))
            text = json.dumps(record, sort_keys=True, allow_nan=False)
            written = _check(json.loads(text))
        except (ValueError, TypeError, ConfigError) as err:  # LedgerError is a ValueError, as is a NaN elsewhere
            cell = " ".join(str(record.get(k)) for k in ("experiment", "task", "method"))
            raise LedgerError(f"{self.path}: not recording {cell} seed {record.get('seed')}: {err}") from None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, _end_last_line(fd) + text.encode("utf-8") + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)  # releases the lock
        self.records.setdefault(_index(written), written)


def _end_last_line(fd: int) -> bytes:
    """Make the next record start a line: drop a torn last line (a crash mid-append), or return the
    newline a complete last line lacks. Complete lines, of any version, are never cut."""
    size = os.fstat(fd).st_size
    if not size or os.pread(fd, 1, size - 1) == b"\n":
        return b""
    start = size
    while start:
        chunk = os.pread(fd, min(start, 1 << 16), max(0, start - (1 << 16)))
        start -= len(chunk)
        if (cut := chunk.rfind(b"\n")) >= 0:
            start += cut + 1
            break
    if _parse(os.pread(fd, size - start, start)) is not None:
        return b"\n"
    os.ftruncate(fd, start)
    return b""


def _parse(line: bytes) -> Any:
    """A line's JSON value, or None for a line that is not JSON (also what a JSON `null` line reads as:
    not a record either way)."""
    try:
        return json.loads(line.decode("utf-8"))
    except ValueError:  # also UnicodeDecodeError
        return None


def _version(raw: Any) -> int | float:
    """The record's format version, or -inf when it has no readable one (`_check` then says why)."""
    version = raw.get("version") if isinstance(raw, dict) else None
    return version if isinstance(version, int) and not isinstance(version, bool) else -math.inf


def _few(reasons: list[str]) -> str:
    return "; ".join(reasons[:3]) + ("; ..." if len(reasons) > 3 else "")


class MetricsError(LedgerError):
    """A record whose scores are missing or not valid: reading skips it, appending refuses it."""


COSTS = ("changed_params", "total_params", "train_time_s", "peak_rss_mib", "optimizer_state_bytes")
"""The sizes and costs a report reads beside the scores: each, when recorded, a finite number >= 0."""


def check_metrics(metrics: Any) -> None:
    """What a report reads of a record: the primary metric on dev, test and every transfer target, and
    every other score beside it, each a finite number within its range (`childtune.data.metrics.RANGES`),
    and the `COSTS` it has."""
    if not isinstance(metrics, dict):
        raise MetricsError(f"field 'metrics' must be an object, got {metrics!r}")
    primary = metrics.get("primary_metric")
    if not isinstance(primary, str):
        raise MetricsError(f"field 'metrics.primary_metric' must be a metric name, got {primary!r}")
    transfer = metrics.get("transfer", {})
    if not isinstance(transfer, dict):
        raise MetricsError(f"field 'metrics.transfer' must be an object, got {transfer!r}")
    splits = {"dev": metrics.get("dev"), "test": metrics.get("test"),
              **{f"transfer.{k}": v for k, v in transfer.items()}}
    for split, scores in splits.items():
        if not isinstance(scores, dict) or primary not in scores:
            raise MetricsError(f"field 'metrics.{split}' must hold the primary metric {primary!r}, got {scores!r}")
        for name, value in scores.items():
            _check_number(f"metrics.{split}.{name}", value, *RANGES.get(name, (-math.inf, math.inf)))
    for name in COSTS:
        if metrics.get(name) is not None:
            _check_number(f"metrics.{name}", metrics[name], 0.0, math.inf)


def _check_number(field: str, value: Any, low: float, high: float) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise MetricsError(f"field {field!r} must be a finite number, got {value!r}")
    if not low <= value <= high:
        raise MetricsError(f"field {field!r} = {value!r} is outside [{low:g}, {high:g}]")


def _unknown_settings(raw: Any) -> list[str]:
    """Settings a record's config has that this version's `TrainConfig` lacks: a newer childtune wrote it
    (a field added since), in the same ledger format. Such a cell is none of this version's (its settings
    are not this version's to run), so it is skipped with the newer-format ones, never refused: a study
    still running older code must not stop at another study's record."""
    config = raw.get("config") if isinstance(raw, dict) else None
    if not isinstance(config, dict):
        return []
    known = {f.name for f in fields(TrainConfig)}
    return sorted(k for k in config if k not in known)


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
