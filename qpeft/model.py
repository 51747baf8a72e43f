"""``QPeftModel`` and ``get_peft_model`` in peft's idiom, for every registered method (tuners/registry.py): the
adapter registry (add / set / delete / disable), the forward, and peft's verbs, each delegating to the method's
registration, to modules_to_save (tuners/modules_to_save.py), to the files (adapter_io.py) or to the report
(reporting.py). All the adapters of one model have one peft_type, as in peft.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from . import adapter_io, fused_loss, patterns
from .files import check_adapter_name
from .nn.adapter_holder import AdapterLayer4bit, NamedAdapters
from .reporting import ParameterReport
from .tuners import modules_to_save, registry, targets
from .tuners.bottleneck import model as bottleneck
from .tuners.config import AdapterConfig
from .tuners.lora.config import LoraConfig
from .tuners.lora.model import lora_layers
from .tuners.modules_to_save import ModulesToSave
from .tuners.snapshot import all_or_nothing

# Names that lived here before the tuners/ split.
ADAPTER_CONFIG, ADAPTER_WEIGHTS = adapter_io.ADAPTER_CONFIG, adapter_io.ADAPTER_WEIGHTS
find_target_modules = targets.find_target_modules
__all__ = [
    "AutoPeftModelForCausalLM",
    "LoraConfig",
    "ModulesToSave",
    "PeftModel",
    "PeftModelForCausalLM",
    "QPeftModel",
    "get_peft_model",
    "prepare_model_for_kbit_training",
]


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
        config = obj.peft_config.get(obj.active_adapter if isinstance(obj.active_adapter, str) else "")
        if hasattr(config, "num_tasks") and "task_ids" not in signature.parameters:
            params = list(signature.parameters.values())
            at = next((i for i, p in enumerate(params) if p.kind == p.VAR_KEYWORD), len(params))
            params.insert(at, inspect.Parameter("task_ids", inspect.Parameter.KEYWORD_ONLY, default=None))
            signature = signature.replace(parameters=params)
        forward.__signature__ = signature
        forward.__doc__ = obj.base_model.forward.__doc__
        return forward


def _forward_unbound(self, *args, **kwargs):
    method = self.active_method
    if method.forward is None or self._disabled:
        kwargs.pop("task_ids", None)
        head = fused_loss.fusable(self.base_model, kwargs) if self.fused_loss else None
        if head is not None:
            outputs = fused_loss.causal_lm_forward(self.base_model, head, args, kwargs)
        else:
            outputs = self.base_model(*args, **kwargs)
        if method.outputs is not None and not self._disabled:
            outputs = method.outputs(self, self.active_peft_config, self.active_adapter, outputs)
        return outputs
    if len(args) > 2:
        raise TypeError(
            "qpeft: with prompt learning pass input_ids and attention_mask positionally, the rest by keyword"
        )
    encoder = self.prompt_encoder[self.active_adapter]
    return method.forward(self.base_model, encoder, self.active_peft_config, *args, **kwargs)


class QPeftModel(ParameterReport, nn.Module):
    """Wraps a model with qpeft adapters. ``forward`` is the model's (with the virtual tokens or prefix of a
    prompt-learning adapter); attributes the wrapper lacks are looked up on the active method's verbs
    (``update_and_allocate``, ``select_sparse_entries``), then on the model (config,
    gradient_checkpointing_enable, ...)."""

    def __init__(
        self, model: nn.Module, config: AdapterConfig, adapter_name: str = "default", *, _loaded: bool = False
    ):
        super().__init__()
        self.base_model = model
        self.prompt_encoder = nn.ModuleDict()  # prompt learning: one encoder per adapter
        self.peft_config: dict[str, AdapterConfig] = {}
        self.active_adapter: str | list[str] = adapter_name
        self._disabled = False
        self.method_state: dict[str, object] = {}  # a method's per-adapter state (AdaLoRA's allocator)
        self.add_adapter(adapter_name, config, _loaded=_loaded)
        self.set_adapter(adapter_name)

    forward = _DelegatingForward()
    # a causal LM's training loss through its head in chunks, without the [tokens, vocab] logits (fused_loss.py);
    # False: the model's own forward
    fused_loss = True
    # transformers' Trainer refuses a quantized model unless adapters are attached, which it reads from this flag
    # (or from peft's own classes); a QPeftModel always holds one
    _hf_peft_config_loaded = True

    def get_base_model(self) -> nn.Module:
        return self.base_model

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "prompt_encoder", "peft_config") or "peft_config" not in self.__dict__:
                raise
        owners = [m for m in registry.METHODS.values() if name in m.verbs]
        if owners:
            return functools.partial(self._call_verb, name, owners[0].name)
        return getattr(self.base_model, name)

    def _call_verb(self, name: str, owner: str, *args, **kwargs):
        """A method's model verb for the active adapter (a ValueError when the active method has no such verb)."""
        method = self.active_method
        if name not in method.verbs:
            raise ValueError(f"qpeft: {name} is {owner}'s; the active adapter is a {method.name} adapter")
        return method.verbs[name](self, self.active_peft_config, self.active_adapter, *args, **kwargs)

    @property
    def active_peft_config(self) -> AdapterConfig:
        return self.peft_config[self.active_adapter if isinstance(self.active_adapter, str) else self.active_adapter[0]]

    @property
    def active_method(self) -> registry.Method:
        return registry.method_of(self.active_peft_config)

    def registry_state(self) -> tuple:
        """What ``restore_registry_state`` puts back (the adapter configs, the active ones, method state)."""
        return dict(self.peft_config), self.active_adapter, dict(self.method_state)

    def restore_registry_state(self, state: tuple) -> None:
        self.peft_config, self.active_adapter, self.method_state = dict(state[0]), state[1], dict(state[2])

    # ---- adapters ---------------------------------------------------------------------------------------------
    def lora_layers(self) -> Iterator[tuple[str, nn.Module]]:
        """The LoRA / AdaLoRA layers."""
        return lora_layers(self.base_model)

    def adapter_layers(self) -> Iterator[tuple[str, AdapterLayer4bit]]:
        """Every layer holding adapters around a 4-bit base."""
        return targets.modules_of(self.base_model, AdapterLayer4bit)

    def _adapter_holders(self) -> Iterator[tuple[str, NamedAdapters]]:
        """Every module with named adapters (adapter layers, bottleneck adapter sets)."""
        return targets.modules_of(self.base_model, NamedAdapters)

    def add_adapter(self, adapter_name: str, config: AdapterConfig, *, _loaded: bool = False) -> None:
        """Adds adapter ``adapter_name`` (as in peft, the active adapter stays the active one; ``set_adapter``
        makes the new one active and trainable)."""
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"qpeft: adapter {adapter_name!r} already exists")
        method = registry.method_of(config)
        if config.base_model_name_or_path is None:  # as peft: the model's own name or path, for AutoPeftModel
            name = getattr(getattr(self.base_model, "config", None), "_name_or_path", None)
            config.base_model_name_or_path = name if isinstance(name, str) and name else None
        kinds = {c.peft_type for c in self.peft_config.values()}
        if kinds and kinds != {config.peft_type}:
            raise ValueError(
                f"qpeft: this model's adapters are {sorted(kinds)}; one model holds adapters of one "
                f"peft_type (as in peft), so a {config.peft_type} adapter cannot join them"
            )
        if kinds and method.own_parameters:
            raise ValueError(f"qpeft: {config.peft_type} trains the model's own parameters: one adapter per model")
        with all_or_nothing(self.base_model, self), patterns.budget():  # the config's regexes: one time budget
            targets.take_over_bitsandbytes(self.base_model)  # a model bitsandbytes quantized: its bytes, qpeft's layers
            if method.is_prompt_learning:
                self.prompt_encoder[adapter_name] = method.encoder(self.base_model, config, _loaded)
            else:
                method.inject(self.base_model, config, adapter_name, loaded=_loaded)
                modules_to_save.add(self.base_model, config, adapter_name)
            self.peft_config[adapter_name] = config
            if self.peft_config.keys() != {adapter_name}:
                self.set_adapter(self.active_adapter)  # the new adapter's parameters stay frozen

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Activates one adapter (or several layer adapters, combined as in peft) and makes exactly its parameters
        trainable (plus the biases its config trains and its modules_to_save). Checked before anything changes."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if not names:
            raise ValueError("qpeft: set_adapter needs at least one adapter name (disable_adapter() runs the base)")
        for n in names:
            if not isinstance(n, str) or n not in self.peft_config:
                raise KeyError(f"qpeft: no adapter named {n!r} (have {list(self.peft_config)})")
        if len(set(names)) != len(names):
            raise ValueError(f"qpeft: adapter names repeat in {names}")
        if len(names) > 1 and registry.method_of(self.peft_config[names[0]]).is_prompt_learning:
            raise ValueError("qpeft: one prompt-learning adapter is active at a time")
        holders = list(self._adapter_holders())
        for _, layer in holders:
            layer.check_active([n for n in names if n in layer.adapters])
        modules_to_save.check_active(self.base_model, names)
        for _, layer in holders:
            layer.set_adapter([n for n in names if n in layer.adapters])
        modules_to_save.activate(self.base_model, names)
        for p in self.parameters():
            p.requires_grad_(False)
        for n in names:
            config = self.peft_config[n]
            if config.inference_mode:  # loaded with is_trainable=False
                continue
            if n in self.prompt_encoder:
                self.prompt_encoder[n].requires_grad_(True)
            for _, layer in holders:
                if n in layer.adapters:
                    layer.adapters[n].requires_grad_(True)
            for _, wrapper in modules_to_save.wrappers(self.base_model):
                if wrapper.active == n:
                    wrapper.modules_to_save[n].requires_grad_(True)
            method = registry.method_of(config)
            if method.unfreeze is not None:
                method.unfreeze(self.base_model, config, n)
        self.active_adapter = names[0] if len(names) == 1 else names

    def delete_adapter(self, adapter_name: str) -> None:
        """Removes the adapter; when it was active, the remaining active ones stay, or else the first remaining
        adapter becomes active (with a warning), as in peft. The last adapter cannot be deleted."""
        if adapter_name not in self.peft_config:
            raise KeyError(f"qpeft: no adapter named {adapter_name!r}")
        if len(self.peft_config) == 1:
            raise ValueError(f"qpeft: {adapter_name!r} is the model's only adapter (unload() removes it)")
        active = [self.active_adapter] if isinstance(self.active_adapter, str) else list(self.active_adapter)
        for _, layer in self._adapter_holders():
            layer._require_unmerged("delete an adapter")
        if adapter_name in self.prompt_encoder:
            del self.prompt_encoder[adapter_name]
        self.method_state.pop(adapter_name, None)
        for _, layer in self._adapter_holders():
            if adapter_name in layer.adapters:
                layer.delete_adapter(adapter_name)
        modules_to_save.delete(self.base_model, adapter_name)
        del self.peft_config[adapter_name]
        remaining = [n for n in active if n != adapter_name]
        if not remaining:
            remaining = [next(iter(self.peft_config))]
            warnings.warn(f"qpeft: deleted the active adapter {adapter_name!r}; {remaining[0]!r} is active now")
        self.set_adapter(remaining[0] if len(remaining) == 1 else remaining)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the context the model is the base model (as in peft): every adapter layer its frozen base, every
        modules_to_save module its original, no virtual tokens or prefix. A method that trains the model's own
        parameters (BitFit, layer-wise) has no base left to run: ValueError."""
        if self.active_method.own_parameters:
            raise ValueError(
                f"qpeft: {self.active_method.name} trains the model's own parameters; there is no base model to fall "
                "back to (keep a copy of the model for that)"
            )
        with contextlib.ExitStack() as stack:
            for _, layer in self._adapter_holders():
                stack.enter_context(layer.disable_adapter())
            for _, wrapper in modules_to_save.wrappers(self.base_model):
                wrapper.disabled = True
                stack.callback(setattr, wrapper, "disabled", False)
            self._disabled = True
            stack.callback(setattr, self, "_disabled", False)
            yield

    def generate(self, *args, **kwargs):
        """The model's generate, with the active prompt-learning adapter's virtual tokens or prefix injected once
        (``task_ids`` for multitask prompt tuning)."""
        method = self.active_method
        if method.generate is None or self._disabled:
            kwargs.pop("task_ids", None)
            return self.base_model.generate(*args, **kwargs)
        if args:
            kwargs["input_ids"] = args[0]
        encoder = self.prompt_encoder[self.active_adapter]
        return method.generate(self.base_model, encoder, self.active_peft_config, **kwargs)

    # ---- merging --------------------------------------------------------------------------------------------
    def _require_mergeable(self, what: str) -> None:
        method = self.active_method
        if method.is_prompt_learning:
            raise ValueError(
                f"qpeft: {what} applies to adapters in the layers; a prompt-learning adapter changes the input, "
                "not the weights"
            )
        if not method.mergeable:
            raise ValueError(f"qpeft: {what}: {method.peft_type} adapters are nonlinear and do not merge into weights")

    def merge_adapter(self, dtype: torch.dtype | None = None) -> None:
        self._require_mergeable("merge_adapter")
        for _, layer in self.adapter_layers():
            layer.merge(dtype)

    def unmerge_adapter(self) -> None:
        self._require_mergeable("unmerge_adapter")
        for _, layer in self.adapter_layers():
            layer.unmerge()

    @torch.no_grad()
    def merge_and_unload(self, dtype: torch.dtype | None = None) -> nn.Module:
        """The model with every adapter layer replaced by a dense nn.Linear holding W with the active adapters
        (merged in 16/32-bit from one dequantization: no 4-bit requantization loss). ``dtype``: default the
        weights' own."""
        self._require_mergeable("merge_and_unload")
        for name, layer in list(self.adapter_layers()):
            targets.set_submodule(self.base_model, name, layer.to_linear(dtype))
        modules_to_save.unwrap(self.base_model)
        return self.base_model

    @torch.no_grad()
    def unload(self) -> nn.Module:
        """The model without its adapters: every adapter layer its frozen 4-bit base (prompt encoders and
        bottleneck adapters dropped)."""
        for name, layer in list(self.adapter_layers()):
            targets.set_submodule(self.base_model, name, layer.base)
        bottleneck.remove(self.base_model)
        modules_to_save.unwrap(self.base_model)
        return self.base_model

    # ---- peft's file format -----------------------------------------------------------------------------------
    def _file_parameters(self, adapter_name: str) -> dict[str, torch.Tensor]:
        return adapter_io.file_parameters(self, adapter_name)

    def save_pretrained(
        self,
        save_directory: str | Path,
        selected_adapters: Sequence[str] | None = None,
        is_main_process: bool | None = None,
        path_initial_model_for_weight_conversion: str | Path | None = None,
    ) -> None:
        """peft's layout: adapter_config.json + adapter_model.safetensors per adapter ("default" at the top,
        others in a subfolder of their name). Under torch.distributed only rank 0 writes (``is_main_process``
        decides otherwise, as in peft); sharded (FSDP2) tensors are gathered first: then every rank must call it.
        ``path_initial_model_for_weight_conversion`` (peft's): the folder where a PiSSA / OLoRA / LoftQ adapter was
        saved right after it was created; the adapter is saved as a plain LoRA adapter of the original weights
        (rank 2r) instead."""
        adapter_io.save_adapters(
            self, save_directory, selected_adapters, is_main_process, path_initial_model_for_weight_conversion
        )

    def load_adapter(
        self, model_id: str | Path, adapter_name: str = "default", is_trainable: bool = False, **kwargs
    ) -> None:
        """Loads a peft adapter (from peft or qpeft: a local folder or a Hub repository id; ``subfolder``,
        ``revision``, ``token`` as in peft) as ``adapter_name``; the active adapter stays active, as in peft
        (``set_adapter`` switches). ``is_trainable``: its parameters train while it is active (else its config's
        inference_mode keeps them frozen)."""
        config, tensors = adapter_io.load_adapter_files(model_id, **kwargs)
        config.inference_mode = not is_trainable
        with all_or_nothing(self.base_model, self):  # a failed load leaves no adapter behind
            self.add_adapter(adapter_name, config, _loaded=True)
            adapter_io.load_tensors(self, adapter_name, tensors)
            self.set_adapter(self.active_adapter)  # (a load may replace the adapter's tensors)
        if not is_trainable:  # as peft: evaluation mode, so no dropout runs in the loaded adapter
            self.eval()

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
        config.inference_mode = not is_trainable
        with all_or_nothing(model):  # a failed load leaves the caller's model unquantized
            wrapper = cls(model, config, adapter_name, _loaded=True)
            adapter_io.load_tensors(wrapper, adapter_name, tensors)
            wrapper.set_adapter(adapter_name)  # (a load may replace the adapter's tensors)
        if not is_trainable:  # as peft: evaluation mode, so no dropout runs in the loaded adapter
            wrapper.eval()
        return wrapper


# peft's names for the wrapper (scripts that only change their import line use these)
PeftModel = PeftModelForCausalLM = QPeftModel


class AutoPeftModelForCausalLM:
    """peft's AutoPeftModelForCausalLM: ``from_pretrained(adapter)`` loads the adapter's base model
    (``base_model_name_or_path`` of its config, with transformers' AutoModelForCausalLM; ``model_kwargs`` go to it)
    and the adapter onto it."""

    @staticmethod
    def from_pretrained(
        model_id, adapter_name: str = "default", is_trainable: bool = False, model_kwargs=None, **kwargs
    ):
        import transformers

        config = AdapterConfig.from_pretrained(model_id, **kwargs)
        if not config.base_model_name_or_path:
            raise ValueError(f"qpeft: the adapter {model_id} names no base_model_name_or_path to load")
        base = transformers.AutoModelForCausalLM.from_pretrained(config.base_model_name_or_path, **(model_kwargs or {}))
        return QPeftModel.from_pretrained(base, model_id, adapter_name, is_trainable, **kwargs)


def get_peft_model(model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> QPeftModel:
    """peft's get_peft_model on a qpeft 4-bit base: the method adds its adapter (layer methods quantize the
    linear layers they adapt; whole-model methods every linear layer but the output head, unless
    ``config.quantize`` is False). Everything else is frozen."""
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
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5's name (the old one warns)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model
