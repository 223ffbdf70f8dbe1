from __future__ import annotations

import os
import pathlib
import threading
import time

import engram_rs as er
import numpy as np
import pytest
from engram_rs.reference import reference_hash, reference_multipliers, reference_primes
from gil import assert_releases_gil
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spec_reference import spec_hash

PRESETS = ["demo", "deepseek-v4.1-flash"]


def make_hasher(golden: dict, name: str) -> er.NgramHasher:
    g = golden["presets"][name]["config"]
    return er.NgramHasher(
        er.EngramConfig.preset(name), g["compressed_vocab_size"], pad_id=g["pad_id"]
    )


@pytest.mark.parametrize("name", PRESETS)
def test_golden_tables(golden: dict, name: str) -> None:
    g = golden["presets"][name]
    h = make_hasher(golden, name)
    for layer in h.layer_ids:
        assert h.multipliers[layer].dtype == np.int64
        assert h.multipliers[layer].tolist() == g["multipliers"][str(layer)]
        assert h.primes[layer] == g["primes"][str(layer)]
        assert h.table_rows[layer] == g["table_rows"][str(layer)]
        flat_primes = [p for order in h.primes[layer] for p in order]
        assert h.offsets[layer].dtype == np.int64
        assert (
            h.offsets[layer].tolist() == np.concatenate([[0], np.cumsum(flat_primes)[:-1]]).tolist()
        )


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("dtype", [np.int64, np.int32])
def test_golden_ids(golden: dict, name: str, dtype: type) -> None:
    h = make_hasher(golden, name)
    for case in golden["presets"][name]["cases"]:
        ids = np.array(case["input"], dtype=np.int64)
        out = h.hash(ids, dtype=dtype)
        flat = h.hash(ids, dtype=dtype, flat=True)
        assert sorted(out) == sorted(int(k) for k in case["expected"])
        for layer, expected in case["expected"].items():
            layer = int(layer)
            expected = np.array(expected, dtype=np.int64)
            assert out[layer].dtype == dtype
            assert out[layer].shape == expected.shape
            np.testing.assert_array_equal(out[layer], expected)
            np.testing.assert_array_equal(flat[layer], expected + h.offsets[layer])
        one_d = h.hash(ids[0], dtype=dtype)
        for layer, expected in case["expected"].items():
            np.testing.assert_array_equal(one_d[int(layer)], np.array(expected)[0])


@pytest.mark.parametrize("name", PRESETS)
def test_numpy_reference_matches_golden(golden: dict, name: str) -> None:
    g = golden["presets"][name]
    cfg = er.EngramConfig.preset(name)
    vocab = g["config"]["compressed_vocab_size"]
    assert reference_primes(cfg) == {int(k): v for k, v in g["primes"].items()}
    mult = reference_multipliers(cfg, vocab)
    assert {k: v.tolist() for k, v in mult.items()} == {
        int(k): v for k, v in g["multipliers"].items()
    }
    for case in g["cases"]:
        out = reference_hash(np.array(case["input"]), cfg, vocab)
        for layer, expected in case["expected"].items():
            np.testing.assert_array_equal(out[int(layer)], np.array(expected))


@st.composite
def hashing_cases(draw: st.DrawFn) -> tuple[er.EngramConfig, int, int, np.ndarray]:
    n = draw(st.integers(2, 5))
    h = draw(st.sampled_from([1, 2, 3, 8, 16]))
    sizes = draw(
        st.lists(
            st.sampled_from([1, 2, 7, 100, 9000, 646400, 16_000_000]),
            min_size=n - 1,
            max_size=n - 1,
        )
    )
    layers = draw(st.lists(st.integers(0, 60), min_size=1, max_size=3, unique=True))
    cfg = er.EngramConfig(
        engram_vocab_size=sizes,
        max_ngram_size=n,
        n_embed_per_ngram=h * 4,
        n_head_per_ngram=h,
        layer_ids=layers,
        pad_id=0,
        seed=draw(st.integers(0, 2**32)),
    )
    vocab = draw(st.sampled_from([1, 2, 50, 98627, 99092, 2**31, 2**40]))
    pad = draw(st.integers(0, vocab - 1))
    b = draw(st.integers(1, 4))
    t = draw(st.integers(0, 40))
    if draw(st.booleans()):
        ids = np.full((b, t), pad, dtype=np.int64)  # pad-only rows
    else:
        ids = np.array(
            draw(st.lists(st.integers(0, vocab - 1), min_size=b * t, max_size=b * t)),
            dtype=np.int64,
        ).reshape(b, t)
    return cfg, vocab, pad, ids


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hashing_cases())
def test_matches_both_references(case: tuple[er.EngramConfig, int, int, np.ndarray]) -> None:
    cfg, vocab, pad, ids = case
    h = er.NgramHasher(cfg, vocab, pad_id=pad)
    out = h.hash(ids)
    ref = reference_hash(ids, cfg, vocab, pad)
    for layer in cfg.layer_ids:
        flat_primes = [p for order in h.primes[layer] for p in order]
        expected = spec_hash(ids.tolist(), h.multipliers[layer].tolist(), h.primes[layer], pad)
        expected = np.array(expected, dtype=np.int64).reshape(out[layer].shape)
        np.testing.assert_array_equal(out[layer], expected)
        np.testing.assert_array_equal(ref[layer], expected)
        if max(flat_primes) <= 2**31:
            np.testing.assert_array_equal(h.hash(ids, dtype=np.int32)[layer], expected)
    for small in (np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.uint64):
        if vocab <= np.iinfo(small).max + 1:
            cast = h.hash(ids.astype(small))
            for layer in cfg.layer_ids:
                np.testing.assert_array_equal(cast[layer], out[layer])


def test_layer_subset_and_noncontiguous_input(golden: dict) -> None:
    h = make_hasher(golden, "demo")
    ids = np.random.default_rng(0).integers(0, 98627, size=(3, 64))
    full = h.hash(ids)
    only = h.hash(ids, layer_ids=[15])
    assert list(only) == [15]
    np.testing.assert_array_equal(only[15], full[15])
    strided = np.asfortranarray(ids)
    np.testing.assert_array_equal(h.hash(strided)[1], full[1])
    np.testing.assert_array_equal(
        h.hash(ids[:, ::2])[1], h.hash(np.ascontiguousarray(ids[:, ::2]))[1]
    )
    assert h.hash(ids.tolist())[1].shape == (3, 64, 16)


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 70), min_size=0, max_size=6),
    name=st.sampled_from(PRESETS),
    seed=st.integers(0, 1000),
)
def test_ragged_equals_per_sequence(golden: dict, lengths: list[int], name: str, seed: int) -> None:
    h = make_hasher(golden, name)
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(0, h.compressed_vocab_size, size=n) for n in lengths]
    ids = np.concatenate(seqs) if seqs else np.zeros(0, dtype=np.int64)
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    out = h.hash_ragged(ids, cu, flat=True)
    for layer in h.layer_ids:
        assert out[layer].shape == (ids.size, h.cols)
        parts = [h.hash(s, flat=True)[layer] for s in seqs]
        expected = np.concatenate(parts) if parts else np.zeros((0, h.cols), dtype=np.int64)
        np.testing.assert_array_equal(out[layer], expected)


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 300), min_size=1, max_size=5),
    name=st.sampled_from(PRESETS),
    seed=st.integers(0, 1000),
    dtype=st.sampled_from([np.int64, np.int32]),
)
def test_public_scalar_path_equals_the_fast_path(
    golden: dict, lengths: list[int], name: str, seed: int, dtype: type
) -> None:
    """``scalar=True`` (the reference kernel the benchmarks time) gives the same ids, batched,
    ragged and from raw ids."""
    h = make_hasher(golden, name)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, h.compressed_vocab_size, size=sum(lengths))
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    for kw in ({"cu_seqlens": cu}, {}):
        fast = h.hash(ids, dtype=dtype, flat=True, **kw)
        slow = h.hash(ids, dtype=dtype, flat=True, scalar=True, **kw)
        for layer in h.layer_ids:
            np.testing.assert_array_equal(slow[layer], fast[layer])


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 4),
    steps=st.lists(st.integers(0, 9), min_size=1, max_size=6),
    name=st.sampled_from(PRESETS),
    seed=st.integers(0, 1000),
    dtype=st.sampled_from([np.int64, np.int32]),
)
def test_step_equals_whole_sequence(
    golden: dict, batch: int, steps: list[int], name: str, seed: int, dtype: type
) -> None:
    h = make_hasher(golden, name)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, h.compressed_vocab_size, size=(batch, sum(steps)))
    whole = h.hash(ids, dtype=dtype)
    state = h.new_state(batch)
    got = {layer: [] for layer in h.layer_ids}
    start = 0
    for k in steps:
        chunk = ids[:, start : start + k]
        out = h.hash_step(chunk, state, dtype=dtype)
        for layer in h.layer_ids:
            assert out[layer].shape == (batch, k, h.cols)
            got[layer].append(out[layer])
        start += k
    for layer in h.layer_ids:
        np.testing.assert_array_equal(np.concatenate(got[layer], axis=1), whole[layer])


def test_step_one_token_per_sequence_and_reset(golden: dict) -> None:
    h = make_hasher(golden, "deepseek-v4.1-flash")
    ids = np.random.default_rng(1).integers(0, h.compressed_vocab_size, size=(3, 5))
    whole = h.hash(ids)
    state = h.new_state(3)
    for t in range(5):
        out = h.hash_step(ids[:, t], state)
        assert out[1].shape == (3, h.cols)
        np.testing.assert_array_equal(out[1], whole[1][:, t])
    state.reset([1])
    restarted = h.hash_step(ids[:, :2], state)
    np.testing.assert_array_equal(restarted[14][1], whole[14][1, :2])
    state.reset()
    assert (state.history == h.pad_id).all()


def test_empty_inputs(golden: dict) -> None:
    h = make_hasher(golden, "demo")
    assert h.hash(np.zeros((0, 5), dtype=np.int64))[1].shape == (0, 5, 16)
    assert h.hash(np.zeros((2, 0), dtype=np.int64))[1].shape == (2, 0, 16)
    assert h.hash_ragged(np.zeros(0, dtype=np.int64), [0])[1].shape == (0, 16)
    assert h.hash_step(np.zeros((0, 1), dtype=np.int64), h.new_state(0))[1].shape == (0, 1, 16)


# ---- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "exc", "message"),
    [
        (
            {"engram_vocab_size": [10]},
            ValueError,
            "invalid config: engram_vocab_size = [10]: needs max_ngram_size - 1 = 2 entries",
        ),
        (
            {"max_ngram_size": 1, "engram_vocab_size": []},
            ValueError,
            "invalid config: max_ngram_size = 1: must be at least 2",
        ),
        (
            {"n_head_per_ngram": 0},
            ValueError,
            "invalid config: n_head_per_ngram = 0: must be at least 1",
        ),
        (
            {"engram_vocab_size": [10, 0]},
            ValueError,
            "engram_vocab_size = [10, 0]: entry 1 (n-gram order 3) must be at least 1",
        ),
        ({"engram_vocab_size": [10, -5]}, ValueError, "engram_vocab_size[1] must be >= 0, got -5"),
        ({"n_embed_per_ngram": 0}, ValueError, "n_embed_per_ngram must be >= 1, got 0"),
        (
            {"n_embed_per_ngram": 100},
            ValueError,
            "n_embed_per_ngram (100) must be a multiple of n_head_per_ngram (8)",
        ),
        (
            {"layer_ids": [1, 1]},
            ValueError,
            "invalid config: layer_ids = [1, 1]: must be distinct (1 repeats)",
        ),
        ({"layer_ids": [1, -2]}, ValueError, "layer_ids[1] must be >= 0, got -2"),
        (
            {"layer_ids": []},
            ValueError,
            "invalid config: layer_ids = []: must name at least one layer",
        ),
        ({"pad_id": -1}, ValueError, "pad_id must be >= 0, got -1"),
        ({"seed": -1}, ValueError, "seed must be >= 0, got -1"),
        ({"kernel_size": 0}, ValueError, "kernel_size must be >= 1, got 0"),
        ({"max_ngram_size": 3.0}, TypeError, "max_ngram_size must be an int, got 3.0"),
        ({"pad_id": True}, TypeError, "pad_id must be an int, got True"),
    ],
)
def test_config_rejects(kwargs: dict, exc: type, message: str) -> None:
    with pytest.raises(exc) as info:
        er.EngramConfig(**kwargs)
    assert message in str(info.value)


def test_config_round_trip_and_files(tmp_path) -> None:
    for name in PRESETS:
        cfg = er.EngramConfig.preset(name)
        assert er.EngramConfig.from_dict(cfg.to_dict()) == cfg
        cfg.to_json(tmp_path / f"{name}.json")
        assert er.EngramConfig.from_json(tmp_path / f"{name}.json") == cfg
    with pytest.raises(
        ValueError, match=r"unknown preset 'v3': choose one of demo, deepseek-v4.1-flash"
    ):
        er.EngramConfig.preset("v3")
    bad = tmp_path / "bad.json"
    bad.write_text('{"max_ngram_size": 3, "n_grams": 2, "zeta": 1}')
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['n_grams', 'zeta'\]"):
        er.EngramConfig.from_json(bad)
    bad.write_text('{"max_ngram_size": 3,')
    with pytest.raises(ValueError, match="is not valid JSON"):
        er.EngramConfig.from_json(bad)
    with pytest.raises(FileNotFoundError):
        er.EngramConfig.from_json(tmp_path / "missing.json")


def test_hasher_rejects_bad_vocab_and_pad() -> None:
    cfg = er.EngramConfig.preset("demo")
    with pytest.raises(ValueError, match=r"compressed_vocab_size must be in \[1, 2\*\*63\), got 0"):
        er.NgramHasher(cfg, 0)
    with pytest.raises(ValueError, match=r"pad_id = 5: outside the compressed vocabulary \[0, 5\)"):
        er.NgramHasher(cfg, 5, pad_id=5)
    with pytest.raises(ValueError, match=r"pad_id = 2: outside the compressed vocabulary \[0, 2\)"):
        er.NgramHasher(cfg, 2, compressed_pad_id=2)
    with pytest.raises(TypeError, match="compressed_vocab_size must be an int"):
        er.NgramHasher(cfg, 98627.0)  # type: ignore[arg-type]


def test_ids_out_of_range_name_value_and_position(golden: dict) -> None:
    h = make_hasher(golden, "demo")
    ids = np.full((3, 5000), 7, dtype=np.int64)
    ids[1, 4321] = 98627
    ids[2, 2] = -4
    with pytest.raises(
        IndexError, match=r"id 98627 at position \(1, 4321\) is out of range \[0, 98627\)"
    ):
        h.hash(ids)
    with pytest.raises(IndexError, match=r"id -1 at position \(2,\) is out of range"):
        h.hash(np.array([0, 1, -1]))
    with pytest.raises(IndexError, match=r"id 18446744073709551615 at position \(0,\)"):
        h.hash(np.array([2**64 - 1], dtype=np.uint64))
    with pytest.raises(IndexError, match=r"id 100000 at position \(1,\)"):
        h.hash_ragged(np.array([1, 100000, 3]), [0, 1, 3])
    state = h.new_state(2)
    with pytest.raises(IndexError, match=r"id 99999 at position \(1, 0\)"):
        h.hash_step(np.array([[5], [99999]]), state)
    assert (state.history == 2).all(), "a failed step must leave the state untouched"


@pytest.mark.parametrize("bad", [np.array([1.0, 2.0]), np.array([True, False]), np.array(["a"])])
def test_non_integer_ids_are_type_errors(golden: dict, bad: np.ndarray) -> None:
    h = make_hasher(golden, "demo")
    with pytest.raises(TypeError, match=f"ids must be integers, got dtype {bad.dtype}"):
        h.hash(bad)


def test_bad_shapes_dtypes_and_arguments(golden: dict) -> None:
    h = make_hasher(golden, "demo")
    with pytest.raises(
        ValueError, match=r"ids must be 1-D \[T\] or 2-D \[B, T\], got shape \(1, 2, 3\)"
    ):
        h.hash(np.zeros((1, 2, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="dtype must be numpy.int64 or numpy.int32, got float32"):
        h.hash(np.zeros((1, 2), dtype=np.int64), dtype=np.float32)
    with pytest.raises(
        ValueError, match=r"layer_ids \[3\] are not Engram layers of this config \[1, 15\]"
    ):
        h.hash(np.zeros((1, 2), dtype=np.int64), layer_ids=[3])
    big = er.NgramHasher(
        er.EngramConfig(engram_vocab_size=[2**28, 2**28], n_head_per_ngram=8),
        100,
        compressed_pad_id=2,
    )
    with pytest.raises(
        ValueError, match=r"layer 1 has ids up to \d+, which do not fit int32 with flat=True: use"
    ):
        big.hash(np.zeros((1, 2), dtype=np.int64), dtype=np.int32, flat=True)
    assert big.hash(np.zeros((1, 2), dtype=np.int64), dtype=np.int32)[1].dtype == np.int32


def test_bad_ragged_and_state(golden: dict) -> None:
    h = make_hasher(golden, "demo")
    ids = np.arange(6)
    with pytest.raises(
        ValueError, match=r"cu_seqlens must start at 0 and end at len\(ids\) = 6, got 0 .. 5"
    ):
        h.hash_ragged(ids, [0, 2, 5])
    with pytest.raises(
        ValueError,
        match=r"cu_seqlens must be non-decreasing: cu_seqlens\[1\] = 4 > cu_seqlens\[2\] = 3",
    ):
        h.hash_ragged(ids, [0, 4, 3, 6])
    with pytest.raises(ValueError, match="cu_seqlens must be a 1-D integer array"):
        h.hash_ragged(ids, [0.0, 6.0])
    with pytest.raises(ValueError, match=r"ids must be 1-D \(the concatenated sequences\)"):
        h.hash_ragged(ids.reshape(2, 3), [0, 6])
    state = h.new_state(2)
    with pytest.raises(
        ValueError,
        match=r"new_ids must be \[B, k\] or \[B\] with B = state.batch_size = 2, "
        r"got shape \(3, 1\)",
    ):
        h.hash_step(np.zeros((3, 1), dtype=np.int64), state)
    other = make_hasher(golden, "deepseek-v4.1-flash").new_state(2)
    with pytest.raises(ValueError, match="state holds 3 ids per sequence but this hasher needs 2"):
        h.hash_step(np.zeros((2, 1), dtype=np.int64), other)
    with pytest.raises(TypeError, match="state must come from new_state"):
        h.hash_step(np.zeros((2, 1), dtype=np.int64), object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size must be a non-negative int, got -1"):
        h.new_state(-1)


def test_gil_is_released_while_hashing(golden: dict) -> None:
    """The main thread keeps running while another hashes; two hashing threads overlap."""
    h = make_hasher(golden, "demo")
    ids = np.random.default_rng(0).integers(0, h.compressed_vocab_size, size=(64, 16384))
    # A call of a few hundred ms (8-grams, one head: much work per output byte), far longer
    # than the scheduler slices a loaded 2-core machine gives the main thread.
    cfg = er.EngramConfig(
        max_ngram_size=8, engram_vocab_size=[646400] * 7, n_head_per_ngram=1, n_embed_per_ngram=8
    )
    long = er.NgramHasher(cfg, h.compressed_vocab_size, compressed_pad_id=2)
    many = np.random.default_rng(1).integers(0, h.compressed_vocab_size, size=(512, 16384))
    assert_releases_gil(lambda: long.hash(many, layer_ids=[1], dtype=np.int32))
    er.clear_buffer_pool()
    for _ in range(4):
        inside = threading.Barrier(2, timeout=60)
        intervals: list[tuple[float, float]] = []

        def work(inside: threading.Barrier, intervals: list[tuple[float, float]]) -> None:
            inside.wait()
            start = time.perf_counter()
            h.hash(ids, layer_ids=[1], dtype=np.int32)
            intervals.append((start, time.perf_counter()))

        threads = [threading.Thread(target=work, args=(inside, intervals)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        (a0, a1), (b0, b1) = intervals
        if a0 < b1 and b0 < a1:
            return
    raise AssertionError(f"the two threads' calls never overlapped: {intervals}")


def test_outputs_recycle_pooled_buffers(golden: dict) -> None:
    h = make_hasher(golden, "demo")
    ids = np.random.default_rng(0).integers(0, h.compressed_vocab_size, size=(8, 4096))
    er.clear_buffer_pool()
    first = h.hash(ids)
    kept = first[1].copy()
    address = first[1].ctypes.data
    assert address % 64 == 0, "outputs are 64-byte aligned"
    view = first[1][2:4]
    del first
    second = h.hash(ids)
    assert second[1].ctypes.data != address, "a live view keeps its buffer out of the pool"
    np.testing.assert_array_equal(view, kept[2:4])
    del view, second
    third = h.hash(ids)
    np.testing.assert_array_equal(third[1], kept)
    assert er.clear_buffer_pool() > 0


def test_the_fast_paths_are_what_the_tests_exercise() -> None:
    """`make test` runs the suite twice: once as is, where the AVX-512 kernels must really run
    (else every "fast equals scalar" comparison would pass trivially), and once with
    ENGRAM_RS_FORCE_SCALAR=1, where the scalar paths alone must meet the golden vectors."""
    if os.environ.get("ENGRAM_RS_FORCE_SCALAR", "") not in ("", "0"):
        assert not er.simd_available()
        return
    flags = pathlib.Path("/proc/cpuinfo").read_text() if os.path.exists("/proc/cpuinfo") else ""
    needed = ("avx512f", "avx512dq", "avx512bw", "avx512vl")
    if not all(f" {flag}" in flags for flag in needed):
        pytest.skip(f"this CPU lacks one of {needed}: only the scalar paths can run here")
    assert er.simd_available()


def _numpy_multipliers(seed: int, layer: int, n: int, vocab: int) -> list[int]:
    bound = max(1, (2**63 - 1) // vocab // 2)
    rng = np.random.default_rng(seed + 10007 * layer)
    return (rng.integers(0, bound, size=n, dtype=np.int64) * 2 + 1).tolist()


# Vocabularies whose draw bound is 1, 2, just below / at / above 2**32 (numpy switches from 64-bit
# to 32-bit Lemire draws there, and wraps at exactly 2**32 - 1), and the presets'.
EDGE_VOCABS = [
    2**62,
    2**61,
    (2**63 - 1) // (2 * (2**32 - 1)),
    (2**63 - 1) // (2 * 2**32),
    (2**63 - 1) // (2 * 2**32) + 1,
    (2**63 - 1) // (2 * (2**32 + 1)),
    98627,
    99092,
    1,
    3,
]


@settings(max_examples=300, deadline=None)
@given(
    seed=st.integers(0, 2**40) | st.sampled_from([0, 1, 2**32 - 1, 2**32, 2**62]),
    layer=st.integers(0, 100),
    n=st.integers(2, 12),
    vocab=st.sampled_from(EDGE_VOCABS) | st.integers(1, 2**63 - 1) | st.integers(1, 2**40),
)
def test_multipliers_are_numpys_draws(seed: int, layer: int, n: int, vocab: int) -> None:
    """The core draws the multipliers itself (numpy's SeedSequence, PCG64 and bounded draws
    reimplemented in Rust): numpy is the independent reference."""
    from engram_rs import _engram_rs

    if seed + 10007 * layer >= 2**63:
        return
    assert _engram_rs.layer_multipliers(seed, layer, n, vocab) == _numpy_multipliers(
        seed, layer, n, vocab
    )


def test_config_is_frozen_hashable_and_replaceable() -> None:
    cfg = er.EngramConfig.preset("demo")
    assert cfg.layer_ids == (1, 15) and cfg.engram_vocab_size == (646400, 646400)
    with pytest.raises(AttributeError):
        cfg.layer_ids.append(3)  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        cfg.seed = 3  # type: ignore[misc]
    assert (
        len({cfg, er.EngramConfig.preset("demo"), er.EngramConfig.preset("deepseek-v4.1-flash")})
        == 2
    )
    assert (cfg.head_dim, cfg.cols) == (64, 16)
    flash = er.EngramConfig.preset("deepseek-v4.1-flash")
    assert (flash.head_dim, flash.cols) == (256, 24)
    small = cfg.replace(engram_vocab_size=[1009, 1009], layer_ids=[1])
    assert small.engram_vocab_size == (1009, 1009) and small.layer_ids == (1,)
    assert er.NgramHasher(small, 100, compressed_pad_id=2).table_rows[1] < 20_000
    with pytest.raises(ValueError, match=r"layer_ids = \[2, 2\]: must be distinct"):
        cfg.replace(layer_ids=[2, 2])
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['heads'\]"):
        cfg.replace(heads=3)
    assert cfg.to_dict()["layer_ids"] == [1, 15]


@pytest.mark.parametrize("raw", [False, True])
def test_lists_of_sequences_of_any_length(raw: bool) -> None:
    """pack_sequences + cu_seqlens hash token lists of different lengths, compressed or raw,
    equal to hashing each list alone; right padding does not change the real tokens' ids."""
    comp = er.CompressedTokenizer(np.arange(3000) % 1000, 1000, "x")
    h = er.NgramHasher.from_tokenizer(er.EngramConfig.preset("demo"), comp)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 3000 if raw else 1000, size=n).tolist() for n in (5, 0, 1, 40, 2)]
    ids, cu = er.pack_sequences(seqs)
    assert cu.tolist() == [0, 5, 5, 6, 46, 48]
    run = h.hash_tokens if raw else h.hash
    whole = run(ids, cu_seqlens=cu)[15]
    for seq, part in zip(seqs, np.split(whole, cu[1:-1]), strict=True):
        np.testing.assert_array_equal(part, run(np.array(seq, dtype=np.int64))[15])
    padded = np.full((len(seqs), 40), 1, dtype=np.int64)
    for i, seq in enumerate(seqs):
        padded[i, : len(seq)] = seq
    batch = run(padded)[15]
    for i, part in enumerate(np.split(whole, cu[1:-1])):
        np.testing.assert_array_equal(batch[i, : len(part)], part)
    with pytest.raises(TypeError, match="sequence 1 holds float64 values"):
        er.pack_sequences([[1, 2], [1.5]])


def test_hasher_introspection_is_read_only() -> None:
    h = er.NgramHasher(er.EngramConfig.preset("demo"), 98627, compressed_pad_id=2)
    with pytest.raises(ValueError, match="read-only"):
        h.multipliers[1][0] = 5
    with pytest.raises(ValueError, match="read-only"):
        h.offsets[1][0] = 5
    h.primes[1][0][0] = 7  # a copy: the hasher is unchanged
    assert h.primes[1][0][0] == 646403
    assert h.cols == 16 and h.table_rows[1] == 10_344_164
