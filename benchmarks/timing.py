"""The timing plumbing every table of `make bench` shares: rows and sections, interleaved repeats, ratios.

A ratio is the median over repeats of (mode / baseline) within the same repeat, the modes timed in turn in
an order rotated every repeat: other jobs on a shared CPU then slow both sides alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tqdm.auto import tqdm


@dataclass
class Row:
    label: str
    cells: list[str]
    verdict: str = ""  # PASS, MISS or "" (information only)


@dataclass
class Section:
    title: str
    intro: str
    header: list[str]
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int, desc: str,
                before: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Seconds per call of each fn, all timed within every repeat in a rotating order."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            before()
            fns[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in tqdm(range(repeats), desc=desc, leave=False):
        for name in names[r % len(names):] + names[: r % len(names)]:
            before()
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def ratio(times: dict[str, list[float]], name: str, base: str) -> float:
    return statistics.median(a / b for a, b in zip(times[name], times[base], strict=True))


def spread(samples: list[float]) -> float:
    """Interquartile range over median, in percent: how noisy a mode's timings were."""
    if len(samples) < 4:
        return float("nan")
    q = statistics.quantiles(samples, n=4)
    return 100 * (q[2] - q[0]) / statistics.median(samples)


def ms(seconds: float) -> str:
    return f"{1e3 * seconds:.1f}"


def verdict(value: float, limit: float | None, inclusive: bool = True) -> str:
    if limit is None:
        return ""
    return "PASS" if (value <= limit if inclusive else value < limit) else "MISS"


def timing_rows(times, base: str, targets: dict[str, tuple[float | None, str]]) -> list[Row]:
    rows = []
    for name in times:
        r = ratio(times, name, base)
        limit, text = targets.get(name, (None, ""))
        rows.append(Row(name, [ms(statistics.median(times[name])), f"{r:.2f}", _percent(spread(times[name])),
                               text], verdict(r, limit, inclusive=text.startswith("<="))))
    return rows


def _percent(value: float) -> str:
    return "n/a" if value != value else f"{value:.0f}%"  # NaN: too few repeats for quartiles
