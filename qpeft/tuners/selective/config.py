"""Selective fine-tuning configs (qpeft's own methods and file format): BitFit and layer-wise fine-tuning."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ..config import BOOL, LAYERS, NAMES, SIZE, WholeModelConfig, checked, optional


@dataclasses.dataclass
class BitFitConfig(WholeModelConfig):
    """BitFit: only bias terms train. ``bias_modules``: the modules whose biases train (names or name suffixes,
    or one regex; None: every module that has a bias); ``add_missing_bias``: selected linear layers without a bias
    get a zero one (trained)."""

    peft_type: ClassVar[str] = "QPEFT_BITFIT"

    bias_modules: list[str] | str | None = checked(None, NAMES)
    add_missing_bias: bool = checked(False, BOOL)


@dataclasses.dataclass
class LayerwiseConfig(WholeModelConfig):
    """Layer-wise fine-tuning: the transformer layers ``layers`` (indices), or the last ``last_k``, train in full
    (their 4-bit linear layers become 16/32-bit layers holding the exact dequantization); every other linear layer
    is 4-bit and frozen. A module's layer is read from its name as LoRA's layers_to_transform reads it
    (``layers_pattern`` as there)."""

    peft_type: ClassVar[str] = "QPEFT_LAYERWISE"

    layers: list[int] | int | None = checked(None, LAYERS)
    last_k: int | None = checked(None, optional(SIZE))
    layers_pattern: list[str] | str | None = checked(None, NAMES)

    def check_together(self, source: str | None = None) -> None:
        super().check_together(source)
        if (self.layers is None) == (self.last_k is None):
            self.fail("layers", "or last_k: exactly one of them chooses the trained layers", source)
