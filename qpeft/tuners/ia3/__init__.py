"""IA3 (learned rescaling vectors) on 4-bit bases."""

from .config import IA3Config

__all__ = ["IA3Config"]
