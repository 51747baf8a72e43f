"""Selective fine-tuning configs (qpeft's own methods and file format): BitFit and layer-wise fine-tuning."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ..config import WholeModelConfig, is_int, is_names


@dataclasses.dataclass
class BitFitConfig(WholeModelConfig):
    """BitFit: only bias terms train. ``bias_modules``: the modules whose biases train (names or name suffixes,
    or one regex; None: every module that has a bias); ``add_missing_bias``: selected linear layers without a bias
    get a zero one (trained)."""

    peft_type: ClassVar[str] = "QPEFT_BITFIT"

    bias_modules: list[str] | str | None = None
    add_missing_bias: bool = False

    def validate(self, source: str | None = None) -> None:
        super().validate(source)
        if self.bias_modules is not None and not is_names(self.bias_modules):
            self.fail("bias_modules", "must be a name, a regex or a list of names", source)
        if not isinstance(self.add_missing_bias, bool):
            self.fail("add_missing_bias", "must be true or false", source)


@dataclasses.dataclass
class LayerwiseConfig(WholeModelConfig):
    """Layer-wise fine-tuning: the transformer layers ``layers`` (indices), or the last ``last_k``, train in full
    (their 4-bit linear layers become 16/32-bit layers holding the exact dequantization); every other linear layer
    is 4-bit and frozen. A module's layer is read from its name as LoRA's layers_to_transform reads it
    (``layers_pattern`` as there)."""

    peft_type: ClassVar[str] = "QPEFT_LAYERWISE"

    layers: list[int] | int | None = None
    last_k: int | None = None
    layers_pattern: list[str] | str | None = None

    def validate(self, source: str | None = None) -> None:
        super().validate(source)
        layers = self.layers
        if layers is not None and not (is_int(layers) or (isinstance(layers, list) and all(map(is_int, layers)))):
            self.fail("layers", "must be a layer index or a list of them", source)
        if self.last_k is not None and (not is_int(self.last_k) or self.last_k <= 0):
            self.fail("last_k", "must be a positive integer", source)
        if (layers is None) == (self.last_k is None):
            self.fail("layers", "or last_k: exactly one of them chooses the trained layers", source)
        if self.layers_pattern is not None and not is_names(self.layers_pattern):
            self.fail("layers_pattern", "must be a name or a list of names", source)
