"""Checks that a call releases the GIL, robustly on a loaded 2-core machine."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable


def main_thread_gap(call: Callable[[], object], calls: int = 2) -> tuple[float, float]:
    """Runs ``call`` ``calls`` times in a worker while this thread spins; returns the longest
    stretch this thread could not run during the worker's calls, and the time of one call."""
    t0 = time.perf_counter()
    call()
    single = time.perf_counter() - t0
    window: list[float] = []

    def work() -> None:
        window.append(time.perf_counter())
        for _ in range(calls):
            call()
        window.append(time.perf_counter())

    worker = threading.Thread(target=work)
    ticks = []
    worker.start()
    while worker.is_alive():
        ticks.append(time.perf_counter())
    worker.join()
    begin, end = window
    inside = [begin, *(t for t in ticks if begin < t < end), end]
    gaps = [b - a for a, b in itertools.pairwise(inside)]
    return max(gaps), single


def assert_releases_gil(call: Callable[[], object], attempts: int = 4) -> None:
    """A call holding the GIL stalls this thread for a whole call, every time; a call that
    releases it stalls it for a scheduler slice at most, except when the machine is busy. So
    one attempt in a few with a gap under half a call shows the GIL released; none would pass
    if the call held it."""
    seen = []
    for _ in range(attempts):
        gap, single = main_thread_gap(call)
        if gap < 0.5 * single:
            return
        seen.append((round(gap, 4), round(single, 4)))
    raise AssertionError(f"the main thread stalled for most of a call each time: {seen}")
