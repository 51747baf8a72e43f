"""What every method's config shares: the 4-bit format of the base, peft's common keys, field checks, the
adapter_config.json round trip (the config class chosen by peft_type from the method registry)."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch

from .. import functional as F
from ..errors import ConfigError
from . import registry

# Keys peft writes that carry no meaning for the adapter itself.
_INFORMATIONAL_KEYS = ("auto_mapping", "peft_version", "revision")


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def is_names(v, allow_str: bool = True) -> bool:
    return (allow_str and isinstance(v, str)) or (isinstance(v, list) and all(isinstance(x, str) for x in v))


@dataclasses.dataclass(kw_only=True)
class AdapterConfig:
    """Fields of every method: peft's common ones and qpeft's 4-bit format of the base (bitsandbytes' meaning).
    Subclasses set ``peft_type`` and list their peft keys; ``validate`` checks every field's type and range."""

    peft_type: ClassVar[str]
    is_prompt_learning: ClassVar[bool] = False
    # True: keys of adapter_config.json that the class lacks are refused; False: ignored (LoRA: peft has many
    # options qpeft leaves at their defaults, and refuses the ones that change the meaning by name).
    strict_keys: ClassVar[bool] = True

    task_type: str | None = None
    base_model_name_or_path: str | None = None
    inference_mode: bool = False
    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: torch.dtype | None = None

    QPEFT_ONLY: ClassVar[tuple[str, ...]] = ("quant_type", "blocksize", "double_quant", "compute_dtype")

    def __post_init__(self):
        self.validate()

    def fail(self, key: str, problem: str, source: str | None = None):
        raise ConfigError(source, key, f"{problem}, got {getattr(self, key)!r}")

    def validate(self, source: str | None = None) -> None:
        """Type and range of the common fields (ConfigError naming ``source``, the key and the problem)."""
        for key in ("inference_mode", "double_quant"):
            if not isinstance(getattr(self, key), bool):
                self.fail(key, "must be true or false", source)
        for key in ("task_type", "base_model_name_or_path"):
            if getattr(self, key) is not None and not isinstance(getattr(self, key), str):
                self.fail(key, "must be a string or null", source)
        if self.quant_type not in F.QUANT_TYPES:
            self.fail("quant_type", f"must be one of {F.QUANT_TYPES}", source)
        if not is_int(self.blocksize) or self.blocksize not in F.VALID_BLOCKSIZES:
            self.fail("blocksize", f"must be one of {F.VALID_BLOCKSIZES}", source)
        if self.compute_dtype is not None and self.compute_dtype not in F.FLOAT_DTYPES:
            self.fail("compute_dtype", "must be None or torch.float32 / float16 / bfloat16", source)

    @property
    def quant_format(self) -> dict:
        return {k: getattr(self, k) for k in self.QPEFT_ONLY}

    # ---- peft's adapter_config.json ------------------------------------------------------------------------
    def to_peft_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in self.QPEFT_ONLY}
        d.update(peft_type=self.peft_type, inference_mode=True)
        return d

    @classmethod
    def from_peft_dict(cls, d: dict, source: str | None = None, **quant) -> "AdapterConfig":
        """The config of peft's adapter_config.json dict ``d`` (from file ``source``, named in errors)."""
        names = {f.name for f in dataclasses.fields(cls)} - set(cls.QPEFT_ONLY)
        if cls.strict_keys:
            unknown = sorted(set(d) - names - {"peft_type", *_INFORMATIONAL_KEYS})
            if unknown:
                raise ConfigError(
                    source,
                    unknown[0],
                    f"is not a key of peft's {cls.peft_type} config that qpeft "
                    "knows; refusing rather than guessing its meaning",
                )
        fields = cls.peft_fields({k: v for k, v in d.items() if k in names}, source)
        try:
            return cls(**fields, **quant)
        except ConfigError as e:  # the same problem, with the file named
            raise ConfigError(source, e.key, e.problem) from None
        except TypeError as e:
            raise ConfigError(source, "adapter_config", str(e)) from None

    @classmethod
    def peft_fields(cls, fields: dict, source: str | None) -> dict:
        """The file's fields as the constructor takes them (a subclass maps peft's spellings)."""
        return fields


@dataclasses.dataclass(kw_only=True)
class WholeModelConfig(AdapterConfig):
    """A method that works on the whole model: ``quantize`` (qpeft's) makes every linear layer but the output head
    a 4-bit layer in the config's format when the adapter is added (False: the model's layers as they are)."""

    QPEFT_ONLY: ClassVar[tuple[str, ...]] = AdapterConfig.QPEFT_ONLY + ("quantize",)

    quantize: bool = True

    def validate(self, source: str | None = None) -> None:
        super().validate(source)
        if not isinstance(self.quantize, bool):
            self.fail("quantize", "must be true or false", source)


@dataclasses.dataclass(kw_only=True)
class TargetedConfig(AdapterConfig):
    """A method on chosen linear layers (qpeft's own): ``target_modules`` and ``exclude_modules`` as in LoRA; no
    layer selection or modules_to_save."""

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: None = None
    layers_to_transform: None = None
    layers_pattern: None = None

    def validate(self, source: str | None = None) -> None:
        super().validate(source)
        for key in ("target_modules", "exclude_modules"):
            if getattr(self, key) is not None and not is_names(getattr(self, key)):
                self.fail(key, "must be a name, a regex or a list of names", source)
        for key in ("modules_to_save", "layers_to_transform", "layers_pattern"):
            if getattr(self, key) is not None:
                self.fail(key, f"is not a {self.peft_type} option", source)


def config_from_peft_dict(d, source: str | None = None, **quant) -> AdapterConfig:
    """The config of any adapter_config.json that qpeft knows, chosen by its ``peft_type`` (LORA when absent)."""
    if not isinstance(d, dict):
        raise ConfigError(source, "adapter_config", f"must be a JSON object, got {type(d).__name__}")
    peft_type = d.get("peft_type", "LORA")
    classes = registry.config_classes()
    cls = classes.get(peft_type) if isinstance(peft_type, str) else None
    if cls is None:
        raise ConfigError(source, "peft_type", f"{peft_type!r} is not a method qpeft has (it has {sorted(classes)})")
    return cls.from_peft_dict(d, source, **quant)
