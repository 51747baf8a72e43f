"""Drop-in modules (``qpeft.nn``)."""

from .linear4bit import Linear4bit
from .lora import LoraLinear4bit

__all__ = ["Linear4bit", "LoraLinear4bit"]
