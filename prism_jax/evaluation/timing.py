"""Wall-time measurement for benchmarks: first call (compile) apart from steady state."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def timed(fn: Callable[[], object], *, repeats: int) -> tuple[float, float]:
    """Run `fn` once (compile + first run), then `repeats` times.

    Returns:
      (seconds of the first call, median seconds of the later calls).
    """
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return first, statistics.median(runs)
