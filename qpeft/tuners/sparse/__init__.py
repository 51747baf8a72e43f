"""Sparse fine-tuning (a sparse trainable difference on the 4-bit weights)."""

from .config import SparseConfig

__all__ = ["SparseConfig"]
