"""Selective fine-tuning on a 4-bit base: BitFit (biases) and layer-wise (chosen layers in full)."""

from .config import BitFitConfig, LayerwiseConfig

__all__ = ["BitFitConfig", "LayerwiseConfig"]
