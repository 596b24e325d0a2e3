"""Summaries shared by the benchmarks: ratios are medians of per-cycle ratios, shown
with their p25-p75 spread (see ../shared/BENCHMARKS.md)."""

from __future__ import annotations

import statistics


def percentile(values, q):
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def spread(ratios):
    """(median, p25, p75) of per-cycle ratios."""
    return statistics.median(ratios), percentile(ratios, 0.25), percentile(ratios, 0.75)
