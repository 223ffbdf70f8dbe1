"""The table dtypes, from the core's registry: their names and spellings, the numpy dtype that
holds each one's values, the torch and safetensors names, the bytes per value, and which ones a
gather can output. Every dtype argument of the library goes through :func:`resolve`; adding a
dtype is a change in the core (``engram_core::dtype``) and its kernels, not here."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from . import _engram_rs

__all__ = ["DTYPES", "FP8_BLOCK", "NAMES", "OUTPUT_NAMES", "DType", "by_safetensors", "resolve"]


@dataclasses.dataclass(frozen=True)
class DType:
    """One table dtype of the core's registry."""

    #: The name ("float32", "float16", "bfloat16", "float8_e4m3").
    name: str
    #: The safetensors dtype string ("F32", "BF16", "F8_E4M3", ...).
    safetensors: str
    #: The numpy dtype that holds the values (bfloat16 and FP8 as their raw bits).
    numpy: np.dtype[Any]
    #: The torch dtype's name (``getattr(torch, torch_name)``).
    torch_name: str
    #: Bytes per value.
    size: int
    #: Whether gathers can write it as output (FP8 is storage only).
    output: bool
    #: Every spelling a caller may use (lower case, the name first).
    spellings: tuple[str, ...]

    def torch(self) -> Any:
        """The torch dtype (imports torch)."""
        import torch

        return getattr(torch, self.torch_name)


_REGISTRY = _engram_rs.dtypes()
#: Every table dtype by name, in the core's order.
DTYPES: dict[str, DType] = {
    name: DType(name, st, np.dtype(npn), tn, size, out, tuple(sp))
    for name, st, npn, tn, size, out, sp, _ in _REGISTRY
}
#: Values per UE8M0 scale byte of an FP8 table.
FP8_BLOCK: int = next(block for *_, block in _REGISTRY if block)
NAMES: tuple[str, ...] = tuple(DTYPES)
OUTPUT_NAMES: tuple[str, ...] = tuple(n for n, d in DTYPES.items() if d.output)
_SPELLINGS = {s: d.name for d in DTYPES.values() for s in d.spellings}
_BY_ST = {d.safetensors: d for d in DTYPES.values()}


def by_safetensors(name: str) -> DType | None:
    """The table dtype stored as safetensors dtype ``name`` (None: not a table dtype)."""
    return _BY_ST.get(name)


def resolve(dtype: Any, what: str, allowed: tuple[str, ...] = NAMES) -> str:
    """One rule for every dtype argument: a name or spelling ("bfloat16", "bf16", "fp8", "f32",
    ...), a numpy dtype (np.float32, np.dtype("float16")) or a torch dtype (torch.bfloat16,
    torch.float8_e4m3fn) -> the name, which must be one of ``allowed``."""
    if isinstance(dtype, str):
        key = dtype.lower()
    elif type(dtype).__module__ == "torch":
        key = str(dtype).removeprefix("torch.")
    else:
        try:
            key = np.dtype(dtype).name
        except TypeError:
            key = repr(dtype)
    name = _SPELLINGS.get(key)
    if name not in allowed:
        hint = ' (bfloat16 bits in uint16: pass dtype="bfloat16")' if key == "uint16" else ""
        raise ValueError(
            f"unsupported {what} {dtype!r}{hint}: use one of {', '.join(allowed)} "
            "(or bf16, f16, f32, fp8, a numpy or torch dtype)"
        )
    return str(name)
