"""The one list of PEFT methods. Each method's package (``qpeft/tuners/<method>/__init__.py``) registers a
``Method``: its config class, how it is added to a model, its file's tensors, the layers it creates, what it
supports, its model verbs and small example configs. QPeftModel, checkpoints, distributed loading, the CLI, the
benchmarks and the tests read this registry; nothing else lists methods (peft's ``register_peft_method``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

from torch import nn


@dataclasses.dataclass(frozen=True, eq=False)
class Method:
    """One PEFT method.

    ``inject(model, config, name, loaded)`` adds adapter ``name`` to the modules of ``model`` (``loaded``: its
    tensors are read from a file next, so a start computed from the weights is skipped; None for prompt learning,
    whose ``encoder(model, config, loaded)`` returns the prompt encoder the wrapper keeps; ``forward`` /
    ``generate(model, encoder, config, ...)`` run the model with it). ``file_parameters(model, config, name)``:
    adapter file key -> tensor. ``prepare_load(model, config, name, tensors)`` shapes the adapter to a file
    before its tensors are copied; ``load`` replaces the copy (a file holding derived tensors). ``layers``: the
    adapter layer classes it puts in the model (each an AdapterLayer4bit, its frozen 4-bit base the child
    ``BASE_CHILD``). ``own_parameters``: it trains parameters of the model itself (exactly its file's), so a model
    holds one such adapter. ``unfreeze(model, config, name)``: parameters besides the adapter modules' that train.
    ``sharded_start(layer, device)``: gives a meta-built layer's adapters their initial values
    (``load_4bit_sharded``; None: not supported there). ``outputs(peft_model, config, name, outputs)``: adjusts
    a training forward's outputs (AdaLoRA's penalty). ``verbs``: model methods, name -> f(peft_model, config,
    name, *args); ``warmup``: the verb that must see a few batches before training (sparse's entry selection).
    ``convert_initial(config, tensors, initial)`` -> (config, tensors): an adapter that moved part of the weights
    into itself as a plain adapter of the original weights, given its tensors at the start (peft's
    ``path_initial_model_for_weight_conversion``; None: not supported). ``examples``: variant -> f(r=...,
    steps=...) -> a small config for a Llama-style model; its
    "default" is the demo's, trained at ``example_lr``."""

    config_class: type
    name: str
    inject: Callable | None = None
    file_parameters: Callable | None = None
    layers: tuple[type, ...] = ()
    own_parameters: bool = False
    mergeable: bool = True
    starts_as_base: bool = True
    unfreeze: Callable | None = None
    prepare_load: Callable | None = None
    load: Callable | None = None
    sharded_start: Callable | None = None
    outputs: Callable | None = None
    convert_initial: Callable | None = None
    encoder: Callable | None = None
    forward: Callable | None = None
    generate: Callable | None = None
    verbs: Mapping[str, Callable] = dataclasses.field(default_factory=dict)
    warmup: str | None = None
    examples: Mapping[str, Callable] = dataclasses.field(default_factory=dict)
    example_lr: float = 3e-2

    def __post_init__(self):
        if "default" not in self.examples:
            raise ValueError(f"qpeft: method {self.name!r} registers no 'default' example")
        if (self.inject is None) == (self.encoder is None):
            raise ValueError(f"qpeft: method {self.name!r} needs exactly one of inject (layers) or encoder (prompts)")

    @property
    def peft_type(self) -> str:
        return self.config_class.peft_type

    @property
    def is_prompt_learning(self) -> bool:
        return self.encoder is not None

    def adapter_layers(self, model: nn.Module):
        """(name, layer) of every layer of ``model`` this method creates."""
        from .targets import modules_of

        return modules_of(model, self.layers) if self.layers else iter(())


METHODS: dict[str, Method] = {}  # peft_type -> Method, in registration order


def register(method: Method) -> Method:
    if method.peft_type in METHODS:
        raise ValueError(f"qpeft: method {method.peft_type} is registered already")
    if any(m.name == method.name for m in METHODS.values()):
        raise ValueError(f"qpeft: a method is named {method.name!r} already")
    METHODS[method.peft_type] = method
    return method


def method_of(config) -> Method:
    """The registered method of ``config`` (by its peft_type)."""
    method = METHODS.get(getattr(config, "peft_type", None))
    if method is None:
        raise ValueError(f"qpeft: {type(config).__name__} is not the config of a registered method")
    return method


def by_name(name: str) -> Method:
    for method in METHODS.values():
        if method.name == name:
            return method
    raise KeyError(f"qpeft: no method named {name!r} (have {names()})")


def names() -> list[str]:
    return [m.name for m in METHODS.values()]


def config_classes() -> dict[str, type]:
    return {peft_type: m.config_class for peft_type, m in METHODS.items()}
