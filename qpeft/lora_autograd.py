"""Autograd for the QLoRA layer built from qpeft's ops, saving only what the memory contract allows.

* lora_dropout: its backward is the same seeded dropout applied to the gradient (the op is linear with a
  regenerated mask), so it saves nothing.
* frozen_4bit_linear(x, W4) = x W^T: for up to SMALL_M rows on the CPU, the fused linear_4bit kernel reads W
  once from its codes, forward and backward (dx = dy W); otherwise W is dequantized into a transient tensor in
  each. No dequantized weight outlives a call, and nothing is saved but the 4-bit weight itself.
* lora_branch(x, A, B, s, p, seed) = s * drop(x) A^T B^T: saves x (already alive for the base matmul) and
  xa = drop(x) A^T (M x r); backward regenerates drop(x) from (seed, offset) for dA.

Inputs [..., K] are flattened to rows; dropout counters follow the row-major order of the flattened input.
The fused CPU/CUDA kernels replace these compositions behind the same contract.
"""

from __future__ import annotations

import torch

from . import functional as F
from .quantized import Quantized4bitWeight

SMALL_M = 8  # rows up to which the CPU base matmul reads the 4-bit weight directly (measured crossover)


def _dropout_setup_context(ctx, inputs, output):
    _, ctx.p, ctx.seed, ctx.offset = inputs


def _dropout_backward(ctx, grad):
    return F.lora_dropout(grad, ctx.p, ctx.seed, ctx.offset), None, None, None


torch.library.register_autograd("qpeft::lora_dropout", _dropout_backward, setup_context=_dropout_setup_context)


class _Frozen4bitLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, quant_type, n, k):
        ctx.meta = (blocksize, quant_type, (n, k))
        ctx.save_for_backward(packed, absmax, nested_absmax, nested_code, nested_offset)
        if x.device.type == "cpu" and x.numel() // max(k, 1) <= SMALL_M:  # read W once from its codes
            return F.linear_4bit(x, packed, absmax, blocksize, quant_type, n, nested_absmax=nested_absmax,
                                 nested_code=nested_code, nested_offset=nested_offset)
        W = F.dequantize_4bit(packed, absmax, blocksize, quant_type, (n, k), x.dtype, nested_absmax=nested_absmax,
                              nested_code=nested_code, nested_offset=nested_offset)
        return x @ W.T

    @staticmethod
    def backward(ctx, dy):
        packed, absmax, nested_absmax, nested_code, nested_offset = ctx.saved_tensors
        blocksize, quant_type, shape = ctx.meta
        if dy.device.type == "cpu" and dy.numel() // max(shape[0], 1) <= SMALL_M:
            return (F.linear_4bit_grad_input(dy, packed, absmax, blocksize, quant_type, shape[1],
                                             nested_absmax=nested_absmax, nested_code=nested_code,
                                             nested_offset=nested_offset),) + (None,) * 9
        W = F.dequantize_4bit(packed, absmax, blocksize, quant_type, shape, dy.dtype, nested_absmax=nested_absmax,
                              nested_code=nested_code, nested_offset=nested_offset)
        return (dy @ W,) + (None,) * 9


def frozen_4bit_linear(x: torch.Tensor, weight: Quantized4bitWeight) -> torch.Tensor:
    """x [..., K] @ W^T -> [..., N] in x's dtype, W the dequantized 4-bit weight [N, K] (frozen: no grad)."""
    n, k = weight.shape
    return _Frozen4bitLinear.apply(x, weight.packed, weight.absmax, weight.nested_absmax, weight.nested_code,
                                   weight.nested_offset, weight.blocksize, weight.quant_type, n, k)


class _LoraBranch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, A, B, scaling, p, seed):
        x2 = x.reshape(-1, x.shape[-1])
        A_c, B_c = A.to(x.dtype), B.to(x.dtype)
        dropped = F.lora_dropout(x2, p, seed) if p > 0 else x2
        xa = dropped @ A_c.T  # [M, r]: the only activation this branch adds
        ctx.save_for_backward(x2, xa, A, B)
        ctx.scaling, ctx.p, ctx.seed, ctx.x_shape = scaling, p, seed, x.shape
        return ((xa @ B_c.T) * scaling).reshape(*x.shape[:-1], B.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, xa, A, B = ctx.saved_tensors
        s, p, seed = ctx.scaling, ctx.p, ctx.seed
        dy2 = dy.reshape(-1, dy.shape[-1])
        A_c, B_c = A.to(dy.dtype), B.to(dy.dtype)
        g = (dy2 @ B_c) * s  # [M, r]
        dB = ((dy2.T @ xa) * s).to(B.dtype) if ctx.needs_input_grad[2] else None
        dA = None
        if ctx.needs_input_grad[1]:
            dropped = F.lora_dropout(x2, p, seed) if p > 0 else x2  # regenerated, transient
            dA = (g.T @ dropped).to(A.dtype)
        dx = None
        if ctx.needs_input_grad[0]:
            dx2 = g @ A_c
            dx = (F.lora_dropout(dx2, p, seed) if p > 0 else dx2).reshape(ctx.x_shape)
        return dx, dA, dB, None, None, None


def lora_branch(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, p: float = 0.0,
                seed: int = 0) -> torch.Tensor:
    """s * drop(x) A^T B^T for x [..., K], A [r, K], B [N, r], computed in x's dtype (A, B cast for the matmuls;
    their gradients come back in their own dtype). Dropout p uses the counter stream of ``seed``."""
    return _LoraBranch.apply(x, A, B, float(scaling), float(p), int(seed))
