"""Hostile inputs to hashing, configs and tokenizer tables: clean errors, never a crash.

Reproducers that could crash run in a child interpreter (tests/isolated.py), so a segfault or an
abort fails the test instead of the test run.
"""

from __future__ import annotations

import json
import os
import pathlib

import engram_rs as er
import engram_rs.atomic
import numpy as np
import pytest
from isolated import expect_error, run_isolated

RACE = """
import threading, numpy as np, engram_rs as er
h = er.NgramHasher(er.EngramConfig.preset("demo"), 1000, compressed_pad_id=2)
ids = np.random.default_rng(0).integers(0, 1000, size=(8, 1 << 16))
stop = False
def scribble():
    rng = np.random.default_rng(1)
    while not stop:
        i = rng.integers(0, ids.size)
        ids.flat[i] = {bad}
        ids.flat[i] = 5
t = threading.Thread(target=scribble)
t.start()
outcomes = set()
try:
    for _ in range(60):
        try:
            {call}
            outcomes.add("ok")
        except (IndexError, ValueError) as e:
            outcomes.add(type(e).__name__)
finally:
    stop = True
    t.join()
print(sorted(outcomes))
"""


@pytest.mark.parametrize("bad", ["10**6", "-1", "2**62"])
@pytest.mark.parametrize(
    "call",
    [
        "h.hash(ids)",
        "h.hash(ids, dtype=np.int32, flat=True)",
        "h.hash_ragged(ids.reshape(-1), [0, 5, 70000, ids.size])",
        "h.hash_step(ids, h.new_state(8))",
    ],
)
def test_ids_written_by_another_thread_never_crash(bad: str, call: str) -> None:
    """Ids are checked where the kernel reads them: a thread writing out-of-range ids into the
    array during the call gives an IndexError/ValueError or a result, never a crash or a
    PanicException (a BaseException that `except Exception` misses)."""
    out = run_isolated(RACE.format(bad=bad, call=call))
    assert out.returncode == 0, out
    assert "PanicException" not in out.stderr, out


def test_raw_ids_written_by_another_thread_never_crash(tmp_path: pathlib.Path) -> None:
    code = RACE.replace(
        'h = er.NgramHasher(er.EngramConfig.preset("demo"), 1000, compressed_pad_id=2)',
        "comp = er.CompressedTokenizer(np.arange(1000) % 700, 700, 'x')\n"
        'h = er.NgramHasher.from_tokenizer(er.EngramConfig.preset("demo"), comp)',
    )
    for call in ("h.hash_tokens(ids)", "h.hash_tokens_step(ids, h.new_state(8))"):
        out = run_isolated(code.format(bad="10**6", call=call))
        assert out.returncode == 0, out
        assert "PanicException" not in out.stderr, out


def test_decode_state_cannot_be_corrupted() -> None:
    h = er.NgramHasher(er.EngramConfig.preset("demo"), 1000, compressed_pad_id=2)
    state = h.new_state(3)
    with pytest.raises(ValueError, match="read-only"):
        state.history[0, 0] = 7
    ids = np.arange(12).reshape(3, 4)
    expected = h.hash(ids)[1]
    np.testing.assert_array_equal(h.hash_step(ids, state)[1], expected)
    np.testing.assert_array_equal(state.history, ids[:, 2:])
    for bad in (
        np.asfortranarray(state.history),
        state.history.astype(np.float64),
        np.repeat(state.history, 2, axis=1)[:, ::2],
        state.history.tolist(),
    ):
        state._history = bad  # type: ignore[assignment]
        with pytest.raises(
            ValueError,
            match=r"state.history must be a writable C-contiguous int64 \[batch_size, 2\] array",
        ):
            h.hash_step(ids, state)
    with pytest.raises(IndexError, match=r"rows \[5\] are outside the state's 3 sequences"):
        h.new_state(3).reset([5])


def test_the_binding_refuses_a_fortran_history() -> None:
    """The binding itself never reads a Fortran-ordered history as if it were C-ordered."""
    h = er.NgramHasher(er.EngramConfig.preset("demo"), 1000, compressed_pad_id=2)
    hist = np.asfortranarray(np.array([[1, 2], [3, 4]], dtype=np.int64))
    with pytest.raises(ValueError, match="state.history must be a C-contiguous int64 array"):
        h._core.hash(np.zeros((2, 1), np.int64), [0, 1, 2], [0], history=hist)


def test_big_endian_and_odd_ids() -> None:
    h = er.NgramHasher(er.EngramConfig.preset("demo"), 1000, compressed_pad_id=2)
    ids = np.random.default_rng(0).integers(0, 1000, size=(3, 50))
    expected = h.hash(ids)[1]
    for dtype in (">i8", ">u4", ">i2"):
        np.testing.assert_array_equal(h.hash(ids.astype(dtype))[1], expected)
    np.testing.assert_array_equal(h.hash(np.asfortranarray(ids))[1], expected)
    with pytest.raises(TypeError, match=r"native-endian integer numpy array, got ndarray \(>i8\)"):
        h._core.hash(ids.astype(">i8").reshape(-1), [0, ids.size], [0])
    with pytest.raises(ValueError, match=r"ids must be C-contiguous"):
        h._core.hash(np.asfortranarray(ids), [0, ids.size], [0])


def test_absurd_configs_release_the_gil_and_stop_at_ctrl_c() -> None:
    """A million heads takes minutes of prime search: the GIL is released meanwhile (another
    thread runs) and Ctrl-C stops it."""
    out = run_isolated(
        """
import os, signal, threading, time, engram_rs as er
cfg = er.EngramConfig(n_head_per_ngram=10**6, n_embed_per_ngram=10**6)
ticks = []
def other():
    while len(ticks) < 50:
        ticks.append(time.perf_counter())
        time.sleep(0.01)
threading.Thread(target=other, daemon=True).start()
threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGINT)).start()
t0 = time.perf_counter()
try:
    er.NgramHasher(cfg, 1000, compressed_pad_id=2)
    print("FINISHED")
except KeyboardInterrupt:
    print("INTERRUPTED after", round(time.perf_counter() - t0, 1), "ticks", len(ticks))
""",
        timeout=60,
    )
    assert out.returncode == 0, out
    assert "INTERRUPTED" in out.stdout, out
    seconds, ticks = float(out.stdout.split()[2]), int(out.stdout.split()[4])
    assert seconds < 10, out
    assert ticks >= 20, f"another thread could not run while the primes were searched: {out}"


@pytest.mark.parametrize("dtype", ["np.int64", "np.int32"])
def test_outputs_that_do_not_fit_raise_memory_error(dtype: str) -> None:
    """4M tokens x 2000 columns is 67 GB of output per layer: MemoryError, as numpy raises for
    an array that does not fit, not an abort."""
    expect_error(
        f"""
import numpy as np, engram_rs as er
cfg = er.EngramConfig(n_head_per_ngram=1000, n_embed_per_ngram=1000)
h = er.NgramHasher(cfg, 1000, compressed_pad_id=2)
h.hash(np.ones(1 << 22, np.uint8), dtype={dtype})
""",
        "MemoryError",
        r"cannot allocate \d+ bytes",
    )


def test_config_files(tmp_path: pathlib.Path) -> None:
    cfg = er.EngramConfig.preset("demo")
    bad = tmp_path / "latin1.json"
    bad.write_bytes(b'{"seed": 1, "name": "caf\xe9"}')
    with pytest.raises(ValueError, match=r"is not UTF-8 text \(byte 0xe9 at offset 24\)"):
        er.EngramConfig.from_json(bad)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="nests JSON too deeply to be a config"):
        er.EngramConfig.from_json(deep)
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([cfg.to_dict()]))
    with pytest.raises(ValueError, match="holds a JSON list, expected an object of config fields"):
        er.EngramConfig.from_json(listed)
    with pytest.raises(FileNotFoundError, match="the directory .* does not exist: create it first"):
        cfg.to_json(tmp_path / "missing" / "c.json")


def test_to_json_leaves_no_temporary_file_on_failure(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = engram_rs.atomic.AtomicFile

    class FullAtSync:
        """The core's atomic file whose sync (in the core, out of os.fsync's reach) fails."""

        def __init__(self, path: str) -> None:
            self.out = real(path)
            self.fileno, self.discard = self.out.fileno, self.out.discard

        def commit(self) -> None:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(engram_rs.atomic, "AtomicFile", FullAtSync)
    with pytest.raises(OSError, match="No space left on device"):
        er.EngramConfig.preset("demo").to_json(tmp_path / "c.json")
    assert os.listdir(tmp_path) == []


def test_kernel_panics_become_runtime_errors() -> None:
    """A panic inside a kernel reaches Python as a RuntimeError, never a PanicException: the
    prefetch pool's ticket and the bindings' detach both catch it."""
    from engram_rs import _engram_rs

    assert issubclass(RuntimeError, Exception)
    assert "PanicException" not in dir(_engram_rs)


def test_sizes_and_layer_ids_that_would_wrap() -> None:
    cfg = er.EngramConfig.preset("demo")
    for size in (2**63, 10**30, 0):
        with pytest.raises(ValueError, match=r"compressed_vocab_size must be in \[1, 2\*\*63\)"):
            er.NgramHasher(cfg, size)
    h = er.NgramHasher(cfg, 1000, compressed_pad_id=2)
    ids = np.zeros((2, 3), np.int64)
    for bad in ([True], ["1"], [1.0]):
        with pytest.raises(ValueError, match="are not Engram layers of this config"):
            h.hash(ids, layer_ids=bad)
    with pytest.raises(
        ValueError, match=r"cu_seqlens\[1\] = 18446744073709551615 is outside \[0, len\(ids\) = 3\]"
    ):
        h.hash_ragged(np.zeros(3, np.int64), np.array([0, 2**64 - 1, 3], dtype=np.uint64))


def test_seeds_beyond_numpys_range_are_refused() -> None:
    with pytest.raises(
        ValueError,
        match=r"seed = 9223372036854775708: seed \+ 10007 \* layer_id must stay below 2\*\*63 "
        r"\(the demo's numpy seeds\); the largest layer id is 15",
    ):
        er.EngramConfig(seed=2**63 - 100)
    with pytest.raises(ValueError, match=r"seed must be below 2\*\*64, got 18446744073709551616"):
        er.EngramConfig(seed=2**64)
