"""Timing shared by the benchmarks: the best of several calls after a warm-up."""

from __future__ import annotations

import time


def best_time(fn, repeats: int) -> float:
    """Seconds of the fastest of `repeats` calls of fn, after one warm-up call (compilation)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)
