"""Engram hashing on Ray Data: :class:`HashBatches` for your own pipelines, and the precompute's
``engine="ray"`` (``engram-rs precompute --engine ray``), an :class:`~.engine.Engine`.

``HashBatches`` is a callable class for ``Dataset.map_batches``: each actor builds the hasher once
and adds a column ``layer_<id>`` of hash ids per Engram layer to the batches.

:func:`run` runs the same job as the local engine of :func:`engram_rs.precompute` and writes
byte for byte the same files and manifest. Ray reads the inputs
(``ray.data.read_parquet`` for Parquet, ``read_numpy`` for 2-D ``.npy`` batches,
``read_binary_files`` for token streams (``.bin``, 1-D ``.npy``), Arrow IPC and JSONL files;
their Arrow row groups and JSONL line groups are cut by the readers of :mod:`.sources`, as the
local engine reads them), actors hash them (:func:`.blocks.hash_block`), and the driver appends
the results in input order to the output files. A stream is cut into pieces of about
``chunk_tokens`` tokens, each carrying its position in the whole stream and the tokens just
before it, so the hash ids and sequence starts do not depend on where it was cut. Plain text
inputs are not supported (a piece's position in the stream is only known once everything before
it is tokenized): use the local engine for them.

Notes:

* The input paths must be readable at the same path on every node of the Ray cluster (a shared
  file system), as for any Ray reader of local files.
* A stream, Arrow IPC or JSONL file is read whole by one Ray task (``read_binary_files``): shard
  big files into files of a few GB. A JSONL line longer than
  ``engram_rs.sources.max_line_bytes(chunk_tokens)`` is refused, as by the local engine.
* The ray engine does not resume: it writes no ``state.json``, and ``--resume`` with
  ``--engine ray`` reruns the whole job from the start (an interrupted run of the local engine is
  refused: continue that one with ``--engine local --resume``).
"""

from __future__ import annotations

import builtins
import importlib.util
import io
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from .. import _engram_rs
from ..compress import CompressedTokenizer
from ..config import EngramConfig
from ..hashing import IndexDType, NgramHasher, cu_seqlens_of, locate
from .blocks import Block, Boundary, hash_block, resolve_config, row_where, token_where
from .engine import Counts, EngineRun
from .files import output_arrays
from .sources import (
    Source,
    decode_lines,
    jsonl_block,
    line_groups,
    read_arrow_ipc,
    row_groups,
)

__all__ = ["HashBatches", "check", "run"]

#: Column of a batch that reports an error of the hashing (the engine's own callables only).
_ERROR = "engram_rs_error"


def check() -> None:
    """Raises an ImportError naming the extra to install when Ray Data is missing."""
    _ray()


def _ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError:
        raise ImportError(
            "the ray engine and engram_rs.ray need Ray Data: pip install 'engram-rs[ray]'"
        ) from None
    return ray


def _objects(items: Sequence[Any]) -> np.ndarray:
    """A 1-D object array of ``items`` (never a stacked N-D array, whatever their shapes)."""
    out = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        out[i] = item
    return out


def _error(e: Exception, where: str = "") -> dict[str, Any]:
    """A one-row batch that tells the driver to raise ``e`` (the engine's own callables): clearer
    than the error Ray makes of an exception raised in a task."""
    name = next(c.__name__ for c in type(e).__mro__ if getattr(builtins, c.__name__, None) is c)
    if name == "Exception":
        where = f"{type(e).__name__} on a Ray worker: {where}"
    return {_ERROR: _objects([name, where + str(e)])}


def _raise(error: np.ndarray) -> None:
    name, message = str(error[0]), str(error[1])
    cls = getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            exc = cls(message)
        except Exception:
            exc = RuntimeError(f"{name}: {message}")
    else:  # pragma: no cover - _error names a builtin class
        exc = RuntimeError(f"{name}: {message}")
    raise exc


class _Hashing:
    """The hasher of a Ray actor, built once from plain (picklable) arguments."""

    def __init__(
        self,
        config: EngramConfig | dict[str, Any] | str,
        tokenizer: str | os.PathLike[str],
        layers: Sequence[int] | None = None,
        index_dtype: str = "int32",
        flat: bool = False,
        tokenizer_fingerprint: str | None = None,
    ) -> None:
        if isinstance(config, EngramConfig):
            cfg = config
        elif isinstance(config, dict):
            cfg = EngramConfig.from_dict(config)
        else:
            cfg = resolve_config(config)
        if index_dtype not in ("int32", "int64"):
            raise ValueError(f"index_dtype must be 'int32' or 'int64', got {index_dtype!r}")
        self.tokenizer = os.fspath(tokenizer)
        comp = CompressedTokenizer.from_file(self.tokenizer)
        if tokenizer_fingerprint is not None and comp.fingerprint != tokenizer_fingerprint:
            raise ValueError(
                f"{self.tokenizer} on this Ray node (fingerprint {comp.fingerprint}) is not the "
                f"tokenizer of the job ({tokenizer_fingerprint}): every node needs the same file"
            )
        self.hasher = NgramHasher.from_tokenizer(cfg, comp)
        self.layers: list[int] = self.hasher.check_layers(None if layers is None else list(layers))
        self.dtype: IndexDType = "int32" if index_dtype == "int32" else "int64"
        self.flat = bool(flat)
        self.cols = cfg.cols


class HashBatches(_Hashing):
    """Adds the Engram hash ids of token-id sequences to Ray Data batches (``map_batches``).

    Each row of column ``column`` is one sequence of raw token ids of ``tokenizer``: the batch
    holds a 2-D ``[rows, T]`` array or a 1-D object array of 1-D arrays (any lengths, empty
    too), as Ray gives for a list column of Parquet or a ``read_numpy`` of ``[B, T]`` files.
    The result is the batch plus one column ``layer_<id>`` per Engram layer whose row ``r``
    is the ``[len(row r), cols]`` hash ids of row ``r``, equal to
    ``hasher.hash_tokens(row, layer_ids=..., dtype=index_dtype, flat=flat)[layer_id]``
    (ragged rows become Ray's variable-shaped tensor columns). All rows of a batch are hashed in
    one call of the Rust kernel.

    ``config``: an :class:`EngramConfig`, its ``to_dict()``, a preset name or a config JSON
    file. ``tokenizer``: the path of the model's ``tokenizer.json`` (readable on every node).
    ``layers``: a subset of the config's Engram layers (all by default). ``dead_id``: a raw
    token id that marks blocked positions (SPEC 8.3). The hasher is built once per actor::

        import ray
        from engram_rs.ray import HashBatches

        ds = ray.data.read_parquet("s3://bucket/tokenized/", columns=["input_ids"])
        ds = ds.map_batches(
            HashBatches,
            fn_constructor_kwargs={"config": "demo", "tokenizer": "/models/tokenizer.json"},
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=8),  # or concurrency=8
            batch_size=256,
        )
        ds.write_parquet("s3://bucket/with_hash_ids/")  # columns input_ids, layer_1, layer_15
    """

    def __init__(
        self,
        config: EngramConfig | dict[str, Any] | str,
        tokenizer: str | os.PathLike[str],
        layers: Sequence[int] | None = None,
        index_dtype: str = "int32",
        flat: bool = False,
        column: str = "input_ids",
        tokenizer_fingerprint: str | None = None,
        dead_id: int | None = None,
    ) -> None:
        super().__init__(config, tokenizer, layers, index_dtype, flat, tokenizer_fingerprint)
        self.column = column
        self.dead_id = dead_id

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        if self.column not in batch:
            raise ValueError(
                f"the batch has no column {self.column!r} (columns: {', '.join(batch)}): pass "
                "column= to HashBatches"
            )
        ids, cu, grid = _sequences(batch[self.column], self.column)
        out = self._hash(ids, cu)
        result = dict(batch)
        for x in self.layers:
            if grid is not None:
                result[f"layer_{x}"] = out[x].reshape(*grid, self.cols)
            else:
                result[f"layer_{x}"] = _objects(np.split(out[x], cu[1:-1]))
        return result

    def _hash(self, ids: np.ndarray, cu: npt.NDArray[np.int64]) -> dict[int, np.ndarray]:
        if ids.size == 0:
            return {x: np.zeros((0, self.cols), self.dtype) for x in self.layers}
        try:
            return self.hasher.hash_tokens(
                ids,
                layer_ids=self.layers,
                dtype=self.dtype,
                flat=self.flat,
                cu_seqlens=cu,
                dead_id=self.dead_id,
            )
        except _engram_rs.OutOfRangeError as e:
            r, pos = locate(cu, e.flat_index)
            raise _RowError(
                f"column {self.column!r}, row {r} of the batch, position {pos}: token id "
                f"{int(ids[e.flat_index])} is outside the tokenizer's vocabulary [0, {e.bound}): "
                "were these ids made with this tokenizer?",
                r,
            ) from None


class _RowError(ValueError):
    """A ValueError about row ``row`` of a batch."""

    def __init__(self, message: str, row: int) -> None:
        super().__init__(message)
        self.row = row


def _sequences(
    col: Any, column: str
) -> tuple[np.ndarray, npt.NDArray[np.int64], tuple[int, int] | None]:
    """(the concatenated ids, cu_seqlens, ``(rows, T)`` when the column is a 2-D array)."""
    if isinstance(col, np.ndarray) and col.dtype != object:
        if col.ndim != 2 or col.dtype.kind not in "iu":
            raise ValueError(
                f"column {column!r} must hold a sequence of token ids per row (a 2-D integer "
                f"array or an object array of 1-D arrays), got a {col.dtype} array of shape "
                f"{col.shape}"
            )
        rows, length = col.shape
        cu = np.arange(rows + 1, dtype=np.int64) * length
        return np.ascontiguousarray(col).reshape(-1), cu, (rows, length)
    parts = []
    for r, row in enumerate(col):
        if row is None:
            raise _RowError(
                f"column {column!r}, row {r} of the batch is null: every row needs a list of "
                "token ids (an empty list for an empty sequence)",
                r,
            )
        a = np.asarray(row)
        if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
            raise _RowError(
                f"column {column!r}, row {r} of the batch must be a 1-D list of token ids "
                f"(integers, no nulls), got a {a.dtype} array of shape {a.shape}",
                r,
            )
        parts.append(a if a.size else np.zeros(0, np.int64))
    cu = cu_seqlens_of([a.shape[0] for a in parts])
    ids = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return ids, cu, None


class _RowBatches(HashBatches):
    """HashBatches for the engine: an error becomes a one-row batch for the driver to raise."""

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        try:
            return super().__call__(batch)
        except Exception as e:
            paths = batch.get("path")
            row = e.row if isinstance(e, _RowError) else 0
            where = f"{paths[row]}: " if paths is not None and row < len(paths) else ""
            return _error(e, where)


# ---- pieces of files read whole (streams, Arrow IPC, JSONL) -------------------------------------


def _split_files(
    batch: dict[str, Any],
    *,
    fmt: str,
    kind: str,
    plan: dict[str, tuple[int, int, list[int]]],
    chunk: int,
    history: int,
    token_dtype: str,
    column: str,
) -> dict[str, Any]:
    """Cuts whole files (rows ``path``, ``bytes`` of ``read_binary_files``) into pieces.

    ``plan[path]``: (file index, stream position of its first token, the stream's last
    ``history`` tokens before it). Every file gives at least one piece, the last one flagged.
    """
    rows: list[dict[str, Any]] = []
    try:
        for path, data in zip(batch["path"], batch["bytes"], strict=True):
            if path not in plan:
                raise ValueError(f"Ray read {path!r}, which is not one of the inputs")
            i, first, ctx0 = plan[path]
            summed = _engram_rs.Checksum()  # the input's checksum, of the bytes as read here
            summed.update(np.frombuffer(data, dtype=np.uint8))
            checksum = summed.hexdigest()
            if kind == "stream":
                pieces = _stream_pieces(path, data, fmt, token_dtype, first, ctx0, chunk, history)
            elif fmt == "arrow":
                pieces = _arrow_pieces(path, data, column, chunk)
            else:
                pieces = _jsonl_pieces(path, data, chunk)
            for k, piece in enumerate(pieces):
                rows.append(dict(piece, file=i, piece=k, last=False, checksum=checksum))
            if not rows or rows[-1]["file"] != i:
                rows.append(
                    {"pos": 0, "line": 0, "text": b"", "units": 0, "file": i, "piece": 0}
                    | {"checksum": checksum}
                )
            rows[-1]["last"] = True
    except Exception as e:
        return _error(e)
    return _columns(rows)


def _columns(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in rows[0] if rows else []:
        values = [r[name] for r in rows]
        if isinstance(values[0], np.ndarray):
            out[name] = _objects(values)
        elif isinstance(values[0], bytes):
            out[name] = _objects(values)
        else:
            out[name] = np.array(values)
    return out


def _stream_pieces(
    path: str,
    data: bytes,
    fmt: str,
    token_dtype: str,
    first: int,
    ctx0: list[int],
    chunk: int,
    history: int,
) -> Iterator[dict[str, Any]]:
    if fmt == "bin":
        arr = np.frombuffer(data, dtype=np.dtype(token_dtype))
    else:
        try:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        except ValueError as e:
            raise ValueError(f"{path}: not a readable .npy token array: {e}") from None
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise ValueError(f"{path}: changed since the run started (not a 1-D token stream)")
    before = np.asarray(ctx0, dtype=np.int64)
    for pos in range(0, max(1, arr.shape[0]), chunk):  # an empty file gives one empty piece
        piece = arr[pos : pos + chunk]
        if history:
            near = arr[max(0, pos - history) : pos].astype(np.int64)
            ctx = np.concatenate([before, near])[-history:]
        else:
            ctx = np.zeros(0, np.int64)
        yield {"pos": pos, "start": first + pos, "ctx": ctx, "tokens": piece, "units": len(piece)}


def _arrow_pieces(path: str, data: bytes, column: str, chunk: int) -> Iterator[dict[str, Any]]:
    """The row groups (:func:`.sources.row_groups`, as the local engine reads them) of the
    Arrow IPC file or stream of the bytes ``data``; an empty file gives one empty piece."""
    import pyarrow as pa

    table = read_arrow_ipc(lambda: pa.py_buffer(data), path)
    if column not in table.column_names:
        raise ValueError(f"{path}: no column {column!r}: the file changed since the run started")
    batches = table.select([column]).to_batches(max_chunksize=4096)
    empty = True
    for tokens, lengths, first, end in row_groups(iter(batches), path, column, 0, chunk):
        empty = False
        yield {"pos": first, "tokens": tokens, "lengths": lengths, "units": end - first}
    if empty:
        dtype = table.schema.field(column).type.value_type.to_pandas_dtype()
        yield {"pos": 0, "tokens": np.zeros(0, dtype), "lengths": np.zeros(0, np.int64), "units": 0}


def _jsonl_pieces(path: str, data: bytes, chunk: int) -> Iterator[dict[str, Any]]:
    """The line groups (:func:`.sources.line_groups`, as the local engine reads them) of the
    bytes ``data`` of a whole file, with their byte offset and the number of their first line:
    a line longer than ``max_line_bytes(chunk)`` is refused before it is tokenized."""
    for raw, start, end, number in line_groups(io.BytesIO(data), path, 0, chunk):
        yield {"pos": start, "line": number, "text": b"".join(raw), "units": end - start}


class _HashPieces(_Hashing):
    """Hashes the pieces of ``_split_files`` (one ``hash_block`` each, as the local engine)."""

    def __init__(
        self,
        config: dict[str, Any],
        tokenizer: str,
        layers: list[int],
        index_dtype: str,
        flat: bool,
        tokenizer_fingerprint: str,
        boundary: Boundary,
        fmt: str,
        kind: str,
        paths: list[str],
        text_field: str,
    ) -> None:
        super().__init__(config, tokenizer, layers, index_dtype, flat, tokenizer_fingerprint)
        self.boundary = boundary
        self.fmt = fmt
        self.kind = kind
        self.paths = paths
        self.text_field = text_field
        self.text: Any = _engram_rs.TokenizerCore(self.tokenizer) if fmt == "jsonl" else None

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        if _ERROR in batch:
            return batch
        try:
            rows = [self._piece(batch, k) for k in range(len(batch["file"]))]
        except Exception as e:
            return _error(e)
        return _columns(rows)

    def _piece(self, batch: dict[str, Any], k: int) -> dict[str, Any]:
        i, pos = int(batch["file"][k]), int(batch["pos"][k])
        path = self.paths[i]
        row: dict[str, Any] = {
            "file": i,
            "piece": int(batch["piece"][k]),
            "last": bool(batch["last"][k]),
            "units": int(batch["units"][k]),
            "checksum": str(batch["checksum"][k]),
        }
        start = 0
        ctx = np.zeros(0, np.int64)
        if self.kind == "stream":
            tokens = np.asarray(batch["tokens"][k])
            start = int(batch["start"][k])
            ctx = np.asarray(batch["ctx"][k], dtype=np.int64)
            block = Block(tokens, None, {}, token_where(path, pos), tokens.shape[0])
            row["start"] = start
        elif self.fmt == "arrow":
            tokens = np.asarray(batch["tokens"][k])
            lengths = np.asarray(batch["lengths"][k], dtype=np.int64)
            block = Block(tokens, lengths, {}, row_where(path, lengths, pos), 0)
        else:
            block = self._jsonl_block(path, batch["text"][k], pos, int(batch["line"][k]))
        if block.tokens.shape[0]:
            out, starts = hash_block(
                self.hasher, block, ctx, start, self.boundary, self.layers, self.dtype, self.flat
            )
        else:
            out = {x: np.zeros((0, self.cols), self.dtype) for x in self.layers}
            starts = np.zeros(0, np.int64)
        row["tokens"] = block.tokens
        if block.lengths is not None:
            row["lengths"] = block.lengths
        else:
            row["starts"] = starts
        for x in self.layers:
            row[f"layer_{x}"] = out[x]
        return row

    def _jsonl_block(self, path: str, data: bytes, start: int, number: int) -> Block:
        """As ``Source._read_jsonl`` does with a group of lines (their lengths were checked)."""
        lines = decode_lines(io.BytesIO(data).readlines(), path, number, start)
        return jsonl_block(self.text, lines, self.text_field, path, start, number)


# ---- the precompute engine ----------------------------------------------------------------------


def run(run: EngineRun) -> Counts:
    """The precompute's ``engine="ray"``: hashes ``source`` on Ray Data and appends the results,
    in input order, to ``files`` exactly as the local engine does; returns the same counts.

    Uses the running Ray (``ray.init`` by the caller), else starts one with ``ray.init()``
    (which connects to ``RAY_ADDRESS`` when set) and shuts it down at the end. Writes no
    resume state: ``--resume`` with this engine reruns the job from the start.
    """
    source = run.source
    if source.format == "text":
        raise ValueError(
            f"{source.paths[0]}: the ray engine cannot hash plain text inputs (format text: a "
            "stream whose token positions are known only once all text before is tokenized): "
            "use --engine local, or tokenize to .bin first"
        )
    if any(f.bytes for f in run.files.values()):
        # Not a ValueError: precompute() deletes the partial directory after those (bad input).
        raise FileExistsError(
            f"{run.partial} holds an interrupted run of the local engine: continue it with "
            "--engine local --resume (the ray engine cannot resume), or start the job again "
            "on Ray with --overwrite and without --resume"
        )
    twice = sorted({p for p in source.paths if source.paths.count(p) > 1})
    if twice:
        raise ValueError(
            f"the ray engine reads each input once: {twice[0]} is given more than once (use "
            "--engine local to hash a file several times)"
        )
    tokenizer = source.tokenizer_path
    if tokenizer is None:  # pragma: no cover - precompute() always passes it
        raise ValueError("the ray engine needs the source's tokenizer path")
    ray = _ray()
    started = False
    if not ray.is_initialized():
        ray.init()
        started = True
    context = ray.data.DataContext.get_current()
    saved = (context.execution_options.preserve_order, context.enable_progress_bars)
    v2 = getattr(context, "use_datasource_v2", None)
    try:
        context.execution_options.preserve_order = True
        if run.progress is False:
            context.enable_progress_bars = False
        if v2 and importlib.util.find_spec("aiohttp") is None:
            # Ray's DataSourceV2 Parquet reader (2.5x+) resolves the paths on several threads,
            # each importing fsspec's HTTP filesystem; without aiohttp (ray[data] does not
            # install it) that import fails, and racing threads get an ImportError Ray does not
            # catch: read Parquet with the V1 datasource, which resolves them once.
            context.use_datasource_v2 = False
        return _run(ray, run)
    finally:
        context.execution_options.preserve_order, context.enable_progress_bars = saved
        if v2 is not None:
            context.use_datasource_v2 = v2
        if started:
            ray.shutdown()


def _run(ray: Any, run: EngineRun) -> Counts:
    source, hasher, job, chunk_tokens = run.source, run.hasher, run.job, run.chunk_tokens
    tokenizer = source.tokenizer_path
    assert tokenizer is not None
    layers = run.layers
    common: dict[str, Any] = {
        "config": hasher.config.to_dict(),
        "tokenizer": tokenizer,
        "layers": layers,
        "index_dtype": job["index_dtype"],
        "flat": bool(job["flat"]),
        "tokenizer_fingerprint": job["tokenizer_fingerprint"],
    }
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    pool = ray.data.ActorPoolStrategy(min_size=1, max_size=cpus)
    native = source.format == "parquet" or (source.format == "npy" and source.kind == "rows")
    if native:
        if source.format == "parquet":
            ds = ray.data.read_parquet(source.paths, columns=[source.column], include_paths=True)
            column = source.column
            rows_per_batch = _parquet_rows_per_batch(source, chunk_tokens)
        else:
            ds = ray.data.read_numpy(source.paths, include_paths=True)
            column = "data"
            width = max(1, int(source.npy(source.paths[0]).shape[1]))
            rows_per_batch = max(1, chunk_tokens // width)
        ds = ds.map_batches(
            _RowBatches,
            fn_constructor_kwargs=dict(common, column=column, dead_id=run.boundary.dead_id),
            compute=pool,
            batch_size=rows_per_batch,
            batch_format="numpy",
        )
    else:
        history = hasher.config.max_ngram_size - 1
        plan = _plan(source, history) if source.kind == "stream" else _indices(source)
        ds = ray.data.read_binary_files(source.paths, include_paths=True)
        ds = ds.map_batches(
            _split_files,
            fn_kwargs={
                "fmt": source.format,
                "kind": source.kind,
                "plan": plan,
                "chunk": chunk_tokens,
                "history": history,
                "token_dtype": source.token_dtype.name,
                "column": source.column,
            },
            batch_size=1,
            batch_format="numpy",
        )
        ds = ds.map_batches(
            _HashPieces,
            fn_constructor_kwargs=dict(
                common,
                boundary=run.boundary,
                fmt=source.format,
                kind=source.kind,
                paths=source.paths,
                text_field=source.text_field,
            ),
            compute=pool,
            batch_size=1,
            batch_format="numpy",
        )
    # Inputs that Ray's own readers read (Parquet, .npy batches): one task per file sums it on
    # the cluster beside the run (the driver reads no input); the others are summed by the tasks
    # that read them whole (_split_files).
    sums = [_CHECKSUM.remote(p) for p in source.paths] if native else []
    batches = ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2)
    writer = _Appender(run, hasher.cols)
    try:
        for batch in batches:
            if _ERROR in batch:
                _raise(batch[_ERROR])
            if native:
                writer.rows_batch(batch, column)
            else:
                writer.pieces(batch)
    finally:
        writer.close()
    if not native and writer.next_file != len(source.paths):
        raise RuntimeError(
            f"Ray returned the pieces of {writer.next_file} of {len(source.paths)} input files"
        )
    if run.summed is not None:
        for i, checksum in enumerate(ray.get(sums)):
            run.summed(i, checksum)
    return {"tokens": writer.tokens, "sequences": writer.sequences}


def _checksum_file(path: str) -> str:
    """The checksum of the whole input ``path`` (a Ray task)."""
    summed = _engram_rs.Checksum()
    summed.update_from_file(path)
    return summed.hexdigest()


class _RemoteChecksum:
    """``_checksum_file`` as a Ray task that reserves no CPU (it waits on the disk), made on
    first use (Ray is imported only by the engine)."""

    task: Any = None

    def remote(self, path: str) -> Any:
        if self.task is None:
            self.task = _ray().remote(num_cpus=0)(_checksum_file)
        return self.task.remote(path)


_CHECKSUM = _RemoteChecksum()


def _plan(source: Source, history: int) -> dict[str, tuple[int, int, list[int]]]:
    """Per stream file: (index, position of its first token, the ``history`` tokens before)."""
    plan = {}
    start = 0
    ctx = np.zeros(0, np.int64)
    for i, (path, n) in enumerate(zip(source.paths, source.totals, strict=True)):
        plan[path] = (i, start, ctx.tolist())
        if source.format == "bin":
            arr: np.ndarray = np.memmap(path, dtype=source.token_dtype, mode="r")
        else:
            arr = source.npy(path)
        if history:
            tail = np.asarray(arr[max(0, n - history) :], dtype=np.int64)
            ctx = np.concatenate([ctx, tail])[-history:]
        start += n
    return plan


def _indices(source: Source) -> dict[str, tuple[int, int, list[int]]]:
    return {path: (i, 0, []) for i, path in enumerate(source.paths)}


def _parquet_rows_per_batch(source: Source, chunk_tokens: int) -> int:
    """Rows per batch for about ``chunk_tokens`` tokens, from the first file's metadata."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(source.paths[0]).metadata
    values = 0
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        for c in range(group.num_columns):
            chunk = group.column(c)
            if chunk.path_in_schema.split(".")[0] == source.column:
                values += int(chunk.num_values)
    rows = int(meta.num_rows)
    if not rows or not values:
        return 1024
    return max(1, int(chunk_tokens * rows / values))


class _Appender:
    """Appends results to the output files in order, as the local engine does."""

    def __init__(self, run: EngineRun, cols: int) -> None:
        self.files = run.files
        self.partial = run.partial
        self.layers = run.layers
        self.cols = cols
        source = run.source
        self.index = {p: i for i, p in enumerate(source.paths)}
        self.tokens = 0
        self.sequences = 0
        self.next_file = 0
        self.next_piece = 0
        self.summed = run.summed
        self.bar = run.progress_bar()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def _append(
        self, out: dict[int, np.ndarray], tokens: np.ndarray, starts: np.ndarray, units: int
    ) -> None:
        for name, arr in output_arrays(out, tokens, starts, self.layers).items():
            self.files[name].append(arr, self.partial)
        self.tokens += tokens.shape[0]
        self.sequences += starts.shape[0]
        if self.bar is not None:
            self.bar.update(units)

    def rows_batch(self, batch: dict[str, Any], column: str) -> None:
        """A batch of HashBatches: rows of the inputs, in order."""
        paths = batch.get("path")
        if paths is not None:
            for path in dict.fromkeys(paths.tolist()):
                i = self.index.get(path)
                if i is None or i < self.next_file:
                    raise RuntimeError(f"Ray returned rows of {path} out of the input order")
                self.next_file = i
        col = batch[column]
        if isinstance(col, np.ndarray) and col.dtype != object:
            rows = col.shape[0]
            lengths = np.full(rows, col.shape[1] if col.ndim == 2 else 0, dtype=np.int64)
            tokens = col.reshape(-1)
        else:
            rows = len(col)
            arrays = [np.asarray(r).reshape(-1) for r in col]
            lengths = np.array([a.shape[0] for a in arrays], dtype=np.int64)
            tokens = np.concatenate(arrays) if arrays else np.zeros(0, np.int64)
        out = {x: _stack(batch[f"layer_{x}"], self.cols) for x in self.layers}
        starts = self.tokens + cu_seqlens_of(lengths)[:-1]
        self._append(out, tokens, starts[:rows], rows)

    def pieces(self, batch: dict[str, Any]) -> None:
        """A batch of _HashPieces: pieces of the files, checked to come in order."""
        for k in range(len(batch["file"])):
            i, piece = int(batch["file"][k]), int(batch["piece"][k])
            if (i, piece) != (self.next_file, self.next_piece):
                raise RuntimeError(
                    f"Ray returned piece {piece} of input {i} where piece {self.next_piece} of "
                    f"input {self.next_file} was due"
                )
            if bool(batch["last"][k]):
                self.next_file, self.next_piece = i + 1, 0
                if self.summed is not None:
                    self.summed(i, str(batch["checksum"][k]))
            else:
                self.next_piece += 1
            tokens = np.asarray(batch["tokens"][k]).reshape(-1)
            out = {
                x: np.asarray(batch[f"layer_{x}"][k]).reshape(-1, self.cols) for x in self.layers
            }
            if "starts" in batch:
                start = int(batch["start"][k])
                if tokens.shape[0] and start != self.tokens:
                    raise RuntimeError(f"Ray returned stream position {start}, {self.tokens} due")
                starts = np.asarray(batch["starts"][k], dtype=np.int64).reshape(-1)
            else:
                lengths = np.asarray(batch["lengths"][k], dtype=np.int64).reshape(-1)
                starts = self.tokens + cu_seqlens_of(lengths)[:-1]
            self._append(out, tokens, starts, int(batch["units"][k]))


def _stack(col: Any, cols: int) -> np.ndarray:
    """The rows of a ``layer_<id>`` column, concatenated: ``[tokens, cols]``."""
    if isinstance(col, np.ndarray) and col.dtype != object:
        return col.reshape(-1, cols)
    arrays = [np.asarray(r).reshape(-1, cols) for r in col]
    return np.concatenate(arrays) if arrays else np.zeros((0, cols), np.int64)
