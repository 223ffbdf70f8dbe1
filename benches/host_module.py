"""The host-table module against its kernel and against torch, in one process (issue 16, point 4).

* forward: ``EngramEmbedding.forward`` over a host table (the core makes and checks the rows,
  then gathers them into a pooled output) against ``HostTable.gather(out=)`` of the same rows
  into a preallocated array. Goal: within 1.3x.
* step: forward, backward of a given upstream gradient and the fused ``SparseAdam`` (inside
  backward) against ``nn.Embedding(sparse=True)`` + ``torch.optim.SparseAdam`` on the same
  rows, both in this process, interleaved, each on its own copy of the same float32 table
  (the same table memory). Goal: at least 8x.

Run: ``python benches/host_module.py [--lookups N] [--reps R]`` (``make bench`` runs it). Prints
best and median milliseconds and the ratios of the same run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import engram_rs as er
import numpy as np
import torch
from engram_rs.torch import SparseAdam
from engram_rs.torch.modules import EngramEmbedding


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lookups", type=int, default=262_144)
    ap.add_argument("--reps", type=int, default=8)
    args = ap.parse_args(argv)

    cfg = er.EngramConfig.preset("demo")
    hasher = er.NgramHasher(cfg, 129_280, compressed_pad_id=2)
    layer = hasher.layer_ids[0]
    dim = cfg.head_dim
    rows = hasher.table_rows[layer]
    cols = len(hasher.offsets[layer])
    B = 4
    L = max(1, args.lookups // cols // B)
    n = B * L * cols
    print(f"table {rows} x {dim} float32 ({rows * dim * 4 / 2**30:.2f} GiB), {n} lookups")

    rng = np.random.default_rng(0)
    values = rng.standard_normal((rows, dim), dtype=np.float32)
    primes = np.array([p for order in hasher.primes[layer] for p in order], np.int64)
    offsets = torch.tensor(hasher.offsets[layer], dtype=torch.int64)
    batches = [
        torch.from_numpy(rng.integers(0, 1 << 40, (B, L, cols)) % primes)
        for _ in range(args.reps + 1)
    ]
    upstream = torch.from_numpy(rng.standard_normal((B, L, cols * dim), dtype=np.float32))

    # engram_rs: the module over a host table (a copy of the values: the same table memory).
    table = er.HostTable.from_numpy(values.copy())
    opt = SparseAdam(lr=1e-3)
    emb = EngramEmbedding(hasher, layer, dim, table=table, optimizer=opt)
    for s in opt.state_tables(table):  # the state as in a running training: written once
        s.write_rows(np.arange(s.rows), np.zeros((s.rows, s.dim), np.float32))
    out = np.empty((n, dim), np.float32)
    flat = [(b + offsets).reshape(-1).numpy() for b in batches]

    # torch: nn.Embedding(sparse=True) + SparseAdam on the same values, flat rows.
    ref = torch.nn.Embedding(rows, dim, sparse=True, _weight=torch.from_numpy(values))
    ref_opt = torch.optim.SparseAdam(ref.parameters(), lr=1e-3)

    def engram_step(i: int) -> None:
        emb(batches[i]).backward(upstream)

    def torch_step(i: int) -> None:
        ref_opt.zero_grad(set_to_none=True)
        ref(torch.from_numpy(flat[i])).reshape(B, L, cols * dim).backward(upstream)
        ref_opt.step()

    # Warm-up: torch makes its state here; both fault in their code paths.
    engram_step(0)
    torch_step(0)
    with torch.no_grad():
        emb(batches[0])
    table.gather(flat[0], out=out)

    times: dict[str, list[float]] = {k: [] for k in ("gather", "forward", "engram", "torch")}
    for i in range(1, args.reps + 1):
        # torch first: its OpenMP threads spin for a while after each op, which slows whatever
        # runs next; the gather and the forward both come after an engram_rs call.
        for name, f in (
            ("torch", torch_step),
            ("engram", engram_step),
            ("gather", lambda i: table.gather(flat[i], out=out)),
            ("forward", lambda i: emb(batches[i])),
        ):
            t0 = time.perf_counter()
            f(i)
            times[name].append(time.perf_counter() - t0)
    best = {k: min(v) * 1e3 for k, v in times.items()}
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    for k in ("gather", "forward", "engram", "torch"):
        print(f"{k:>8}: best {best[k]:8.2f} ms  median {med[k]:8.2f} ms")
    fwd = best["forward"] / best["gather"]
    step = best["torch"] / best["engram"]
    print(
        f"forward / gather(out=): {fwd:.2f}x best, {med['forward'] / med['gather']:.2f}x median "
        "(goal <= 1.3)"
    )
    print(
        f"step, torch / engram_rs: {step:.2f}x best, {med['torch'] / med['engram']:.2f}x median "
        "(goal >= 8)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
