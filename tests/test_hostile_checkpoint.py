"""Checkpoints against refusals, crafted files and kills (issue 15: points 1, 12, 18, 19).

Every load that is refused must leave the model exactly as it was: its host table's file and its
optimizer state files byte for byte, its dense parameters, its dense optimizer and its step
counts. Each case runs in a child interpreter (tests/isolated.py), so a crash or a hang fails
the test instead of pytest.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from isolated import PRELUDE, expect_error, run_isolated

# The child's helpers: a model holding a host table (what host_tables() looks for) and a dense
# layer, a checkpoint of one model, snapshots of another, and header surgery.
SETUP = """
import hashlib, json, os, struct, sys
import numpy as np
import torch
import engram_rs as er
from engram_rs.torch import SparseAdam, SparseSGD
from engram_rs.torch.checkpoint import load_checkpoint, save_checkpoint

class Holder(torch.nn.Module):
    def __init__(self, table, optimizer, width):
        super().__init__()
        self.table, self.optimizer = table, optimizer
        self.lin = torch.nn.Linear(width, 4)

OPTS = {"adam": lambda: SparseAdam(lr=0.01), "sgd": lambda: SparseSGD(lr=0.1), None: lambda: None}

def build(name, dtype="float32", opt="adam", seed=0, width=8, rows=64, writable=True):
    d = os.path.join(TMP, name)
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "table.safetensors")
    er.HostTable.create(path, rows, 32, dtype=dtype, seed=seed).close()
    table = er.HostTable.open(path, writable=True)
    torch.manual_seed(seed)
    m = Holder(table, OPTS[opt](), width)
    if m.optimizer is not None:
        for i, s in enumerate(m.optimizer.state(table)):
            s.write_rows(np.arange(rows), np.full((rows, s.dim), seed + i + 1, np.float32))
        m.optimizer.set_step_count(table, 7 + seed)
    if not writable:
        table.close()
        m.table = er.HostTable.open(path)
    return m

def dense_opt(m, params=None):
    opt = torch.optim.AdamW(list(m.parameters()) if params is None else params, lr=1e-3)
    m.lin(torch.ones(1, m.lin.in_features)).sum().backward()
    opt.step()
    return opt

CK = os.path.join(TMP, "ck.safetensors")

def source(dtype="float32", opt="adam", with_dense_opt=False, **kw):
    src = build("src", dtype, opt, seed=1, **kw)
    save_checkpoint(CK, src, dense_opt(src) if with_dense_opt else None, extra={"step": 3})
    return src

def snapshot(m, opt=None):
    d = os.path.dirname(m.table.path)
    files = {}
    for f in sorted(os.listdir(d)):
        with open(os.path.join(d, f), "rb") as fh:
            files[f] = hashlib.sha256(fh.read()).hexdigest()
    dense = {k: v.detach().clone() for k, v in m.state_dict().items()}
    step = m.optimizer.step_count(m.table) if m.optimizer is not None else None
    raw = m.table._core.read_raw(0, m.table.rows).tobytes()
    sd = None
    if opt is not None:
        sd = opt.state_dict()
        sd = (repr(sd["param_groups"]), {i: {k: (v.clone() if torch.is_tensor(v) else v)
                                          for k, v in e.items()} for i, e in sd["state"].items()})
    return files, dense, step, raw, sd

def unchanged(m, snap, opt=None):
    files, dense, step, raw, sd = snapshot(m, opt)
    assert files == snap[0], f"the model's files changed: {snap[0]} -> {files}"
    assert dense.keys() == snap[1].keys(), "the dense keys changed"
    for k in dense:
        assert torch.equal(dense[k], snap[1][k]), f"the dense parameter {k} changed"
    assert step == snap[2], f"the step count changed: {snap[2]} -> {step}"
    assert raw == snap[3], "the table's rows changed"
    if opt is not None:
        assert sd[0] == snap[4][0], "the dense optimizer's groups changed"
        assert sd[1].keys() == snap[4][1].keys(), "the dense optimizer's state changed"
        for i in sd[1]:
            for k, v in sd[1][i].items():
                w = snap[4][1][i][k]
                assert (torch.equal(v, w) if torch.is_tensor(v) else v == w), (i, k)

def refused(m, opt=None, path=None, **kw):
    snap = snapshot(m, opt)
    try:
        load_checkpoint(CK if path is None else path, m, opt, **kw)
    finally:
        unchanged(m, snap, opt)

def read_ck(p=CK):
    with open(p, "rb") as f:
        b = f.read()
    (n,) = struct.unpack("<Q", b[:8])
    return json.loads(b[8 : 8 + n]), b[8 + n :]

def write_ck(header, data, p=CK):
    t = json.dumps(header).encode()
    t += b" " * (-len(t) % 8)
    with open(p, "wb") as f:
        f.write(struct.pack("<Q", len(t)) + t + data)

def edit(fn, p=CK):
    h, d = read_ck(p)
    fn(h)
    write_ck(h, d, p)

def edit_hosts(fn):
    def g(h):
        hosts = json.loads(h["__metadata__"]["host_tables"])
        fn(hosts)
        h["__metadata__"]["host_tables"] = json.dumps(hosts)
    edit(g)

def raw_file(data, p=CK):
    with open(p, "wb") as f:
        f.write(data)
"""


def _code(tmp_path: object, body: str) -> str:
    return f"TMP = {str(tmp_path)!r}\n" + SETUP + textwrap.dedent(body)


def _refuse(tmp_path: object, body: str, exc: str, match: str) -> None:
    expect_error(_code(tmp_path, body), exc, match, timeout=120)


# ---- 1: validate the whole file before the first write ----------------------------------------


REFUSALS = {
    "optimizer_kind": (
        """
        source(opt="adam")
        refused(build("v", opt="sgd"))
        """,
        r"host table '\.' was trained with adam, the model's optimizer is sgd",
    ),
    "no_optimizer_saved": (
        """
        source(opt=None)
        refused(build("v", opt="adam"))
        """,
        r"host table '\.' was saved without its optimizer state.*the model's optimizer is adam",
    ),
    "truncated": (
        """
        source()
        with open(CK, "rb") as f:
            b = f.read()
        raw_file(b[: len(b) - 100])
        refused(build("v"))
        """,
        r"ck\.safetensors: tensor 'host\.\.\.exp_avg_sq' \(bytes .*\) ends beyond the file",
    ),
    "missing_state_tensor": (
        """
        source()
        edit(lambda h: h.pop("host...exp_avg_sq"))
        refused(build("v"))
        """,
        r"ck\.safetensors: the checkpoint has no tensor 'host\.\.\.exp_avg_sq' \(the adam "
        r"optimizer state of host table '\.'\)",
    ),
    "dense_shape": (
        """
        source()
        refused(build("v", width=16))
        """,
        r"dense tensor 'lin\.weight' is \[4, 8\] there, \[4, 16\] in the model",
    ),
    "dense_keys": (
        """
        source()
        v = build("v")
        v.extra = torch.nn.Linear(2, 2)
        refused(v)
        """,
        r"the model's state has extra\.bias, extra\.weight that the checkpoint lacks",
    ),
    "dense_optimizer_groups": (
        """
        source(with_dense_opt=True)
        v = build("v")
        refused(v, dense_opt(v, [v.lin.weight]))
        """,
        r"dense optimizer state: group 0 has 2 parameters there, 1 in the optimizer",
    ),
    "dense_optimizer_absent": (
        """
        source()
        v = build("v")
        refused(v, dense_opt(v))
        """,
        r"holds no dense optimizer state",
    ),
    "table_shape": (
        """
        source()
        refused(build("v", rows=128))
        """,
        r"host table '\.' is float32 \[64, 32\] there, float32 \[128, 32\] here",
    ),
    "table_dtype": (
        """
        source(dtype="bfloat16")
        refused(build("v"))
        """,
        r"host table '\.' is bfloat16 \[64, 32\] there, float32 \[64, 32\] here",
    ),
    "read_only_table": (
        """
        source()
        refused(build("v", writable=False))
        """,
        r"host table '\.' .* is read-only: open it with HostTable\.open\(path, writable=True\)",
    ),
    "negative_step": (
        """
        source()
        edit_hosts(lambda hosts: hosts["."].update(step=-3))
        refused(build("v"))
        """,
        r"host table '\.': step must be a non-negative int, got -3",
    ),
    "float_step": (
        """
        source()
        edit_hosts(lambda hosts: hosts["."].update(step=2.5))
        refused(build("v"))
        """,
        r"host table '\.': step must be a non-negative int, got 2\.5",
    ),
    "hyperparameters": (
        """
        source()
        edit_hosts(lambda hosts: hosts["."]["optimizer"].pop("beta2"))
        refused(build("v"))
        """,
        r"host table '\.' was trained with adam \(beta1, eps, lr\), the model's optimizer has "
        r"beta1, beta2, eps, lr",
    ),
    "config": (
        """
        cfg = er.EngramConfig.preset("demo")
        src = build("src", seed=1)
        save_checkpoint(CK, src, config=cfg)
        refused(build("v"), config=cfg.replace(seed=5))
        """,
        r"checkpoint of another Engram config \(seed differ",
    ),
    "tokenizer": (
        """
        src = build("src", seed=1)
        save_checkpoint(CK, src, tokenizer_fingerprint="aaa")
        refused(build("v"), tokenizer_fingerprint="bbb")
        """,
        r"checkpoint of another tokenizer",
    ),
    "unknown_tensor": (
        """
        source()
        edit(lambda h: h.update(stray={"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}))
        refused(build("v"))
        """,
        r"tensor 'stray' is not part of an engram_rs checkpoint",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_a_refused_load_changes_nothing(tmp_path, case: str) -> None:
    body, match = REFUSALS[case]
    _refuse(tmp_path, body, "ValueError", match)


def test_an_accepted_load_restores_everything(tmp_path) -> None:
    """The other side of the refusals: the same helpers, a load that goes through."""
    out = run_isolated(
        _code(
            tmp_path,
            """
            src = source(with_dense_opt=True)
            v = build("v")
            opt = dense_opt(v)
            assert load_checkpoint(CK, v, opt) == {"step": 3}
            got, want = v.table._core.read_raw(0, 64), src.table._core.read_raw(0, 64)
            assert got.tobytes() == want.tobytes()
            for a, b in zip(v.optimizer.state(v.table), src.optimizer.state(src.table)):
                assert a._core.read_raw(0, 64).tobytes() == b._core.read_raw(0, 64).tobytes()
            assert v.optimizer.step_count(v.table) == 8
            for k, t in src.state_dict().items():
                assert torch.equal(v.state_dict()[k], t), k
            print("OK")
            """,
        )
    )
    assert out.returncode == 0 and "OK" in out.stdout, out


# ---- 12: tensors labelled with another dtype, FP8 scales of another shape or place ------------


LABELS = {
    "f32_table_bf16_label": (
        "float32",
        """
        edit(lambda h: h["host...weight"].update(dtype="BF16"))
        """,
        r"tensor 'host\.\.\.weight' is BF16 \[64, 32\] \(4096 bytes\), its data_offsets span 8192",
    ),
    "f32_table_bf16_label_wide": (
        "float32",
        """
        edit(lambda h: h["host...weight"].update(dtype="BF16", shape=[64, 64]))
        """,
        r"tensor 'host\.\.\.weight' is BF16 \[64, 64\], host table '\.' \(float32\) needs F32 "
        r"\[64, 32\]",
    ),
    "bf16_table_f16_label": (
        "bfloat16",
        """
        edit(lambda h: h["host...weight"].update(dtype="F16"))
        """,
        r"tensor 'host\.\.\.weight' is F16 \[64, 32\], host table '\.' \(bfloat16\) needs BF16",
    ),
    "bf16_table_f32_label": (
        "bfloat16",
        """
        edit(lambda h: h["host...weight"].update(dtype="F32", shape=[64, 16]))
        """,
        r"tensor 'host\.\.\.weight' is F32 \[64, 16\], host table '\.' \(bfloat16\) needs BF16",
    ),
    "state_as_bf16": (
        "float32",
        """
        edit(lambda h: h["host...exp_avg"].update(dtype="BF16", shape=[64, 64]))
        """,
        r"tensor 'host\.\.\.exp_avg' is BF16 \[64, 64\], the adam optimizer state of host "
        r"table '\.' needs F32 \[64, 32\]",
    ),
    "fp8_scale_shape": (
        "float8_e4m3",
        """
        def f(h):
            a, b = h["host...weight_scale"]["data_offsets"]
            h["host...weight_scale"].update(shape=[32, 2])
        edit(f)
        """,
        r"tensor 'host\.\.\.weight_scale' is U8 \[32, 2\], host table '\.' \(float8_e4m3\) "
        r"needs U8 \[64, 1\]",
    ),
    "fp8_scale_dtype": (
        "float8_e4m3",
        """
        edit(lambda h: h["host...weight_scale"].update(dtype="I32", shape=[16, 1]))
        """,
        r"tensor 'host\.\.\.weight_scale' is I32 \[16, 1\], host table '\.' \(float8_e4m3\) "
        r"needs U8 \[64, 1\]",
    ),
    "fp8_scale_overlaps_weights": (
        "float8_e4m3",
        """
        def f(h):
            a, _ = h["host...weight"]["data_offsets"]
            h["host...weight_scale"]["data_offsets"] = [a, a + 64]
        edit(f)
        """,
        r"tensor 'host\.\.\.weight_scale' \(bytes \d+\.\.\d+\) overlaps tensor 'host\.\.\.weight'",
    ),
    "fp8_scale_missing": (
        "float8_e4m3",
        """
        edit(lambda h: h.pop("host...weight_scale"))
        """,
        r"the checkpoint has no tensor 'host\.\.\.weight_scale' \(the UE8M0 scales of host "
        r"table '\.'\)",
    ),
    "scale_of_a_float_table": (
        "float32",
        """
        def f(h):
            h["host...weight_scale"] = {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}
        edit(f)
        """,
        r"tensor 'host\.\.\.weight_scale' is not part of an engram_rs checkpoint",
    ),
    "dense_bytes": (
        "float32",
        """
        def f(h):
            e = h["model.lin.weight"]
            e["shape"] = [4, 7]
        edit(f)
        """,
        r"tensor 'model\.lin\.weight' is F32 \[4, 7\] \(112 bytes\), its data_offsets span 128",
    ),
}


@pytest.mark.parametrize("case", sorted(LABELS))
def test_host_tensors_of_another_dtype_shape_or_place_are_refused(tmp_path, case: str) -> None:
    dtype, body, match = LABELS[case]
    _refuse(
        tmp_path,
        f"source(dtype={dtype!r})\nv = build('v', dtype={dtype!r})\n"
        + textwrap.dedent(body)
        + "refused(v)\n",
        "ValueError",
        match,
    )


# ---- 18: crafted headers and files ------------------------------------------------------------


def _st(header: bytes) -> str:
    return f"struct.pack('<Q', {len(header)}) + {header!r}"


HEADERS = {
    "empty": ("b''", r"ck\.safetensors: not a checkpoint \(0 bytes, shorter than"),
    "short": ("b'abc'", r"ck\.safetensors: not a checkpoint \(3 bytes, shorter than"),
    "length_beyond_file": (
        "struct.pack('<Q', 1000) + b'{}'",
        r"ck\.safetensors: not a checkpoint \(header length 1000, the file has 10 bytes\)",
    ),
    "huge_length": (
        "struct.pack('<Q', 2**64 - 1) + b'{}'",
        r"ck\.safetensors: not a checkpoint \(header length 18446744073709551615",
    ),
    "list": (_st(b"[1, 2]  "), r"ck\.safetensors: not a checkpoint \(the header is a JSON list"),
    "string_metadata": (
        _st(b'{"__metadata__": "x"}   '),
        r"ck\.safetensors: not a checkpoint \(__metadata__ is a str, not an object",
    ),
    "metadata_values": (
        _st(b'{"__metadata__": {"format": 1}}'),
        r"ck\.safetensors: not a checkpoint \(__metadata__\['format'\] is a int, not a string",
    ),
    "deep_list": (
        "struct.pack('<Q', 200000) + b'[' * 100000 + b']' * 100000",
        r"ck\.safetensors: not a checkpoint \(the header is nested too deeply",
    ),
    "deep_object": (
        "(lambda t: struct.pack('<Q', len(t)) + t)(b'{\"a\":' * 100000 + b'1' + b'}' * 100000)",
        r"ck\.safetensors: not a checkpoint \(the header is nested too deeply",
    ),
    "not_utf8": (_st(b'{"\xff": 1}'), r"ck\.safetensors: not a checkpoint \(header:"),
    "not_json": (_st(b"{nope}  "), r"ck\.safetensors: not a checkpoint \(header:"),
    "duplicate_keys": (
        _st(b'{"a": 1, "a": 2}'),
        r"ck\.safetensors: not a checkpoint \(the header repeats the key 'a'\)",
    ),
    "other_format": (
        _st(b'{"__metadata__": {"format": "x"}}'),
        r"ck\.safetensors: not an engram_rs checkpoint \(format 'x'\)",
    ),
}


@pytest.mark.parametrize("case", sorted(HEADERS))
def test_crafted_headers_are_a_clear_error(tmp_path, case: str) -> None:
    data, match = HEADERS[case]
    _refuse(tmp_path, f"raw_file({data})\nrefused(build('v'))\n", "ValueError", match)


# Metadata that is JSON inside JSON: each value is parsed with the same guards.
METADATA = {
    "host_tables_deep": (
        """
        def f(h):
            h["__metadata__"]["host_tables"] = "[" * 100000 + "]" * 100000
        edit(f)
        """,
        r"__metadata__\['host_tables'\] is not valid JSON \(nested too deeply\)",
    ),
    "host_tables_list": (
        """
        def f(h):
            h["__metadata__"]["host_tables"] = "[1]"
        edit(f)
        """,
        r"__metadata__\['host_tables'\] is a list, not an object",
    ),
    "host_info_not_object": (
        """
        edit_hosts(lambda hosts: hosts.update({".": 5}))
        """,
        r"host table '\.': its entry in __metadata__\['host_tables'\] is a int, not an object",
    ),
    "offsets_not_ints": (
        """
        edit(lambda h: h["host...weight"].update(data_offsets=[0.5, 8]))
        """,
        r"tensor 'host\.\.\.weight': data_offsets must be two ints \[begin, end\]",
    ),
    "offsets_reversed": (
        """
        edit(lambda h: h["host...weight"].update(data_offsets=[80, 8]))
        """,
        r"tensor 'host\.\.\.weight' \(bytes 80\.\.8\) ends before it begins",
    ),
    "shape_negative": (
        """
        edit(lambda h: h["model.lin.bias"].update(shape=[-4]))
        """,
        r"tensor 'model\.lin\.bias': shape must be a list of non-negative ints, got \[-4\]",
    ),
    "dtype_unknown": (
        """
        edit(lambda h: h["model.lin.bias"].update(dtype="C64"))
        """,
        r"tensor 'model\.lin\.bias' has dtype 'C64', not one of",
    ),
    "entry_not_object": (
        """
        edit(lambda h: h.update({"model.lin.bias": [1]}))
        """,
        r"tensor 'model\.lin\.bias': its header entry is a list, not an object",
    ),
    "bool_bytes": (
        """
        v = build("v")
        v.register_buffer("mask", torch.zeros(8, dtype=torch.bool))
        src = build("src2", seed=1)
        src.register_buffer("mask", torch.ones(8, dtype=torch.bool))
        save_checkpoint(CK, src)
        h, d = read_ck()
        a, b = h["model.mask"]["data_offsets"]
        write_ck(h, d[:a] + bytes([7] * 8) + d[b:])
        """,
        r"tensor 'model\.mask' is BOOL and holds bytes other than 0 and 1",
    ),
}


@pytest.mark.parametrize("case", sorted(METADATA))
def test_crafted_entries_are_a_clear_error(tmp_path, case: str) -> None:
    body, match = METADATA[case]
    pre = "" if "v = build" in body else "source()\nv = build('v')\n"
    _refuse(tmp_path, pre + textwrap.dedent(body) + "refused(v)\n", "ValueError", match)


def test_a_fifo_or_a_directory_is_refused_without_hanging(tmp_path) -> None:
    _refuse(
        tmp_path,
        """
        fifo = os.path.join(TMP, "fifo")
        os.mkfifo(fifo)
        refused(build("v"), path=fifo)
        """,
        "ValueError",
        r"fifo: not a checkpoint \(not a regular file\)",
    )
    _refuse(
        tmp_path,
        "refused(build('v2'), path=TMP)\n",
        "ValueError",
        r"not a checkpoint \(not a regular file\)",
    )


# ---- 19 and the atomic save ---------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_a_checkpoint_follows_the_umask(tmp_path, umask: int) -> None:
    out = run_isolated(
        _code(
            tmp_path,
            f"""
            os.umask({umask:#o})
            src = build("src", seed=1)
            save_checkpoint(CK, src)
            print("MODE", oct(os.stat(CK).st_mode & 0o777))
            """,
        )
    )
    assert out.returncode == 0, out
    assert f"MODE {oct(0o666 & ~umask)}" in out.stdout, out


def test_a_checkpoint_is_not_saved_over_a_table_or_its_state(tmp_path) -> None:
    _refuse(
        tmp_path,
        """
        v = build("v")
        snap = snapshot(v)
        try:
            save_checkpoint(v.table.path, v)
        finally:
            unchanged(v, snap)
        """,
        "ValueError",
        r"table\.safetensors is the file of host table '\.': save the checkpoint elsewhere",
    )
    _refuse(
        tmp_path,
        """
        v = build("w")
        snap = snapshot(v)
        try:
            save_checkpoint(v.optimizer.state(v.table)[1].path, v)
        finally:
            unchanged(v, snap)
        """,
        "ValueError",
        r"is the file of the adam optimizer state of host table '\.': save the checkpoint",
    )


def test_a_kill_during_save_leaves_the_previous_checkpoint(tmp_path) -> None:
    code = _code(
        tmp_path,
        """
        src = build("src", seed=1)
        save_checkpoint(CK, src)
        print("SAVED", flush=True)
        import engram_rs.torch.checkpoint as ckm
        ckm._CHUNK_BYTES = 1024
        real = ckm._table_chunks
        def chunks(table):
            for i, c in enumerate(real(table)):
                if i == 3:
                    os.kill(os.getpid(), 9)
                yield c
        ckm._table_chunks = chunks
        for i, s in enumerate(src.optimizer.state(src.table)):
            s.write_rows(np.arange(64), np.zeros((64, s.dim), np.float32))
        save_checkpoint(CK, src)
        """,
    )
    first = subprocess.run(
        [sys.executable, "-c", PRELUDE + code], capture_output=True, text=True, timeout=120
    )
    assert first.returncode == -signal.SIGKILL and "SAVED" in first.stdout, first
    ck = tmp_path / "ck.safetensors"
    saved = hashlib.sha256(ck.read_bytes()).hexdigest()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1 and leftovers[0].startswith(".ck.safetensors."), leftovers
    out = run_isolated(
        _code(
            tmp_path,
            """
            v = build("v")
            load_checkpoint(CK, v)
            assert v.optimizer.state(v.table)[0]._core.read_raw(0, 1).view(np.float32)[0] == 2.0
            print("OK")
            """,
        )
    )
    assert out.returncode == 0 and "OK" in out.stdout, out
    assert hashlib.sha256(ck.read_bytes()).hexdigest() == saved
    assert os.path.exists(ck)
