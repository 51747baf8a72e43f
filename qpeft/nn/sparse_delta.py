"""``SparseDeltaLinear4bit``: a frozen 4-bit W plus a trainable sparse difference S (a fixed set of entries, as in
diff pruning / SpIEL): y = x (W + S)^T + b. S holds ``index`` (flat positions in [out, in], int64, sorted) and
``values``; memory scales with the number of entries, not the layer. The backward gives the values' gradient at the
chosen entries only; it keeps x (the input)."""

from __future__ import annotations

import torch
from torch import nn

from ..autograd import frozen_4bit_linear, sparse_term
from .adapter_holder import SingleAdapterLinear4bit


class SparseDelta(nn.Module):
    """The entries ``index`` (buffer, flat in [out, in]) and their trainable ``values`` (fp32, zero at first)."""

    def __init__(self, index: torch.Tensor, out_features: int, in_features: int):
        super().__init__()
        index = torch.as_tensor(index, dtype=torch.int64).reshape(-1)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= out_features * in_features):
            raise ValueError(f"qpeft: sparse entries must lie in [0, {out_features * in_features})")
        if index.unique().numel() != index.numel():
            raise ValueError("qpeft: sparse entries must be distinct")
        index = index.sort().values
        self.register_buffer("index", index)
        self.values = nn.Parameter(torch.zeros(index.numel(), device=index.device))
        self.in_features = in_features

    def rows_cols(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.index // self.in_features, self.index % self.in_features

    def dense(self, shape: tuple[int, int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        S = torch.zeros(shape[0] * shape[1], dtype=dtype, device=self.values.device)
        S[self.index] = self.values.to(dtype)
        return S.reshape(shape)


class SparseDeltaLinear4bit(SingleAdapterLinear4bit):
    def add_entries(self, name: str, index: torch.Tensor, activate: bool = True) -> SparseDelta:
        delta = SparseDelta(index.to(self.base.weight.device), self.out_features, self.in_features)
        self.register_adapter(name, delta, activate)
        return delta

    def idle(self, delta: SparseDelta) -> bool:
        return delta.index.numel() == 0

    def adapted(self, x2: torch.Tensor, delta: SparseDelta) -> torch.Tensor:
        y = frozen_4bit_linear(x2, self.base.op_weight_args(), self.out_features)
        rows, cols = delta.rows_cols()
        return y + sparse_term(x2, delta.values, rows, cols, self.out_features)

    def adapted_weight(self, W: torch.Tensor, delta: SparseDelta) -> torch.Tensor:
        return W + delta.dense(tuple(W.shape))


def gradient_magnitude_entries(scores: torch.Tensor, budget: int) -> torch.Tensor:
    """The flat indices of the ``budget`` largest entries of ``scores`` [out, in] (ties: the lower index)."""
    flat = scores.reshape(-1)
    budget = min(budget, flat.numel())
    return flat.topk(budget, sorted=False).indices.sort().values
