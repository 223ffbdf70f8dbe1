"""What the benchmarks share: timing (best of warm runs, interleaved rounds), the table they
print, the machine line, the launcher of child processes and a table filled fast."""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import _engram_rs, simd_available

__all__ = [
    "LAUNCH_REPORT",
    "best_of",
    "environment",
    "fill_table",
    "format_table",
    "huge_page_share",
    "interleaved_best",
    "launch",
]


def best_of(fn: Callable[[], Any], repeats: int) -> float:
    """Seconds of the fastest of ``repeats`` warm runs (one untimed warm-up run first)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of benchmark rows (floats with 2 decimals)."""
    if not rows:
        return "(no rows)"
    keys = list(rows[0])
    cells = [[f"{r[k]:.2f}" if isinstance(r[k], float) else str(r[k]) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    line = "  ".join(k.ljust(w) for k, w in zip(keys, widths, strict=True))
    body = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join([line, "-" * len(line), *body])


def environment() -> str:
    """One line naming the CPU, the core count and the hashing path in use."""
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    path = "AVX-512" if simd_available() else "scalar"
    return f"{cpu}, {os.cpu_count()} cores, hashing path: {path}"


def interleaved_best(
    fns: dict[str, Callable[[], Any]],
    repeats: int,
    settle: float = 0.0,
    before: Callable[[], Any] | None = None,
) -> dict[str, float]:
    """Seconds of the fastest run of each function over ``repeats`` rounds that each run every
    function once, in turn (after one untimed warm-up round): all contenders see the same
    machine state, which on a shared machine moves between seconds. ``settle`` seconds of
    sleep follow every call (untimed), so that work a call leaves to the kernel does not land in
    the next contender's time. ``before`` runs (untimed) ahead of every call: for example an
    eviction of the caches, so that no contender reads rows the one before it left there."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            if before is not None:
                before()
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
            time.sleep(settle)
    return best


def huge_page_share(arr: np.ndarray) -> float:
    """The fraction of the memory mappings holding ``arr`` that is on transparent huge pages."""
    lo, hi = arr.ctypes.data, arr.ctypes.data + arr.nbytes
    try:
        with open("/proc/self/smaps", encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:
        return 0.0
    inside, size, huge = False, 0, 0
    for line in lines:
        head = line.split()[0] if line else ""
        if "-" in head and not head.endswith(":"):
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start < hi and lo < end
        elif inside and head == "Size:":
            size += int(line.split()[1])
        elif inside and head == "AnonHugePages:":
            huge += int(line.split()[1])
    return huge / size if size else 0.0


#: Runs ``argv[1:]`` and prints its wall seconds and peak RSS (KiB) last. The kernel hands the
#: high-water RSS of a process's memory before exec on to the program it execs (and a child
#: made by fork or vfork starts with its parent's), so a child started straight from this
#: process would report this process's peak (gigabytes after the numpy pipeline). This small
#: launcher's own peak (a bare interpreter) is below any engram_rs run's.
#: The line the launcher prints last: wall seconds, peak RSS (KiB), the child's exit status.
LAUNCH_REPORT = re.compile(r"^@@engram-bench (\S+) (\d+) (-?\d+)$", re.MULTILINE)

_LAUNCHER = """
import os, sys, time
t0 = time.perf_counter()
pid = os.posix_spawn(sys.argv[1], sys.argv[1:], os.environ)
_, status, usage = os.wait4(pid, 0)
secs = time.perf_counter() - t0
sys.stdout.flush()
print(f"\\n@@engram-bench {secs!r} {usage.ru_maxrss} {os.waitstatus_to_exitcode(status)}")
"""


def launch(argv: list[str]) -> tuple[int, str]:
    """Runs ``argv`` through the small launcher (which reports the child's own peak RSS) to
    completion: ``(exit status, everything it printed)``."""
    import subprocess
    import tempfile

    launcher = [sys.executable, "-I", "-S", "-c", _LAUNCHER, *argv]
    with tempfile.TemporaryFile() as log:
        with subprocess.Popen(launcher, stdin=subprocess.DEVNULL, stdout=log, stderr=log) as proc:
            try:
                proc.wait()
            except BaseException:
                proc.kill()
                raise
        log.seek(0)
        return proc.returncode, log.read().decode("utf-8", "replace")


def fill_table(values: np.ndarray, scales: np.ndarray | None, dtype: str) -> None:
    """Fills a table with a repeated 32 MiB block of random rows (the values do not change the
    speed of a gather; generating 4 GB of them would take a minute)."""
    rng = np.random.default_rng(0)
    rows, dim = values.shape
    block = max(1, min(rows, (32 << 20) // values[0].nbytes))
    f32 = rng.standard_normal((block, dim), dtype=np.float32)
    src: np.ndarray
    if dtype == "float8_e4m3":
        codes, sc = _engram_rs.quantize_fp8(f32)
        src = codes.reshape(block, dim)
        src_sc = sc.reshape(block, -1)
    elif dtype == "bfloat16":
        src = _engram_rs.cast_f32(f32, "bfloat16").view(np.uint16).reshape(block, dim)
    else:
        src = f32.astype(values.dtype)
    for at in range(0, rows, block):
        n = min(block, rows - at)
        values[at : at + n] = src[:n]
        if scales is not None:
            scales[at : at + n] = src_sc[:n]
