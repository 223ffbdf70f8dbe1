"""numpy views of tensors in a safetensors file (the baselines' side of the benchmarks)."""

from __future__ import annotations

import json
import struct

import numpy as np

from . import dtypes

__all__ = ["tensor_memmap"]

#: The numpy dtype holding each safetensors dtype: the table dtypes' from the core's registry,
#: and the scales' bytes.
_NUMPY = {
    **{d.safetensors: d.numpy for d in dtypes.DTYPES.values()},
    "F8_E8M0": np.dtype(np.uint8),
    "U8": np.dtype(np.uint8),
}


def tensor_memmap(path: str, name: str) -> np.memmap:
    """A read-only ``np.memmap`` of one tensor (bfloat16/FP8 as their raw integer bits)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    info = header[name]
    begin, _ = info["data_offsets"]
    return np.memmap(
        path,
        dtype=_NUMPY[info["dtype"]],
        mode="r",
        offset=8 + n + begin,
        shape=tuple(info["shape"]),
    )
