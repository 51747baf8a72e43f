"""What every method's config shares: the 4-bit format of the base, peft's common keys, field checks, the
adapter_config.json round trip (the config class chosen by peft_type from the method registry)."""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable
from typing import ClassVar, NamedTuple

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


class TaskType(str, enum.Enum):
    """peft's task types (a config's ``task_type``; qpeft's methods are for causal LMs, the others are accepted in
    files by name)."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


def text_config(model_config):
    """A transformers config's text part (a multimodal model's language model), or the config itself."""
    get_text = getattr(model_config, "get_text_config", None)
    return get_text() if callable(get_text) else model_config


# a model's sizes by the names of peft's prompt configs -> the names transformers configs keep them under
MODEL_SIZE_NAMES = {
    "num_layers": ("num_hidden_layers", "num_layers", "n_layer"),
    "token_dim": ("hidden_size", "n_embd", "d_model"),
    "num_attention_heads": ("num_attention_heads", "n_head", "num_heads"),
}


def model_size(model_config, key: str):
    """The model's ``key`` (of MODEL_SIZE_NAMES) from its (text) config, or None when the config has none."""
    text = text_config(model_config)
    for name in MODEL_SIZE_NAMES[key]:
        value = getattr(text, name, None)
        if value is not None:
            return value
    return None


# ---- field checks, declared with the fields ----------------------------------------------------------------------
MAX_SIZE = 1 << 20  # any size a config gives (ranks, token counts, widths): larger is refused before allocation


class Check(NamedTuple):
    """A field's rule: ``accepts(value)``, else ConfigError "<key> <problem>"."""

    accepts: Callable[[object], bool]
    problem: str


def optional(check: Check, none_means: str = "") -> Check:
    return Check(lambda v: v is None or check.accepts(v), f"{check.problem} or null{none_means}")


def one_of(*values) -> Check:
    return Check(lambda v: any(v == x and type(v) is type(x) for x in values), f"must be one of {list(values)}")


def number_in(low: float, high: float, closed_high: bool = True) -> Check:
    bracket = "]" if closed_high else ")"
    return Check(
        lambda v: is_number(v) and low <= v and (v <= high if closed_high else v < high),
        f"must be a number in [{low}, {high}{bracket}",
    )


BOOL = Check(lambda v: isinstance(v, bool), "must be true or false")
STRING = Check(lambda v: isinstance(v, str), "must be a string")
NUMBER = Check(is_number, "must be a finite number")
NON_NEGATIVE = Check(lambda v: is_number(v) and v >= 0, "must be a number >= 0")
SIZE = Check(lambda v: is_int(v) and 0 < v <= MAX_SIZE, f"must be a positive integer (at most {MAX_SIZE})")
COUNT = Check(lambda v: is_int(v) and 0 <= v <= MAX_SIZE, f"must be a non-negative integer (at most {MAX_SIZE})")
NAMES = Check(lambda v: v is None or is_names(v), "must be a name, a regex or a list of names")
NAME_LIST = Check(lambda v: v is None or is_names(v, allow_str=False), "must be a list of names")
LAYERS = Check(
    lambda v: v is None or is_int(v) or (isinstance(v, list) and all(map(is_int, v))),
    "must be a layer index or a list of them",
)
UNSUPPORTED = Check(lambda v: v is None, "is not an option of this method in qpeft")


# the 4-bit format of a base (an adapter config's qpeft-only fields, qpeft's transformers quantizer)
FORMAT_CHECKS = {
    "quant_type": one_of(*F.QUANT_TYPES),
    "blocksize": one_of(*F.VALID_BLOCKSIZES),
    "double_quant": BOOL,
    "compute_dtype": Check(
        lambda v: v is None or v in F.FLOAT_DTYPES, "must be None or torch.float32 / float16 / bfloat16"
    ),
}


def check_fields(values: dict, checks: dict[str, Check | None], source: str | None) -> None:
    """Each value of ``values`` against its check in ``checks`` (None: unchecked): the first that fails raises
    ConfigError naming ``source``, the key and the problem."""
    for key, check in checks.items():
        if check is not None and not check.accepts(values[key]):
            refuse(source, key, check.problem, values[key])


def refuse(source: str | None, key: str, problem: str, value) -> None:
    raise ConfigError(source, key, f"{problem}, got {value!r}")


def checked(default=dataclasses.MISSING, check: Check | None = None, *, factory=dataclasses.MISSING):
    """A config field with its check (run by ``validate``). Lists of names given as sets or tuples are sorted into
    lists first."""
    return dataclasses.field(default=default, default_factory=factory, metadata={"check": check})


@dataclasses.dataclass(kw_only=True)
class AdapterConfig:
    """Fields of every method: peft's common ones and qpeft's 4-bit format of the base (bitsandbytes' meaning).
    Subclasses set ``peft_type`` and declare each field with its check (``checked``); rules across fields live in
    ``check_together``. ``validate`` runs both: on construction, on loading a file, after a model fills sizes."""

    peft_type: ClassVar[str]
    is_prompt_learning: ClassVar[bool] = False
    # True: keys of adapter_config.json that the class lacks are refused; False: ignored (LoRA: peft has many
    # options qpeft leaves at their defaults, and refuses the ones that change the meaning by name).
    strict_keys: ClassVar[bool] = True

    task_type: str | None = checked(None, optional(STRING))
    base_model_name_or_path: str | None = checked(None, optional(STRING))
    inference_mode: bool = checked(False, BOOL)
    quant_type: str = checked("nf4", FORMAT_CHECKS["quant_type"])
    blocksize: int = checked(64, FORMAT_CHECKS["blocksize"])
    double_quant: bool = checked(True, FORMAT_CHECKS["double_quant"])
    compute_dtype: torch.dtype | None = checked(None, FORMAT_CHECKS["compute_dtype"])

    QPEFT_ONLY: ClassVar[tuple[str, ...]] = ("quant_type", "blocksize", "double_quant", "compute_dtype")

    def __post_init__(self):
        if isinstance(self.task_type, enum.Enum):  # TaskType.CAUSAL_LM as peft scripts pass it
            self.task_type = self.task_type.value
        for f in dataclasses.fields(self):
            if f.metadata.get("check") in (NAMES, NAME_LIST) and isinstance(getattr(self, f.name), (set, tuple)):
                setattr(self, f.name, sorted(getattr(self, f.name)))
        self.validate()

    def fail(self, key: str, problem: str, source: str | None = None):
        refuse(source, key, problem, getattr(self, key))

    def validate(self, source: str | None = None) -> None:
        """Every field's declared check, then ``check_together`` (ConfigError naming ``source``, the key and the
        problem): a config from a file is refused before it changes any model, never reinterpreted (the string
        "false" is not true)."""
        fields = dataclasses.fields(self)
        check_fields(
            {f.name: getattr(self, f.name) for f in fields}, {f.name: f.metadata.get("check") for f in fields}, source
        )
        self.check_together(source)

    def check_together(self, source: str | None = None) -> None:
        """The rules that relate fields (a subclass extends them)."""

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

    @classmethod
    def from_pretrained(cls, model_id, **kwargs) -> "AdapterConfig":
        """peft's PeftConfig.from_pretrained: the config of an adapter folder or Hub repository id (its
        adapter_config.json; ``subfolder``, ``revision``, ``token`` as in peft)."""
        from ..adapter_io import ADAPTER_CONFIG, read_adapter_config
        from ..hub import ADAPTER_FILES, resolve_folder

        folder = resolve_folder(model_id, ADAPTER_FILES, **kwargs)
        config = read_adapter_config(folder)
        if cls is not AdapterConfig and not isinstance(config, cls):
            raise ConfigError(str(folder / ADAPTER_CONFIG), "peft_type", f"is {config.peft_type}, not a {cls.__name__}")
        return config


@dataclasses.dataclass(kw_only=True)
class WholeModelConfig(AdapterConfig):
    """A method that works on the whole model: ``quantize`` (qpeft's) makes every linear layer but the output head
    a 4-bit layer in the config's format when the adapter is added (False: the model's layers as they are)."""

    QPEFT_ONLY: ClassVar[tuple[str, ...]] = AdapterConfig.QPEFT_ONLY + ("quantize",)

    quantize: bool = checked(True, BOOL)


@dataclasses.dataclass(kw_only=True)
class TargetedConfig(AdapterConfig):
    """A method on chosen linear layers (qpeft's own): ``target_modules`` and ``exclude_modules`` as in LoRA; no
    layer selection or modules_to_save."""

    target_modules: list[str] | str | None = checked(None, NAMES)
    exclude_modules: list[str] | str | None = checked(None, NAMES)
    modules_to_save: None = checked(None, UNSUPPORTED)
    layers_to_transform: None = checked(None, UNSUPPORTED)
    layers_pattern: None = checked(None, UNSUPPORTED)


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
