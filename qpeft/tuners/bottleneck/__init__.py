"""Bottleneck adapters (Houlsby, Pfeiffer) on a 4-bit base."""

from .config import BottleneckConfig

__all__ = ["BottleneckConfig"]
