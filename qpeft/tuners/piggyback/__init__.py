"""Piggyback: learned binary masks over 4-bit weights."""

from .config import PiggybackConfig

__all__ = ["PiggybackConfig"]
