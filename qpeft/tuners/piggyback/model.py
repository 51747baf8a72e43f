"""Piggyback masks placed on a model, and the files: ``base_model.model.<module>.mask_bits`` (uint8, the binary
mask packed 8 weights a byte, most significant bit first, row-major [out, in])."""

from __future__ import annotations

import torch
from torch import nn

from ...nn.piggyback import MaskedLinear4bit, pack_bits, unpack_bits
from .. import targets
from ..lora.model import PREFIX
from .config import PiggybackConfig


def masked_layers(model: nn.Module):
    return targets.modules_of(model, MaskedLinear4bit)


def inject_adapter(model: nn.Module, config: PiggybackConfig, adapter_name: str, loaded: bool = False) -> list[str]:
    names = targets.find_target_modules(model, config)
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, MaskedLinear4bit):
            module = MaskedLinear4bit(targets.quantized(module, config))
            targets.set_submodule(model, name, module)
        module.add_mask(
            adapter_name, config.threshold, config.init_score, getattr(torch, config.score_dtype), activate=False
        )
    return names


def file_parameters(model: nn.Module, config: PiggybackConfig, adapter_name: str) -> dict[str, torch.Tensor]:
    """The masks, packed (what the file holds; computed, not parameters)."""
    return {
        f"{PREFIX}{name}.mask_bits": pack_bits(layer.adapters[adapter_name].mask())
        for name, layer in masked_layers(model)
        if adapter_name in layer.adapters
    }


@torch.no_grad()
def load(model: nn.Module, config: PiggybackConfig, adapter_name: str, tensors: dict) -> None:
    """Scores from saved masks: init_score where kept, 0 (below the threshold when it is positive, else
    threshold - |init_score - threshold|) where masked."""
    expected = {
        f"{PREFIX}{name}.mask_bits": layer for name, layer in masked_layers(model) if adapter_name in layer.adapters
    }
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"qpeft: the adapter file does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    low = min(0.0, config.threshold - abs(config.init_score - config.threshold))
    for key, layer in expected.items():
        keep = unpack_bits(tensors[key], (layer.out_features, layer.in_features)).to(layer.base.weight.device)
        scores = layer.adapters[adapter_name].scores
        scores.copy_(torch.where(keep, torch.tensor(config.init_score), torch.tensor(low)).to(scores.dtype))
