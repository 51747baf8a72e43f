"""LoRA on qpeft's 4-bit layers: adapters injected into the targeted linears, and the tensors of peft's file.

File keys are ``base_model.model.`` + the module path + ``.lora_A.weight`` [r, in], ``.lora_B.weight`` [out, r],
``.lora_B.bias`` (lora_bias), ``.lora_magnitude_vector`` [out] (DoRA), ``.base_layer.bias`` (bias="lora_only"
or "all"), and the modules_to_save' own parameter names; the adapter name never appears.
"""

from __future__ import annotations


import torch
from torch import nn

from ...nn.lora import LoraLinear4bit
from .. import default_targets, targets
from .config import LoraConfig

PREFIX = "base_model.model."


def lora_layers(model: nn.Module):
    return targets.modules_of(model, LoraLinear4bit)


def _init_name(config: LoraConfig) -> str:
    return "gaussian" if config.init_lora_weights == "gaussian" else "kaiming"


def inject_adapter(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> list[str]:
    """Quantizes every targeted nn.Linear of ``model`` in place (Linear4bit in the config's format) and adds the
    adapter ``adapter_name`` to it (layers already quantized / already LoRA layers get the adapter only).
    Returns the targeted module names. No target_modules: peft's defaults for the model type."""
    default_targets.fill_lora(model, config)
    names = targets.find_target_modules(model, config)
    for name in names:
        module = model.get_submodule(name)
        r = targets.pattern_value(name, config.rank_pattern, config.r, "rank_pattern")
        alpha = targets.pattern_value(name, config.alpha_pattern, config.lora_alpha, "alpha_pattern")
        kwargs = dict(
            r=r,
            alpha=alpha,
            dropout=config.lora_dropout,
            use_rslora=config.use_rslora,
            use_dora=config.use_dora,
            lora_bias=config.lora_bias,
            init=_init_name(config),
        )
        if isinstance(module, LoraLinear4bit):
            adapter = module.add_adapter(adapter_name, **kwargs, activate=False)
        else:
            layer = LoraLinear4bit(targets.quantized(module, config), **kwargs, adapter_name=adapter_name)
            targets.set_submodule(model, name, layer)
            adapter = layer.adapters[adapter_name]
        if config.init_lora_weights is False:  # peft's "no identity" init, for tests
            with torch.no_grad():
                nn.init.normal_(adapter.lora_B, std=0.02)
    # peft's rule: the adapter's fan_in_fan_out says whether its layers store weights [in, out] (Conv1D)
    config.fan_in_fan_out = any(model.get_submodule(name).base.fan_in_fan_out for name in names)
    return names


def file_parameters(model: nn.Module, config: LoraConfig, adapter_name: str) -> dict[str, nn.Parameter]:
    """peft key -> the parameter of ``model`` (the wrapped model) it holds, for everything the adapter's file
    contains."""
    params: dict[str, nn.Parameter] = {}
    for path, layer in lora_layers(model):
        if adapter_name not in layer.adapters:
            continue
        a, key = layer.adapters[adapter_name], PREFIX + path
        params[key + ".lora_A.weight"] = a.lora_A
        params[key + ".lora_B.weight"] = a.lora_B
        if a.lora_bias is not None:
            params[key + ".lora_B.bias"] = a.lora_bias
        if a.lora_magnitude is not None:
            params[key + ".lora_magnitude_vector"] = a.lora_magnitude
    params.update(bias_parameters(model, config))
    return params


def bias_parameters(model: nn.Module, config: LoraConfig) -> dict[str, nn.Parameter]:
    """peft key -> the model's own bias that ``config.bias`` trains ("lora_only": the adapted layers' base biases;
    "all": every floating bias outside the adapters and the modules_to_save copies)."""
    if config.bias == "none":
        return {}
    lora_paths = {path for path, _ in lora_layers(model)}
    params = {}
    for name, p in model.named_parameters():
        if not name.endswith(".bias") or not p.is_floating_point() or ".adapters." in name:
            continue
        if ".original_module." in name or ".modules_to_save." in name:
            continue  # a modules_to_save module's parameters: its adapter copy's
        owner = name.rsplit(".", 2)[0] if name.count(".") >= 2 else ""
        in_lora = name.endswith(".base.bias") and owner in lora_paths
        if config.bias == "lora_only" and not in_lora:
            continue
        params[PREFIX + (owner + ".base_layer.bias" if in_lora else name)] = p
    return params


def start_sharded(layer: LoraLinear4bit, device: torch.device) -> None:
    """A meta-built layer's adapters made real on ``device`` with their initial values (DoRA's magnitude is set
    from the loaded base later)."""
    for adapter in layer.adapters.values():
        adapter.to_empty(device=device)
        adapter.reset_parameters()


def unfreeze_biases(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> None:
    """The biases that ``config.bias`` trains."""
    for p in bias_parameters(model, config).values():
        p.requires_grad_(True)
