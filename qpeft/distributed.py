"""torch.distributed helpers. Data parallelism needs none (DistributedDataParallel reduces only the trainable
parameters; ``save_pretrained`` writes from rank 0). Sharding the frozen 4-bit base with FSDP2 (``fully_shard``):
``prepare_fsdp`` makes each 4-bit layer's block scales (absmax and the double quantization's nested absmax) frozen
parameters, so FSDP2 shards them along dim 0 with the packed codes and all-gathers them together for the forward
and the backward; ``fully_shard_model`` applies the usual recipe (each decoder layer, then the whole model).
FSDP2 casts floating parameters only, so a mixed-precision policy leaves the packed bytes and the int32-held
scales as they are. ``save_sharded`` / ``load_sharded``: every rank writes and reads its own shards through
torch.distributed.checkpoint. ``load_4bit_sharded``: a bitsandbytes 4-bit checkpoint read straight into a sharded
model, each rank reading only its rows of every tensor."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .formats import WEIGHT_FIELDS
from .nn.linear4bit import Linear4bit

SHARDED_SCALES = tuple(f.buffer for f in WEIGHT_FIELDS if f.sharded and f.buffer is not None)


def prepare_fsdp(model: nn.Module) -> nn.Module:
    """Every Linear4bit's block scales as frozen parameters (FSDP2 shards parameters, not buffers)."""
    for module in model.modules():
        if isinstance(module, Linear4bit):
            for name in SHARDED_SCALES:
                if module._buffers.get(name) is not None:  # (no nested absmax without double quantization)
                    module.register_parameter(name, nn.Parameter(module._buffers.pop(name), requires_grad=False))
            module._drop_weight_caches()
    return model


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformers model (its ``_no_split_modules`` classes), in order."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def fully_shard_model(model: nn.Module, mesh=None, **fsdp_kwargs) -> nn.Module:
    """``prepare_fsdp``, then FSDP2's ``fully_shard`` on every decoder layer of the wrapped transformers model and on
    ``model`` (a QPeftModel or the model itself); ``fsdp_kwargs`` (mp_policy, reshard_after_forward, ...) go to
    fully_shard."""
    from torch.distributed.fsdp import fully_shard

    base = getattr(model, "base_model", model)
    prepare_fsdp(model)
    layers = decoder_layers(base)
    if not layers:
        raise ValueError("qpeft: no decoder layer found to shard (the model's _no_split_modules names none)")
    for layer in layers:
        fully_shard(layer, mesh=mesh, **fsdp_kwargs)
    fully_shard(model, mesh=mesh, **fsdp_kwargs)
    # transformers.Trainer's mark of a model that owns its sharding: trained as it is, not wrapped or sharded again
    # (a read-only property over _is_distributed_loading_by_transformers on transformers models since 5.25)
    if isinstance(getattr(type(model), "is_distributed_loading_by_transformers", None), property):
        model._is_distributed_loading_by_transformers = True
    else:
        model.is_distributed_loading_by_transformers = True
    return model


def sharded_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``model`` under its own name, sharded tensors (DTensors) as they are: what
    torch.distributed.checkpoint writes, and reads back in place (the 4-bit layers' raw tensors, not bitsandbytes'
    keys)."""
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def save_sharded(model: nn.Module, folder: str | Path) -> None:
    """Each rank writes its shards of ``model`` (and the replicated tensors once) into ``folder``."""
    import torch.distributed.checkpoint as dcp

    dcp.save(sharded_state_dict(model), checkpoint_id=str(folder))


@torch.no_grad()
def load_sharded(model: nn.Module, folder: str | Path) -> None:
    """Reads ``save_sharded``'s ``folder`` into ``model`` in place (sharded the same way, on the same ranks or
    another number of them); a missing or mis-shaped tensor raises."""
    import torch.distributed.checkpoint as dcp

    dcp.load(sharded_state_dict(model), checkpoint_id=str(folder))


# A tensor's source: (rows [start, stop) of dim 0, or None for all; the local tensor to fill) -> the values.
Source = Callable[[tuple[int, int] | None, torch.Tensor], torch.Tensor]


def load_4bit_sharded(
    folder: str | Path,
    peft_config=None,
    *,
    mesh=None,
    model_class=None,
    compute_dtype: torch.dtype | None = None,
    dtype: torch.dtype | None = None,
    **fsdp_kwargs,
) -> nn.Module:
    """``load_4bit_pretrained`` for FSDP2: the model is built on the meta device, given ``peft_config``'s adapters
    (methods with a ``sharded_start``: LoRA, DoRA included, and IA3), sharded by ``fully_shard_model(model, mesh,
    **fsdp_kwargs)``, then each rank reads from the checkpoint only its rows of every sharded tensor (and the
    replicated ones whole). The adapters draw their initial values from torch's generator in the order
    ``get_peft_model`` does: seed every rank alike.
    Returns the sharded QPeftModel (the sharded base model without ``peft_config``)."""
    from .checkpoint import SafetensorsFolder, build_4bit_model, is_checked_whole, require_config
    from .hub import CHECKPOINT_FILES, resolve_folder
    from .model import get_peft_model

    if peft_config is not None:
        _check_shardable(peft_config)
    folder = resolve_folder(folder, CHECKPOINT_FILES)
    require_config(folder)
    files = SafetensorsFolder(folder)
    entries = {key: files.read(key) if is_checked_whole(key) else files.meta(key) for key in files.keys()}
    model = build_4bit_model(folder, entries, model_class, compute_dtype, dtype)
    sources = _checkpoint_sources(model, files, entries)
    device = torch.device(mesh.device_type if mesh is not None else "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":  # this rank's GPU
        device = torch.device("cuda", torch.cuda.current_device())
    if peft_config is not None:
        model = get_peft_model(model, peft_config)
        _materialize_adapters(model, peft_config, device)
    sources.update(_in_memory_sources(model))
    _check_covered(model, sources)
    fully_shard_model(model, mesh, **fsdp_kwargs)
    model.to_empty(device=device)
    with torch.no_grad():
        for (module, name), source in sources.items():
            tensor = module._parameters.get(name)
            tensor = module._buffers[name] if tensor is None else tensor
            local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
            local.copy_(source(_local_rows(tensor, name), local))
    _start_dora_magnitudes(model)
    return model


@torch.no_grad()
def _start_dora_magnitudes(model: nn.Module) -> None:
    """DoRA's m starts as the row norms of its layer's W: computed from W gathered by the layer's FSDP module (the
    innermost first), each rank keeping its rows of m."""
    from torch.distributed.fsdp import FSDPModule

    from .nn.lora import LoraLinear4bit

    norms = {}
    for owner in reversed([m for m in model.modules() if isinstance(m, FSDPModule)]):
        layers = [
            m
            for m in owner.modules()
            if isinstance(m, LoraLinear4bit) and m not in norms and any(a.use_dora for a in m.adapters.values())
        ]
        if not layers:
            continue
        owner.unshard()
        for layer in layers:
            norms[layer] = layer.base.row_norms_squared().sqrt()
            layer.base._drop_weight_caches()  # (no reference to the gathered W survives)
        owner.reshard()
    for layer, norm in norms.items():
        for adapter in layer.adapters.values():
            if adapter.use_dora:
                m = adapter.lora_magnitude
                rows = _local_rows(m, "lora_magnitude")
                m.to_local().copy_(norm if rows is None else norm[rows[0] : rows[1]])


def _check_shardable(config) -> None:
    """Methods whose registration says how a meta-built adapter starts (``sharded_start``), no modules_to_save."""
    from .tuners import registry

    if registry.method_of(config).sharded_start is None:
        startable = [m.config_class.__name__ for m in registry.METHODS.values() if m.sharded_start is not None]
        raise NotImplementedError(
            f"qpeft: load_4bit_sharded adds {' or '.join(startable)} adapters, not {type(config).__name__}; "
            f"load with load_4bit_pretrained, then get_peft_model and fully_shard_model"
        )
    init = getattr(config, "init_lora_weights", True)
    if init is False or init not in (True, "kaiming", "gaussian"):
        raise NotImplementedError(
            f"qpeft: load_4bit_sharded starts adapters as init_lora_weights=True or 'gaussian', not {init!r}; start "
            "them unsharded (get_peft_model, initialize_lora_weights, initialize_lora_eva_weights), then "
            "fully_shard_model"
        )
    if config.modules_to_save:
        raise NotImplementedError("qpeft: load_4bit_sharded does not copy modules_to_save")


def _checkpoint_sources(
    model: nn.Module, files, entries: dict[str, torch.Tensor]
) -> dict[tuple[nn.Module, str], Source]:
    """(module, tensor name) -> its source in the checkpoint, for every tensor of ``model`` (built from the
    checkpoint's ``entries``: meta tensors, and the quant state entries already read) that the checkpoint holds."""
    from .quantized import read_quant_state

    fields = {f.buffer or "weight": f for f in WEIGHT_FIELDS}  # a Linear4bit's tensor name -> its field
    sources = {}
    for path, module in model.named_modules():
        prefix = f"{path}." if path else ""
        for name, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if tensor is None:
                continue
            field = fields.get(name)
            if isinstance(module, Linear4bit) and field is not None:
                weight = f"{prefix}weight"
                if field.entry is None:  # a number in the quant state's JSON (checked when the model was built)
                    state_key = next(k for k in entries if k.startswith(f"{weight}.quant_state."))
                    sources[module, name] = _offset_source(read_quant_state(entries[state_key])[field.name])
                else:
                    key = f"{weight}.{field.entry}" if field.entry else weight
                    sources[module, name] = _byte_source(files, entries, key)
            elif prefix + name in entries:
                key = prefix + name
                sources[module, name] = lambda rows, local, key=key: (
                    files.read(key) if rows is None else files.read_rows(key, *rows)
                )
    return sources


def _byte_source(files, entries: dict[str, torch.Tensor], key: str) -> Source:
    """A 4-bit state tensor: the entry's bytes taken as the local tensor's dtype (codes in quant_storage, fp32
    scales as int32), rows counted in the local tensor's."""
    stored = entries[key]

    def read(rows, local):
        row_bytes, stored_row_bytes = _row_bytes(local), _row_bytes(stored)
        if rows is None:
            raw = files.read(key) if stored.is_meta else stored
            first = 0
        else:
            first, last = rows[0] * row_bytes // stored_row_bytes, -(-rows[1] * row_bytes // stored_row_bytes)
            raw = files.read_rows(key, first, last) if stored.is_meta else stored[first:last]
        start = (rows[0] * row_bytes if rows else 0) - first * stored_row_bytes
        flat = raw.contiguous().reshape(-1).view(torch.uint8)[start : start + local.nbytes]
        return flat.view(local.dtype).reshape(local.shape)

    return read


def _row_bytes(t: torch.Tensor) -> int:
    return t.element_size() * math.prod(t.shape[1:])


def _offset_source(offset: float) -> Source:
    def read(rows, local):
        return torch.tensor(float(offset), dtype=torch.float32).view(local.dtype)

    return read


def _materialize_adapters(model: nn.Module, config, device: torch.device) -> None:
    """The meta-device adapters ``get_peft_model`` added to a meta model, given their initial values on ``device``
    (in module order, as get_peft_model draws them) by the method's ``sharded_start``."""
    from .tuners import registry

    method = registry.method_of(config)
    for _, layer in method.adapter_layers(model):
        method.sharded_start(layer, device)


def _in_memory_sources(model: nn.Module) -> dict[tuple[nn.Module, str], Source]:
    """Every real (not meta) tensor of ``model`` -- adapters, buffers the checkpoint does not hold -- served from a
    copy, as sharding and ``to_empty`` replace them."""
    sources = {}
    for module in model.modules():
        for name, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if tensor is not None and not tensor.is_meta:
                kept = tensor.detach().clone()
                sources[module, name] = lambda rows, local, kept=kept: kept if rows is None else kept[rows[0] : rows[1]]
    return sources


def _check_covered(model: nn.Module, sources: dict) -> None:
    """Every tensor has a source and none is shared between modules (to_empty would untie it)."""
    owners, missing = {}, []
    for path, module in model.named_modules(remove_duplicate=False):
        for name, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if tensor is None:
                continue
            if (module, name) not in sources:
                missing.append(f"{path}.{name}".lstrip("."))
            first = owners.setdefault(id(tensor), (module, name, f"{path}.{name}"))
            if first[:2] != (module, name):
                raise NotImplementedError(
                    f"qpeft: load_4bit_sharded does not load tied tensors ({first[2]} is "
                    f"{path}.{name}, e.g. tie_word_embeddings)"
                )
    if missing:
        raise ValueError(f"qpeft: the checkpoint holds no values for {missing[:5]}")


def _local_rows(tensor: torch.Tensor, name: str) -> tuple[int, int] | None:
    """The rows [start, stop) of a tensor sharded along dim 0 that this rank holds; None for a whole tensor."""
    placements = getattr(tensor, "placements", None)
    if placements is None or all(p.is_replicate() for p in placements):
        return None
    if len(placements) != 1 or not placements[0].is_shard(0):
        raise NotImplementedError(
            f"qpeft: load_4bit_sharded reads tensors sharded along dim 0 of a 1-D mesh; '{name}' is placed {placements}"
        )
    mesh = tensor.device_mesh
    rows = tensor.shape[0]
    chunk = -(-rows // mesh.size())
    start = min(mesh.get_local_rank() * chunk, rows)
    stop = min(start + chunk, rows)
    if tensor.to_local().shape[0] != stop - start:
        raise RuntimeError(f"qpeft: '{name}' holds {tensor.to_local().shape[0]} rows here, expected {stop - start}")
    return start, stop
