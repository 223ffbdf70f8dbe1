"""DeepSeek-V4.1-Flash's Engram layer (SPEC 8.2) against an independent reference written here
from the SPEC text: float64 numpy, its own E4M3 rounding, bf16 rounding where the layer rounds."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import engram_rs as er  # noqa: E402
from engram_rs.torch import SparseSGD  # noqa: E402
from engram_rs.torch.v41 import (  # noqa: E402
    EngramV41,
    dequantize_blocks,
    quantize_activations,
    quantize_blocks,
)

HIDDEN = 32
VOCAB = 500


def config(hc_mult: int) -> er.EngramConfig:
    # 3 orders x 2 heads = 6 columns of 32 values: wkv is [32 * (G + 1), 192].
    return er.EngramConfig(
        engram_vocab_size=(211, 223, 227),
        max_ngram_size=4,
        n_embed_per_ngram=64,
        n_head_per_ngram=2,
        layer_ids=(1,),
        pad_id=0,
        hidden_size=HIDDEN,
        hc_mult=hc_mult,
        short_conv=False,
    )


def hasher(hc_mult: int) -> er.NgramHasher:
    return er.NgramHasher(config(hc_mult), VOCAB, compressed_pad_id=0)


def layer(hc_mult: int, seed: int = 0, **kw) -> EngramV41:
    torch.manual_seed(seed)
    m = EngramV41(hasher(hc_mult), 1, **kw)
    with torch.no_grad():
        if m.embed.table is None:
            m.embed.weight.normal_(0, 0.5)
        m.q_weight.copy_(torch.randn_like(m.q_weight.float()).to(torch.bfloat16))
        m.k_weight.copy_(torch.randn_like(m.k_weight.float()).to(torch.bfloat16))
    return m


def inputs(hc_mult: int, b: int = 2, length: int = 9, seed: int = 1):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (b, length))
    hash_ids = torch.from_numpy(hasher(hc_mult).hash(ids)[1])
    h = torch.from_numpy(rng.standard_normal((b, length, hc_mult, HIDDEN)).astype(np.float32))
    mask = torch.from_numpy(rng.random((b, length)) > 0.3)
    return h, hash_ids, mask


# ---- the reference (SPEC 8.2) ------------------------------------------------------------------


def e4m3(x: np.ndarray) -> np.ndarray:
    """Round to E4M3 (3 mantissa bits, bias 7, subnormal step 2**-9), nearest even, |x| <= 448."""
    x = np.clip(x, -448.0, 448.0)
    a = np.abs(x)
    exp = np.floor(np.log2(np.where(a > 0, a, 1.0)))
    step = np.where(a >= 2.0**-6, 2.0 ** (exp - 3), 2.0**-9)
    return np.rint(x / step) * step  # numpy's rint rounds half to even


def bf16(x: np.ndarray) -> np.ndarray:
    """Round float64 values to bfloat16 (via float32, nearest even on the 16 dropped bits)."""
    f = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((f + 0x7FFF + ((f >> 16) & 1)) >> 16) << 16
    return rounded.astype(np.uint32).view(np.float32).astype(np.float64)


def requantize(x: np.ndarray) -> np.ndarray:
    """The reference FP8 linear's input: per 32 values, E4M3 of x / s times s."""
    blocks = x.reshape(*x.shape[:-1], -1, 32)
    amax = np.maximum(np.abs(blocks).max(-1, keepdims=True), 1e-4)
    s = 2.0 ** np.ceil(np.log2(amax / 448.0))
    return (e4m3(blocks / s) * s).reshape(x.shape)


def reference(m: EngramV41, h, hash_ids, mask, *, mode: str) -> np.ndarray:
    """SPEC 8.2 in float64. ``mode``: "float32" (no rounding), "bf16" (e and the dense weight
    as bf16, kv rounded to bf16), "fp8" (e as bf16, re-quantized; kv rounded to bf16)."""
    g, d = m.hc_mult, m.hidden_size
    table = m.embed.weight.detach().double().numpy()
    offsets = np.asarray(hasher(g).offsets[1])
    e = table[hash_ids.numpy() + offsets].reshape(*hash_ids.shape[:2], -1)
    w = m.wkv_weight().double().numpy()
    if mode != "float32":
        e = bf16(e)
        w = bf16(w)
    if mode == "fp8":
        e = requantize(e)
    kv = e @ w.T
    if mode != "float32":
        kv = bf16(kv)
    b, length = h.shape[:2]
    key = kv[..., : g * d].reshape(b, length, g, d)
    value = kv[..., g * d :]
    hd = h.double().numpy()
    wq = m.q_weight.detach().double().numpy() * m.k_weight.detach().double().numpy()
    eps = m.norm_eps
    rstd = 1 / np.sqrt((hd**2).mean(-1) + eps) / np.sqrt((key**2).mean(-1) + eps)
    dot = (hd * wq * key).sum(-1) * rstd / math.sqrt(d)
    gate = 1 / (1 + np.exp(-np.copysign(np.sqrt(np.maximum(np.abs(dot), 1e-6)), dot)))
    if mask is not None:
        gate = np.where(mask.numpy()[..., None], gate, 0.0)
    return hd + gate[..., None] * value[:, :, None, :]


def bf16_tolerance(m: EngramV41, h, hash_ids) -> float:
    """One bf16 step (2**-8 relative) of the largest value the gate scales: kv is rounded once
    to bf16, and the layer's float32 accumulation can round a value the other way than the
    float64 reference's."""
    ref = reference(m, h, hash_ids, None, mode="float32")
    return 2.0**-7 * float(np.abs(ref - h.double().numpy()).max() + 1.0)


# ---- forward -----------------------------------------------------------------------------------


@pytest.mark.parametrize("hc_mult", [1, 4])
@pytest.mark.parametrize("masked", [False, True])
def test_float32_path_equals_the_reference(hc_mult: int, masked: bool) -> None:
    m = layer(hc_mult, compute_dtype=torch.float32)
    h, ids, mask = inputs(hc_mult)
    mask = mask if masked else None
    out = m(h, ids, mask)
    assert out.dtype == torch.float32 and out.shape == h.shape
    np.testing.assert_allclose(
        out.detach().double().numpy(),
        reference(m, h, ids, mask, mode="float32"),
        atol=1e-5,
        rtol=1e-5,
    )
    if masked:  # a masked position is its input, unchanged
        assert torch.equal(out[~mask], h[~mask])


@pytest.mark.parametrize("hc_mult", [1, 4])
@pytest.mark.parametrize("mode", ["bf16", "fp8"])
def test_bf16_and_fp8_paths_equal_the_reference(hc_mult: int, mode: str) -> None:
    m = layer(hc_mult, wkv_mode=mode)
    h, ids, mask = inputs(hc_mult)
    for hh in (h, h.to(torch.bfloat16)):
        out = m(hh, ids, mask)
        assert out.dtype == hh.dtype
        want = reference(m, hh.float(), ids, mask, mode=mode)
        tol = bf16_tolerance(m, hh.float(), ids) + (
            2.0**-8 * np.abs(want).max() if hh.dtype == torch.bfloat16 else 0
        )
        np.testing.assert_allclose(out.detach().double().numpy(), want, atol=tol, rtol=0)


def test_fp8_mode_differs_from_bf16_by_the_activation_requantization() -> None:
    """The two wkv paths are not the same computation (the test above would pass for both if
    the FP8 path skipped the re-quantization): the reference of one does not fit the other."""
    m = layer(4, wkv_mode="fp8")
    h, ids, _ = inputs(4)
    out = m(h, ids).detach().double().numpy()
    assert (
        np.abs(out - reference(m, h, ids, None, mode="fp8")).max()
        < np.abs(out - reference(m, h, ids, None, mode="bf16")).max()
    )


def test_quantize_and_dequantize_blocks() -> None:
    w = torch.randn(64, 96) * torch.logspace(-3, 2, 96)
    codes, scale = quantize_blocks(w)
    assert codes.dtype == torch.float8_e4m3fn and scale.dtype == torch.float8_e8m0fnu
    assert codes.shape == (64, 96) and scale.shape == (2, 3)
    back = dequantize_blocks(codes, scale)
    # Each block's largest value is within E4M3's range and rounded to 3 mantissa bits.
    assert torch.allclose(back, w, rtol=2.0**-3, atol=float(scale.float().max()) * 2.0**-9)
    again = quantize_blocks(back)  # E4M3 values quantize to themselves
    assert torch.equal(dequantize_blocks(*again), back)
    rows_codes, rows_scale = quantize_blocks(w, (1, 32))  # a table's layout: per row and 32
    assert rows_scale.shape == (64, 3)
    assert torch.allclose(dequantize_blocks(rows_codes, rows_scale), w, rtol=2.0**-3, atol=1e-6)
    x = torch.randn(3, 64)
    np.testing.assert_array_equal(quantize_activations(x).numpy(), requantize(x.double().numpy()))
    with pytest.raises(ValueError, match=r"not made of whole 32x32 blocks"):
        quantize_blocks(torch.zeros(40, 32))
    with pytest.raises(ValueError, match=r"do not tile"):
        dequantize_blocks(codes, torch.ones(2, 5).to(torch.float8_e8m0fnu))


# ---- gradients ---------------------------------------------------------------------------------


def test_gradients_equal_a_float64_autograd_of_the_spec() -> None:
    m = layer(4, compute_dtype=torch.float32)
    h, ids, mask = inputs(4)
    h.requires_grad_(True)
    grad_out = torch.randn(h.shape)
    (m(h, ids, mask) * grad_out).sum().backward()

    # The same SPEC 8.2 math on float64 leaves.
    table = m.embed.weight.detach().double().requires_grad_(True)
    w = m.wkv_weight().double().requires_grad_(True)
    q = m.q_weight.detach().double().requires_grad_(True)
    k = m.k_weight.detach().double().requires_grad_(True)
    hd = h.detach().double().requires_grad_(True)
    offsets = torch.tensor(hasher(4).offsets[1])
    e = table[ids + offsets].reshape(*ids.shape[:2], -1)
    kv = e @ w.T
    key = kv[..., : 4 * HIDDEN].reshape(*ids.shape[:2], 4, HIDDEN)
    value = kv[..., 4 * HIDDEN :]
    rstd = torch.rsqrt((hd**2).mean(-1) + m.norm_eps) * torch.rsqrt((key**2).mean(-1) + m.norm_eps)
    dot = (hd * q * k * key).sum(-1) * rstd / math.sqrt(HIDDEN)
    gate = (
        torch.sigmoid(torch.copysign(torch.sqrt(dot.abs().clamp(min=1e-6)), dot)) * mask[..., None]
    )
    ((hd + gate[..., None] * value[:, :, None, :]) * grad_out.double()).sum().backward()

    close = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(h.grad.double(), hd.grad, **close)
    torch.testing.assert_close(m.wkv.weight.grad.double(), w.grad, **close)
    torch.testing.assert_close(
        m.q_weight.grad.double(), q.grad, rtol=2e-2, atol=1e-3
    )  # bf16 leaves
    torch.testing.assert_close(m.k_weight.grad.double(), k.grad, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(m.embed.weight.grad.double(), table.grad, **close)
    assert table.grad.abs().sum(1).count_nonzero() > 0


# ---- a host table ------------------------------------------------------------------------------


def _host_layer(tmp_path, dtype: str, opt, **kw) -> tuple[EngramV41, EngramV41]:
    """A layer over a HostTable and the same layer over a parameter of the table's rows."""
    h4 = hasher(4)
    path = tmp_path / f"{dtype}.safetensors"
    er.HostTable.create(path, h4.table_rows[1], 32, dtype=dtype, seed=5)
    table = er.HostTable.open(path, writable=True)
    host = layer(4, table=table, optimizer=opt, **kw)
    dense = layer(4, **kw)
    with torch.no_grad():
        dense.embed.weight.copy_(torch.from_numpy(table.gather(np.arange(table.rows))))
        missing, unexpected = dense.load_state_dict(host.state_dict(), strict=False)
        assert missing == ["embed.weight"] and not unexpected
    return host, dense


@pytest.mark.parametrize("dtype", ["float32", "float8_e4m3"])
def test_a_host_table_gives_the_parameter_tables_output(tmp_path, dtype: str) -> None:
    host, dense = _host_layer(tmp_path, dtype, SparseSGD(lr=0.0), wkv_mode="fp8")
    h, ids, mask = inputs(4)
    torch.testing.assert_close(host(h, ids, mask), dense(h, ids, mask), rtol=0, atol=0)
    assert set(host.state_dict()) == {"wkv.weight", "wkv.scale", "q_weight", "k_weight"}


def test_the_fused_optimizer_trains_the_host_rows_as_sgd(tmp_path) -> None:
    lr = 0.5
    host, dense = _host_layer(tmp_path, "float32", SparseSGD(lr=lr), compute_dtype=torch.float32)
    h, ids, mask = inputs(4)
    g = torch.randn(h.shape)
    before = host.embed.table.gather(np.arange(host.embed.table.rows))
    (host(h, ids, mask) * g).sum().backward()
    (dense(h, ids, mask) * g).sum().backward()
    after = host.embed.table.gather(np.arange(host.embed.table.rows))
    want = before - lr * dense.embed.weight.grad.numpy()
    np.testing.assert_allclose(after, want, rtol=1e-5, atol=1e-6)
    assert (after != before).any(1).sum() > 0


# ---- state_dict, the checkpoint's tensors, compile, bad input ----------------------------------


def test_state_dict_has_the_checkpoints_names_and_round_trips() -> None:
    m = layer(4, wkv_mode="fp8")
    sd = m.state_dict()
    assert set(sd) == {"embed.weight", "wkv.weight", "wkv.scale", "q_weight", "k_weight"}
    assert sd["wkv.weight"].dtype == torch.float8_e4m3fn and sd["wkv.weight"].shape == (160, 192)
    assert sd["wkv.scale"].dtype == torch.float8_e8m0fnu and sd["wkv.scale"].shape == (5, 6)
    assert sd["q_weight"].dtype == torch.bfloat16 and sd["q_weight"].shape == (4, HIDDEN)
    other = layer(4, seed=9, wkv_mode="fp8")
    other.load_state_dict(sd)
    h, ids, mask = inputs(4)
    assert torch.equal(other(h, ids, mask), m(h, ids, mask))
    # A trained bf16 wkv goes back to the checkpoint's FP8 layout.
    b = layer(4, wkv=m.wkv_weight())
    t = b.checkpoint_tensors("layers.1.engram.")
    assert sorted(t) == [
        f"layers.1.engram.{n}" for n in ("k_weight", "q_weight", "wkv.scale", "wkv.weight")
    ]
    assert torch.equal(
        dequantize_blocks(t["layers.1.engram.wkv.weight"], t["layers.1.engram.wkv.scale"]),
        m.wkv_weight(),
    )
    fp8 = layer(
        4, wkv=(t["layers.1.engram.wkv.weight"], t["layers.1.engram.wkv.scale"]), wkv_mode="fp8"
    )
    assert torch.equal(fp8.wkv_weight(), m.wkv_weight())


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_compile_fullgraph_equals_eager() -> None:
    m = layer(4, compute_dtype=torch.float32)
    h, ids, mask = inputs(4)
    eager = m(h, ids, mask)
    compiled = torch.compile(m, fullgraph=True)
    torch.testing.assert_close(compiled(h, ids, mask), eager, rtol=1e-5, atol=1e-6)


def test_bad_inputs_get_clear_errors() -> None:
    m = layer(4)
    h, ids, mask = inputs(4)
    with pytest.raises(
        ValueError,
        match=r"h must be a \[B, L, 4, 32\] tensor \(hc_mult, hidden\), got \[2, 9, 32\]",
    ):
        m(h[:, :, 0], ids)
    with pytest.raises(
        ValueError,
        match=r"hash_ids must be \[B, L, cols\] = \[2, 9, 6\] to match h, got \[2, 8, 6\]",
    ):
        m(h, ids[:, :8])
    with pytest.raises(
        ValueError, match=r"token_mask must be a bool \[B, L\] = \[2, 9\] tensor, got torch.int64"
    ):
        m(h, ids, mask.long())
    with pytest.raises(ValueError, match=r'wkv_mode must be "fp8" or "bf16", got \'int8\''):
        EngramV41(hasher(4), 1, wkv_mode="int8")
    with pytest.raises(ValueError, match=r"wkv's scale must be float8_e8m0fnu \[5, 6\]"):
        codes, scale = quantize_blocks(torch.randn(160, 192))
        EngramV41(hasher(4), 1, wkv=(codes, scale[:4]))
    with pytest.raises(ValueError, match=r"wkv's weight must be float8_e4m3fn \[160, 192\]"):
        EngramV41(hasher(4), 1, wkv=(codes.float(), scale))
    with pytest.raises(
        ValueError, match=r"hidden_size \* \(hc_mult \+ 1\) = 90 must be a multiple of 32"
    ):
        EngramV41(hasher(4), 1, hidden_size=18)


def test_the_benchmark_runs_on_a_small_table() -> None:
    """``engram-rs bench v41`` (in ``make bench``) at a tiny size: its contenders give the same
    rows and the same layer output bit for bit (it asserts so), and every part is timed."""
    from engram_rs.bench import bench_v41

    r = bench_v41(table_rows=5000, tokens=16, hidden=32, repeats=1)
    parts = {row["part"]: row for row in r.rows}
    assert set(parts) >= {"gather + dequantize", "wkv", "gate", "whole layer"}
    assert all(parts[p]["engram_rs ms"] > 0 for p in ("gather + dequantize", "whole layer"))
