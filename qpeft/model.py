"""Model-level QLoRA in peft's idiom: a config, ``get_peft_model`` that quantizes the targeted nn.Linear layers of
any nn.Module (a transformers model first of all) to 4 bits and attaches LoRA adapters, and ``QPeftModel`` with
peft's methods (print_trainable_parameters, save_pretrained / load_adapter in peft's file format, add_adapter,
set_adapter, disable_adapter, merge_and_unload, ...).

Targeting follows peft: ``target_modules`` is a list of module names or name suffixes (matched at a '.'
boundary), one regex string (fullmatch against the module name), or "all-linear" (every nn.Linear except the
output head); ``exclude_modules`` (same forms) and ``modules_to_save`` are never targets; with a list,
``layers_to_transform`` keeps the layers of those indices (the first numbered segment of the name, or the one
after ``layers_pattern``). ``rank_pattern`` / ``alpha_pattern`` map regexes (matched against the end of
a module name) to per-layer r / alpha. transformers' Conv1D layers (GPT-2) are targets too: their [in, out]
weight is quantized transposed, and the adapter file says fan_in_fan_out, as peft writes it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from . import functional as F
from . import patterns
from .errors import ConfigError
from .files import check_adapter_name, folder_inside
from .nn.linear4bit import Linear4bit, is_conv1d
from .nn.lora import LoraLinear4bit

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclasses.dataclass
class LoraConfig:
    """peft's LoraConfig fields that qpeft implements, plus the 4-bit format of the base (qpeft's own fields)."""

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
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    inference_mode: bool = False
    # qpeft: how the targeted layers' weights are stored (bitsandbytes' meaning).
    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: torch.dtype | None = None

    def __post_init__(self):
        self.validate()
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(None, "bias", f"must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if self.init_lora_weights not in (True, False, "kaiming", "gaussian") or \
                not isinstance(self.init_lora_weights, (bool, str)):
            raise ConfigError(None, "init_lora_weights", f"{self.init_lora_weights!r} is not supported "
                              "(True, 'gaussian' or False)")
        if self.use_dora and self.lora_bias:
            raise ConfigError(None, "lora_bias", "is not supported with DoRA (as in peft)")
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.target_modules, str) and (self.layers_to_transform is not None or
                                                     self.layers_pattern is not None):
            raise ConfigError(None, "layers_to_transform", "and layers_pattern need target_modules as a list of "
                              "names (as in peft), not a regex or 'all-linear'")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError(None, "layers_pattern", "only applies together with layers_to_transform (as in peft)")

    def validate(self, source: str | None = None) -> None:
        """Every field's type and range (ConfigError naming ``source``, the key and the problem): a config from a
        file is refused before it changes any model, never reinterpreted (the string "false" is not true)."""
        def fail(key, problem):
            raise ConfigError(source, key, f"{problem}, got {getattr(self, key)!r}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_number(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        def is_names(v, allow_str=True):
            return (allow_str and isinstance(v, str)) or (isinstance(v, list) and all(isinstance(x, str) for x in v))

        if not is_int(self.r) or self.r <= 0:
            fail("r", "must be a positive integer")
        if not is_number(self.lora_alpha):
            fail("lora_alpha", "must be a finite number")
        if not is_number(self.lora_dropout) or not 0 <= self.lora_dropout <= F.MAX_DROPOUT_P:
            fail("lora_dropout", f"must be a number in [0, {F.MAX_DROPOUT_P}]")
        for key in ("use_rslora", "use_dora", "lora_bias", "fan_in_fan_out", "inference_mode", "double_quant"):
            if not isinstance(getattr(self, key), bool):
                fail(key, "must be true or false")
        for key in ("target_modules", "exclude_modules", "layers_pattern"):
            value = getattr(self, key)
            if value is not None and not is_names(sorted(value) if isinstance(value, (set, tuple)) else value):
                fail(key, "must be a name, a regex or a list of names")
        if self.modules_to_save is not None and (isinstance(self.modules_to_save, str) or not isinstance(
                self.modules_to_save, (list, tuple, set)) or not is_names(list(self.modules_to_save), False)):
            fail("modules_to_save", "must be a list of names")
        layers = self.layers_to_transform
        if layers is not None and not (is_int(layers) or (isinstance(layers, list) and all(map(is_int, layers)))):
            fail("layers_to_transform", "must be a layer index or a list of them")
        if not isinstance(self.rank_pattern, dict) or not all(
                isinstance(k, str) and is_int(v) and v > 0 for k, v in self.rank_pattern.items()):
            fail("rank_pattern", "must map names or regexes to positive integers")
        if not isinstance(self.alpha_pattern, dict) or not all(
                isinstance(k, str) and is_number(v) for k, v in self.alpha_pattern.items()):
            fail("alpha_pattern", "must map names or regexes to numbers")
        for key in ("task_type", "base_model_name_or_path"):
            if getattr(self, key) is not None and not isinstance(getattr(self, key), str):
                fail(key, "must be a string or null")
        if self.quant_type not in F.QUANT_TYPES:
            fail("quant_type", f"must be one of {F.QUANT_TYPES}")
        if not is_int(self.blocksize) or self.blocksize not in F.VALID_BLOCKSIZES:
            fail("blocksize", f"must be one of {F.VALID_BLOCKSIZES}")
        if self.compute_dtype is not None and self.compute_dtype not in F.FLOAT_DTYPES:
            fail("compute_dtype", "must be None or torch.float32 / float16 / bfloat16")

    # ---- peft's adapter_config.json ------------------------------------------------------------------------
    _QPEFT_ONLY = ("quant_type", "blocksize", "double_quant", "compute_dtype")

    def to_peft_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in self._QPEFT_ONLY}
        d.update(peft_type="LORA", inference_mode=True)
        d["modules_to_save"] = list(self.modules_to_save) if self.modules_to_save else None
        return d

    @classmethod
    def from_peft_dict(cls, d: dict, source: str | None = None, **quant) -> "LoraConfig":
        """The config of peft's adapter_config.json dict ``d`` (from file ``source``, named in errors)."""
        if not isinstance(d, dict):
            raise ConfigError(source, "adapter_config", f"must be a JSON object, got {type(d).__name__}")
        if d.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"qpeft: only LoRA adapters can be loaded, this one is {d.get('peft_type')!r}")
        if d.get("use_qalora") or d.get("target_parameters"):
            raise ValueError("qpeft: this adapter_config.json uses QALoRA or target_parameters, which qpeft does not "
                             "support")
        names = {f.name for f in dataclasses.fields(cls)} - set(cls._QPEFT_ONLY)
        fields = {k: v for k, v in d.items() if k in names}
        for key in ("rank_pattern", "alpha_pattern"):  # peft writes null or {} for "none"
            if fields.get(key, {}) is None:
                fields[key] = {}
        try:
            return cls(**fields, **quant)
        except ConfigError as e:  # the same problem, with the file named
            raise ConfigError(source, e.key, e.problem) from None


# ---- targeting -------------------------------------------------------------------------------------------------

def _output_head_names(model: nn.Module) -> set[str]:
    """Names of the output embedding (lm_head) that "all-linear" skips, as peft does."""
    names = set()
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    for name, module in model.named_modules():
        if module is head or (head is None and name.split(".")[-1] == "lm_head"):
            names.add(name)
    return names


def _is_target(name: str, target_modules: list[str] | str, key: str = "target_modules") -> bool:
    """peft's name rule: a regex string must fullmatch the name; a list entry must equal it or be a suffix at a
    '.' boundary."""
    if isinstance(target_modules, str):
        return patterns.fullmatch(target_modules, name, key) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _pattern_value(name: str, pattern_values: dict, default, key: str):
    for pattern, value in pattern_values.items():
        if patterns.match(rf"(.*\.)?({pattern})$", name, key):
            return value
    return default


def _layer_index(name: str, layers_pattern: list[str] | str | None) -> int | None:
    """The index of the layer a module belongs to, read from its name as peft reads it: without layers_pattern,
    the first all-digit path segment that follows a named segment which is not the first ("model.layers.3.mlp.
    up_proj" -> 3, "transformer.h.0.attn.c_attn" -> 0); with it, the all-digit segment right after a segment
    matching one of the patterns (tried in order). The digits must not be the name's last segment."""
    parts = name.split(".")
    if not layers_pattern:
        for j in range(2, len(parts) - 1):
            if parts[j].isdecimal():
                return int(parts[j])
        return None
    for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
        found = patterns.match(rf"(?:.*?\.)?(?:{pattern})\.(\d+)\.", name, "layers_pattern")
        if found is not None:
            return int(found.group(1))
    return None


def _in_layers(name: str, config: LoraConfig) -> bool:
    layers = config.layers_to_transform
    if layers is None or layers == []:
        return True
    index = _layer_index(name, config.layers_pattern)
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


def _within(name: str, module_names: Sequence[str]) -> bool:
    """True when ``name`` is one of ``module_names`` or inside one (matched on whole '.'-separated segments)."""
    dotted = f".{name}."
    return any(f".{m}." in dotted for m in module_names)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Linear4bit, LoraLinear4bit)) or is_conv1d(module)


def find_target_modules(model: nn.Module, config: LoraConfig) -> list[str]:
    """The names of the modules that ``config`` targets (nn.Linear, transformers Conv1D, qpeft Linear4bit or
    LoraLinear4bit), as peft selects them: exclude_modules and modules_to_save first, then target_modules, then
    (list targets) layers_to_transform."""
    if config.target_modules is None:
        raise ValueError("qpeft: LoraConfig.target_modules is required (a list of names, a regex, or 'all-linear')")
    all_linear = config.target_modules == "all-linear"
    skip = _output_head_names(model) if all_linear else set()
    names = []
    for name, module in model.named_modules():
        if not name or name in skip or _inside_wrapper(name, model):
            continue
        if config.exclude_modules and _is_target(name, config.exclude_modules, "exclude_modules"):
            continue
        if config.modules_to_save and _within(name, config.modules_to_save):
            continue
        if all_linear:
            if not _is_linear(module):
                continue
        elif not _is_target(name, config.target_modules):
            continue
        if not _in_layers(name, config):  # (LoraConfig allows layers_to_transform with a list target only)
            continue
        if not _is_linear(module):
            raise ValueError(f"qpeft: target module {name!r} is a {type(module).__name__}; only linear layers "
                             "(nn.Linear, transformers Conv1D) can be targeted")
        names.append(name)
    if not names:
        raise ValueError(f"qpeft: target_modules {config.target_modules!r} match no linear layer of the model"
                         + (" in layers_to_transform" if config.layers_to_transform not in (None, []) else ""))
    return names


def _inside_wrapper(name: str, model: nn.Module) -> bool:
    """True for the submodules of a LoraLinear4bit (its base) or of a ModulesToSave wrapper (the original module
    and the adapters' copies), which are never targets themselves."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        if isinstance(model.get_submodule(".".join(parts[:i])), (LoraLinear4bit, ModulesToSave)):
            return True
    return False


class ModulesToSave(nn.Module):
    """A module of ``modules_to_save``, as peft's ModulesToSaveWrapper: the original module (frozen) and one
    trainable copy per adapter that lists it. The forward runs the active adapter's copy, or the original module
    when adapters are disabled or the active adapter has no copy (so ``disable_adapter()`` gives the base model
    back, as in peft). State-dict names are peft's: ``original_module.*`` and ``modules_to_save.<adapter>.*``;
    other attributes (``weight``, ...) are read from the module in use."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original_module = original.requires_grad_(False)
        self.modules_to_save = nn.ModuleDict()
        self.active: str | None = None
        self.disabled = False

    def add(self, adapter_name: str) -> None:
        self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)

    def in_use(self) -> nn.Module:
        if self.disabled or self.active is None:
            return self.original_module
        return self.modules_to_save[self.active]

    def forward(self, *args, **kwargs):
        return self.in_use()(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save") or "_modules" not in self.__dict__:
                raise
            return getattr(self.in_use(), name)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _init_name(config: LoraConfig) -> str:
    return "gaussian" if config.init_lora_weights == "gaussian" else "kaiming"


def inject_adapter(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> list[str]:
    """Quantizes every targeted nn.Linear of ``model`` in place (Linear4bit in the config's format) and adds the
    adapter ``adapter_name`` to it (layers already quantized / already LoRA layers get the adapter only).
    Returns the targeted module names."""
    names = find_target_modules(model, config)
    for name in names:
        module = model.get_submodule(name)
        r = _pattern_value(name, config.rank_pattern, config.r, "rank_pattern")
        alpha = _pattern_value(name, config.alpha_pattern, config.lora_alpha, "alpha_pattern")
        kwargs = dict(r=r, alpha=alpha, dropout=config.lora_dropout, use_rslora=config.use_rslora,
                      use_dora=config.use_dora, lora_bias=config.lora_bias, init=_init_name(config))
        if isinstance(module, LoraLinear4bit):
            adapter = module.add_adapter(adapter_name, **kwargs, activate=False)
        else:
            if isinstance(module, nn.Linear) or is_conv1d(module):
                module = Linear4bit.from_linear(module, config.quant_type, config.blocksize, config.double_quant,
                                                config.compute_dtype)
            layer = LoraLinear4bit(module, **kwargs, adapter_name=adapter_name)
            _set_submodule(model, name, layer)
            adapter = layer.adapters[adapter_name]
        if config.init_lora_weights is False:  # peft's "no identity" init, for tests
            with torch.no_grad():
                nn.init.normal_(adapter.lora_B, std=0.02)
    # peft's rule: the adapter's fan_in_fan_out says whether its layers store weights [in, out] (Conv1D)
    config.fan_in_fan_out = any(model.get_submodule(name).base.fan_in_fan_out for name in names)
    return names


# ---- the model wrapper -----------------------------------------------------------------------------------------

class _DelegatingForward:
    """``QPeftModel.forward``: calls the wrapped model and carries its signature (transformers' Trainer reads the
    forward signature to pick dataset columns). Built per access, so copies of the wrapper hold nothing stale."""

    def __get__(self, obj, objtype=None):
        if obj is None:  # on the class: a plain function of (model, *args, **kwargs)
            return _forward_unbound
        base = obj.base_model

        def forward(*args, **kwargs):
            return base(*args, **kwargs)

        forward.__signature__ = inspect.signature(base.forward)
        forward.__doc__ = base.forward.__doc__
        return forward


def _forward_unbound(self, *args, **kwargs):
    return self.base_model(*args, **kwargs)


class _ModelSnapshot:
    """The module tree, trainable flags and adapter selections of ``root``, to put back when adding or loading an
    adapter fails part-way: a failed load leaves the model as it was (restore())."""

    def __init__(self, root: nn.Module):
        self.children = [(m, dict(m._modules)) for m in root.modules()]
        self.flags = [(p, p.requires_grad) for p in root.parameters()]
        self.active = [(m, list(m.active_adapters)) for m in root.modules() if isinstance(m, LoraLinear4bit)]
        self.wrappers = [(m, m.active) for m in root.modules() if isinstance(m, ModulesToSave)]

    def restore(self) -> None:
        for module, children in self.children:
            module._modules.clear()
            module._modules.update(children)
        for layer, active in self.active:
            layer.active_adapters = active
        for wrapper, active in self.wrappers:
            wrapper.active = active
        for p, flag in self.flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def _all_or_nothing(model: nn.Module, peft_model: "QPeftModel | None" = None) -> Iterator[None]:
    """Runs the block; if it raises, ``model`` (and ``peft_model``'s adapter registry) is restored as it was."""
    snapshot = _ModelSnapshot(model)
    registry = None if peft_model is None else (dict(peft_model.peft_config), peft_model.active_adapter)
    try:
        yield
    except BaseException:
        snapshot.restore()
        if registry is not None:
            peft_model.peft_config, peft_model.active_adapter = registry[0], registry[1]
        raise


class QPeftModel(nn.Module):
    """Wraps a model whose targeted linear layers are LoraLinear4bit. ``forward`` is the model's; attributes the
    wrapper lacks are looked up on the model (config, generate, gradient_checkpointing_enable, ...)."""

    def __init__(self, model: nn.Module, config: LoraConfig, adapter_name: str = "default"):
        super().__init__()
        self.base_model = model
        self.peft_config: dict[str, LoraConfig] = {}
        self.active_adapter = adapter_name
        self.add_adapter(adapter_name, config)

    forward = _DelegatingForward()

    def get_base_model(self) -> nn.Module:
        return self.base_model

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # ---- adapters ---------------------------------------------------------------------------------------------
    def lora_layers(self) -> Iterator[tuple[str, LoraLinear4bit]]:
        for name, module in self.base_model.named_modules():
            if isinstance(module, LoraLinear4bit):
                yield name, module

    def add_adapter(self, adapter_name: str, config: LoraConfig) -> None:
        """Adds (and trains) adapter ``adapter_name``; other adapters stay but are inactive."""
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"qpeft: adapter {adapter_name!r} already exists")
        with _all_or_nothing(self.base_model, self):
            inject_adapter(self.base_model, config, adapter_name)
            for name, module in self._modules_to_save(config):
                if not isinstance(module, ModulesToSave):
                    module = ModulesToSave(module)
                    _set_submodule(self.base_model, name, module)
                module.add(adapter_name)
            self.peft_config[adapter_name] = config
            self.set_adapter(adapter_name)

    def _wrappers(self) -> Iterator[tuple[str, ModulesToSave]]:
        for name, module in self.base_model.named_modules():
            if isinstance(module, ModulesToSave):
                yield name, module

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Activates one adapter (or several, summed) and makes exactly its parameters trainable (plus the biases
        its config trains and its modules_to_save)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for n in names:
            if n not in self.peft_config:
                raise KeyError(f"qpeft: no adapter named {n!r} (have {list(self.peft_config)})")
        for p in self.base_model.parameters():
            p.requires_grad_(False)
        for _, layer in self.lora_layers():
            present = [n for n in names if n in layer.adapters]
            layer.set_adapter(present)
            for n in present:
                layer.adapters[n].requires_grad_(True)
        for n in names:
            self._unfreeze_extras(self.peft_config[n])
        for wname, wrapper in self._wrappers():
            owners = [n for n in names if n in wrapper.modules_to_save]
            if len(owners) > 1:
                raise ValueError(f"qpeft: adapters {owners} each have their own copy of {wname!r} "
                                 "(modules_to_save); only one of them can be active at a time, as in peft")
            wrapper.active = owners[0] if owners else None
            if owners:
                wrapper.modules_to_save[owners[0]].requires_grad_(True)
        self.active_adapter = names[0] if len(names) == 1 else names

    def _unfreeze_extras(self, config: LoraConfig) -> None:
        if config.bias == "all":
            for pname, p in self.base_model.named_parameters():
                if pname.endswith("bias") and p.is_floating_point():
                    p.requires_grad_(True)
        elif config.bias == "lora_only":
            for _, layer in self.lora_layers():
                if layer.base.bias is not None:
                    layer.base.bias.requires_grad_(True)

    def _modules_to_save(self, config: LoraConfig) -> list[tuple[str, nn.Module]]:
        """The modules (or their ModulesToSave wrappers) that ``config.modules_to_save`` names."""
        targets = list(config.modules_to_save or [])
        return [(n, m) for n, m in self.base_model.named_modules()
                if n and _is_target(n, targets) and not _inside_wrapper(n, self.base_model)]

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise KeyError(f"qpeft: no adapter named {adapter_name!r}")
        for _, layer in self.lora_layers():
            if adapter_name in layer.adapters:
                layer.delete_adapter(adapter_name)
        for name, wrapper in list(self._wrappers()):
            if adapter_name in wrapper.modules_to_save:
                del wrapper.modules_to_save[adapter_name]
                if wrapper.active == adapter_name:
                    wrapper.active = None
                if not len(wrapper.modules_to_save):  # no adapter keeps a copy: the plain module again
                    _set_submodule(self.base_model, name, wrapper.original_module)
        del self.peft_config[adapter_name]

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the context every LoRA layer is its frozen base alone and every modules_to_save module its
        original (the base model, as in peft)."""
        with contextlib.ExitStack() as stack:
            for _, layer in self.lora_layers():
                stack.enter_context(layer.disable_adapter())
            for _, wrapper in self._wrappers():
                wrapper.disabled = True
                stack.callback(setattr, wrapper, "disabled", False)
            yield

    # ---- merging --------------------------------------------------------------------------------------------
    def merge_adapter(self, dtype: torch.dtype | None = None) -> None:
        for _, layer in self.lora_layers():
            layer.merge(dtype)

    def unmerge_adapter(self) -> None:
        for _, layer in self.lora_layers():
            layer.unmerge()

    @torch.no_grad()
    def merge_and_unload(self, dtype: torch.dtype | None = None) -> nn.Module:
        """The model with every LoRA layer replaced by a dense nn.Linear holding W + the active adapters (merged in
        16/32-bit from one dequantization: no 4-bit requantization loss). ``dtype``: default the weights' own."""
        for name, layer in list(self.lora_layers()):
            _set_submodule(self.base_model, name, layer.to_linear(dtype))
        self._unwrap_modules_to_save()
        return self.base_model

    def _unwrap_modules_to_save(self) -> None:
        """Each modules_to_save wrapper replaced by the module in use (the active adapter's copy), as peft's
        merge_and_unload / unload do."""
        for name, wrapper in list(self._wrappers()):
            _set_submodule(self.base_model, name, wrapper.in_use())

    @torch.no_grad()
    def unload(self) -> nn.Module:
        """The model with every LoRA layer replaced by its frozen 4-bit base (adapters dropped)."""
        for name, layer in list(self.lora_layers()):
            _set_submodule(self.base_model, name, layer.base)
        self._unwrap_modules_to_save()
        return self.base_model

    # ---- reporting ------------------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts; a 4-bit weight counts its elements (bytes * 2), as peft does."""
        trainable = total = 0
        for module in self.base_model.modules():
            for name, p in module.named_parameters(recurse=False):
                n = p.numel()
                if isinstance(module, Linear4bit) and name == "weight":
                    n = module.in_features * module.out_features
                total += n
                trainable += n if p.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")

    # ---- peft's file format -----------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | Path, selected_adapters: Sequence[str] | None = None) -> None:
        """peft's layout: adapter_config.json + adapter_model.safetensors per adapter ("default" at the top,
        others in a subfolder of their name)."""
        from .adapter_io import save_adapter
        for name in selected_adapters or list(self.peft_config):
            if name not in self.peft_config:
                raise KeyError(f"qpeft: no adapter named {name!r}")
            folder = folder_inside(save_directory, *([] if name == "default" else [check_adapter_name(name)]))
            save_adapter(self, name, folder)

    def load_adapter(self, model_id: str | Path, adapter_name: str = "default", is_trainable: bool = False,
                     **kwargs) -> None:
        """Loads a peft LoRA adapter (from peft or qpeft: a local folder or a Hub repository id; ``subfolder``,
        ``revision``, ``token`` as in peft) as ``adapter_name`` and activates it."""
        from .adapter_io import load_adapter_files
        config, tensors = load_adapter_files(model_id, **kwargs)
        with _all_or_nothing(self.base_model, self):  # a failed load leaves no adapter behind
            self.add_adapter(adapter_name, config)
            self._load_adapter_tensors(adapter_name, config, tensors)
        if not is_trainable:
            for p in self.base_model.parameters():
                p.requires_grad_(False)

    def _load_adapter_tensors(self, adapter_name, config, tensors):
        from .adapter_io import assign_adapter_tensors
        assign_adapter_tensors(self, adapter_name, config, tensors)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | Path, adapter_name: str = "default",
                        is_trainable: bool = False, **kwargs) -> "QPeftModel":
        """peft's PeftModel.from_pretrained: quantize ``model``'s targets and load the adapter (a local folder or a
        Hub repository id; ``subfolder``, ``revision``, ``token`` as in peft) into them. The other keywords override
        the 4-bit format (quant_type, blocksize, double_quant, compute_dtype)."""
        from .adapter_io import load_adapter_files
        config, tensors = load_adapter_files(model_id, **kwargs)
        with _all_or_nothing(model):  # a failed load leaves the caller's model unquantized
            wrapper = cls(model, config, adapter_name)
            wrapper._load_adapter_tensors(adapter_name, config, tensors)
        if not is_trainable:
            for p in wrapper.base_model.parameters():
                p.requires_grad_(False)
        return wrapper


def get_peft_model(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> QPeftModel:
    """Quantizes the targeted nn.Linear layers of ``model`` in place to 4 bits, attaches a LoRA adapter to each and
    freezes everything else (peft's get_peft_model, on a qpeft 4-bit base)."""
    return QPeftModel(model, config, adapter_name)


def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: dict | None = None) -> nn.Module:
    """Freezes the model and turns on gradient checkpointing (non-reentrant by default). Unlike peft's helper it
    does not upcast the non-quantized 16-bit parameters to fp32 (norms, embeddings, the head: about 1 GB on a 7B
    model); the LoRA layers compute in the activations' dtype with fp32 adapters anyway."""
    for p in model.parameters():
        p.requires_grad_(False)
    if use_gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        kwargs = {"use_reentrant": False} if gradient_checkpointing_kwargs is None else gradient_checkpointing_kwargs
        if kwargs.get("use_reentrant", True) and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()  # reentrant checkpoints need an input that requires grad
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model
