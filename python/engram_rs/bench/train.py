"""``engram-rs bench train``: one training step (gather, backward, fused optimizer) on a host
table against ``nn.Embedding(sparse=True)`` with torch's optimizers, each in its own process."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .common import LAUNCH_REPORT, fill_table, launch

__all__ = ["TRAIN_CONTENDERS", "TrainBench", "bench_train", "train_child"]

#: The contenders of ``bench_train``: (library, optimizer), each run in its own child process.
TRAIN_CONTENDERS = {
    "engram_rs SparseAdam": ("engram", "adam"),
    "engram_rs SparseRowwiseAdagrad": ("engram", "adagrad"),
    "torch Embedding(sparse) + SparseAdam": ("torch", "adam"),
    "torch Embedding(sparse) + Adagrad": ("torch", "adagrad"),
}


#: The entry point of a ``bench_train`` child: the spec as JSON in argv[1].
_TRAIN_CHILD = (
    "import json, sys; from engram_rs.bench.train import train_child; "
    "train_child(json.loads(sys.argv[1]))"
)


@dataclasses.dataclass
class TrainBench:
    """What ``bench_train`` measured: the table rows and the figures around them."""

    rows: list[dict[str, Any]]
    #: engram_rs's speed-up over the matching torch baseline (best step against best step):
    #: ``{"SparseAdam": ..., "Adagrad": ...}``.
    speedup: dict[str, float]
    #: Peak RSS beyond the interpreter, the table and the optimizer state, bytes, per contender.
    extra_rss: dict[str, int]
    table_bytes: int
    unique_rows: float  # distinct rows a step touches (mean over the timed steps)
    ceiling_gbps: float  # the best gather ceiling of the run, GB/s (rows read + written)


def _train_batches(
    rows: int, dim: int, lookups: int, steps: int, seed: int
) -> tuple[list[np.ndarray], np.ndarray]:
    """The ids of the warm-up step and of every timed step (int64 ``[lookups]``, uniform over
    the rows, repeats as they fall), and the upstream gradient ``[lookups, dim]``: the same for
    every contender."""
    rng = np.random.default_rng(seed)
    batches = [rng.integers(0, rows, size=lookups, dtype=np.int64) for _ in range(steps + 1)]
    return batches, rng.standard_normal((lookups, dim), dtype=np.float32)


def _current_rss() -> int:
    """Resident bytes of this process now (0 where /proc is not there)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _train_contender(
    values: np.ndarray, lib: str, kind: str
) -> tuple[Callable[[Any, Any], None], Callable[[], int], Any]:
    """A contender over the float32 table ``values`` (wrapped, not copied): its step
    ``(ids, upstream) -> None``, the bytes of its optimizer state, and its HostTable (None for
    torch)."""
    import torch

    rows = values.shape[0]
    if lib == "engram":
        from ..table import HostTable
        from ..torch import SparseAdam, SparseRowwiseAdagrad, ops

        table = HostTable.from_numpy(values)
        opt = SparseAdam(lr=1e-3) if kind == "adam" else SparseRowwiseAdagrad(lr=0.01, eps=1e-10)
        # The state as it is in a running training: every page written once (torch's state is
        # made with zeros_like, which writes it all, in the warm-up step).
        state = opt.state_tables(table)
        chunk = 1 << 18
        for s in state:
            zeros = np.zeros((min(chunk, rows), s.dim), np.float32)
            for at in range(0, rows, chunk):
                n = min(chunk, rows - at)
                s.write_rows(np.arange(at, at + n, dtype=np.int64), zeros[:n])
        handle = ops.register(table, opt)
        anchor = torch.nn.Parameter(torch.empty(0))

        def step(ids: Any, upstream: Any) -> None:
            out = torch.ops.engram_rs.host_gather(anchor, ids, handle)
            out.backward(upstream)  # the gradient of the rows, as a model would hand it back
            anchor.grad = None

        return step, lambda: sum(s.nbytes for s in state), table

    emb = torch.nn.Embedding(rows, values.shape[1], sparse=True, _weight=torch.from_numpy(values))
    topt: torch.optim.Optimizer = (
        torch.optim.SparseAdam(emb.parameters(), lr=1e-3)
        if kind == "adam"
        else torch.optim.Adagrad(emb.parameters(), lr=0.01, eps=1e-10)
    )

    def torch_step(ids: Any, upstream: Any) -> None:
        topt.zero_grad(set_to_none=True)
        emb(ids).backward(upstream)
        topt.step()

    def state_bytes() -> int:
        return sum(
            v.nbytes
            for per_param in topt.state.values()
            for v in per_param.values()
            if isinstance(v, torch.Tensor)
        )

    return torch_step, state_bytes, None


def train_child(spec: dict[str, Any]) -> None:
    """One contender of ``bench_train``, in its own process: builds the table (and state), runs
    one untimed warm-up step and ``steps`` timed steps, and prints its figures as JSON."""
    import json
    import resource

    import torch

    rows, dim, lookups, steps = spec["rows"], spec["dim"], spec["lookups"], spec["steps"]
    lib, kind = TRAIN_CONTENDERS[spec["name"]]
    batches, upstream_np = _train_batches(rows, dim, lookups, steps, spec["seed"])
    ids = [torch.from_numpy(b) for b in batches]
    upstream = torch.from_numpy(upstream_np)
    # A primer step on a tiny table of the same kind: it loads and faults in the code the step
    # runs (hundreds of MB of torch), so that the baseline RSS below holds it.
    tiny = np.ones((1024, dim), np.float32)
    prime, _, _ = _train_contender(tiny, lib, kind)
    prime(ids[0][:64] % 1024, upstream[:64])
    base_rss = _current_rss()  # interpreter, torch, ids, the primer: before the table

    values = np.empty((rows, dim), np.float32)
    fill_table(values, None, "float32")
    step, state_bytes, table = _train_contender(values, lib, kind)
    first = int(batches[0][0])
    before = values[first].copy()
    step(ids[0], upstream)  # untimed warm-up (torch makes its state here)
    if np.array_equal(values[first], before):
        raise AssertionError(f"{spec['name']}: the warm-up step did not update the table")
    secs = []
    for rows_t in ids[1:]:
        t0 = time.perf_counter()
        step(rows_t, upstream)
        secs.append(time.perf_counter() - t0)
    ceiling = []
    if table is not None:
        # The gather ceiling on the same table and ids, into a preallocated output.
        out_bytes = np.empty(lookups * dim * 4, np.uint8)
        table.copy_rows_ceiling(batches[0], out_bytes)
        for b in batches[1:]:
            t0 = time.perf_counter()
            table.copy_rows_ceiling(b, out_bytes)
            ceiling.append(time.perf_counter() - t0)
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (
        1 if sys.platform == "darwin" else 1024
    )
    result = {
        "secs": secs,
        "ceiling": ceiling,
        "peak_rss": peak,
        "base_rss": base_rss,
        "table_bytes": values.nbytes,
        "state_bytes": state_bytes(),
        "unique": [int(np.unique(b).size) for b in batches[1:]],
    }
    sys.stdout.flush()
    print("@@engram-train " + json.dumps(result), flush=True)


def _run_train_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs one ``bench_train`` contender through the small launcher (so that its peak RSS is
    its own, not this process's) and returns its figures; raises RuntimeError when it fails."""
    import json

    returncode, text = launch([sys.executable, "-c", _TRAIN_CHILD, json.dumps(spec)])
    done = LAUNCH_REPORT.search(text)
    found = re.search(r"^@@engram-train (.*)$", text, re.MULTILINE)
    if returncode != 0 or done is None or int(done.group(3)) != 0 or found is None:
        status = returncode if done is None else int(done.group(3))
        raise RuntimeError(
            f"bench train: the {spec['name']} child failed (exit status {status}; -9: killed, "
            f"out of memory?)\n{text}"
        )
    figures: dict[str, Any] = json.loads(found.group(1))
    return figures


def bench_train(
    rows: int = 10_000_000, dim: int = 64, lookups: int = 262_144, steps: int = 5, seed: int = 0
) -> TrainBench:
    """One training step (gather, backward, optimizer) of ``lookups`` ids into a ``rows`` x
    ``dim`` float32 host table: engram_rs's fused SparseAdam and SparseRowwiseAdagrad (applied
    inside ``backward``) against ``nn.Embedding(sparse=True)`` with ``torch.optim.SparseAdam``
    and with ``torch.optim.Adagrad``.

    Each contender runs in its own child process, one after the other (a table and its state
    take up to 3 x the table's bytes), on the same table values and the same ids: one untimed
    warm-up step, then ``steps`` timed steps, each on new ids (uniform over the rows, with the
    repeats that fall). The engram_rs children also time the gather ceiling (a plain
    prefetching copy of the same rows into a preallocated output) on their table and ids.
    """
    for name, value in (("rows", rows), ("dim", dim), ("lookups", lookups), ("steps", steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if importlib.util.find_spec("torch") is None:
        raise ImportError("bench train needs PyTorch: pip install torch")
    figures = {
        name: _run_train_child(
            {
                "name": name,
                "rows": rows,
                "dim": dim,
                "lookups": lookups,
                "steps": steps,
                "seed": seed,
            }
        )
        for name in TRAIN_CONTENDERS
    }
    row_bytes = dim * 4
    unique = float(np.mean(figures["engram_rs SparseAdam"]["unique"]))
    ceiling_secs = min(t for f in figures.values() for t in f["ceiling"])
    gather_bytes = 2 * lookups * row_bytes  # the gather's rows read, its output written
    ceiling_gbps = gather_bytes / ceiling_secs / 1e9
    best = {name: min(f["secs"]) for name, f in figures.items()}
    torch_of = {
        "adam": "torch Embedding(sparse) + SparseAdam",
        "adagrad": "torch Embedding(sparse) + Adagrad",
    }
    out_rows = []
    extra: dict[str, int] = {}
    for name, f in figures.items():
        lib, kind = TRAIN_CONTENDERS[name]
        # Bytes of state a touched row reads and writes: Adam's exp_avg and exp_avg_sq, the
        # row-wise accumulator, torch Adagrad's per-value sum.
        state_row = {"adam": 2 * row_bytes, "adagrad": 4 if lib == "engram" else row_bytes}[kind]
        traffic = unique * 2 * (row_bytes + state_row) + gather_bytes
        extra[name] = f["peak_rss"] - f["base_rss"] - f["table_bytes"] - f["state_bytes"]
        own_ceiling = f"{gather_bytes / min(f['ceiling']) / 1e9:.2f}" if f["ceiling"] else "-"
        out_rows.append(
            {
                "contender": name,
                "best ms": best[name] * 1e3,
                "median ms": float(np.median(f["secs"])) * 1e3,
                "x torch": best[torch_of[kind]] / best[name],
                "peak RSS GiB": f["peak_rss"] / 2**30,
                "table+state GiB": (f["table_bytes"] + f["state_bytes"]) / 2**30,
                "min traffic GB/s": traffic / best[name] / 1e9,
                "ceiling GB/s": own_ceiling,
                "of ceiling": traffic / best[name] / 1e9 / ceiling_gbps,
            }
        )
    return TrainBench(
        rows=out_rows,
        speedup={
            "SparseAdam": best[torch_of["adam"]] / best["engram_rs SparseAdam"],
            "Adagrad": best[torch_of["adagrad"]] / best["engram_rs SparseRowwiseAdagrad"],
        },
        extra_rss=extra,
        table_bytes=rows * row_bytes,
        unique_rows=unique,
        ceiling_gbps=ceiling_gbps,
    )
