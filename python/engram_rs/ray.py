"""Engram hashing on Ray Data: :class:`HashBatches` for your own pipelines (``Dataset.map_batches``)
and ``run_ray``, the precompute's ``engine="ray"``; both live in
:mod:`engram_rs.precompute.ray_engine`."""

from __future__ import annotations

from .precompute.ray_engine import HashBatches
from .precompute.ray_engine import run as run_ray

__all__ = ["HashBatches", "run_ray"]
