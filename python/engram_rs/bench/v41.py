"""``engram-rs bench v41``: DeepSeek-V4.1-Flash's Engram layer on the CPU (FP8 table resident in
host memory, bf16 wkv) against the same math in plain torch (``index_select`` of the E4M3 codes and
UE8M0 scales, dequantization, the module's dense ops), interleaved in one process, the layer's
time split into its parts: gather + dequantize, wkv, gate. Every contender returns new tensors
(new against new)."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Any

import numpy as np

from .common import interleaved_best

__all__ = ["V41Bench", "bench_v41"]

#: Bytes written ahead of every timed row part: a few times any last-level cache.
_EVICT_BYTES = 256 << 20


@dataclasses.dataclass
class V41Bench:
    """What ``bench_v41`` measured: milliseconds per part and contender, and the sizes."""

    rows: list[dict[str, Any]]
    table_rows: int
    tokens: int
    hidden: int


def bench_v41(
    table_rows: int = 2_000_000, tokens: int = 1024, hidden: int = 256, repeats: int = 7
) -> V41Bench:
    """Times one Engram layer forward (no grad) of ``tokens`` tokens (24 rows each) over an FP8
    table of about ``table_rows`` rows, both contenders reading the same bytes from memory."""
    import torch

    import engram_rs as er
    from engram_rs.torch.v41 import EngramV41, gated_residual

    base = max(100, table_rows // 24)
    cfg = er.EngramConfig.preset("deepseek-v4.1-flash").replace(
        engram_vocab_size=[base] * 3, hidden_size=hidden, layer_ids=[1]
    )
    hasher = er.NgramHasher(cfg, 99092, compressed_pad_id=2)
    g, d, cols, dim = cfg.hc_mult, hidden, cfg.cols, cfg.head_dim
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 99092, (1, tokens))
    hash_ids = torch.from_numpy(hasher.hash(ids)[1])
    h = torch.randn(1, tokens, g, d, dtype=torch.bfloat16)
    with tempfile.TemporaryDirectory(prefix="engram-bench-v41-") as tmp:
        path = os.path.join(tmp, "embed.safetensors")
        er.HostTable.create(
            path, hasher.table_rows[1], dim, dtype="float8_e4m3", init="normal", std=0.02
        )
        table = er.HostTable.open(path, mode="resident", writable=False)
        layer = EngramV41(hasher, 1, table=table, optimizer=None, wkv_mode="bf16")
        layer.requires_grad_(False)
        # The same bytes as torch tensors: E4M3 codes [rows, dim] and UE8M0 scales [rows, dim/32].
        n = table.rows
        codes = torch.from_numpy(table.read_raw(0, n).reshape(n, dim)).view(torch.float8_e4m3fn)
        scales = torch.from_numpy(table.read_raw(0, n, scales=True).reshape(n, -1))
        scales = scales.view(torch.float8_e8m0fnu)
        offsets = torch.tensor(hasher.offsets[1])
        flat = (hash_ids + offsets).reshape(-1)
        w = layer.wkv.weight.detach()
        qw, kw, eps = layer.q_weight.detach(), layer.k_weight.detach(), layer.norm_eps

        def ours_rows() -> torch.Tensor:
            # E4M3 -> bf16 in the gather, into a new tensor as torch's contenders make them
            # (new against new, SPEC 7).
            return table.gather(flat, out_dtype="bfloat16", framework="torch")

        out = torch.empty((flat.numel(), dim), dtype=torch.bfloat16)
        # The ceiling: a plain loop copying the same rows' stored bytes (264 a row, no
        # conversion) into preallocated memory; the dequantizing gather also writes 512 a row.
        unit = table.nbytes // table.rows  # stored bytes a row, scales included
        ceiling_out = out.view(torch.uint8).numpy().reshape(-1)[: flat.numel() * unit]

        def torch_gather() -> tuple[torch.Tensor, torch.Tensor]:
            return codes.index_select(0, flat), scales.index_select(0, flat)

        def torch_dequant(c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            # Each scale broadcast over its 32 values (the fastest of the plain spellings
            # measured here: repeat_interleave makes a table-sized float copy first).
            blocks = c.float().view(c.shape[0], s.shape[1], -1) * s.float().unsqueeze(-1)
            return blocks.view(c.shape).to(torch.bfloat16)

        gathered = torch_gather()
        e = torch_dequant(*gathered).reshape(1, tokens, cols * dim)
        kv = torch.nn.functional.linear(e, w)

        def torch_layer() -> torch.Tensor:
            rows = torch_dequant(*torch_gather()).reshape(1, tokens, cols * dim)
            return gated_residual(h, torch.nn.functional.linear(rows, w), qw, kw, eps)

        with torch.no_grad():
            assert torch.equal(ours_rows(), torch_dequant(*gathered)), "gathers differ"
            assert torch.equal(layer(h, hash_ids), torch_layer()), "layers differ"
            # The row parts (milliseconds) apart from the matmuls (tens of them), so that a
            # matmul's effect on the caches and clocks does not land in a gather's time.
            # Every row part starts with cold caches, as in a forward, where the layers' matmuls
            # run between two gathers: otherwise a contender reads the rows that the one before
            # it left in the last-level cache (here 3x faster).
            evict = np.zeros(_EVICT_BYTES, dtype=np.uint8)

            def evict_caches() -> None:
                evict[::64] += 1

            times = interleaved_best(
                {
                    "engram_rs gather+dequant": ours_rows,
                    "engram_rs gather+dequant (out=)": lambda: table.gather(flat, out=out),
                    "copy loop (ceiling)": lambda: table.copy_rows_ceiling(flat, ceiling_out),
                    "torch gather": torch_gather,
                    "torch dequant": lambda: torch_dequant(*gathered),
                },
                4 * repeats,
                before=evict_caches,
            )
            times |= interleaved_best(
                {
                    "wkv (bf16 linear, both)": lambda: torch.nn.functional.linear(e, w),
                    "gate (both)": lambda: gated_residual(h, kv, qw, kw, eps),
                    "engram_rs layer": lambda: layer(h, hash_ids),
                    "torch layer": torch_layer,
                },
                repeats,
            )
    ms = {k: v * 1e3 for k, v in times.items()}
    torch_rows = ms["torch gather"] + ms["torch dequant"]
    rows = [
        {
            "part": "gather + dequantize",
            "engram_rs ms": ms["engram_rs gather+dequant"],
            "torch ms": torch_rows,
            "torch / engram_rs": torch_rows / ms["engram_rs gather+dequant"],
        },
        {
            "part": "  into a preallocated out=",
            "engram_rs ms": ms["engram_rs gather+dequant (out=)"],
            "torch ms": float("nan"),
            "torch / engram_rs": float("nan"),
        },
        {
            "part": "  copy loop, stored bytes (ceiling)",
            "engram_rs ms": ms["copy loop (ceiling)"],
            "torch ms": float("nan"),
            "torch / engram_rs": float("nan"),
        },
        {
            "part": "  of which torch gather",
            "engram_rs ms": float("nan"),
            "torch ms": ms["torch gather"],
            "torch / engram_rs": float("nan"),
        },
        {
            "part": "  of which torch dequant",
            "engram_rs ms": float("nan"),
            "torch ms": ms["torch dequant"],
            "torch / engram_rs": float("nan"),
        },
        {
            "part": "wkv",
            "engram_rs ms": ms["wkv (bf16 linear, both)"],
            "torch ms": ms["wkv (bf16 linear, both)"],
            "torch / engram_rs": 1.0,
        },
        {
            "part": "gate",
            "engram_rs ms": ms["gate (both)"],
            "torch ms": ms["gate (both)"],
            "torch / engram_rs": 1.0,
        },
        {
            "part": "whole layer",
            "engram_rs ms": ms["engram_rs layer"],
            "torch ms": ms["torch layer"],
            "torch / engram_rs": ms["torch layer"] / ms["engram_rs layer"],
        },
    ]
    return V41Bench(rows, hasher.table_rows[1], tokens, hidden)
