"""engram_rs: Rust-accelerated DeepSeek Engram conditional memory."""

from ._engram_rs import __version__, clear_buffer_pool, simd_available
from .compress import CompressedTokenizer, normalize
from .config import PRESETS, EngramConfig
from .hashing import HashState, NgramHasher, layer_multipliers, pack_sequences
from .loader import HashCollate, HashedTokens, torch_collate
from .precompute import PrecomputedIndices, precompute, verify
from .table import HostTable, Prefetch

__all__ = [
    "PRESETS",
    "CompressedTokenizer",
    "EngramConfig",
    "HashCollate",
    "HashState",
    "HashedTokens",
    "HostTable",
    "NgramHasher",
    "PrecomputedIndices",
    "Prefetch",
    "__version__",
    "clear_buffer_pool",
    "layer_multipliers",
    "normalize",
    "pack_sequences",
    "precompute",
    "simd_available",
    "torch_collate",
    "verify",
]
