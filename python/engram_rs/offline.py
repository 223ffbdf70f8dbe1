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
import errno
import fcntl
import json
import logging
import math
import os
import queue
import shutil
import stat
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
#: Written in ``DIR.partial`` when the precompute creates it (and so also in the finished
#: ``DIR``): only a directory holding it is ever removed or replaced by a run.
MARKER = ".engram_rs-precompute"
#: The largest ``--chunk-tokens`` (a chunk's buffers are a few bytes a token, several times over).
MAX_CHUNK_TOKENS = 1 << 30
#: The largest ``--threads`` (the kernels' pool refuses more).
MAX_THREADS = 4096
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

    def open(self, job_dir: _JobDir, resume_bytes: int | None) -> None:
        """Creates the file in the (locked) job directory, or on a resume opens the one the
        job made (a regular file with one link, never through a link) and cuts it to the
        committed bytes."""
        path = os.path.join(job_dir.path, self.name)
        self.checksum = _engram_rs.Checksum()
        if resume_bytes is None:
            self.fd = job_dir.open(self.name, os.O_RDWR | os.O_CREAT | os.O_EXCL)
            _write_all(self.fd, _npy_header(self.dtype, self.shape()), path)
            self.bytes = 0
        else:
            self.fd = job_dir.open(self.name, os.O_RDWR)
            job_dir.check_own(self.name, os.fstat(self.fd))
            os.ftruncate(self.fd, HEADER + resume_bytes)
            self.checksum.update_from_file(_fd_path(self.fd, path), HEADER, resume_bytes)
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

    def __init__(
        self,
        directory: str,
        files: dict[str, _OutFile],
        commit_seconds: float,
        sums: _InputSums | None = None,
    ) -> None:
        self.directory = directory
        self.files = files
        self.sums = sums
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
                if self.sums is not None:  # the bytes just read, from the page cache
                    self.sums.advance(state["cursor"])
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


# ---- the job's own directory: made, marked, locked, never followed ------------------------------


def _fd_path(fd: int, path: str) -> str:
    """A name of the file open as ``fd`` that reaches that very file (``/proc/self/fd``), so a
    path swapped meanwhile is never read; ``path`` where there is no such name."""
    proc = f"/proc/self/fd/{fd}"
    return proc if os.path.exists(proc) else path


class _JobDir:
    """``DIR.partial`` of a run: opened without following a link, locked (``flock``, exclusive)
    for the whole run, and holding the :data:`MARKER` the precompute wrote when it made it.
    Files in it are opened relative to its descriptor, never through a link."""

    def __init__(self, path: str, fd: int) -> None:
        self.path, self.fd = path, fd

    @classmethod
    def create(cls, path: str) -> _JobDir:
        try:
            os.mkdir(path)
        except FileExistsError:
            raise FileExistsError(
                f"{path} appeared while this run started (another precompute of the same "
                "--out?): run again once it has finished"
            ) from None
        job = cls._lock(path)
        try:
            fd = job.open(MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            try:
                os.write(
                    fd, json.dumps({"made_by": "engram_rs precompute", "pid": os.getpid()}).encode()
                )
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            job.close()
            raise
        return job

    @classmethod
    def claim(cls, path: str) -> _JobDir:
        """The job directory of an earlier run, locked: refused when it is a link, is locked by
        a run now, or was not made by the precompute (no marker)."""
        job = cls._lock(path)
        try:
            try:
                st = os.stat(MARKER, dir_fd=job.fd, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if st is None or not stat.S_ISREG(st.st_mode):
                raise FileExistsError(
                    f"{path} was not made by engram_rs precompute (it holds no {MARKER} file): "
                    "it is left untouched; move it away or choose another --out"
                )
        except BaseException:
            job.close()
            raise
        return job

    @classmethod
    def _lock(cls, path: str) -> _JobDir:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} disappeared while this run started") from None
        if not stat.S_ISDIR(st.st_mode):
            raise FileExistsError(
                f"{path} is {_file_kind(st.st_mode)}, not a directory the precompute made: it "
                "is left untouched (never followed); remove it or choose another --out"
            )
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FileExistsError(
                f"{path} is in use by another precompute run of the same --out: wait for it to "
                "finish (or stop it), then run again"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd)

    def open(self, name: str, flags: int) -> int:
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666, dir_fd=self.fd)

    def check_own(self, name: str, st: os.stat_result) -> None:
        """Refuses a resumed file that the job cannot have made: not a regular file, another
        owner, or a second link (a hard link to a file elsewhere)."""
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid != os.geteuid():
            raise FileExistsError(
                f"{os.path.join(self.path, name)} is not a file this precompute made ("
                f"{_file_kind(st.st_mode)} with {st.st_nlink} links, owner {st.st_uid}): it is "
                "left untouched; pass --overwrite to start the job again"
            )

    def stat(self, name: str) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def read_json(self, name: str, limit: int = 64 << 20) -> Any:
        """A small JSON file of the job (``state.json``), read through no link and checked."""
        st = self.stat(name)
        if st is not None:
            self.check_own(name, st)  # a link is refused here, named, not an ELOOP
        fd = self.open(name, os.O_RDONLY | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)
            self.check_own(name, st)
            if st.st_size > limit:
                raise FileExistsError(f"{self.path}/{name} is {st.st_size} bytes: not a state file")
            raw = os.pread(fd, st.st_size, 0)
        finally:
            os.close(fd)
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise FileExistsError(
                f"{self.path}/{name} is damaged ({str(e)[:200]}): pass --overwrite to start "
                "the job again"
            ) from None

    def remove_temporaries(self) -> None:
        """Removes the temporaries of atomic writes a killed run left (``.state.json.*.tmp``)."""
        for name in os.listdir(self.fd):
            if name.startswith((f".{STATE}.", f".{MANIFEST}.")) and name.endswith(".tmp"):
                os.unlink(name, dir_fd=self.fd)

    def remove(self) -> None:
        """Deletes the directory (it is this job's: locked, marked), refusing when its name
        now reaches another directory."""
        here, mine = os.lstat(self.path), os.fstat(self.fd)
        if (here.st_dev, here.st_ino) != (mine.st_dev, mine.st_ino):
            raise FileExistsError(f"{self.path} was replaced while this run used it: left alone")
        shutil.rmtree(self.path)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # releases the lock
            self.fd = -1


class _InputSums:
    """The checksums of the inputs, computed as the run reads them: after each block, its
    file's checksum is advanced to the block's end (the bytes just read, from the page cache;
    no second pass over the inputs at the end). Parquet/Arrow inputs, whose bytes are not read
    in order, are summed whole once the run has moved past them."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.sums = [_engram_rs.Checksum() for _ in source.paths]
        self.done = [0] * len(source.paths)
        self.finished = [False] * len(source.paths)
        self.unit: list[tuple[int, int] | None] = []  # (first byte, bytes a cursor unit)
        for p in source.paths:
            if source.format == "bin":
                self.unit.append((0, source.token_dtype.itemsize))
            elif source.format == "npy":
                arr = source._npy(p)
                row = arr.dtype.itemsize * (arr.shape[1] if arr.ndim == 2 else 1)
                self.unit.append((int(getattr(arr, "offset", 0)), row))
            elif source.format in ("text", "jsonl"):
                self.unit.append((0, 1))
            else:
                self.unit.append(None)

    def advance(self, cursor: dict[str, int]) -> None:
        f = int(cursor["file"])
        for i in range(f):
            self.finish(i)
        unit = self.unit[f]
        if unit is not None:
            self._read(f, unit[0] + unit[1] * int(cursor["pos"]))

    def _read(self, i: int, upto: int) -> None:
        if upto > self.done[i]:
            self.sums[i].update_from_file(self.source.paths[i], self.done[i], upto - self.done[i])
            self.done[i] = upto

    def finish(self, i: int) -> None:
        if not self.finished[i]:
            self._read(i, os.path.getsize(self.source.paths[i]))
            self.finished[i] = True

    def hexdigests(self) -> list[str]:
        for i in range(len(self.sums)):
            self.finish(i)
        return [s.hexdigest() for s in self.sums]


def _check_inputs_unchanged(job: dict[str, Any]) -> None:
    """Refuses a result whose inputs changed while they were read (size or modification
    time): the manifest would describe files other than the ones hashed."""
    for d in job["inputs"]:
        st = os.stat(d["path"])
        if (st.st_size, st.st_mtime_ns) != (d["bytes"], d["mtime_ns"]):
            raise ValueError(
                f"input {d['path']} changed while it was hashed ({d['bytes']} bytes, modified "
                f"at {d['mtime_ns']} ns when the run started; {st.st_size} bytes, modified at "
                f"{st.st_mtime_ns} ns now): the indices would not be of the file the manifest "
                "names; run again once it no longer changes"
            )


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_state(
    state: Any, job: dict[str, Any], files: dict[str, _OutFile], source: Source, job_dir: _JobDir
) -> dict[str, Any]:
    """Checks the resume state of an interrupted run against the job, its files and its inputs:
    a state that does not match (edited, or of files changed since) is refused, never trusted."""
    where = f"{job_dir.path}/{STATE}"

    def bad(what: str) -> FileExistsError:
        return FileExistsError(
            f"{where} does not match the run's files and inputs ({what}): pass --overwrite to "
            "start the job again"
        )

    if not isinstance(state, dict):
        raise bad(f"a JSON {_json_kind(state)}, not an object")
    if state.get("job") != job:
        old = state.get("job")
        raise ValueError(
            f"{job_dir.path} is an interrupted run of another job ("
            f"{_describe_mismatch(old if isinstance(old, dict) else {}, job)}"
            "): pass --overwrite to start again"
        )
    for key in ("tokens", "sequences", "units"):
        if not _is_count(state.get(key)):
            raise bad(f"{key} is {str(state.get(key))[:40]}, not a count")
    cursor = state.get("cursor")
    if not (
        isinstance(cursor, dict) and _is_count(cursor.get("file")) and _is_count(cursor.get("pos"))
    ):
        raise bad(f"cursor {str(cursor)[:80]}")
    f, pos = cursor["file"], cursor["pos"]
    if f >= len(source.paths) or pos > source.totals[f]:
        raise bad(f"cursor {cursor} is beyond the inputs")
    if state["units"] != sum(source.totals[:f]) + pos:
        raise bad(f"{state['units']} units done, the cursor {cursor} says otherwise")
    if (
        source.format in ("bin", "npy")
        and source.kind == "stream"
        and state["tokens"] != state["units"]
    ):
        raise bad(f"{state['tokens']} tokens at the cursor {cursor}")
    if source.format in ("text", "jsonl") and pos:
        fd = os.open(source.paths[f], os.O_RDONLY | os.O_CLOEXEC)
        try:
            if os.pread(fd, 1, pos - 1) != b"\n":
                raise bad(f"the cursor {cursor} is not at the start of a line")
        finally:
            os.close(fd)
    ctx = state.get("ctx")
    history = max(0, int(job["config"]["max_ngram_size"]) - 1)
    if not (
        isinstance(ctx, list)
        and len(ctx) <= history
        and all(_is_count(t) and t < 1 << 32 for t in ctx)
    ):
        raise bad(f"ctx {str(ctx)[:80]}")
    sizes = state.get("bytes")
    if not isinstance(sizes, dict) or sorted(sizes) != sorted(files):
        raise bad(f"bytes of {sorted(sizes) if isinstance(sizes, dict) else sizes}")
    per_token = {
        name: f.dtype.itemsize * (f.cols or 1) for name, f in files.items() if name != "offsets.npy"
    }
    for name, n in sizes.items():
        if not _is_count(n):
            raise bad(f"bytes of {name} is {str(n)[:40]}")
        want = (
            state["sequences"] * 8 if name == "offsets.npy" else state["tokens"] * per_token[name]
        )
        if n != want:
            raise bad(
                f"{n} bytes of {name} for {state['tokens']} tokens, {state['sequences']} sequences"
            )
        st = job_dir.stat(name)
        if st is None:
            raise bad(f"{name} is missing")
        job_dir.check_own(name, st)
        if st.st_size < HEADER + n:
            raise bad(f"{name} holds {max(0, st.st_size - HEADER)} bytes, the state says {n}")
    return state


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
    if (
        isinstance(chunk_tokens, bool)
        or not isinstance(chunk_tokens, int)
        or not 1 <= chunk_tokens <= MAX_CHUNK_TOKENS
    ):
        raise ValueError(
            f"chunk_tokens (--chunk-tokens) must be an int in [1, 2**30], got {chunk_tokens!r}"
        )
    if isinstance(threads, bool) or not isinstance(threads, int) or not 0 <= threads <= MAX_THREADS:
        raise ValueError(
            f"threads (--threads) must be an int in [0, {MAX_THREADS}] (0: one per CPU), got "
            f"{threads!r}"
        )
    if (
        isinstance(commit_seconds, bool)
        or not isinstance(commit_seconds, (int, float))
        or not math.isfinite(commit_seconds)
        or commit_seconds < 0
    ):
        raise ValueError(
            "commit_seconds (--commit-seconds) must be a finite number of seconds >= 0, got "
            f"{commit_seconds!r}"
        )
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
    job_dir = None
    if os.path.lexists(partial):
        job_dir = _JobDir.claim(partial)  # a link, a folder of the user's, a running job: refused
        if not resume:
            if not overwrite:
                job_dir.close()
                raise FileExistsError(
                    f"{partial} holds an interrupted run: pass --resume to continue it, or "
                    "--overwrite to start again"
                )
            try:
                job_dir.remove()
            finally:
                job_dir.close()
            job_dir = None
    parent = os.path.dirname(final)
    if not os.path.isdir(parent):
        raise FileNotFoundError(
            f"{final}: the directory {parent!r} does not exist: create it first (os.makedirs)"
        )
    dt = np.dtype(index_dtype)
    files = {layer_file(x): _OutFile(layer_file(x), dt, cfg.cols) for x in chosen}
    files["tokens.npy"] = _OutFile("tokens.npy", np.dtype(np.uint32), None)
    files["offsets.npy"] = _OutFile("offsets.npy", np.dtype(np.int64), None)
    if job_dir is None:
        job_dir = _JobDir.create(partial)
    try:
        state = None
        if job_dir.stat(STATE) is not None:
            state = _check_state(job_dir.read_json(STATE), job, files, source, job_dir)
            log.info("resuming %s at token %d (%s)", partial, state["tokens"], state["cursor"])
        elif any(job_dir.stat(name) is not None for name in files):
            # Files but no state: killed before its first commit; nothing to continue from.
            for name in files:
                if job_dir.stat(name) is not None:
                    os.unlink(name, dir_fd=job_dir.fd)
        job_dir.remove_temporaries()
        try:
            for name, out_file in files.items():
                out_file.open(job_dir, None if state is None else int(state["bytes"][name]))
            run = EngineRun(source, hasher, boundary, job, files, partial, progress, chunk_tokens)
            if engine == "ray":
                from .ray import run_ray

                counts = run_ray(run)
                sums = _InputSums(source)
            else:
                sums = _InputSums(source)
                counts = _run_local(run, state, commit_seconds, sums)
            _finalize(final, job_dir, job, files, source, counts, comp, tok_path, cfg, sums)
        except ValueError:
            # Bad input data (an id beyond the vocabulary, a null row, an input changed while it
            # was read): a resume would stop at the same place, and a fixed input is another
            # job, so the partial run is of no use. Only the job's own directory is removed.
            for out_file in files.values():
                out_file.close()
            if os.path.lexists(partial):
                job_dir.remove()
            raise
        finally:
            for out_file in files.values():
                out_file.close()
    finally:
        job_dir.close()
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
        if not os.path.isfile(os.path.join(final, MARKER)) or os.path.islink(final):
            raise FileExistsError(
                f"{final} holds a {MANIFEST} but was not made by engram_rs precompute (no "
                f"{MARKER} in it, or a link): --overwrite leaves it untouched; remove it "
                "yourself or choose another --out"
            )
        return None
    fd = os.open(final, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        man = _read_manifest(fd, final)
    finally:
        os.close(fd)
    old = man.get("job")
    if not isinstance(old, dict):
        old = {}
    if old == job:
        return PrecomputedIndices(final)
    raise FileExistsError(
        f"{final} holds a precompute of another job ({_describe_mismatch(old, job)}): choose "
        "another --out, or pass --overwrite to replace it"
    )


def _run_local(
    run: EngineRun, state: dict[str, Any] | None, commit_seconds: float, sums: _InputSums
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
    writer = _Writer(run.partial, files, commit_seconds, sums)
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
    job_dir: _JobDir,
    job: dict[str, Any],
    files: dict[str, _OutFile],
    source: Source,
    counts: dict[str, int],
    comp: CompressedTokenizer,
    tok_path: str,
    cfg: EngramConfig,
    sums: _InputSums,
) -> None:
    partial = job_dir.path
    files["offsets.npy"].append(np.array([counts["tokens"]], np.int64), partial)
    for f in files.values():
        f.finish()
    _check_inputs_unchanged(job)
    digests = sums.hexdigests()
    _check_inputs_unchanged(job)  # and not while the last bytes were summed
    inputs = [
        {"path": d["path"], "format": d["format"], "bytes": d["bytes"], "checksum": c}
        for d, c in zip(job["inputs"], digests, strict=True)
    ]
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
    if job_dir.stat(STATE) is not None:
        os.unlink(STATE, dir_fd=job_dir.fd)
    job_dir.remove_temporaries()
    os.fsync(job_dir.fd)
    old = None
    if os.path.exists(final):  # --overwrite of another job's result
        old = f"{final}.old-{os.getpid()}"
        os.rename(final, old)
    os.rename(partial, final)
    fsync_path(os.path.dirname(final))
    if old is not None:
        shutil.rmtree(old)


# ---- reading a result ----------------------------------------------------------------------------

#: The most bytes a manifest may hold (it lists the inputs, a few hundred bytes each).
MAX_MANIFEST_BYTES = 64 << 20
#: Chunk of the sequential checks and checksums over a mapped file.
_SCAN = 1 << 24


def _damaged(where: str, what: str) -> ValueError:
    return ValueError(
        f"{where}: {what}: the directory is damaged or was not written by engram_rs; rerun the "
        "precompute"
    )


def _file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISREG, "a regular file"),
    ):
        if test(mode):
            return name
    return "not a plain file"


def _open_own(dirfd: int, directory: str, name: str) -> int:
    """A read-only descriptor of the regular file ``name`` right in ``directory`` (open as
    ``dirfd``). Never leaves the directory, never follows a link, never blocks (a FIFO or a
    device is refused before it is read)."""
    full = os.path.join(directory, name)
    if not name or os.path.basename(name) != name or name in (".", ".."):
        raise _damaged(full, "not a file name of the directory")
    relative = os.open in os.supports_dir_fd
    target = name if relative else full
    kw: dict[str, Any] = {"dir_fd": dirfd} if relative else {}
    try:
        st = os.stat(target, follow_symlinks=False, **kw)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{full} is missing: the directory is incomplete or damaged; rerun the precompute"
        ) from None
    link = ValueError(
        f"{full} is a symbolic link: a precompute output holds its own regular files and links "
        "in it are not followed; rerun the precompute (or copy the files in with cp -L)"
    )
    if stat.S_ISLNK(st.st_mode):
        raise link
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(
            f"{full} is not a regular file ({_file_kind(st.st_mode)}): a precompute output "
            "holds regular files only; rerun the precompute"
        )
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(target, flags | getattr(os, "O_CLOEXEC", 0), **kw)
    except OSError as e:
        if e.errno == errno.ELOOP:  # replaced by a link since the stat
            raise link from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):  # replaced since the stat
        os.close(fd)
        raise ValueError(f"{full} is not a regular file ({_file_kind(st.st_mode)})")
    return fd


def _json_kind(value: object) -> str:
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    return f"a {type(value).__name__}"


def _read_manifest(dirfd: int, directory: str) -> dict[str, Any]:
    where = os.path.join(directory, MANIFEST)
    with os.fdopen(_open_own(dirfd, directory, MANIFEST), "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_MANIFEST_BYTES:
            raise _damaged(
                where, f"{size} bytes, more than a manifest holds ({MAX_MANIFEST_BYTES})"
            )
        raw = f.read(MAX_MANIFEST_BYTES + 1)
    try:
        man = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _damaged(where, f"not JSON ({str(e)[:200]})") from None
    if not isinstance(man, dict):
        raise _damaged(where, f"not a JSON object ({_json_kind(man)})")
    return man


def _count(entries: dict[str, Any], key: str, where: str) -> int:
    if key not in entries:
        raise _damaged(where, f"no {key!r} entry")
    value = entries[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _damaged(where, f"{key!r} must be an int >= 0, got {value!r}")
    return value


def _dict(entries: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    if key not in entries:
        raise _damaged(where, f"no {key!r} entry")
    value = entries[key]
    if not isinstance(value, dict):
        raise _damaged(where, f"{key!r} must be a JSON object, got {_json_kind(value)}")
    return value


def _check_manifest(
    man: dict[str, Any], where: str
) -> tuple[EngramConfig, list[int], int, int, dict[str, tuple[np.dtype[Any], tuple[int, ...]]]]:
    """(config, layers, tokens, sequences, {file: (dtype, shape)}) of a manifest, each checked
    against the others; a ValueError naming the first entry that is wrong."""
    if man.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{where}: manifest format {man.get('format_version')!r}, this engram_rs reads "
            f"format {FORMAT_VERSION}"
        )
    try:
        cfg = EngramConfig.from_dict(_dict(man, "config", where))
    except (TypeError, KeyError, ValueError) as e:
        if str(e).startswith(where):
            raise
        raise _damaged(where, f"its config is not valid: {e}") from None
    tokens = _count(man, "tokens", where)
    sequences = _count(man, "sequences", where)
    index_dtype = man.get("index_dtype")
    if index_dtype not in ("int32", "int64"):
        raise _damaged(where, f"'index_dtype' must be 'int32' or 'int64', got {index_dtype!r}")
    if not isinstance(man.get("flat"), bool):
        raise _damaged(where, f"'flat' must be true or false, got {man.get('flat')!r}")
    layers_entry = _dict(man, "layers", where)
    if not layers_entry:
        raise _damaged(where, "'layers' is empty")
    layers = []
    for key, entry in layers_entry.items():
        try:
            layer = int(key)
        except ValueError:
            layer = None
        if layer is None or str(layer) != key:
            raise _damaged(where, f"layer key {key!r} is not an int")
        if layer not in cfg.layer_ids:
            raise _damaged(where, f"layer {layer} is not one of its config's {list(cfg.layer_ids)}")
        named = entry.get("file") if isinstance(entry, dict) else None
        if named != layer_file(layer):
            raise _damaged(
                where,
                f"layer {layer} names the file {named!r}: a precompute writes "
                f"{layer_file(layer)!r}",
            )
        layers.append(layer)
    want: dict[str, tuple[np.dtype[Any], tuple[int, ...]]] = {
        "tokens.npy": (np.dtype(np.uint32), (tokens,)),
        "offsets.npy": (np.dtype(np.int64), (sequences + 1,)),
    }
    for layer in layers:
        want[layer_file(layer)] = (np.dtype(index_dtype), (tokens, cfg.cols))
    files = _dict(man, "files", where)
    for name in files:
        if name not in want:
            raise _damaged(
                where,
                f"it names a file {name!r} that is not one of its own files (tokens.npy, "
                f"offsets.npy, {', '.join(layer_file(x) for x in layers)}): only its own files "
                "are read",
            )
    for name, (dtype, shape) in want.items():
        if name not in files:
            raise _damaged(where, f"no entry for {name!r} in 'files'")
        entry = files[name]
        if not isinstance(entry, dict):
            raise _damaged(where, f"files[{name!r}] must be a JSON object, got {_json_kind(entry)}")
        got = entry.get("shape")
        if (
            not isinstance(got, list)
            or len(got) != len(shape)
            or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in got)
        ):
            raise _damaged(
                where, f"files[{name!r}]['shape'] must be {len(shape)} ints, got {got!r}"
            )
        if entry.get("dtype") != dtype.name:
            raise _damaged(
                where,
                f"files[{name!r}] says dtype {entry.get('dtype')!r}, a precompute writes "
                f"{dtype.name!r} there",
            )
        if tuple(got) != shape:
            if name == "tokens.npy":
                what = f"it claims {tokens} tokens, but its tokens.npy holds {got[0]}"
            elif name == "offsets.npy":
                what = (
                    f"it claims {sequences} sequences, but its offsets.npy holds {got[0]} offsets "
                    f"({sequences + 1} needed)"
                )
            else:
                what = (
                    f"files[{name!r}] says shape {tuple(got)}, its {tokens} tokens and config "
                    f"need {shape}"
                )
            raise _damaged(where, what)
    return cfg, layers, tokens, sequences, want


def _map_npy(
    dirfd: int, directory: str, name: str, dtype: np.dtype[Any], shape: tuple[int, ...]
) -> np.ndarray:
    """The data of ``directory/name`` mapped read-only, once its header says exactly ``dtype``
    (byte order included), C order and ``shape`` and its size is exactly that of the data."""
    full = os.path.join(directory, name)
    with os.fdopen(_open_own(dirfd, directory, name), "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                got_shape, fortran, got = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                got_shape, fortran, got = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy version {version}")
        except Exception as e:  # numpy raises ValueError or a SyntaxError of its header parse
            raise _damaged(full, f"not a readable .npy file ({e})") from None
        if got != dtype:
            raise _damaged(
                full,
                f"its .npy header says dtype {got.str}, the manifest {dtype.name} ({dtype.str})",
            )
        if fortran:
            raise _damaged(full, "its .npy header says fortran_order True (column-major ids)")
        if tuple(got_shape) != shape:
            raise _damaged(
                full, f"its .npy header says shape {tuple(got_shape)}, the manifest {shape}"
            )
        offset = f.tell()
        if offset != HEADER:
            raise _damaged(full, f"its .npy header is {offset} bytes, a precompute writes {HEADER}")
        need = int(np.prod(shape, dtype=object)) * dtype.itemsize
        data = os.fstat(f.fileno()).st_size - offset
        if data != need:
            raise _damaged(full, f"{data} data bytes, the manifest's shape {shape} needs {need}")
        if need == 0:
            empty = np.zeros(shape, dtype)
            empty.flags.writeable = False
            return empty
        return np.memmap(f, dtype=dtype, mode="r", offset=offset, shape=shape)


def _check_offsets(offsets: np.ndarray, tokens: int, where: str) -> None:
    """Sequence offsets start at 0, end at ``tokens`` and never decrease (chunked: O(1) memory)."""
    first, last = int(offsets[0]), int(offsets[-1])
    if first != 0:
        raise _damaged(where, f"offset 0 is {first}, not 0")
    if last != tokens:
        raise _damaged(where, f"the last offset is {last}, not the {tokens} tokens")
    n = offsets.shape[0]
    for a in range(0, n - 1, _SCAN):
        down = np.flatnonzero(np.diff(np.asarray(offsets[a : a + _SCAN + 1])) < 0)
        if down.size:
            k = a + int(down[0]) + 1
            raise _damaged(
                where,
                f"offset {k} ({int(offsets[k])}) is below offset {k - 1} "
                f"({int(offsets[k - 1])}): sequence offsets never decrease",
            )


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
        if window is not None and (
            isinstance(window, bool) or not isinstance(window, int) or window < 1
        ):
            raise ValueError(f"window must be an int >= 1, got {window!r}")
        self.path = os.path.abspath(os.fspath(path))
        manifest_path = os.path.join(self.path, MANIFEST)
        if not os.path.lexists(manifest_path):
            partial = self.path.rstrip(os.sep) + ".partial"
            hint = (
                f" ({partial} holds an unfinished run: finish it with --resume)"
                if os.path.isdir(partial)
                else ""
            )
            raise FileNotFoundError(f"{self.path}: no {MANIFEST}, not a precompute output{hint}")
        # Only the directory's own regular files are read, through its descriptor: no name of
        # the manifest leaves it, no link is followed, no FIFO or device is opened.
        dirfd = os.open(self.path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            self.manifest: dict[str, Any] = _read_manifest(dirfd, self.path)
            self.config, self.layer_ids, self.num_tokens, self.num_sequences, want = (
                _check_manifest(self.manifest, manifest_path)
            )
            self._files = {
                name: _map_npy(dirfd, self.path, name, dtype, shape)
                for name, (dtype, shape) in want.items()
            }
        finally:
            os.close(dirfd)
        self.tokens = self._files["tokens.npy"]
        self.offsets = self._files["offsets.npy"]
        _check_offsets(self.offsets, self.num_tokens, os.path.join(self.path, "offsets.npy"))
        self._layers = {x: self._files[layer_file(x)] for x in self.layer_ids}
        self.window = window
        self.drop_last = drop_last

    def layer(self, layer_id: int) -> np.ndarray:
        """The ``[tokens, cols]`` hash ids of one Engram layer (memory-mapped, read-only)."""
        if layer_id not in self._layers:
            raise KeyError(f"layer {layer_id} is not in this precompute (layers {self.layer_ids})")
        return self._layers[layer_id]

    def sequence(self, i: int) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        """Sequence ``i``: its tokens and each layer's hash ids (numpy copies)."""
        n = self.num_sequences
        if not -n <= i < n:
            raise IndexError(f"sequence {i} out of range for {n} sequences")
        i %= n
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
    if isinstance(sample, bool) or not isinstance(sample, int) or sample < 0:
        raise ValueError(f"sample must be an int >= 0 (sequences to re-hash), got {sample!r}")
    idx = PrecomputedIndices(path)
    man = idx.manifest
    where = os.path.join(idx.path, MANIFEST)
    # The sizes, headers, counts and offsets were checked when idx mapped the files; the
    # checksums are of the mapped data (the files idx opened, not a name opened again).
    for name, arr in idx._files.items():
        full = os.path.join(idx.path, name)
        want = man["files"][name].get("checksum")
        if not isinstance(want, str):
            raise _damaged(where, f"files[{name!r}] has no 'checksum' string")
        sum_ = _engram_rs.Checksum()
        data = arr.reshape(-1).view(np.uint8)
        for a in range(0, data.shape[0], _SCAN):
            sum_.update(data[a : a + _SCAN])
        if sum_.hexdigest() != want:
            raise ValueError(
                f"{full}: checksum {sum_.hexdigest()} differs from the manifest's "
                f"{want}: the file was changed or damaged; rerun the precompute"
            )
    about = man.get("tokenizer")
    if not isinstance(about, dict) or not isinstance(about.get("fingerprint"), str):
        raise _damaged(where, "its 'tokenizer' entry needs a 'fingerprint' string")
    if tokenizer is None and not isinstance(about.get("path"), str):
        raise _damaged(where, "its 'tokenizer' entry names no 'path': pass --tokenizer")
    tok = os.fspath(tokenizer) if tokenizer is not None else about["path"]
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
