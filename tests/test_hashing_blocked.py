"""Blocked positions in hashing (SPEC 8.3, the DEAD rule of DeepSeek-V4.1-Flash) against a
literal Python-int transcription of the rule, on every entry point: batches, cu_seqlens, decode
steps, raw ids with ``dead_id``; the SIMD path against the scalar one; no blocked position gives
today's ids."""

from __future__ import annotations

import engram_rs as er
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from spec_reference import spec_hash_blocked

PRESETS = ["demo", "deepseek-v4.1-flash"]


def make_hasher(golden: dict, name: str) -> er.NgramHasher:
    g = golden["presets"][name]["config"]
    return er.NgramHasher(
        er.EngramConfig.preset(name), g["compressed_vocab_size"], pad_id=g["pad_id"]
    )


def expected(h: er.NgramHasher, ids: np.ndarray, mask: np.ndarray, layer: int) -> np.ndarray:
    primes = [list(map(int, order)) for order in h.primes[layer]]
    out = spec_hash_blocked(
        ids.tolist(), mask.tolist(), [int(m) for m in h.multipliers[layer]], primes, h.pad_id
    )
    return np.asarray(out, dtype=np.int64).reshape(*ids.shape, h.cols)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 3),
    length=st.integers(0, 40),
    density=st.sampled_from([0.0, 0.05, 0.3, 1.0]),
    name=st.sampled_from(PRESETS),
    seed=st.integers(0, 10_000),
)
def test_batches_follow_the_rule_on_both_paths(
    golden: dict, batch: int, length: int, density: float, name: str, seed: int
) -> None:
    h = make_hasher(golden, name)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, h.compressed_vocab_size, size=(batch, length))
    mask = rng.random((batch, length)) < density
    if length and seed % 3 == 0:
        mask[:, 0] = True  # the first position blocked
    fast = h.hash(ids, blocked=mask)
    slow = h.hash(ids, blocked=mask, scalar=True)
    for layer in h.layer_ids:
        want = expected(h, ids, mask, layer)
        np.testing.assert_array_equal(fast[layer], want)
        np.testing.assert_array_equal(slow[layer], want)
    int32 = h.hash(ids, blocked=mask, dtype=np.int32, flat=True)
    for layer in h.layer_ids:
        offsets = np.asarray(h.offsets[layer])
        np.testing.assert_array_equal(int32[layer], fast[layer] + offsets)


def test_no_blocked_position_gives_todays_ids(golden: dict) -> None:
    for name in PRESETS:
        h = make_hasher(golden, name)
        ids = np.random.default_rng(0).integers(0, h.compressed_vocab_size, size=(3, 50))
        plain = h.hash(ids)
        none = h.hash(ids, blocked=np.zeros(ids.shape, bool))
        for layer in h.layer_ids:
            assert none[layer].tobytes() == plain[layer].tobytes()


def test_a_blocked_position_hashes_as_all_pad_and_restarts_what_follows(golden: dict) -> None:
    h = make_hasher(golden, "deepseek-v4.1-flash")
    ids = np.random.default_rng(2).integers(0, h.compressed_vocab_size, size=(1, 12))
    mask = np.zeros(ids.shape, bool)
    mask[0, 5] = True
    out = h.hash(ids, blocked=mask)
    pad_only = h.hash(np.array([[h.pad_id]]))
    fresh = h.hash(ids[:, 6:])
    before = h.hash(ids[:, :5])
    for layer in h.layer_ids:
        np.testing.assert_array_equal(out[layer][0, 5], pad_only[layer][0, 0])
        np.testing.assert_array_equal(out[layer][:, 6:], fresh[layer])
        np.testing.assert_array_equal(out[layer][:, :5], before[layer])


@settings(max_examples=30, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 25), min_size=1, max_size=5),
    seed=st.integers(0, 10_000),
)
def test_cu_seqlens_with_blocked_positions(golden: dict, lengths: list[int], seed: int) -> None:
    h = make_hasher(golden, "deepseek-v4.1-flash")
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(0, h.compressed_vocab_size, size=n) for n in lengths]
    masks = [rng.random(n) < 0.2 for n in lengths]
    ids, cu = er.pack_sequences(seqs)
    mask = np.concatenate(masks) if masks else np.zeros(0, bool)
    out = h.hash(ids, cu_seqlens=cu, blocked=mask)
    for layer in h.layer_ids:
        parts = [expected(h, s[None], m[None], layer)[0] for s, m in zip(seqs, masks, strict=True)]
        np.testing.assert_array_equal(out[layer], np.concatenate(parts))


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 3),
    steps=st.lists(st.integers(0, 7), min_size=1, max_size=6),
    name=st.sampled_from(PRESETS),
    seed=st.integers(0, 10_000),
)
def test_decode_in_pieces_equals_the_whole_sequence(
    golden: dict, batch: int, steps: list[int], name: str, seed: int
) -> None:
    """Blocked positions anywhere: at the first position, at a piece's first or last token."""
    h = make_hasher(golden, name)
    rng = np.random.default_rng(seed)
    total = sum(steps)
    ids = rng.integers(0, h.compressed_vocab_size, size=(batch, total))
    mask = rng.random((batch, total)) < 0.25
    whole = h.hash(ids, blocked=mask)
    state = h.new_state(batch)
    got: dict[int, list[np.ndarray]] = {layer: [] for layer in h.layer_ids}
    start = 0
    for k in steps:
        out = h.hash_step(ids[:, start : start + k], state, blocked=mask[:, start : start + k])
        for layer in h.layer_ids:
            got[layer].append(out[layer])
        start += k
    for layer in h.layer_ids:
        np.testing.assert_array_equal(np.concatenate(got[layer], axis=1), whole[layer])
    # One token at a time ([B] ids and a [B] mask), the same.
    state = h.new_state(batch)
    for t in range(total):
        out = h.hash_step(ids[:, t], state, blocked=mask[:, t])
        for layer in h.layer_ids:
            np.testing.assert_array_equal(out[layer], whole[layer][:, t])


def test_the_state_after_a_blocked_token_is_pad(golden: dict) -> None:
    h = make_hasher(golden, "deepseek-v4.1-flash")
    state = h.new_state(2)
    h.hash_step(np.array([[5, 6, 7], [8, 9, 10]]), state)
    h.hash_step(np.array([11, 12]), state, blocked=np.array([True, False]))
    assert state.history[0].tolist() == [h.pad_id] * 3
    assert state.history[1].tolist() == [9, 10, 12]


def test_raw_ids_with_a_dead_id(tmp_path) -> None:
    from engram_rs.bench import deepseek_v4_tokenizer_json

    comp = er.CompressedTokenizer.from_file(deepseek_v4_tokenizer_json())
    h = er.NgramHasher.from_tokenizer(er.EngramConfig.preset("deepseek-v4.1-flash"), comp)
    rng = np.random.default_rng(4)
    dead = 128_000
    raw = rng.integers(0, 100_000, size=(2, 30))
    raw[0, 3:9] = dead  # an image span
    raw[1, 0] = dead
    out = h.hash_tokens(raw, dead_id=dead)
    want = h.hash(comp(raw), blocked=raw == dead)
    extra = np.zeros(raw.shape, bool)
    extra[1, 20] = True
    both = h.hash_tokens(raw, dead_id=dead, blocked=extra)
    want_both = h.hash(comp(raw), blocked=(raw == dead) | extra)
    for layer in h.layer_ids:
        np.testing.assert_array_equal(out[layer], want[layer])
        np.testing.assert_array_equal(both[layer], want_both[layer])
    state = h.new_state(2)
    parts = [h.hash_tokens_step(raw[:, t], state, dead_id=dead) for t in range(30)]
    for layer in h.layer_ids:
        np.testing.assert_array_equal(np.stack([p[layer] for p in parts], axis=1), out[layer])


def test_bad_masks_and_dead_ids(golden: dict) -> None:
    h = make_hasher(golden, "demo")
    ids = np.zeros((2, 4), np.int64)
    with pytest.raises(TypeError, match=r"blocked must be a bool mask .* got a int64 array"):
        h.hash(ids, blocked=np.zeros((2, 4), np.int64))
    with pytest.raises(
        ValueError, match=r"blocked must have the ids' shape \(2, 4\), got \(2, 3\)"
    ):
        h.hash(ids, blocked=np.zeros((2, 3), bool))
    with pytest.raises(ValueError, match=r"blocked must have the ids' shape \(2, 4\)"):
        h.hash_step(ids, h.new_state(2), blocked=np.zeros(4, bool))
    state = h.new_state(2)
    with pytest.raises(TypeError, match=r"blocked must be a bool mask"):
        h.hash_step(ids, state, blocked=[[0, 1, 0, 0], [0, 0, 0, 0]])
    assert state.history.tolist() == [[h.pad_id] * 2] * 2  # a refused step leaves the state


def test_loaders_take_a_dead_id() -> None:
    import pickle

    from engram_rs.bench import deepseek_v4_tokenizer_json
    from engram_rs.loader import HashCollate, HashedTokens

    comp = er.CompressedTokenizer.from_file(deepseek_v4_tokenizer_json())
    h = er.NgramHasher.from_tokenizer(er.EngramConfig.preset("deepseek-v4.1-flash"), comp)
    rng = np.random.default_rng(5)
    dead = 128_000
    samples = [rng.integers(0, 100_000, size=n) for n in (12, 7, 20)]
    samples[0][2:5] = dead
    samples[2][0] = dead
    batch = HashCollate(h, dtype="int64", return_tensors="np", dead_id=dead)(samples)
    items = list(pickle.loads(pickle.dumps(HashedTokens(samples, h, dtype="int64", dead_id=dead))))
    for b, s in enumerate(samples):
        want = h.hash_tokens(s, dead_id=dead)
        for layer in h.layer_ids:
            np.testing.assert_array_equal(batch["hash_ids"][layer][b, : len(s)], want[layer])
            np.testing.assert_array_equal(items[b][1][layer], want[layer])
    plain = h.hash_tokens(samples[0])
    assert not np.array_equal(plain[h.layer_ids[0]], items[0][1][h.layer_ids[0]])


def test_precompute_takes_a_dead_id_and_verify_rehashes_with_it(tmp_path, capsys) -> None:
    from engram_rs.bench import deepseek_v4_tokenizer_json
    from engram_rs.cli import main
    from engram_rs.offline import PrecomputedIndices, verify

    tok = deepseek_v4_tokenizer_json()
    comp = er.CompressedTokenizer.from_file(tok)
    h = er.NgramHasher.from_tokenizer(er.EngramConfig.preset("demo"), comp)
    rng = np.random.default_rng(6)
    dead = 128_000
    stream = rng.integers(0, 100_000, 3000).astype(np.uint32)
    stream[[0, 100, 101, 102, 999, 1000, 2999]] = dead
    stream.tofile(tmp_path / "in.bin")
    args = ["precompute", str(tmp_path / "in.bin"), "--out", str(tmp_path / "out")]
    args += ["--tokenizer", tok]
    assert main([*args, "--seq-len", "500", "--dead-id", str(dead), "--chunk-tokens", "64"]) == 0
    idx = PrecomputedIndices(tmp_path / "out")
    assert idx.manifest["boundary"]["dead_id"] == dead
    for i in range(idx.num_sequences):
        toks, stored = idx.sequence(i)
        want = h.hash_tokens(toks, dtype=np.int32, dead_id=dead)
        for layer in h.layer_ids:
            np.testing.assert_array_equal(stored[layer], want[layer])
    assert verify(tmp_path / "out", sample=idx.num_sequences)["rehashed_sequences"] == 6
    assert main([*args, "--seq-len", "500", "--dead-id", "-1", "--overwrite"]) == 1
    assert "dead_id must be a raw token id (an int >= 0), got -1" in capsys.readouterr().err
