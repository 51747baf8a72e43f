"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020) on a module's output: h + up(act(down(h))),
up zero-initialised so training starts from the base model. ``Bottlenecks`` holds the named adapters of one
module and is applied by a forward hook, so the module and its parameter names stay as they are; a tuple output
(attention modules) has its first element adapted."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ..files import check_adapter_name

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class BottleneckAdapter(nn.Module):
    """down [b, d] (N(0, init_std)), nonlinearity, up [d, b] (zero), both with biases; returns up(act(down(h)))."""

    def __init__(self, features: int, bottleneck: int, non_linearity: str = "relu", init_std: float = 1e-2,
                 device=None):
        super().__init__()
        self.down = nn.Linear(features, bottleneck, device=device)
        self.act = ACTIVATIONS[non_linearity]()
        self.up = nn.Linear(bottleneck, features, device=device)
        with torch.no_grad():
            self.down.weight.normal_(0.0, init_std)
            self.down.bias.zero_()
            self.up.weight.zero_()
            self.up.bias.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = h.to(self.down.weight.dtype)
        return self.up(self.act(self.down(z))).to(h.dtype)


class Bottlenecks(nn.Module):
    """The adapters of one module (``adapters``: name -> BottleneckAdapter; active ones summed)."""

    def __init__(self):
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disable_adapters = False

    def add_adapter(self, name: str, adapter: BottleneckAdapter, activate: bool = True) -> None:
        check_adapter_name(name)
        if name in self.adapters:
            raise ValueError(f"qpeft: adapter {name!r} already exists")
        self.adapters[name] = adapter
        if activate:
            self.set_adapter(name)

    def set_adapter(self, names: str | Sequence[str]) -> None:
        names = [names] if isinstance(names, str) else list(names)
        for name in names:
            if name not in self.adapters:
                raise KeyError(f"qpeft: no adapter named {name!r} (have {list(self.adapters)})")
        self.active_adapters = names

    def delete_adapter(self, name: str) -> None:
        del self.adapters[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        previous, self.disable_adapters = self.disable_adapters, True
        try:
            yield
        finally:
            self.disable_adapters = previous

    def adapt(self, h: torch.Tensor) -> torch.Tensor:
        if self.disable_adapters:
            return h
        for name in self.active_adapters:
            h = h + self.adapters[name](h)
        return h


def apply_bottlenecks(module: nn.Module, args, output):
    """Forward hook of a module holding a ``qpeft_bottlenecks`` child: its output adapted."""
    adapters = module.qpeft_bottlenecks
    if isinstance(output, tuple):
        return (adapters.adapt(output[0]), *output[1:])
    return adapters.adapt(output)
