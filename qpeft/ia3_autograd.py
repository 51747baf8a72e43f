"""Autograd of the IA3 layer: a learned vector scales the frozen 4-bit matmul's output rows or its input columns.

* Output scaling (attention targets): y = (x W^T + b) * l. When no quantization block straddles two rows (in_features
  a multiple of the blocksize) l goes into W's block scales: x (diag(l) W)^T from the unchanged codes, and the input
  gradient dy diag(l) W the same way; otherwise y * l after the matmul. Saves x; the backward recomputes x W^T for
  dl (one more 4-bit matmul) instead of keeping the M x N base output that peft keeps.
* Input scaling (feed-forward targets): y = (x * l) W^T + b. Saves x (as peft does); dx = g * l and
  dl = sum_rows(x * g) both come from g = dy W, the one input-gradient matmul.
"""

from __future__ import annotations

import torch

from . import functional as F
from .lora_autograd import _base_forward, _base_grad_input


def scaled_rows_args(wargs: tuple, shape: tuple[int, int], scale: torch.Tensor, scales: torch.Tensor) -> tuple | None:
    """weight_args of diag(scale) W: W's fp32 block ``scales`` times the scale of each block's row (not nested), or
    None where a block straddles two rows."""
    n, k = shape
    blocksize = wargs[5]
    if k % blocksize:
        return None
    absmax = (scales.reshape(n, k // blocksize) * scale.detach().float().reshape(n, 1)).reshape(-1)
    return (wargs[0], absmax, None, None, None, blocksize, wargs[6])


class _IA3Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, bias, wargs, scaled_args, n, feedforward):
        x2 = F.as_rows(x)
        s = scale.reshape(-1).to(x2.dtype)
        if feedforward:
            y = _base_forward(x2 * s, wargs, n)
            if bias is not None:
                y = y + bias.to(y.dtype)
        else:
            y = _base_forward(x2, scaled_args, n) if scaled_args is not None else _base_forward(x2, wargs, n) * s
            if bias is not None:
                y = y + bias.to(y.dtype) * s
        ctx.save_for_backward(x, scale, bias)
        ctx.meta = (wargs, scaled_args, n, feedforward)
        return y.reshape(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, dy):
        x, scale, bias = ctx.saved_tensors
        wargs, scaled_args, n, feedforward = ctx.meta
        x2, dy2 = F.as_rows(x), F.as_rows(dy).contiguous()
        k = x2.shape[1]
        s = scale.reshape(-1).to(dy2.dtype)
        dx = dscale = dbias = None
        if feedforward:
            g = _base_grad_input(dy2, wargs, k)
            if ctx.needs_input_grad[0]:
                dx = g * s
            if ctx.needs_input_grad[1]:
                dscale = (g.float() * x2.float()).sum(0)
            if bias is not None and ctx.needs_input_grad[2]:
                dbias = dy2.float().sum(0).to(bias.dtype)
        else:
            if ctx.needs_input_grad[0]:
                dx = (_base_grad_input(dy2, scaled_args, k) if scaled_args is not None else
                      _base_grad_input((dy2 * s).contiguous(), wargs, k))
            if ctx.needs_input_grad[1]:
                base = _base_forward(x2, wargs, n).float()
                if bias is not None:
                    base = base + bias.float()
                dscale = (dy2.float() * base).sum(0)
            if bias is not None and ctx.needs_input_grad[2]:
                dbias = (dy2.float() * s.float()).sum(0).to(bias.dtype)
        if dx is not None:
            dx = dx.reshape(x.shape)
        if dscale is not None:
            dscale = dscale.reshape(scale.shape).to(scale.dtype)
        return dx, dscale, dbias, None, None, None, None


def ia3_linear(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, wargs: tuple, n: int,
               feedforward: bool, scales: torch.Tensor | None = None) -> torch.Tensor:
    """IA3 over the frozen 4-bit W [n, K] (weight_args ``wargs``): (x * scale) W^T + b when ``feedforward``, else
    (x W^T + b) * scale; ``scale`` [K] or [n] (any shape of that size), in x's dtype. ``scales``: W's fp32 block
    scales, to scale W's rows inside the matmul."""
    scaled = None
    if not feedforward and scales is not None:
        scaled = scaled_rows_args(wargs, (n, x.shape[-1]), scale, scales)
    return _IA3Linear.apply(x, scale, bias, wargs, scaled, n, feedforward)
