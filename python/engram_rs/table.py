"""Host embedding tables: memory-mapped safetensors, FP8 rows, fast gathers, async prefetch."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, TypeVar, cast, overload

import numpy as np
import numpy.typing as npt

from . import _engram_rs, dtypes
from .progress import progress_bar

__all__ = ["HostTable", "Prefetch", "hot_rows_for"]

if TYPE_CHECKING:
    import torch

    #: Row ids: an array, a (nested) list or a torch tensor of any integer dtype.
    Indices: TypeAlias = npt.ArrayLike | torch.Tensor
    #: A dtype argument: a name (canonical or short), a numpy dtype or a torch dtype.
    DTypeSpec: TypeAlias = (
        Literal["float32", "f32", "float16", "f16", "bfloat16", "bf16", "float8_e4m3", "fp8"]
        | np.dtype[np.generic]
        | type[np.generic]
        | torch.dtype
    )
    #: Values for write_rows: float arrays, lists, torch tensors (or a table's raw bits).
    Values: TypeAlias = npt.ArrayLike | torch.Tensor
    #: What gather returns or fills: a numpy array or a torch tensor.
    Rows: TypeAlias = npt.NDArray[np.floating[Any]] | npt.NDArray[np.uint16] | torch.Tensor

_Out = TypeVar("_Out", bound="npt.NDArray[Any] | torch.Tensor")


def _torch() -> Any:
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is a test dependency
        raise ImportError("this needs PyTorch: pip install torch") from e
    return torch


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "data_ptr")


def hot_rows_for(
    row_counts: npt.ArrayLike, rows: int, row_bytes: int, hot_bytes: int
) -> npt.NDArray[np.uint64]:
    """The static hot set of a tiered table: the most counted rows (ties to the lower row id)
    whose ``row_bytes`` each (values and scales) fit in ``hot_bytes``, rows never counted
    excluded, as sorted uint64 row ids. ``row_counts`` holds one count per row."""
    counts = np.asarray(row_counts)
    if counts.ndim != 1 or counts.dtype.kind not in "iu" or counts.size != rows:
        raise ValueError(
            f"row_counts must be a 1-D integer array of one count per row ({rows} rows), got "
            f"{counts.dtype} shape {counts.shape}"
        )
    counted = np.flatnonzero(counts).astype(np.int64)
    # The core's rule, which the cache simulation's static hot set also follows.
    hot = _engram_rs.cachesim_hot_set(
        counted, counts[counted].astype(np.uint64), max(1, row_bytes), hot_bytes
    )
    return np.asarray(hot, dtype=np.uint64)


def _round_to_f32_odd(values: npt.NDArray[np.float64]) -> npt.NDArray[np.float32]:
    """float64 -> float32 rounded to odd: truncated, with the last bit set when inexact. A
    second rounding to bfloat16, float16 or E4M3 (far fewer bits) then rounds exactly as one
    direct rounding of the float64 would (as torch's ``.to(dtype)`` does)."""
    f = values.astype(np.float32)
    wide = f.astype(np.float64)
    # Where rounding went away from zero, step back toward zero (truncation).
    away = np.isfinite(values) & (np.abs(wide) > np.abs(values))
    f = np.where(away, np.nextafter(f, np.float32(0)), f)
    inexact = np.isfinite(values) & (f.astype(np.float64) != values)
    bits = f.view(np.uint32) | inexact.astype(np.uint32)
    out: npt.NDArray[np.float32] = bits.view(np.float32)
    return out


#: What ``HostTable.create``/``open`` take as a path, as ``os.fspath`` does.
PathArg = str | bytes | os.PathLike[str] | os.PathLike[bytes]


def _path(path: PathArg) -> str | bytes:
    """``os.path.abspath(os.fspath(path))``: a str or bytes path, or a TypeError naming what was
    passed."""
    try:
        # Absolute: the table's path (and the optimizer state found beside it) does not follow
        # a later os.chdir.
        return os.path.abspath(os.fspath(path))
    except TypeError:
        raise TypeError(
            f"path must be a str, bytes or os.PathLike, got {type(path).__name__}: "
            "pass a file path such as 'table.safetensors'"
        ) from None


def _scale_bytes(scales: Any, n: int, dim: int) -> np.ndarray:
    """FP8 scales for ``write_rows`` as uint8 UE8M0 bytes [n, dim // 32], or a clear error."""
    want = (n, dim // dtypes.FP8_BLOCK)
    accepted = (
        "scales of an FP8 table are UE8M0 exponent bytes: a uint8 numpy array or torch tensor, "
        f"or a torch.float8_e8m0fnu tensor, of shape [n, dim // 32] = {want}"
    )
    if _is_torch(scales):
        torch = _torch()
        sc = scales.detach().cpu()
        e8m0 = getattr(torch, "float8_e8m0fnu", None)
        if e8m0 is not None and sc.dtype == e8m0:
            sc = sc.view(torch.uint8)
        if sc.dtype != torch.uint8:
            raise ValueError(f"{accepted}; got a torch {sc.dtype} tensor{_float_hint(sc)}")
        arr = sc.contiguous().numpy()
    elif isinstance(scales, np.ndarray):
        if scales.dtype != np.uint8:
            raise ValueError(f"{accepted}; got a numpy {scales.dtype} array{_float_hint(scales)}")
        arr = scales
    else:
        raise TypeError(f"{accepted}; got {type(scales).__name__}")
    if tuple(arr.shape) != want:
        raise ValueError(f"{accepted}; got shape {tuple(arr.shape)}")
    return np.ascontiguousarray(arr)


def _float_hint(scales: Any) -> str:
    if getattr(scales, "is_floating_point", lambda: False)() or (
        isinstance(scales, np.ndarray) and scales.dtype.kind == "f"
    ):
        return " (float scale factors are not converted: pass their bytes, log2(scale) + 127)"
    return ""


def _indices(idx: Any) -> np.ndarray:
    """One index rule for gather, prefetch and write_rows: an array, a list or a torch tensor of
    any integer dtype and byte order, any shape; int32/int64 arrays pass without a copy. Range
    checks (against the table's rows) happen in the core, positions in this shape."""
    if _is_torch(idx):
        idx = idx.detach().cpu().numpy()
    arr = np.asarray(idx)
    if arr.size == 0 and arr.dtype.kind in "fiu":
        return np.zeros(arr.shape, np.int64)  # numpy's dtype for [] is float64
    if arr.dtype.kind not in "iu":
        raise TypeError(
            f"indices must be integers, got dtype {arr.dtype}: convert with idx.astype(numpy.int64)"
        )
    if arr.dtype == np.uint64 and arr.size and int(arr.max()) >= 2**63:
        pos = tuple(int(i) for i in np.unravel_index(int(np.argmax(arr >= 2**63)), arr.shape))
        raise IndexError(
            f"row index {int(arr[pos])} at position {pos} is out of range (beyond int64)"
        )
    if arr.dtype not in (np.dtype(np.int32), np.dtype(np.int64)):
        arr = arr.astype(np.int64)
    # Not np.ascontiguousarray: it would turn a 0-d index into a 1-d one.
    return arr if arr.flags.c_contiguous else arr.copy(order="C")


def _progress_bar(rows: int) -> Callable[[int, int], object]:
    """The core's progress callback on the library's bar (tqdm), else a line on stderr."""
    bar = progress_bar(rows, "rows", True, "engram_rs: initialising")
    if bar is None:

        def line(done: int, total: int) -> None:
            end = "\n" if done == total else ""
            print(f"\rengram_rs: initialised {done}/{total} rows", end=end, file=sys.stderr)

        return line

    def update(done: int, total: int) -> None:
        if done > bar.n:  # workers may report out of order
            bar.update(done - bar.n)
        if done == total:
            bar.close()

    return update


class Prefetch:
    """A gather started in the background; ``wait()`` returns its result."""

    def __init__(self, core: Any, finish: Any, rows: int, out_dtype: str) -> None:
        self._core = core
        self._finish = finish
        self._rows = rows
        self._out_dtype = out_dtype

    def __repr__(self) -> str:
        state = "done" if self.done() else "running"
        return f"Prefetch({self._rows} rows -> {self._out_dtype}, {state})"

    def done(self) -> bool:
        """Whether the gather has finished."""
        return bool(self._core.done())

    def wait(self) -> Any:
        """Blocks until the gather has finished (without the GIL); returns the rows."""
        return self._finish(self._core.wait())


class HostTable:
    """Rows of an embedding table in host memory or on disk, gathered by index."""

    def __init__(self, core: Any) -> None:
        if not isinstance(core, _engram_rs.TableCore):
            raise TypeError(
                f"HostTable({core!r}) is not how tables are made: use HostTable.open(path) for a "
                "safetensors file, HostTable.create(path, rows, dim) for a new one, or "
                "HostTable.from_numpy / from_torch to wrap an array"
            )
        self._core = core
        self._in_flight: list[tuple[int, int, Any]] = []
        # A writable tiered table flushes at close, in the process that opened it only (a
        # forked child never writes the parent's changes back).
        self._flush_pid = os.getpid() if core.mode == "tiered" and core.writable else None

    # -- constructors ----------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: PathArg,
        rows: int,
        dim: int,
        dtype: DTypeSpec = "bfloat16",
        init: Literal["normal", "zeros"] = "normal",
        std: float = 0.02,
        seed: int = 0,
        name: str = "weight",
        progress: bool | Callable[[int, int], object] | None = None,
    ) -> HostTable:
        """Writes a new safetensors table atomically (tmp + rename), initialised in parallel.

        FP8 tables get per-block UE8M0 scales in a tensor ``{name}_scale``. ``progress``: a
        callable ``progress(rows_done, rows)`` (called at each percent, from worker threads; an
        exception it raises stops the creation), ``True`` for a progress bar (tqdm when
        installed, else a line on stderr), ``False`` for none; the default shows the bar for
        tables over 1 GiB when stderr is a terminal. ``path`` may be str, bytes or
        os.PathLike; its directory must exist.

        The file's blocks are reserved before it is written, so a full disk raises ``OSError``
        (naming the file and size) instead of crashing. The temporary file,
        ``.<name>.<random>.tmp`` in the same directory, is removed on every error; only a
        process killed while creating leaves it behind. The returned table is writable and
        holds the file's exclusive lock until it is closed.
        """
        dt = dtypes.resolve(dtype, "dtype", dtypes.NAMES)
        for label, value in (("rows", rows), ("dim", dim), ("seed", seed)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{label} must be a non-negative int, got {value!r}")
        if dim < 1:
            raise ValueError(f"dim must be at least 1, got {dim}")
        if seed >= 2**64:
            raise ValueError(f"seed must be below 2**64, got {seed}")
        if not isinstance(name, str):
            raise TypeError(f"name must be a str (the tensor's name), got {type(name).__name__}")
        if name in ("", "__metadata__"):
            raise ValueError(
                f"name={name!r} cannot name a table: safetensors reserves '__metadata__' and "
                "needs a non-empty name; pass another name (the default is 'weight')"
            )
        if progress is None:
            progress = rows * dim * 2 > 1 << 30 and sys.stderr.isatty()
        if progress is True:
            progress = _progress_bar(rows)
        elif progress is False:
            progress = None
        elif not callable(progress):
            raise TypeError(
                f"progress must be a bool or a callable(rows_done, rows), got {progress!r}"
            )
        # The core checks the directory (FileNotFoundError) and everything else about the file.
        p = _path(path)
        core = _engram_rs.TableCore.create(p, rows, dim, dt, init, float(std), seed, name, progress)
        return cls(core)

    @classmethod
    def open(
        cls,
        path: PathArg,
        name: str | None = None,
        scales: str | None = None,
        mode: Literal["mmap", "resident"] = "mmap",
        writable: bool = False,
    ) -> HostTable:
        """Opens a table in any safetensors file (a checkpoint shard, say).

        ``name`` picks the tensor (required if several); ``scales`` names the UE8M0 tensor of an
        FP8 table; ``mode`` is "mmap" (lazy, page cache, larger than RAM) or "resident" (copied
        into huge-page memory, prefaulted); ``writable`` allows ``write_rows`` and ``flush``.

        The table keeps the file open with an advisory lock (``flock``) until ``close()``:
        shared when read-only, exclusive when writable, so a conflicting open (in this or
        another process) raises ``OSError`` at once. A writable mmap table has the file's
        blocks allocated first (a full disk is an ``OSError`` here, not a crash at a write). A
        resident open larger than the available memory raises ``MemoryError``. What no check
        can prevent: another process that ignores the lock and truncates the file while an
        mmap table uses it makes the next read of a vanished page crash with SIGBUS.
        """
        core = _engram_rs.TableCore.open(_path(path), name, scales, mode, writable)
        return cls(core)

    @classmethod
    def open_tiered(
        cls,
        path: PathArg,
        *,
        hot_bytes: int | None = None,
        row_counts: npt.ArrayLike | None = None,
        hot_rows: npt.ArrayLike | None = None,
        name: str | None = None,
        scales: str | None = None,
        direct: bool | None = None,
        writable: bool = False,
        dirty_bytes: int = 1 << 30,
    ) -> HostTable:
        """Opens a table larger than memory (mode "tiered"): a hot set of rows is read
        into memory now (packed in one huge-page buffer, found through a bit-per-row index) and
        every other row is read from the file by the gathers that need it, each distinct row
        once a call, many reads in flight, with O_DIRECT where the file system supports it
        (``direct=None``; ``True`` insists, ``False`` reads through the page cache). Nothing is
        mapped: a file truncated meanwhile is an ``OSError`` naming the file and the offset,
        never a crash. The hot set: ``hot_rows`` (row ids), or the rows with the highest
        ``row_counts`` (one count per row, e.g. from ``engram-rs precompute --row-counts``)
        that fit in ``hot_bytes`` (rows never counted are never hot). Gathers, prefetches and
        ``out=`` work as on any table; ``write_rows`` and raw reads are refused.

        ``writable=True``: the fused optimizers train it. A step updates hot rows in memory and
        holds the cold rows it changes (read from the file once) in a write-back store, where
        gathers find them, until ``flush()`` writes every changed row back; a step flushes by
        itself first when the store holds more than ``dirty_bytes``, and ``close()`` flushes.
        A flush is journaled (``<file>.journal``, synced before the table is touched, replayed
        by the next writable open if the process died during it), so the file is always as of
        a completed flush: a crash loses the updates since the last flush, nothing more.
        Optimizer state lives in files beside the table (as for ``mode="mmap"``).
        """
        if (hot_rows is None) == (hot_bytes is None):
            raise ValueError(
                "open_tiered needs its hot set: hot_rows=[...] (row ids), or hot_bytes=N with "
                "row_counts= (one count per row: the N bytes of the most looked-up rows)"
            )
        if hot_rows is not None:
            if row_counts is not None:
                raise ValueError("pass hot_rows or row_counts with hot_bytes, not both")
            hot = np.asarray(hot_rows)
            if hot.dtype.kind not in "iu" or hot.ndim != 1:
                raise ValueError(
                    f"hot_rows must be a 1-D integer array of row ids, got {hot.dtype} "
                    f"shape {hot.shape}"
                )
            if hot.size and int(hot.min()) < 0:
                raise ValueError(f"hot_rows holds {int(hot.min())}: row ids are >= 0")
            hot = np.unique(hot).astype(np.uint64)
        else:
            assert hot_bytes is not None
            if isinstance(hot_bytes, bool) or not isinstance(hot_bytes, (int, np.integer)):
                raise TypeError(f"hot_bytes must be an int, got {type(hot_bytes).__name__}")
            if hot_bytes < 0:
                raise ValueError(f"hot_bytes = {hot_bytes}: a memory budget is >= 0 bytes")
            if row_counts is None:
                raise ValueError(
                    "hot_bytes= chooses the hot rows by their counts: pass row_counts= (one "
                    "count per row, from engram-rs precompute --row-counts), or hot_rows="
                )
            layout = _engram_rs.TableCore.open(_path(path), name, scales, "mmap", False)
            rows, per_row = int(layout.rows), int(layout.nbytes) // max(1, int(layout.rows))
            layout.close()
            hot = hot_rows_for(row_counts, rows, per_row, int(hot_bytes))
        if isinstance(dirty_bytes, bool) or not isinstance(dirty_bytes, (int, np.integer)):
            raise TypeError(f"dirty_bytes must be an int, got {type(dirty_bytes).__name__}")
        if dirty_bytes < 0:
            raise ValueError(f"dirty_bytes = {dirty_bytes}: a memory budget is >= 0 bytes")
        core = _engram_rs.TableCore.open_tiered(
            _path(path), hot, name, scales, direct, bool(writable), int(dirty_bytes)
        )
        return cls(core)

    @property
    def tier_stats(self) -> dict[str, int | bool] | None:
        """A tiered table's counters since it was opened: ``hot_rows``, ``hot_bytes`` and
        ``index_bytes`` (the memory it holds), ``lookups`` and ``hits`` (ids gathered, and those
        served from memory), ``misses`` (distinct cold rows read, once per call), ``reads`` and
        ``read_bytes`` (the reads that fetched them), ``direct`` (O_DIRECT), and for training
        ``dirty_rows``, ``dirty_hot_rows`` and ``dirty_bytes`` (changed since the last flush)
        and ``flushes``; None for other modes."""
        stats = self._core.tier_stats
        return None if stats is None else dict(stats)

    @classmethod
    def from_numpy(
        cls,
        arr: npt.NDArray[Any],
        scales: npt.NDArray[np.uint8] | None = None,
        dtype: DTypeSpec | None = None,
    ) -> HostTable:
        """Wraps a C-contiguous 2-D array without copying (the table keeps it alive).

        ``dtype="float8_e4m3"`` takes uint8 ``arr`` [rows, dim] and uint8 ``scales``
        [rows, dim // 32]; ``dtype="bfloat16"`` takes a uint16 array.
        """
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"from_numpy needs a numpy array, got {type(arr).__name__}")
        if arr.ndim != 2:
            raise ValueError(f"a table must be 2-D [rows, dim], got shape {arr.shape}")
        if dtype is None:
            inferred = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}
            if arr.dtype not in inferred:
                raise ValueError(
                    f"cannot infer the table dtype of a {arr.dtype} array: pass "
                    'dtype="bfloat16" (uint16 bits) or dtype="float8_e4m3" (uint8 codes)'
                )
            dt = inferred[arr.dtype]
        else:
            dt = dtypes.resolve(dtype, "dtype", dtypes.NAMES)
        if arr.dtype != dtypes.DTYPES[dt].numpy:
            raise ValueError(
                f"a {dt} table needs a {dtypes.DTYPES[dt].numpy} array, got {arr.dtype}"
            )
        if scales is not None:
            if not isinstance(scales, np.ndarray) or scales.dtype != np.uint8:
                raise ValueError("scales must be a uint8 numpy array [rows, dim // 32]")
        if not arr.flags.c_contiguous:
            raise ValueError("the array must be C-contiguous: pass numpy.ascontiguousarray(arr)")
        core = _engram_rs.TableCore.from_buffers(arr, scales, arr.shape[0], arr.shape[1], dt)
        return cls(core)

    @classmethod
    def from_torch(cls, tensor: torch.Tensor, scales: torch.Tensor | None = None) -> HostTable:
        """Wraps a CPU tensor (float32, float16, bfloat16, float8_e4m3fn) without copying."""
        torch = _torch()
        if not _is_torch(tensor):
            raise TypeError(f"from_torch needs a torch.Tensor, got {type(tensor).__name__}")
        if tensor.device.type != "cpu":
            raise ValueError(f"the tensor must be on the CPU, got {tensor.device}")
        if tensor.dim() != 2 or not tensor.is_contiguous():
            raise ValueError(
                f"a table must be a contiguous 2-D tensor, got shape {tuple(tensor.shape)}"
                f"{'' if tensor.is_contiguous() else ' (not contiguous)'}"
            )
        dt = dtypes.resolve(tensor.dtype, "tensor dtype", dtypes.NAMES)
        holder = getattr(torch, dtypes.DTYPES[dt].numpy.name)  # the raw bits numpy can hold
        arr = (tensor.view(holder) if holder != tensor.dtype else tensor).numpy()
        sc = None
        if scales is not None:
            if not _is_torch(scales) or scales.device.type != "cpu":
                raise TypeError("scales must be a CPU torch tensor [rows, dim // 32]")
            if scales.dtype not in (torch.uint8, getattr(torch, "float8_e8m0fnu", torch.uint8)):
                raise ValueError(
                    "scales of an FP8 table are UE8M0 exponent bytes: a torch.uint8 or "
                    f"torch.float8_e8m0fnu tensor [rows, dim // 32], got {scales.dtype}"
                )
            sc = scales.contiguous().view(torch.uint8).numpy()
        return cls.from_numpy(arr, sc, cast("DTypeSpec", dt))

    # -- properties ------------------------------------------------------------------------

    @property
    def rows(self) -> int:
        return int(self._core.rows)

    @property
    def dim(self) -> int:
        return int(self._core.dim)

    @property
    def dtype(self) -> str:
        return str(self._core.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of the rows (and FP8 scales)."""
        return int(self._core.nbytes)

    @property
    def path(self) -> str | None:
        p = self._core.path
        return None if p is None else os.fspath(p)

    @property
    def mode(self) -> str:
        return str(self._core.mode)

    @property
    def writable(self) -> bool:
        return bool(self._core.writable)

    @property
    def closed(self) -> bool:
        return bool(self._core.closed)

    # -- raw rows: the stored bytes, as checkpoints and benchmarks move them -------------------

    @property
    def row_bytes(self) -> int:
        """Bytes of one row's stored values (``dim`` x the dtype's size)."""
        return int(self._core.row_bytes)

    @property
    def scale_bytes(self) -> int:
        """UE8M0 scale bytes per row of an FP8 table (``dim // 32``), else 0."""
        return int(self._core.scale_bytes)

    def read_raw(self, start: int, count: int, scales: bool = False) -> np.ndarray:
        """The stored bytes of rows ``[start, start + count)`` (uint8 ``[count * row_bytes]``),
        or with ``scales=True`` their UE8M0 scales (empty unless FP8)."""
        return cast("np.ndarray", self._core.read_raw(start, count, scales))

    def write_raw(self, idx: Indices, values: np.ndarray, scales: np.ndarray | None = None) -> None:
        """Overwrites rows ``idx`` with stored bytes: ``values`` uint8 ``[n * row_bytes]`` (and,
        for FP8, ``scales`` uint8 ``[n * scale_bytes]``), as :meth:`read_raw` gives them."""
        ids = np.ascontiguousarray(_indices(idx), dtype=np.int64).reshape(-1)
        self._core.write_rows(ids, np.ascontiguousarray(values), scales)

    def copy_rows_ceiling(self, idx: Indices, out: np.ndarray) -> None:
        """The gathers' ceiling, for benchmarks: copies the stored bytes of rows ``idx`` (values,
        then FP8 scales) into the uint8 ``out`` with a plain prefetching loop, no conversion."""
        self._core.copy_rows_ceiling(_indices(idx), out)

    @property
    def binding(self) -> Any:
        """The compiled table (``engram_rs._engram_rs.TableCore``) that the extension's
        functions (``sparse_step``) take."""
        return self._core

    def __repr__(self) -> str:
        if self._core.closed:
            return "HostTable(closed)"
        return (
            f"HostTable(rows={self.rows}, dim={self.dim}, dtype={self.dtype}, mode={self.mode}, "
            f"path={self.path!r})"
        )

    # -- gathers ---------------------------------------------------------------------------

    def _default_out_dtype(self, framework: str) -> str:
        if self.dtype in ("float32", "float16"):
            return self.dtype
        return "bfloat16" if framework == "torch" else "float32"

    def _plan(
        self, idx: Any, out: Any, out_dtype: Any, framework: str | None = None
    ) -> tuple[Any, ...]:
        """Checks arguments; returns (indices, out as numpy bytes or None, dtype, result)."""
        ids = _indices(idx)
        shape = (*ids.shape, self.dim)
        if framework not in (None, "numpy", "torch"):
            raise ValueError(f'framework must be "numpy" or "torch", got {framework!r}')
        if out is None:
            fw = framework or "numpy"
            od = (
                self._default_out_dtype(fw)
                if out_dtype is None
                else dtypes.resolve(out_dtype, "out_dtype", dtypes.OUTPUT_NAMES)
            )
            if od == "bfloat16" and fw == "numpy":
                raise ValueError(
                    'numpy has no bfloat16: pass framework="torch" for a torch bfloat16 tensor, '
                    'or out_dtype="float32"'
                )
            return ids, None, od, (shape, fw)
        if framework is not None:
            want = "torch" if _is_torch(out) else "numpy"
            if framework != want:
                raise ValueError(
                    f"framework={framework!r} but out is a {want} array: the result is out"
                )
        if _is_torch(out):
            torch = _torch()
            if out.device.type != "cpu":
                raise ValueError(f"out must be a CPU tensor (pinned or not), got {out.device}")
            od = dtypes.resolve(out.dtype, "out dtype", dtypes.OUTPUT_NAMES)
            if not out.is_contiguous():
                raise ValueError("out must be C-contiguous: pass a tensor from torch.empty(...)")
            arr = (out.view(torch.uint16) if od == "bfloat16" else out).numpy()
        elif isinstance(out, np.ndarray):
            if out.dtype == np.uint16 and out_dtype is not None:
                od = dtypes.resolve(out_dtype, "out_dtype", ("bfloat16",))
            else:
                od = dtypes.resolve(out.dtype, "out dtype", ("float32", "float16"))
            if not out.flags.c_contiguous:
                raise ValueError("out must be C-contiguous: pass numpy.empty(...)")
            arr = out
        else:
            raise TypeError(f"out must be a numpy array or a torch tensor, got {type(out)}")
        if (
            out_dtype is not None
            and dtypes.resolve(out_dtype, "out_dtype", dtypes.OUTPUT_NAMES) != od
        ):
            raise ValueError(f"out_dtype={out_dtype!r} does not match out's dtype {od}")
        if tuple(arr.shape) != shape:
            raise ValueError(f"out has shape {tuple(arr.shape)}, expected {shape}")
        if not arr.flags.writeable:
            raise ValueError("out is read-only")
        return ids, arr, od, out

    def _wrap(self, raw: np.ndarray, od: str, plan: tuple[tuple[int, ...], str]) -> Rows:
        """Views a pooled uint8 result as the output dtype, as numpy or torch (zero-copy)."""
        shape, framework = plan
        arr = raw.view(dtypes.DTYPES[od].numpy).reshape(shape)
        if framework == "torch":
            torch = _torch()
            t = torch.from_numpy(arr)
            return cast("Rows", t.view(torch.bfloat16) if od == "bfloat16" else t)
        return arr

    @overload
    def gather(
        self,
        idx: Indices,
        out: None = None,
        out_dtype: DTypeSpec | None = None,
        framework: Literal["numpy"] | None = None,
    ) -> npt.NDArray[np.float32] | npt.NDArray[np.float16]: ...
    @overload
    def gather(
        self,
        idx: Indices,
        out: None = None,
        out_dtype: DTypeSpec | None = None,
        *,
        framework: Literal["torch"],
    ) -> torch.Tensor: ...
    @overload
    def gather(
        self, idx: Indices, out: _Out, out_dtype: DTypeSpec | None = None, framework: None = None
    ) -> _Out: ...

    def gather(
        self,
        idx: Indices,
        out: Rows | None = None,
        out_dtype: DTypeSpec | None = None,
        framework: Literal["numpy", "torch"] | None = None,
    ) -> Rows:
        """Rows ``idx`` -> ``[*idx.shape, dim]``.

        ``idx``: row ids of any integer dtype and shape, as a numpy array, a list or a torch
        tensor; a bad one raises ``IndexError`` naming it and its position in ``idx``.

        What comes back, one rule: ``out`` itself when given (a C-contiguous numpy array or
        (pinned) CPU torch tensor of the right shape, float32/float16/bfloat16); otherwise a
        new numpy array, or a torch tensor with ``framework="torch"``. ``out_dtype`` is one of
        "float32", "float16", "bfloat16" (also "f32", "f16", "bf16", numpy or torch dtypes);
        by default float32/float16 tables give their own dtype, bfloat16 and FP8 tables give
        float32 in numpy (which has no bfloat16) and bfloat16 in torch.
        """
        ids, arr, od, result = self._plan(idx, out, out_dtype, framework)
        if arr is None:
            return self._wrap(self._core.gather_new(ids, od), od, result)
        self._core.gather(ids, arr, od)
        return cast("Rows", result)

    def prefetch(
        self,
        idx: Indices,
        out: Rows | None = None,
        out_dtype: DTypeSpec | None = None,
        framework: Literal["numpy", "torch"] | None = None,
    ) -> Prefetch:
        """Starts the same gather on a background pool and returns at once; ``wait()`` returns
        what ``gather`` would. Do not touch ``out`` until ``wait()``; several prefetches may be
        in flight, but not two into the same ``out`` memory (refused).
        """
        ids, arr, od, result = self._plan(idx, out, out_dtype, framework)
        if arr is not None:
            start = arr.ctypes.data
            span = (start, start + arr.nbytes)
            self._in_flight = [(a, b, c) for a, b, c in self._in_flight if not c.done()]
            for a, b, _ in self._in_flight:
                if a < span[1] and span[0] < b and arr.nbytes:
                    raise ValueError(
                        "out overlaps the output of a prefetch still running: wait() for it, "
                        "or pass a separate output array"
                    )
        core = self._core.prefetch(ids, od, arr)
        if arr is None:
            return Prefetch(core, lambda raw: self._wrap(raw, od, result), ids.size, od)
        self._in_flight.append((span[0], span[1], core))
        return Prefetch(core, lambda _raw: result, ids.size, od)

    # -- writes ----------------------------------------------------------------------------

    def write_rows(self, idx: Indices, values: Values, scales: Values | None = None) -> None:
        """Overwrites rows ``idx`` with ``values`` [len(idx), dim] of the table's dtype.

        Values may be any float array (float64, float32, float16, torch bfloat16) or nested lists:
        they are rounded to the table's dtype once, to nearest even, as torch's ``.to(dtype)``
        does. A bfloat16 table also takes its raw uint16 bits. FP8 tables quantize float values
        with UE8M0 block scales, or take uint8 codes with ``scales`` [len(idx), dim // 32] of
        UE8M0 bytes (numpy/torch uint8 or torch.float8_e8m0fnu). Values that are
        a view of the table's own memory are read before anything is written (as numpy does).
        """
        ids = _indices(idx).astype(np.int64, copy=False)
        vals = self._values(values, scales)
        if self.dtype == "float8_e4m3":
            if vals.dtype == np.float32 and scales is None and vals.ndim == 2:
                codes, fp8_scales = _engram_rs.quantize_fp8(np.ascontiguousarray(vals))
                vals, scales = codes.reshape(vals.shape), fp8_scales.reshape(len(vals), -1)
            elif vals.dtype != np.uint8 or scales is None:
                raise ValueError(
                    "an FP8 table takes float values (quantized with UE8M0 block scales) or "
                    "uint8 E4M3 codes with uint8 scales [n, dim // 32]"
                )
        elif vals.dtype == np.float32 and self.dtype != "float32":
            vals = (
                _engram_rs.cast_f32(np.ascontiguousarray(vals), self.dtype)
                .view(dtypes.DTYPES[self.dtype].numpy)
                .reshape(vals.shape)
            )
        elif vals.dtype != dtypes.DTYPES[self.dtype].numpy:
            raise ValueError(
                f"values for a {self.dtype} table must be floats (float64, float32, float16, "
                f"bfloat16: rounded to {self.dtype}) or lists of numbers, got {vals.dtype}"
            )
        if vals.shape == (*ids.shape, self.dim):
            vals = vals.reshape(ids.size, self.dim)
        if vals.shape != (ids.size, self.dim):
            raise ValueError(
                f"values have shape {vals.shape}, expected {(*ids.shape, self.dim)} "
                f"(or {(ids.size, self.dim)})"
            )
        sc = None
        if scales is not None:
            if self.dtype != "float8_e4m3":
                raise ValueError(
                    f"scales are only for FP8 tables, this one is {self.dtype}: drop scales="
                )
            sc = _scale_bytes(scales, ids.size, self.dim)
        self._core.write_rows(ids, np.ascontiguousarray(vals), sc)

    def _values(self, values: Any, scales: Any) -> np.ndarray:
        """``write_rows`` values as float32 (exactly, or rounded to odd from float64 so that the
        table's rounding is exact), or as the raw bits a table takes as they are: uint16 for a
        bfloat16 table, uint8 E4M3 codes (with scales) for an FP8 one."""
        if _is_torch(values):
            torch = _torch()
            values = values.detach().cpu()
            if values.dtype == torch.bfloat16:
                values = values.float()  # exact
            elif values.dtype == torch.float8_e4m3fn:
                values = values.view(torch.uint8)
            values = values.numpy()
        elif isinstance(values, (list, tuple)):
            values = np.asarray(values, dtype=np.float64)
        arr = np.asarray(values)
        raw = (self.dtype == "bfloat16" and arr.dtype == np.uint16) or (
            self.dtype == "float8_e4m3" and arr.dtype == np.uint8 and scales is not None
        )
        if raw or arr.dtype.kind != "f":
            return arr
        if arr.dtype == np.float64 and self.dtype != "float32":
            return _round_to_f32_odd(arr)
        return arr.astype(np.float32, copy=False)

    def flush(self) -> None:
        """Makes written rows durable (msync, or a write-back of a resident copy).

        A resident table writes back through the descriptor it opened, so if the path was
        replaced meanwhile the rows go to the file it opened, never to the new one.
        """
        self._core.flush()

    def close(self) -> None:
        """Releases the table and its file lock; safe from any thread, it waits for every
        gather, prefetch, write and flush still running on it. A writable tiered table is
        flushed first (an error there is raised, and the table stays open)."""
        if self._flush_pid == os.getpid() and not self._core.closed:
            self._core.flush()
        self._core.close()

    def __enter__(self) -> HostTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
