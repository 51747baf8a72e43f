"""IA3 (learned rescaling vectors) on 4-bit bases."""

from ...nn.ia3 import IA3Linear4bit
from ..registry import Method, register
from . import model
from .config import IA3Config

__all__ = ["IA3Config"]

register(
    Method(
        IA3Config,
        "ia3",
        inject=model.inject_adapter,
        file_parameters=model.file_parameters,
        layers=(IA3Linear4bit,),
        sharded_start=model.start_sharded,
        examples={
            "default": lambda r=4, steps=10: IA3Config(
                target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
            )
        },
    )
)
