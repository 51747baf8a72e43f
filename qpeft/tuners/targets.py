"""Which modules a config targets, read from module names as peft reads them.

``target_modules`` is a list of module names or name suffixes (matched at a '.' boundary), one regex string
(fullmatch against the module name), or "all-linear" (every linear layer except the output head);
``exclude_modules`` (same forms) and ``modules_to_save`` are never targets; with a list, ``layers_to_transform``
keeps the layers of those indices (the first numbered segment of the name, or the one after ``layers_pattern``).
``rank_pattern`` / ``alpha_pattern`` map regexes (matched against the end of a module name) to per-layer values.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from torch import nn

from .. import patterns
from ..nn.adapter_holder import AdapterLayer4bit, NamedAdapters
from ..nn.linear4bit import Linear4bit, is_conv1d
from ..nn.modules_to_save import ModulesToSave
from ..nn.takeover import bitsandbytes_kind, from_bitsandbytes


def modules_of(model: nn.Module, cls) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every submodule of ``model`` that is a ``cls``."""
    for name, module in model.named_modules():
        if isinstance(module, cls):
            yield name, module


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def linear_modules(model: nn.Module) -> list[str]:
    """The names of every linear layer of ``model`` but the output head (peft's "all-linear" set), not counting the
    layers inside adapter wrappers."""
    skip = output_head_names(model)
    return [
        name
        for name, module in model.named_modules()
        if name and name not in skip and is_linear(module) and not inside_wrapper(name, model)
    ]


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the output embedding (lm_head) that "all-linear" skips, as peft does."""
    names = set()
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    for name, module in model.named_modules():
        if module is head or (head is None and name.split(".")[-1] == "lm_head"):
            names.add(name)
    return names


def is_target(name: str, target_modules: list[str] | str, key: str = "target_modules") -> bool:
    """peft's name rule: a regex string must fullmatch the name; a list entry must equal it or be a suffix at a
    '.' boundary."""
    if isinstance(target_modules, str):
        return patterns.fullmatch(target_modules, name, key) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def pattern_value(name: str, pattern_values: dict, default, key: str):
    for pattern, value in pattern_values.items():
        if patterns.match(rf"(.*\.)?({pattern})$", name, key):
            return value
    return default


def layer_index(name: str, layers_pattern: list[str] | str | None) -> int | None:
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


def in_layers(name: str, config) -> bool:
    layers = config.layers_to_transform
    if layers is None or layers == []:
        return True
    index = layer_index(name, config.layers_pattern)
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


def within(name: str, module_names: Sequence[str]) -> bool:
    """True when ``name`` is one of ``module_names`` or inside one (matched on whole '.'-separated segments)."""
    dotted = f".{name}."
    return any(f".{m}." in dotted for m in module_names)


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Linear4bit, AdapterLayer4bit)) or is_conv1d(module)


def find_target_modules(model: nn.Module, config) -> list[str]:
    """The names of the modules that ``config`` targets (nn.Linear, transformers Conv1D, qpeft Linear4bit or an
    adapter layer), as peft selects them: exclude_modules and modules_to_save first, then target_modules, then
    (list targets) layers_to_transform."""
    if config.target_modules is None:
        raise ValueError(
            f"qpeft: {type(config).__name__}.target_modules is required (a list of names, a regex, or 'all-linear')"
        )
    all_linear = config.target_modules == "all-linear"
    skip = output_head_names(model) if all_linear else set()
    names = []
    for name, module in model.named_modules():
        if not name or name in skip or inside_wrapper(name, model):
            continue
        if config.exclude_modules and is_target(name, config.exclude_modules, "exclude_modules"):
            continue
        if config.modules_to_save and within(name, config.modules_to_save):
            continue
        if all_linear:
            if not is_linear(module):
                continue
        elif not is_target(name, config.target_modules):
            continue
        if not in_layers(name, config):  # (LoraConfig allows layers_to_transform with a list target only)
            continue
        if not is_linear(module):
            raise ValueError(
                f"qpeft: target module {name!r} is a {type(module).__name__}; only linear layers "
                "(nn.Linear, transformers Conv1D) can be targeted"
            )
        names.append(name)
    if not names:
        raise ValueError(
            f"qpeft: target_modules {config.target_modules!r} match no linear layer of the model"
            + (" in layers_to_transform" if config.layers_to_transform not in (None, []) else "")
        )
    return names


def inside_wrapper(name: str, model: nn.Module) -> bool:
    """True for the submodules of an adapter layer (its base) or of a ModulesToSave wrapper (the original module
    and the adapters' copies), which are never targets themselves."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        if isinstance(model.get_submodule(".".join(parts[:i])), (NamedAdapters, ModulesToSave)):
            return True
    return False


def modules_to_save_of(model: nn.Module, names: Sequence[str] | None) -> list[tuple[str, nn.Module]]:
    """The modules ``names`` (modules_to_save) selects, or their ModulesToSave wrappers."""
    names = list(names or [])
    return [(n, m) for n, m in model.named_modules() if n and is_target(n, names) and not inside_wrapper(n, model)]


def quantized(module: nn.Module, config) -> Linear4bit:
    """``module`` (nn.Linear, transformers Conv1D or already Linear4bit) as a Linear4bit in ``config``'s format."""
    if isinstance(module, Linear4bit):
        return module
    return Linear4bit.from_linear(
        module, config.quant_type, config.blocksize, config.double_quant, config.compute_dtype
    )


def quantizable_linears(model: nn.Module) -> list[str]:
    """The linear layers a whole model's quantization makes 4-bit: every one but the output head and the modules the
    model keeps in fp32 (``_keep_in_fp32_modules``: T5's ``wo``, whose input T5 casts to its weight's dtype)."""
    fp32 = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    return [name for name in linear_modules(model) if not is_target(name, fp32)]


def quantize_linears(model: nn.Module, config, skip=lambda name: False) -> None:
    """Every ``quantizable_linears`` layer but the names ``skip`` accepts made a 4-bit layer in ``config``'s format;
    layers already 4-bit stay as they are."""
    for name in quantizable_linears(model):
        module = model.get_submodule(name)
        if not isinstance(module, Linear4bit) and not skip(name):
            set_submodule(model, name, quantized(module, config))


def take_over_bitsandbytes(model: nn.Module) -> int:
    """Every bitsandbytes 4-bit layer of ``model`` replaced by its qpeft layer (``from_bitsandbytes``); an 8-bit
    layer is refused (a TypeError naming it) before anything changes. Returns how many were taken over."""
    layers = [(name, m, bitsandbytes_kind(m)) for name, m in model.named_modules()]
    eight = [name for name, _, kind in layers if kind == "8bit"]
    if eight:
        raise TypeError(
            f"qpeft: {eight[0]!r} is a bitsandbytes 8-bit layer; qpeft's bases are 4-bit (load the model with "
            "BitsAndBytesConfig(load_in_4bit=True), qpeft.QuantizationConfig(), or unquantized)"
        )
    taken = [(name, from_bitsandbytes(m)) for name, m, kind in layers if kind == "4bit"]
    for name, layer in taken:
        set_submodule(model, name, layer)
    return len(taken)
