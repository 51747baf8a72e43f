"""Autograd of the QLoRA layer over qpeft's ops, saving only what the memory contract allows.

Inputs [..., K] are flattened to rows [M, K]; dropout counters are the row-major indices of that [M, K] input,
drawn from a seed tensor (int64, one element, on the input's device or the CPU) so nothing random is ever stored.

* qlora_linear (one adapter, plain LoRA): the fused ``qpeft::qlora_forward`` / ``qlora_backward`` ops.
  Saved for backward: x (alive anyway for the caller) and xa = drop(x) A^T [M, r]; W stays 4-bit.
* frozen_4bit_linear (no adapter): x W^T; on the CPU the linear_4bit ops in both directions (a few rows: W read
  from its codes; more: W dequantized a slab at a time into a small buffer); on CUDA the linear_4bit kernel for a
  forward of at most 16 rows (decode), otherwise W dequantized into a transient tensor. Saves nothing but the
  4-bit weight.
* lora_branch (one of several adapters on one base): s * drop(x) A^T B^T with lora_down and its gradients
  (dropout inside the kernels); saves x and xa.
* dora_linear (one DoRA adapter): saves x, xa and the [N] magnitude ratio; backward recomputes the base term
  it needs for the magnitude gradient (one extra base matmul) instead of keeping an M x N activation.
"""

from __future__ import annotations

import torch

from . import functional as F
from ._ops import ops
from .quantized import Quantized4bitWeight

# ---- lora_dropout: backward is the same seeded dropout, so it saves nothing -----------------------------------

def _dropout_setup_context(ctx, inputs, output):
    _, ctx.p, _, ctx.offset = inputs
    ctx.save_for_backward(inputs[2])


def _dropout_backward(ctx, grad):
    (seed,) = ctx.saved_tensors
    return ops.lora_dropout(grad, ctx.p, seed, ctx.offset), None, None, None


torch.library.register_autograd("qpeft::lora_dropout", _dropout_backward, setup_context=_dropout_setup_context)


# ---- the frozen 4-bit base ------------------------------------------------------------------------------------

def weight_args(weight: Quantized4bitWeight) -> tuple:
    """(packed uint8, absmax, nested_absmax, nested_code, nested_offset [1] fp32, blocksize, quant_type): the
    4-bit weight as the ops take it."""
    packed = weight.packed if weight.packed.dtype == torch.uint8 else weight.packed.reshape(-1).view(torch.uint8)
    offset = None if weight.nested_offset is None else weight.nested_offset.reshape(1).to(torch.float32)
    return (packed, weight.absmax, weight.nested_absmax, weight.nested_code, offset, weight.blocksize,
            weight.quant_type)


CUDA_SMALL_M = 16  # rows up to which the CUDA linear_4bit kernel reads W once (kLinear4bitMaxM; as qlora_forward)


def _base_forward(x2: torch.Tensor, wargs: tuple, n: int) -> torch.Tensor:
    """x2 [M, K] @ W^T -> [M, n] in x2's dtype."""
    packed, absmax, na, nc, no, blocksize, quant_type = wargs
    if x2.device.type == "cpu" or (x2.device.type == "cuda" and 0 < x2.shape[0] <= CUDA_SMALL_M):
        return ops.linear_4bit(x2, packed, absmax, na, nc, no, blocksize, quant_type, n)
    return x2 @ _dequantize(wargs, (n, x2.shape[1]), x2.dtype).T


def _base_grad_input(dy2: torch.Tensor, wargs: tuple, k: int) -> torch.Tensor:
    """dy2 [M, N] @ W -> [M, k] in dy2's dtype."""
    packed, absmax, na, nc, no, blocksize, quant_type = wargs
    if dy2.device.type == "cpu":
        return ops.linear_4bit_grad_input(dy2, packed, absmax, na, nc, no, blocksize, quant_type, k)
    return dy2 @ _dequantize(wargs, (dy2.shape[1], k), dy2.dtype)


def _dequantize(wargs: tuple, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    packed, absmax, na, nc, no, blocksize, quant_type = wargs
    if na is not None:
        return ops.dequantize_4bit_nested(packed, absmax, na, nc, no, blocksize, quant_type, list(shape), dtype)
    return ops.dequantize_4bit(packed, absmax, blocksize, quant_type, list(shape), dtype)


class _Frozen4bitLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, n, packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, quant_type):
        wargs = (packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, quant_type)
        ctx.save_for_backward(packed, absmax, nested_absmax, nested_code, nested_offset)
        ctx.meta = (blocksize, quant_type, x.shape[-1])
        return _base_forward(F.as_rows(x), wargs, n).reshape(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, dy):
        blocksize, quant_type, k = ctx.meta
        wargs = (*ctx.saved_tensors, blocksize, quant_type)
        dy2 = F.as_rows(dy).contiguous()
        return (_base_grad_input(dy2, wargs, k).reshape(*dy.shape[:-1], k),) + (None,) * 8


def frozen_4bit_linear(x: torch.Tensor, weight: Quantized4bitWeight | tuple,
                       out_features: int | None = None) -> torch.Tensor:
    """x [..., K] @ W^T -> [..., N] in x's dtype, W the dequantized 4-bit weight [N, K] (frozen: no grad).
    ``weight`` may also be its weight_args tuple, with ``out_features`` (Linear4bit.op_weight_args: the per-call
    fast path). Where no gradient can flow to x the op runs without an autograd node."""
    wargs, n = (weight, out_features) if isinstance(weight, tuple) else (weight_args(weight), weight.shape[0])
    if not (x.requires_grad and torch.is_grad_enabled()):
        return _base_forward(F.as_rows(x), wargs, n).reshape(*x.shape[:-1], n)
    return _Frozen4bitLinear.apply(x, n, *wargs)


# ---- one plain LoRA adapter: the fused ops ---------------------------------------------------------------------

# Autograd of qpeft::qlora_forward is registered in C++ (csrc/ops/qlora_ops.cpp): the backward is the
# qlora_backward op, and dbias = sum of dy over rows when the bias needs a gradient.


def qlora_linear(x: torch.Tensor, weight: Quantized4bitWeight | tuple, A: torch.Tensor, B: torch.Tensor,
                 bias: torch.Tensor | None, scaling: float, p: float, seed: torch.Tensor) -> torch.Tensor:
    """x W^T + s * drop(x) A^T B^T + bias for x [..., K] in x's dtype, through the fused ops; ``bias`` [N] is the
    layer's total bias (base + s * lora_bias, differentiable), ``seed`` an int64 [1] tensor on x's device or the CPU.
    ``weight`` may also be its weight_args tuple already (Linear4bit.op_weight_args: the per-call fast path)."""
    wargs = weight if isinstance(weight, tuple) else weight_args(weight)
    if x.dim() == 2:  # (the reshapes cost host time on every call)
        return ops.qlora_forward(x, *wargs, A, B, bias, float(scaling), float(p), seed)[0]
    y, _ = ops.qlora_forward(F.as_rows(x), *wargs, A, B, bias, float(scaling), float(p), seed)
    return y.reshape(*x.shape[:-1], B.shape[0])


# ---- one of several adapters: the LoRA branch alone ----------------------------------------------------------

class _LoraBranch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, A, B, scaling, p, seed):
        x2 = F.as_rows(x)
        xa = ops.lora_down(x2, A, p, seed)  # [M, r]: the only activation this branch adds
        ctx.save_for_backward(x2, xa, A, B, seed)
        ctx.scaling, ctx.p, ctx.x_shape = scaling, p, x.shape
        return ((xa @ B.to(x.dtype).T) * scaling).reshape(*x.shape[:-1], B.shape[0])

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
    dB = ((dl.T @ xa.to(dl.dtype)).float() * scaling).to(B.dtype) if ctx.needs_input_grad[2] else None
    dA = ops.lora_down_grad_weight(g, x2, p, seed).to(A.dtype) if ctx.needs_input_grad[1] else None
    dx = dx_base
    if ctx.needs_input_grad[0]:
        if dx is None:
            dx = ops.lora_down_grad_input(g, A, p, seed, x2.dtype)
        else:
            dx = dx.contiguous()
            ops.lora_down_grad_input_(dx, g, A, p, seed)
    return dA, dB, dx


def lora_branch(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, p: float,
                seed: torch.Tensor) -> torch.Tensor:
    """s * drop(x) A^T B^T for x [..., K], A [r, K], B [N, r], in x's dtype (A, B cast for the matmuls; their
    gradients come back in their own dtype). Dropout p from the int64 [1] ``seed`` tensor on x's device."""
    return _LoraBranch.apply(x, A, B, float(scaling), float(p), seed)


# ---- one DoRA adapter -----------------------------------------------------------------------------------------

class _DoraLinear(torch.autograd.Function):
    """y = base + (ratio - 1) * base_d + ratio * s * (xa B^T + lora_bias) + bias, with base = x W^T, base_d =
    drop(x) W^T (= base without dropout; peft's DoRA takes the base term from the dropped input) and ratio =
    m / ||W + s B A||_row computed by the caller (its gradient flows to m there)."""

    @staticmethod
    def forward(ctx, x, A, B, ratio, lora_bias, bias, scaling, p, seed, n, packed, absmax, nested_absmax, nested_code,
                nested_offset, blocksize, quant_type):
        wargs = (packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, quant_type)
        x2 = F.as_rows(x)
        base = _base_forward(x2, wargs, n)
        xa = ops.lora_down(x2, A, p, seed)
        r = ratio.to(x.dtype)
        base_d = _base_forward(ops.lora_dropout(x2, p, seed, 0), wargs, n) if p > 0 else base
        y = base + (r - 1) * base_d + r * _lora_term(xa, B, lora_bias, scaling)
        if bias is not None:
            y = y + bias.to(x.dtype)
        ctx.save_for_backward(x2, xa, A, B, ratio, lora_bias, seed, packed, absmax, nested_absmax, nested_code,
                              nested_offset)
        ctx.meta = (n, scaling, p, x.shape, blocksize, quant_type)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.reshape(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, dy):
        x2, xa, A, B, ratio, lora_bias, seed, *weight_tensors = ctx.saved_tensors
        n, s, p, x_shape, blocksize, quant_type = ctx.meta
        wargs, k = (*weight_tensors, blocksize, quant_type), x2.shape[1]
        dy2 = F.as_rows(dy)
        r = ratio.to(dy.dtype)
        dl = dy2 * r  # upstream gradient of the LoRA term
        d_ratio = None
        if ctx.needs_input_grad[3]:  # recompute base_d + lora (transient M x N) instead of having saved it
            dropped = ops.lora_dropout(x2, p, seed, 0) if p > 0 else x2
            term = _base_forward(dropped, wargs, n).float() + _lora_term(xa, B, lora_bias, s).float()
            d_ratio = (dy2.float() * term).sum(0).to(ratio.dtype)
        dx_base = None
        if ctx.needs_input_grad[0]:
            if p > 0:
                dx_base = _base_grad_input(dy2, wargs, k) + ops.lora_dropout(
                    _base_grad_input((dy2 * (r - 1)).contiguous(), wargs, k), p, seed, 0)
            else:
                dx_base = _base_grad_input(dl.contiguous(), wargs, k)
        dA, dB, dx = _lora_branch_grads(ctx, dl, x2, xa, A, B, s, p, seed, dx_base)
        d_lora_bias = (dl.sum(0).float() * s).to(lora_bias.dtype) if ctx.needs_input_grad[4] else None
        d_bias = dy2.sum(0).to(ctx.bias_dtype) if ctx.needs_input_grad[5] else None
        return ((None if dx is None else dx.reshape(x_shape)), dA, dB, d_ratio, d_lora_bias, d_bias) + (None,) * 11


def _lora_term(xa, B, lora_bias, scaling):
    """s * (xa B^T + lora_bias) in xa's dtype."""
    out = xa @ B.to(xa.dtype).T
    if lora_bias is not None:
        out = out + lora_bias.to(xa.dtype)
    return out * scaling


def dora_linear(x: torch.Tensor, weight: Quantized4bitWeight, A: torch.Tensor, B: torch.Tensor, ratio: torch.Tensor,
                lora_bias: torch.Tensor | None, bias: torch.Tensor | None, scaling: float, p: float,
                seed: torch.Tensor) -> torch.Tensor:
    """One DoRA adapter on the frozen 4-bit base (see _DoraLinear), in x's dtype."""
    return _DoraLinear.apply(x, A, B, ratio, lora_bias, bias, float(scaling), float(p), seed, weight.shape[0],
                             *weight_args(weight))
