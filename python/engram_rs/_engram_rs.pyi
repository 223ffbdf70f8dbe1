from typing import Any, final

import numpy as np

__all__ = ["HasherCore", "__version__", "layer_primes", "simd_available"]
__version__: str

def layer_primes(
    engram_vocab_size: list[int], n_head: int, num_layers: int
) -> list[list[list[int]]]: ...
def simd_available() -> bool: ...

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
    ) -> list[np.ndarray[Any, Any]]: ...
    def offsets(self, layer: int) -> list[int]: ...
    def table_rows(self, layer: int) -> int: ...
    def max_value(self, layer: int, flat: bool) -> int: ...
