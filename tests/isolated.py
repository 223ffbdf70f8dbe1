"""Runs a reproducer in a fresh interpreter, so a crash fails the test instead of pytest."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from typing import Any

import pytest

PRELUDE = """
import sys, traceback
def _report(exc):
    print("EXC", type(exc).__module__, type(exc).__qualname__, file=sys.stderr)
    print("MSG", str(exc).replace("\\n", " | "), file=sys.stderr)
"""


class Outcome:
    """How the child ended: its exit code, output, and the exception it reported (if any)."""

    def __init__(self, proc: subprocess.CompletedProcess[str]) -> None:
        self.returncode = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        self.exc_type: str | None = None
        self.message: str | None = None
        for line in proc.stderr.splitlines():
            if line.startswith("EXC "):
                self.exc_type = line.split(" ", 2)[2]
            elif line.startswith("MSG "):
                self.message = line[4:]

    def __repr__(self) -> str:
        return (
            f"Outcome(rc={self.returncode}, exc={self.exc_type}, msg={self.message!r},\n"
            f"stdout={self.stdout[-2000:]!r},\nstderr={self.stderr[-2000:]!r})"
        )


def run_isolated(code: str, timeout: float = 120, env: dict[str, str] | None = None) -> Outcome:
    """Runs ``code`` in a child interpreter; fails if it died of a signal or timed out.

    Inside ``code``, call ``_report(exc)`` in an ``except BaseException`` block to hand the
    exception type and message back; they land in ``Outcome.exc_type``/``Outcome.message``.
    """
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )
    out = Outcome(proc)
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        raise AssertionError(f"the child was killed by {name}: {out!r}")
    return out


def expect_error(code: str, exc_type: str, match: str, **kwargs: object) -> Outcome:
    """Runs ``code`` (which must raise) and checks the exception it reported, cleanly."""
    wrapped = (
        "try:\n"
        + textwrap.indent(textwrap.dedent(code), "    ")
        + (
            "\nexcept BaseException as exc:\n    _report(exc)\n    sys.exit(3)\n"
            "print('NO EXCEPTION')\n"
        )
    )
    out = run_isolated(wrapped, **kwargs)  # type: ignore[arg-type]
    assert out.returncode == 3, f"expected {exc_type}, got {out!r}"
    assert out.exc_type == exc_type, f"expected {exc_type}, got {out!r}"
    import re

    assert out.message is not None and re.search(match, out.message), (
        f"message {out.message!r} does not match {match!r}"
    )
    return out


def run_in_small_tmpfs(tmp_path: Any, code: str, size: str = "4m") -> Outcome:
    """Runs ``code`` in a child that sees a ``size`` tmpfs mounted on ``tmp_path / "disk"``."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) to mount a small tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m none {disk}"],
        capture_output=True,
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {probe.stderr.decode().strip()}")
    wrapped = (
        "try:\n"
        + textwrap.indent(textwrap.dedent(code), "    ")
        + ("\nexcept BaseException as exc:\n    _report(exc)\n    sys.exit(3)\n")
    )
    proc = subprocess.run(
        [
            "unshare",
            "-rm",
            "sh",
            "-c",
            f'mount -t tmpfs -o size={size} none {disk} && exec "$0" -c "$1"',
            sys.executable,
            PRELUDE + f"DISK = {str(disk)!r}\n" + wrapped,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = Outcome(proc)
    assert proc.returncode >= 0 and proc.returncode != 139, f"the child crashed: {out!r}"
    return out
