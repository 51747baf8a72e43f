"""AdaLoRA (adaptive rank allocation) on 4-bit bases."""

from .config import AdaLoraConfig

__all__ = ["AdaLoraConfig"]
