"""What modules holding named adapters share. ``NamedAdapters``: the registry (``adapters``, created by the
subclass), the active ones, a disabled mode (bottleneck adapter sets). ``AdapterLayer4bit``: a linear layer around
a frozen 4-bit ``base`` (LoRA, IA3, sparse deltas, masks): the base frozen, the input checked, merging into a dense
weight built by the subclass's ``merged_dense``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .. import functional as F
from ..files import check_adapter_name
from .linear4bit import Linear4bit, autocast_as_linear, dense_layer


class NamedAdapters(nn.Module):
    """Named adapters, the ``active_adapters`` (at most ``max_active``), ``disable_adapters``."""

    max_active: int | None = None
    adapter_type: type | None = None  # what register_adapter accepts (None: any module or parameter)

    def __init__(self):
        super().__init__()
        self.active_adapters: list[str] = []
        self.disable_adapters = False

    def _require_unmerged(self, what: str) -> None:
        """A subclass that merges refuses adapter changes while merged."""

    def check_new_adapter(self, name: str) -> None:
        """``name`` is valid and free, and the layer can take an adapter (not merged)."""
        check_adapter_name(name)
        if name in self.adapters:
            raise ValueError(f"qpeft: adapter {name!r} already exists")
        self._require_unmerged("add an adapter")

    def register_adapter(self, name: str, adapter, activate: bool = True) -> None:
        """Adds ``adapter`` (a module or parameter) under ``name`` and, by default, activates it alone."""
        self.check_new_adapter(name)
        if self.adapter_type is not None and not isinstance(adapter, self.adapter_type):
            raise TypeError(
                f"qpeft: a {type(self).__name__} adapter is a {self.adapter_type.__name__}, "
                f"got {type(adapter).__name__}"
            )
        self.adapters[name] = adapter
        if activate:
            self.set_adapter(name)

    def check_active(self, names: Sequence[str]) -> None:
        """``names`` can be made the active adapters (``set_adapter``); raises otherwise, changing nothing."""
        if self.max_active is not None and len(names) > self.max_active:
            raise ValueError(f"qpeft: at most {self.max_active} {type(self).__name__} adapter(s) active at a time")
        for name in names:
            if name not in self.adapters:
                raise KeyError(f"qpeft: no adapter named {name!r} (have {list(self.adapters)})")
        self._require_unmerged("change the active adapters")

    def set_adapter(self, names: str | Sequence[str]) -> None:
        """Makes ``names`` (one or several) the active adapters."""
        names = [names] if isinstance(names, str) else list(names)
        self.check_active(names)
        self.active_adapters = names

    def delete_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise KeyError(f"qpeft: no adapter named {name!r} (have {list(self.adapters)})")
        self._require_unmerged("delete an adapter")
        del self.adapters[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the context the module is its base alone (also while merged: the merge is kept for after)."""
        previous, self.disable_adapters = self.disable_adapters, True
        try:
            yield
        finally:
            self.disable_adapters = previous

    def active_names(self) -> list[str]:
        return [] if self.disable_adapters else self.active_adapters

    def extra_repr(self) -> str:
        return f"active_adapters={self.active_adapters}, disable_adapters={self.disable_adapters}"


class AdapterLayer4bit(NamedAdapters):
    """A linear layer of named adapters around the frozen 4-bit ``base`` (its child ``BASE_CHILD``: what a 4-bit
    checkpoint saves of the layer); merging into a dense weight (the base is never requantized)."""

    BASE_CHILD = "base"

    def __init_subclass__(cls, **kwargs):  # every adapter layer's forward under autocast: as nn.Linear's
        super().__init_subclass__(**kwargs)
        if "forward" in cls.__dict__:
            cls.forward = autocast_as_linear(cls.forward)

    def __init__(self, base: Linear4bit):
        super().__init__()
        if not isinstance(base, Linear4bit):
            raise TypeError(f"qpeft: {type(self).__name__} wraps a qpeft Linear4bit, got {type(base).__name__}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.merged_weight: torch.Tensor | None = None  # set by merge(): the dense merged layer
        self.merged_bias: torch.Tensor | None = None

    def check_input(self, x: torch.Tensor) -> torch.dtype:
        """``x`` fits the layer (a floating tensor on the base's device, last dimension in_features); returns the
        compute dtype (the base's, else x's)."""
        F.check_layer_input(x, self.in_features, type(self).__name__, self.base.weight.device)
        return self.base.compute_dtype or x.dtype

    @property
    def weight(self) -> torch.Tensor:
        """The base's (packed 4-bit) weight, as peft's layers expose their base layer's: code that reads a linear
        layer's ``weight`` (its device, dtype or shape) sees the 4-bit layer's."""
        return self.base.weight

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def merged_dense(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def merge(self, dtype: torch.dtype | None = None) -> None:
        """Serve from one dense merged weight (inference); ``dtype`` defaults to the base weight's dtype."""
        self.merged_weight, self.merged_bias = self.merged_dense(dtype or self.base.weight_dtype)

    def unmerge(self) -> None:
        """Back to 4-bit base + adapters (exactly the unmerged layer: the base was never modified)."""
        self.merged_weight = self.merged_bias = None

    @property
    def merged(self) -> bool:
        return self.merged_weight is not None

    def _require_unmerged(self, what: str) -> None:
        if self.merged_weight is not None:
            raise RuntimeError(f"qpeft: unmerge() before you {what}")

    def merged_forward(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """The merged layer's output for ``x`` (computed in ``dtype``), or None when not merged or disabled."""
        if self.merged_weight is None or self.disable_adapters:
            return None
        if self.training and torch.is_grad_enabled():
            raise RuntimeError("qpeft: the adapters are merged; call unmerge() before training")
        bias = self.merged_bias.to(dtype) if self.merged_bias is not None else None
        return torch.nn.functional.linear(x.to(dtype), self.merged_weight.to(dtype), bias).to(x.dtype)

    @torch.no_grad()
    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Module:
        """An nn.Linear with the merged weight and bias (peft's merge_and_unload for this layer); a Conv1D when the
        base was quantized from one."""
        W, bias = self.merged_dense(dtype or self.base.weight_dtype)
        return dense_layer(W, bias, self.base.fan_in_fan_out)


class SingleAdapterLinear4bit(AdapterLayer4bit):
    """A frozen 4-bit ``base`` with named adapter modules, one active at a time (sparse deltas, learned masks).
    Subclasses give ``adapted(x2, adapter)`` (x2 [M, in] in the compute dtype -> x2 W'^T [M, out], no bias) and
    ``adapted_weight(W, adapter)`` (W' from the fp32 dequantized W), and may say an adapter is empty (``idle``)."""

    max_active = 1

    def __init__(self, base: Linear4bit):
        super().__init__(base)
        self.adapters = nn.ModuleDict()

    def active(self) -> nn.Module | None:
        names = self.active_names()
        return self.adapters[names[0]] if names else None

    def idle(self, adapter: nn.Module) -> bool:
        return False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.check_input(x)
        merged = self.merged_forward(x, dtype)
        if merged is not None:
            return merged
        adapter = self.active()
        if adapter is None or self.idle(adapter):
            return self.base(x)
        y = self.adapted(F.as_rows(x.to(dtype)), adapter).reshape(*x.shape[:-1], self.out_features)
        if self.base.bias is not None:
            y = y + self.base.bias.to(dtype)
        return y.to(x.dtype)

    @torch.no_grad()
    def merged_dense(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor | None]:
        W = self.base.dequantized_weight(torch.float32)
        adapter = self.active()
        if adapter is not None:
            W = self.adapted_weight(W, adapter)
        bias = self.base.bias
        return W.to(dtype), None if bias is None else bias.to(dtype)
