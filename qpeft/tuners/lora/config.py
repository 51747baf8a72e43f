"""peft's LoraConfig: the fields qpeft implements, checked on construction and on loading."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ... import functional as F
from ...errors import ConfigError
from ..config import (
    BOOL,
    LAYERS,
    NAME_LIST,
    NAMES,
    NUMBER,
    SIZE,
    AdapterConfig,
    Check,
    checked,
    is_number,
    number_in,
    one_of,
)


RANK_PATTERN = Check(
    lambda v: isinstance(v, dict) and all(isinstance(k, str) and SIZE.accepts(r) for k, r in v.items()),
    "must map names or regexes to positive integers",
)
ALPHA_PATTERN = Check(
    lambda v: isinstance(v, dict) and all(isinstance(k, str) and is_number(a) for k, a in v.items()),
    "must map names or regexes to numbers",
)
INIT = Check(
    lambda v: isinstance(v, (bool, str)) and v in (True, False, "kaiming", "gaussian"),
    "is not supported (True, 'gaussian' or False)",
)


@dataclasses.dataclass
class LoraConfig(AdapterConfig):
    """peft's LoraConfig fields that qpeft implements, plus the 4-bit format of the base (qpeft's own fields)."""

    peft_type: ClassVar[str] = "LORA"
    strict_keys: ClassVar[bool] = False

    r: int = checked(8, SIZE)
    lora_alpha: float = checked(8, NUMBER)
    lora_dropout: float = checked(0.0, number_in(0, F.MAX_DROPOUT_P))
    target_modules: list[str] | str | None = checked(None, NAMES)
    # which biases train (and are saved with the adapter)
    bias: str = checked("none", one_of("none", "all", "lora_only"))
    use_rslora: bool = checked(False, BOOL)
    use_dora: bool = checked(False, BOOL)
    lora_bias: bool = checked(False, BOOL)
    modules_to_save: list[str] | None = checked(None, NAME_LIST)
    exclude_modules: list[str] | str | None = checked(None, NAMES)
    layers_to_transform: list[int] | int | None = checked(None, LAYERS)
    layers_pattern: list[str] | str | None = checked(None, NAMES)
    fan_in_fan_out: bool = checked(False, BOOL)  # set from the targets: True when they are Conv1D layers (peft's rule)
    rank_pattern: dict[str, int] = checked(check=RANK_PATTERN, factory=dict)
    alpha_pattern: dict[str, float] = checked(check=ALPHA_PATTERN, factory=dict)
    init_lora_weights: bool | str = checked(True, INIT)  # True / "kaiming", "gaussian", False (B random too: tests)

    def check_together(self, source: str | None = None) -> None:
        super().check_together(source)
        if self.use_dora and self.lora_bias:
            self.fail("lora_bias", "is not supported with DoRA (as in peft)", source)
        if isinstance(self.target_modules, str) and (
            self.layers_to_transform is not None or self.layers_pattern is not None
        ):
            self.fail(
                "layers_to_transform",
                "and layers_pattern need target_modules as a list of names (as in peft), not a regex or 'all-linear'",
                source,
            )
        if self.layers_pattern and self.layers_to_transform is None:
            self.fail("layers_pattern", "only applies together with layers_to_transform (as in peft)", source)

    def to_peft_dict(self) -> dict:
        d = super().to_peft_dict()
        d["modules_to_save"] = list(self.modules_to_save) if self.modules_to_save else None
        return d

    @classmethod
    def from_peft_dict(cls, d: dict, source: str | None = None, **quant) -> "LoraConfig":
        if not isinstance(d, dict):
            raise ConfigError(source, "adapter_config", f"must be a JSON object, got {type(d).__name__}")
        if d.get("peft_type", cls.peft_type) != cls.peft_type:
            raise ConfigError(source, "peft_type", f"is {d.get('peft_type')!r}, not {cls.peft_type}")
        if d.get("use_qalora") or d.get("target_parameters"):
            raise ValueError(
                "qpeft: this adapter_config.json uses QALoRA or target_parameters, which qpeft does not support"
            )
        return super().from_peft_dict(d, source, **quant)

    @classmethod
    def peft_fields(cls, fields: dict, source: str | None) -> dict:
        for key in ("rank_pattern", "alpha_pattern"):  # peft writes null or {} for "none"
            if fields.get(key, {}) is None:
                fields[key] = {}
        return fields
