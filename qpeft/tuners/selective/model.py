"""BitFit and layer-wise fine-tuning on a 4-bit base. Files: adapter_config.json (peft_type QPEFT_BITFIT /
QPEFT_LAYERWISE) and adapter_model.safetensors holding ``base_model.model.`` + each trained parameter's name."""

from __future__ import annotations

import torch
from torch import nn

from ...nn.linear4bit import Linear4bit, dense_layer, is_conv1d
from .. import targets
from ..lora.model import PREFIX
from .config import BitFitConfig, LayerwiseConfig


# ---- BitFit -----------------------------------------------------------------------------------------------------


def _bias_owners(model: nn.Module, config: BitFitConfig) -> list[tuple[str, nn.Module]]:
    """The modules whose bias trains: those with a bias parameter (or, with add_missing_bias, linear layers without
    one) whose name bias_modules selects."""
    owners = []
    for name, module in model.named_modules():
        if not name or (
            config.bias_modules is not None and not targets.is_target(name, config.bias_modules, "bias_modules")
        ):
            continue
        missing = config.add_missing_bias and isinstance(module, Linear4bit) and module.bias is None
        if module._parameters.get("bias") is not None or missing:
            owners.append((name, module))
    return owners


def inject_bitfit(model: nn.Module, config: BitFitConfig, adapter_name: str, loaded: bool = False) -> list[str]:
    if config.quantize:
        targets.quantize_linears(model, config)
    owners = _bias_owners(model, config)
    if not owners:
        raise ValueError(
            f"qpeft: bias_modules {config.bias_modules!r} select no module with a bias"
            + ("" if config.add_missing_bias else " (add_missing_bias=True adds zero biases)")
        )
    for _, module in owners:
        if module.bias is None:
            module.bias = nn.Parameter(torch.zeros(module.out_features, device=module.weight.device))
    return [name for name, _ in owners]


def bitfit_parameters(model: nn.Module, config: BitFitConfig, adapter_name: str) -> dict[str, nn.Parameter]:
    return {
        f"{PREFIX}{name}.bias": module.bias for name, module in _bias_owners(model, config) if module.bias is not None
    }


# ---- layer-wise ---------------------------------------------------------------------------------------------------


def _layer_indices(model: nn.Module, config: LayerwiseConfig) -> set[int]:
    found = {targets.layer_index(name, config.layers_pattern) for name, _ in model.named_parameters()}
    found.discard(None)
    if not found:
        raise ValueError("qpeft: no numbered transformer layer in the model's parameter names (set layers_pattern)")
    if config.last_k is not None:
        return set(sorted(found)[-config.last_k :])
    chosen = {config.layers} if isinstance(config.layers, int) else set(config.layers)
    missing = sorted(chosen - found)
    if missing:
        raise ValueError(f"qpeft: layers {missing} are not in the model (it has layers {sorted(found)})")
    return chosen


def _in_chosen(name: str, config: LayerwiseConfig, chosen: set[int]) -> bool:
    return targets.layer_index(name, config.layers_pattern) in chosen


def inject_layerwise(model: nn.Module, config: LayerwiseConfig, adapter_name: str, loaded: bool = False) -> list[str]:
    """The chosen layers' linear layers dense (4-bit ones dequantized exactly, in their original dtype), the rest
    4-bit."""
    chosen = _layer_indices(model, config)
    if config.quantize:
        targets.quantize_linears(model, config, skip=lambda name: _in_chosen(name, config, chosen))
    for name, module in list(model.named_modules()):
        if isinstance(module, Linear4bit) and _in_chosen(name, config, chosen):
            # the model's own dtype (not the compute dtype, which may be wider: inputs arrive in the model's)
            dtype = module.weight_dtype
            dense = dense_layer(module.dequantized_weight(dtype), module.bias, module.fan_in_fan_out)
            targets.set_submodule(model, name, dense)
    config.layers, config.last_k = sorted(chosen), None  # the file names the layers themselves
    return [
        name
        for name, m in model.named_modules()
        if _in_chosen(name, config, chosen) and (isinstance(m, nn.Linear) or is_conv1d(m))
    ]


def layerwise_parameters(model: nn.Module, config: LayerwiseConfig, adapter_name: str) -> dict[str, nn.Parameter]:
    chosen = _layer_indices(model, config)
    return {PREFIX + name: p for name, p in model.named_parameters() if _in_chosen(name, config, chosen)}


def unfreeze_own(model: nn.Module, config, adapter_name: str) -> None:
    """BitFit / layer-wise: the model's own parameters in the adapter's file train."""
    parameters = bitfit_parameters if isinstance(config, BitFitConfig) else layerwise_parameters
    for p in parameters(model, config, adapter_name).values():
        p.requires_grad_(True)
