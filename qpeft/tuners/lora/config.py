"""peft's LoraConfig: the fields qpeft implements, checked on construction and on loading."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ... import functional as F
from ...errors import ConfigError
from ..config import AdapterConfig, is_int, is_names, is_number


@dataclasses.dataclass
class LoraConfig(AdapterConfig):
    """peft's LoraConfig fields that qpeft implements, plus the 4-bit format of the base (qpeft's own fields)."""

    peft_type: ClassVar[str] = "LORA"
    strict_keys: ClassVar[bool] = False

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    bias: str = "none"  # "none" | "all" | "lora_only": which biases train (and are saved with the adapter)
    use_rslora: bool = False
    use_dora: bool = False
    lora_bias: bool = False
    modules_to_save: list[str] | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    fan_in_fan_out: bool = False  # set from the targets: True when they are Conv1D layers (peft's rule)
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    init_lora_weights: bool | str = True  # True / "kaiming", "gaussian", False (B random too: tests)

    def __post_init__(self):
        self.validate()
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(None, "bias", f"must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if self.init_lora_weights not in (True, False, "kaiming", "gaussian") or not isinstance(
            self.init_lora_weights, (bool, str)
        ):
            raise ConfigError(
                None, "init_lora_weights", f"{self.init_lora_weights!r} is not supported (True, 'gaussian' or False)"
            )
        if self.use_dora and self.lora_bias:
            raise ConfigError(None, "lora_bias", "is not supported with DoRA (as in peft)")
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.target_modules, str) and (
            self.layers_to_transform is not None or self.layers_pattern is not None
        ):
            raise ConfigError(
                None,
                "layers_to_transform",
                "and layers_pattern need target_modules as a list of names (as in peft), not a regex or 'all-linear'",
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError(None, "layers_pattern", "only applies together with layers_to_transform (as in peft)")

    def validate(self, source: str | None = None) -> None:
        """Every field's type and range (ConfigError naming ``source``, the key and the problem): a config from a
        file is refused before it changes any model, never reinterpreted (the string "false" is not true)."""
        super().validate(source)

        def fail(key, problem):
            self.fail(key, problem, source)

        if not is_int(self.r) or self.r <= 0:
            fail("r", "must be a positive integer")
        if not is_number(self.lora_alpha):
            fail("lora_alpha", "must be a finite number")
        if not is_number(self.lora_dropout) or not 0 <= self.lora_dropout <= F.MAX_DROPOUT_P:
            fail("lora_dropout", f"must be a number in [0, {F.MAX_DROPOUT_P}]")
        for key in ("use_rslora", "use_dora", "lora_bias", "fan_in_fan_out"):
            if not isinstance(getattr(self, key), bool):
                fail(key, "must be true or false")
        for key in ("target_modules", "exclude_modules", "layers_pattern"):
            value = getattr(self, key)
            if value is not None and not is_names(sorted(value) if isinstance(value, (set, tuple)) else value):
                fail(key, "must be a name, a regex or a list of names")
        if self.modules_to_save is not None and (
            isinstance(self.modules_to_save, str)
            or not isinstance(self.modules_to_save, (list, tuple, set))
            or not is_names(list(self.modules_to_save), False)
        ):
            fail("modules_to_save", "must be a list of names")
        layers = self.layers_to_transform
        if layers is not None and not (is_int(layers) or (isinstance(layers, list) and all(map(is_int, layers)))):
            fail("layers_to_transform", "must be a layer index or a list of them")
        self.check_rank_pattern(source)
        if not isinstance(self.alpha_pattern, dict) or not all(
            isinstance(k, str) and is_number(v) for k, v in self.alpha_pattern.items()
        ):
            fail("alpha_pattern", "must map names or regexes to numbers")

    def check_rank_pattern(self, source: str | None) -> None:
        if not isinstance(self.rank_pattern, dict) or not all(
            isinstance(k, str) and is_int(v) and v > 0 for k, v in self.rank_pattern.items()
        ):
            self.fail("rank_pattern", "must map names or regexes to positive integers", source)

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
