"""What the 4-bit layers with one active adapter at a time share (sparse deltas, learned masks): the named-adapter
registry, disabling, and merging into a dense weight from ``merged_dense``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ..files import check_adapter_name
from .linear4bit import Linear4bit, dense_layer


class SingleAdapterLinear4bit(nn.Module):
    """A frozen 4-bit ``base`` and named adapters (``adapters``: name -> module), one active at a time. Subclasses
    define ``forward`` and ``merged_dense(dtype)``."""

    def __init__(self, base: Linear4bit):
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.adapters = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disable_adapters = False
        self.merged_weight: torch.Tensor | None = None
        self.merged_bias: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def add_adapter(self, name: str, adapter: nn.Module, activate: bool = True) -> None:
        check_adapter_name(name)
        if name in self.adapters:
            raise ValueError(f"qpeft: adapter {name!r} already exists")
        self._require_unmerged("add an adapter")
        self.adapters[name] = adapter
        if activate:
            self.set_adapter(name)

    def set_adapter(self, names: str | Sequence[str]) -> None:
        names = [names] if isinstance(names, str) else list(names)
        if len(names) > 1:
            raise ValueError(f"qpeft: one {type(self).__name__} adapter is active at a time")
        for name in names:
            if name not in self.adapters:
                raise KeyError(f"qpeft: no adapter named {name!r} (have {list(self.adapters)})")
        self._require_unmerged("change the active adapters")
        self.active_adapters = names

    def delete_adapter(self, name: str) -> None:
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

    def active(self) -> nn.Module | None:
        if self.disable_adapters or not self.active_adapters:
            return None
        return self.adapters[self.active_adapters[0]]

    def merged_dense(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

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

    def _merged_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The merged layer's output, or None when not merged (or disabled)."""
        if self.merged_weight is None or self.active() is None:
            return None
        if self.training and torch.is_grad_enabled():
            raise RuntimeError("qpeft: the adapters are merged; call unmerge() before training")
        dtype = self.base.compute_dtype or x.dtype
        bias = self.merged_bias.to(dtype) if self.merged_bias is not None else None
        return torch.nn.functional.linear(x.to(dtype), self.merged_weight.to(dtype), bias).to(x.dtype)

    @torch.no_grad()
    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Module:
        W, bias = self.merged_dense(dtype or self.base.weight_dtype)
        return dense_layer(W, bias, self.base.fan_in_fan_out)

    def extra_repr(self) -> str:
        return f"active_adapters={self.active_adapters}, disable_adapters={self.disable_adapters}"
