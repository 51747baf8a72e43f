"""``IA3Linear4bit``: a frozen 4-bit linear layer whose output rows (attention targets) or input columns
(feed-forward targets) are scaled by learned vectors, peft's IA3 (``ia3_l``: [out, 1] or [1, in]); the active
adapters' vectors multiply, as in peft. Runs inside the 4-bit matmul (qpeft.autograd.ia3); merges into an exact
dense weight."""

from __future__ import annotations

import torch
from torch import nn

from ..autograd import ia3_linear
from .adapter_holder import AdapterLayer4bit
from .linear4bit import Linear4bit


class IA3Linear4bit(AdapterLayer4bit):
    """y = (x W^T + b) * l (``feedforward`` False) or (x * l) W^T + b (True), W frozen 4-bit, l the product of the
    active adapters' vectors. Attributes: ``base``, ``adapters`` (name -> parameter ``ia3_l``), ``feedforward``,
    ``active_adapters``, ``disable_adapters``."""

    def __init__(self, base: Linear4bit, feedforward: bool, adapter_name: str = "default", init_ones: bool = True):
        super().__init__(base)
        self.feedforward = feedforward
        self.adapters = nn.ParameterDict()
        self.init_ones: dict[str, bool] = {}
        self.add_adapter(adapter_name, init_ones)

    def add_adapter(self, name: str, init_ones: bool = True, activate: bool = True) -> nn.Parameter:
        """A vector of ones (the layer unchanged; ``init_ones`` False: N(0, 1), peft's test init)."""
        shape = (1, self.in_features) if self.feedforward else (self.out_features, 1)
        self.register_adapter(name, nn.Parameter(torch.empty(shape, device=self.base.weight.device)), activate)
        self.init_ones[name] = init_ones
        self.reset_adapter(name)
        return self.adapters[name]

    @torch.no_grad()
    def reset_adapter(self, name: str) -> None:
        """Adapter ``name``'s initial vector, as ``add_adapter`` made it."""
        if self.init_ones[name]:
            self.adapters[name].fill_(1.0)
        else:
            self.adapters[name].normal_()

    def scale(self) -> torch.Tensor | None:
        """The product of the active adapters' vectors, flat, or None (no active adapter, or disabled)."""
        names = self.active_names()
        if not names:
            return None
        scale = self.adapters[names[0]].reshape(-1)
        for name in names[1:]:
            scale = scale * self.adapters[name].reshape(-1)
        return scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.check_input(x)
        merged = self.merged_forward(x, dtype)
        if merged is not None:
            return merged
        scale = self.scale()
        if scale is None:
            return self.base(x)
        xc = x if x.dtype == dtype else x.to(dtype)
        y = ia3_linear(
            xc,
            scale,
            self.base.bias,
            self.base.op_weight_args(),
            self.out_features,
            self.feedforward,
            self.base.block_scales(),
        )
        return y.to(x.dtype)

    @torch.no_grad()
    def merged_dense(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor | None]:
        """W and b with the active scaling applied, from one fp32 dequantization, in ``dtype``."""
        weight = self.base.dequantized_weight(torch.float32)
        bias = self.base.bias.float() if self.base.bias is not None else None
        scale = self.scale()
        if scale is not None:
            scale = scale.float()
            if self.feedforward:
                weight = weight * scale[None, :]
            else:
                weight = weight * scale[:, None]
                bias = bias * scale if bias is not None else None
        return weight.to(dtype), None if bias is None else bias.to(dtype)

    def extra_repr(self) -> str:
        return f"feedforward={self.feedforward}, {super().extra_repr()}"
