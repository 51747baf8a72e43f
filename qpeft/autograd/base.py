"""Autograd of the frozen 4-bit base, over qpeft's ops: x W^T and its input gradient dy W, W never dense beyond
one op call and never saved but as its 4-bit tensors (the layer keeps them anyway)."""

from __future__ import annotations

import torch

from .. import functional as F
from .._ops import ops
from ..formats import WEIGHT_FIELDS, WeightArgs
from ..functional import weight_args
from ..quantized import Quantized4bitWeight


def base_matmul(x2: torch.Tensor, wargs: tuple, n: int) -> torch.Tensor:
    """x2 [M, K] @ W^T -> [M, n] in x2's dtype (the linear_4bit op picks the path)."""
    return ops.linear_4bit(x2, *wargs, n)


def base_grad_input(dy2: torch.Tensor, wargs: tuple, k: int) -> torch.Tensor:
    """dy2 [M, N] @ W -> [M, k] in dy2's dtype."""
    return ops.linear_4bit_grad_input(dy2, *wargs, k)


def save_weight(ctx, wargs: WeightArgs, *tensors: torch.Tensor | None) -> None:
    """Saves ``tensors`` and the weight's tensors for backward (seen by saved-tensor hooks), its format on ctx."""
    ctx.save_for_backward(*tensors, *wargs.tensors())
    ctx.weight_format = wargs.format()


def saved_weight(ctx) -> tuple[tuple, WeightArgs]:
    """(the tensors, the WeightArgs) that ``save_weight`` saved."""
    saved = ctx.saved_tensors
    n = len(WEIGHT_FIELDS)
    return saved[:-n], WeightArgs.join(saved[-n:], ctx.weight_format)


class _Frozen4bitLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, wargs, n):
        save_weight(ctx, wargs)
        ctx.x_shape = x.shape
        return base_matmul(F.as_rows(x), wargs, n)  # [M, n]: the caller reshapes (no view leaves a Function)

    @staticmethod
    def backward(ctx, dy):
        dy2 = F.as_rows(dy).contiguous()
        _, wargs = saved_weight(ctx)
        return base_grad_input(dy2, wargs, ctx.x_shape[-1]).reshape(ctx.x_shape), None, None


def frozen_4bit_linear(
    x: torch.Tensor, weight: Quantized4bitWeight | tuple, out_features: int | None = None
) -> torch.Tensor:
    """x [..., K] @ W^T -> [..., N] in x's dtype, W the dequantized 4-bit weight [N, K] (frozen: no grad).
    ``weight`` may also be its weight_args tuple, with ``out_features`` (Linear4bit.op_weight_args: the per-call
    fast path). Where no gradient can flow to x the op runs without an autograd node."""
    wargs, n = (weight, out_features) if isinstance(weight, tuple) else (weight_args(weight), weight.shape[0])
    if not (x.requires_grad and torch.is_grad_enabled()):
        return base_matmul(F.as_rows(x), wargs, n).reshape(*x.shape[:-1], n)
    return _Frozen4bitLinear.apply(x, wargs, n).reshape(*x.shape[:-1], n)
