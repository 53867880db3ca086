"""Multi-task cells in a study's report: each task's scores as a row beside that task's single-task runs,
and the bytes a user stores to serve all the tasks.

A multi-task run (`childtune.multitask`) is one ledger record whose metrics hold every task's scores
(`metrics["tasks"]`) and one score for the run (their mean). `per_task` adds one record per task it
trained, named `<method> in <a+b+c> (<config>)`, so the results table sets it beside the same task's
single-task runs and pairs it by seed with the baseline (run the study with `--baseline child-d` to test
it against single-task child-d). `stored_points` (a table and a plot) compares what is stored and what it
scores: a multi-task run's shared delta plus every task's own, against the sum of the single-task runs'
deltas (or models) over the same tasks.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from childtune.study.plan import Record
from childtune.study.tables import fmt, save_figure

_COSTS = ("train_time_s", "peak_rss_mib", "stored_bytes")


def per_task(records: Sequence[Record]) -> list[Record]:
    """`records`, then one record per task of each multi-task run (module docstring)."""
    out = list(records)
    for record in records:
        tasks = record.metrics.get("tasks")
        if not isinstance(tasks, dict):
            continue
        costs = {key: record.metrics[key] for key in _COSTS if key in record.metrics}  # the whole run's
        for name, scores in tasks.items():
            cell = replace(record.cell, task=name, overrides=(),
                           method=f"{record.cell.method} in {record.cell.task} ({record.cell.label})")
            out.append(Record(cell, {**scores, **costs}))
    return out


def stored_points(records: Sequence[Record]) -> list[tuple[str, float, float]]:
    """(label, mean bytes stored for all tasks, mean test score over the tasks) for each multi-task run's
    config (its score: the mean of its tasks' primary metrics), and for each single-task method run on every
    one of its tasks (its bytes summed over the tasks, its scores averaged); NaN where a score is missing."""
    several = [r for r in records if isinstance(r.metrics.get("tasks"), dict)]
    groups: dict[tuple[str, str, str], list[Record]] = {}
    for r in several:
        groups.setdefault((r.cell.task, r.cell.method, r.cell.label), []).append(r)
    single: dict[tuple[str, str], list[Record]] = {}
    for r in records:
        if not isinstance(r.metrics.get("tasks"), dict) and isinstance(r.metrics.get("stored_bytes"), int):
            single.setdefault((r.cell.task, r.cell.method), []).append(r)
    points = [(f"{method} at once ({label})", _mean([r.metrics["stored_bytes"] for r in rs]),
               _mean([r.score("test") for r in rs])) for (_, method, label), rs in groups.items()]
    for tasks in dict.fromkeys(task for task, _, _ in groups):
        names = tasks.split("+")
        for method in dict.fromkeys(m for _, m in single):
            if all((name, method) in single for name in names):
                points.append((f"{method}, one run per task",
                               sum(_mean([r.metrics["stored_bytes"] for r in single[(n, method)]]) for n in names),
                               _mean([_mean([r.score("test") for r in single[(n, method)]]) for n in names])))
    return points


def _mean(values: Sequence[float]) -> float:
    finite = [float(v) for v in values if v == v]
    return statistics.fmean(finite) if finite else float("nan")


def bytes_table(points: Sequence[tuple[str, float, float]]) -> str:
    """Markdown of `stored_points`."""
    lines = ["| method | bytes stored for all tasks | mean test score over the tasks |", "|---|---|---|"]
    lines += [f"| {label} | {stored:,.0f} | {fmt(score)} |" for label, stored, score in points]
    return "\n".join(lines)


def bytes_plot(points: Sequence[tuple[str, float, float]], path: Path) -> Path:
    """Score against bytes stored (log scale), a labelled dot per method: what each way of serving the tasks
    costs a user and what it scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), constrained_layout=True)
    for label, stored, score in points:
        ax.scatter([stored], [score], s=24, zorder=3)
        ax.annotate(label, (stored, score), xytext=(5, 3), textcoords="offset points", fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("bytes stored for all tasks (besides the base)")
    ax.set_ylabel("mean test score over the tasks")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)
