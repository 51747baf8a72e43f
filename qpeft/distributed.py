"""torch.distributed helpers. Data parallelism needs none (DistributedDataParallel reduces only the trainable
parameters; ``save_pretrained`` writes from rank 0). Sharding the frozen 4-bit base with FSDP2 (``fully_shard``):
``prepare_fsdp`` makes each 4-bit layer's block scales (absmax and the double quantization's nested absmax) frozen
parameters, so FSDP2 shards them along dim 0 with the packed codes and all-gathers them together for the forward
and the backward; ``fully_shard_model`` applies the usual recipe (each decoder layer, then the whole model).
FSDP2 casts floating parameters only, so a mixed-precision policy leaves the packed bytes and the int32-held
scales as they are. ``save_sharded`` / ``load_sharded``: every rank writes and reads its own shards through
torch.distributed.checkpoint. Not yet supported: loading a 4-bit checkpoint shard by shard."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .nn.linear4bit import Linear4bit

SHARDED_SCALES = ("weight_absmax", "weight_nested_absmax")


def prepare_fsdp(model: nn.Module) -> nn.Module:
    """Every Linear4bit's block scales as frozen parameters (FSDP2 shards parameters, not buffers)."""
    for module in model.modules():
        if isinstance(module, Linear4bit):
            for name in SHARDED_SCALES:
                tensor = module._buffers.pop(name, None)
                if tensor is not None:
                    module.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
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

