"""DeepSeek-V4.1-Flash checkpoints: a tiny checkpoint in the real layout (names, F8_E4M3 / F8_E8M0 /
BF16 dtypes, model.safetensors.index.json, a config whose engram_num_embeddings equal the sums of
the primes), written with the ``safetensors`` package, opened, run, trained, saved and reopened."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
st = pytest.importorskip("safetensors.torch")

import engram_rs as er  # noqa: E402
from engram_rs.bench import deepseek_v4_tokenizer_json  # noqa: E402
from engram_rs.torch import SparseSGD  # noqa: E402
from engram_rs.torch.v41 import EngramV41, dequantize_blocks, quantize_blocks  # noqa: E402
from engram_rs.torch.v41_checkpoint import INDEX, open_checkpoint, save_checkpoint  # noqa: E402

HIDDEN, HC, HEADS, HEAD_DIM, LAYERS = 32, 4, 2, 32, (1, 3)


def _hf_config(comp: er.CompressedTokenizer) -> dict:
    fields = {
        "engram_layer_ids": list(LAYERS),
        "engram_max_ngram_size": 4,
        "engram_vocab_size": 211,
        "engram_n_heads": HEADS,
        "engram_head_dim": HEAD_DIM,
        "engram_pad_token_id": 2,
        "engram_compressed_vocab_size": len(comp),
        "hidden_size": HIDDEN,
        "hc_mult": HC,
        "rms_norm_eps": 1e-20,
    }
    cfg = er.EngramConfig.from_hf(fields)
    rows = er.NgramHasher(cfg, len(comp), compressed_pad_id=0).table_rows
    fields["engram_num_embeddings"] = [rows[x] for x in LAYERS]
    return {"architectures": ["DeepseekV4ForCausalLM"], "text_config": fields}


def make_checkpoint(root, *, drop: str | None = None, change: dict | None = None) -> dict:
    """Writes the checkpoint; returns its tensors by name (before ``drop``/``change``)."""
    os.makedirs(root, exist_ok=True)
    tok = deepseek_v4_tokenizer_json()
    shutil.copy(tok, os.path.join(root, "tokenizer.json"))
    comp = er.CompressedTokenizer.from_file(tok)
    hf = _hf_config(comp)
    rows = hf["text_config"]["engram_num_embeddings"]
    gen = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}
    for layer, n in zip(LAYERS, rows, strict=True):
        pre = f"layers.{layer}.engram."
        codes, scale = quantize_blocks(torch.randn(n, HEAD_DIM, generator=gen) * 0.05, (1, 32))
        tensors[pre + "embed.weight"], tensors[pre + "embed.scale"] = codes, scale
        w = torch.randn(HIDDEN * (HC + 1), 6 * HEAD_DIM, generator=gen) * 0.05
        tensors[pre + "wkv.weight"], tensors[pre + "wkv.scale"] = quantize_blocks(w)
        tensors[pre + "q_weight"] = torch.randn(HC, HIDDEN, generator=gen).to(torch.bfloat16)
        tensors[pre + "k_weight"] = torch.randn(HC, HIDDEN, generator=gen).to(torch.bfloat16)
    original = dict(tensors)
    for name, value in (change or {}).items():
        tensors[name] = value
    if drop is not None:
        del tensors[drop]
    shards = {
        "model-00001-of-00003.safetensors": [k for k in tensors if k.startswith("layers.1.")],
        "model-00002-of-00003.safetensors": [
            k for k in tensors if k.startswith("layers.3.engram.embed")
        ],
        "model-00003-of-00003.safetensors": [
            k for k in tensors if k.startswith("layers.3.") and ".embed." not in k
        ],
    }
    extra = {"layers.1.attn.wq": torch.randn(8, 8, generator=gen).to(torch.bfloat16)}
    weight_map = {}
    for shard, names in shards.items():
        part = {k: tensors[k] for k in names}
        if shard.startswith("model-00001"):
            part |= extra  # the shard holds other tensors too
        st.save_file(part, os.path.join(root, shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    with open(os.path.join(root, INDEX), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(root, "config.json"), "w") as f:
        json.dump(hf, f)
    return original


def inputs(ck, b: int = 2, length: int = 10):
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 100_000, (b, length))
    image = np.zeros((b, length), bool)
    image[:, 3:6] = True
    ids = {x: torch.from_numpy(a) for x, a in ck.hasher.hash_tokens(raw, blocked=image).items()}
    h = torch.randn(b, length, HC, HIDDEN, dtype=torch.bfloat16)
    return h, ids, torch.from_numpy(~image)


def test_opens_zero_copy_and_runs_as_the_tensors_say(tmp_path) -> None:
    tensors = make_checkpoint(tmp_path / "ck")
    ck = open_checkpoint(tmp_path / "ck", wkv_mode="fp8")
    assert sorted(ck.layers) == list(LAYERS) and ck.config.norm_eps == 1e-20
    t1 = ck.layers[1].embed.table
    assert t1.mode == "mmap" and t1.path.endswith("model-00001-of-00003.safetensors")
    h, ids, mask = inputs(ck)
    for layer, module in ck.layers.items():
        pre = f"layers.{layer}.engram."
        ref = EngramV41(
            ck.hasher,
            layer,
            wkv_mode="fp8",
            wkv=(tensors[pre + "wkv.weight"], tensors[pre + "wkv.scale"]),
        )
        with torch.no_grad():
            ref.embed.weight.copy_(
                dequantize_blocks(tensors[pre + "embed.weight"], tensors[pre + "embed.scale"])
            )
            ref.q_weight.copy_(tensors[pre + "q_weight"])
            ref.k_weight.copy_(tensors[pre + "k_weight"])
        torch.testing.assert_close(
            module(h, ids[layer], mask), ref(h, ids[layer], mask), rtol=0, atol=0
        )
        saved = module.checkpoint_tensors(pre)
        for name, value in saved.items():
            assert torch.equal(value.view(torch.uint8), tensors[name].view(torch.uint8)), name


def test_train_save_and_reopen_give_the_same_layers(tmp_path) -> None:
    make_checkpoint(tmp_path / "ck")
    shutil.copytree(tmp_path / "ck", tmp_path / "work")  # training writes the tables in place
    ck = open_checkpoint(tmp_path / "work", writable=True, optimizer=SparseSGD(lr=0.5))
    h, ids, mask = inputs(ck)
    opt = torch.optim.SGD(
        [p for m in ck.layers.values() for p in m.parameters() if p.requires_grad], lr=1e-2
    )
    before = ck.layers[1].embed.table.read_raw(0, ck.layers[1].embed.table.rows).copy()
    for _ in range(3):
        loss = sum(m(h, ids[x], mask).float().square().mean() for x, m in ck.layers.items())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert not np.array_equal(before, ck.layers[1].embed.table.read_raw(0, len(before) // HEAD_DIM))
    paths = save_checkpoint(tmp_path / "out", ck)
    assert sorted(os.path.basename(p) for p in paths) == [
        "model-engram-L1.safetensors",
        "model-engram-L3.safetensors",
    ]
    again = open_checkpoint(tmp_path / "out")
    with torch.no_grad():
        for x, m in ck.layers.items():
            # wkv was trained in bf16 and saved re-quantized: reload the same rounding.
            m2 = again.layers[x]
            t, t2 = m.embed.table, m2.embed.table
            assert np.array_equal(t2.read_raw(0, t.rows), t.read_raw(0, t.rows))
            assert np.array_equal(t2.read_raw(0, t.rows, True), t.read_raw(0, t.rows, True))
            assert torch.equal(m2.q_weight, m.q_weight) and torch.equal(m2.k_weight, m.k_weight)
            assert torch.equal(m2.wkv_weight(), dequantize_blocks(*quantize_blocks(m.wkv.weight)))
    # The saved shards carry the checkpoint's names, dtypes and shapes (read by safetensors).
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model-engram-L3.safetensors"), "pt") as f:
        got = {k: (f.get_tensor(k).dtype, tuple(f.get_tensor(k).shape)) for k in f.keys()}
    rows = ck.hasher.table_rows[3]
    assert got == {
        "layers.3.engram.embed.weight": (torch.float8_e4m3fn, (rows, HEAD_DIM)),
        "layers.3.engram.embed.scale": (torch.float8_e8m0fnu, (rows, 1)),
        "layers.3.engram.wkv.weight": (torch.float8_e4m3fn, (160, 192)),
        "layers.3.engram.wkv.scale": (torch.float8_e8m0fnu, (5, 6)),
        "layers.3.engram.q_weight": (torch.bfloat16, (HC, HIDDEN)),
        "layers.3.engram.k_weight": (torch.bfloat16, (HC, HIDDEN)),
    }
    with pytest.raises(ValueError, match=r"is the checkpoint's own directory"):
        save_checkpoint(tmp_path / "work", ck)


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        ("missing", r"the checkpoint has no tensor 'layers.3.engram.q_weight'"),
        (
            "shape",
            r"tensor 'layers.1.engram.wkv.weight' \(wkv\) is F8_E4M3 \[128, 192\], expected "
            r"F8_E4M3 \[160, 192\]",
        ),
        (
            "dtype",
            r"tensor 'layers.1.engram.embed.weight' \(layer 1's table\) is BF16 .*, "
            r"expected F8_E4M3",
        ),
        (
            "scales",
            r"tensor 'layers.3.engram.embed.scale' \(layer 3's scales\) is F8_E8M0 \[\d+, 2\], "
            r"expected F8_E8M0 \[\d+, 1\]",
        ),
        (
            "rows",
            r"engram_num_embeddings says layer 1's table has \d+ rows, but the primes of this "
            r"config sum to \d+",
        ),
        ("outside", r"names the shard '../stolen.safetensors', outside the checkpoint directory"),
    ],
)
def test_bad_checkpoints_get_clear_errors(tmp_path, kind: str, match: str) -> None:
    root = tmp_path / "ck"
    if kind == "missing":
        make_checkpoint(root, drop="layers.3.engram.q_weight")
    elif kind == "shape":
        w = torch.zeros(128, 192).to(torch.float8_e4m3fn)
        make_checkpoint(root, change={"layers.1.engram.wkv.weight": w})
    elif kind == "dtype":
        t = make_checkpoint(root)
        bad = t["layers.1.engram.embed.weight"].float().to(torch.bfloat16)
        make_checkpoint(root, change={"layers.1.engram.embed.weight": bad})
    elif kind == "scales":
        t = make_checkpoint(root)
        n = t["layers.3.engram.embed.scale"].shape[0]
        make_checkpoint(
            root, change={"layers.3.engram.embed.scale": torch.ones(n, 2).to(torch.float8_e8m0fnu)}
        )
    elif kind == "rows":
        make_checkpoint(root)
        hf = json.loads((root / "config.json").read_text())
        hf["text_config"]["engram_num_embeddings"][0] += 1
        (root / "config.json").write_text(json.dumps(hf))
    else:
        make_checkpoint(root)
        index = json.loads((root / INDEX).read_text())
        shutil.copy(root / "model-00001-of-00003.safetensors", tmp_path / "stolen.safetensors")
        index["weight_map"]["layers.1.engram.q_weight"] = "../stolen.safetensors"
        (root / INDEX).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=match):
        open_checkpoint(root)


def test_a_tables_scales_are_found_by_the_checkpoints_naming(tmp_path) -> None:
    """``X.weight`` finds ``X.scale`` (V4.1's naming) as it finds ``X_scale``/``X_scale_inv``."""
    tensors = make_checkpoint(tmp_path / "ck")
    shard = tmp_path / "ck" / "model-00001-of-00003.safetensors"
    t = er.HostTable.open(shard, name="layers.1.engram.embed.weight")
    want = dequantize_blocks(
        tensors["layers.1.engram.embed.weight"], tensors["layers.1.engram.embed.scale"]
    )
    np.testing.assert_array_equal(t.gather(np.arange(t.rows)), want.numpy())


def test_the_v41_demo_runs_on_its_tiny_checkpoint(tmp_path, capsys) -> None:
    """``engram-rs v41-demo`` (in ``make demo``): a tiny checkpoint made in the real layout by
    the package itself (no safetensors package), opened, a prompt with an image span hashed,
    every layer run; image positions keep their residual only."""
    from engram_rs.cli import main
    from engram_rs.torch.v41_checkpoint import write_tiny_checkpoint

    root = write_tiny_checkpoint(tmp_path / "ck", deepseek_v4_tokenizer_json())
    ck = open_checkpoint(root)
    assert sorted(ck.layers) == [1, 3] and ck.config.hidden_size == 64
    assert main(["v41-demo", "--checkpoint", root, "--image-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert "5 blocked" in out and out.count("image 0.0000 (gate 0 there") == 2
