"""Adapters in HF peft's file format (``adapter_config.json`` + ``adapter_model.safetensors``), both ways: the
files of one adapter, whatever its method; which tensors a method writes is the method's (tuners/). Loading
never unpickles."""

from __future__ import annotations

from pathlib import Path

import safetensors
import torch
from safetensors.torch import load_file

from .errors import ConfigError
from .files import check_adapter_name, folder_inside, read_json_file, write_json_atomic, write_safetensors_atomic
from .hub import ADAPTER_FILES, resolve_folder
from .tuners import modules_to_save, registry
from .tuners.config import AdapterConfig, config_from_peft_dict

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def save_adapter(tensors: dict[str, torch.Tensor], config: AdapterConfig, folder: Path) -> None:
    """The adapter's two files in ``folder`` (from files.folder_inside), each written atomically; the config is the
    folder's completion mark (loading requires it): removed first, written last, so an interrupted save leaves a
    folder that is refused, never new weights under an old config."""
    tensors = {k: t.detach().cpu().contiguous().clone() for k, t in tensors.items()}
    (folder / ADAPTER_CONFIG).unlink(missing_ok=True)
    write_safetensors_atomic(folder / ADAPTER_WEIGHTS, tensors)
    write_json_atomic(folder / ADAPTER_CONFIG, config.to_peft_dict())


def load_adapter_files(
    model_id: str | Path,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    **quant,
) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
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
    config = read_adapter_config(folder, **quant)
    try:
        tensors = load_file(str(weights_path))
    except (OSError, safetensors.SafetensorError) as e:
        raise ConfigError(str(weights_path), "safetensors", f"cannot be read: {e}") from None
    return config, tensors


def read_adapter_config(folder: Path, **quant) -> AdapterConfig:
    """The config of ``folder``'s adapter_config.json (``quant`` overrides the 4-bit format)."""
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"qpeft: no {ADAPTER_CONFIG} in {folder}")
    return config_from_peft_dict(read_json_file(path, "adapter_config"), str(path), **quant)


def save_adapters(
    peft_model, save_directory, selected_adapters=None, is_main_process: bool | None = None, initial_folder=None
) -> None:
    """QPeftModel.save_pretrained: each adapter's two files, "default" at the top and the others in a subfolder of
    their name; only the main process (rank 0 by default) writes, after every rank gathered sharded tensors.
    ``initial_folder``: the adapter's files saved at its start; each adapter is written as its method's plain form
    of the original weights (registry ``convert_initial``)."""
    if is_main_process is None:
        is_main_process = (
            not (torch.distributed.is_available() and torch.distributed.is_initialized())
            or torch.distributed.get_rank() == 0
        )
    names = selected_adapters or list(peft_model.peft_config)
    for name in names:
        if name not in peft_model.peft_config:
            raise KeyError(f"qpeft: no adapter named {name!r}")
    for name in names:
        with torch.no_grad():
            params = file_parameters(peft_model, name)
            if any(hasattr(p, "full_tensor") for p in params.values()):  # a collective: every rank gathers
                params = {k: p.full_tensor() if hasattr(p, "full_tensor") else p for k, p in params.items()}
            if is_main_process:
                config = peft_model.peft_config[name]
                if initial_folder is not None:
                    config, params = converted(config, params, initial_folder)
                folder = folder_inside(save_directory, *([] if name == "default" else [check_adapter_name(name)]))
                save_adapter(params, config, folder)


def converted(config: AdapterConfig, params: dict, initial_folder) -> tuple[AdapterConfig, dict]:
    method = registry.method_of(config)
    if method.convert_initial is None:
        raise ValueError(f"qpeft: {config.peft_type} adapters have no conversion from their initial weights")
    initial_config, initial = load_adapter_files(initial_folder)
    if initial_config.peft_type != config.peft_type:
        raise ValueError(f"qpeft: the initial adapter in {initial_folder} is {initial_config.peft_type}")
    return method.convert_initial(config, {k: p.detach() for k, p in params.items()}, initial)


def file_parameters(peft_model, adapter_name: str) -> dict[str, torch.Tensor]:
    """Adapter file key -> the tensor of ``peft_model``'s adapter ``adapter_name`` it holds: the method's, plus its
    copies of modules_to_save (a prompt encoder gives what peft writes: the virtual tokens' embeddings, computed)."""
    config = peft_model.peft_config[adapter_name]
    method = registry.method_of(config)
    if method.is_prompt_learning:
        return peft_model.prompt_encoder[adapter_name].file_tensors()
    params = method.file_parameters(peft_model.base_model, config, adapter_name)
    params.update(modules_to_save.file_parameters(peft_model.base_model, config, adapter_name))
    return params


def load_tensors(peft_model, adapter_name: str, tensors: dict[str, torch.Tensor]) -> None:
    """A file's tensors into ``peft_model``'s adapter ``adapter_name`` (every key must match, with its shape)."""
    config = peft_model.peft_config[adapter_name]
    method = registry.method_of(config)
    if method.prepare_load is not None:
        method.prepare_load(peft_model.base_model, config, adapter_name, tensors)
    if method.load is not None:
        method.load(peft_model.base_model, config, adapter_name, tensors)
    else:
        assign_tensors(file_parameters(peft_model, adapter_name), tensors)


@torch.no_grad()
def assign_tensors(params: dict[str, torch.nn.Parameter], tensors: dict[str, torch.Tensor]) -> None:
    """Copies the file's tensors into the adapter's parameters: every key must match, with its shape and kind
    (floating into floating, others exactly), all checked before the first write."""
    missing = sorted(k for k in params if k not in tensors)
    unexpected = sorted(k for k in tensors if k not in params)
    if missing or unexpected:
        raise ValueError(
            f"qpeft: the adapter file does not fit the model: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}"
        )
    for key, t in tensors.items():
        p = params[key]
        if p.shape != t.shape:
            raise ValueError(
                f"qpeft: {key} has shape {list(t.shape)} in the file but {list(p.shape)} in the model "
                "(check r / rank_pattern / num_virtual_tokens)"
            )
        if t.is_floating_point() != p.is_floating_point() or (not p.is_floating_point() and t.dtype != p.dtype):
            raise ValueError(f"qpeft: {key} is {t.dtype} in the file but {p.dtype} in the model")
    for key, t in tensors.items():
        params[key].copy_(t)
