from collections.abc import Callable
from os import PathLike
from typing import Any, TypeAlias, final

import numpy as np

# The arrays the extension takes and gives (the Python API above it states the same types).
_Ids: TypeAlias = np.ndarray[Any, np.dtype[np.int32]] | np.ndarray[Any, np.dtype[np.int64]]
_Tokens: TypeAlias = np.ndarray[Any, np.dtype[np.integer[Any]]]
_F32: TypeAlias = np.ndarray[Any, np.dtype[np.float32]]
_U8: TypeAlias = np.ndarray[Any, np.dtype[np.uint8]]
_I64: TypeAlias = np.ndarray[Any, np.dtype[np.int64]]
# Rows of a table as numpy holds them: float32, float16, bfloat16 (as uint16) or E4M3 (uint8).
_Rows: TypeAlias = (
    np.ndarray[Any, np.dtype[np.float32]]
    | np.ndarray[Any, np.dtype[np.float16]]
    | np.ndarray[Any, np.dtype[np.uint16]]
    | np.ndarray[Any, np.dtype[np.uint8]]
)

__all__ = [
    "AtomicFile",
    "Checksum",
    "HasherCore",
    "OutOfRangeError",
    "PooledBuffer",
    "PrefetchCore",
    "SafetensorsFile",
    "SafetensorsWriter",
    "TableCore",
    "TokenizerCore",
    "__version__",
    "batch_distinct",
    "cachesim_hot_set",
    "cachesim_run",
    "cast_f32",
    "check_hash_config",
    "check_optimizer",
    "clear_buffer_pool",
    "compress_file",
    "compress_json",
    "count_rows",
    "dtypes",
    "file_checksum",
    "fingerprint_file",
    "fingerprint_json",
    "fsync_path",
    "head_rows",
    "layer_multipliers",
    "normalize",
    "optimizer_kinds",
    "probe_reads",
    "quantize_fp8",
    "set_num_threads",
    "simd_available",
    "sparse_step",
    "start_writeback",
]
__version__: str

def layer_multipliers(seed: int, layer: int, max_ngram: int, vocab: int) -> list[int]: ...
def check_hash_config(
    engram_vocab_size: list[int],
    max_ngram_size: int,
    n_head_per_ngram: int,
    layer_ids: list[int],
    seed: int,
) -> None: ...
def simd_available() -> bool: ...
def clear_buffer_pool() -> int: ...
def compress_file(path: str | PathLike[str]) -> tuple[_I64, int, str]: ...
def compress_json(json: str) -> tuple[_I64, int, str]: ...
def fingerprint_file(path: str | PathLike[str]) -> str: ...
def fingerprint_json(json: str) -> str: ...
def normalize(text: str) -> str: ...

@final
class PooledBuffer: ...

@final
class HasherCore:
    def __new__(
        cls,
        engram_vocab_size: list[int],
        max_ngram_size: int,
        n_head_per_ngram: int,
        layer_ids: list[int],
        seed: int,
        vocab: int,
        pad: int,
    ) -> HasherCore: ...
    def multipliers(self, layer: int) -> list[int]: ...
    def primes(self, layer: int) -> list[int]: ...
    def hash(
        self,
        ids: _Tokens,
        bounds: list[int],
        layers: list[int],
        int32: bool = False,
        flat: bool = False,
        history: _Tokens | None = None,
        scalar: bool = False,
        raw: bool = False,
        blocked: np.ndarray[Any, np.dtype[np.uint8]] | None = None,
        dead_id: int | None = None,
    ) -> list[_Ids]: ...
    def set_lookup(self, table: list[int]) -> None: ...
    def offsets(self, layer: int) -> list[int]: ...
    def table_rows(self, layer: int) -> int: ...

def cast_f32(values: _F32, dtype: str) -> _U8: ...
def quantize_fp8(
    values: _F32,
) -> tuple[_U8, _U8]: ...
def sparse_step(
    table: TableCore,
    ids: _I64,
    grads: _F32,
    kind: str,
    lr: float,
    eps: float,
    beta1: float,
    beta2: float,
    state: list[TableCore],
    step: int,
    *,
    check_finite: bool = False,
    grad_scale: float = 1.0,
    max_grad_norm: float | None = None,
) -> int: ...
def head_rows(
    hash_ids: _Ids,
    offsets: list[int],
    bounds: list[int],
) -> _I64: ...
def count_rows(
    ids: _Ids,
    add: list[int],
    lo: list[int],
    hi: list[int],
    counts: np.ndarray[Any, np.dtype[np.uint32]],
) -> int: ...
def batch_distinct(
    ids: _Ids,
    add: list[int],
    lo: list[int],
    hi: list[int],
    groups: list[int],
    starts: list[int],
    rows: int,
) -> np.ndarray[Any, np.dtype[np.uint64]]: ...

class OutOfRangeError(IndexError):
    what: str
    value: int
    bound: int
    position: tuple[int, ...]
    flat_index: int
    column: int | None

def dtypes() -> list[tuple[str, str, str, str, int, bool, list[str], int]]: ...
def check_optimizer(
    kind: str, lr: float, eps: float = 0.0, beta1: float = 0.0, beta2: float = 0.0
) -> None: ...
def optimizer_kinds() -> list[tuple[str, str, list[str], list[tuple[str, int | None]]]]: ...

@final
class PrefetchCore:
    def done(self) -> bool: ...
    def wait(self) -> Any: ...

@final
class TableCore:
    @property
    def row_bytes(self) -> int: ...
    @property
    def scale_bytes(self) -> int: ...
    def read_raw(self, start: int, count: int, scales: bool = False) -> _U8: ...
    @staticmethod
    def open(
        path: str | bytes | PathLike[str] | PathLike[bytes],
        name: str | None = None,
        scales: str | None = None,
        mode: str = "mmap",
        writable: bool = False,
    ) -> TableCore: ...
    @staticmethod
    def open_tiered(
        path: str | bytes | PathLike[str] | PathLike[bytes],
        hot: np.ndarray[Any, np.dtype[np.uint64]],
        name: str | None = None,
        scales: str | None = None,
        direct: bool | None = None,
        writable: bool = False,
        dirty_bytes: int = ...,
    ) -> TableCore: ...
    @property
    def tier_stats(self) -> dict[str, int | bool] | None: ...
    @staticmethod
    def create(
        path: str | bytes | PathLike[str] | PathLike[bytes],
        rows: int,
        dim: int,
        dtype: str,
        init: str,
        std: float,
        seed: int,
        name: str,
        progress: Callable[[int, int], object] | None = None,
    ) -> TableCore: ...
    @staticmethod
    def from_buffers(
        values: _Rows,
        scales: _U8 | None,
        rows: int,
        dim: int,
        dtype: str,
    ) -> TableCore: ...
    @property
    def rows(self) -> int: ...
    @property
    def dim(self) -> int: ...
    @property
    def dtype(self) -> str: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def mode(self) -> str: ...
    @property
    def writable(self) -> bool: ...
    @property
    def path(self) -> str | None: ...
    @property
    def closed(self) -> bool: ...
    def gather(
        self,
        idx: _Ids,
        out: _Rows,
        out_dtype: str,
        scalar: bool = False,
    ) -> None: ...
    def copy_rows_ceiling(self, idx: _Ids, out: _Rows) -> None: ...
    def read_rows(self, idx: _Ids) -> int: ...
    def gather_new(self, idx: _Ids, out_dtype: str) -> _Rows: ...
    def prefetch(self, idx: _Ids, out_dtype: str, out: _Rows | None = None) -> PrefetchCore: ...
    def write_rows(
        self,
        idx: _Ids,
        values: _Rows,
        scales: _U8 | None = None,
    ) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...

@final
class Checksum:
    def __init__(self) -> None: ...
    def update(self, data: _U8) -> None: ...
    def update_from_file(
        self, path: str | PathLike[str], offset: int = 0, limit: int | None = None
    ) -> int: ...
    def hexdigest(self) -> str: ...

@final
class TokenizerCore:
    def __new__(cls, path: str | PathLike[str]) -> TokenizerCore: ...
    @property
    def vocab_size(self) -> int: ...
    def encode_batch(
        self, texts: list[str], add_special_tokens: bool
    ) -> tuple[np.ndarray[Any, np.dtype[np.uint32]], np.ndarray[Any, np.dtype[np.uint64]]]: ...

def file_checksum(path: str | PathLike[str]) -> str: ...
def start_writeback(fd: int, offset: int, len: int) -> None: ...
def set_num_threads(threads: int) -> int: ...

@final
class SafetensorsFile:
    def __new__(
        cls, path: str | PathLike[str], what: str = "safetensors file"
    ) -> SafetensorsFile: ...
    @property
    def tensors(self) -> list[tuple[str, str, list[int], int, int]]: ...
    @property
    def metadata(self) -> dict[str, str]: ...
    def read(self, index: int, offset: int, count: int) -> _U8: ...
    def close(self) -> None: ...

@final
class SafetensorsWriter:
    def __new__(
        cls,
        path: str | PathLike[str],
        tensors: list[tuple[str, str, list[int]]],
        metadata: dict[str, str],
        what: str = "safetensors file",
    ) -> SafetensorsWriter: ...
    def write(self, index: int, data: _U8) -> None: ...
    def commit(self) -> None: ...
    def discard(self) -> None: ...

@final
class AtomicFile:
    def __new__(cls, path: str | PathLike[str]) -> AtomicFile: ...
    def fileno(self) -> int: ...
    @property
    def path(self) -> str: ...
    def commit(self) -> None: ...
    def discard(self) -> None: ...

def fsync_path(path: str | PathLike[str]) -> None: ...

# Trace-driven cache simulation (engram_rs.bench.cachesim is the API above it).
_RowIds: TypeAlias = np.ndarray[Any, np.dtype[np.int64]] | np.ndarray[Any, np.dtype[np.uint64]]
_Tally: TypeAlias = tuple[int, int, int, int]
_Outcome: TypeAlias = tuple[str, int, int, int, _Tally, _Tally, float]

def cachesim_run(
    trace: _RowIds,
    row_bytes: int,
    budgets: list[int],
    policies: list[str],
    batch_size: int | None = None,
    offsets: _RowIds | None = None,
    train: _RowIds | None = None,
    hot_rows: _RowIds | None = None,
    hot_counts: _RowIds | None = None,
    page_bytes: int = 4096,
) -> tuple[int, int, int, int, int, float, list[_Outcome]]: ...
def probe_reads(
    path: str | bytes | PathLike[str] | PathLike[bytes],
    offsets: np.ndarray[Any, np.dtype[np.uint64]],
    lengths: np.ndarray[Any, np.dtype[np.uint64]],
    threads: int,
    direct: bool,
) -> int: ...
def cachesim_hot_set(rows: _RowIds, counts: _RowIds, row_bytes: int, budget: int) -> _I64: ...
