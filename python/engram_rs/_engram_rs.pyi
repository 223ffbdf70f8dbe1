from os import PathLike
from typing import Any, final

import numpy as np

__all__ = [
    "HasherCore",
    "PooledBuffer",
    "__version__",
    "clear_buffer_pool",
    "compress_file",
    "compress_json",
    "fingerprint_file",
    "fingerprint_json",
    "layer_primes",
    "normalize",
    "simd_available",
]
__version__: str

def layer_primes(
    engram_vocab_size: list[int], n_head: int, num_layers: int
) -> list[list[list[int]]]: ...
def simd_available() -> bool: ...
def clear_buffer_pool() -> int: ...
def compress_file(path: str | PathLike[str]) -> tuple[np.ndarray[Any, Any], int, str]: ...
def compress_json(json: str) -> tuple[np.ndarray[Any, Any], int, str]: ...
def fingerprint_file(path: str | PathLike[str]) -> str: ...
def fingerprint_json(json: str) -> str: ...
def normalize(text: str) -> str: ...

@final
class PooledBuffer: ...

@final
class HasherCore:
    def __new__(
        cls,
        max_ngram: int,
        n_head: int,
        vocab: int,
        pad: int,
        multipliers: list[list[int]],
        primes: list[list[int]],
    ) -> HasherCore: ...
    def hash(
        self,
        ids: np.ndarray[Any, Any],
        bounds: list[int],
        layers: list[int],
        int32: bool = False,
        flat: bool = False,
        history: np.ndarray[Any, Any] | None = None,
        scalar: bool = False,
        raw: bool = False,
    ) -> list[np.ndarray[Any, Any]]: ...
    def set_lookup(self, table: list[int]) -> None: ...
    def offsets(self, layer: int) -> list[int]: ...
    def table_rows(self, layer: int) -> int: ...
    def max_value(self, layer: int, flat: bool) -> int: ...
