"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020) on a module's output: h + up(act(down(h))),
up zero-initialised so training starts from the base model. ``Bottlenecks`` holds the named adapters of one
module and is applied by a forward hook, so the module and its parameter names stay as they are; a tuple output
(attention modules) has its first element adapted."""

from __future__ import annotations

import torch
from torch import nn

from .adapter_holder import NamedAdapters

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class BottleneckAdapter(nn.Module):
    """down [b, d] (N(0, init_std)), nonlinearity, up [d, b] (zero), both with biases; returns up(act(down(h)))."""

    def __init__(
        self, features: int, bottleneck: int, non_linearity: str = "relu", init_std: float = 1e-2, device=None
    ):
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


class Bottlenecks(NamedAdapters):
    """The adapters of one module (``adapters``: name -> BottleneckAdapter; active ones summed)."""

    def __init__(self):
        super().__init__()
        self.adapters = nn.ModuleDict()

    def add_adapter(self, name: str, adapter: BottleneckAdapter, activate: bool = True) -> None:
        self.register_adapter(name, adapter, activate)

    def adapt(self, h: torch.Tensor) -> torch.Tensor:
        for name in self.active_names():
            features = self.adapters[name].down.in_features
            if not isinstance(h, torch.Tensor) or h.shape[-1:] != (features,):
                got = list(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
                raise ValueError(
                    f"qpeft: bottleneck adapter {name!r} takes outputs of hidden size {features}, but its module "
                    f"returned {got} (place it after modules whose output is the hidden state: target_modules)"
                )
            h = h + self.adapters[name](h)
        return h


def apply_bottlenecks(module: nn.Module, args, output):
    """Forward hook of a module holding a ``qpeft_bottlenecks`` child: its output adapted."""
    adapters = module.qpeft_bottlenecks
    if isinstance(output, tuple):
        return (adapters.adapt(output[0]), *output[1:])
    return adapters.adapt(output)
