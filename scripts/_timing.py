"""Per-call wall time, shared by the benchmark scripts.

What a user sees eagerly: ``burst`` back-to-back calls and one device sync, timed on the host and
divided by the burst. When the host outruns the device this is the device's time; when it does
not (small shapes) it is the host's, which is the point at the shapes where MAML lives.
``triton.testing.do_bench`` answers a different question: it clears the L2 cache with a kernel
before every call and times the call with CUDA events, so a host path shorter than the cache
clear hides behind it and reads as device time.
"""

from __future__ import annotations

import statistics
import time


def median_wall_ms(call, sync, reps: int = 20, burst: int = 10) -> float:
    """Median over ``reps`` of the wall time per call of ``burst`` calls and one ``sync(result)``,
    after a warm-up of three calls."""
    for _ in range(3):
        result = call()
    sync(result)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(burst):
            result = call()
        sync(result)
        times.append((time.perf_counter() - start) / burst)
    return 1e3 * statistics.median(times)
