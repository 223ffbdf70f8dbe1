"""engram_rs: Rust-accelerated DeepSeek Engram conditional memory."""

from ._engram_rs import __version__, simd_available
from .config import PRESETS, EngramConfig
from .hashing import HashState, NgramHasher, layer_multipliers

__all__ = [
    "PRESETS",
    "EngramConfig",
    "HashState",
    "NgramHasher",
    "__version__",
    "layer_multipliers",
    "simd_available",
]
