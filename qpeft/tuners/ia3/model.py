"""IA3 on qpeft's 4-bit layers: IA3Linear4bit in the targeted linears, and peft's file keys
(``base_model.model.<module>.ia3_l``: [out, 1], or [1, in] for a feed-forward module)."""

from __future__ import annotations


import torch
from torch import nn

from ...nn.ia3 import IA3Linear4bit
from .. import default_targets, targets
from ..lora.model import PREFIX
from .config import IA3Config


def ia3_layers(model: nn.Module):
    return targets.modules_of(model, IA3Linear4bit)


def is_feedforward(name: str, config: IA3Config) -> bool:
    ff = config.feedforward_modules
    return ff is not None and targets.is_target(name, ff, "feedforward_modules")


def inject_adapter(model: nn.Module, config: IA3Config, adapter_name: str, loaded: bool = False) -> list[str]:
    default_targets.fill_ia3(model, config)  # (no target_modules: peft's defaults for the model type)
    names = targets.find_target_modules(model, config)
    for name in names:
        module = model.get_submodule(name)
        feedforward = is_feedforward(name, config)
        if isinstance(module, IA3Linear4bit):
            if module.feedforward != feedforward:
                raise ValueError(
                    f"qpeft: {name!r} is a {'feed-forward' if module.feedforward else 'output'}-scaled "
                    "IA3 layer already; adapters of one layer scale the same side"
                )
            module.add_adapter(adapter_name, config.init_ia3_weights, activate=False)
        else:
            layer = IA3Linear4bit(targets.quantized(module, config), feedforward, adapter_name, config.init_ia3_weights)
            targets.set_submodule(model, name, layer)
    config.fan_in_fan_out = any(model.get_submodule(n).base.fan_in_fan_out for n in names)
    return names


def file_parameters(model: nn.Module, config: IA3Config, adapter_name: str) -> dict[str, torch.Tensor]:
    return {
        PREFIX + name + ".ia3_l": layer.adapters[adapter_name]
        for name, layer in ia3_layers(model)
        if adapter_name in layer.adapters
    }


def start_sharded(layer: IA3Linear4bit, device: torch.device) -> None:
    """A meta-built layer's vectors made real on ``device`` with their initial values."""
    layer.adapters.to_empty(device=device)
    for name in layer.adapters:
        layer.reset_adapter(name)
