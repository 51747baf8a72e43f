"""LoRA on qpeft's 4-bit layers: adapters injected into the targeted linears, and the tensors of peft's file.

File keys are ``base_model.model.`` + the module path + ``.lora_A.weight`` [r, in], ``.lora_B.weight`` [out, r],
``.lora_B.bias`` (lora_bias), ``.lora_magnitude_vector`` [out] (DoRA), ``.base_layer.bias`` (bias="lora_only"
or "all"), and the modules_to_save' own parameter names; the adapter name never appears.
"""

from __future__ import annotations


import dataclasses
import functools

import torch
from torch import nn

from ... import formats
from ...files import release_file_pages
from ...nn.linear4bit import Linear4bit, is_conv1d
from ...nn.lora import LoraLinear4bit
from ...quantized import Quantized4bitWeight
from .. import default_targets, targets
from . import corda, init
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
    weight of a layer already 4-bit (PiSSA / OLoRA, with a warning; LoftQ refused: it would give a zero adapter;
    CorDA refused: its decomposition is of the float model's)."""
    eigens = None
    if isinstance(module, (Linear4bit, LoraLinear4bit)):
        if config.init_lora_weights == "corda":
            raise ValueError(
                f"qpeft: CorDA needs the float weight of {name!r}, which is 4-bit already: run "
                "qpeft.preprocess_corda and get_peft_model on the float model"
            )
        if config.init_lora_weights == "loftq":
            raise ValueError(
                f"qpeft: LoftQ needs the float weight of {name!r}, which is 4-bit already: add the adapter to the "
                "float model, or call qpeft.initialize_lora_weights(model, checkpoint) / "
                "qpeft.replace_lora_weights_loftq(model, checkpoint) with the float checkpoint"
            )
        init.warn_requantized(config.init_lora_weights)
        q = (module if isinstance(module, Linear4bit) else module.base).quantized_weight
        W, quantize = q.dequantize(), q.quantize_alike
    else:
        W = module.weight.detach()
        W = W.T if is_conv1d(module) else W
        fmt = dict(quant_type=config.quant_type, blocksize=config.blocksize, double_quant=config.double_quant)
        quantize = functools.partial(Quantized4bitWeight.from_float, **fmt)
        if config.init_lora_weights == "corda":
            eigens = corda.take_eigens(name, module, r)
    return init.start(config.init_lora_weights, W, r, scaling, quantize, _loftq_iter(config), eigens)


def _loftq_iter(config: LoraConfig) -> int:
    return config.loftq_config.get("loftq_iter", 1)


def _base_of(module: nn.Module, q: Quantized4bitWeight, config: LoraConfig) -> Linear4bit:
    """The 4-bit layer holding ``q`` in place of float ``module`` (its bias kept, as targets.quantized keeps it)."""
    bias = nn.Parameter(module.bias.detach().clone()) if module.bias is not None else None
    release_file_pages(module.weight)  # (as Linear4bit.from_linear)
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


# ---- starts computed from a float checkpoint, for a base that is 4-bit already --------------------------------
def initialize_lora_weights(peft_model, model_path, adapter_name: str = "default") -> list[str]:
    """Starts adapter ``adapter_name`` of every LoRA layer as its config's weight-moving init (LoftQ, PiSSA, OLoRA)
    from the float weights of the checkpoint ``model_path`` (a folder with model.safetensors or shards, or a Hub
    repository id), read one layer at a time: each layer's base is quantized again in its own format. For a model
    whose base was quantized before the adapter was added (qpeft's transformers quantizer, a bitsandbytes model
    taken over). Returns the layers set."""
    config = peft_model.peft_config[adapter_name]
    if not init.moves_weight(config.init_lora_weights):
        raise ValueError(
            f"qpeft: adapter {adapter_name!r} has init_lora_weights={config.init_lora_weights!r}, which starts from "
            "no weight: initialize_lora_weights runs 'loftq', 'pissa', 'pissa_niter_[n]' or 'olora'"
        )

    def restart(layer, W, adapter):
        quantize = layer.base.quantized_weight.quantize_alike
        start = init.start(config.init_lora_weights, W, adapter.r, adapter.scaling, quantize, _loftq_iter(config))
        layer.base.set_quantized_weight(start.q)
        return start.A, start.B

    return _from_float_weights(peft_model, model_path, adapter_name, restart)


def replace_lora_weights_loftq(peft_model, model_path=None, adapter_name: str = "default", callback=None) -> list[str]:
    """peft's replace_lora_weights_loftq: every LoRA layer's adapter ``adapter_name`` set to the rank-r SVD of
    W - dequant(Q) (one LoftQ step, the 4-bit base unchanged), W read layer by layer from the float checkpoint
    folder ``model_path`` (default: the model's ``name_or_path``). ``callback(model, module_name)`` returning False
    puts that layer's previous adapter back (peft's greedy check). Returns the layers set."""
    if model_path is None:
        model_path = getattr(getattr(peft_model.get_base_model(), "config", None), "_name_or_path", None)
        if not model_path:
            raise ValueError("qpeft: replace_lora_weights_loftq needs model_path, the float checkpoint's folder")

    def loftq_step(layer, W, adapter):
        return init.loftq_keep_base(W, layer.base.quantized_weight, adapter.r, adapter.scaling)

    return _from_float_weights(peft_model, model_path, adapter_name, loftq_step, callback)


def _from_float_weights(peft_model, model_path, adapter_name: str, start_fn, callback=None) -> list[str]:
    from ...checkpoint import SafetensorsFolder
    from ...hub import CHECKPOINT_FILES, resolve_folder

    files = SafetensorsFolder(resolve_folder(model_path, CHECKPOINT_FILES))
    model = peft_model.get_base_model()
    prefix = getattr(model, "base_model_prefix", "") + "."
    done = []
    layers = [(n, layer) for n, layer in lora_layers(model) if adapter_name in layer.adapters]
    if not layers:
        raise ValueError(f"qpeft: no LoRA layer holds adapter {adapter_name!r}")
    keys = set(files.keys())
    for name, layer in layers:
        key = name + ".weight"
        if key not in keys and key.startswith(prefix) and key.removeprefix(prefix) in keys:
            key = key.removeprefix(prefix)  # a checkpoint of the backbone alone
        if key not in keys:
            raise KeyError(f"qpeft: the checkpoint {model_path} holds no {name}.weight")
        W = files.read(key)
        W = (W.T if layer.base.fan_in_fan_out else W).to(layer.base.weight.device)
        if tuple(W.shape) != (layer.out_features, layer.in_features):
            raise ValueError(
                f"qpeft: {key} in {model_path} is {list(W.shape)}, the layer is "
                f"[{layer.out_features}, {layer.in_features}]"
            )
        adapter = layer.adapters[adapter_name]
        before = (layer.base.quantized_weight, adapter.lora_A.detach().clone(), adapter.lora_B.detach().clone())
        with torch.no_grad():
            A, B = start_fn(layer, W.to(layer.base.weight_dtype) if W.is_floating_point() else W, adapter)
            layer.start_adapter(adapter_name, A, B)
        if callback is not None and not callback(peft_model, name):
            layer.base.set_quantized_weight(before[0])
            with torch.no_grad():
                layer.start_adapter(adapter_name, before[1], before[2])
            continue
        done.append(name)
    return done


# ---- peft's conversion of a weight-moving adapter to a plain LoRA adapter of the original weights -------------
def converted_to_lora(config: LoraConfig, tensors: dict, initial: dict) -> tuple[LoraConfig, dict]:
    """(config, tensors) of a plain LoRA adapter of the original weights equal to a trained PiSSA / OLoRA / LoftQ
    adapter (``tensors``) less its start (``initial``, the adapter's tensors saved when it was created): W_res + s B A
    = W + s (B A - B0 A0), rank 2r: A' = [A; A0], B' = [B, -B0], alpha doubled (rsLoRA: times sqrt 2) so s stays
    (peft's save_pretrained(path_initial_model_for_weight_conversion=...)). The other tensors pass unchanged."""
    if config.use_dora or config.lora_bias:
        raise ValueError("qpeft: a DoRA or lora_bias adapter has no plain-LoRA form of its difference to its start")
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ValueError("qpeft: the conversion does not support rank_pattern / alpha_pattern with rsLoRA (as peft)")
    out = dict(tensors)
    for key, t in tensors.items():
        if key.endswith((".lora_A.weight", ".lora_B.weight")):
            if key not in initial or initial[key].shape != t.shape:
                raise ValueError(f"qpeft: the initial adapter has no {key} of shape {list(t.shape)}")
            a_side = key.endswith(".lora_A.weight")
            start = initial[key].to(t.dtype)
            out[key] = torch.cat([t, start], dim=0) if a_side else torch.cat([t, -start], dim=1)
    converted = dataclasses.replace(
        config,
        init_lora_weights=True,
        r=2 * config.r,
        lora_alpha=config.lora_alpha * (2**0.5 if config.use_rslora else 2),
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: 2 * v for k, v in config.alpha_pattern.items()},
        loftq_config={},
        eva_config=None,
        corda_config=None,
    )
    return converted, out
