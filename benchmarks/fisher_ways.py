"""Fisher information's estimates timed side by side on the same batches: the authors' per-batch pass
against per-example scores by layer (childtune's default way) and by torch.func's vmap."""

from __future__ import annotations

import contextlib
import statistics
import warnings

from timing import Section, interleaved, timing_rows

from childtune.fisher import PerExampleFallbackWarning, fisher_information, per_example

BASE, LAYERS, VMAP = "per-batch (authors')", "per-example, by layer (the default)", "per-example, vmap"
TARGET = 1.5  # issue 15: per-example scoring at most 1.5x the per-batch estimate


def fisher_ways_section(title: str, setting: str, model, batches: list[dict], repeats: int, **kw) -> Section:
    """One row per estimate over `batches` (median of `repeats` interleaved passes after one warm-up), the
    by-layer way held to `TARGET`; `kw` goes to `fisher_information` (e.g. `scored`)."""
    count = sum(len(b["labels"]) for b in batches)
    fell_back: list[str] = []

    def score(order):
        def run():
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", PerExampleFallbackWarning)
                with _ways(order):
                    fisher_information(model, batches, per_example=order is not None, progress=False, **kw)
            fell_back.extend(str(w.message) for w in caught if issubclass(w.category, PerExampleFallbackWarning))
        return run

    times = interleaved({BASE: score(None), LAYERS: score(per_example.ORDER), VMAP: score(("vmap", "loop"))},
                        repeats, 1, title)
    section = Section(
        title, f"{setting} Each estimate in turn over the same {count} examples, median of {repeats} interleaved "
        "passes after 1 warm-up. Per-example scores by layer: one backward of the batch, weight gradients taken "
        "apart by example; by vmap: torch.func over the whole model, one example per lane.",
        ["estimate", "median ms", "ratio vs per-batch", "spread", "per example (ms)", "target"],
        timing_rows(times, BASE, {LAYERS: (TARGET, f"<= {TARGET}")}))
    for row in section.rows:
        row.cells.insert(3, f"{1e3 * statistics.median(times[row.label]) / count:.1f}")
    if fell_back:
        section.notes.append(f"A per-example way fell back: {fell_back[0]}")
    return section


@contextlib.contextmanager
def _ways(order):
    """childtune.fisher.per_example tries the ways in `order` while inside (None: as they are)."""
    saved = per_example.ORDER
    per_example.ORDER = saved if order is None else tuple(order)
    try:
        yield
    finally:
        per_example.ORDER = saved
