"""The precompute job under hostile directories, edited resume state, changing inputs, races and
bad options: each case runs in its own interpreter (a hang is a timeout, a crash a failure), and
checks the exception, its message and what is left on disk, byte for byte where it must be."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from engram_rs.bench import deepseek_v4_tokenizer_json
from engram_rs.offline import MARKER, PrecomputedIndices, verify
from isolated import expect_error, run_isolated

VOCAB = 129280


@pytest.fixture(scope="module")
def tok() -> str:
    return deepseek_v4_tokenizer_json()


def _prelude(tmp: Path, tok: str) -> str:
    return textwrap.dedent(
        f"""
        import json, os, numpy as np
        from engram_rs.precompute import job as offline
        from engram_rs.offline import precompute
        TMP, TOK = {str(tmp)!r}, {tok!r}
        INP = os.path.join(TMP, "in.bin")
        OUT = os.path.join(TMP, "out")
        def run(**kw):
            args = dict(tokenizer=TOK, seq_len=64, chunk_tokens=1000, commit_seconds=0)
            args.update(kw)
            return precompute(INP, OUT, **args)
        """
    )


def _input(tmp: Path, n: int = 20000) -> Path:
    p = tmp / "in.bin"
    np.random.default_rng(0).integers(0, VOCAB, size=n).astype(np.uint32).tofile(p)
    return p


def _refuse(tmp: Path, tok: str, body: str, exc: str, match: str) -> None:
    expect_error(_prelude(tmp, tok) + textwrap.dedent(body), exc, match, timeout=120)


def _interrupted(tmp: Path, tok: str) -> Path:
    """An interrupted run with resume state: it stops (KeyboardInterrupt) where it would finish."""
    _input(tmp)
    out = run_isolated(
        _prelude(tmp, tok)
        + textwrap.dedent(
            """
            def stop(*a, **k):
                raise KeyboardInterrupt
            offline._finalize = stop
            try:
                run()
            except KeyboardInterrupt:
                print("STOPPED")
            """
        )
    )
    assert "STOPPED" in out.stdout, out
    partial = tmp / "out.partial"
    assert (partial / "state.json").is_file() and (partial / MARKER).is_file()
    return partial


def _snapshot(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(root))] = "link:" + os.readlink(p)
        elif p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# ---- 4: only what the precompute made is ever removed ------------------------------------------


@pytest.mark.parametrize("flag", ["overwrite", "resume"])
def test_a_partial_folder_of_the_users_is_never_removed(tmp_path, tok, flag) -> None:
    _input(tmp_path)
    mine = tmp_path / "out.partial"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("a week of work")
    (mine / "sub" / "data.bin").write_bytes(b"\x01" * 100)
    before = _snapshot(mine)
    _refuse(
        tmp_path,
        tok,
        f"run({flag}=True)\n",
        "FileExistsError",
        r"out\.partial was not made by engram_rs precompute \(it holds no "
        r"\.engram_rs-precompute file\): it is left untouched",
    )
    assert _snapshot(mine) == before
    assert not (tmp_path / "out").exists()


def test_bad_input_removes_only_the_partial_run_it_made(tmp_path, tok) -> None:
    p = _input(tmp_path)
    ids = np.fromfile(p, np.uint32)
    ids[15000] = VOCAB + 5  # beyond the vocabulary, in a late chunk
    ids.tofile(p)
    _refuse(tmp_path, tok, "run()\n", "ValueError", r"token id 129285 is outside")
    assert not (tmp_path / "out.partial").exists() and not (tmp_path / "out").exists()
    # A user's folder of that name, with --resume after the bad input: left as it was.
    mine = tmp_path / "out.partial"
    mine.mkdir()
    (mine / "keep").write_text("x")
    _refuse(tmp_path, tok, "run(resume=True)\n", "FileExistsError", "not made by engram_rs")
    assert (mine / "keep").read_text() == "x"


def test_overwrite_never_replaces_a_result_it_did_not_make(tmp_path, tok) -> None:
    _input(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text('{"job": {}}')
    (out / "mine.npy").write_bytes(b"\x02" * 64)
    before = _snapshot(out)
    _refuse(
        tmp_path,
        tok,
        "run(overwrite=True)\n",
        "FileExistsError",
        r"out holds a manifest\.json but was not made by engram_rs precompute .*--overwrite "
        r"leaves it untouched",
    )
    assert _snapshot(out) == before


def test_overwrite_replaces_its_own_result(tmp_path, tok) -> None:
    _input(tmp_path)
    out = run_isolated(
        _prelude(tmp_path, tok)
        + "run()\nidx = run(overwrite=True, layers=[1])\nprint('LAYERS', idx.layer_ids)\n"
    )
    assert out.returncode == 0 and "LAYERS [1]" in out.stdout, out
    assert (tmp_path / "out" / MARKER).is_file()
    assert not list(tmp_path.glob("out.old-*")) and not (tmp_path / "out.partial").exists()


# ---- 5: one run at a time on one DIR ------------------------------------------------------------


def test_a_second_run_on_a_locked_job_is_refused_and_changes_nothing(tmp_path, tok) -> None:
    partial = _interrupted(tmp_path, tok)
    before = _snapshot(partial)
    fd = os.open(partial, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running precompute holds it
        for flag in ("overwrite", "resume"):
            _refuse(
                tmp_path,
                tok,
                f"run({flag}=True)\n",
                "FileExistsError",
                r"out\.partial is in use by another precompute run of the same --out: wait",
            )
        assert _snapshot(partial) == before
    finally:
        os.close(fd)
    out = run_isolated(_prelude(tmp_path, tok) + "run(resume=True)\nprint('DONE')\n")
    assert "DONE" in out.stdout, out
    assert verify(tmp_path / "out")["rehashed_sequences"] > 0


def test_the_lock_is_held_for_the_whole_run(tmp_path, tok) -> None:
    """A run checks, while it hashes, that DIR.partial is locked by it (flock from outside
    fails), and a concurrent --overwrite is refused without damaging it."""
    _input(tmp_path, 200000)
    code = _prelude(tmp_path, tok) + textwrap.dedent(
        """
        import fcntl, subprocess, sys
        real = offline._run_local
        def spy(run, *a, **k):
            fd = os.open(run.partial, os.O_RDONLY | os.O_DIRECTORY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                print("NOT LOCKED")
            except BlockingIOError:
                print("LOCKED")
            os.close(fd)
            other = subprocess.run(
                [sys.executable, "-c", PRE + "run(overwrite=True)"],
                capture_output=True, text=True, timeout=60,
            )
            print("OTHER", other.returncode, other.stderr.strip().splitlines()[-1])
            return real(run, *a, **k)
        offline._run_local = spy
        run()
        print("DONE")
        """
    )
    pre = _prelude(tmp_path, tok)
    out = run_isolated(f"PRE = {pre!r}\n" + code, timeout=180)
    assert "LOCKED" in out.stdout and "NOT LOCKED" not in out.stdout, out
    assert "in use by another precompute run" in out.stdout, out
    assert "DONE" in out.stdout, out
    idx = PrecomputedIndices(tmp_path / "out")
    assert idx.num_tokens == 200000
    assert verify(tmp_path / "out")["rehashed_sequences"] > 0


# ---- 7: links in the job's directories are never followed ---------------------------------------


@pytest.mark.parametrize("name", ["layer_1.npy", "tokens.npy", "state.json"])
@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_a_planted_link_in_the_partial_run_is_refused(tmp_path, tok, name, kind) -> None:
    partial = _interrupted(tmp_path, tok)
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious " * 1000)
    (partial / name).unlink()
    if kind == "symlink":
        (partial / name).symlink_to(victim)
    else:
        os.link(victim, partial / name)
    before = _snapshot(tmp_path)
    _refuse(
        tmp_path,
        tok,
        "run(resume=True)\n",
        "FileExistsError",
        rf"{name} is not a file this precompute made .*left untouched",
    )
    assert _snapshot(tmp_path) == before
    assert victim.read_bytes() == b"precious " * 1000


def test_a_partial_directory_that_is_a_link_is_refused(tmp_path, tok) -> None:
    _input(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / MARKER).write_text("{}")
    (elsewhere / "data").write_text("keep")
    (tmp_path / "out.partial").symlink_to(elsewhere)
    for flag in ("resume", "overwrite"):
        _refuse(
            tmp_path,
            tok,
            f"run({flag}=True)\n",
            "FileExistsError",
            r"out\.partial is a symbolic link, not a directory the precompute made",
        )
    assert (elsewhere / "data").read_text() == "keep" and (tmp_path / "out.partial").is_symlink()


# ---- 10: the resume state is checked, the inputs are summed as read -----------------------------


def _edit_state(partial: Path, **changes: object) -> None:
    p = partial / "state.json"
    state = json.loads(p.read_text())
    for k, v in changes.items():
        if k.startswith("bytes."):
            state["bytes"][k[6:]] = v
        else:
            state[k] = v
    p.write_text(json.dumps(state))


@pytest.mark.parametrize(
    "edit, match",
    [
        ({"bytes.tokens.npy": 10**9}, r"bytes of tokens\.npy"),
        ({"cursor": {"file": 0, "pos": 10**9}}, r"beyond the inputs"),
        ({"cursor": {"file": 3, "pos": 0}}, r"beyond the inputs"),
        ({"tokens": -1}, r"tokens is -1, not a count"),
        ({"units": 5}, r"5 units done"),
        ({"ctx": [1, 2, 3, 4, 5, 6, 7]}, r"ctx"),
        ({"bytes": []}, r"bytes of \[\]"),
    ],
)
def test_an_edited_resume_state_is_refused(tmp_path, tok, edit, match) -> None:
    partial = _interrupted(tmp_path, tok)
    _edit_state(partial, **edit)
    before = _snapshot(partial)
    _refuse(
        tmp_path,
        tok,
        "run(resume=True)\n",
        "FileExistsError",
        r"state\.json does not match the run's files and inputs \(.*" + match,
    )
    assert _snapshot(partial) == before and not (tmp_path / "out").exists()


def test_a_truncated_output_file_is_refused_on_resume(tmp_path, tok) -> None:
    partial = _interrupted(tmp_path, tok)
    with open(partial / "layer_1.npy", "r+b") as f:
        f.truncate(200)
    _refuse(
        tmp_path,
        tok,
        "run(resume=True)\n",
        "FileExistsError",
        r"layer_1\.npy holds 72 bytes, the state says",
    )


def test_a_damaged_state_is_refused(tmp_path, tok) -> None:
    partial = _interrupted(tmp_path, tok)
    (partial / "state.json").write_text("[" * 100000)
    _refuse(tmp_path, tok, "run(resume=True)\n", "FileExistsError", r"state\.json is damaged")


def test_an_input_that_changes_during_the_run_is_refused(tmp_path, tok) -> None:
    _input(tmp_path)
    _refuse(
        tmp_path,
        tok,
        """
        real = offline._run_local
        def grow(*a, **k):
            counts = real(*a, **k)
            with open(INP, "ab") as f:
                f.write(np.zeros(64, np.uint32).tobytes())
            return counts
        offline._run_local = grow
        run()
        """,
        "ValueError",
        r"input .*in\.bin changed while it was hashed \(80000 bytes, .* 80256 bytes",
    )
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_the_manifest_checksums_the_inputs_as_hashed(tmp_path, tok) -> None:
    """The checksum is computed as the run reads (no second pass), and equals the file's."""
    import engram_rs._engram_rs as core

    _input(tmp_path)
    out = run_isolated(
        _prelude(tmp_path, tok)
        + textwrap.dedent(
            """
            import engram_rs._engram_rs as core
            def no_second_pass(path):
                raise AssertionError("a second pass over " + path)
            core.file_checksum = no_second_pass
            run()
            print("DONE")
            """
        )
    )
    assert "DONE" in out.stdout, out
    man = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert man["inputs"][0]["checksum"] == core.file_checksum(str(tmp_path / "in.bin"))
    # and after a resume (the sum restarts from the committed cursor)
    (tmp_path / "r").mkdir()
    partial = _interrupted(tmp_path / "r", tok)
    out = run_isolated(_prelude(tmp_path / "r", tok) + "run(resume=True)\n")
    assert out.returncode == 0, out
    again = json.loads((tmp_path / "r" / "out" / "manifest.json").read_text())
    assert again["inputs"][0]["checksum"] == core.file_checksum(str(tmp_path / "r" / "in.bin"))
    assert not partial.exists()


def _arrow_inputs(tmp: Path) -> dict[str, Path]:
    """A 2-column dataset of ragged token rows, as Parquet (several row groups) and as Arrow
    IPC files: the file format, the stream format, and a zstd-compressed file."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rng = np.random.default_rng(3)
    rows = [rng.integers(0, VOCAB, rng.integers(0, 60)).tolist() for _ in range(20000)]
    table = pa.table(
        {
            "input_ids": pa.array(rows, pa.list_(pa.int64())),
            "other": pa.array(rng.integers(0, 9, len(rows))),
        }
    )
    paths = {"parquet": tmp / "d.parquet"}
    pq.write_table(table, paths["parquet"], row_group_size=2000)
    for name, new, options in (
        ("arrow-file", pa.ipc.new_file, None),
        ("arrow-stream", pa.ipc.new_stream, None),
        ("arrow-zstd", pa.ipc.new_file, pa.ipc.IpcWriteOptions(compression="zstd")),
    ):
        paths[name] = tmp / f"{name}.arrow"
        with pa.OSFile(str(paths[name]), "wb") as sink:
            with new(sink, table.schema, options=options) as writer:
                for batch in table.to_batches(max_chunksize=2000):
                    writer.write_batch(batch)
    return paths


@pytest.mark.parametrize("kind", ["parquet", "arrow-file", "arrow-stream", "arrow-zstd"])
def test_parquet_and_arrow_inputs_are_checksummed_as_read(tmp_path, tok, kind) -> None:
    """Each byte of a Parquet/Arrow input is summed once, and all but its footer while the run
    reads the row groups (no second pass at the end); a compressed Arrow file, whose batches
    are not views of the file, is summed whole once the run is past it. The checksum is the
    file's."""
    import engram_rs._engram_rs as core
    from engram_rs.offline import precompute
    from engram_rs.precompute import job

    path = _arrow_inputs(tmp_path)[kind]
    size = path.stat().st_size
    reads: list[tuple[int, int, bool]] = []
    finished = False
    real_read, real_finalize = job.InputSums._read, job._finalize

    def read(self, i, upto):
        if upto > self.done[i]:
            reads.append((self.done[i], upto, finished))
        real_read(self, i, upto)

    def finalize(*a, **k):
        nonlocal finished
        finished = True
        return real_finalize(*a, **k)

    mp = pytest.MonkeyPatch()
    mp.setattr(job.InputSums, "_read", read)
    mp.setattr(job, "_finalize", finalize)
    try:
        precompute(path, tmp_path / "out", tokenizer=tok, chunk_tokens=5000, progress=False)
    finally:
        mp.undo()
    starts, ends = [r[0] for r in reads], [r[1] for r in reads]
    assert starts == [0, *ends[:-1]] and ends[-1] == size  # every byte once, in order
    after = sum(b - a for a, b, late in reads if late)
    if kind == "arrow-zstd":
        assert after == size
    else:
        assert len([r for r in reads if not r[2]]) >= 4  # advanced group by group
        assert after < 0.02 * size, (after, size)  # the footer only
    man = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert man["inputs"][0]["checksum"] == core.file_checksum(str(path))


# ---- 14, 18: options ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, match",
    [
        ("threads=10**20", r"threads \(--threads\) must be an int in \[0, 4096\]"),
        ("threads=1000000", r"threads \(--threads\) must be an int in \[0, 4096\]"),
        (
            "chunk_tokens=10**15",
            r"chunk_tokens \(--chunk-tokens\) must be an int in \[1, 2\*\*30\]",
        ),
        ("commit_seconds=float('nan')", r"commit_seconds \(--commit-seconds\) must be a finite"),
        ("commit_seconds=-1.0", r"commit_seconds \(--commit-seconds\) must be a finite"),
    ],
)
def test_bad_options_are_refused_before_any_file(tmp_path, tok, kw, match) -> None:
    _input(tmp_path)
    _refuse(tmp_path, tok, f"run({kw})\n", "ValueError", match)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.bin"]


@pytest.mark.parametrize(
    "args, match",
    [
        (["--threads", "1000000"], r"--threads\) must be an int in \[0, 4096\]"),
        (["--threads", str(10**20)], r"--threads\) must be an int in \[0, 4096\]"),
        (["--commit-seconds", "nan"], r"--commit-seconds\) must be a finite number"),
        (["--chunk-tokens", str(10**15)], r"--chunk-tokens\) must be an int in \[1, 2\*\*30\]"),
    ],
)
def test_bad_cli_options_are_one_line(tmp_path, tok, args, match) -> None:
    _input(tmp_path)
    cmd = [sys.executable, "-m", "engram_rs", "precompute", str(tmp_path / "in.bin")]
    cmd += ["--out", str(tmp_path / "out"), "--tokenizer", tok, "--seq-len", "64", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc
    assert "Traceback" not in proc.stderr, proc.stderr
    import re

    assert re.search(match, proc.stderr), proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.bin"]


# ---- 19: temporaries and modes ------------------------------------------------------------------


def test_a_kill_during_a_commit_leaves_no_temporary_in_the_result(tmp_path, tok) -> None:
    partial = _interrupted(tmp_path, tok)
    (partial / ".state.json.1a2b3c.tmp").write_text("{half")  # as a kill mid-commit leaves
    out = run_isolated(_prelude(tmp_path, tok) + "run(resume=True)\n")
    assert out.returncode == 0, out
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert not [n for n in names if n.endswith(".tmp")], names
    assert "state.json" not in names


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_every_file_of_the_result_follows_the_umask(tmp_path, tok, umask) -> None:
    _input(tmp_path)
    out = run_isolated(_prelude(tmp_path, tok) + f"os.umask({umask:#o})\nrun()\n")
    assert out.returncode == 0, out
    for p in (tmp_path / "out").iterdir():
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask, (p.name, oct(p.stat().st_mode))
