"""BottleneckConfig (qpeft's own method and file format)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ..config import NAMES, NON_NEGATIVE, SIZE, WholeModelConfig, checked, one_of, optional


@dataclasses.dataclass
class BottleneckConfig(WholeModelConfig):
    """Bottleneck adapters after modules' outputs. ``style`` "houlsby": after every layer's attention and MLP;
    "pfeiffer": after the MLP only (found by the model's architecture: the children named self_attn / attn /
    attention and mlp / feed_forward of numbered layers); or ``target_modules`` (names, suffixes or a regex) picks
    the modules. Width ``bottleneck_size``, or the hidden size // ``reduction_factor``; ``non_linearity`` relu,
    gelu, silu or tanh; down-projection ~ N(0, init_std), up-projection zero."""

    peft_type: ClassVar[str] = "QPEFT_BOTTLENECK"

    style: str = checked("houlsby", one_of("houlsby", "pfeiffer"))
    target_modules: list[str] | str | None = checked(None, NAMES)
    bottleneck_size: int | None = checked(None, optional(SIZE))
    reduction_factor: int = checked(16, SIZE)
    non_linearity: str = checked("relu", one_of("relu", "gelu", "silu", "tanh"))
    init_std: float = checked(1e-2, NON_NEGATIVE)
