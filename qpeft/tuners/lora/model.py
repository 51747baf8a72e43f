"""LoRA on qpeft's 4-bit layers: adapters injected into the targeted linears, and the tensors of peft's file.

File keys are ``base_model.model.`` + the module path + ``.lora_A.weight`` [r, in], ``.lora_B.weight`` [out, r],
``.lora_B.bias`` (lora_bias), ``.lora_magnitude_vector`` [out] (DoRA), ``.base_layer.bias`` (bias="lora_only"
or "all"), and the modules_to_save' own parameter names; the adapter name never appears.
"""

from __future__ import annotations


import functools

import torch
from torch import nn

from ... import formats
from ...nn.linear4bit import Linear4bit, is_conv1d
from ...nn.lora import LoraLinear4bit
from ...quantized import Quantized4bitWeight
from .. import default_targets, targets
from . import init
from .config import LoraConfig

PREFIX = "base_model.model."


def lora_layers(model: nn.Module):
    return targets.modules_of(model, LoraLinear4bit)


def _init_name(config: LoraConfig) -> str:
    return "gaussian" if config.init_lora_weights == "gaussian" else "kaiming"


def inject_adapter(
    model: nn.Module, config: LoraConfig, adapter_name: str = "default", loaded: bool = False
) -> list[str]:
    """Quantizes every targeted nn.Linear of ``model`` in place (Linear4bit in the config's format) and adds the
    adapter ``adapter_name`` to it (layers already quantized / already LoRA layers get the adapter only), starting
    as ``config.init_lora_weights`` says (init.py; ``loaded``: the adapter's tensors come from a file next, so the
    base is left as it is). Returns the targeted module names. No target_modules: peft's defaults."""
    default_targets.fill_lora(model, config)
    names = targets.find_target_modules(model, config)
    kind = None if loaded else init.family(config.init_lora_weights)
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
        start = None
        if kind in init.WEIGHT_INITS:
            scaling = formats.lora_scaling(r, alpha, config.use_rslora)
            start = _weight_start(name, module, config, r, scaling)
        if isinstance(module, LoraLinear4bit):
            if start is not None:
                module.base.set_quantized_weight(start.q)
            adapter = module.add_adapter(adapter_name, **kwargs, activate=False)
            layer = module
        else:
            base = targets.quantized(module, config) if start is None else _base_of(module, start.q, config)
            layer = LoraLinear4bit(base, **kwargs, adapter_name=adapter_name)
            targets.set_submodule(model, name, layer)
            adapter = layer.adapters[adapter_name]
        if start is not None:
            layer.start_adapter(adapter_name, start.A, start.B)
        elif kind == "orthogonal":
            layer.start_adapter(adapter_name, *init.orthogonal(r, layer.in_features, layer.out_features))
        if config.init_lora_weights is False:  # peft's "no identity" init, for tests
            with torch.no_grad():
                nn.init.normal_(adapter.lora_B, std=0.02)
    # peft's rule: the adapter's fan_in_fan_out says whether its layers store weights [in, out] (Conv1D)
    config.fan_in_fan_out = any(model.get_submodule(name).base.fan_in_fan_out for name in names)
    return names


def _weight_start(name: str, module: nn.Module, config: LoraConfig, r: int, scaling: float) -> init.Start:
    """The start of a weight-moving init for target ``name``: from its float weight, or from the dequantized
    weight of a layer already 4-bit (PiSSA / OLoRA, with a warning; LoftQ refused: it would give a zero adapter)."""
    if isinstance(module, (Linear4bit, LoraLinear4bit)):
        if config.init_lora_weights == "loftq":
            raise ValueError(
                f"qpeft: LoftQ needs the float weight of {name!r}, which is 4-bit already: add the adapter to the "
                "float model, or call qpeft.initialize_lora_weights(model, checkpoint) / "
                "qpeft.replace_lora_weights_loftq(model, checkpoint) with the float checkpoint"
            )
        init.warn_requantized(config.init_lora_weights)
        q = (module if isinstance(module, Linear4bit) else module.base).quantized_weight
        W = q.dequantize()
        fmt = dict(
            quant_type=q.quant_type, blocksize=q.blocksize, double_quant=q.double_quant, quant_storage=q.quant_storage
        )
    else:
        W = module.weight.detach()
        W = W.T if is_conv1d(module) else W
        fmt = dict(quant_type=config.quant_type, blocksize=config.blocksize, double_quant=config.double_quant)
    quantize = functools.partial(Quantized4bitWeight.from_float, **fmt)
    return init.start(config.init_lora_weights, W, r, scaling, quantize, _loftq_iter(config))


def _loftq_iter(config: LoraConfig) -> int:
    return config.loftq_config.get("loftq_iter", 1)


def _base_of(module: nn.Module, q: Quantized4bitWeight, config: LoraConfig) -> Linear4bit:
    """The 4-bit layer holding ``q`` in place of float ``module`` (its bias kept, as targets.quantized keeps it)."""
    bias = nn.Parameter(module.bias.detach().clone()) if module.bias is not None else None
    return Linear4bit.from_quantized(q, bias, config.compute_dtype, fan_in_fan_out=is_conv1d(module))


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
