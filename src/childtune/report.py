"""Results on disk: atomic files, run folders that appear whole or not at all, and the compare grid's report.

Every file a run or a comparison leaves is written to a temporary name and renamed into place, and a
run folder is built under a hidden name and renamed when complete: a crash, a Ctrl-C or a bad input
half way leaves either the previous results or nothing, never a folder that looks like a run but is not.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from childtune.checkpoint import checkpoint_dir
from childtune.fileio import atomic_write, write_json

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


# ---------------------------------------------------------------------------------------------- summary


@dataclass
class Stat:
    mean: float
    std: float  # sample standard deviation over seeds; NaN with one seed
    n: int

    def __str__(self) -> str:
        if math.isnan(self.mean):
            return "n/a"
        return f"{self.mean:.4f}" if self.n < 2 else f"{self.mean:.4f} ± {self.std:.4f}"


def _stat(values: Sequence[float]) -> Stat:
    values = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not values:
        return Stat(math.nan, math.nan, 0)
    return Stat(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan, len(values))


def primary_split(runs: Sequence[dict[str, Any]]) -> str:
    """Report test metrics when every run has a test split, else dev."""
    return "test" if runs and all(r.get("test") for r in runs) else "dev"


def summarize(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per method (in first-seen order): mean and std over seeds of every metric and count."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_method.setdefault(run["method"], []).append(run)
    rows = []
    for method, group in by_method.items():
        row: dict[str, Any] = {"method": method, "n": len(group), "seeds": [r["seed"] for r in group]}
        for split in ("test", "dev"):
            names = sorted({k for r in group for k in (r.get(split) or {})})
            for name in names:
                row[f"{split}_{name}"] = _stat([(r.get(split) or {}).get(name, math.nan) for r in group])
        for key in ("changed_params", "child_params", "trainable_params", "train_time_s"):
            row[key] = _stat([r.get(key) if r.get(key) is not None else math.nan for r in group])
        rows.append(row)
    return rows


def format_table(runs: Sequence[dict[str, Any]]) -> str:
    """A plain-text table: the primary metric first, then the other metrics, sizes and time."""
    if not runs:
        return "(no runs)"
    rows = summarize(runs)
    split, primary = primary_split(runs), runs[0]["primary_metric"]
    others = sorted({k[len(split) + 1 :] for row in rows for k in row if k.startswith(f"{split}_")} - {primary})
    columns = [("method", lambda r: r["method"]), ("seeds", lambda r: str(r["n"])),
               (f"{split} {primary}", lambda r: str(r.get(f"{split}_{primary}", "n/a")))]
    columns += [(f"{split} {m}", lambda r, m=m: str(r.get(f"{split}_{m}", "n/a"))) for m in others]
    if split == "test":
        columns.append((f"dev {primary}", lambda r: str(r.get(f"dev_{primary}", "n/a"))))
    columns += [("changed params", lambda r: _count(r["changed_params"].mean)),
                ("train time (s)", lambda r: f"{r['train_time_s'].mean:.0f}")]
    cells = [[name for name, _ in columns]] + [[get(r) for _, get in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    head = (f"task {runs[0]['task']}, {runs[0]['train_examples']} training examples; "
            f"mean ± std over seeds ({split} split)")
    return head + "\n" + "\n".join(lines)


def _count(n: float) -> str:
    if math.isnan(n):
        return "n/a"
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,.0f}"


def summary_csv(runs: Sequence[dict[str, Any]]) -> str:
    rows = summarize(runs)
    keys = [k for k in dict.fromkeys(k for row in rows for k in row) if k not in ("method", "n", "seeds")]
    header = ["method", "n", "seeds"] + [f"{k}_{part}" for k in keys for part in ("mean", "std")]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        line = [row["method"], row["n"], " ".join(map(str, row["seeds"]))]
        for k in keys:
            stat = row.get(k, Stat(math.nan, math.nan, 0))
            line += [_num(stat.mean), _num(stat.std)]
        writer.writerow(line)
    return out.getvalue()


def runs_csv(runs: Sequence[dict[str, Any]]) -> str:
    """One row per run, every metric flattened (`test_accuracy`, ...): the input to paired tests."""
    flat = []
    for run in runs:
        row = {k: v for k, v in run.items() if not isinstance(v, dict | type(None))}
        for split in ("dev", "test"):
            row.update({f"{split}_{k}": v for k, v in (run.get(split) or {}).items()})
        flat.append(row)
    header = list(dict.fromkeys(k for row in flat for k in row))
    out = io.StringIO()
    writer = csv.DictWriter(out, header, lineterminator="\n")
    writer.writeheader()
    writer.writerows(flat)
    return out.getvalue()


def _percent(share: float) -> str:
    return f"{share:.0f}%" if share >= 10 else f"{share:.1f}%" if share >= 1 else f"{share:.2g}%"


def _num(x: float) -> str:
    return "" if math.isnan(x) else f"{x:.6g}"


def plot(runs: Sequence[dict[str, Any]]) -> bytes:
    """PNG: the primary metric (mean ± std over seeds) per method, and the share of weights each changed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summarize(runs)
    split, primary = primary_split(runs), runs[0]["primary_metric"]
    names = [r["method"] for r in rows]
    means = [r[f"{split}_{primary}"].mean for r in rows]
    stds = [0.0 if math.isnan(r[f"{split}_{primary}"].std) else r[f"{split}_{primary}"].std for r in rows]
    total = runs[0]["total_params"]
    shares = [100 * r["changed_params"].mean / total for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(4 + 1.6 * len(rows), 4.2), dpi=120)
    colors = plt.get_cmap("tab10").colors
    xs = range(len(rows))
    left.bar(xs, means, yerr=stds, capsize=6, color=[colors[i % 10] for i in xs], edgecolor="black")
    low = min(m - s for m, s in zip(means, stds, strict=True))
    high = max(m + s for m, s in zip(means, stds, strict=True))
    pad = max(0.02, 0.15 * (high - low))
    left.set_ylim(max(low - 3 * pad, min(0.0, low)), high + 2 * pad)
    for x, m, s in zip(xs, means, stds, strict=True):
        left.text(x, m + s + pad / 3, f"{m:.3f}", ha="center", va="bottom", fontsize=9)
    left.set_title(f"{runs[0]['task']}: {split} {primary} (mean ± std, {rows[0]['n']} seed(s))", fontsize=10)
    left.set_ylabel(f"{split} {primary}")
    right.bar(xs, shares, color=[colors[i % 10] for i in xs], edgecolor="black")
    right.set_yscale("log")
    right.set_ylim(min(s for s in shares if s > 0) / 3 if any(s > 0 for s in shares) else 1e-3, 300)
    for x, s in zip(xs, shares, strict=True):
        right.text(x, max(s, 1e-9) * 1.15, _percent(s), ha="center", va="bottom", fontsize=9)
    right.set_title("weights changed by the run (% of model)", fontsize=10)
    right.set_ylabel("% of parameters changed (log scale)")
    for ax in (left, right):
        ax.set_xticks(list(xs), names, rotation=20 if len(rows) > 4 else 0)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- compare


@dataclass
class Comparison:
    runs: list[dict[str, Any]]
    table: str
    output: Path


def compare(base, methods: Sequence[str], seeds: Sequence[int], output: str | os.PathLike, *,
            overwrite: bool = False, run: Callable[..., dict[str, Any]] | None = None) -> Comparison:
    """Train every (method, seed) of the grid from `base` (a TrainConfig) and report them side by side.

    Writes `runs/<method>-seed<k>/` (each a full run folder), `runs.csv` (one row per run),
    `summary.csv` (mean and std per method), `summary.png` and `table.txt`, all in one folder that
    appears only when the whole grid is done. `run` is the training function (default `train.train`).
    """
    from childtune.train import train

    run = run or train
    if not methods or not seeds:
        raise ValueError("compare needs at least one method and one seed")
    if len(set(methods)) != len(methods) or len(set(seeds)) != len(seeds):
        raise ValueError("compare got a method or seed twice")
    configs = [replace(base, method=m, seed=s, output=None, overwrite=False) for m in methods for s in seeds]
    for config in configs:
        config.resolved()  # every cell's config is checked before the first one trains
    runs = []
    with RunFolder(output, overwrite) as work:
        write_json(work / "compare.json", {"methods": list(methods), "seeds": list(seeds),
                                           "base": base.to_dict()})
        for config in configs:
            name = f"{config.method}-seed{config.seed}"
            runs.append(run(replace(config, output=str(work / "runs" / name))))
            # the run was built inside the hidden folder; its config must name where it will live
            replace(config, output=str(Path(output) / "runs" / name)).save_json(work / "runs" / name / "config.json")
        table = format_table(runs)
        atomic_write(work / "runs.csv", runs_csv(runs))
        atomic_write(work / "summary.csv", summary_csv(runs))
        atomic_write(work / "summary.png", plot(runs))
        atomic_write(work / "table.txt", table + "\n")
    return Comparison(runs, table, Path(output))
