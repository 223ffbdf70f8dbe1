"""DeepSeek-V4.1-Flash's production Engram layer (SPEC section 8.2): :class:`EngramV41`.

The layer has no ShortConv and no norm modules. Per layer it holds ``embed`` (the table: FP8
E4M3 rows of ``head_dim`` values with UE8M0 scales per 32), ``wkv`` (one linear
``cols * head_dim -> hidden * (hc_mult + 1)``: ``hc_mult`` keys, branch-major, and one value
shared by the branches) and ``q_weight``, ``k_weight`` (bf16 ``[hc_mult, hidden]``). Its
forward takes the hidden states of every residual branch ``h [B, L, hc_mult, hidden]``, the
layer's hash ids ``[B, L, cols]`` and an optional ``token_mask [B, L]`` (False at image
positions: their gate is 0) and returns ``h + gate * value``, the residual included.

``wkv`` runs on the CPU (or wherever ``h`` is) in one of two ways, chosen by ``wkv_mode``:

* ``"fp8"``: the reference's FP8 GEMM. The weight stays E4M3 with UE8M0 scales per 32x32 block
  (the checkpoint's own tensors, ``wkv.weight`` and ``wkv.scale``); the input is re-quantized per
  32 consecutive values to E4M3 with a power-of-two scale ``2**ceil(log2(amax / 448))`` (amax
  clamped below at 1e-4), multiplied by the dequantized weight with float32 accumulation, output
  bf16. The weight is frozen (FP8 has no gradient); the input's gradient passes straight through
  the re-quantization.
* ``"bf16"``: the weight dequantized once to a trainable bf16 ``wkv.weight`` (exact: an E4M3 value
  times a power of two is a bf16), as engines on hardware without FP8 run it.

``compute_dtype=torch.float32`` runs the rows and ``wkv`` in float32 instead of bf16 (for
tests against a float64 reference and for CPUs where bf16 matmuls are slow); the gate math is
float32 in every mode, as in the reference.

The table is a :class:`~engram_rs.HostTable` (FP8 rows with their scales, or any dtype; mmap or
resident; trained by ``optimizer``, one of the fused sparse optimizers, in the backward) or, with
``table=None``, a float32 ``nn.Parameter`` ``embed.weight`` for small models and tests.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn

from .. import dtypes
from ..hashing import NgramHasher
from ..table import HostTable
from .modules import EngramEmbedding, MultiHeadEmbedding, check_no_optimizer
from .optim import SparseOptimizer

__all__ = [
    "EngramV41",
    "dequantize_blocks",
    "gated_residual",
    "quantize_activations",
    "quantize_blocks",
]

#: The largest finite E4M3 magnitude.
E4M3_MAX = 448.0
#: Values per block of the activations' re-quantization and side of a weight block: the FP8
#: block of the core's registry (also a table row's values per UE8M0 scale).
BLOCK = dtypes.FP8_BLOCK


def _pow2_scale(amax: torch.Tensor) -> torch.Tensor:
    """``2**ceil(log2(amax / 448))`` (float32), amax clamped below at 1e-4."""
    return torch.exp2(torch.ceil(torch.log2(amax.float().clamp(min=1e-4) / E4M3_MAX)))


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """``x`` (last dim a multiple of 32) re-quantized as the reference's FP8 linear does: per block
    of 32 consecutive values, E4M3 codes of ``x / s`` with ``s = 2**ceil(log2(amax / 448))``,
    returned dequantized (``codes * s``, float32, exact)."""
    *lead, n = x.shape
    blocks = x.float().reshape(*lead, n // BLOCK, BLOCK)
    s = _pow2_scale(blocks.abs().amax(-1, keepdim=True))
    codes = (blocks / s).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return (codes.float() * s).reshape(*lead, n)


def quantize_blocks(
    w: torch.Tensor, block: tuple[int, int] = (BLOCK, BLOCK)
) -> tuple[torch.Tensor, torch.Tensor]:
    """A float matrix ``[rows, cols]`` as E4M3 codes and UE8M0 scales per ``block`` (rows x cols;
    ``(1, 32)`` for table rows, ``(32, 32)`` for ``wkv``): the checkpoint's layout. Each block's
    scale is the smallest power of two that fits its amax in E4M3's range."""
    rows, cols = w.shape
    br, bc = block
    if rows % br or cols % bc:
        raise ValueError(f"a [{rows}, {cols}] matrix is not made of whole {br}x{bc} blocks")
    blocks = w.detach().float().reshape(rows // br, br, cols // bc, bc)
    s = _pow2_scale(blocks.abs().amax(dim=(1, 3), keepdim=True))
    codes = (blocks / s).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return codes.reshape(rows, cols), s.reshape(rows // br, cols // bc).to(torch.float8_e8m0fnu)


def dequantize_blocks(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """E4M3 ``codes [rows, cols]`` times their UE8M0 block ``scale`` (the block size follows from
    the two shapes), as float32 (exact)."""
    rows, cols = codes.shape
    sr, sc = scale.shape
    if not sr or not sc or rows % sr or cols % sc:
        raise ValueError(
            f"scales of shape [{sr}, {sc}] do not tile E4M3 codes of shape [{rows}, {cols}]"
        )
    s = scale.float().repeat_interleave(rows // sr, 0).repeat_interleave(cols // sc, 1)
    return codes.float() * s


class _FP8Linear(nn.Module):
    """``wkv`` of the reference: E4M3 ``weight`` with UE8M0 ``scale`` per 32x32 block (frozen)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.scale = nn.Parameter(scale, requires_grad=False)

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        w = dequantize_blocks(self.weight, self.scale)
        q = quantize_activations(x)
        xq = x.float() + (q - x.float()).detach()  # straight through the re-quantization
        return nn.functional.linear(xq, w).to(out_dtype)


class _DenseLinear(nn.Module):
    """``wkv`` dequantized once: a trainable ``weight`` in the compute dtype."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        return nn.functional.linear(x.to(self.weight.dtype), self.weight).to(out_dtype)


class _Embed(nn.Module):
    """``embed``: the layer's rows, ``[B, L, cols * dim]`` per token, from a float32 ``weight``
    parameter or a HostTable (then nothing of it is in the state_dict)."""

    def __init__(
        self,
        hasher: NgramHasher,
        layer_id: int,
        dim: int,
        table: HostTable | None,
        optimizer: SparseOptimizer | None,
    ) -> None:
        super().__init__()
        self.host: EngramEmbedding | None = None
        self.dense: MultiHeadEmbedding | None = None
        if table is None:
            check_no_optimizer(optimizer, "the parameter embed.weight")
            self.dense = MultiHeadEmbedding(hasher, layer_id, dim)
        else:
            self.host = EngramEmbedding(hasher, layer_id, dim, table=table, optimizer=optimizer)
        self._register_state_dict_hook(_embed_names)  # type: ignore[no-untyped-call]
        self._register_load_state_dict_pre_hook(_embed_load_names, with_module=True)  # type: ignore[no-untyped-call]
        self.register_load_state_dict_post_hook(_embed_missing_names)  # type: ignore[no-untyped-call]
        self._loading_prefix: str = ""

    @property
    def weight(self) -> torch.Tensor:
        if self.dense is None:
            raise AttributeError(
                "this layer's rows are in a HostTable (embed.table), not a parameter"
            )
        return self.dense.embedding.weight

    @property
    def table(self) -> HostTable | None:
        return None if self.host is None else self.host.table

    def forward(self, hash_ids: torch.Tensor) -> torch.Tensor:
        if self.host is not None:
            rows: torch.Tensor = self.host(hash_ids)
            return rows
        assert self.dense is not None
        dense: torch.Tensor = self.dense(hash_ids)
        return dense.flatten(-2)


def _embed_names(module: nn.Module, state: dict[str, Any], prefix: str, _meta: Any) -> None:
    """The checkpoint's names: ``embed.weight`` for the rows; the offsets and a host table's
    internals are derived from the config, not saved."""
    for key in list(state):
        if key.startswith(prefix):
            value = state.pop(key)
            if key == prefix + "dense.embedding.weight":
                state[prefix + "weight"] = value


def _embed_load_names(
    module: _Embed,
    state: dict[str, Any],
    prefix: str,
    _meta: Any,
    _strict: bool,
    _missing: list[str],
    _unexpected: list[str],
    _errors: list[str],
) -> None:
    """Back from the checkpoint's names: ``embed.weight`` to the rows' parameter; what is
    derived from the config (the offsets) taken from the module as it is."""
    module._loading_prefix = prefix
    if prefix + "weight" in state:
        state[prefix + "dense.embedding.weight"] = state.pop(prefix + "weight")
    for child, sub in module.named_children():
        for key, value in sub.state_dict().items():
            if (child, key) != ("dense", "embedding.weight"):
                state.setdefault(f"{prefix}{child}.{key}", value)


def _embed_missing_names(module: _Embed, keys: Any) -> None:
    """A missing table parameter is reported by the checkpoint's name, ``embed.weight``."""
    inner = f"{module._loading_prefix}dense.embedding.weight"
    keys.missing_keys[:] = [
        f"{module._loading_prefix}weight" if k == inner else k for k in keys.missing_keys
    ]


class EngramV41(nn.Module):
    """One Engram layer of DeepSeek-V4.1-Flash (SPEC 8.2), parameters named as the checkpoint's
    tensors: ``embed.weight`` (a parameter table only), ``wkv.weight``, ``wkv.scale`` (``"fp8"``
    mode), ``q_weight``, ``k_weight``.

    ``hasher``: the model's hasher (its config gives the heads, orders and widths;
    ``hidden_size``, ``hc_mult`` default to the config's). ``norm_eps``: the model's
    ``rms_norm_eps`` (default: the config's, else V4.1's 1e-20). ``wkv``: ``(codes, scales)``
    of the checkpoint (E4M3 ``[hidden * (hc_mult + 1), cols * head_dim]``, UE8M0 per 32x32
    block), a float weight of that shape, or None (random, as ``nn.Linear`` initializes, then
    quantized).
    """

    q_weight: nn.Parameter
    k_weight: nn.Parameter

    def __init__(
        self,
        hasher: NgramHasher,
        layer_id: int,
        hidden_size: int | None = None,
        hc_mult: int | None = None,
        *,
        norm_eps: float | None = None,
        table: HostTable | None = None,
        optimizer: SparseOptimizer | None = None,
        wkv: tuple[torch.Tensor, torch.Tensor] | torch.Tensor | None = None,
        wkv_mode: Literal["fp8", "bf16"] = "bf16",
        compute_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        super().__init__()
        if not isinstance(hasher, NgramHasher):
            raise TypeError(f"hasher must be an NgramHasher, got {type(hasher).__name__}")
        cfg = hasher.config.replace(
            hidden_size=hasher.config.hidden_size if hidden_size is None else hidden_size,
            hc_mult=hasher.config.hc_mult if hc_mult is None else hc_mult,
        )
        if wkv_mode not in ("fp8", "bf16"):
            raise ValueError(f'wkv_mode must be "fp8" or "bf16", got {wkv_mode!r}')
        if compute_dtype not in (torch.bfloat16, torch.float32):
            raise ValueError(
                f"compute_dtype must be torch.bfloat16 or torch.float32, got {compute_dtype}"
            )
        if norm_eps is None:  # the model's (EngramConfig.from_hf), else V4.1's
            norm_eps = 1e-20 if cfg.norm_eps is None else cfg.norm_eps
        if not (isinstance(norm_eps, (int, float)) and math.isfinite(norm_eps) and norm_eps >= 0):
            raise ValueError(f"norm_eps must be a finite number >= 0, got {norm_eps!r}")
        self.layer_id = layer_id
        self.hidden_size = d = cfg.hidden_size
        self.hc_mult = g = cfg.hc_mult
        self.cols = cfg.cols
        self.head_dim = cfg.head_dim
        self.norm_eps = float(norm_eps)
        self.wkv_mode = wkv_mode
        self.compute_dtype = compute_dtype
        in_features = self.cols * self.head_dim
        out_features = d * (g + 1)
        for name, size in (
            ("hidden_size * (hc_mult + 1)", out_features),
            ("cols * head_dim", in_features),
        ):
            if size % BLOCK:
                raise ValueError(
                    f"{name} = {size} must be a multiple of {BLOCK} (wkv's FP8 blocks)"
                )
        self.embed = _Embed(hasher, layer_id, self.head_dim, table, optimizer)
        codes, scale = self._wkv_tensors(wkv, out_features, in_features)
        self.wkv: _FP8Linear | _DenseLinear
        if wkv_mode == "fp8":
            self.wkv = _FP8Linear(codes, scale)
        else:
            self.wkv = _DenseLinear(dequantize_blocks(codes, scale).to(compute_dtype))
        self.q_weight = nn.Parameter(torch.ones(g, d, dtype=torch.bfloat16))
        self.k_weight = nn.Parameter(torch.ones(g, d, dtype=torch.bfloat16))

    @staticmethod
    def _wkv_tensors(
        wkv: tuple[torch.Tensor, torch.Tensor] | torch.Tensor | None, rows: int, cols: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        want = (rows // BLOCK, cols // BLOCK)
        if wkv is None:
            w = torch.empty(rows, cols)
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))  # as nn.Linear
            return quantize_blocks(w)
        if isinstance(wkv, torch.Tensor):
            if tuple(wkv.shape) != (rows, cols) or not wkv.is_floating_point():
                raise ValueError(
                    f"wkv must be a float [{rows}, {cols}] weight, got {wkv.dtype} "
                    f"{list(wkv.shape)}"
                )
            return quantize_blocks(wkv)
        codes, scale = wkv
        if codes.dtype != torch.float8_e4m3fn or tuple(codes.shape) != (rows, cols):
            raise ValueError(
                f"wkv's weight must be float8_e4m3fn [{rows}, {cols}] (hidden * (hc_mult + 1), "
                f"cols * head_dim), got {codes.dtype} {list(codes.shape)}"
            )
        if scale.dtype != torch.float8_e8m0fnu or tuple(scale.shape) != want:
            raise ValueError(
                f"wkv's scale must be float8_e8m0fnu {list(want)} (one per 32x32 block), got "
                f"{scale.dtype} {list(scale.shape)}"
            )
        return codes.detach().cpu(), scale.detach().cpu()

    def wkv_weight(self) -> torch.Tensor:
        """``wkv``'s weight as float32 ``[hidden * (hc_mult + 1), cols * head_dim]``."""
        if isinstance(self.wkv, _FP8Linear):
            return dequantize_blocks(self.wkv.weight, self.wkv.scale)
        return self.wkv.weight.detach().float()

    def checkpoint_tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The dense tensors in the checkpoint's names, dtypes and shapes (``wkv`` as E4M3 with
        UE8M0 scales per 32x32 block, re-quantized from a trained bf16 weight): ``{prefix +
        "wkv.weight", prefix + "wkv.scale", prefix + "q_weight", prefix + "k_weight"}``. The
        table's rows are the HostTable's file (or ``embed.weight``)."""
        if isinstance(self.wkv, _FP8Linear):
            codes, scale = self.wkv.weight.detach(), self.wkv.scale.detach()
        else:
            codes, scale = quantize_blocks(self.wkv.weight)
        return {
            prefix + "wkv.weight": codes,
            prefix + "wkv.scale": scale,
            prefix + "q_weight": self.q_weight.detach().to(torch.bfloat16),
            prefix + "k_weight": self.k_weight.detach().to(torch.bfloat16),
        }

    def forward(
        self,
        h: torch.Tensor,
        hash_ids: torch.Tensor,
        token_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``h [B, L, hc_mult, hidden]``, ``hash_ids [B, L, cols]`` (this layer's per-head ids,
        ``flat=False``), ``token_mask [B, L]`` bool (False: gate 0) -> ``h + gate * value``
        ``[B, L, hc_mult, hidden]`` in ``h``'s dtype."""
        g, d = self.hc_mult, self.hidden_size
        if not isinstance(h, torch.Tensor) or h.dim() != 4 or tuple(h.shape[2:]) != (g, d):
            shape = list(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
            raise ValueError(f"h must be a [B, L, {g}, {d}] tensor (hc_mult, hidden), got {shape}")
        if not h.is_floating_point():
            raise TypeError(f"h must be a float tensor, got {h.dtype}")
        b, length = h.shape[:2]
        if not isinstance(hash_ids, torch.Tensor) or tuple(hash_ids.shape) != (
            b,
            length,
            self.cols,
        ):
            shape = (
                list(hash_ids.shape)
                if isinstance(hash_ids, torch.Tensor)
                else type(hash_ids).__name__
            )
            raise ValueError(
                f"hash_ids must be [B, L, cols] = [{b}, {length}, {self.cols}] to match h, got "
                f"{shape}"
            )
        if token_mask is not None and (
            not isinstance(token_mask, torch.Tensor)
            or token_mask.dtype != torch.bool
            or tuple(token_mask.shape) != (b, length)
        ):
            got = (
                f"{token_mask.dtype} {list(token_mask.shape)}"
                if isinstance(token_mask, torch.Tensor)
                else type(token_mask).__name__
            )
            raise ValueError(
                f"token_mask must be a bool [B, L] = [{b}, {length}] tensor, got {got}"
            )
        e = self.embed(hash_ids).to(device=h.device, dtype=self.compute_dtype)
        kv: torch.Tensor = self.wkv(e, self.compute_dtype)
        return gated_residual(h, kv, self.q_weight, self.k_weight, self.norm_eps, token_mask)


def gated_residual(
    h: torch.Tensor,
    kv: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """SPEC 8.2 steps 3-6, after ``kv = wkv(e)`` ``[B, L, (G + 1) * D]``: the keys and the shared
    value, the gate of each branch (float32, zero where ``token_mask`` is False) and
    ``h + gate * value`` in ``h``'s dtype."""
    b, length, g, d = h.shape
    key = kv[..., : g * d].reshape(b, length, g, d).float()
    value = kv[..., g * d :].float()
    hf = h.float()
    w = q_weight.float() * k_weight.float()
    rstd = torch.rsqrt(hf.square().mean(-1) + eps) * torch.rsqrt(key.square().mean(-1) + eps)
    dot = (hf * w * key).sum(-1) * rstd / math.sqrt(d)
    gate = torch.sigmoid(torch.copysign(torch.sqrt(dot.abs().clamp(min=1e-6)), dot))
    if token_mask is not None:
        gate = gate * token_mask.to(gate.device)[..., None]
    return (hf + gate[..., None] * value[:, :, None, :]).to(h.dtype)
