"""Adapters in HF peft's file format (``adapter_config.json`` + ``adapter_model.safetensors``), both ways.

Keys are ``base_model.model.`` + the module path + ``.lora_A.weight`` [r, in], ``.lora_B.weight`` [out, r],
``.lora_B.bias`` (lora_bias), ``.lora_magnitude_vector`` [out] (DoRA), ``.base_layer.bias`` (bias="lora_only"
or "all"), and the modules_to_save' own parameter names; the adapter name never appears. Loading never unpickles.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from .hub import ADAPTER_FILES, resolve_folder
from .files import read_json_file, write_json_atomic, write_safetensors_atomic
from .model import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoraConfig, QPeftModel

PREFIX = "base_model.model."


def adapter_parameters(model: QPeftModel, adapter_name: str) -> dict[str, torch.nn.Parameter]:
    """peft key -> the qpeft parameter it holds, for everything the adapter's file contains."""
    config = model.peft_config[adapter_name]
    params: dict[str, torch.nn.Parameter] = {}
    lora_paths = {}
    for path, layer in model.lora_layers():
        lora_paths[path] = layer
        if adapter_name not in layer.adapters:
            continue
        a, key = layer.adapters[adapter_name], PREFIX + path
        params[key + ".lora_A.weight"] = a.lora_A
        params[key + ".lora_B.weight"] = a.lora_B
        if a.lora_bias is not None:
            params[key + ".lora_B.bias"] = a.lora_bias
        if a.lora_magnitude is not None:
            params[key + ".lora_magnitude_vector"] = a.lora_magnitude
        if config.bias == "lora_only" and layer.base.bias is not None:
            params[key + ".base_layer.bias"] = layer.base.bias
    if config.bias == "all":
        for name, p in model.base_model.named_parameters():
            if ".original_module." in name or ".modules_to_save." in name:
                continue  # a modules_to_save module's parameters: its adapter copy's, below
            if name.endswith("bias") and p.is_floating_point():
                owner = name.rsplit(".", 2)[0] if name.count(".") >= 2 else ""
                if name.endswith(".base.bias") and owner in lora_paths:
                    name = owner + ".base_layer.bias"
                params[PREFIX + name] = p
    for mname, wrapper in model._modules_to_save(config):  # the adapter's own copy, under the module's name
        for pname, p in wrapper.modules_to_save[adapter_name].named_parameters():
            params[f"{PREFIX}{mname}.{pname}"] = p
    return params


def save_adapter(model: QPeftModel, adapter_name: str, folder: Path) -> None:
    """The adapter's two files in ``folder`` (from files.folder_inside), each written atomically: weights first."""
    tensors = {k: p.detach().cpu().contiguous().clone() for k, p in adapter_parameters(model, adapter_name).items()}
    write_safetensors_atomic(folder / ADAPTER_WEIGHTS, tensors)
    write_json_atomic(folder / ADAPTER_CONFIG, model.peft_config[adapter_name].to_peft_dict())


def load_adapter_files(model_id: str | Path, *, subfolder: str | None = None, revision: str | None = None,
                       token: str | bool | None = None, **quant) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The config and tensors of an adapter: a local folder, or a Hugging Face Hub repository id (its
    adapter_config.json and adapter_model.safetensors fetched into the Hub cache; safetensors only: no pickle)."""
    folder = resolve_folder(model_id, ADAPTER_FILES, subfolder=subfolder, revision=revision, token=token)
    config_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not config_path.is_file():
        raise FileNotFoundError(f"qpeft: no {ADAPTER_CONFIG} in {folder}")
    if not weights_path.is_file():
        pickled = (folder / "adapter_model.bin").exists()
        hint = " (adapter_model.bin is pickle, which qpeft never loads)" if pickled else ""
        raise FileNotFoundError(f"qpeft: no {ADAPTER_WEIGHTS} in {folder}{hint}")
    config = LoraConfig.from_peft_dict(read_json_file(config_path, "adapter_config"), str(config_path), **quant)
    return config, load_file(str(weights_path))


@torch.no_grad()
def assign_adapter_tensors(model: QPeftModel, adapter_name: str, config: LoraConfig,
                           tensors: dict[str, torch.Tensor]) -> None:
    """Copies the file's tensors into the adapter's parameters; every key must match, with its shape."""
    params = adapter_parameters(model, adapter_name)
    missing = sorted(k for k in params if k not in tensors)
    unexpected = sorted(k for k in tensors if k not in params)
    if missing or unexpected:
        raise ValueError(f"qpeft: the adapter file does not fit the model: missing {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{'...' if len(unexpected) > 5 else ''}")
    for key, t in tensors.items():
        p = params[key]
        if p.shape != t.shape:
            raise ValueError(f"qpeft: {key} has shape {list(t.shape)} in the file but {list(p.shape)} in the model "
                             "(check r / rank_pattern)")
        p.copy_(t)
