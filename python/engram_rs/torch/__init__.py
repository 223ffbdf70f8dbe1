"""PyTorch integration: the demo's Engram module and DeepSeek-V4.1-Flash's layer (EngramV41),
embeddings over host tables, fused sparse optimizers.

Importing this module registers the custom ops ``torch.ops.engram_rs.host_gather`` and
``torch.ops.engram_rs.host_sparse_step`` (see :mod:`engram_rs.torch.ops`).
"""

from __future__ import annotations

from . import ops
from .modules import Engram, EngramEmbedding, MultiHeadEmbedding, ShortConv
from .optim import SparseAdam, SparseOptimizer, SparseRowwiseAdagrad, SparseSGD
from .v41 import EngramV41

__all__ = [
    "Engram",
    "EngramEmbedding",
    "EngramV41",
    "MultiHeadEmbedding",
    "ShortConv",
    "SparseAdam",
    "SparseOptimizer",
    "SparseRowwiseAdagrad",
    "SparseSGD",
    "ops",
]
