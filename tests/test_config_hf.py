"""EngramConfig.from_hf: DeepSeek-V4.1-Flash's HF config.json (SPEC 8.1), its spellings, and the
check of engram_num_embeddings against the primes the config derives."""

from __future__ import annotations

import json

import engram_rs as er
import pytest

V41 = {
    "engram_layer_ids": [1, 14],
    "engram_num_embeddings": [384006168, 384016682],
    "engram_max_ngram_size": 4,
    "engram_vocab_size": 16000000,
    "engram_n_heads": 8,
    "engram_head_dim": 256,
    "engram_pad_token_id": 2,
    "engram_compressed_vocab_size": 99092,
    "hidden_size": 5120,
    "hc_mult": 4,
    "rms_norm_eps": 1e-20,
}


def test_the_released_config_gives_the_preset() -> None:
    cfg = er.EngramConfig.from_hf({"architectures": ["X"], "text_config": dict(V41)})
    assert cfg.norm_eps == 1e-20
    assert cfg.replace(norm_eps=None) == er.EngramConfig.preset("deepseek-v4.1-flash")
    h = er.NgramHasher(cfg, 99092, compressed_pad_id=2)
    assert [h.table_rows[x] for x in cfg.layer_ids] == V41["engram_num_embeddings"]


def test_top_level_fields_other_spellings_and_files(tmp_path) -> None:
    small = {
        "engram_layer_ids": [1],
        "engram_max_ngram_size": 3,
        "engram_vocab_size": [1009, 2003],
        "engram_n_heads": 2,
        "engram_head_dim": 32,
        "engram_pad_id": 0,
        "dim": 64,
        "norm_eps": 1e-6,
    }
    cfg = er.EngramConfig.from_hf(small)
    assert (cfg.engram_vocab_size, cfg.hidden_size, cfg.hc_mult, cfg.norm_eps) == (
        (1009, 2003),
        64,
        1,
        1e-6,
    )
    rows = er.NgramHasher(cfg, 10, compressed_pad_id=0).table_rows[1]
    (tmp_path / "config.json").write_text(json.dumps(small | {"engram_num_embeddings": [rows]}))
    assert er.EngramConfig.from_hf(tmp_path) == cfg  # the model's directory
    assert er.EngramConfig.from_hf(tmp_path / "config.json") == cfg


def test_norm_eps_unset_leaves_to_dict_as_before() -> None:
    demo = er.EngramConfig.preset("demo")
    assert "norm_eps" not in demo.to_dict()
    assert er.EngramConfig.from_dict(demo.to_dict()) == demo
    with_eps = demo.replace(norm_eps=1e-5)
    assert er.EngramConfig.from_dict(with_eps.to_dict()) == with_eps
    with pytest.raises(ValueError, match=r"norm_eps must be a number in \[0, 1\) or None, got -1"):
        demo.replace(norm_eps=-1)


def test_bad_hf_configs(tmp_path) -> None:
    wrong = dict(V41, engram_num_embeddings=[384006168, 384016683])
    with pytest.raises(
        ValueError,
        match=r"engram_num_embeddings says layer 14's table has 384016683 rows, but the primes "
        r"of this config sum to 384016682",
    ):
        er.EngramConfig.from_hf({"text_config": wrong})
    with pytest.raises(ValueError, match=r"one table size per Engram layer \[1, 14\], got \[5\]"):
        er.EngramConfig.from_hf(dict(V41, engram_num_embeddings=[5]))
    no_heads = {k: v for k, v in V41.items() if k != "engram_n_heads"}
    with pytest.raises(ValueError, match=r"the HF config has no engram_n_heads \(looked in"):
        er.EngramConfig.from_hf(no_heads)
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"holds a JSON list, not an HF config object"):
        er.EngramConfig.from_hf(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match=r"broken.json is not valid JSON"):
        er.EngramConfig.from_hf(tmp_path / "broken.json")
