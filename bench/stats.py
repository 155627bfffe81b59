"""Summaries of timing samples."""

from __future__ import annotations

import statistics


def summary(samples_s: list[float]) -> dict:
    """median / p99 / min / max / spread in milliseconds."""
    xs = sorted(samples_s)
    if not xs:
        return {"n": 0}
    p99 = xs[min(len(xs) - 1, int(round(0.99 * (len(xs) - 1))))]
    med = statistics.median(xs)
    return {
        "n": len(xs),
        "median_ms": med * 1e3,
        "p99_ms": p99 * 1e3,
        "min_ms": xs[0] * 1e3,
        "max_ms": xs[-1] * 1e3,
        "iqr_ms": (xs[(3 * len(xs)) // 4] - xs[len(xs) // 4]) * 1e3,
    }
