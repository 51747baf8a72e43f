"""Selective fine-tuning on a 4-bit base: BitFit (biases) and layer-wise (chosen layers in full)."""

from ..registry import Method, register
from . import model
from .config import BitFitConfig, LayerwiseConfig

__all__ = ["BitFitConfig", "LayerwiseConfig"]

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

register(
    Method(
        BitFitConfig,
        "bitfit",
        inject=model.inject_bitfit,
        file_parameters=model.bitfit_parameters,
        own_parameters=True,
        unfreeze=model.unfreeze_own,
        examples={"default": lambda r=4, steps=10: BitFitConfig(bias_modules=PROJECTIONS, add_missing_bias=True)},
    )
)
register(
    Method(
        LayerwiseConfig,
        "layerwise",
        inject=model.inject_layerwise,
        file_parameters=model.layerwise_parameters,
        own_parameters=True,
        unfreeze=model.unfreeze_own,
        example_lr=3e-3,
        examples={"default": lambda r=4, steps=10: LayerwiseConfig(last_k=1)},
    )
)
