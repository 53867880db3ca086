"""Multi-task cells in a study's report: each task's scores as a row beside that task's single-task runs,
and the bytes a user stores to serve all the tasks.

A multi-task run (`childtune.multitask`) is one ledger record whose metrics hold every task's scores
(`metrics["tasks"]`) and one score for the run (their mean). `per_task` adds one record per task it
trained, named `<method> in <a+b+c> (<config>)`, so the results table sets it beside the same task's
single-task runs and pairs it by seed with the baseline (run the study with `--baseline child-d` to test
it against single-task child-d). `bytes_table` compares what is stored: a multi-task run's shared delta plus
every task's own, against the sum of the single-task runs' deltas (or models) over the same tasks.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import replace

from childtune.study.plan import Record

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


def bytes_table(records: Sequence[Record]) -> str:
    """Markdown: for each multi-task run's config, the mean bytes it stores for all its tasks, and for each
    single-task method run on every one of those tasks, the sum over them of its mean bytes per task."""
    several = [r for r in records if isinstance(r.metrics.get("tasks"), dict)]
    if not several:
        return ""
    lines = ["| tasks | method | config | bytes stored for all tasks |", "|---|---|---|---|"]
    groups: dict[tuple[str, str, str], list[float]] = {}
    for r in several:
        groups.setdefault((r.cell.task, r.cell.method, r.cell.label), []).append(float(r.metrics["stored_bytes"]))
    single: dict[tuple[str, str], list[float]] = {}
    for r in records:
        if not isinstance(r.metrics.get("tasks"), dict) and isinstance(r.metrics.get("stored_bytes"), int):
            single.setdefault((r.cell.task, r.cell.method), []).append(float(r.metrics["stored_bytes"]))
    for (tasks, method, label), values in groups.items():
        lines.append(f"| {tasks} | {method} (multi-task) | {label} | {statistics.fmean(values):,.0f} |")
    for tasks in dict.fromkeys(task for task, _, _ in groups):
        names = tasks.split("+")
        for method in dict.fromkeys(m for _, m in single):
            if all((name, method) in single for name in names):
                total = sum(statistics.fmean(single[(name, method)]) for name in names)
                lines.append(f"| {tasks} | {method} (one run per task) | | {total:,.0f} |")
    return "\n".join(lines)
