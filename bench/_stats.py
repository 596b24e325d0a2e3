"""Summaries shared by the benchmarks: ratios are medians of per-cycle ratios, shown
with their p25-p75 spread (see ../shared/BENCHMARKS.md)."""

from __future__ import annotations

import os
import statistics


def percentile(values, q):
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def spread(ratios):
    """(median, p25, p75) of per-cycle ratios."""
    return statistics.median(ratios), percentile(ratios, 0.25), percentile(ratios, 0.75)


def write_outputs(pairs) -> None:
    """Writes each (path, text) whose path is set, creating its folder."""
    for path, text in pairs:
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as fh:
                fh.write(text + "\n")
