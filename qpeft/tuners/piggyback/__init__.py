"""Piggyback: learned binary masks over 4-bit weights."""

from ...nn.piggyback import MaskedLinear4bit
from ..registry import Method, register
from ..selective import PROJECTIONS
from . import model
from .config import PiggybackConfig

__all__ = ["PiggybackConfig"]

register(
    Method(
        PiggybackConfig,
        "piggyback",
        inject=model.inject_adapter,
        file_parameters=model.file_parameters,
        layers=(MaskedLinear4bit,),
        load=model.load,
        examples={"default": lambda r=4, steps=10: PiggybackConfig(target_modules=PROJECTIONS)},
    )
)
