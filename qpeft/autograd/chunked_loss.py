"""Cross-entropy through an output head without the [tokens, vocab] logits.

Only the rows that carry a label are sent through the head, in chunks of at most ``chunk_elements`` logits; each
chunk's fp32 logits, log-softmax and loss live only while that chunk is computed: with gradients on, every chunk
runs under non-reentrant activation checkpointing, so backward recomputes one chunk's logits at a time (one more
head forward, no [tokens, vocab] tensor kept). The head is any module mapping [rows, hidden] -> [rows, vocab]: a
frozen nn.Linear (bf16 / fp32), one trained through modules_to_save, a LoRA layer on it. The result equals
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
    if kept.numel() and (labels[kept].min() < 0 or labels[kept].max() >= vocab_size):
        raise ValueError(f"qpeft: a label is outside [0, {vocab_size}) and not ignore_index ({ignore_index})")
    hidden, labels = hidden.index_select(0, kept), labels.index_select(0, kept)
    rows = max(1, chunk_elements // vocab_size)
    train = torch.is_grad_enabled() and (hidden.requires_grad or _has_trainable(head))
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], rows):
        h, y = hidden[start : start + rows], labels[start : start + rows]
        if train:
            total = total + checkpoint(_chunk_sum, head, h, y, label_smoothing, use_reentrant=False)
        else:
            total = total + _chunk_sum(head, h, y, label_smoothing)
    if num_items_in_batch is None:
        return total / kept.numel()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _has_trainable(head) -> bool:
    return isinstance(head, torch.nn.Module) and any(p.requires_grad for p in head.parameters())
