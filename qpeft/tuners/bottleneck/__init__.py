"""Bottleneck adapters (Houlsby, Pfeiffer) on a 4-bit base."""

from ..registry import Method, register
from . import model
from .config import BottleneckConfig

__all__ = ["BottleneckConfig"]

register(
    Method(
        BottleneckConfig,
        "bottleneck",
        inject=model.inject_adapter,
        file_parameters=model.file_parameters,
        mergeable=False,
        examples={
            "default": lambda r=4, steps=10: BottleneckConfig(style="houlsby", bottleneck_size=r),
            "pfeiffer": lambda r=4, steps=10: BottleneckConfig(style="pfeiffer", bottleneck_size=r),
        },
    )
)
