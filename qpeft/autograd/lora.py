"""Autograd of the LoRA layers over qpeft's ops, saving only what the memory contract allows.

Inputs [..., K] are flattened to rows [M, K]; dropout counters are the row-major indices of that [M, K] input,
drawn from a seed tensor (int64, one element, on the input's device or the CPU) so nothing random is ever stored.

* qlora_linear (one adapter, plain LoRA): the fused ``qpeft::qlora_forward`` / ``qlora_backward`` ops.
  Saved for backward: x (alive anyway for the caller) and xa = drop(x) A^T [M, r]; W stays 4-bit.
* lora_branch (one of several adapters on one base): s * drop(x) A^T B^T with lora_down and its gradients
  (dropout inside the kernels); saves x and xa.
* dora_linear (one DoRA adapter): saves x, xa and the [N] magnitude ratio; backward recomputes the base term
  it needs for the magnitude gradient (one extra base matmul) instead of keeping an M x N activation.
"""

from __future__ import annotations

import torch

from .. import functional as F
from .._ops import ops
from ..formats import lora_branch_dtype
from ..quantized import Quantized4bitWeight
from .base import base_grad_input, base_matmul, save_weight, saved_weight, weight_args

# ---- one plain LoRA adapter: the fused ops ---------------------------------------------------------------------

# Autograd of qpeft::qlora_forward is registered in C++ (csrc/ops/qlora_ops.cpp): the backward is the
# qlora_backward op, and dbias = sum of dy over rows when the bias needs a gradient.


def qlora_linear(
    x: torch.Tensor,
    weight: Quantized4bitWeight | tuple,
    A: torch.Tensor,
    B: torch.Tensor,
    bias: torch.Tensor | None,
    scaling: float,
    p: float,
    seed: torch.Tensor,
) -> torch.Tensor:
    """x W^T + s * drop(x) A^T B^T + bias for x [..., K] in x's dtype, through the fused ops; ``bias`` [N] is the
    layer's total bias (base + s * lora_bias, differentiable), ``seed`` an int64 [1] tensor on x's device or the CPU.
    ``weight`` may also be its weight_args tuple already (Linear4bit.op_weight_args: the per-call fast path)."""
    wargs = weight if isinstance(weight, tuple) else weight_args(weight)
    if x.dim() == 2:  # (the reshapes cost host time on every call)
        return ops.qlora_forward(x, *wargs, A, B, bias, float(scaling), float(p), seed)[0]
    y, _ = ops.qlora_forward(F.as_rows(x), *wargs, A, B, bias, float(scaling), float(p), seed)
    return y.reshape(*x.shape[:-1], B.shape[0])


# ---- one of several adapters: the LoRA branch alone ----------------------------------------------------------


def branch_down(x2: torch.Tensor, A: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    """xa = drop(x) A^T [M, r] in formats.lora_branch_dtype (qlora_forward's rule)."""
    return ops.lora_down(x2.to(lora_branch_dtype(x2.dtype)), A, p, seed)


class _LoraBranch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, A, B, scaling, p, seed):
        x2 = F.as_rows(x)
        xa = branch_down(x2, A, p, seed)  # [M, r]: the only activation this branch adds
        ctx.save_for_backward(x2, xa, A, B, seed)
        ctx.scaling, ctx.p, ctx.x_shape = scaling, p, x.shape
        # [M, N] in x's dtype: the caller reshapes (no view leaves a Function)
        return ((xa @ B.to(xa.dtype).T) * scaling).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x2, xa, A, B, seed = ctx.saved_tensors
        dy2 = F.as_rows(dy)
        dA, dB, dx = _lora_branch_grads(ctx, dy2, x2, xa, A, B, ctx.scaling, ctx.p, seed, dx_base=None)
        return (None if dx is None else dx.reshape(ctx.x_shape)), dA, dB, None, None, None


def _lora_branch_grads(ctx, dl, x2, xa, A, B, scaling, p, seed, dx_base):
    """Gradients of s * drop(x) A^T B^T for the upstream gradient dl [M, N]: (dA, dB, dx) with dx = dx_base +
    drop(s dl B A) (a new tensor when dx_base is None), each None where not needed."""
    g = (dl @ B.to(dl.dtype)).float() * scaling  # [M, r]
    dlx = dl if xa.dtype == dl.dtype else dl.to(xa.dtype)
    dB = ((dlx.T @ xa).float() * scaling).to(B.dtype) if ctx.needs_input_grad[2] else None
    dA = ops.lora_down_grad_weight(g, x2, p, seed).to(A.dtype) if ctx.needs_input_grad[1] else None
    dx = dx_base
    if ctx.needs_input_grad[0]:
        if dx is None:
            dx = ops.lora_down_grad_input(g, A, p, seed, x2.dtype)
        else:
            dx = dx.contiguous()
            ops.lora_down_grad_input_(dx, g, A, p, seed)
    return dA, dB, dx


def lora_branch(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, p: float, seed: torch.Tensor
) -> torch.Tensor:
    """s * drop(x) A^T B^T for x [..., K], A [r, K], B [N, r], in x's dtype (A, B cast for the matmuls; their
    gradients come back in their own dtype). Dropout p from the int64 [1] ``seed`` tensor on x's device."""
    return _LoraBranch.apply(x, A, B, float(scaling), float(p), seed).reshape(*x.shape[:-1], B.shape[0])


# ---- one DoRA adapter -----------------------------------------------------------------------------------------


class _DoraLinear(torch.autograd.Function):
    """y = base + (ratio - 1) * base_d + ratio * s * (xa B^T + lora_bias) + bias, with base = x W^T, base_d =
    drop(x) W^T (= base without dropout; peft's DoRA takes the base term from the dropped input) and ratio =
    m / ||W + s B A||_row computed by the caller (its gradient flows to m there)."""

    @staticmethod
    def forward(ctx, x, A, B, ratio, lora_bias, bias, branch, wargs, n):
        scaling, p, seed = branch
        x2 = F.as_rows(x)
        base = base_matmul(x2, wargs, n)
        xa = branch_down(x2, A, p, seed)
        r = ratio.to(x.dtype)
        base_d = base_matmul(ops.lora_dropout(x2, p, seed, 0), wargs, n) if p > 0 else base
        y = base + (r - 1) * base_d + r * _lora_term(xa, B, lora_bias, scaling, x.dtype)
        if bias is not None:
            y = y + bias.to(x.dtype)
        save_weight(ctx, wargs, x2, xa, A, B, ratio, lora_bias, seed)
        ctx.meta = (n, scaling, p, x.shape)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y  # [M, n]: the caller reshapes (no view leaves a Function)

    @staticmethod
    def backward(ctx, dy):
        (x2, xa, A, B, ratio, lora_bias, seed), wargs = saved_weight(ctx)
        n, s, p, x_shape = ctx.meta
        k = x2.shape[1]
        dy2 = F.as_rows(dy)
        r = ratio.to(dy.dtype)
        dl = dy2 * r  # upstream gradient of the LoRA term
        d_ratio = None
        if ctx.needs_input_grad[3]:  # recompute base_d + lora (transient M x N) instead of having saved it
            dropped = ops.lora_dropout(x2, p, seed, 0) if p > 0 else x2
            term = base_matmul(dropped, wargs, n).float() + _lora_term(xa, B, lora_bias, s, torch.float32)
            d_ratio = (dy2.float() * term).sum(0).to(ratio.dtype)
        dx_base = None
        if ctx.needs_input_grad[0]:
            if p > 0:
                dx_base = base_grad_input(dy2, wargs, k) + ops.lora_dropout(
                    base_grad_input((dy2 * (r - 1)).contiguous(), wargs, k), p, seed, 0
                )
            else:
                dx_base = base_grad_input(dl.contiguous(), wargs, k)
        dA, dB, dx = _lora_branch_grads(ctx, dl, x2, xa, A, B, s, p, seed, dx_base)
        d_lora_bias = (dl.sum(0).float() * s).to(lora_bias.dtype) if ctx.needs_input_grad[4] else None
        d_bias = dy2.sum(0).to(ctx.bias_dtype) if ctx.needs_input_grad[5] else None
        return ((None if dx is None else dx.reshape(x_shape)), dA, dB, d_ratio, d_lora_bias, d_bias) + (None,) * 3


def _lora_term(xa, B, lora_bias, scaling, dtype):
    """s * (xa B^T + lora_bias), computed in xa's dtype, in ``dtype``."""
    out = xa @ B.to(xa.dtype).T
    if lora_bias is not None:
        out = out + lora_bias.to(xa.dtype)
    return (out * scaling).to(dtype)


def dora_linear(
    x: torch.Tensor,
    weight: Quantized4bitWeight,
    A: torch.Tensor,
    B: torch.Tensor,
    ratio: torch.Tensor,
    lora_bias: torch.Tensor | None,
    bias: torch.Tensor | None,
    scaling: float,
    p: float,
    seed: torch.Tensor,
) -> torch.Tensor:
    """One DoRA adapter on the frozen 4-bit base (see _DoraLinear), in x's dtype."""
    n = weight.shape[0]
    y = _DoraLinear.apply(x, A, B, ratio, lora_bias, bias, (float(scaling), float(p), seed), weight_args(weight), n)
    return y.reshape(*x.shape[:-1], n)
