"""Drop-in modules (``qpeft.nn``)."""

from .linear4bit import Linear4bit

__all__ = ["Linear4bit"]
