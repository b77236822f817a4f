"""Shared benchmark helpers: median wall time of repeated runs, ratio printing."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def median_seconds(run: Callable[[], object], repeats: int = 5, warmup: int = 1, cpu: bool = False) -> float:
    """Median wall time (or process CPU time, which other processes' load disturbs less) of ``run()``."""
    clock = time.process_time if cpu else time.perf_counter
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = clock()
        run()
        times.append(clock() - start)
    return statistics.median(times)


def rss_peak_growth_mb(run: Callable[[], object]) -> float:
    """Growth of the peak resident set (MB) during ``run()``: VmHWM is reset to the current RSS first."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    before = _status_mb("VmRSS")
    run()
    return _status_mb("VmHWM") - before


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as handle:
        return int(next(line for line in handle if line.startswith(field + ":")).split()[1]) / 1024


def report(title: str, baseline_name: str, results: dict[str, float]) -> None:
    baseline = results[baseline_name]
    print(f"\n{title}")
    for name, seconds in results.items():
        print(f"  {name:<38} {seconds * 1e3:10.1f} ms   {seconds / baseline:6.2f}x {baseline_name}")
