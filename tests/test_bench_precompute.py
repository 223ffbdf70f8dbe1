"""``engram-rs bench precompute``: a small run prints the table and the ratios, and cleans up."""

from __future__ import annotations

import os
import pathlib
import re

import pytest
from engram_rs.cli import main


def test_bench_precompute_prints_the_table_and_ratios(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # the default --dir: a temporary directory under the cwd
    assert main(["bench", "precompute", "--tokens", "200000", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("machine: ")
    for what in ("engram-rs precompute", "numpy pipeline", "hash ceiling", "I/O ceiling"):
        assert what in out
    assert "x numpy" in out and "of slower ceiling" in out
    assert re.search(r"precompute vs the slower ceiling .*: \d+\.\d\d \(goal >= 0\.80", out)
    assert re.search(r"precompute vs the numpy pipeline: \d+\.\d\dx \(goal >= 3x", out)
    rss = re.search(r"peak RSS of the precompute child: (\d+) MiB", out)
    assert rss is not None and 0 < int(rss.group(1)) < 4096
    per_token = re.search(r"bytes written per token: (\d+\.\d+)", out)
    # Two layers of 16 int32 ids, the uint32 token, and a little for offsets and headers.
    assert per_token is not None and 132 <= float(per_token.group(1)) < 134
    assert os.listdir(tmp_path) == []  # the corpus and every output were removed


def test_bench_precompute_refuses_bad_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["bench", "precompute", "--tokens", "0"])
    assert e.value.code == 2
    assert "--tokens" in capsys.readouterr().err


def test_bench_lists_precompute_with_its_own_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    assert e.value.code == 0
    assert "{hash,gather,compress,precompute,train,v41,stats,tiered}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["bench", "precompute", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for option in ("--tokens", "--repeats", "--dir", "--seq-len"):
        assert option in text
    assert "--batch-rows" not in text and "--preset" not in text
