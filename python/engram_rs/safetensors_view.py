"""numpy views of tensors in a safetensors file (the baselines' side of the benchmarks), at the
byte ranges of the core's checked header (``engram_core::safetensors``)."""

from __future__ import annotations

import os

import numpy as np

from . import dtypes
from ._engram_rs import SafetensorsFile

__all__ = ["tensor_memmap"]

#: The numpy dtype holding each safetensors dtype: the table dtypes' from the core's registry,
#: and the scales' bytes.
_NUMPY = {
    **{d.safetensors: d.numpy for d in dtypes.DTYPES.values()},
    "F8_E8M0": np.dtype(np.uint8),
    "U8": np.dtype(np.uint8),
}


def tensor_memmap(path: str | os.PathLike[str], name: str) -> np.memmap:
    """A read-only ``np.memmap`` of one tensor (bfloat16/FP8 as their raw integer bits)."""
    f = SafetensorsFile(os.fspath(path))
    f.close()  # the header is all that is needed; numpy maps the file by its path
    found = {t[0]: t for t in f.tensors}
    if name not in found:
        raise KeyError(f"{path}: no tensor {name!r} (tensors: {sorted(found)})")
    _, dtype, shape, start, _ = found[name]
    if dtype not in _NUMPY:
        raise ValueError(f"{path}: tensor {name!r} is {dtype}, not one of {', '.join(_NUMPY)}")
    return np.memmap(path, dtype=_NUMPY[dtype], mode="r", offset=start, shape=tuple(shape))
