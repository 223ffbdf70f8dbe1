"""PyTorch integration: the Engram module, embeddings over host tables, fused sparse optimizers.

Importing this module registers the custom ops ``torch.ops.engram_rs.host_gather`` and
``torch.ops.engram_rs.host_sparse_step`` (see :mod:`engram_rs.torch.ops`).
"""

from __future__ import annotations

from . import ops
from .modules import Engram, EngramEmbedding, MultiHeadEmbedding, ShortConv
from .optim import SparseAdam, SparseOptimizer, SparseRowwiseAdagrad, SparseSGD

__all__ = [
    "Engram",
    "EngramEmbedding",
    "MultiHeadEmbedding",
    "ShortConv",
    "SparseAdam",
    "SparseOptimizer",
    "SparseRowwiseAdagrad",
    "SparseSGD",
    "ops",
]
