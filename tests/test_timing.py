"""scripts/_timing.py: the benchmarks' per-call wall time counts every call of the burst and the
sync that waits for the device, the way a user's eager loop pays them."""

import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "scripts"))  # scripts, not a package

from _timing import median_wall_ms  # noqa: E402


def test_wall_time_counts_each_call_and_one_sync_per_burst():
    calls, syncs = [], []
    ms = median_wall_ms(lambda: calls.append(1) or len(calls), syncs.append, reps=4, burst=5)
    assert len(calls) == 3 + 4 * 5  # warm-up, then the bursts
    assert syncs == [3, 8, 13, 18, 23]  # one per burst, on the burst's last result
    assert ms > 0


def test_the_sync_is_inside_the_timed_interval():
    # A device that takes 20 ms per burst to drain: the host's calls are free, the sync is not.
    ms = median_wall_ms(lambda: None, lambda _: time.sleep(0.02), reps=3, burst=4)
    assert ms >= 20 / 4
