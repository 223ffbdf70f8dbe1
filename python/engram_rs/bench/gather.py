"""``engram-rs bench gather``: host-table gathers against torch and numpy on the same memory,
next to the copy-loop ceiling."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from .. import dtypes
from .common import fill_table, huge_page_share, interleaved_best

if TYPE_CHECKING:
    from ..table import DTypeSpec

__all__ = ["GATHER_DTYPES", "bench_gather", "gather_table_info"]

#: Table dtypes the gather benchmark takes, with torch's dtype of each.
GATHER_DTYPES = dtypes.NAMES


def _spec(dtype: str) -> DTypeSpec:
    """A dtype name from the command line (argparse checked it against the choices)."""
    return cast("DTypeSpec", dtype)


def _gather_contenders(
    table: Any,
    torch_table: Any,
    torch_scales: Any,
    numpy_table: np.ndarray,
    idx: np.ndarray,
    dtype: str,
) -> dict[str, Callable[[], Any]]:
    """The timed calls, all reading the same table memory: engram_rs, its baselines into the
    same preallocated output and as new arrays, and the plain copy loop (the ceiling)."""
    import torch

    n, dim = idx.size, table.dim
    t_idx = torch.from_numpy(idx)
    unit = table.nbytes // table.rows  # table bytes per row, scales included
    if dtype == "float8_e4m3":
        out = torch.empty((n, dim), dtype=torch.bfloat16)
        codes = torch_table.view(torch.float8_e4m3fn)
        sc = torch_scales.view(torch.float8_e8m0fnu)

        def torch_dequant() -> Any:
            rows = codes.index_select(0, t_idx).float().view(n, -1, 32)
            s = sc.index_select(0, t_idx).float()
            return (rows * s[..., None]).view(n, -1).to(torch.bfloat16)

        # The copy loop writes the same bytes it reads (264 per row) into the start of `out`.
        ceiling_out = out.view(torch.uint8).numpy().reshape(-1)[: n * unit]
        return {
            "engram_rs FP8 -> bf16 gather(out=)": lambda: table.gather(idx, out=out),
            "engram_rs FP8 -> bf16 gather (new)": lambda: table.gather(
                idx, out_dtype="bfloat16", framework="torch"
            ),
            "torch index_select + dequant (new)": torch_dequant,
            "copy loop, same rows (ceiling)": lambda: table.copy_rows_ceiling(idx, ceiling_out),
        }
    out = torch.empty((n, dim), dtype=torch_table.dtype)
    out_np = out.view(torch.uint16).numpy() if dtype == "bfloat16" else out.numpy()
    new_framework = "torch" if dtype == "bfloat16" else None
    return {
        "engram_rs gather(out=)": lambda: table.gather(idx, out=out),
        "torch.index_select(out=)": lambda: torch.index_select(torch_table, 0, t_idx, out=out),
        "numpy.take(out=)": lambda: np.take(numpy_table, idx, axis=0, out=out_np),
        "engram_rs gather (new)": lambda: table.gather(idx, framework=new_framework),
        "torch.index_select (new)": lambda: torch.index_select(torch_table, 0, t_idx),
        "numpy.take (new)": lambda: np.take(numpy_table, idx, axis=0),
        "copy loop, same rows (ceiling)": lambda: table.copy_rows_ceiling(
            idx, out_np.view(np.uint8).reshape(-1)
        ),
    }


def _open_gather_tables(
    dtype: str, dim: int, rows: int, mode: str, path: str | None, tmp: str
) -> tuple[Any, np.ndarray, np.ndarray | None, float]:
    """The table for engram_rs and the numpy arrays of the same memory (resident) or of the
    same file (mmap) for the baselines; the fraction of the values on huge pages."""
    from ..safetensors_view import tensor_memmap
    from ..table import HostTable

    fp8 = dtype == "float8_e4m3"
    if mode == "resident" and path is None:
        # One numpy array (on transparent huge pages, as numpy allocates large arrays) that
        # engram_rs and torch both wrap.
        values = np.empty((rows, dim), dtypes.DTYPES[dtype].numpy)
        scales = np.empty((rows, dim // dtypes.FP8_BLOCK), np.uint8) if fp8 else None
        fill_table(values, scales, dtype)
        return (
            HostTable.from_numpy(values, scales, _spec(dtype)),
            values,
            scales,
            huge_page_share(values),
        )
    if path is None:
        path = os.path.join(tmp, "table.safetensors")
        HostTable.create(path, rows, dim, dtype=_spec(dtype), init="normal", seed=0).close()
    if mode == "resident":
        values = np.array(tensor_memmap(path, "weight"))
        scales = np.array(tensor_memmap(path, "weight_scale")) if fp8 else None
        return (
            HostTable.from_numpy(values, scales, _spec(dtype)),
            values,
            scales,
            huge_page_share(values),
        )
    # mmap: the file in the page cache, mapped by engram_rs and by np.memmap for the others.
    table = HostTable.open(path, name="weight", scales="weight_scale" if fp8 else None)
    values = tensor_memmap(path, "weight")
    scales = tensor_memmap(path, "weight_scale") if fp8 else None
    for arr in (values, scales):
        if arr is not None:  # read the file once through both maps
            arr.view(np.uint8).reshape(-1)[::4096].sum()
    table.gather(np.arange(0, table.rows, max(1, 4096 // (table.nbytes // table.rows))))
    return table, values, scales, huge_page_share(values)


def gather_table_info(path: str) -> tuple[str, int, int]:
    """The dtype, rows and dim of the table a benchmark would reuse from ``path``."""
    from ..table import HostTable

    with HostTable.open(path, name="weight") as t:
        return t.dtype, t.rows, t.dim


def bench_gather(
    rows: int | None = None,
    dim: int = 64,
    dtype: str = "float32",
    batch: int = 1 << 20,
    mode: str = "resident",
    repeats: int = 5,
    path: str | None = None,
    table_gib: float = 4.0,
) -> tuple[list[dict[str, Any]], str]:
    """GB/s and M rows/s of random row gathers on equal terms: engram_rs, torch and numpy read
    the same table memory, write into the same preallocated output (``out=``) or return new
    arrays, in interleaved rounds (best of ``repeats``), next to a plain prefetching copy loop
    of the same rows (the ceiling). Returns the rows and a line describing the table."""
    import tempfile

    import torch

    if batch < 1:
        raise ValueError(f"batch must be at least 1 row, got {batch}")
    if dtype not in GATHER_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(GATHER_DTYPES)}")
    row_bytes = dim * np.dtype(dtypes.DTYPES[dtype].numpy).itemsize + (
        dim // dtypes.FP8_BLOCK if dtype == "float8_e4m3" else 0
    )
    if rows is None:
        rows = int(table_gib * 2**30) // row_bytes + 1
    with tempfile.TemporaryDirectory(prefix="engram-bench-") as tmp:
        table, values, scales, huge = _open_gather_tables(dtype, dim, rows, mode, path, tmp)
        if table.dtype != dtype or table.dim != dim:
            raise ValueError(
                f"the table in {path} is {table.dtype} with dim {table.dim}, not {dtype} dim {dim}"
            )
        with warnings.catch_warnings():
            # torch warns that a read-only memmap is not writable; the baselines only read it.
            warnings.simplefilter("ignore", UserWarning)
            torch_table = torch.from_numpy(np.asarray(values))
            torch_scales = None if scales is None else torch.from_numpy(np.asarray(scales))
        if dtype == "bfloat16":
            torch_table = torch_table.view(torch.bfloat16)
        idx = np.random.default_rng(0).integers(0, table.rows, size=batch, dtype=np.int64)
        fns = _gather_contenders(table, torch_table, torch_scales, values, idx, dtype)
        # Freeing a new 256 MB result leaves the kernel (and, on a virtual machine, the host)
        # work that slowed the next contender by up to 2x here: let it finish between calls.
        secs = interleaved_best(fns, repeats, settle=0.2)
        where = (
            f"{table.rows} x {table.dim} {table.dtype} ({table.nbytes / 2**30:.1f} GiB), "
            f"{mode}, {huge:.0%} of the values on huge pages"
        )
        moved = batch * (table.nbytes // table.rows)  # table bytes of the gathered rows
        del fns, torch_table, torch_scales
        table.close()
    ceiling = secs["copy loop, same rows (ceiling)"]

    def torch_of(what: str) -> float:
        """torch's time of the same kind (out= or new; FP8: its one way, index_select +
        dequant into new tensors)."""
        kind = "(out=)" if what.endswith("(out=)") else "(new)"
        torch_secs = {k: v for k, v in secs.items() if k.startswith("torch")}
        same = [v for k, v in torch_secs.items() if k.endswith(kind)]
        return (same or list(torch_secs.values()))[0]

    return [
        {
            "what": what,
            "GB/s": moved / t / 1e9,
            "M rows/s": batch / t / 1e6,
            "x torch (same kind)": torch_of(what) / t,
            "of ceiling": ceiling / t,
        }
        for what, t in secs.items()
    ], where
