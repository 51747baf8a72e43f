"""LoRA, rsLoRA, DoRA on 4-bit bases."""

from .config import LoraConfig

__all__ = ["LoraConfig"]
