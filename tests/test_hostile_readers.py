"""Hostile inputs of the precompute readers and of its result's readers (``verify``,
``PrecomputedIndices``): manifests that name files outside the directory, devices and FIFOs,
manifests that lie about counts or offsets, flipped ``.npy`` headers, damaged manifests, long
lines, deep or non-Unicode JSONL records. Each case runs in its own interpreter
(``isolated.py``) with a timeout, so a hang or a crash fails the test instead of pytest."""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
import textwrap

import numpy as np
import pytest
from engram_rs import _engram_rs
from engram_rs.bench import deepseek_v4_tokenizer_json
from engram_rs.offline import HEADER, precompute
from engram_rs.precompute.files import npy_header as _npy_header
from isolated import expect_error, run_isolated

VOCAB = 129280


@pytest.fixture(scope="module")
def tok() -> str:
    return deepseek_v4_tokenizer_json()


@pytest.fixture(scope="module")
def made(tmp_path_factory, tok) -> str:
    """One small finished precompute (500 tokens, windows of 100), copied by each test."""
    base = tmp_path_factory.mktemp("made")
    ids = np.random.default_rng(0).integers(0, VOCAB, size=500).astype(np.uint32)
    ids.tofile(base / "a.bin")
    precompute(base / "a.bin", base / "out", "demo", tok, seq_len=100)
    return str(base / "out")


@pytest.fixture
def out(made, tmp_path) -> str:
    dst = tmp_path / "out"
    shutil.copytree(made, dst)
    return str(dst)


def manifest(out: str) -> dict:
    with open(os.path.join(out, "manifest.json")) as f:
        return json.load(f)


def write_manifest(out: str, man: object) -> None:
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(man, f)


def rewrite(out: str, name: str, arr: np.ndarray, descr: np.dtype | None = None) -> None:
    """Replaces the data of ``name`` by ``arr`` with a consistent manifest (shape, checksum):
    what a careful forger would write."""
    data = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    header = _npy_header(np.dtype(descr or arr.dtype), tuple(arr.shape))
    with open(os.path.join(out, name), "wb") as f:
        f.write(header + data.tobytes())
    s = _engram_rs.Checksum()
    s.update(data)
    man = manifest(out)
    man["files"][name]["shape"] = list(arr.shape)
    man["files"][name]["checksum"] = s.hexdigest()
    write_manifest(out, man)


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def open_both(out: str, exc: str, match: str, timeout: float = 60) -> None:
    """Both ``PrecomputedIndices`` and ``verify`` refuse ``out`` with ``exc`` matching
    ``match`` (in a child, so a hang is a failure), and leave its files as they were."""
    before = {
        n: read(os.path.join(out, n))
        for n in sorted(os.listdir(out))
        if stat.S_ISREG(os.lstat(os.path.join(out, n)).st_mode)
    }
    for call in ("PrecomputedIndices(out)", "verify(out)"):
        expect_error(
            f"""
            from engram_rs.offline import PrecomputedIndices, verify
            out = {out!r}
            {call}
            """,
            exc,
            match,
            timeout=timeout,
        )
    after = {n: read(os.path.join(out, n)) for n in before}
    assert after == before


# ---- point 8: files outside DIR, links, devices, FIFOs --------------------------------------


def test_verify_passes_the_untouched_result(out) -> None:
    res = run_isolated(
        f"""
        from engram_rs.offline import PrecomputedIndices, verify
        idx = PrecomputedIndices({out!r})
        print("LEN", len(idx), idx.sequence(4)[0].shape, verify({out!r})["rehashed_sequences"])
        """,
        timeout=60,
    )
    assert "LEN 5 (100,) 5" in res.stdout, res


@pytest.mark.parametrize("name", ["../x.npy", "/etc/passwd", "sub/tokens.npy", "extra.npy"])
def test_a_manifest_naming_another_file_is_refused(out, tmp_path, name) -> None:
    (tmp_path / "x.npy").write_bytes(b"secret")
    man = manifest(out)
    man["files"][name] = dict(man["files"]["tokens.npy"])
    write_manifest(out, man)
    open_both(out, "ValueError", f"names a file {name!r}.*only its own files")
    assert (tmp_path / "x.npy").read_bytes() == b"secret"


def test_a_layer_entry_naming_a_device_is_refused(out) -> None:
    man = manifest(out)
    man["layers"]["1"]["file"] = "/dev/zero"
    write_manifest(out, man)
    open_both(out, "ValueError", r"layer 1.*file '/dev/zero'.*layer_1.npy")


@pytest.mark.parametrize("target", ["/dev/zero", "outside"])
def test_a_link_in_place_of_a_file_is_refused_not_followed(out, tmp_path, target) -> None:
    outside = tmp_path / "outside.npy"
    shutil.copy(os.path.join(out, "layer_1.npy"), outside)
    os.remove(os.path.join(out, "layer_1.npy"))
    os.symlink("/dev/zero" if target == "/dev/zero" else outside, os.path.join(out, "layer_1.npy"))
    open_both(out, "ValueError", r"layer_1.npy is a symbolic link: .* not followed")


def test_a_fifo_in_place_of_a_file_is_refused_without_blocking(out) -> None:
    os.remove(os.path.join(out, "tokens.npy"))
    os.mkfifo(os.path.join(out, "tokens.npy"))
    open_both(out, "ValueError", r"tokens.npy is not a regular file \(a FIFO\)", timeout=30)


def test_a_fifo_manifest_is_refused_without_blocking(out) -> None:
    os.remove(os.path.join(out, "manifest.json"))
    os.mkfifo(os.path.join(out, "manifest.json"))
    open_both(out, "ValueError", r"manifest.json is not a regular file \(a FIFO\)", timeout=30)


# ---- point 11: counts, offsets and headers checked against what is mapped --------------------


def test_a_manifest_claiming_more_tokens_is_refused(out) -> None:
    man = manifest(out)
    man["tokens"] = 10**9
    write_manifest(out, man)
    open_both(out, "ValueError", r"claims 1000000000 tokens.*tokens.npy holds 500")


def test_a_manifest_claiming_more_sequences_is_refused(out) -> None:
    man = manifest(out)
    man["sequences"] = 7
    write_manifest(out, man)
    open_both(out, "ValueError", r"claims 7 sequences.*offsets.npy holds 6 offsets")


def test_consistent_but_forged_counts_are_refused(out) -> None:
    """Shapes, counts and checksums all agree with each other, not with the data."""
    man = manifest(out)
    man["tokens"] = 10**9
    man["files"]["tokens.npy"]["shape"] = [10**9]
    for name in man["files"]:
        if name.startswith("layer_"):
            man["files"][name]["shape"][0] = 10**9
            man["layers"][name[6:-4]]["shape"][0] = 10**9
    write_manifest(out, man)
    open_both(
        out, "ValueError", r"tokens.npy: its .npy header says shape \(500,\), the manifest \(10+,\)"
    )
    path = os.path.join(out, "tokens.npy")
    data = read(path)[HEADER:]
    with open(path, "wb") as f:  # the header forged too
        f.write(_npy_header(np.dtype(np.uint32), (10**9,)) + data)
    open_both(out, "ValueError", r"tokens.npy: 2000 data bytes, the manifest's shape \(10+,\)")


def test_decreasing_offsets_are_refused(out) -> None:
    rewrite(out, "offsets.npy", np.array([0, 100, 300, 200, 400, 500], np.int64))
    open_both(out, "ValueError", r"offsets.npy: offset 3 \(200\) is below offset 2 \(300\)")


@pytest.mark.parametrize(
    ("offsets", "match"),
    [
        ([5, 100, 200, 300, 400, 500], r"offset 0 is 5, not 0"),
        ([0, 100, 200, 300, 400, 5000], r"the last offset is 5000, not the 500 tokens"),
        ([0, 100, 200, 300, 400, 400], r"the last offset is 400, not the 500 tokens"),
    ],
)
def test_offsets_beyond_the_data_are_refused(out, offsets, match) -> None:
    rewrite(out, "offsets.npy", np.array(offsets, np.int64))
    open_both(out, "ValueError", match)


def test_a_byte_swapped_layer_header_is_refused(out) -> None:
    arr = np.load(os.path.join(out, "layer_1.npy"))
    rewrite(out, "layer_1.npy", arr, descr=np.dtype(">i4"))  # same bytes, other byte order
    open_both(out, "ValueError", r"layer_1.npy: its .npy header says dtype >i4.*int32")


def test_a_fortran_order_layer_header_is_refused(out) -> None:
    path = os.path.join(out, "layer_1.npy")
    with open(path, "rb") as f:
        head = f.read(HEADER)
    flipped = head.replace(b"'fortran_order': False", b"'fortran_order': True ")
    assert len(flipped) == HEADER and flipped != head
    with open(path, "r+b") as f:
        f.write(flipped)
    open_both(out, "ValueError", r"layer_1.npy: its .npy header says fortran_order True")


def test_a_transposed_layer_header_is_refused(out) -> None:
    arr = np.load(os.path.join(out, "layer_1.npy"))
    path = os.path.join(out, "layer_1.npy")
    data = read(path)[HEADER:]
    with open(path, "wb") as f:
        f.write(_npy_header(arr.dtype, arr.shape[::-1]) + data)
    open_both(out, "ValueError", r"layer_1.npy: its .npy header says shape \(16, 500\)")


# ---- point 18: damaged manifests -------------------------------------------------------------


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        ("[1, 2]", r"manifest.json: not a JSON object \(a list\)"),
        ("{not json", r"manifest.json: not JSON"),
        ("[" * 100_000 + "]" * 100_000, r"manifest.json: not JSON"),
        ('{"format_version": 1}', r"manifest.json: no 'config' entry"),
        ("\xff\xfe", r"manifest.json: not JSON"),
    ],
)
def test_a_damaged_manifest_is_a_clear_error(out, damage, match) -> None:
    with open(os.path.join(out, "manifest.json"), "w", encoding="latin1") as f:
        f.write(damage)
    open_both(out, "ValueError", match + ".*rerun the precompute")


@pytest.mark.parametrize("entry", ["files", "layers", "tokens", "sequences", "config"])
def test_a_missing_manifest_entry_is_named(out, entry) -> None:
    man = manifest(out)
    del man[entry]
    write_manifest(out, man)
    open_both(out, "ValueError", f"manifest.json: no {entry!r} entry")


def test_a_missing_file_entry_is_named(out) -> None:
    man = manifest(out)
    del man["files"]["offsets.npy"]
    write_manifest(out, man)
    open_both(out, "ValueError", r"manifest.json: no entry for 'offsets.npy' in 'files'")


def test_a_non_int_layer_key_is_named(out) -> None:
    man = manifest(out)
    man["layers"]["x"] = man["layers"].pop("1")
    write_manifest(out, man)
    open_both(out, "ValueError", r"manifest.json: layer key 'x' is not an int")


def test_wrong_types_are_named(out) -> None:
    man = manifest(out)
    man["tokens"] = "500"
    write_manifest(out, man)
    open_both(out, "ValueError", r"manifest.json: 'tokens' must be an int >= 0, got '500'")


def test_a_truncated_layer_file_is_named(out) -> None:
    path = os.path.join(out, "layer_15.npy")
    size = os.path.getsize(path)
    os.truncate(path, size - 64)
    open_both(out, "ValueError", r"layer_15.npy: \d+ data bytes, the manifest's shape \(500, 16\)")


def test_a_huge_vocabulary_in_the_manifest_is_a_clear_error(out) -> None:
    man = manifest(out)
    man["config"]["engram_vocab_size"] = [2**61, 2**61]
    write_manifest(out, man)
    open_both(out, "ValueError", r"manifest.json: its config is not valid: .*engram_vocab_size")


def test_a_missing_file_is_named(out) -> None:
    os.remove(os.path.join(out, "layer_15.npy"))
    open_both(out, "FileNotFoundError", r"layer_15.npy is missing")


# ---- point 15 and 18: long lines, deep records, bad Unicode in text and JSONL ---------------


def _precompute_error(path, out, tok: str, exc: str, match: str, **kw) -> None:
    expect_error(
        f"""
        import os
        from engram_rs.offline import precompute
        try:
            precompute({str(path)!r}, {str(out)!r}, "demo", {tok!r}, **{kw!r})
        finally:
            print("LEFT", os.path.exists({str(out)!r}), os.path.exists({str(out) + ".partial"!r}))
        """,
        exc,
        match,
        timeout=120,
    )


def test_a_deep_jsonl_record_names_its_file_and_line(tmp_path, tok) -> None:
    path = tmp_path / "d.jsonl"
    deep = '{"text": ' + "[" * 100_000 + "]" * 100_000 + "}"
    path.write_text('{"text": "a"}\n' + deep + "\n")
    before = path.read_bytes()
    _precompute_error(path, tmp_path / "o", tok, "ValueError", r"d.jsonl, line 2: .*nested")
    assert path.read_bytes() == before
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_a_lone_surrogate_in_jsonl_names_its_file_and_line(tmp_path, tok) -> None:
    path = tmp_path / "s.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b \\ud800 c"}\n{"text": "d"}\n')
    _precompute_error(path, tmp_path / "o", tok, "ValueError", r"s.jsonl, line 3: .*lone surrogate")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


@pytest.mark.parametrize("fmt", ["jsonl", "txt"])
def test_invalid_utf8_is_reported_at_its_real_offset_and_line(tmp_path, tok, fmt) -> None:
    good = (json.dumps({"text": "x" * 90}) + "\n").encode()
    assert len(good) == 103
    bad = good[:50] + b"\xff" + good[51:]
    path = tmp_path / f"u.{fmt}"
    path.write_bytes(good * 500 + bad + good)
    kw = {"seq_len": 8} if fmt == "txt" else {}
    _precompute_error(
        path,
        tmp_path / "o",
        tok,
        "ValueError",
        rf"u.{fmt}, line 501, byte 51550: not UTF-8 text \(invalid start byte\)",
        chunk_tokens=1 << 12,
        **kw,
    )


LONG_LINE = """
    import resource, sys
    from engram_rs.offline import precompute
    src, out, tok, fmt, small = sys.argv[1:6]
    kw = {"seq_len": 8} if fmt == "txt" else {}
    precompute(small, out + "-small", "demo", tok, chunk_tokens=1 << 14, **kw)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        precompute(src, out, "demo", tok, chunk_tokens=1 << 14, **kw)
    except ValueError as e:
        print("ERROR", e)
    print("GROWTH", (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
"""


@pytest.mark.parametrize("fmt", ["jsonl", "txt"])
def test_a_long_line_is_refused_in_bounded_memory(tmp_path, tok, fmt) -> None:
    import subprocess

    path = tmp_path / f"l.{fmt}"
    line = "word " * ((8 << 20) // 5)  # 8 MB without a newline
    text = json.dumps({"text": line}) if fmt == "jsonl" else line
    short = json.dumps({"text": "a b c"}) if fmt == "jsonl" else "a b c"
    path.write_text(short + "\n" + text + "\n" + short + "\n")
    (tmp_path / f"s.{fmt}").write_text(short + "\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(LONG_LINE),
            str(path),
            str(tmp_path / "o"),
            tok,
            fmt,
            str(tmp_path / f"s.{fmt}"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert (
        f"l.{fmt}, line 2 (from byte {len(short) + 1}): longer than 1048576 bytes" in proc.stdout
    ), proc.stdout
    assert "--chunk-tokens" in proc.stdout
    growth = int(proc.stdout.split("GROWTH")[1])
    assert growth < 64e6, proc.stdout  # about 800 MB before the fix
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_a_line_at_the_limit_is_read(tmp_path, tok) -> None:
    from tokenizers import Tokenizer

    text = ("abc " * 300_000)[: (1 << 20) - 20]
    rec = json.dumps({"text": text})
    assert len(rec) < 1 << 20
    (tmp_path / "ok.jsonl").write_text(json.dumps({"text": "a"}) + "\n" + rec)  # no final \n
    idx = precompute(tmp_path / "ok.jsonl", tmp_path / "o", "demo", tok, chunk_tokens=1 << 14)
    ref = Tokenizer.from_file(tok)
    want = [len(e.ids) for e in ref.encode_batch(["a", text], add_special_tokens=True)]
    assert np.diff(idx.offsets).tolist() == want


# ---- the Ray engine's JSONL reader (its functions, without starting Ray) ---------------------


def _ray_pieces(path: str, tok: str, chunk: int = 1 << 12) -> list[str]:
    """What _split_files and _HashPieces make of one JSONL file: each error message."""
    import engram_rs as er
    from engram_rs.offline import Boundary
    from engram_rs.precompute.ray_engine import _ERROR, _HashPieces, _split_files

    data = read(path)
    batch = {"path": np.array([path], object), "bytes": np.array([data], object)}
    pieces = _split_files(
        batch,
        fmt="jsonl",
        kind="rows",
        plan={path: (0, 0, [])},
        chunk=chunk,
        history=2,
        token_dtype="uint32",
        column="input_ids",
    )
    if _ERROR in pieces:
        return [str(pieces[_ERROR][1])]
    hasher = _HashPieces(
        er.EngramConfig.preset("demo").to_dict(),
        tok,
        [1, 15],
        "int32",
        False,
        er.CompressedTokenizer.from_file(tok).fingerprint,
        Boundary("rows"),
        "jsonl",
        "rows",
        [path],
        "text",
    )
    errors = []
    for k in range(len(pieces["file"])):
        one = {key: v[k : k + 1] for key, v in pieces.items()}
        res = hasher(one)
        if _ERROR in res:
            errors.append(str(res[_ERROR][1]))
    return errors


def test_ray_jsonl_reader_names_file_and_line(tmp_path, tok) -> None:
    pytest.importorskip("ray")
    good = (json.dumps({"text": "x" * 90}) + "\n").encode()
    bad = good[:50] + b"\xff" + good[51:]
    (tmp_path / "u.jsonl").write_bytes(good * 1000 + bad + good)  # in its second piece
    (tmp_path / "s.jsonl").write_text('{"text": "a"}\n{"text": "\\udc00"}\n')
    deep = '{"text": ' + "[" * 100_000 + "]" * 100_000 + "}"
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n\n' + deep + "\n")
    (tmp_path / "l.jsonl").write_text('{"text": "a"}\n' + json.dumps({"text": "y" * (2 << 20)}))
    (tmp_path / "ok.jsonl").write_bytes(good * 3000 + b"\n\n" + good)  # several pieces
    cases = {
        "ok.jsonl": r"^CASE ok.jsonl $",
        "u.jsonl": r"u.jsonl, line 1001, byte 103050: not UTF-8 text \(invalid start byte\)",
        "s.jsonl": r"s.jsonl, line 2: .*lone surrogate",
        "d.jsonl": r"d.jsonl, line 3: .*nested",
        "l.jsonl": r"l.jsonl, line 2 \(from byte 14\): longer than 1048576 bytes",
    }
    code = f"""
        import sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_hostile_readers import _ray_pieces
        for name in {sorted(cases)!r}:
            print("CASE", name, " || ".join(_ray_pieces({str(tmp_path)!r} + "/" + name, {tok!r})))
    """
    res = run_isolated(code, timeout=120)
    assert res.returncode == 0, res
    assert "CASE ok.jsonl \n" in res.stdout + "\n", res  # a good file: no error
    import re

    got = {line.split()[1]: line for line in res.stdout.splitlines() if line.startswith("CASE")}
    for name, pattern in cases.items():
        assert re.search(pattern, got.get(name, "")), (name, got.get(name), res)
