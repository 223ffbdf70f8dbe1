"""``engram-rs bench train``: a small run prints the table, the goal lines and the RSS line."""

from __future__ import annotations

import re

import pytest
from engram_rs.cli import main

pytest.importorskip("torch")


def test_bench_train_prints_the_table_and_goal_lines(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench", "train", "--rows", "100000", "--lookups", "20000", "--steps", "2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("machine: ")
    header = next(line for line in out.splitlines() if line.startswith("contender"))
    for column in ("best ms", "median ms", "x torch", "peak RSS GiB", "table+state GiB"):
        assert column in header
    assert "min traffic GB/s" in header and "ceiling GB/s" in header
    for name in (
        "engram_rs SparseAdam",
        "engram_rs SparseRowwiseAdagrad",
        "torch Embedding(sparse) + SparseAdam",
        "torch Embedding(sparse) + Adagrad",
    ):
        row = re.search(rf"^{re.escape(name)} +(\d+\.\d\d) +(\d+\.\d\d) +(\d+\.\d\d) ", out, re.M)
        assert row is not None, name
        best, median, ratio = (float(x) for x in row.groups())
        assert 0 < best <= median and ratio > 0
        if name.startswith("torch"):
            assert ratio == 1.0
    for what in ("SparseAdam", "Adagrad"):
        assert re.search(rf"^{what}: \d+\.\dx torch \(goal >= 5x: (met|NOT met)\)$", out, re.M)
    assert re.search(r"gather ceiling .*: \d+\.\d\d GB/s", out)
    rss = re.search(
        r"^peak RSS beyond the interpreter, table and state: .*(met|NOT met)\)$", out, re.M
    )
    assert rss is not None


def test_bench_train_refuses_bad_sizes_and_lists_its_options(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as e:
        main(["bench", "train", "--lookups", "0"])
    assert e.value.code == 2
    assert "--lookups" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["bench", "train", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for option in ("--rows", "--dim", "--lookups", "--steps"):
        assert option in text
    assert "--batch-rows" not in text and "--tokens" not in text
