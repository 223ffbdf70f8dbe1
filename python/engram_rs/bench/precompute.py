"""``engram-rs bench precompute``: the precompute end to end (a subprocess) against a numpy
pipeline, the hashing ceiling and the I/O ceiling."""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import time
from typing import Any

import numpy as np

from ..atomic import fsync_path
from ..compress import CompressedTokenizer
from ..config import EngramConfig
from ..hashing import NgramHasher
from ..reference import reference_hash
from ..samples import deepseek_v4_tokenizer_json
from .common import LAUNCH_REPORT, launch

__all__ = ["PrecomputeBench", "bench_precompute"]

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


def _run_precompute_child(argv: list[str]) -> tuple[float, int, str]:
    """Runs ``argv`` to completion: ``(wall seconds, peak RSS bytes, its output)``; raises
    RuntimeError with the output when it fails."""
    returncode, text = launch(argv)
    found = LAUNCH_REPORT.search(text)
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

    from ..reference import reference_multipliers, reference_primes

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
