"""The progress bar of long runs (the precompute, the training demo): tqdm's, on a terminal."""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["progress_bar"]


def progress_bar(
    total: int | None,
    unit: str,
    enabled: bool | None,
    desc: str,
    *,
    initial: int = 0,
    unit_scale: bool = False,
) -> Any:
    """A tqdm bar (``tqdm.auto``: it shows in Jupyter too), or None when ``enabled`` is False
    or tqdm is missing. ``enabled=None``: only when stderr is a terminal."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, initial=initial, unit=unit, unit_scale=unit_scale, desc=desc)
