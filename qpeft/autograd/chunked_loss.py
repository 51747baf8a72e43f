"""Cross-entropy through an output head without the [tokens, vocab] logits.

Only the rows that carry a label are sent through the head, in chunks of at most ``chunk_elements`` logits; each
chunk's fp32 logits, log-softmax and loss live only while that chunk is computed. A plain nn.Linear head computes
each chunk's gradients with its logits (kept: the hidden states' gradient [rows, hidden], the weight's in fp32
when it trains); any other head (LoRA, modules_to_save) and autocast run every chunk under non-reentrant
activation checkpointing, so backward recomputes one chunk's logits at a time. No [tokens, vocab] tensor is kept.
The head is any module mapping [rows, hidden] -> [rows, vocab]: a frozen nn.Linear (bf16 / fp32), one trained
through modules_to_save, a LoRA layer on it. The result equals
transformers' causal-LM loss: the sum of the rows' cross-entropies divided by ``num_items_in_batch`` when given,
else by the number of labelled rows (NaN when there are none, as torch's mean over nothing).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

CHUNK_ELEMENTS = 1 << 24  # logits per chunk: 64 MiB in fp32


def _chunk_sum(head: Callable, hidden: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    logits = head(hidden).float()
    return F.cross_entropy(logits, labels, reduction="sum", label_smoothing=label_smoothing)


class _LinearCrossEntropySum(torch.autograd.Function):
    """The summed cross-entropy of hidden @ weight^T + bias, rows in chunks, for a plain linear head: each chunk's
    gradients (softmax - one-hot, times the weight / the rows) are computed as its logits are, so backward only
    scales them (no recompute). The weight's gradient accumulates in fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, rows: int, smoothing: float):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        vocab = weight.shape[0]
        for start in range(0, hidden.shape[0], rows):
            h, y = hidden[start : start + rows], labels[start : start + rows]
            z = F.linear(h, weight, bias).float()
            lse = torch.logsumexp(z, 1)
            target = z.gather(1, y[:, None]).squeeze(1)
            total += (1 - smoothing) * (lse - target).sum() + smoothing * (lse - z.mean(1)).sum()
            if need_h or need_w or need_b:
                g = z.sub_(lse[:, None]).exp_()  # softmax, in the logits' buffer
                g[torch.arange(len(y), device=g.device), y] -= 1 - smoothing
                if smoothing:
                    g -= smoothing / vocab
                if need_b:
                    grad_b += g.sum(0)
                g = g.to(weight.dtype)
                if need_h:
                    grad_h[start : start + rows] = g @ weight
                if need_w:
                    grad_w += (g.T @ h).float()
        ctx.save_for_backward(*(t for t in (grad_h, grad_w, grad_b) if t is not None))
        ctx.present = (need_h, need_w, need_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        saved = iter(ctx.saved_tensors)
        grads = [
            (next(saved) * grad_total).to(dtype) if present else None for present, dtype in zip(ctx.present, ctx.dtypes)
        ]
        return (*grads, None, None, None)


def linear_cross_entropy(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    vocab_size: int,
    *,
    ignore_index: int = -100,
    num_items_in_batch: torch.Tensor | int | None = None,
    label_smoothing: float = 0.0,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> torch.Tensor:
    """The mean cross-entropy of ``head(hidden)`` [..., vocab] against ``labels`` (same leading shape; rows labelled
    ``ignore_index`` left out), never holding more than ``chunk_elements`` logits at once."""
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"qpeft: hidden states {list(hidden.shape)} and labels {list(labels.shape)} do not match")
    if labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"qpeft: labels must be integer class indices, got {labels.dtype}")
    if not isinstance(chunk_elements, int) or chunk_elements < 1 or vocab_size < 1:
        raise ValueError(f"qpeft: chunk_elements and vocab_size must be positive, got {chunk_elements}, {vocab_size}")
    labels = labels.reshape(-1).to(hidden.device)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    kept = (labels != ignore_index).nonzero().squeeze(1)
    hidden, labels = hidden.index_select(0, kept), labels.index_select(0, kept)
    if labels.numel() and (labels.min() < 0 or labels.max() >= vocab_size):
        raise ValueError(f"qpeft: a label is outside [0, {vocab_size}) and not ignore_index ({ignore_index})")
    rows = max(1, chunk_elements // vocab_size)
    train = torch.is_grad_enabled() and (hidden.requires_grad or _has_trainable(head))
    if train and type(head) is torch.nn.Linear and not torch.is_autocast_enabled(hidden.device.type):
        total = _LinearCrossEntropySum.apply(hidden, head.weight, head.bias, labels, rows, label_smoothing)
        return _mean(total, kept.numel(), num_items_in_batch)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], rows):
        h, y = hidden[start : start + rows], labels[start : start + rows]
        if train:
            total = total + checkpoint(_chunk_sum, head, h, y, label_smoothing, use_reentrant=False)
        else:
            total = total + _chunk_sum(head, h, y, label_smoothing)
    return _mean(total, kept.numel(), num_items_in_batch)


def _mean(total: torch.Tensor, labelled: int, num_items_in_batch) -> torch.Tensor:
    if num_items_in_batch is None:
        return total / labelled
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _has_trainable(head) -> bool:
    return isinstance(head, torch.nn.Module) and any(p.requires_grad for p in head.parameters())
