"""pytest-benchmark view of hashing: engram_rs and the numpy reference on the same batch."""

from __future__ import annotations

import engram_rs as er
import numpy as np
import pytest
from engram_rs.bench import PRESET_VOCAB
from engram_rs.reference import reference_hash


@pytest.fixture(scope="module", params=list(PRESET_VOCAB))
def case(request: pytest.FixtureRequest) -> tuple[er.NgramHasher, np.ndarray]:
    cfg = er.EngramConfig.preset(request.param)
    h = er.NgramHasher(cfg, PRESET_VOCAB[request.param], compressed_pad_id=cfg.pad_id)
    ids = np.random.default_rng(0).integers(0, h.compressed_vocab_size, size=(16, 8192))
    return h, ids


@pytest.mark.benchmark(group="hash")
@pytest.mark.parametrize("dtype", [np.int64, np.int32])
def test_engram_rs(benchmark, case, dtype) -> None:
    h, ids = case
    benchmark(h.hash, ids, dtype=dtype)


@pytest.mark.benchmark(group="hash")
def test_numpy_reference(benchmark, case) -> None:
    h, ids = case
    benchmark.pedantic(
        reference_hash,
        args=(ids, h.config, h.compressed_vocab_size),
        kwargs={"multipliers": h.multipliers, "primes": h.primes},
        rounds=5,
        warmup_rounds=1,
    )
