"""Timing shared by the micro-benchmarks: variants interleaved, order rotated every repeat, so
drift in machine load hits every variant alike."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def time_interleaved(fns: dict[str, Callable[[], object]], warmup: int, repeat: int) -> dict[str, float]:
    """Per variant: median ms, `_min` ms, and `_iqr_pct` (interquartile range as % of the median)."""
    names = list(fns)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {n: [] for n in names}
    for i in range(repeat):
        r = i % len(names)
        for n in names[r:] + names[:r]:  # rotate so no variant always runs first
            t0 = time.perf_counter()
            fns[n]()
            samples[n].append(time.perf_counter() - t0)
    out = {}
    for n, s in samples.items():
        q1, med, q3 = statistics.quantiles(s, n=4) if len(s) > 1 else (s[0], s[0], s[0])
        out[n] = 1e3 * statistics.median(s)
        out[n + "_min"] = 1e3 * min(s)
        out[n + "_iqr_pct"] = 100 * (q3 - q1) / med if med > 0 else 0.0
    return out
