"""Autograd of the adapters that change the weight's entries: Piggyback's mask (straight-through scores over a
transient dequantized W) and a sparse difference (gather / index-add beside the 4-bit matmul)."""

from __future__ import annotations

import torch


class _MaskedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, scores, threshold, dequantize):
        W = dequantize(x2.dtype)
        mask = scores > threshold
        Wm = W.mul_(mask)
        ctx.save_for_backward(x2, scores)
        ctx.meta = (threshold, dequantize)
        return x2 @ Wm.T

    @staticmethod
    def backward(ctx, dy):
        x2, scores = ctx.saved_tensors
        threshold, dequantize = ctx.meta
        W = dequantize(dy.dtype)
        dx = dscores = None
        if ctx.needs_input_grad[1]:  # straight through the threshold: dS = dL/d(W m) * W
            dscores = ((dy.float().T @ x2.float()) * W.float()).to(scores.dtype)
        if ctx.needs_input_grad[0]:
            dx = dy @ W.mul_(scores > threshold)
        return dx, dscores, None, None


def masked_linear(x2: torch.Tensor, scores: torch.Tensor, threshold: float, dequantize) -> torch.Tensor:
    """x2 [M, in] (W * 1[scores > threshold])^T -> [M, out]; ``dequantize(dtype)`` gives a fresh dense W (modified
    in place, never kept); the scores' gradient is straight through the threshold."""
    return _MaskedLinear.apply(x2, scores, threshold, dequantize)


class _SparseTerm(torch.autograd.Function):
    """x S^T for S given by (rows, cols, values): [M, out]."""

    @staticmethod
    def forward(ctx, x2, values, rows, cols, out_features):
        y = x2.new_zeros(x2.shape[0], out_features)
        y.index_add_(1, rows, x2.index_select(1, cols) * values.to(x2.dtype))
        ctx.save_for_backward(x2, values, rows, cols)
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, values, rows, cols = ctx.saved_tensors
        dy_at = dy.index_select(1, rows)  # [M, nnz]
        dx = dvalues = None
        if ctx.needs_input_grad[0]:
            dx = torch.zeros_like(x2).index_add_(1, cols, dy_at * values.to(dy.dtype))
        if ctx.needs_input_grad[1]:
            dvalues = (dy_at.float() * x2.index_select(1, cols).float()).sum(0).to(values.dtype)
        return dx, dvalues, None, None, None


def sparse_term(
    x2: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, out_features: int
) -> torch.Tensor:
    """x2 [M, in] S^T -> [M, out] for S given by its entries (rows, cols, values)."""
    return _SparseTerm.apply(x2, values, rows, cols, out_features)
