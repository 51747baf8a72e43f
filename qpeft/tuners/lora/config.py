"""peft's LoraConfig: the fields qpeft implements, checked on construction and on loading."""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import ClassVar

from ... import functional as F
from ...errors import ConfigError
from . import init
from ..config import (
    BOOL,
    MAX_SIZE,
    LAYERS,
    NAME_LIST,
    NAMES,
    NUMBER,
    SIZE,
    STRING,
    AdapterConfig,
    Check,
    check_fields,
    checked,
    is_int,
    is_number,
    number_in,
    one_of,
    optional,
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
    init.is_valid,
    "is not supported (True, False, 'gaussian', 'pissa', 'pissa_niter_[n]' with 1 <= n <= "
    f"{init.MAX_NITER}, 'olora', 'loftq', 'corda', 'orthogonal' or 'eva')",
)
LOFTQ = Check(
    lambda v: (
        isinstance(v, dict)
        and (not v or v.keys() == {"loftq_bits", "loftq_iter"})
        and all(is_int(x) for x in v.values())
        and (not v or (v["loftq_bits"] == 4 and 1 <= v["loftq_iter"] <= init.MAX_LOFTQ_ITER))
    ),
    f"must be {{}} or {{'loftq_bits': 4, 'loftq_iter': 1..{init.MAX_LOFTQ_ITER}}} (the base is 4-bit)",
)
EVA = Check(lambda v: v is None or isinstance(v, EvaConfig), "must be an EvaConfig or null")
CORDA = Check(lambda v: v is None or isinstance(v, CordaConfig), "must be a CordaConfig or null")


@dataclasses.dataclass
class LoftQConfig:
    """peft's LoftQConfig: ``loftq_bits`` (4: qpeft's bases are 4-bit) and ``loftq_iter``, the alternating
    quantization / SVD iterations."""

    loftq_bits: int = 4
    loftq_iter: int = 1


@dataclasses.dataclass
class CordaConfig:
    """peft's CordaConfig: ``corda_method`` "ipm" (the adapter takes the components of W C with the largest singular
    values) or "kpm" (the smallest: knowledge kept in the base), ``cache_file`` (the decomposition) and
    ``covariance_file`` (the layers' input covariances): safetensors files qpeft writes and reads (peft's are
    pickle, which qpeft never loads); ``use_float16_for_covariance``; ``verbose`` and ``prune_temporary_fields``
    are accepted for peft's signature (qpeft prints nothing and keeps no temporary fields)."""

    cache_file: str | None = None
    covariance_file: str | None = None
    corda_method: str = "ipm"
    verbose: bool = False
    use_float16_for_covariance: bool = False
    prune_temporary_fields: bool = True

    def __post_init__(self):
        checks = {
            "cache_file": optional(STRING),
            "covariance_file": optional(STRING),
            "corda_method": one_of("ipm", "kpm"),
            "verbose": BOOL,
            "use_float16_for_covariance": BOOL,
            "prune_temporary_fields": BOOL,
        }
        for key in ("cache_file", "covariance_file"):
            if isinstance(getattr(self, key), os.PathLike):
                setattr(self, key, os.fspath(getattr(self, key)))
        check_fields(dataclasses.asdict(self), checks, "CordaConfig")


@dataclasses.dataclass
class EvaConfig:
    """peft's EvaConfig: ``rho`` (>= 1: a layer's rank can grow to r * rho when ranks are redistributed), ``tau``
    (cosine similarity of successive components at which a layer's SVD has converged), ``use_label_mask`` /
    ``label_mask_value`` (label positions left out of the inputs), ``whiten`` (components divided by their singular
    values), ``adjust_scaling_factors`` (each layer's alpha follows its new rank so the scaling stays alpha / r)."""

    rho: float = 2.0
    tau: float = 0.99
    use_label_mask: bool = True
    label_mask_value: int = -100
    whiten: bool = False
    adjust_scaling_factors: bool = True

    def __post_init__(self):
        checks = {
            "rho": Check(lambda v: is_number(v) and 1.0 <= v <= MAX_SIZE, "must be a number >= 1.0"),
            "tau": number_in(0.0, 1.0),
            "use_label_mask": BOOL,
            "label_mask_value": Check(is_int, "must be an integer"),
            "whiten": BOOL,
            "adjust_scaling_factors": BOOL,
        }
        check_fields(dataclasses.asdict(self), checks, "EvaConfig")


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
    loftq_config: dict = checked(check=LOFTQ, factory=dict)
    eva_config: EvaConfig | None = checked(None, EVA)
    corda_config: CordaConfig | None = checked(None, CORDA)

    def __post_init__(self):
        if isinstance(self.loftq_config, LoftQConfig):  # kept as a dict, as peft keeps it
            self.loftq_config = dataclasses.asdict(self.loftq_config)
        for key, kind in (("eva_config", EvaConfig), ("corda_config", CordaConfig)):
            value = getattr(self, key)
            if isinstance(value, dict):
                unknown = value.keys() - {f.name for f in dataclasses.fields(kind)}
                if unknown:
                    self.fail(key, f"has keys qpeft does not know: {sorted(unknown)}")
                setattr(self, key, kind(**value))
        if self.init_lora_weights == "eva" and self.eva_config is None:
            self.eva_config = EvaConfig()  # peft's default
        if self.init_lora_weights == "corda" and self.corda_config is None:
            self.corda_config = CordaConfig()
        for key, used in (("loftq_config", "loftq"), ("eva_config", "eva"), ("corda_config", "corda")):
            if getattr(self, key) and self.init_lora_weights != used:
                warnings.warn(f"qpeft: {key} is ignored unless init_lora_weights is {used!r} (as in peft)")
                setattr(self, key, {} if key == "loftq_config" else None)
        super().__post_init__()

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
        if self.init_lora_weights == "loftq" and not self.loftq_config:
            self.fail("loftq_config", "must be given when init_lora_weights is 'loftq' (as in peft)", source)
        if self.init_lora_weights == "orthogonal":
            odd = [r for r in [self.r, *self.rank_pattern.values()] if r % 2]
            if odd:
                self.fail("r", f"must be even for the orthogonal init (as in peft); odd ranks {odd}", source)
        if self.layers_pattern and self.layers_to_transform is None:
            self.fail("layers_pattern", "only applies together with layers_to_transform (as in peft)", source)

    def to_peft_dict(self) -> dict:
        d = super().to_peft_dict()
        d["modules_to_save"] = list(self.modules_to_save) if self.modules_to_save else None
        for key in ("eva_config", "corda_config"):
            d[key] = dataclasses.asdict(getattr(self, key)) if getattr(self, key) is not None else None
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
