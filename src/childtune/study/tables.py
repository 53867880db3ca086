"""Every table, CSV file and plot of results, for `compare` and the study alike.

Two views of finished runs live here. `compare`'s: every metric per method as mean ± std over seeds
(`summarize`, `format_table`, `summary_csv`, `runs_csv`, `plot`). The study's: one `Row` per (task,
method) with the config selected on dev and a paired test against the baseline (`write_summary_csv`,
`write_runs_csv`, `plot_rows`, `markdown_table`). They share the number formats, the CSV writer and
the atomic PNG writer below, so a figure or a percentage reads the same wherever it appears.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from childtune.fileio import atomic_write
from childtune.study.plan import BASELINE, Record
from childtune.study.stats import Paired

# ---------------------------------------------------------------------------------------------- formats


def fmt(x: float | None, digits: int = 4) -> str:
    """A number to `digits` significant digits; empty for a missing value (None or NaN)."""
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}g}"


def percent(share: float) -> str:
    """A share in [0, 1] as a percentage that keeps small shares readable: 30%, 2.5%, 0.014%."""
    if math.isnan(share):
        return ""
    value = 100 * share
    return f"{value:.0f}%" if value >= 10 else f"{value:.1f}%" if value >= 1 else f"{value:.2g}%"


def megabytes(n: float) -> str:
    """A byte count in MB (10^6), empty when missing."""
    return "" if math.isnan(n) else f"{n / 1e6:.3g} MB"


def write_csv(path: str | Path, header: Iterable[str], rows: Iterable[Iterable]) -> Path:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return atomic_write(path, buffer.getvalue())


def save_figure(fig, path: str | Path) -> Path:
    """Render to memory first, so the PNG on disk is replaced whole (`fileio.atomic_write`)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=130, bbox_inches="tight")
    finally:
        plt.close(fig)
    return atomic_write(path, buffer.getvalue())


# ---------------------------------------------------------------------------------------------- compare's view


@dataclass
class Stat:
    mean: float
    std: float  # sample standard deviation over seeds; NaN with one seed
    n: int

    def __str__(self) -> str:
        if math.isnan(self.mean):
            return "n/a"
        return f"{self.mean:.4f}" if self.n < 2 else f"{self.mean:.4f} ± {self.std:.4f}"


def _stat(values: Sequence[float | None]) -> Stat:
    kept = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not kept:
        return Stat(math.nan, math.nan, 0)
    return Stat(statistics.fmean(kept), statistics.stdev(kept) if len(kept) > 1 else math.nan, len(kept))


def primary_split(runs: Sequence[dict[str, Any]]) -> str:
    """Report test metrics when every run has a test split, else dev."""
    return "test" if runs and all(r.get("test") for r in runs) else "dev"


def split_scores(run: dict[str, Any], split: str) -> dict[str, Any]:
    """A run's scores on `split`: its own metrics, and for a multi-task run (`childtune.multitask`, whose own
    is the tasks' mean) each task's primary metric as `task:metric`, so every table reports every task."""
    out = dict(run.get(split) or {})
    for task, scores in (run.get("tasks") or {}).items():
        value = (scores.get(split) or {}).get(scores["primary_metric"])
        if value is not None:
            out[f"{task}:{scores['primary_metric']}"] = value
    return out


def summarize(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per method (in first-seen order): mean and std over seeds of every metric and count."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_method.setdefault(run["method"], []).append(run)
    rows = []
    for method, group in by_method.items():
        row: dict[str, Any] = {"method": method, "n": len(group), "seeds": [r["seed"] for r in group]}
        for split in ("test", "dev"):
            names = sorted({k for r in group for k in split_scores(r, split)})
            for name in names:
                row[f"{split}_{name}"] = _stat([split_scores(r, split).get(name, math.nan) for r in group])
        for key in ("changed_params", "child_params", "trainable_params", "train_time_s"):
            row[key] = _stat([r.get(key) if r.get(key) is not None else math.nan for r in group])
        rows.append(row)
    return rows


def _cell(key: str) -> Callable[[dict[str, Any]], str]:
    """A table column's cell: the summary row's `key` as text, or n/a."""
    return lambda r: str(r.get(key, "n/a"))


def format_table(runs: Sequence[dict[str, Any]]) -> str:
    """A plain-text table: the primary metric first, then the other metrics, sizes and time."""
    if not runs:
        return "(no runs)"
    rows = summarize(runs)
    split, primary = primary_split(runs), runs[0]["primary_metric"]
    others = sorted({k[len(split) + 1 :] for row in rows for k in row if k.startswith(f"{split}_")} - {primary})
    columns: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("method", lambda r: r["method"]), ("seeds", lambda r: str(r["n"])),
        (f"{split} {primary}", _cell(f"{split}_{primary}"))]
    columns += [(f"{split} {m}", _cell(f"{split}_{m}")) for m in others]
    if split == "test":
        columns.append((f"dev {primary}", _cell(f"dev_{primary}")))
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
            line += [fmt(stat.mean, 6), fmt(stat.std, 6)]
        writer.writerow(line)
    return out.getvalue()


def runs_csv(runs: Sequence[dict[str, Any]]) -> str:
    """One row per run, every metric flattened (`test_accuracy`, ...): the input to paired tests."""
    flat = []
    for run in runs:
        row = {k: v for k, v in run.items() if not isinstance(v, dict | type(None))}
        for split in ("dev", "test"):
            row.update({f"{split}_{k}": v for k, v in split_scores(run, split).items()})
        flat.append(row)
    header = list(dict.fromkeys(k for row in flat for k in row))
    out = io.StringIO()
    writer = csv.DictWriter(out, header, lineterminator="\n")
    writer.writeheader()
    writer.writerows(flat)
    return out.getvalue()




def plot(runs: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """PNG: the primary metric (mean ± std over seeds) per method, and the share of weights each changed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summarize(runs)
    split, primary = primary_split(runs), runs[0]["primary_metric"]
    names = [r["method"] for r in rows]
    means = [r[f"{split}_{primary}"].mean for r in rows]
    stds = [0.0 if math.isnan(r[f"{split}_{primary}"].std) else r[f"{split}_{primary}"].std for r in rows]
    total = runs[0].get("total_params")  # a multi-task run counts its own parts instead (stored_bytes_by_part)
    shares = [100 * r["changed_params"].mean / total if total else math.nan for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(4 + 1.6 * len(rows), 4.2), dpi=120)
    colors = [plt.get_cmap("tab10")(i) for i in range(10)]  # its ten colours (RGBA)
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
        right.text(x, max(s, 1e-9) * 1.15, percent(s / 100), ha="center", va="bottom", fontsize=9)
    right.set_title("weights changed by the run (% of model)", fontsize=10)
    right.set_ylabel("% of parameters changed (log scale)")
    for ax in (left, right):
        ax.set_xticks(list(xs), names, rotation=20 if len(rows) > 4 else 0)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    fig.tight_layout()
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------- the study's view


@dataclass
class Row:
    """One (task, method) line of a results table: the selected config and its scores over seeds."""

    task: str
    method: str
    config: str
    configs_tried: int
    split: str
    metric: str
    seeds: list[int]
    scores: list[float]
    dev_mean: float
    paired: Paired | None = None
    p_holm: float = math.nan
    changed_share: float = math.nan
    train_time_s: float = math.nan
    peak_rss_mib: float = math.nan
    state_bytes: float = math.nan
    """Cost, each a mean over the seeds: training time, peak resident memory, optimizer state bytes."""

    @property
    def mean(self) -> float:
        return statistics.fmean(self.scores) if self.scores else math.nan

    @property
    def std(self) -> float:
        return statistics.stdev(self.scores) if len(self.scores) > 1 else math.nan


def write_runs_csv(records: Sequence[Record], path: Path) -> Path:
    """One row per run: the cell, the primary metric on dev, test and every transfer target, sizes, time."""
    targets = sorted({t for r in records for t in (r.metrics.get("transfer") or {})})
    header = ["experiment", "task", "method", "config", "seed", "metric", "dev", "test", *targets,
              "changed_params", "total_params", "train_time_s"]
    rows = [
        [r.cell.experiment, r.cell.task, r.cell.method, r.cell.label, r.cell.seed, r.metrics["primary_metric"],
         fmt(r.score("dev"), 6), fmt(r.score("test"), 6), *(fmt(r.score(t), 6) for t in targets),
         r.metrics.get("changed_params", ""), r.metrics.get("total_params", ""), r.metrics.get("train_time_s", "")]
        for r in records
    ]
    return write_csv(path, header, rows)


def write_summary_csv(rows: Sequence[Row], path: Path) -> Path:
    header = ["task", "method", "split", "config", "configs_tried", "n", "seeds", "dev_mean", "mean", "std",
              "changed_share", "diff_vs_baseline", "t", "p_ttest", "p_wilcoxon", "p_holm", "train_time_s",
              "peak_rss_mib", "optimizer_state_bytes"]
    out = []
    for row in rows:
        p = row.paired
        out.append([row.task, row.method, row.split, row.config, row.configs_tried, len(row.scores),
                    " ".join(map(str, row.seeds)), fmt(row.dev_mean, 6), fmt(row.mean, 6), fmt(row.std, 6),
                    fmt(row.changed_share, 4), fmt(p.mean_diff, 6) if p else "", fmt(p.t, 4) if p else "",
                    fmt(p.p_t, 4) if p else "", fmt(p.p_wilcoxon, 4) if p else "", fmt(row.p_holm, 4),
                    fmt(row.train_time_s, 4), fmt(row.peak_rss_mib, 5), fmt(row.state_bytes, 6)])
    return write_csv(path, header, out)


def plot_rows(rows: Sequence[Row], path: Path, title: str, baseline: str = BASELINE) -> Path:
    """One panel per task (`row.task`): each seed's score as a dot, mean ± std beside it, baseline dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[str, list[Row]] = {}
    for row in rows:
        panels.setdefault(row.task, []).append(row)
    cols = min(len(panels), 2)
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6.4 * cols, 3.8 * nrows), squeeze=False, constrained_layout=True)
    colors = [plt.get_cmap("tab10")(i) for i in range(10)]  # its ten colours (RGBA)
    for ax, (name, group) in zip(axes.ravel(), panels.items(), strict=False):
        for x, row in enumerate(group):
            if not row.scores:
                continue
            jitter = np.linspace(-0.12, 0.12, len(row.scores)) if len(row.scores) > 1 else np.zeros(1)
            ax.scatter(x + jitter, row.scores, s=16, color=colors[x % 10], alpha=0.75, zorder=3)
            ax.errorbar(x + 0.3, row.mean, yerr=0.0 if math.isnan(row.std) else row.std, fmt="o", color="black",
                        capsize=4, markersize=5, zorder=4)
            significant = row.paired is not None and row.paired.p_t < 0.05
            ax.annotate(f"{row.mean:.3f}{'*' if significant else ''}", (x + 0.3, row.mean), xytext=(6, 0),
                        textcoords="offset points", fontsize=8, va="center")
            if row.method == baseline:
                ax.axhline(row.mean, color="grey", linestyle="--", linewidth=1, zorder=1)
        ax.set_xticks(range(len(group)), [f"{r.method}\n{r.config}" for r in group], fontsize=7)
        ax.set_xlim(-0.5, len(group) - 0.1)
        ax.set_ylabel(f"{group[0].split} {group[0].metric}")
        ax.set_title(name, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{title}: dots = seeds, black = mean ± std, dashed = {baseline}, * = paired t-test p < 0.05",
                 fontsize=10)
    return save_figure(fig, path)


def markdown_table(rows: Sequence[Row], baseline: str) -> str:
    lines = ["| task | method | selected config (of tried) | seeds | mean ± std | Δ vs " + baseline
             + " | t-test p | Wilcoxon p | Holm p | weights changed | train time (s) | peak RSS (MiB) "
             "| optimizer state |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        p = row.paired
        spread = f"{row.mean:.4f} ± {row.std:.4f}" if len(row.scores) > 1 else fmt(row.mean)
        lines.append(
            f"| {row.task} | {row.method} | {row.config} ({row.configs_tried}) | {len(row.scores)} | {spread} | "
            + (f"{p.mean_diff:+.4f} | {fmt(p.p_t, 3)} | {fmt(p.p_wilcoxon, 3)} | {fmt(row.p_holm, 3)}"
               if p else " | | | ")
            + f" | {percent(row.changed_share)} | {fmt(row.train_time_s, 3)} | {fmt(row.peak_rss_mib, 4)} "
            f"| {megabytes(row.state_bytes)} |"
        )
    return "\n".join(lines)




def plot_curve(rows: Sequence[Row], sizes: dict[str, int], path: Path, baseline: str = BASELINE) -> Path:
    """Score against training-set size (log scale), a line of means per method and every seed as a dot.

    `sizes` maps each row's task name (e.g. `mr-n100`) to its training-set size; the right panel shows
    each method's difference to `baseline` at each size, the quantity the Child-Tuning paper says grows
    as data shrinks.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r.method for r in rows))
    colors = [plt.get_cmap("tab10")(i) for i in range(10)]  # its ten colours (RGBA)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    base = {sizes[r.task]: r for r in rows if r.method == baseline}
    for i, method in enumerate(methods):
        mine = sorted((sizes[r.task], r) for r in rows if r.method == method and r.scores)
        if not mine:
            continue
        xs = [n for n, _ in mine]
        offset = 1 + 0.04 * (i - (len(methods) - 1) / 2)  # methods side by side on the log axis
        for n, r in mine:
            left.scatter([n * offset] * len(r.scores), r.scores, s=12, color=colors[i % 10], alpha=0.5)
        left.plot([x * offset for x in xs], [r.mean for _, r in mine], "-o", color=colors[i % 10], label=method)
        if method != baseline:
            diffs = [(n, r.paired.mean_diff) for n, r in mine if r.paired is not None and n in base]
            if diffs:
                right.plot([n for n, _ in diffs], [d for _, d in diffs], "-o", color=colors[i % 10], label=method)
    metric = f"{rows[0].split} {rows[0].metric}" if rows else "score"
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xticks(sorted(set(sizes.values())), [str(n) for n in sorted(set(sizes.values()))])
        ax.set_xlabel("training examples")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    right.axhline(0.0, color="grey", linestyle="--", linewidth=1)
    left.set_ylabel(metric)
    left.set_title(f"{metric} by training-set size (dots: seeds; lines: means)", fontsize=10)
    right.set_ylabel(f"mean difference to {baseline} (paired by seed)")
    right.set_title(f"gain over {baseline}", fontsize=10)
    return save_figure(fig, path)
