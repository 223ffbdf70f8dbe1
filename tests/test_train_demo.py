"""engram-rs train-demo: killed and resumed from its checkpoint, it gives the losses of one
uninterrupted run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("torch")


def _cmd(out: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "engram_rs",
        "train-demo",
        "--out",
        out,
        "--steps",
        "8",
        "--checkpoint-every",
        "2",
        "--batch",
        "4",
        "--seq-len",
        "32",
        "--no-progress",
        *extra,
    ]


def test_killed_and_resumed_equals_uninterrupted(tmp_path) -> None:
    whole = subprocess.run(_cmd(str(tmp_path / "whole")), capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr
    assert "held-out loss" in whole.stdout and "unigram model's" in whole.stdout
    want = json.loads((tmp_path / "whole" / "losses.json").read_text())
    assert len(want) == 8

    out = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(str(out)), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ckpt = out / "checkpoint.safetensors"
    deadline = time.monotonic() + 120
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not (out / "losses.json").exists()
    resumed = subprocess.run(_cmd(str(out), "--resume"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    assert json.loads((out / "losses.json").read_text()) == want
