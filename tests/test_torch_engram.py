"""The torch Engram module against a reference written here from SPEC section 6."""

from __future__ import annotations

import math
import pathlib

import engram_rs
import numpy as np
import pytest
import torch
from engram_rs import EngramConfig, NgramHasher
from engram_rs.torch.modules import Engram, EngramEmbedding, MultiHeadEmbedding, ShortConv
from torch import nn

C = 1000  # compressed vocabulary size the small tests hash with
LAYER = 1
SMALL = EngramConfig.preset("demo").replace(
    engram_vocab_size=[1009, 1013], n_embed_per_ngram=64, hidden_size=32, hc_mult=3
)


# -- the reference: SPEC section 6 in plain torch ops, parameters named as the demo's ------------


def _holder(**params: torch.Tensor) -> nn.Module:
    """A module holding only the named parameters (the reference computes with them itself)."""
    m = nn.Module()
    for name, value in params.items():
        m.register_parameter(name, nn.Parameter(value))
    return m


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float | None) -> torch.Tensor:
    eps = torch.finfo(x.dtype).eps if eps is None else eps  # nn.RMSNorm's default eps
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


class RefEngram(nn.Module):
    """SPEC section 6, step by step, with its own loops; random values in every parameter."""

    def __init__(
        self, cfg: EngramConfig, primes: list[int], device: str | torch.device = "cpu"
    ) -> None:
        super().__init__()
        g, d, k = cfg.hc_mult, cfg.hidden_size, cfg.kernel_size
        e = (cfg.max_ngram_size - 1) * cfg.n_embed_per_ngram
        self.cfg = cfg

        def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
            return torch.randn(*shape, device=device) * scale

        self.multi_head_embedding = nn.Module()
        self.multi_head_embedding.embedding = _holder(weight=rand(sum(primes), cfg.head_dim))
        starts = [sum(primes[:i]) for i in range(len(primes))]
        self.multi_head_embedding.register_buffer(
            "offsets", torch.tensor(starts, dtype=torch.int64, device=device)
        )
        if cfg.short_conv:
            self.short_conv = nn.Module()
            self.short_conv.conv = _holder(weight=rand(g * d, 1, k, scale=0.5))
            self.short_conv.norms = nn.ModuleList(
                _holder(weight=1 + rand(d, scale=0.1)) for _ in range(g)
            )
        self.value_proj = _holder(weight=rand(d, e, scale=e**-0.5), bias=rand(d, scale=0.1))
        self.key_projs = nn.ModuleList(
            _holder(weight=rand(d, e, scale=e**-0.5), bias=rand(d, scale=0.1)) for _ in range(g)
        )
        self.norm1 = nn.ModuleList(_holder(weight=1 + rand(d, scale=0.1)) for _ in range(g))
        self.norm2 = nn.ModuleList(_holder(weight=1 + rand(d, scale=0.1)) for _ in range(g))

    def forward(self, hidden: torch.Tensor, hash_ids: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        g_count, d, k_size, n = cfg.hc_mult, cfg.hidden_size, cfg.kernel_size, cfg.max_ngram_size
        length = hidden.shape[1]
        table = self.multi_head_embedding.embedding.weight
        offsets = self.multi_head_embedding.offsets
        # 1. one row per hash column, concatenated: [B, L, E]
        e = torch.cat(
            [table[hash_ids[:, :, c] + offsets[c]] for c in range(hash_ids.shape[2])], dim=-1
        )
        # 2. a gate per branch
        gates = []
        for g in range(g_count):
            kp = self.key_projs[g]
            k = _rms(e @ kp.weight.T + kp.bias, self.norm1[g].weight, None)
            q = _rms(hidden[:, :, g], self.norm2[g].weight, None)
            s = (k * q).sum(-1) / math.sqrt(d)
            s = torch.sign(s) * torch.sqrt(torch.clamp(s.abs(), min=1e-6))
            gates.append(torch.sigmoid(s))
        # 3. gated values [B, L, G, D]
        v = e @ self.value_proj.weight.T + self.value_proj.bias
        value = torch.stack([gate[..., None] * v for gate in gates], dim=2)
        if not cfg.short_conv:
            return value
        # 4. ShortConv: branch-major channels, causal depthwise conv with dilation N, SiLU
        x = torch.cat(
            [_rms(value[:, :, g], self.short_conv.norms[g].weight, 1e-5) for g in range(g_count)],
            dim=-1,
        )
        w = self.short_conv.conv.weight
        steps = []
        for t in range(length):
            acc = torch.zeros_like(x[:, 0])
            for j in range(k_size):
                src = t - (k_size - 1 - j) * n
                if src >= 0:
                    acc = acc + w[:, 0, j] * x[:, src]
            steps.append(acc)
        y = torch.stack(steps, dim=1)
        y = (y * torch.sigmoid(y)).reshape(value.shape)
        # 5.
        return value + y


# -- helpers ------------------------------------------------------------------------------------


def _primes(cfg: EngramConfig, layer: int = LAYER) -> list[int]:
    return [p for order in NgramHasher(cfg, C, compressed_pad_id=2).primes[layer] for p in order]


def _hash_ids(cfg: EngramConfig, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """The hasher's ids of random tokens (per-head, not flat), as the module takes them."""
    tokens = np.random.default_rng(seed).integers(0, C, size=(batch, length))
    return torch.from_numpy(NgramHasher(cfg, C, compressed_pad_id=2).hash(tokens, LAYER)[LAYER])


def _pair(cfg: EngramConfig) -> tuple[RefEngram, Engram]:
    torch.manual_seed(0)
    ref = RefEngram(cfg, _primes(cfg))
    ours = Engram(cfg, LAYER, compressed_vocab_size=C)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _run(
    model: nn.Module, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output, and gradients of every parameter and of ``hidden`` for the loss out . weights."""
    model.zero_grad(set_to_none=True)
    h = hidden.clone().requires_grad_(True)
    out = model(h, ids)
    (out * weights).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert h.grad is not None
    grads["<hidden_states>"] = h.grad
    return out.detach(), grads


def _inputs(cfg: EngramConfig, batch: int = 2, length: int = 11) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(1)
    shape = (batch, length, cfg.hc_mult, cfg.hidden_size)
    hidden = torch.randn(shape, generator=gen)
    return hidden, _hash_ids(cfg, batch, length), torch.randn(shape, generator=gen)


def _expected_keys(cfg: EngramConfig, rows: int) -> dict[str, tuple[int, ...]]:
    """The demo's state_dict (SPEC section 6), written out."""
    g, d = cfg.hc_mult, cfg.hidden_size
    e = (cfg.max_ngram_size - 1) * cfg.n_embed_per_ngram
    keys: dict[str, tuple[int, ...]] = {
        "multi_head_embedding.embedding.weight": (rows, cfg.head_dim),
        "multi_head_embedding.offsets": (cfg.cols,),
    }
    if cfg.short_conv:
        keys["short_conv.conv.weight"] = (g * d, 1, cfg.kernel_size)
        keys.update({f"short_conv.norms.{i}.weight": (d,) for i in range(g)})
    keys.update({"value_proj.weight": (d, e), "value_proj.bias": (d,)})
    for i in range(g):
        keys.update({f"key_projs.{i}.weight": (d, e), f"key_projs.{i}.bias": (d,)})
    keys.update({f"norm1.{i}.weight": (d,) for i in range(g)})
    keys.update({f"norm2.{i}.weight": (d,) for i in range(g)})
    return keys


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# -- (a) against the reference ------------------------------------------------------------------


@pytest.mark.parametrize("short_conv", [True, False])
def test_matches_reference(short_conv: bool) -> None:
    cfg = SMALL.replace(short_conv=short_conv)
    ref, ours = _pair(cfg)
    hidden, ids, weights = _inputs(cfg)
    out_ref, grads_ref = _run(ref, hidden, ids, weights)
    out, grads = _run(ours, hidden, ids, weights)
    assert out.shape == hidden.shape
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    assert grads.keys() == grads_ref.keys()
    assert len(grads) == len(list(ref.parameters())) + 1  # every parameter got a gradient
    for name, grad in grads_ref.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-4, rtol=1e-4, msg=name)


def test_state_dict_round_trip() -> None:
    ref, ours = _pair(SMALL)
    back = RefEngram(SMALL, _primes(SMALL))
    back.load_state_dict(ours.state_dict(), strict=True)
    for name, value in ref.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name
    # int32 ids give the same rows
    hidden, ids, _ = _inputs(SMALL, 1, 5)
    assert torch.equal(ours(hidden, ids.int()), ours(hidden, ids))


def test_embedding_modules() -> None:
    hasher = NgramHasher(SMALL, C, compressed_pad_id=2)
    ids = _hash_ids(SMALL, 2, 6)
    mhe = MultiHeadEmbedding(hasher, LAYER, SMALL.head_dim)
    rows = mhe(ids)
    assert rows.shape == (2, 6, SMALL.cols, SMALL.head_dim)
    flat = torch.tensor(hasher.offsets[LAYER]) + ids
    assert torch.equal(rows, mhe.embedding.weight[flat])
    emb = EngramEmbedding(hasher, LAYER, SMALL.head_dim)
    assert _shapes(emb) == {
        "multi_head_embedding.embedding.weight": (hasher.table_rows[LAYER], SMALL.head_dim),
        "multi_head_embedding.offsets": (SMALL.cols,),
    }
    assert emb.multi_head_embedding is not None
    emb.multi_head_embedding.load_state_dict(mhe.state_dict())
    assert torch.equal(emb(ids), rows.flatten(-2))
    assert emb.prefetch(ids) is None
    with pytest.raises(ValueError, match=r"optimizer is for rows in a HostTable \(pass table="):
        EngramEmbedding(hasher, LAYER, SMALL.head_dim, optimizer=object())  # type: ignore[arg-type]


def test_meta_init_then_to_empty() -> None:
    """Built on the meta device, materialised with to_empty, then reset_parameters per module
    (as FSDP does): the buffers hold the layout again."""
    with torch.device("meta"):
        model = Engram(SMALL, LAYER, compressed_vocab_size=C)
    model.to_empty(device="cpu")
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    assert isinstance(model.multi_head_embedding, MultiHeadEmbedding)
    hasher = NgramHasher(SMALL, C, compressed_pad_id=2)
    assert torch.equal(model.multi_head_embedding.offsets, torch.tensor(hasher.offsets[LAYER]))
    assert torch.equal(model.multi_head_embedding.head_rows, torch.tensor(_primes(SMALL)))
    hidden, ids, _ = _inputs(SMALL, 1, 4)
    assert model(hidden, ids).isfinite().all()


# -- (b), (f) the demo's state_dict --------------------------------------------------------------


@pytest.mark.parametrize("preset", ["demo", "deepseek-v4.1-flash"])
def test_state_dict_keys_of_presets(preset: str) -> None:
    cfg = EngramConfig.preset(preset)
    rows = NgramHasher(cfg, C, compressed_pad_id=2).table_rows[LAYER]
    with torch.device("meta"):
        ours = Engram(cfg, LAYER, compressed_vocab_size=C)
        ref = RefEngram(cfg, _primes(cfg), device="meta")
    expected = _expected_keys(cfg, rows)
    assert _shapes(ours) == expected
    assert _shapes(ref) == expected
    assert list(ours.state_dict()) == list(ref.state_dict())
    if preset == "demo":
        assert expected["multi_head_embedding.embedding.weight"] == (rows, 64)
        assert expected["short_conv.conv.weight"] == (4096, 1, 4)
        assert expected["value_proj.weight"] == (1024, 1024)
    else:  # DeepSeek-V4.1-Flash: no ShortConv
        assert ours.short_conv is None
        assert not [k for k in ours.state_dict() if k.startswith("short_conv")]
        assert expected["value_proj.weight"] == (5120, 6144)


def test_hidden_size_and_hc_mult_override_the_config() -> None:
    m = Engram(SMALL, LAYER, hidden_size=16, hc_mult=2, compressed_vocab_size=C)
    assert _shapes(m)["value_proj.weight"] == (16, 128)
    assert _shapes(m)["short_conv.conv.weight"] == (32, 1, SMALL.kernel_size)
    assert [k for k in m.state_dict() if k.startswith("norm1.")] == [
        "norm1.0.weight",
        "norm1.1.weight",
    ]


# -- (c) torch.compile ---------------------------------------------------------------------------


def test_compile_fullgraph_matches_eager() -> None:
    cfg = SMALL.replace(hc_mult=2, hidden_size=16)
    torch.manual_seed(0)
    model = Engram(cfg, LAYER, compressed_vocab_size=C)
    hidden, ids, weights = _inputs(cfg, 2, 7)
    out, grads = _run(model, hidden, ids, weights)
    compiled = torch.compile(model, fullgraph=True)
    out_c, grads_c = _run(compiled, hidden, ids, weights)
    torch.testing.assert_close(out_c, out, atol=1e-5, rtol=1e-5)
    assert grads_c.keys() == {f"_orig_mod.{k}" for k in grads if k[0] != "<"} | {"<hidden_states>"}
    for name, grad in grads.items():
        key = name if name[0] == "<" else f"_orig_mod.{name}"
        torch.testing.assert_close(grads_c[key], grad, atol=1e-4, rtol=1e-4, msg=name)


# -- (d) ShortConv -------------------------------------------------------------------------------


def test_short_conv_is_causal_with_dilation() -> None:
    torch.manual_seed(0)
    k, n, length = 4, 3, 16
    conv = ShortConv(hidden_size=4, kernel_size=k, dilation=n, hc_mult=2)
    x = torch.randn(2, length, 2, 4)
    with torch.no_grad():
        y = conv(x)
        for s in range(length):
            x2 = x.clone()
            x2[:, s] += torch.randn(2, 2, 4)
            y2 = conv(x2)
            changed = {t for t in range(length) if not torch.equal(y2[:, t], y[:, t])}
            assert changed == {s + j * n for j in range(k) if s + j * n < length}, s


# -- (e) bad input -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small() -> Engram:
    torch.manual_seed(0)
    return Engram(SMALL, LAYER, compressed_vocab_size=C)


def test_bad_hash_ids(small: Engram) -> None:
    hidden, ids, _ = _inputs(SMALL, 2, 5)
    with pytest.raises(ValueError, match=r"hash ids of wrong rank or column count: expected "):
        small(hidden, ids[0])
    with pytest.raises(
        ValueError, match=r"\[batch, length, 16\] for layer 1 .* got shape \(2, 5, 15\)"
    ):
        small(hidden, ids[..., :15])
    with pytest.raises(
        TypeError, match=r"hash ids of wrong dtype torch.float32: expected torch.int64"
    ):
        small(hidden, ids.float())
    with pytest.raises(TypeError, match=r"hash_ids must be a torch tensor, got ndarray"):
        small.multi_head_embedding(ids.numpy())


def test_hash_ids_beyond_the_table(small: Engram) -> None:
    hidden, ids, _ = _inputs(SMALL, 2, 5)
    prime = _primes(SMALL)[5]
    bad = ids.clone()
    bad[1, 3, 5] = prime  # inside the flat table (the next head's first row), not this head's
    with pytest.raises(
        IndexError,
        match=rf"hash id {prime} in column 5 at position \(1, 3\) is outside layer 1's table: "
        rf"that column's head has {prime} rows \[0, {prime}\)",
    ):
        small(hidden, bad)
    bad = ids.clone()
    bad[0, 4, 15] = -1
    with pytest.raises(IndexError, match=r"hash id -1 in column 15 at position \(0, 4\)"):
        small(hidden, bad)
    # flat ids (hash(..., flat=True)) are caught too
    flat = ids + torch.tensor(NgramHasher(SMALL, C, compressed_pad_id=2).offsets[LAYER])
    with pytest.raises(IndexError, match=r"and flat=False: the module adds the offsets"):
        small(hidden, flat)


def test_bad_hidden_states(small: Engram) -> None:
    hidden, ids, _ = _inputs(SMALL, 2, 5)
    with pytest.raises(ValueError, match=r"hidden_states has hidden size 31, expected 32"):
        small(hidden[..., :31], ids)
    with pytest.raises(ValueError, match=r"has 2 hyper-connection branches, expected hc_mult=3"):
        small(hidden[:, :, :2], ids)
    with pytest.raises(
        ValueError,
        match=r"hidden_states must be \[batch, length, hc_mult=3, hidden_size=32\], "
        r"got \(2, 5, 96\)",
    ):
        small(hidden.flatten(2), ids)
    with pytest.raises(
        ValueError, match=r"\(2, 4, 3, 32\) and hash_ids \(2, 5, 16\) differ in batch"
    ):
        small(hidden[:, :4], ids)
    with pytest.raises(
        ValueError, match=r"\(1, 5, 3, 32\) and hash_ids \(2, 5, 16\) differ in batch"
    ):
        small(hidden[:1], ids)


def test_bad_construction() -> None:
    hasher = NgramHasher(SMALL, C, compressed_pad_id=2)
    with pytest.raises(
        ValueError, match=r"layer_id 2 is not an Engram layer of this config \[1, 15\]"
    ):
        Engram(SMALL, 2, compressed_vocab_size=C)
    with pytest.raises(ValueError, match=r"embed_dim must be a positive int, got 0"):
        EngramEmbedding(hasher, LAYER, 0)
    with pytest.raises(TypeError, match=r"hasher must be an NgramHasher, got EngramConfig"):
        MultiHeadEmbedding(SMALL, LAYER, 8)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"hc_mult must be >= 1, got 0"):
        Engram(SMALL, LAYER, hc_mult=0, compressed_vocab_size=C)


def test_host_table_of_wrong_shape(tmp_path: pathlib.Path) -> None:
    hasher = NgramHasher(SMALL, C, compressed_pad_id=2)
    rows, dim = hasher.table_rows[LAYER], SMALL.head_dim
    with engram_rs.HostTable.create(tmp_path / "rows.safetensors", rows + 1, dim) as table:
        with pytest.raises(
            ValueError,
            match=rf"the HostTable is \[{rows + 1}, {dim}\] \(rows, dim\), but layer 1's table "
            rf"is \[{rows}, {dim}\] \(hasher.table_rows\[1\], embed_dim\)",
        ):
            EngramEmbedding(hasher, LAYER, dim, table)
    with engram_rs.HostTable.create(tmp_path / "dim.safetensors", rows, dim * 2) as table:
        with pytest.raises(ValueError, match=rf"the HostTable is \[{rows}, {dim * 2}\]"):
            EngramEmbedding(hasher, LAYER, dim, table)
    with pytest.raises(TypeError, match=r"table must be an engram_rs.HostTable or None"):
        EngramEmbedding(hasher, LAYER, dim, torch.zeros(rows, dim))  # type: ignore[arg-type]
    # The right shape builds (its lookups are engram_rs.torch.ops', tested there): the module
    # keeps the table, and only the offsets go into the state_dict.
    with engram_rs.HostTable.create(tmp_path / "ok.safetensors", rows, dim) as table:
        emb = EngramEmbedding(hasher, LAYER, dim, table)
        assert emb.table is table
        assert _shapes(emb) == {"offsets": (SMALL.cols,)}
        emb.to_empty(device="cpu")
        emb.reset_parameters()
        assert torch.equal(emb.offsets, torch.tensor(hasher.offsets[LAYER]))
        model = Engram(SMALL, LAYER, compressed_vocab_size=C, table=table)
        assert isinstance(model.multi_head_embedding, EngramEmbedding)
        keys = _expected_keys(SMALL, rows)
        del keys["multi_head_embedding.embedding.weight"]
        assert _shapes(model) == keys
