"""Offline precompute: hash a whole tokenized corpus to memory-mapped index files.

Output directory layout (``manifest.json`` describes it all)::

    DIR/manifest.json     config, tokenizer fingerprint, inputs, boundary rule, counts, files
    DIR/layer_<id>.npy    [tokens, cols] hash ids of Engram layer <id> (int32 or int64)
    DIR/tokens.npy        [tokens] uint32 raw token ids, the stream the ids were computed from
    DIR/offsets.npy       [sequences + 1] int64 sequence starts (cu_seqlens: 0, ..., tokens)

The run streams: it reads about ``chunk_tokens`` tokens at a time, hashes them (the Rust kernel,
without the GIL) while a writer thread appends the previous chunk to the files, so memory stays
near ``3 * chunk_tokens * (4 + bytes of ids per token)`` whatever the corpus size. It works in
``DIR.partial/``: every ``commit_seconds`` it syncs the files and records how far it got
(``state.json``); ``resume=True`` continues from there, giving files identical to an
uninterrupted run. The directory is renamed to ``DIR`` only when complete, with its manifest:
nothing appears under the final name half-written.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import shutil
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from . import _engram_rs
from .atomic import fsync_path, write_atomically
from .compress import CompressedTokenizer
from .config import EngramConfig
from .hashing import IndexDType, NgramHasher
from .sources import Block, Source

__all__ = ["PrecomputedIndices", "hash_block", "precompute", "segment", "verify"]

log = logging.getLogger("engram_rs.offline")

MANIFEST = "manifest.json"
STATE = "state.json"
FORMAT_VERSION = 1
#: Bytes of the fixed .npy header of every output file (rewritten with the shape at the end).
HEADER = 128


# ---- the boundary rule and one block's hashing (shared by the local and Ray engines) ------------


@dataclasses.dataclass(frozen=True)
class Boundary:
    """Where sequences start: each row of a rows input; in a stream, every ``seq_len`` tokens
    or after each ``eos_id``."""

    rule: str  # "rows", "seq_len" or "eos"
    seq_len: int | None = None
    eos_id: int | None = None

    @classmethod
    def make(cls, kind: str, seq_len: int | None, eos_id: int | None, what: str) -> Boundary:
        if seq_len is not None and eos_id is not None:
            raise ValueError("pass --seq-len or --eos-id, not both")
        if kind == "rows":
            if seq_len is not None or eos_id is not None:
                raise ValueError(
                    f"{what}: the rows of these inputs are the sequences; --seq-len and --eos-id "
                    "apply to flat token streams (.bin, 1-D .npy, text)"
                )
            return cls("rows")
        if seq_len is None and eos_id is None:
            raise ValueError(
                f"{what} is a flat token stream: say where sequences start with --seq-len T "
                "(windows of T tokens) or --eos-id ID (a sequence ends after each ID)"
            )
        if seq_len is not None:
            if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
                raise ValueError(f"seq_len must be an int >= 1, got {seq_len!r}")
            return cls("seq_len", seq_len=seq_len)
        if isinstance(eos_id, bool) or not isinstance(eos_id, int) or eos_id < 0:
            raise ValueError(f"eos_id must be an int >= 0, got {eos_id!r}")
        return cls("eos", eos_id=eos_id)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def segment(
    tokens: np.ndarray, n_ctx: int, start: int, boundary: Boundary
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Sequence bounds of a stream piece with ``n_ctx`` tokens of left context in front.

    ``tokens[n_ctx:]`` are stream positions ``start, start + 1, ...``; the context is the
    ``n_ctx`` tokens just before (``n_ctx <= max_ngram_size - 1``). Returns ``(cu_seqlens`` over
    ``tokens``, the stream positions in ``[start, start + len)`` where a sequence starts``)``.
    """
    n = tokens.shape[0]
    first = start - n_ctx
    if boundary.rule == "seq_len":
        t = boundary.seq_len
        assert t is not None
        k0 = -(-first // t) * t  # first multiple of t at or after `first`
        starts = np.arange(k0, first + n, t, dtype=np.int64)
    else:
        assert boundary.rule == "eos"
        after = np.flatnonzero(tokens[:-1] == boundary.eos_id).astype(np.int64) + 1 + first
        starts = np.concatenate([[0] if first == 0 else [], after]).astype(np.int64)
    local = starts - first
    local = local[(local > 0) & (local < n)]
    cu = np.concatenate([[0], local, [n]]).astype(np.int64)
    new = starts[(starts >= start) & (starts < start + n - n_ctx)]
    return cu, new


def hash_block(
    hasher: NgramHasher,
    block: Block,
    ctx: np.ndarray,
    start: int,
    boundary: Boundary,
    layers: list[int],
    dtype: IndexDType,
    flat: bool,
) -> tuple[dict[int, np.ndarray], npt.NDArray[np.int64]]:
    """Hash ids of a block's tokens (``{layer: [len, cols]}``) and the stream positions where its
    sequences start. ``ctx``: the stream's tokens just before the block (streams only)."""
    tokens = block.tokens
    if block.lengths is not None:
        ids = tokens
        cu = np.concatenate([[0], np.cumsum(block.lengths)]).astype(np.int64)
        new = cu[:-1] + start
        n_ctx = 0
    else:
        n_ctx = ctx.shape[0]
        # int64 context first: numpy promotes, so ids of a wider earlier file never wrap.
        ids = np.concatenate([ctx, tokens]) if n_ctx else tokens
        cu, new = segment(ids, n_ctx, start, boundary)
    vocab = hasher.vocab_size
    assert vocab is not None
    try:
        out = hasher.hash_tokens(ids, layer_ids=layers, dtype=dtype, flat=flat, cu_seqlens=cu)
    except (ValueError, IndexError):
        bad = np.flatnonzero((tokens < 0) | (tokens >= vocab))
        if bad.size:
            k = int(bad[0])
            raise ValueError(
                f"{block.where(k)}: token id {int(tokens[k])} is outside the tokenizer's "
                f"vocabulary [0, {vocab}): were these ids made with this tokenizer?"
            ) from None
        raise
    if n_ctx:
        out = {layer: a[n_ctx:] for layer, a in out.items()}
    return out, new


# ---- output files --------------------------------------------------------------------------------


def _npy_header(dtype: np.dtype[Any], shape: tuple[int, ...]) -> bytes:
    """A version 1.0 .npy header padded to exactly HEADER bytes."""
    text = f"{{'descr': {dtype.str!r}, 'fortran_order': False, 'shape': {shape!r}, }}"
    body = text.encode("latin1")
    pad = HEADER - 10 - len(body) - 1
    if pad < 0:  # pragma: no cover - shapes have at most 2 dims of < 2**64
        raise ValueError(f"npy header too long for {shape}")
    return b"\x93NUMPY\x01\x00" + (HEADER - 10).to_bytes(2, "little") + body + b" " * pad + b"\n"


@dataclasses.dataclass
class _OutFile:
    name: str
    dtype: np.dtype[Any]
    cols: int | None  # None: 1-D
    fd: int = -1
    bytes: int = 0  # data bytes written (after the header)
    checksum: Any = None

    def shape(self) -> tuple[int, ...]:
        n = self.bytes // (self.dtype.itemsize * (self.cols or 1))
        return (n,) if self.cols is None else (n, self.cols)

    def open(self, directory: str, resume_bytes: int | None) -> None:
        path = os.path.join(directory, self.name)
        self.checksum = _engram_rs.Checksum()
        if resume_bytes is None:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            _write_all(self.fd, _npy_header(self.dtype, self.shape()), path)
            self.bytes = 0
        else:
            self.fd = os.open(path, os.O_RDWR)
            os.ftruncate(self.fd, HEADER + resume_bytes)
            self.checksum.update_from_file(path, HEADER, resume_bytes)
            self.bytes = resume_bytes
        os.lseek(self.fd, HEADER + self.bytes, os.SEEK_SET)

    def prepare(self, arr: np.ndarray) -> np.ndarray:
        """The bytes to append for ``arr``, added to the checksum (in file order: one thread
        prepares, in order)."""
        data = np.ascontiguousarray(arr, dtype=self.dtype).reshape(-1).view(np.uint8)
        self.checksum.update(data)
        return data

    def write(self, data: np.ndarray, directory: str) -> None:
        """Appends prepared bytes and starts their writeback (the final fsync then has little
        left to do)."""
        _write_all(self.fd, data.data, os.path.join(directory, self.name))
        if data.nbytes >= 1 << 20:
            _engram_rs.start_writeback(self.fd, HEADER + self.bytes, data.nbytes)
        self.bytes += data.nbytes

    def append(self, arr: np.ndarray, directory: str) -> None:
        self.write(self.prepare(arr), directory)

    def finish(self) -> None:
        os.pwrite(self.fd, _npy_header(self.dtype, self.shape()), 0)
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _write_all(fd: int, data: bytes | memoryview, path: str) -> None:
    view = memoryview(data)
    while view.nbytes:
        try:
            n = os.write(fd, view)
        except OSError as e:
            raise OSError(
                e.errno,
                f"{path}: cannot write {view.nbytes} more bytes ({e.strerror}): free space on that "
                "disk or choose another --out, then run again with --resume",
            ) from None
        view = view[n:]


class _Writer:
    """Appends prepared chunks to the output files on its own thread (os.write releases the
    GIL), one chunk behind the hashing; commits (fsync, then state.json) every
    ``commit_seconds``."""

    def __init__(self, directory: str, files: dict[str, _OutFile], commit_seconds: float) -> None:
        self.directory = directory
        self.files = files
        self.commit_seconds = commit_seconds
        self.queue: queue.Queue[tuple[dict[str, np.ndarray], dict[str, Any]] | None] = queue.Queue(
            maxsize=1
        )
        self.error: BaseException | None = None
        self.last_commit = time.monotonic()
        self.thread = threading.Thread(target=self._run, name="engram_rs-writer", daemon=True)
        self.thread.start()

    def put(self, arrays: dict[str, np.ndarray], state: dict[str, Any]) -> None:
        while True:
            self._raise()
            try:
                self.queue.put((arrays, state), timeout=0.1)
                return
            except queue.Full:
                continue

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            while True:
                item = self.queue.get()
                if item is None:
                    return
                arrays, state = item
                for name, data in arrays.items():
                    self.files[name].write(data, self.directory)
                if time.monotonic() - self.last_commit >= self.commit_seconds:
                    self.commit(state)
        except BaseException as e:
            self.error = e
            while True:  # let put() see the error instead of blocking
                try:
                    self.queue.get_nowait()
                except queue.Empty:
                    break

    def commit(self, state: dict[str, Any]) -> None:
        for f in self.files.values():
            os.fsync(f.fd)
        state = dict(state, bytes={name: f.bytes for name, f in self.files.items()})
        _write_json(os.path.join(self.directory, STATE), state)
        self.last_commit = time.monotonic()

    def close(self) -> None:
        """Waits for the writes in flight; raises the writer's error if it had one."""
        if self.thread.is_alive():
            while self.error is None:
                try:
                    self.queue.put(None, timeout=0.1)
                    break
                except queue.Full:
                    continue
            self.thread.join()
        self._raise()


def _write_json(path: str, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=1, sort_keys=True).encode()
    write_atomically(path, lambda f: f.write(text))


def layer_file(layer: int) -> str:
    """The file of one Engram layer's hash ids in a precompute directory."""
    return f"layer_{layer}.npy"


def output_arrays(
    out: dict[int, np.ndarray], tokens: np.ndarray, starts: np.ndarray, layers: list[int]
) -> dict[str, np.ndarray]:
    """What one hashed block appends to each output file (both engines append these)."""
    arrays = {layer_file(x): out[x] for x in layers}
    arrays["tokens.npy"] = tokens
    arrays["offsets.npy"] = starts
    return arrays


@dataclasses.dataclass
class EngineRun:
    """What an engine needs to run a precompute job: the inputs, the hasher, the boundary
    rule, the job's description, the open output files in ``partial`` and its options."""

    source: Source
    hasher: NgramHasher
    boundary: Boundary
    job: dict[str, Any]
    files: dict[str, _OutFile]
    partial: str
    progress: bool | None
    chunk_tokens: int

    @property
    def layers(self) -> list[int]:
        return [int(x) for x in self.job["layers"]]


# ---- the job ------------------------------------------------------------------------------------


def _config(config: EngramConfig | str | os.PathLike[str]) -> EngramConfig:
    if isinstance(config, EngramConfig):
        return config
    name = os.fspath(config)
    if os.path.exists(name) or name.endswith(".json"):
        return EngramConfig.from_json(name)
    return EngramConfig.preset(name)


def _progress(total: int | None, unit: str, enabled: bool | None) -> Any:
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, unit=unit, unit_scale=True, desc="engram_rs precompute")


def _describe_mismatch(old: dict[str, Any], new: dict[str, Any]) -> str:
    diffs = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    parts = []
    for k in diffs:
        a, b = json.dumps(old.get(k)), json.dumps(new.get(k))
        parts.append(f"{k}: {a[:120]} there, {b[:120]} now")
    return "; ".join(parts)


def precompute(
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    config: EngramConfig | str = "demo",
    tokenizer: str | os.PathLike[str] | None = None,
    *,
    format: str = "auto",
    column: str = "input_ids",
    token_dtype: str = "uint32",
    text_field: str = "text",
    seq_len: int | None = None,
    eos_id: int | None = None,
    layers: Sequence[int] | None = None,
    index_dtype: str = "int32",
    flat: bool = False,
    threads: int = 0,
    resume: bool = False,
    overwrite: bool = False,
    engine: str = "local",
    progress: bool | None = None,
    chunk_tokens: int = 1 << 18,
    commit_seconds: float = 30.0,
) -> PrecomputedIndices:
    """Hashes every token of ``inputs`` and writes ``out/`` (see the module docstring).

    ``config``: an :class:`EngramConfig`, a preset name or a config JSON file. ``tokenizer``:
    the model's ``tokenizer.json`` (raw ids are compressed with it; text is tokenized with it).
    Sequence boundaries: the rows of 2-D ``.npy``, Parquet/Arrow and JSONL inputs; a flat stream
    (``.bin``, 1-D ``.npy``, text) is cut into windows of ``seq_len`` tokens or after each
    ``eos_id``. ``layers``: a subset of the config's Engram layers. ``flat``: add the layers'
    offsets (rows of the one flat table). ``engine="ray"`` runs the hashing on Ray Data.
    Returns the result, opened.
    """
    paths = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if tokenizer is None:
        raise ValueError("pass the model's tokenizer.json (tokenizer=...)")
    if engine not in ("local", "ray"):
        raise ValueError(f"engine must be 'local' or 'ray', got {engine!r}")
    if engine == "ray":
        from .ray import _ray

        _ray()  # ImportError (pip install 'engram-rs[ray]') before any file is made
    if index_dtype not in ("int32", "int64"):
        raise ValueError(f"index_dtype must be 'int32' or 'int64', got {index_dtype!r}")
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be an int >= 1, got {chunk_tokens!r}")
    cfg = _config(config)
    tok_path = os.path.abspath(os.fspath(tokenizer))
    if not os.path.isfile(tok_path):
        raise FileNotFoundError(f"tokenizer {tok_path} does not exist")
    if threads:
        _engram_rs.set_num_threads(threads)
    source = Source(
        [os.fspath(p) for p in paths],
        format,
        column=column,
        token_dtype=token_dtype,
        text_field=text_field,
        tokenizer=tok_path,
    )
    boundary = Boundary.make(source.kind, seq_len, eos_id, source.paths[0])
    comp = CompressedTokenizer.from_file(tok_path)
    hasher = NgramHasher.from_tokenizer(cfg, comp)
    chosen = list(cfg.layer_ids) if layers is None else [int(x) for x in layers]
    bad = [x for x in chosen if x not in cfg.layer_ids]
    if bad or not chosen:
        raise ValueError(
            f"layers {chosen} must be a non-empty subset of the config's Engram layers "
            f"{list(cfg.layer_ids)}"
        )
    job = {
        "config": cfg.to_dict(),
        "tokenizer_fingerprint": comp.fingerprint,
        "inputs": [dict(d, mtime_ns=os.stat(d["path"]).st_mtime_ns) for d in source.describe()],
        "format": source.format,
        "column": column if source.format in ("parquet", "arrow") else None,
        "text_field": text_field if source.format == "jsonl" else None,
        "token_dtype": token_dtype if source.format == "bin" else None,
        "boundary": boundary.to_dict(),
        "layers": chosen,
        "index_dtype": index_dtype,
        "flat": bool(flat),
    }
    final = os.path.abspath(os.fspath(out))
    partial = final.rstrip(os.sep) + ".partial"
    existing = _existing(final, job, overwrite)
    if existing is not None:
        return existing
    if os.path.exists(partial) and not resume:
        if not overwrite:
            raise FileExistsError(
                f"{partial} holds an interrupted run: pass --resume to continue it, or "
                "--overwrite to start again"
            )
        shutil.rmtree(partial)
    parent = os.path.dirname(final)
    if not os.path.isdir(parent):
        raise FileNotFoundError(
            f"{final}: the directory {parent!r} does not exist: create it first (os.makedirs)"
        )
    state = None
    if resume and os.path.exists(os.path.join(partial, STATE)):
        with open(os.path.join(partial, STATE)) as f:
            state = json.load(f)
        if state.get("job") != job:
            raise ValueError(
                f"{partial} is an interrupted run of another job ("
                f"{_describe_mismatch(state.get('job', {}), job)}): pass --overwrite to start "
                "again"
            )
    if state is not None:
        log.info("resuming %s at token %d (%s)", partial, state["tokens"], state["cursor"])
    os.makedirs(partial, exist_ok=True)
    dt = np.dtype(index_dtype)
    files = {layer_file(x): _OutFile(layer_file(x), dt, cfg.cols) for x in chosen}
    files["tokens.npy"] = _OutFile("tokens.npy", np.dtype(np.uint32), None)
    files["offsets.npy"] = _OutFile("offsets.npy", np.dtype(np.int64), None)
    try:
        for name, out_file in files.items():
            out_file.open(partial, None if state is None else int(state["bytes"][name]))
        run = EngineRun(source, hasher, boundary, job, files, partial, progress, chunk_tokens)
        if engine == "ray":
            from .ray import run_ray

            counts = run_ray(run)
        else:
            counts = _run_local(run, state, commit_seconds)
        _finalize(final, partial, job, files, source, counts, comp, tok_path, cfg)
    except ValueError:
        # Bad input data (an id beyond the vocabulary, a null row): a resume would stop at the
        # same place, and a fixed input is another job, so the partial run is of no use.
        for out_file in files.values():
            out_file.close()
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        for out_file in files.values():
            out_file.close()
    return PrecomputedIndices(final)


def _existing(final: str, job: dict[str, Any], overwrite: bool) -> PrecomputedIndices | None:
    """The finished result when ``final`` already holds this job (unless ``overwrite``: then it
    is computed again); refuses another job's result unless ``overwrite`` (replaced at the
    end)."""
    if not os.path.exists(final):
        return None
    manifest_path = os.path.join(final, MANIFEST)
    if not os.path.isfile(manifest_path):
        if os.path.isdir(final) and not os.listdir(final):
            os.rmdir(final)
            return None
        raise FileExistsError(
            f"{final} exists and is not a precompute output (no {MANIFEST}): choose another --out"
        )
    if overwrite:
        return None
    with open(manifest_path) as f:
        old = json.load(f).get("job", {})
    if old == job:
        return PrecomputedIndices(final)
    raise FileExistsError(
        f"{final} holds a precompute of another job ({_describe_mismatch(old, job)}): choose "
        "another --out, or pass --overwrite to replace it"
    )


def _run_local(
    run: EngineRun, state: dict[str, Any] | None, commit_seconds: float
) -> dict[str, int]:
    source, hasher, job, files = run.source, run.hasher, run.job, run.files
    history = hasher.config.max_ngram_size - 1
    if state is None:
        cursor, tokens, sequences, done = {"file": 0, "pos": 0}, 0, 0, 0
        ctx = np.zeros(0, np.int64)
    else:
        cursor, tokens, sequences = state["cursor"], state["tokens"], state["sequences"]
        done = state["units"]
        ctx = np.asarray(state["ctx"], dtype=np.int64)
    bar = _progress(sum(source.totals), source.unit, run.progress)
    if bar is not None and done:
        bar.update(done)
    layers = run.layers
    dtype: IndexDType = job["index_dtype"]
    writer = _Writer(run.partial, files, commit_seconds)
    started = time.monotonic()
    try:
        for block in source.blocks(cursor, run.chunk_tokens):
            out, starts = hash_block(
                hasher, block, ctx, tokens, run.boundary, layers, dtype, job["flat"]
            )
            if block.lengths is None:
                joined = np.concatenate([ctx, block.tokens.astype(np.int64)])
                ctx = joined[max(0, joined.shape[0] - history) :]
            # Checksums here, beside the writer thread's writes of the previous chunk.
            arrays = {
                name: files[name].prepare(arr)
                for name, arr in output_arrays(out, block.tokens, starts, layers).items()
            }
            tokens += block.tokens.shape[0]
            sequences += starts.shape[0]
            done += block.units
            writer.put(
                arrays,
                {
                    "job": job,
                    "cursor": block.cursor,
                    "tokens": tokens,
                    "sequences": sequences,
                    "units": done,
                    "ctx": ctx.tolist(),
                },
            )
            if bar is not None:
                bar.update(block.units)
                elapsed = max(time.monotonic() - started, 1e-9)
                bar.set_postfix_str(f"{tokens / elapsed / 1e6:.1f} M tok/s", refresh=False)
    finally:
        writer.close()
        if bar is not None:
            bar.close()
    return {"tokens": tokens, "sequences": sequences}


def _finalize(
    final: str,
    partial: str,
    job: dict[str, Any],
    files: dict[str, _OutFile],
    source: Source,
    counts: dict[str, int],
    comp: CompressedTokenizer,
    tok_path: str,
    cfg: EngramConfig,
) -> None:
    files["offsets.npy"].append(np.array([counts["tokens"]], np.int64), partial)
    for f in files.values():
        f.finish()
    inputs = [dict(d, checksum=_engram_rs.file_checksum(d["path"])) for d in source.describe()]
    manifest = {
        "format_version": FORMAT_VERSION,
        "engram_rs_version": _engram_rs.__version__,
        "config": cfg.to_dict(),
        "tokenizer": {
            "path": tok_path,
            "fingerprint": comp.fingerprint,
            "vocab_size": comp.vocab_size,
            "compressed_vocab_size": len(comp),
        },
        "inputs": inputs,
        "boundary": job["boundary"],
        "tokens": counts["tokens"],
        "sequences": counts["sequences"],
        "index_dtype": job["index_dtype"],
        "flat": job["flat"],
        "layers": {
            str(x): {
                "file": layer_file(x),
                "shape": list(files[layer_file(x)].shape()),
                "dtype": job["index_dtype"],
                "checksum": files[layer_file(x)].checksum.hexdigest(),
            }
            for x in job["layers"]
        },
        "files": {
            name: {
                "shape": list(f.shape()),
                "dtype": f.dtype.name,
                "checksum": f.checksum.hexdigest(),
                "checksum_of": f"the data bytes after the {HEADER}-byte .npy header",
            }
            for name, f in files.items()
        },
        "job": job,
    }
    _write_json(os.path.join(partial, MANIFEST), manifest)
    state = os.path.join(partial, STATE)
    if os.path.exists(state):
        os.remove(state)
    fsync_path(partial)
    old = None
    if os.path.exists(final):  # --overwrite of another job's result
        old = f"{final}.old-{os.getpid()}"
        os.rename(final, old)
    os.rename(partial, final)
    fsync_path(os.path.dirname(final))
    if old is not None:
        shutil.rmtree(old)


# ---- reading a result ----------------------------------------------------------------------------


class PrecomputedIndices:
    """A precompute result, memory-mapped: per-layer hash ids, the tokens and the sequences.

    ``idx[layer_id]`` (or ``idx.layer(layer_id)``) is the ``[tokens, cols]`` array of a layer.
    As a dataset (``len``, ``idx[i]`` with an int ``i``), an item is ``(token_ids,
    {layer_id: hash_ids})``: with ``window=T``, the ``i``-th window of ``T`` consecutive tokens
    of the stream (the last, shorter one is dropped unless ``drop_last=False``); without, the
    ``i``-th sequence. Items are numpy copies, so it works as a ``torch.utils.data.Dataset``.
    """

    def __init__(
        self, path: str | os.PathLike[str], window: int | None = None, drop_last: bool = True
    ) -> None:
        self.path = os.path.abspath(os.fspath(path))
        manifest_path = os.path.join(self.path, MANIFEST)
        if not os.path.isfile(manifest_path):
            partial = self.path.rstrip(os.sep) + ".partial"
            hint = (
                f" ({partial} holds an unfinished run: finish it with --resume)"
                if os.path.isdir(partial)
                else ""
            )
            raise FileNotFoundError(f"{self.path}: no {MANIFEST}, not a precompute output{hint}")
        with open(manifest_path) as f:
            self.manifest: dict[str, Any] = json.load(f)
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{self.path}: manifest format {self.manifest.get('format_version')!r}, this "
                f"engram_rs reads format {FORMAT_VERSION}"
            )
        self.config = EngramConfig.from_dict(self.manifest["config"])
        self.layer_ids = [int(x) for x in self.manifest["layers"]]
        self.num_tokens = int(self.manifest["tokens"])
        self.num_sequences = int(self.manifest["sequences"])
        self.tokens = self._load("tokens.npy")
        self.offsets = self._load("offsets.npy")
        self._layers = {x: self._load(layer_file(x)) for x in self.layer_ids}
        if window is not None and (
            isinstance(window, bool) or not isinstance(window, int) or window < 1
        ):
            raise ValueError(f"window must be an int >= 1, got {window!r}")
        self.window = window
        self.drop_last = drop_last

    def _load(self, name: str) -> np.ndarray:
        want = self.manifest["files"][name]
        arr: np.ndarray = np.load(os.path.join(self.path, name), mmap_mode="r")
        if list(arr.shape) != want["shape"] or arr.dtype.name != want["dtype"]:
            raise ValueError(
                f"{self.path}/{name}: shape {arr.shape} {arr.dtype}, the manifest says "
                f"{tuple(want['shape'])} {want['dtype']}: the directory was changed; rerun "
                "the precompute"
            )
        return arr

    def layer(self, layer_id: int) -> np.ndarray:
        """The ``[tokens, cols]`` hash ids of one Engram layer (memory-mapped, read-only)."""
        if layer_id not in self._layers:
            raise KeyError(f"layer {layer_id} is not in this precompute (layers {self.layer_ids})")
        return self._layers[layer_id]

    def sequence(self, i: int) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        s, e = int(self.offsets[i]), int(self.offsets[i + 1])
        return self._item(s, e)

    def _item(self, s: int, e: int) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        return np.array(self.tokens[s:e]), {x: np.array(a[s:e]) for x, a in self._layers.items()}

    def __len__(self) -> int:
        if self.window is None:
            return self.num_sequences
        full, rest = divmod(self.num_tokens, self.window)
        return full + (1 if rest and not self.drop_last else 0)

    def __getitem__(self, i: int) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"item {i} out of range for {n} items")
        i %= n
        if self.window is None:
            return self.sequence(i)
        s = i * self.window
        return self._item(s, min(s + self.window, self.num_tokens))

    def __iter__(self) -> Iterator[tuple[np.ndarray, dict[int, np.ndarray]]]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return (
            f"PrecomputedIndices({self.path!r}, tokens={self.num_tokens}, "
            f"sequences={self.num_sequences}, layers={self.layer_ids}, window={self.window})"
        )


def verify(
    path: str | os.PathLike[str],
    tokenizer: str | os.PathLike[str] | None = None,
    sample: int = 64,
    seed: int = 0,
) -> dict[str, Any]:
    """Checks a precompute result: file sizes and shapes against the manifest, every file's
    checksum, and a re-hash of ``sample`` random sequences. Raises ValueError at the first
    mismatch; returns what was checked."""
    idx = PrecomputedIndices(path)
    man = idx.manifest
    for name, want in man["files"].items():
        full = os.path.join(idx.path, name)
        sum_ = _engram_rs.Checksum()
        n = sum_.update_from_file(full, HEADER)
        itemsize = np.dtype(want["dtype"]).itemsize
        if n != int(np.prod(want["shape"])) * itemsize:
            raise ValueError(f"{full}: {n} data bytes, the manifest's shape needs more")
        if sum_.hexdigest() != want["checksum"]:
            raise ValueError(
                f"{full}: checksum {sum_.hexdigest()} differs from the manifest's "
                f"{want['checksum']}: the file was changed or damaged; rerun the precompute"
            )
    tok = os.fspath(tokenizer) if tokenizer is not None else man["tokenizer"]["path"]
    if not os.path.isfile(tok):
        raise FileNotFoundError(
            f"the tokenizer {tok} named in the manifest is gone: pass --tokenizer"
        )
    comp = CompressedTokenizer.from_file(tok)
    if comp.fingerprint != man["tokenizer"]["fingerprint"]:
        raise ValueError(
            f"tokenizer {tok} (fingerprint {comp.fingerprint}) is not the one of this precompute "
            f"({man['tokenizer']['fingerprint']})"
        )
    hasher = NgramHasher.from_tokenizer(idx.config, comp)
    rng = np.random.default_rng(seed)
    picks: list[int] = (
        rng.choice(idx.num_sequences, size=min(sample, idx.num_sequences), replace=False).tolist()
        if idx.num_sequences
        else []
    )
    dtype: IndexDType = man["index_dtype"]
    for i in sorted(picks):
        toks, stored = idx.sequence(i)
        fresh = hasher.hash_tokens(toks, layer_ids=idx.layer_ids, dtype=dtype, flat=man["flat"])
        for layer in idx.layer_ids:
            if not np.array_equal(fresh[layer], stored[layer]):
                raise ValueError(
                    f"{idx.path}: sequence {i} of layer {layer} differs from a fresh hash of its "
                    "tokens: the files are damaged or were made by another version"
                )
    return {
        "path": idx.path,
        "files": sorted(man["files"]),
        "tokens": idx.num_tokens,
        "sequences": idx.num_sequences,
        "rehashed_sequences": len(picks),
    }
