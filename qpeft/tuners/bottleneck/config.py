"""BottleneckConfig (qpeft's own method and file format)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ..config import WholeModelConfig, is_int, is_names, is_number


@dataclasses.dataclass
class BottleneckConfig(WholeModelConfig):
    """Bottleneck adapters after modules' outputs. ``style`` "houlsby": after every layer's attention and MLP;
    "pfeiffer": after the MLP only (found by the model's architecture: the children named self_attn / attn /
    attention and mlp / feed_forward of numbered layers); or ``target_modules`` (names, suffixes or a regex) picks
    the modules. Width ``bottleneck_size``, or the hidden size // ``reduction_factor``; ``non_linearity`` relu,
    gelu, silu or tanh; down-projection ~ N(0, init_std), up-projection zero."""

    peft_type: ClassVar[str] = "QPEFT_BOTTLENECK"

    style: str = "houlsby"
    target_modules: list[str] | str | None = None
    bottleneck_size: int | None = None
    reduction_factor: int = 16
    non_linearity: str = "relu"
    init_std: float = 1e-2

    def validate(self, source: str | None = None) -> None:
        super().validate(source)
        if self.style not in ("houlsby", "pfeiffer"):
            self.fail("style", "must be 'houlsby' or 'pfeiffer'", source)
        if self.target_modules is not None and not is_names(self.target_modules):
            self.fail("target_modules", "must be a name, a regex or a list of names", source)
        if self.bottleneck_size is not None and (not is_int(self.bottleneck_size) or self.bottleneck_size <= 0):
            self.fail("bottleneck_size", "must be a positive integer or null", source)
        if not is_int(self.reduction_factor) or self.reduction_factor <= 0:
            self.fail("reduction_factor", "must be a positive integer", source)
        if self.non_linearity not in ("relu", "gelu", "silu", "tanh"):
            self.fail("non_linearity", "must be relu, gelu, silu or tanh", source)
        if not is_number(self.init_std) or self.init_std < 0:
            self.fail("init_std", "must be a number >= 0", source)
