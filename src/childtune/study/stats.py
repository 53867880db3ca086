"""Paired statistics for comparing two fine-tuning methods run on the same seeds.

Why a module of its own: the study's verdicts ("method X beats full fine-tuning on task Y") rest on
these few functions alone, so they are kept apart from the planning, training and report code where
they can be read and tested against scipy on their own. Nothing here knows about runs or tasks: inputs
are plain score lists paired by position (the study pairs by seed, which fixes the training subsample,
the head's initialisation and the data order) and p-values.

`paired_test` gives a paired t-test and the Wilcoxon signed-rank test of the differences; `holm`
corrects a family of p-values for multiple comparisons (Holm's step-down method). With 5 pairs an
exact two-sided Wilcoxon test cannot go below p = 0.0625.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Paired:
    """A method against the baseline over the seeds both have: mean difference and two tests."""

    n: int
    mean_diff: float
    std_diff: float
    t: float
    p_t: float
    p_wilcoxon: float


def paired_test(method: Sequence[float], baseline: Sequence[float]) -> Paired:
    """Paired t-test and Wilcoxon signed-rank test of `method - baseline` (same seeds, same order).

    Fewer than two pairs give NaN statistics; identical scores give a difference of 0 and p = 1. A constant
    non-zero shift (every seed moved by the same amount, common with coarse metrics such as exact match
    over a few dozen examples) has no spread to test against: t is infinite and the t-test's p is NaN
    (left blank in reports, out of Holm's family), not the 0 its limit would claim; Wilcoxon still answers.
    """
    from scipy import stats

    a, b = np.asarray(method, dtype=float), np.asarray(baseline, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired scores must match one to one, got {a.shape} and {b.shape}")
    diff = a - b
    n = len(diff)
    if n < 2:
        mean = float(diff[0]) if n else math.nan
        return Paired(n, mean, math.nan, math.nan, math.nan, math.nan)
    if not diff.any():
        return Paired(n, 0.0, 0.0, 0.0, 1.0, 1.0)
    std = float(diff.std(ddof=1))
    if std == 0.0:  # a constant non-zero shift (docstring)
        t, p_t = math.copysign(math.inf, float(diff.mean())), math.nan
    else:
        result = stats.ttest_rel(a, b)
        t, p_t = float(result.statistic), float(result.pvalue)
    p_w = float(stats.wilcoxon(a, b).pvalue)
    return Paired(n, float(diff.mean()), std, t, p_t, p_w)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment (controls the family-wise error); NaNs are left out and kept NaN."""
    order = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    m = len(order)
    out = [math.nan] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out
