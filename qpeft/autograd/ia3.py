"""Autograd of the IA3 layer: a learned vector scales the frozen 4-bit matmul's output rows or its input columns.

* Output scaling (attention targets): y = (x W^T + b) * l. When no quantization block straddles two rows (in_features
  a multiple of the blocksize) l goes into W's block scales: the input gradient dy diag(l) W, and the forward
  where l needs no gradient, run from the unchanged codes; otherwise the scaling is an elementwise pass. Where l
  needs a gradient the forward keeps the base output x W^T + b [M, N] for dl = sum_rows(dy * (x W^T + b)), as
  peft does (recomputing it would cost one more 4-bit matmul), and not x.
* Input scaling (feed-forward targets): y = (x * l) W^T + b. Saves x (as peft does); dx = g * l and
  dl = sum_rows(x * g) both come from g = dy W, the one input-gradient matmul.
"""

from __future__ import annotations

import torch

from .. import functional as F
from .base import base_grad_input, base_matmul


def scaled_rows_args(wargs: tuple, shape: tuple[int, int], scale: torch.Tensor, scales: torch.Tensor) -> tuple | None:
    """weight_args of diag(scale) W: W's fp32 block ``scales`` times the scale of each block's row (not nested), or
    None where a block straddles two rows."""
    n, k = shape
    if k % wargs.blocksize:
        return None
    absmax = (scales.reshape(n, k // wargs.blocksize) * scale.detach().float().reshape(n, 1)).reshape(-1)
    return wargs._replace(absmax=absmax, nested_absmax=None, nested_code=None, nested_offset=None)


def _forward(x2, scale, bias, wargs, scaled_args, n, feedforward, keep_base):
    """(y [M, n], the base output x W^T + b where ``keep_base`` asks for it and output scaling needs it)."""
    s = scale.reshape(-1).to(x2.dtype)
    if feedforward:
        y = base_matmul(x2 * s, wargs, n)
        return (y if bias is None else y + bias.to(y.dtype)), None
    if keep_base or scaled_args is None:
        base = base_matmul(x2, wargs, n)
        if bias is not None:
            base = base + bias.to(base.dtype)
        return base * s, base if keep_base else None
    y = base_matmul(x2, scaled_args, n)
    return (y if bias is None else y + bias.to(y.dtype) * s), None


class _IA3Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, bias, wargs, scaled_args, n, feedforward):
        y, base = _forward(
            F.as_rows(x), scale, bias, wargs, scaled_args, n, feedforward, keep_base=ctx.needs_input_grad[1]
        )
        ctx.save_for_backward(x if feedforward else base, scale, bias)
        ctx.meta = (wargs, scaled_args, n, feedforward, x.shape)
        return y  # [M, n]: the caller reshapes (no view leaves a Function)

    @staticmethod
    def backward(ctx, dy):
        kept, scale, bias = ctx.saved_tensors
        wargs, scaled_args, n, feedforward, x_shape = ctx.meta
        dy2 = F.as_rows(dy).contiguous()
        k = x_shape[-1]
        s = scale.reshape(-1).to(dy2.dtype)
        dx = dscale = dbias = None
        if feedforward:
            g = base_grad_input(dy2, wargs, k)
            if ctx.needs_input_grad[0]:
                dx = g * s
            if ctx.needs_input_grad[1]:
                dscale = (g.float() * F.as_rows(kept).float()).sum(0)
            if bias is not None and ctx.needs_input_grad[2]:
                dbias = dy2.float().sum(0).to(bias.dtype)
        else:
            if ctx.needs_input_grad[0]:
                dx = (
                    base_grad_input(dy2, scaled_args, k)
                    if scaled_args is not None
                    else base_grad_input((dy2 * s).contiguous(), wargs, k)
                )
            if ctx.needs_input_grad[1]:
                dscale = (dy2.float() * kept.float()).sum(0)
            if bias is not None and ctx.needs_input_grad[2]:
                dbias = (dy2.float() * s.float()).sum(0).to(bias.dtype)
        if dx is not None:
            dx = dx.reshape(x_shape)
        if dscale is not None:
            dscale = dscale.reshape(scale.shape).to(scale.dtype)
        return dx, dscale, dbias, None, None, None, None


def ia3_linear(
    x: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    wargs: tuple,
    n: int,
    feedforward: bool,
    scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """IA3 over the frozen 4-bit W [n, K] (weight_args ``wargs``): (x * scale) W^T + b when ``feedforward``, else
    (x W^T + b) * scale; ``scale`` [K] or [n] (any shape of that size), in x's dtype. ``scales``: W's fp32 block
    scales, to scale W's rows inside the matmul."""
    scaled = None
    if not feedforward and scales is not None:
        scaled = scaled_rows_args(wargs, (n, x.shape[-1]), scale, scales)
    tracked = x.requires_grad or scale.requires_grad or (bias is not None and bias.requires_grad)
    if not (tracked and torch.is_grad_enabled()):  # no autograd node: output scaling inside the matmul
        y, _ = _forward(F.as_rows(x), scale, bias, wargs, scaled, n, feedforward, keep_base=False)
        return y.reshape(*x.shape[:-1], n)
    return _IA3Linear.apply(x, scale, bias, wargs, scaled, n, feedforward).reshape(*x.shape[:-1], n)
