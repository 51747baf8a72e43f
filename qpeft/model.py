"""``QPeftModel`` and ``get_peft_model`` in peft's idiom, for every method qpeft has (tuners/): LoRA adapters in the
targeted linear layers (quantized to 4 bits), or a prompt-learning encoder beside a (4-bit) transformers model.
peft's methods: print_trainable_parameters, save_pretrained / load_adapter / from_pretrained in peft's file
format, add_adapter, set_adapter, delete_adapter, disable_adapter, merge_and_unload, unload, generate. All the
adapters of one model have one peft_type, as in peft.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from . import adapter_io
from .files import check_adapter_name, folder_inside
from .nn.linear4bit import Linear4bit
from .nn.lora import LoraLinear4bit
from .tuners import targets
from .tuners.adalora import model as adalora
from .tuners.adalora.config import AdaLoraConfig
from .tuners.bottleneck import model as bottleneck
from .tuners.config import AdapterConfig
from .tuners.ia3 import model as ia3
from .tuners.lora import model as lora
from .tuners.lora.config import LoraConfig
from .tuners.modules_to_save import ModulesToSave
from .tuners.prompt import model as prompt
from .tuners.prompt.config import MultitaskPromptTuningConfig
from .tuners.piggyback import model as piggyback
from .tuners.selective import model as selective
from .tuners.sparse import model as sparse
from .tuners.sparse.config import SparseConfig


class _Method(NamedTuple):
    """How QPeftModel serves a method whose adapter lives in the model's modules (prompt learning: tuners/prompt).
    ``inject(model, config, name)``, ``file_parameters(model, config, name)`` (peft file key -> tensor);
    ``own_parameters``: the method trains parameters of the model itself (exactly those of its file), so a model
    holds one such adapter; ``mergeable``: its adapters merge into the weights; ``prepare_load(model, config,
    name, tensors)`` shapes the adapter to a file before its tensors are copied; ``load`` replaces the copy (a
    file holding derived tensors)."""

    inject: Callable
    file_parameters: Callable
    own_parameters: bool = False
    mergeable: bool = True
    prepare_load: Callable | None = None
    load: Callable | None = None


_METHODS = {
    "LORA": _Method(lora.inject_adapter, lora.file_parameters),
    "ADALORA": _Method(adalora.inject_adapter, adalora.file_parameters),
    "IA3": _Method(ia3.inject_adapter, ia3.file_parameters),
    "QPEFT_BITFIT": _Method(selective.inject_bitfit, selective.bitfit_parameters, own_parameters=True),
    "QPEFT_LAYERWISE": _Method(selective.inject_layerwise, selective.layerwise_parameters, own_parameters=True),
    "QPEFT_BOTTLENECK": _Method(bottleneck.inject_adapter, bottleneck.file_parameters, mergeable=False),
    "QPEFT_SPARSE": _Method(sparse.inject_adapter, sparse.file_parameters, prepare_load=sparse.prepare_load),
    "QPEFT_PIGGYBACK": _Method(piggyback.inject_adapter, piggyback.file_parameters, load=piggyback.load),
}

# Names that lived here before the tuners/ split.
ADAPTER_CONFIG, ADAPTER_WEIGHTS = adapter_io.ADAPTER_CONFIG, adapter_io.ADAPTER_WEIGHTS
find_target_modules, inject_adapter = targets.find_target_modules, lora.inject_adapter
__all__ = ["LoraConfig", "ModulesToSave", "QPeftModel", "get_peft_model", "prepare_model_for_kbit_training"]


class _DelegatingForward:
    """``QPeftModel.forward``, carrying the wrapped model's signature (transformers' Trainer reads it to pick
    dataset columns; ``task_ids`` is added for multitask prompt tuning). Built per access, so copies of the
    wrapper hold nothing stale."""

    def __get__(self, obj, objtype=None):
        if obj is None:  # on the class: a plain function of (model, *args, **kwargs)
            return _forward_unbound

        def forward(*args, **kwargs):
            return _forward_unbound(obj, *args, **kwargs)

        signature = inspect.signature(obj.base_model.forward)
        if (
            isinstance(
                obj.peft_config.get(obj.active_adapter if isinstance(obj.active_adapter, str) else ""),
                MultitaskPromptTuningConfig,
            )
            and "task_ids" not in signature.parameters
        ):
            params = list(signature.parameters.values())
            at = next((i for i, p in enumerate(params) if p.kind == p.VAR_KEYWORD), len(params))
            params.insert(at, inspect.Parameter("task_ids", inspect.Parameter.KEYWORD_ONLY, default=None))
            signature = signature.replace(parameters=params)
        forward.__signature__ = signature
        forward.__doc__ = obj.base_model.forward.__doc__
        return forward


def _forward_unbound(self, *args, **kwargs):
    config = self._prompt_config()
    if config is None:
        kwargs.pop("task_ids", None)
        outputs = self.base_model(*args, **kwargs)
        if isinstance(self.active_peft_config, AdaLoraConfig) and not self._disabled:
            self._add_orthogonal_penalty(outputs)
        return outputs
    if len(args) > 2:
        raise TypeError(
            "qpeft: with prompt learning pass input_ids and attention_mask positionally, the rest by keyword"
        )
    return prompt.forward(self.base_model, self.prompt_encoder[self.active_adapter], config, *args, **kwargs)


class _ModelSnapshot:
    """The module tree, forward hooks, trainable flags and adapter selections of ``root``, to put back when adding or
    loading an adapter fails part-way: a failed load leaves the model as it was (restore())."""

    def __init__(self, root: nn.Module):
        self.children = [(m, dict(m._modules)) for m in root.modules()]
        self.hooks = [(m, dict(m._forward_hooks)) for m in root.modules()]
        self.flags = [(p, p.requires_grad) for p in root.parameters()]
        self.active = [(m, list(m.active_adapters)) for m in root.modules() if isinstance(m, targets.ADAPTER_LAYERS)]
        self.wrappers = [(m, m.active) for m in root.modules() if isinstance(m, ModulesToSave)]

    def restore(self) -> None:
        for module, children in self.children:
            module._modules.clear()
            module._modules.update(children)
        for module, hooks in self.hooks:
            module._forward_hooks.clear()
            module._forward_hooks.update(hooks)
        for layer, active in self.active:
            layer.active_adapters = active
        for wrapper, active in self.wrappers:
            wrapper.active = active
        for p, flag in self.flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def _all_or_nothing(model: nn.Module, peft_model: "QPeftModel | None" = None) -> Iterator[None]:
    """Runs the block; if it raises, ``model`` (and ``peft_model``'s adapter registry) is restored as it was."""
    snapshot = _ModelSnapshot(model if peft_model is None else peft_model)
    registry = None if peft_model is None else (dict(peft_model.peft_config), peft_model.active_adapter)
    try:
        yield
    except BaseException:
        snapshot.restore()
        if registry is not None:
            peft_model.peft_config, peft_model.active_adapter = registry[0], registry[1]
        raise


class QPeftModel(nn.Module):
    """Wraps a model with qpeft adapters. ``forward`` is the model's (with the virtual tokens or prefix of a
    prompt-learning adapter); attributes the wrapper lacks are looked up on the model (config,
    gradient_checkpointing_enable, ...)."""

    def __init__(
        self, model: nn.Module, config: AdapterConfig, adapter_name: str = "default", *, _loaded: bool = False
    ):
        super().__init__()
        self.base_model = model
        self.prompt_encoder = nn.ModuleDict()  # prompt learning: one encoder per adapter
        self.peft_config: dict[str, AdapterConfig] = {}
        self.active_adapter = adapter_name
        self._disabled = False
        self._allocators: dict[str, adalora.RankAllocator] = {}
        self.add_adapter(adapter_name, config, _loaded=_loaded)

    forward = _DelegatingForward()

    def get_base_model(self) -> nn.Module:
        return self.base_model

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "prompt_encoder"):
                raise
            return getattr(self.base_model, name)

    @property
    def active_peft_config(self) -> AdapterConfig:
        return self.peft_config[self.active_adapter if isinstance(self.active_adapter, str) else self.active_adapter[0]]

    def _prompt_config(self):
        """The active prompt-learning config, or None (LoRA, or adapters disabled)."""
        config = self.active_peft_config
        return config if config.is_prompt_learning and not self._disabled else None

    # ---- adapters ---------------------------------------------------------------------------------------------
    def lora_layers(self) -> Iterator[tuple[str, LoraLinear4bit]]:
        """The LoRA / AdaLoRA layers."""
        return lora.lora_layers(self.base_model)

    def adapter_layers(self) -> Iterator[tuple[str, nn.Module]]:
        """Every layer holding adapters around a 4-bit base (LoRA, AdaLoRA, IA3)."""
        for name, module in self.base_model.named_modules():
            if isinstance(module, targets.ADAPTER_LAYERS):
                yield name, module

    def _adapter_holders(self) -> Iterator[tuple[str, nn.Module]]:
        """The adapter layers and the bottleneck adapter sets: every module with named adapters."""
        for name, module in self.base_model.named_modules():
            if isinstance(module, targets.ADAPTER_HOLDERS):
                yield name, module

    def add_adapter(self, adapter_name: str, config: AdapterConfig, *, _loaded: bool = False) -> None:
        """Adds (and trains) adapter ``adapter_name``; other adapters stay but are inactive."""
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"qpeft: adapter {adapter_name!r} already exists")
        kinds = {c.peft_type for c in self.peft_config.values()}
        if kinds and kinds != {config.peft_type}:
            raise ValueError(
                f"qpeft: this model's adapters are {sorted(kinds)}; one model holds adapters of one "
                f"peft_type (as in peft), so a {config.peft_type} adapter cannot join them"
            )
        method = _METHODS.get(config.peft_type)
        if kinds and method is not None and method.own_parameters:
            raise ValueError(f"qpeft: {config.peft_type} trains the model's own parameters: one adapter per model")
        with _all_or_nothing(self.base_model, self):
            if config.is_prompt_learning:
                self.prompt_encoder[adapter_name] = prompt.setup(self.base_model, config, loaded=_loaded)
            else:
                method.inject(self.base_model, config, adapter_name)
                saved = getattr(config, "modules_to_save", None)
                for name, module in targets.modules_to_save_of(self.base_model, saved):
                    if not isinstance(module, ModulesToSave):
                        module = ModulesToSave(module)
                        targets.set_submodule(self.base_model, name, module)
                    module.add(adapter_name)
            self.peft_config[adapter_name] = config
            self.set_adapter(adapter_name)

    def _wrappers(self) -> Iterator[tuple[str, ModulesToSave]]:
        for name, module in self.base_model.named_modules():
            if isinstance(module, ModulesToSave):
                yield name, module

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Activates one adapter (or several LoRA adapters, summed) and makes exactly its parameters trainable
        (plus the biases its config trains and its modules_to_save)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for n in names:
            if n not in self.peft_config:
                raise KeyError(f"qpeft: no adapter named {n!r} (have {list(self.peft_config)})")
        if len(names) > 1 and self.peft_config[names[0]].is_prompt_learning:
            raise ValueError("qpeft: one prompt-learning adapter is active at a time")
        for p in self.parameters():
            p.requires_grad_(False)
        for n in names:
            if n in self.prompt_encoder:
                self.prompt_encoder[n].requires_grad_(True)
        for _, layer in self._adapter_holders():
            present = [n for n in names if n in layer.adapters]
            layer.set_adapter(present)
            for n in present:
                layer.adapters[n].requires_grad_(True)
        for n in names:
            config = self.peft_config[n]
            if isinstance(config, LoraConfig):  # AdaLoRA too
                lora.unfreeze_biases(self.base_model, config)
            method = _METHODS.get(config.peft_type)
            if method is not None and method.own_parameters:
                for p in method.file_parameters(self.base_model, config, n).values():
                    p.requires_grad_(True)
        for wname, wrapper in self._wrappers():
            owners = [n for n in names if n in wrapper.modules_to_save]
            if len(owners) > 1:
                raise ValueError(
                    f"qpeft: adapters {owners} each have their own copy of {wname!r} "
                    "(modules_to_save); only one of them can be active at a time, as in peft"
                )
            wrapper.active = owners[0] if owners else None
            if owners:
                wrapper.modules_to_save[owners[0]].requires_grad_(True)
        self.active_adapter = names[0] if len(names) == 1 else names

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise KeyError(f"qpeft: no adapter named {adapter_name!r}")
        if adapter_name in self.prompt_encoder:
            del self.prompt_encoder[adapter_name]
        self._allocators.pop(adapter_name, None)
        for _, layer in self._adapter_holders():
            if adapter_name in layer.adapters:
                layer.delete_adapter(adapter_name)
        for name, wrapper in list(self._wrappers()):
            if adapter_name in wrapper.modules_to_save:
                del wrapper.modules_to_save[adapter_name]
                if wrapper.active == adapter_name:
                    wrapper.active = None
                if not len(wrapper.modules_to_save):  # no adapter keeps a copy: the plain module again
                    targets.set_submodule(self.base_model, name, wrapper.original_module)
        del self.peft_config[adapter_name]

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the context the model is the base model (as in peft): every LoRA layer its frozen base, every
        modules_to_save module its original, no virtual tokens or prefix."""
        with contextlib.ExitStack() as stack:
            for _, layer in self._adapter_holders():
                stack.enter_context(layer.disable_adapter())
            for _, wrapper in self._wrappers():
                wrapper.disabled = True
                stack.callback(setattr, wrapper, "disabled", False)
            self._disabled = True
            stack.callback(setattr, self, "_disabled", False)
            yield

    def generate(self, *args, **kwargs):
        """The model's generate, with the active prompt-learning adapter's virtual tokens or prefix injected once
        (``task_ids`` for multitask prompt tuning)."""
        config = self._prompt_config()
        if config is None:
            kwargs.pop("task_ids", None)
            return self.base_model.generate(*args, **kwargs)
        if args:
            kwargs["input_ids"] = args[0]
        return prompt.generate(self.base_model, self.prompt_encoder[self.active_adapter], config, **kwargs)

    # ---- AdaLoRA ---------------------------------------------------------------------------------------------
    def _add_orthogonal_penalty(self, outputs) -> None:
        """peft's AdaLoRA forward: a loss in the outputs gains orth_reg_weight x the orthogonality penalty."""
        loss = getattr(outputs, "loss", None)
        if not isinstance(loss, torch.Tensor):
            return
        penalty = adalora.orthogonal_penalty(self.base_model, self.active_adapter)
        if penalty is not None:
            outputs.loss = loss + self.active_peft_config.orth_reg_weight * penalty

    def update_and_allocate(self, global_step: int) -> None:
        """AdaLoRA's rank allocation after the optimizer step of ``global_step`` (peft's
        ``model.base_model.update_and_allocate``): importance from the gradients still held, masks per the budget
        schedule, the final pattern fixed at total_step - tfinal and applied from then on."""
        name = self.active_adapter
        config = self.peft_config.get(name) if isinstance(name, str) else None
        if not isinstance(config, AdaLoraConfig):
            raise ValueError("qpeft: update_and_allocate is AdaLoRA's; the active adapter is not an AdaLoRA adapter")
        allocator = self._allocators.get(name)
        if allocator is None:
            allocator = self._allocators[name] = adalora.RankAllocator(self.base_model, config, name)
        final = config.total_step - config.tfinal
        if global_step < final:
            pattern = allocator.update_and_allocate(global_step)
            if pattern:
                config.rank_pattern = pattern
        elif global_step == final:
            config.rank_pattern = allocator.update_and_allocate(global_step, force_mask=True)
            allocator.reset_ipt()
        elif config.rank_pattern:
            adalora.mask_using_rank_pattern(self.base_model, name, config.rank_pattern)

    # ---- sparse fine-tuning ----------------------------------------------------------------------------------
    def select_sparse_entries(self, batches) -> None:
        """Sparse fine-tuning's warm-up: the entries of largest accumulated |dL/dW| over ``batches`` (dicts of
        model inputs with labels, or token tensors) become each layer's trained entries (values zero)."""
        config = self.active_peft_config
        if not isinstance(config, SparseConfig):
            raise ValueError("qpeft: select_sparse_entries is sparse fine-tuning's; the active adapter is not one")
        sparse.select_by_gradient(self, config, self.active_adapter, batches)
        self.set_adapter(self.active_adapter)

    # ---- merging --------------------------------------------------------------------------------------------
    def _layers_only(self, what: str) -> None:
        config = self.active_peft_config if self.peft_config else None
        if config is not None and config.is_prompt_learning:
            raise ValueError(
                f"qpeft: {what} applies to LoRA, AdaLoRA and IA3 adapters; a prompt-learning adapter "
                "changes the input, not the weights"
            )
        if config is not None and not _METHODS[config.peft_type].mergeable:
            raise ValueError(f"qpeft: {what}: {config.peft_type} adapters are nonlinear and do not merge into weights")

    def merge_adapter(self, dtype: torch.dtype | None = None) -> None:
        self._layers_only("merge_adapter")
        for _, layer in self.adapter_layers():
            layer.merge(dtype)

    def unmerge_adapter(self) -> None:
        self._layers_only("unmerge_adapter")
        for _, layer in self.adapter_layers():
            layer.unmerge()

    @torch.no_grad()
    def merge_and_unload(self, dtype: torch.dtype | None = None) -> nn.Module:
        """The model with every adapter layer replaced by a dense nn.Linear holding W with the active adapters
        (merged in 16/32-bit from one dequantization: no 4-bit requantization loss). ``dtype``: default the
        weights' own."""
        self._layers_only("merge_and_unload")
        for name, layer in list(self.adapter_layers()):
            targets.set_submodule(self.base_model, name, layer.to_linear(dtype))
        self._unwrap_modules_to_save()
        return self.base_model

    def _unwrap_modules_to_save(self) -> None:
        """Each modules_to_save wrapper replaced by the module in use (the active adapter's copy), as peft's
        merge_and_unload / unload do."""
        for name, wrapper in list(self._wrappers()):
            targets.set_submodule(self.base_model, name, wrapper.in_use())

    @torch.no_grad()
    def unload(self) -> nn.Module:
        """The model without its adapters: every adapter layer its frozen 4-bit base (prompt encoders and
        bottleneck adapters dropped)."""
        for name, layer in list(self.adapter_layers()):
            targets.set_submodule(self.base_model, name, layer.base)
        bottleneck.remove(self.base_model)
        self._unwrap_modules_to_save()
        return self.base_model

    # ---- reporting ------------------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts; a 4-bit weight counts its elements (bytes * 2), as peft does."""
        trainable = total = 0
        for module in self.modules():
            for name, p in module.named_parameters(recurse=False):
                n = p.numel()
                if isinstance(module, Linear4bit) and name == "weight":
                    n = module.in_features * module.out_features
                total += n
                trainable += n if p.requires_grad else 0
        return trainable, total

    def memory_footprint(self) -> dict[str, int]:
        """Bytes of the 4-bit layers (codes and scales, with their biases), of the trainable tensors, and of the
        rest of the model's parameters and buffers."""
        four_bit = {
            id(t): t.untyped_storage().nbytes()
            for m in self.modules()
            if isinstance(m, Linear4bit)
            for t in (*m.parameters(), *m.buffers())
        }
        trainable = {id(p): p.untyped_storage().nbytes() for p in self.parameters() if p.requires_grad}
        rest = {
            id(t): t.untyped_storage().nbytes()
            for t in (*self.parameters(), *self.buffers())
            if id(t) not in four_bit and id(t) not in trainable
        }
        return {
            "4bit_layers": sum(four_bit.values()),
            "trainable": sum(trainable.values()),
            "other": sum(rest.values()),
        }

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}"
        )
        mib = {k: v / 2**20 for k, v in self.memory_footprint().items()}
        print(
            f"weights: 4-bit layers {mib['4bit_layers']:.2f} MiB || trainable {mib['trainable']:.2f} MiB || "
            f"other {mib['other']:.2f} MiB"
        )

    # ---- peft's file format -----------------------------------------------------------------------------------
    def _file_parameters(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """peft file key -> the tensor of ``adapter_name`` it holds (for a prompt encoder, what peft writes: the
        virtual tokens' embeddings, computed)."""
        config = self.peft_config[adapter_name]
        if config.is_prompt_learning:
            return self.prompt_encoder[adapter_name].file_tensors()
        return _METHODS[config.peft_type].file_parameters(self.base_model, config, adapter_name)

    def _load_tensors(self, adapter_name: str, tensors: dict[str, torch.Tensor]) -> None:
        """A file's tensors into adapter ``adapter_name`` (every key must match, with its shape)."""
        config = self.peft_config[adapter_name]
        method = _METHODS.get(config.peft_type)
        if method is not None and method.prepare_load is not None:
            method.prepare_load(self.base_model, config, adapter_name, tensors)
        if method is not None and method.load is not None:
            method.load(self.base_model, config, adapter_name, tensors)
        else:
            adapter_io.assign_tensors(self._file_parameters(adapter_name), tensors)

    def save_pretrained(
        self,
        save_directory: str | Path,
        selected_adapters: Sequence[str] | None = None,
        is_main_process: bool | None = None,
    ) -> None:
        """peft's layout: adapter_config.json + adapter_model.safetensors per adapter ("default" at the top,
        others in a subfolder of their name). Under torch.distributed only rank 0 writes (``is_main_process``
        decides otherwise, as in peft); the adapters are the same on every data-parallel rank. Sharded (FSDP2)
        tensors are gathered first: then every rank must call it."""
        if is_main_process is None:
            is_main_process = (
                not (torch.distributed.is_available() and torch.distributed.is_initialized())
                or torch.distributed.get_rank() == 0
            )
        names = selected_adapters or list(self.peft_config)
        for name in names:
            if name not in self.peft_config:
                raise KeyError(f"qpeft: no adapter named {name!r}")
        for name in names:
            with torch.no_grad():
                params = self._file_parameters(name)
                if any(hasattr(p, "full_tensor") for p in params.values()):  # a collective: every rank gathers
                    params = {k: p.full_tensor() if hasattr(p, "full_tensor") else p for k, p in params.items()}
                if is_main_process:
                    folder = folder_inside(save_directory, *([] if name == "default" else [check_adapter_name(name)]))
                    adapter_io.save_adapter(params, self.peft_config[name], folder)

    def load_adapter(
        self, model_id: str | Path, adapter_name: str = "default", is_trainable: bool = False, **kwargs
    ) -> None:
        """Loads a peft adapter (from peft or qpeft: a local folder or a Hub repository id; ``subfolder``,
        ``revision``, ``token`` as in peft) as ``adapter_name`` and activates it."""
        config, tensors = adapter_io.load_adapter_files(model_id, **kwargs)
        with _all_or_nothing(self.base_model, self):  # a failed load leaves no adapter behind
            self.add_adapter(adapter_name, config, _loaded=True)
            self._load_tensors(adapter_name, tensors)
        if not is_trainable:
            for p in self.parameters():
                p.requires_grad_(False)

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, model_id: str | Path, adapter_name: str = "default", is_trainable: bool = False, **kwargs
    ) -> "QPeftModel":
        """peft's PeftModel.from_pretrained: quantize ``model`` (LoRA: its targets; prompt learning: its linear
        layers) and load the adapter (a local folder or a Hub repository id; ``subfolder``, ``revision``, ``token``
        as in peft). The other keywords override the 4-bit format (quant_type, blocksize, double_quant,
        compute_dtype). A P-tuning or projected prefix adapter loads as its encoder's output (peft's file holds
        only that): with is_trainable it trains that output directly."""
        config, tensors = adapter_io.load_adapter_files(model_id, **kwargs)
        with _all_or_nothing(model):  # a failed load leaves the caller's model unquantized
            wrapper = cls(model, config, adapter_name, _loaded=True)
            wrapper._load_tensors(adapter_name, tensors)
        if not is_trainable:
            for p in wrapper.parameters():
                p.requires_grad_(False)
        return wrapper


def get_peft_model(model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> QPeftModel:
    """peft's get_peft_model on a qpeft 4-bit base: LoRA quantizes the targeted linear layers of ``model`` in place
    and attaches an adapter to each; prompt learning quantizes every linear layer but the output head (unless
    ``config.quantize`` is False) and adds the prompt encoder. Everything else is frozen."""
    return QPeftModel(model, config, adapter_name)


def prepare_model_for_kbit_training(
    model: nn.Module, use_gradient_checkpointing: bool = True, gradient_checkpointing_kwargs: dict | None = None
) -> nn.Module:
    """Freezes the model and turns on gradient checkpointing (non-reentrant by default). Unlike peft's helper it
    does not upcast the non-quantized 16-bit parameters to fp32 (norms, embeddings, the head: about 1 GB on a 7B
    model); the LoRA layers compute in the activations' dtype with fp32 adapters anyway."""
    for p in model.parameters():
        p.requires_grad_(False)
    if use_gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        kwargs = {"use_reentrant": False} if gradient_checkpointing_kwargs is None else gradient_checkpointing_kwargs
        if kwargs.get("use_reentrant", True) and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()  # reentrant checkpoints need an input that requires grad
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model
