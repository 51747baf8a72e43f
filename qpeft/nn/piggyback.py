"""``MaskedLinear4bit``: Piggyback (Mallya et al. 2018) on a frozen 4-bit W: real-valued scores S [out, in], the
binary mask m = 1[S > threshold] in the forward, y = x (W * m)^T + b, and the straight-through gradient
dS = dL/d(W * m) * W. The mask multiplies the dequantized weight in a transient buffer (never kept); backward keeps
x. Saved as packed bits (1 bit per weight)."""

from __future__ import annotations

import torch
from torch import nn

from ..autograd import masked_linear
from .adapter_holder import SingleAdapterLinear4bit

_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor as uint8 [ceil(n / 8)], most significant bit first (numpy.packbits' order)."""
    flat = mask.reshape(-1).to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)])
    return (flat.reshape(-1, 8) * _BIT_WEIGHTS.to(flat.device)).sum(1).to(torch.uint8)


def unpack_bits(bits: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    n = shape[0] * shape[1]
    if bits.dtype != torch.uint8 or bits.dim() != 1 or bits.numel() != (n + 7) // 8:
        raise ValueError(
            f"qpeft: a packed mask of {list(shape)} is {(n + 7) // 8} uint8 bytes, got {bits.dtype} {list(bits.shape)}"
        )
    unpacked = (bits.reshape(-1, 1) & _BIT_WEIGHTS.to(bits.device)) != 0
    return unpacked.reshape(-1)[:n].reshape(shape)


class MaskScores(nn.Module):
    """The trainable scores of one mask (``scores`` [out, in], starting at ``init_score`` everywhere: all kept)."""

    def __init__(
        self,
        out_features: int,
        in_features: int,
        threshold: float,
        init_score: float,
        dtype: torch.dtype = torch.float32,
        device=None,
    ):
        super().__init__()
        self.threshold = threshold
        self.scores = nn.Parameter(torch.full((out_features, in_features), init_score, dtype=dtype, device=device))

    def mask(self) -> torch.Tensor:
        return self.scores > self.threshold


class MaskedLinear4bit(SingleAdapterLinear4bit):
    def add_mask(
        self, name: str, threshold: float, init_score: float, dtype: torch.dtype = torch.float32, activate: bool = True
    ) -> MaskScores:
        scores = MaskScores(self.out_features, self.in_features, threshold, init_score, dtype, self.base.weight.device)
        self.register_adapter(name, scores, activate)
        return scores

    def adapted(self, x2: torch.Tensor, adapter: MaskScores) -> torch.Tensor:
        return masked_linear(x2, adapter.scores, adapter.threshold, self.base.dequantized_weight)

    def adapted_weight(self, W: torch.Tensor, adapter: MaskScores) -> torch.Tensor:
        return W * adapter.mask()
