"""Hostile inputs to the torch modules, the host ops and ``train-demo`` (issue 15, points 12, 16,
17 and 18), each in a fresh interpreter (tests/isolated.py): a crash or a hang fails the test."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from isolated import expect_error, run_isolated

pytest.importorskip("torch")

SETUP = """
import copy, gc, hashlib, io, os, pickle, weakref
import numpy as np, torch
import engram_rs as er
from engram_rs.torch import Engram, EngramEmbedding, SparseAdam, SparseSGD, ops
SMALL = er.EngramConfig.preset("demo").replace(
    engram_vocab_size=[211, 223], n_embed_per_ngram=64, hidden_size=32, hc_mult=2
)
C = 1000
HASHER = er.NgramHasher(SMALL, C, compressed_pad_id=SMALL.pad_id)
ROWS = HASHER.table_rows[1]

def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()

def make_table(path):
    er.HostTable.create(path, ROWS, SMALL.head_dim, dtype="float32", seed=1)
    return path

def host_engram(path, opt=None):
    table = er.HostTable.open(make_table(path), writable=True)
    return Engram(SMALL, 1, compressed_vocab_size=C, table=table, optimizer=opt)

def inputs(seed=0):
    ids = np.random.default_rng(seed).integers(0, C, size=(2, 9))
    hidden = torch.randn(2, 9, SMALL.hc_mult, SMALL.hidden_size,
                         generator=torch.Generator().manual_seed(seed))
    return hidden, torch.from_numpy(HASHER.hash(ids)[1])
"""


def _code(tmp_path, body: str) -> str:
    return SETUP + f"TMP = {str(tmp_path)!r}\n" + body


# ---- 12: row ids of a non-integer dtype ---------------------------------------------------------

ROW_DTYPES = ["torch.float32", "torch.float64", "torch.bool", "torch.complex64"]

# Each dtype in one child (one torch import): prints "<dtype> <exception type> <message>".
EACH_DTYPE = """
for dt in (torch.float32, torch.float64, torch.bool, torch.complex64):
    rows = torch.tensor([1.7, 0.0, 1.0]).to(dt)
    try:
        CALL
        print(dt, "NO_EXCEPTION")
    except Exception as e:
        print(dt, type(e).__name__, str(e).replace("\\n", " "))
"""


def _each_dtype(out_text: str, match: str) -> None:
    import re

    lines = {ln.split(" ", 1)[0]: ln for ln in out_text.splitlines() if ln.startswith("torch.")}
    assert sorted(lines) == sorted(ROW_DTYPES), out_text
    for dtype, line in lines.items():
        assert line.startswith(f"{dtype} TypeError "), line
        assert re.search(match.format(dtype=re.escape(dtype)), line), line


def test_host_gather_refuses_non_integer_row_ids(tmp_path) -> None:
    """Float row ids were truncated (1.7 -> row 1), bools read as rows 0 and 1."""
    out = run_isolated(
        _code(
            tmp_path,
            """
t = er.HostTable.open(make_table(os.path.join(TMP, "t.safetensors")))
h = ops.register(t, None)
"""
            + EACH_DTYPE.replace(
                "CALL", "torch.ops.engram_rs.host_gather(torch.empty(0), rows, h)"
            ),
        )
    )
    assert out.returncode == 0, out
    _each_dtype(out.stdout, r"row ids must be an integer tensor.*got dtype {dtype}.*\.long\(\)")


def test_host_sparse_step_refuses_non_integer_rows_and_leaves_the_table(tmp_path) -> None:
    out = run_isolated(
        _code(
            tmp_path,
            """
path = make_table(os.path.join(TMP, "t.safetensors"))
before = sha(path)
t = er.HostTable.open(path, writable=True)
h = ops.register(t, SparseSGD(lr=1.0))
"""
            + EACH_DTYPE.replace(
                "CALL", "torch.ops.engram_rs.host_sparse_step(rows, torch.ones(3, t.dim), h)"
            )
            + """
t.flush(); t.close()
print("SAME" if sha(path) == before else "CHANGED")
""",
        )
    )
    assert out.returncode == 0, out
    _each_dtype(out.stdout, r"row ids must be an integer tensor.*got dtype {dtype}")
    assert "SAME" in out.stdout, out  # the table's bytes are untouched


def test_prefetch_refuses_non_integer_row_ids(tmp_path) -> None:
    expect_error(
        _code(
            tmp_path,
            """
t = er.HostTable.open(make_table(os.path.join(TMP, "t.safetensors")))
ops.prefetch(ops.register(t, None), torch.tensor([0.5, 1.5]))
""",
        ),
        "TypeError",
        r"row ids must be an integer tensor.*got dtype torch.float32",
    )


def test_integer_row_ids_of_every_width_still_gather(tmp_path) -> None:
    out = run_isolated(
        _code(
            tmp_path,
            """
t = er.HostTable.open(make_table(os.path.join(TMP, "t.safetensors")))
h = ops.register(t, None)
want = torch.from_numpy(t.gather(np.array([3, 1, 2]), out_dtype="float32").copy())
for dt in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
    got = torch.ops.engram_rs.host_gather(torch.empty(0), torch.tensor([3, 1, 2], dtype=dt), h)
    assert torch.equal(got, want), dt
print("OK")
""",
        )
    )
    assert out.returncode == 0 and "OK" in out.stdout, out


# ---- 17: a deleted module releases its table ----------------------------------------------------


@pytest.mark.parametrize("which", ["Engram", "EngramEmbedding"])
def test_a_deleted_module_releases_its_table_and_lock(tmp_path, which: str) -> None:
    """The table (and its optimizer's state files) are freed with the module, without waiting
    for the cycle collector: the file's exclusive lock is free again at once."""
    make = (
        "m = host_engram(path, SparseAdam(lr=0.1))\nout = m(*inputs())"
        if which == "Engram"
        else (
            "m = EngramEmbedding(HASHER, 1, SMALL.head_dim, "
            "er.HostTable.open(make_table(path), writable=True), SparseAdam(lr=0.1))\n"
            "out = m(inputs()[1])"
        )
    )
    out = run_isolated(
        _code(
            tmp_path,
            f"""
path = os.path.join(TMP, "t.safetensors")
{make}
out.square().sum().backward()   # trains the table: the optimizer made its state files
inner = m if isinstance(m, EngramEmbedding) else m.multi_head_embedding
table = weakref.ref(inner.table)
handle = inner._host_handle
states = sorted(f for f in os.listdir(TMP) if ".adam-" in f)
assert states, os.listdir(TMP)
try:
    er.HostTable.open(path, writable=True)
    raise SystemExit("the open table's lock did not conflict")
except OSError:
    pass
gc.disable()
del m, inner, out
print("FREED" if table() is None else "ALIVE")
gc.enable(); gc.collect()
print("FREED_AFTER_GC" if table() is None else "ALIVE_AFTER_GC")
er.HostTable.open(path, writable=True).close()           # the lock is free
for s in states:
    er.HostTable.open(os.path.join(TMP, s), writable=True).close()
try:
    ops.binding(handle)
    print("HANDLE_KEPT")
except ValueError as e:
    print("HANDLE_GONE", e)
""",
        )
    )
    assert out.returncode == 0, out
    assert "ALIVE_AFTER_GC" not in out.stdout, out
    assert "FREED\n" in out.stdout, out  # no reference cycle keeps it until a gc run
    assert "HANDLE_GONE no host table registered under handle" in out.stdout, out


def test_register_keeps_its_table_until_unregister(tmp_path) -> None:
    out = run_isolated(
        _code(
            tmp_path,
            """
path = make_table(os.path.join(TMP, "t.safetensors"))
h = ops.register(er.HostTable.open(path, writable=True), None)
gc.collect()
assert ops.binding(h).table.rows == ROWS  # a bare handle keeps its table
ops.unregister(h)
er.HostTable.open(path, writable=True).close()
try:
    ops.binding(h)
except ValueError as e:
    print("GONE", e)
""",
        )
    )
    assert out.returncode == 0 and "GONE no host table registered" in out.stdout, out


# ---- 18: a host-table module cast to another dtype, copied or pickled ---------------------------


@pytest.mark.parametrize("cast", ["to(torch.bfloat16)", "half()", "double()"])
def test_a_host_table_engram_cast_to_another_dtype_says_how_to_cast(tmp_path, cast: str) -> None:
    want = {"to(torch.bfloat16)": "bfloat16", "half()": "float16", "double()": "float64"}[cast]
    expect_error(
        _code(
            tmp_path,
            f"""
m = host_engram(os.path.join(TMP, "t.safetensors")).{cast}
hidden, ids = inputs()
m(hidden.to(torch.{want}), ids)
""",
        ),
        "TypeError",
        rf"gathers float32 rows.*cast to torch\.{want}.*\.float\(\).*autocast",
    )


def test_a_host_table_embedding_cast_to_bfloat16_says_how_to_cast(tmp_path) -> None:
    expect_error(
        _code(
            tmp_path,
            """
t = er.HostTable.open(make_table(os.path.join(TMP, "t.safetensors")))
m = EngramEmbedding(HASHER, 1, SMALL.head_dim, t).to(torch.bfloat16)
m(inputs()[1])
""",
        ),
        "TypeError",
        r"EngramEmbedding.*gathers float32 rows.*cast to torch\.bfloat16.*\.to\(torch\.bfloat16\)",
    )


def test_a_float32_engram_over_a_bfloat16_table_still_works(tmp_path) -> None:
    out = run_isolated(
        _code(
            tmp_path,
            """
path = os.path.join(TMP, "t.safetensors")
er.HostTable.create(path, ROWS, SMALL.head_dim, dtype="bfloat16")
m = Engram(SMALL, 1, compressed_vocab_size=C, table=er.HostTable.open(path))
hidden, ids = inputs()
with torch.no_grad():
    assert m(hidden, ids).dtype == torch.float32
print("OK")
""",
        )
    )
    assert out.returncode == 0 and "OK" in out.stdout, out


@pytest.mark.parametrize(
    "how", ["copy.deepcopy(m)", "torch.save(m, io.BytesIO())", "pickle.dumps(m)"]
)
def test_copying_or_pickling_a_host_table_module_says_what_to_do(tmp_path, how: str) -> None:
    out = expect_error(
        _code(
            tmp_path,
            f"""
path = os.path.join(TMP, "t.safetensors")
m = host_engram(path, SparseSGD(lr=0.1))
before = sha(path)
try:
    {how}
finally:
    m.multi_head_embedding.table.close()
    print("SAME" if sha(path) == before else "CHANGED")
""",
        ),
        "TypeError",
        r"EngramEmbedding over the HostTable .*t\.safetensors.*cannot be copied or pickled"
        r".*save_checkpoint.*state_dict",
    )
    assert "SAME" in out.stdout, out


def test_a_dense_engram_still_deepcopies_and_pickles(tmp_path) -> None:
    out = run_isolated(
        _code(
            tmp_path,
            """
m = Engram(SMALL, 1, compressed_vocab_size=C)
c = copy.deepcopy(m)
buf = io.BytesIO(); torch.save(m, buf); buf.seek(0)
back = torch.load(buf, weights_only=False)
hidden, ids = inputs()
with torch.no_grad():
    assert torch.equal(c(hidden, ids), m(hidden, ids))
    assert torch.equal(back(hidden, ids), m(hidden, ids))
print("OK")
""",
        )
    )
    assert out.returncode == 0 and "OK" in out.stdout, out


# ---- 16 and 18: train-demo ---------------------------------------------------------------------

DEMO = ["--batch", "4", "--seq-len", "32", "--no-progress"]


def _demo(out: str, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engram_rs", "train-demo", "--out", out, *extra],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "args, match, status",
    [
        (
            ["--seq-len", "60000"],
            r"--batch 16 --seq-len 60000 needs about \d+ GiB .* at most 4 GiB: at --batch 16, "
            r"--seq-len at most \d+",
            2,
        ),
        (
            ["--batch", "100000000"],
            r"--batch 100000000 --seq-len 128 needs about \d+ GiB .* --batch at most \d+",
            2,
        ),
        (
            ["--batch", "18000", "--seq-len", "2"],
            r"--batch 18000: the text gives \d+ training windows of 3 tokens .* --batch at most",
            1,
        ),
        (["--seed", "-1"], r"--seed must be an int in \[0, 2\*\*64\), got -1", 2),
    ],
)
def test_train_demo_refuses_sizes_that_cannot_work(
    tmp_path, args: list[str], match: str, status: int
) -> None:
    """Before: a MemoryError after minutes (or the OOM killer), a numpy traceback. Sizes over
    the memory limit are a usage error (status 2); more windows than the text has, status 1."""
    import re

    out = tmp_path / "run"
    proc = _demo(str(out), "--steps", "2", "--no-progress", *args)
    assert proc.returncode == status, proc
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("engram-rs train-demo: error: "), proc.stderr
    assert re.search(match, line), line
    assert "Traceback" not in proc.stderr
    assert not (out / "engram-table.safetensors").exists()  # refused before the table is made


def test_train_demo_function_refuses_a_window_longer_than_the_text(tmp_path) -> None:
    text = tmp_path / "short.txt"
    text.write_text("To be, or not to be, that is the question. " * 4)
    expect_error(
        f"""
from engram_rs.bench import deepseek_v4_tokenizer_json
from engram_rs.train_demo import train_demo
train_demo({str(tmp_path / "run")!r}, deepseek_v4_tokenizer_json(), {str(text)!r}, steps=1,
           batch=1, seq_len=500, log=lambda s: None)
""",
        "ValueError",
        r"--seq-len 500: the text .*short\.txt has \d+ tokens.* --seq-len at most \d+",
    )
    assert not (tmp_path / "run" / "engram-table.safetensors").exists()


KILL_AT = """
import os, signal, sys
import engram_rs.train_demo as td
calls = [0]
real = td._loss
def _loss(*a):
    if calls[0] == {at}:
        os.kill(os.getpid(), signal.SIGKILL)
    calls[0] += 1
    return real(*a)
td._loss = _loss
from engram_rs.cli import main
main(sys.argv[1:])
"""


def test_train_demo_killed_before_its_first_checkpoint_resumes_clean(tmp_path) -> None:
    """A resume with no checkpoint starts again from a new table (and new optimizer state), so
    the losses equal an uninterrupted run's: before, it went on from step 0 with the rows the
    killed run had already trained (and their Adam moments)."""
    steps = ["--steps", "5", "--checkpoint-every", "100", *DEMO]
    whole = _demo(str(tmp_path / "whole"), *steps)
    assert whole.returncode == 0, whole.stderr
    want = json.loads((tmp_path / "whole" / "losses.json").read_text())
    assert len(want) == 5

    out = tmp_path / "killed"
    # An earlier, finished run in the same --out (another seed): its checkpoint must not be
    # what the killed run resumes.
    earlier = _demo(str(out), "--steps", "1", "--seed", "1", *DEMO)
    assert earlier.returncode == 0, earlier.stderr
    assert (out / "checkpoint.safetensors").exists()
    killed = subprocess.run(
        [sys.executable, "-c", KILL_AT.format(at=3), "train-demo", "--out", str(out), *steps],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -9, killed.stderr  # killed at the start of its 4th step
    assert not (out / "checkpoint.safetensors").exists()  # the earlier run's is gone
    assert not (out / "losses.json").exists()
    assert (out / "engram-table.safetensors").exists()  # the table 3 steps trained
    resumed = _demo(str(out), *steps, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "no checkpoint" in resumed.stdout and "starting from step 0" in resumed.stdout
    assert json.loads((out / "losses.json").read_text()) == want


def test_train_demo_killed_in_its_precompute_resumes(tmp_path) -> None:
    """A kill while the demo hashes its text leaves ``indices.partial``: the resume starts
    again (before: a FileExistsError asking for a --resume the demo had been given)."""
    out = tmp_path / "killed"
    code = KILL_AT.replace(
        "td._loss = _loss",
        "from engram_rs.precompute import job as off\n"
        "def _fin(*a, **k):\n    os.kill(os.getpid(), signal.SIGKILL)\n"
        "off._finalize = _fin",
    ).format(at=0)
    steps = ["--steps", "1", "--checkpoint-every", "100", *DEMO]
    killed = subprocess.run(
        [sys.executable, "-c", code, "train-demo", "--out", str(out), *steps],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -9, killed.stderr
    assert os.path.isdir(out / "indices.partial")
    resumed = _demo(str(out), *steps, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert len(json.loads((out / "losses.json").read_text())) == 1
