"""The precompute job: hash a whole tokenized corpus to memory-mapped index files.

Output directory layout (``manifest.json`` describes it all)::

    DIR/manifest.json     config, tokenizer fingerprint, inputs, boundary rule, counts, files
    DIR/layer_<id>.npy    [tokens, cols] hash ids of Engram layer <id> (int32 or int64)
    DIR/tokens.npy        [tokens] uint32 raw token ids, the stream the ids were computed from
    DIR/offsets.npy       [sequences + 1] int64 sequence starts (cu_seqlens: 0, ..., tokens)
    DIR/row_counts_<id>.npy  [table_rows] uint32 lookups per row (``row_counts=True``, see
                          :mod:`.counts`)

The run streams: it reads about ``chunk_tokens`` tokens at a time, hashes them (the Rust kernel,
without the GIL) while a writer thread appends the previous chunk to the files, so memory stays
near ``3 * chunk_tokens * (4 + bytes of ids per token)`` whatever the corpus size. It works in
``DIR.partial/``: every ``commit_seconds`` it syncs the files and records how far it got
(``state.json``); ``resume=True`` continues from there, giving files identical to an
uninterrupted run. The directory is renamed to ``DIR`` only when complete, with its manifest:
nothing appears under the final name half-written.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import shutil
import stat
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .. import _engram_rs
from ..atomic import fsync_path
from ..compress import CompressedTokenizer
from ..config import EngramConfig
from ..hashing import NgramHasher
from . import counts as row_counts_mod
from . import local_engine, ray_engine
from .blocks import Boundary, resolve_config
from .engine import Counts, Engine, EngineRun
from .files import (
    FORMAT_VERSION,
    HEADER,
    MANIFEST,
    MARKER,
    STATE,
    OutFile,
    file_kind,
    json_kind,
    layer_file,
    output_files,
    write_json,
)
from .reader import PrecomputedIndices, read_manifest
from .sources import Source

__all__ = [
    "ENGINES",
    "MAX_CHUNK_TOKENS",
    "MAX_THREADS",
    "InputSums",
    "JobDir",
    "check_inputs_unchanged",
    "precompute",
]

log = logging.getLogger("engram_rs.offline")

#: The largest ``--chunk-tokens`` (a chunk's buffers are a few bytes a token, several times over).
MAX_CHUNK_TOKENS = 1 << 30
#: The largest ``--threads`` (the kernels' pool refuses more).
MAX_THREADS = 4096
#: The engines by name (each a module implementing :class:`~.engine.Engine`).
ENGINES: dict[str, Engine] = {"local": local_engine, "ray": ray_engine}
#: The local engine's run, called through this name when a job starts (a test wraps it to
#: watch a run from inside).
_run_local = local_engine.run


class JobDir:
    """``DIR.partial`` of a run: opened without following a link, locked (``flock``, exclusive)
    for the whole run, and holding the :data:`MARKER` the precompute wrote when it made it.
    Files in it are opened relative to its descriptor, never through a link."""

    def __init__(self, path: str, fd: int) -> None:
        self.path, self.fd = path, fd

    @classmethod
    def create(cls, path: str) -> JobDir:
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
    def claim(cls, path: str) -> JobDir:
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
    def _lock(cls, path: str) -> JobDir:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} disappeared while this run started") from None
        if not stat.S_ISDIR(st.st_mode):
            raise FileExistsError(
                f"{path} is {file_kind(st.st_mode)}, not a directory the precompute made: it "
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
                f"{file_kind(st.st_mode)} with {st.st_nlink} links, owner {st.st_uid}): it is "
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


class InputSums:
    """The checksums of the inputs, computed as the run reads them, with no second pass over
    them at the end.

    The local engine calls :meth:`advance` after each block: the file's checksum is advanced to
    the block's end (the bytes just read, from the page cache). For Parquet and Arrow IPC inputs
    the end is that of the last row group / record batch the block finished (their bytes lie in
    file order); the footer is added when the run is past the file. An engine that reads the
    bytes itself (the Ray engine's tasks) hands in each file's checksum with :meth:`given`.
    """

    def __init__(self, source: Source) -> None:
        self.source = source
        self.sums = [_engram_rs.Checksum() for _ in source.paths]
        self.done = [0] * len(source.paths)
        self.digests: list[str | None] = [None] * len(source.paths)
        self.ends: list[Callable[[int], int] | None] = [self._ends(p) for p in source.paths]

    def _ends(self, path: str) -> Callable[[int], int] | None:
        """The byte after the input read up to the cursor position ``pos`` (None: unknown, the
        file is summed whole once the run is past it)."""
        source = self.source
        if source.format == "bin":
            item = source.token_dtype.itemsize
            return lambda pos: item * pos
        if source.format == "npy":
            arr = source.npy(path)
            row = arr.dtype.itemsize * (arr.shape[1] if arr.ndim == 2 else 1)
            first = int(getattr(arr, "offset", 0))
            return lambda pos: first + row * pos
        if source.format in ("text", "jsonl"):
            return lambda pos: pos
        found = source.byte_ends(path)
        if found is None:
            return None
        rows, ends = found

        def upto(pos: int) -> int:
            k = int(np.searchsorted(rows, pos, side="right"))  # groups wholly before pos
            return int(ends[k - 1]) if k else 0

        return upto

    def advance(self, cursor: dict[str, int]) -> None:
        """The results of the inputs up to ``cursor`` are written (the local engine)."""
        f = int(cursor["file"])
        for i in range(f):
            self.finish(i)
        ends = self.ends[f]
        if ends is not None:
            self._read(f, ends(int(cursor["pos"])))

    def given(self, i: int, digest: str) -> None:
        """The checksum of input ``i``, computed by the engine as it read the file."""
        self.digests[i] = digest

    def _read(self, i: int, upto: int) -> None:
        if upto > self.done[i]:
            self.sums[i].update_from_file(self.source.paths[i], self.done[i], upto - self.done[i])
            self.done[i] = upto

    def finish(self, i: int) -> None:
        if self.digests[i] is None:
            self._read(i, os.path.getsize(self.source.paths[i]))
            self.digests[i] = self.sums[i].hexdigest()

    def hexdigests(self) -> list[str]:
        for i in range(len(self.sums)):
            self.finish(i)
        return [d for d in self.digests if d is not None]


def check_inputs_unchanged(job: dict[str, Any]) -> None:
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
    state: Any, job: dict[str, Any], files: dict[str, OutFile], source: Source, job_dir: JobDir
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
        raise bad(f"a JSON {json_kind(state)}, not an object")
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
    dead_id: int | None = None,
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
    row_counts: bool = False,
) -> PrecomputedIndices:
    """Hashes every token of ``inputs`` and writes ``out/`` (see the module docstring).

    ``config``: an :class:`EngramConfig`, a preset name or a config JSON file. ``tokenizer``:
    the model's ``tokenizer.json`` (raw ids are compressed with it; text is tokenized with it).
    Sequence boundaries: the rows of 2-D ``.npy``, Parquet/Arrow and JSONL inputs; a flat stream
    (``.bin``, 1-D ``.npy``, text) is cut into windows of ``seq_len`` tokens or after each
    ``eos_id``. ``dead_id``: a raw token id that marks blocked positions (image tokens: the
    DEAD rule of SPEC 8.3, recorded in the manifest's boundary). ``layers``: a subset of the
    config's Engram layers. ``flat``: add the layers'
    offsets (rows of the one flat table). ``engine="ray"`` runs the hashing on Ray Data.
    ``row_counts``: also count how often each row of each layer's flat table is looked up
    (``DIR/row_counts_<id>.npy``, exact uint32 counts; :mod:`.counts`, read by
    :func:`engram_rs.stats.row_stats`). Returns the result, opened.
    """
    paths = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if tokenizer is None:
        raise ValueError("pass the model's tokenizer.json (tokenizer=...)")
    if engine not in ENGINES:
        raise ValueError(f"engine must be 'local' or 'ray', got {engine!r}")
    ENGINES[engine].check()  # ImportError (pip install 'engram-rs[ray]') before any file is made
    if not isinstance(row_counts, bool):
        raise TypeError(f"row_counts must be True or False, got {row_counts!r}")
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
    cfg = resolve_config(config)
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
    boundary = Boundary.make(source.kind, seq_len, eos_id, source.paths[0], dead_id)
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
    if row_counts:  # only when asked: a job without counts compares equal to older results
        job["row_counts"] = True
    final = os.path.abspath(os.fspath(out))
    partial = final.rstrip(os.sep) + ".partial"
    existing = _existing(final, job, overwrite)
    if existing is not None:
        return existing
    job_dir = None
    if os.path.lexists(partial):
        job_dir = JobDir.claim(partial)  # a link, a folder of the user's, a running job: refused
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
    files = output_files(chosen, index_dtype, cfg.cols)
    if job_dir is None:
        job_dir = JobDir.create(partial)
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
                out_file.open(
                    _open_output(job_dir, name, state is not None),
                    partial,
                    None if state is None else int(state["bytes"][name]),
                )
            sums = InputSums(source)
            run = EngineRun(
                source,
                hasher,
                boundary,
                job,
                files,
                partial,
                progress,
                chunk_tokens,
                state=state,
                commit_seconds=commit_seconds,
                written=sums.advance,
                summed=sums.given,
            )
            # The local engine through this module's name (see _run_local).
            counts = _run_local(run) if engine == "local" else ENGINES[engine].run(run)
            _finalize(final, job_dir, job, files, source, counts, comp, tok_path, cfg, sums, hasher)
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


def _open_output(job_dir: JobDir, name: str, resume: bool) -> int:
    """An output file of the job, opened read-write in its locked directory, never through a
    link: made new (``O_EXCL``), or on a resume the one the job made (a regular file of the
    user's with one link)."""
    if not resume:
        return job_dir.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL)
    fd = job_dir.open(name, os.O_RDWR)
    try:
        job_dir.check_own(name, os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    return fd


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
        man = read_manifest(fd, final)
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


def _finalize(
    final: str,
    job_dir: JobDir,
    job: dict[str, Any],
    files: dict[str, OutFile],
    source: Source,
    counts: Counts,
    comp: CompressedTokenizer,
    tok_path: str,
    cfg: EngramConfig,
    sums: InputSums,
    hasher: NgramHasher,
) -> None:
    partial = job_dir.path
    files["offsets.npy"].append(np.array([counts["tokens"]], np.int64), partial)
    for f in files.values():
        f.finish()
    counted = None
    if job.get("row_counts"):
        counted = _count_rows(job_dir, job, files, counts["tokens"], hasher)
    check_inputs_unchanged(job)
    digests = sums.hexdigests()
    check_inputs_unchanged(job)  # and not while the last bytes were summed
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
    if counted is not None:
        manifest["row_counts"] = counted
    write_json(os.path.join(partial, MANIFEST), manifest)
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


def _count_rows(
    job_dir: JobDir,
    job: dict[str, Any],
    files: dict[str, OutFile],
    tokens: int,
    hasher: NgramHasher,
) -> dict[str, Any]:
    """Counts the lookups of every row from the finished index files (:mod:`.counts`); a count
    file of an earlier, killed run is replaced (counted again from the start)."""

    def open_new(name: str) -> int:
        if job_dir.stat(name) is not None:
            os.unlink(name, dir_fd=job_dir.fd)
        return job_dir.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL)

    layers = [int(x) for x in job["layers"]]
    return row_counts_mod.count_all(
        hasher,
        layers,
        bool(job["flat"]),
        job["index_dtype"],
        tokens,
        {x: files[layer_file(x)].fd for x in layers},
        job_dir.path,
        open_new,
    )
