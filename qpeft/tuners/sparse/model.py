"""Sparse fine-tuning placed on a model, the gradient-magnitude selection, and the files: ``base_model.model.
<module>.sparse_index`` (int64, flat positions in [out, in]) and ``.sparse_values`` (fp32)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ...nn.sparse_delta import SparseDeltaLinear4bit, gradient_magnitude_entries
from .. import targets
from ..lora.model import PREFIX
from .config import SparseConfig


def sparse_layers(model: nn.Module):
    return targets.modules_of(model, SparseDeltaLinear4bit)


def inject_adapter(model: nn.Module, config: SparseConfig, adapter_name: str, loaded: bool = False) -> list[str]:
    names = targets.find_target_modules(model, config)
    g = torch.Generator().manual_seed(config.seed)
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, SparseDeltaLinear4bit):
            module = SparseDeltaLinear4bit(targets.quantized(module, config))
            targets.set_submodule(model, name, module)
        n, k = module.out_features, module.in_features
        if config.selection == "random":
            index = torch.randperm(n * k, generator=g)[: config.entries(n, k)]
        else:
            index = torch.zeros(0, dtype=torch.int64)
        module.add_entries(adapter_name, index, activate=False)
    return names


def file_parameters(model: nn.Module, config: SparseConfig, adapter_name: str) -> dict[str, torch.Tensor]:
    params = {}
    for name, layer in sparse_layers(model):
        if adapter_name in layer.adapters:
            delta = layer.adapters[adapter_name]
            params[f"{PREFIX}{name}.sparse_index"] = delta.index
            params[f"{PREFIX}{name}.sparse_values"] = delta.values
    return params


def prepare_load(model: nn.Module, config: SparseConfig, adapter_name: str, tensors: dict) -> None:
    """The entries of a saved adapter set before its values are copied."""
    for name, layer in sparse_layers(model):
        index = tensors.get(f"{PREFIX}{name}.sparse_index")
        if adapter_name in layer.adapters and index is not None:
            if index.dtype != torch.int64 or index.dim() != 1:
                raise ValueError(
                    f"qpeft: {name}.sparse_index must be int64 [entries], got {index.dtype} {list(index.shape)}"
                )
            active = adapter_name in layer.active_adapters
            layer.delete_adapter(adapter_name)
            layer.add_entries(adapter_name, index, activate=active)


@contextlib.contextmanager
def _inputs_require_grad(model: nn.Module):
    """Every activation requires grad (the input embeddings' output does), so gradients reach frozen layers."""
    embeddings = model.get_input_embeddings()
    handle = embeddings.register_forward_hook(lambda m, a, out: out.requires_grad_(True))
    try:
        yield
    finally:
        handle.remove()


def select_by_gradient(model: nn.Module, config: SparseConfig, adapter_name: str, batches) -> None:
    """Accumulates |x^T dy| (the magnitude of each weight's gradient) of every targeted layer over ``batches``
    (dicts of model inputs with labels, or token tensors used as their own labels), then keeps each layer's
    largest ``budget`` entries, values zero. Holds one fp32 [out, in] accumulator per layer meanwhile."""
    layers = [(n, layer) for n, layer in sparse_layers(model) if adapter_name in layer.adapters]
    scores = {
        n: torch.zeros(layer.out_features, layer.in_features, device=layer.base.weight.device) for n, layer in layers
    }
    handles = []

    def watch(name):
        # a hook on the output tensor, not a module backward hook: no wrapper Function around the output, so models
        # that modify it in place (Falcon) still run
        def hook(module, args, output):
            x = args[0].detach()

            def accumulate(dy):
                scores[name].add_((dy.reshape(-1, dy.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()).abs())

            if output.requires_grad:
                output.register_hook(accumulate)

        return hook

    for n, layer in layers:
        handles.append(layer.register_forward_hook(watch(n)))
    try:
        with _inputs_require_grad(model):
            for batch in batches:
                kwargs = batch if isinstance(batch, dict) else {"input_ids": batch, "labels": batch}
                model(**kwargs).loss.backward()
                model.zero_grad(set_to_none=True)
    finally:
        for h in handles:
            h.remove()
    for n, layer in layers:
        index = gradient_magnitude_entries(scores[n], config.entries(layer.out_features, layer.in_features))
        active = adapter_name in layer.active_adapters
        layer.delete_adapter(adapter_name)
        layer.add_entries(adapter_name, index, activate=active)


def select_sparse_entries(peft_model, config: SparseConfig, adapter_name: str, batches) -> None:
    """Sparse fine-tuning's warm-up (a model verb): the entries of largest accumulated |dL/dW| over ``batches``
    (dicts of model inputs with labels, or token tensors) become each layer's trained entries (values zero)."""
    select_by_gradient(peft_model, config, adapter_name, batches)
    peft_model.set_adapter(adapter_name)
