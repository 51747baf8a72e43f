"""``IA3Linear4bit``: a frozen 4-bit linear layer whose output rows (attention targets) or input columns
(feed-forward targets) are scaled by learned vectors, peft's IA3 (``ia3_l``: [out, 1] or [1, in]); the active
adapters' vectors multiply, as in peft. Runs inside the 4-bit matmul (qpeft.ia3_autograd); merges into an exact
dense weight."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .. import functional as F
from ..files import check_adapter_name
from ..ia3_autograd import ia3_linear
from .linear4bit import Linear4bit, dense_layer


class IA3Linear4bit(nn.Module):
    """y = (x W^T + b) * l (``feedforward`` False) or (x * l) W^T + b (True), W frozen 4-bit, l the product of the
    active adapters' vectors. Attributes: ``base``, ``adapters`` (name -> parameter ``ia3_l``), ``feedforward``,
    ``active_adapters``, ``disable_adapters``."""

    def __init__(self, base: Linear4bit, feedforward: bool, adapter_name: str = "default", init_ones: bool = True):
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.feedforward = feedforward
        self.adapters = nn.ParameterDict()
        self.active_adapters: list[str] = []
        self.disable_adapters = False
        self.merged_weight: torch.Tensor | None = None
        self.merged_bias: torch.Tensor | None = None
        self.add_adapter(adapter_name, init_ones)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    # ---- adapters -----------------------------------------------------------------------------------------
    def add_adapter(self, name: str, init_ones: bool = True, activate: bool = True) -> nn.Parameter:
        """A vector of ones (the layer unchanged; ``init_ones`` False: N(0, 1), peft's test init)."""
        check_adapter_name(name)
        if name in self.adapters:
            raise ValueError(f"qpeft: adapter {name!r} already exists")
        self._require_unmerged("add an adapter")
        shape = (1, self.in_features) if self.feedforward else (self.out_features, 1)
        device = self.base.weight.device
        init = torch.ones(shape, device=device) if init_ones else torch.randn(shape, device=device)
        self.adapters[name] = nn.Parameter(init)
        if activate:
            self.set_adapter(name)
        return self.adapters[name]

    def set_adapter(self, names: str | Sequence[str]) -> None:
        names = [names] if isinstance(names, str) else list(names)
        for name in names:
            if name not in self.adapters:
                raise KeyError(f"qpeft: no adapter named {name!r} (have {list(self.adapters)})")
        self._require_unmerged("change the active adapters")
        self.active_adapters = names

    def delete_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise KeyError(f"qpeft: no adapter named {name!r} (have {list(self.adapters)})")
        self._require_unmerged("delete an adapter")
        del self.adapters[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        previous, self.disable_adapters = self.disable_adapters, True
        try:
            yield
        finally:
            self.disable_adapters = previous

    def scale(self) -> torch.Tensor | None:
        """The product of the active adapters' vectors, flat, or None (no active adapter, or disabled)."""
        if self.disable_adapters or not self.active_adapters:
            return None
        scale = self.adapters[self.active_adapters[0]].reshape(-1)
        for name in self.active_adapters[1:]:
            scale = scale * self.adapters[name].reshape(-1)
        return scale

    # ---- forward ------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        F.check_layer_input(x, self.in_features, "IA3Linear4bit")
        if x.device != self.base.weight.device:
            raise ValueError(f"qpeft: input is on {x.device} but the layer's weight is on {self.base.weight.device}")
        dtype = self.base.compute_dtype or x.dtype
        xc = x if x.dtype == dtype else x.to(dtype)
        scale = self.scale()
        if self.merged_weight is not None and scale is not None:
            if self.training and torch.is_grad_enabled():
                raise RuntimeError("qpeft: the adapters are merged; call unmerge() before training")
            bias = self.merged_bias.to(dtype) if self.merged_bias is not None else None
            return torch.nn.functional.linear(xc, self.merged_weight.to(dtype), bias).to(x.dtype)
        if scale is None:
            return self.base(x)
        y = ia3_linear(xc, scale, self.base.bias, self.base.op_weight_args(), self.out_features, self.feedforward,
                       self.base.block_scales())
        return y.to(x.dtype)

    # ---- merging (into a dense weight: the 4-bit base is never requantized) --------------------------------
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

    def merge(self, dtype: torch.dtype | None = None) -> None:
        self.merged_weight, self.merged_bias = self.merged_dense(dtype or self.base.weight_dtype)

    def unmerge(self) -> None:
        self.merged_weight = self.merged_bias = None

    @property
    def merged(self) -> bool:
        return self.merged_weight is not None

    def _require_unmerged(self, what: str) -> None:
        if self.merged_weight is not None:
            raise RuntimeError(f"qpeft: unmerge() before you {what}")

    @torch.no_grad()
    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Module:
        W, bias = self.merged_dense(dtype or self.base.weight_dtype)
        return dense_layer(W, bias, self.base.fan_in_fan_out)

    def extra_repr(self) -> str:
        return (f"feedforward={self.feedforward}, active_adapters={self.active_adapters}, "
                f"disable_adapters={self.disable_adapters}")
