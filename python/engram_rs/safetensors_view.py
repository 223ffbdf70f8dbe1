"""numpy views of tensors in a safetensors file (the baselines' side of the benchmarks)."""

from __future__ import annotations

import json
import struct

import numpy as np

__all__ = ["tensor_memmap"]

_NUMPY = {
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,
    "F8_E4M3": np.uint8,
    "F8_E8M0": np.uint8,
    "U8": np.uint8,
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
