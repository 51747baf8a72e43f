"""Bottleneck adapters placed on a model. File keys: ``base_model.model.<module>.bottleneck.down.weight`` [b, d],
``.down.bias``, ``.up.weight`` [d, b], ``.up.bias``."""

from __future__ import annotations

from torch import nn

from ...errors import ConfigError
from ...nn.bottleneck import BottleneckAdapter, Bottlenecks, apply_bottlenecks
from .. import targets
from ..lora.model import PREFIX
from ..config import model_size
from .config import BottleneckConfig

ATTENTION = ("self_attn", "attn", "attention")
MLP = ("mlp", "feed_forward")


def placement(model: nn.Module, config: BottleneckConfig) -> list[str]:
    """The modules whose outputs get an adapter."""
    if config.target_modules is not None:
        names = [n for n, _ in model.named_modules() if n and targets.is_target(n, config.target_modules)]
    else:
        kinds = MLP if config.style == "pfeiffer" else ATTENTION + MLP
        names = [
            n
            for n, _ in model.named_modules()
            if n.rpartition(".")[2] in kinds and n.rpartition(".")[0].rpartition(".")[2].isdecimal()
        ]
    names = [n for n in names if ".qpeft_bottlenecks" not in n and not targets.inside_wrapper(n, model)]
    if not names:
        raise ValueError("qpeft: no module to place bottleneck adapters after (set target_modules)")
    return names


def _hidden_size(model: nn.Module) -> int:
    hidden = model_size(getattr(model, "config", None), "token_dim")
    if not hidden:
        raise ValueError("qpeft: the model's hidden size is not in its config")
    return hidden


def inject_adapter(model: nn.Module, config: BottleneckConfig, adapter_name: str, loaded: bool = False) -> list[str]:
    if config.quantize:
        targets.quantize_linears(model, config)
    hidden = _hidden_size(model)
    width = config.bottleneck_size or max(hidden // config.reduction_factor, 1)
    if width > hidden:
        raise ConfigError(None, "bottleneck_size", f"is {width}, above the model's hidden size {hidden}")
    device = next(model.parameters()).device
    names = placement(model, config)
    for name in names:
        module = model.get_submodule(name)
        out = getattr(module, "out_features", None)
        if isinstance(out, int) and out != hidden:
            raise ConfigError(
                None, "target_modules", f"places an adapter after {name!r}, whose {out} outputs are not the hidden size"
            )
        if not hasattr(module, "qpeft_bottlenecks"):
            module.qpeft_bottlenecks = Bottlenecks()
            module.register_forward_hook(apply_bottlenecks)
        adapter = BottleneckAdapter(hidden, width, config.non_linearity, config.init_std, device)
        module.qpeft_bottlenecks.add_adapter(adapter_name, adapter, activate=False)
    return names


def bottleneck_sets(model: nn.Module):
    for name, module in model.named_modules():
        if isinstance(module, Bottlenecks):
            yield name.removesuffix(".qpeft_bottlenecks"), module


def file_parameters(model: nn.Module, config: BottleneckConfig, adapter_name: str) -> dict[str, nn.Parameter]:
    params = {}
    for name, adapters in bottleneck_sets(model):
        if adapter_name in adapters.adapters:
            for pname, p in adapters.adapters[adapter_name].named_parameters():
                params[f"{PREFIX}{name}.bottleneck.{pname}"] = p
    return params


def remove(model: nn.Module) -> None:
    """Every bottleneck adapter and hook taken off the model."""
    for name, _ in list(bottleneck_sets(model)):
        module = model.get_submodule(name) if name else model
        for key in [k for k, hook in module._forward_hooks.items() if hook is apply_bottlenecks]:
            del module._forward_hooks[key]
        del module.qpeft_bottlenecks
