"""Drop-in modules (``qpeft.nn``)."""

from .ia3 import IA3Linear4bit
from .linear4bit import Linear4bit
from .lora import LoraLinear4bit, LoraSpec

__all__ = ["IA3Linear4bit", "Linear4bit", "LoraLinear4bit", "LoraSpec"]
