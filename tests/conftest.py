from __future__ import annotations

import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))

DATA = pathlib.Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def golden() -> dict:
    return json.loads((DATA / "hash_vectors.json").read_text())
