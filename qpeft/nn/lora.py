"""``LoraLinear4bit``: the module a user swaps in for an nn.Linear — a frozen 4-bit base plus one trainable LoRA
adapter (rsLoRA, DoRA, LoRA bias, dropout regenerated from a seed), with peft's math (qpeft.reference.lora_linear
is the float64 definition, proven equal to peft in tests).

Memory: plain LoRA keeps for backward only the input (shared with the caller) and x A^T (M x r); no
dequantized weight and no dropout mask survive a call. DoRA adds what its magnitude gradient needs.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import reference
from ..lora_autograd import frozen_4bit_linear, lora_branch
from .. import functional as F
from .linear4bit import Linear4bit


class LoraLinear4bit(nn.Module):
    """y = x W^T + s * (drop(x) A^T B^T + lora_bias) + bias, W frozen 4-bit; with DoRA see reference.lora_linear.

    Attributes: ``base`` (Linear4bit, frozen), ``lora_A`` [r, in], ``lora_B`` [out, r], optional ``lora_bias``
    [out] and ``lora_magnitude`` [out] (DoRA), ``scaling``, ``dropout``.
    """

    def __init__(self, base: Linear4bit, r: int = 8, alpha: float = 8, dropout: float = 0.0, use_rslora: bool = False,
                 use_dora: bool = False, lora_bias: bool = False, init: str = "kaiming",
                 adapter_dtype: torch.dtype = torch.float32):
        super().__init__()
        if r <= 0:
            raise ValueError(f"qpeft: LoRA rank r must be positive, got {r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"qpeft: LoRA dropout must be in [0, 1), got {dropout}")
        if init not in ("kaiming", "gaussian"):
            raise ValueError(f"qpeft: init must be 'kaiming' or 'gaussian', got {init!r}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.scaling = reference.lora_scaling(r, alpha, use_rslora)
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=adapter_dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=adapter_dtype, device=device))
        if init == "kaiming":  # nn.Linear's default, as peft's "kaiming" init
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        else:
            nn.init.normal_(self.lora_A, std=1.0 / r)
        self.lora_bias = (nn.Parameter(torch.zeros(base.out_features, dtype=adapter_dtype, device=device))
                          if lora_bias else None)
        self.merged_weight: torch.Tensor | None = None  # set by merge(): W + s B A (DoRA-scaled), dense
        self.merged_bias: torch.Tensor | None = None
        self.lora_magnitude = None
        if use_dora:  # m starts as the row norms of W (B = 0), in fp32
            W = base.dequantized_weight(torch.float32)
            self.lora_magnitude = nn.Parameter(W.norm(dim=1).to(adapter_dtype))

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, alpha: float = 8, dropout: float = 0.0,
                    use_rslora: bool = False, use_dora: bool = False, lora_bias: bool = False, init: str = "kaiming",
                    quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None) -> "LoraLinear4bit":
        base = Linear4bit.from_linear(linear, quant_type, blocksize, double_quant, compute_dtype)
        return cls(base, r, alpha, dropout, use_rslora, use_dora, lora_bias, init)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor, dropout_seed: int | None = None) -> torch.Tensor:
        """``dropout_seed`` fixes the dropout stream (tests); by default each training call draws one from torch's
        generator, so torch.manual_seed makes runs reproducible."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"qpeft: LoraLinear4bit expects inputs with last dimension {self.in_features}, "
                             f"got shape {list(x.shape)}")
        dtype = self.base.compute_dtype or x.dtype
        xc = x.to(dtype)
        if self.merged_weight is not None:
            if self.training and torch.is_grad_enabled():
                raise RuntimeError("qpeft: the adapter is merged; call unmerge() before training")
            bias = self.merged_bias.to(dtype) if self.merged_bias is not None else None
            return torch.nn.functional.linear(xc, self.merged_weight.to(dtype), bias).to(x.dtype)
        p = self.dropout if self.training else 0.0
        seed = 0
        if p > 0:
            seed = dropout_seed if dropout_seed is not None else int(torch.randint(-2**62, 2**62, ()).item())
        weight = self.base.quantized_weight
        base = frozen_4bit_linear(xc, weight)
        lora = lora_branch(xc, self.lora_A, self.lora_B, self.scaling, p, seed)
        if self.lora_bias is not None:
            lora = lora + self.scaling * self.lora_bias.to(dtype)
        if self.lora_magnitude is None:
            y = base + lora
        else:
            ratio = self._dora_scale(weight.dequantize(torch.float32)).to(dtype)
            base_dropped = frozen_4bit_linear(F.lora_dropout(xc, p, seed), weight) if p > 0 else base
            y = base + (ratio - 1) * base_dropped + ratio * lora
        if self.base.bias is not None:
            y = y + self.base.bias.to(dtype)
        return y.to(x.dtype)

    def _dora_scale(self, W: torch.Tensor) -> torch.Tensor:
        """DoRA's m / ||W + s B A||_row in fp32 for the dequantized fp32 base W; the norm is detached (DoRA
        section 4.3), the magnitude keeps its gradient."""
        with torch.no_grad():
            norm = (W + self.scaling * (self.lora_B.float() @ self.lora_A.float())).norm(dim=1)
        return self.lora_magnitude.float() / norm

    # ---- merging (into a dense weight: the 4-bit base is never requantized) --------------------------------
    @torch.no_grad()
    def merged_dense(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The merged layer's weight and bias, computed in fp32 from one dequantization of the base:
        weight W + s B A, bias b + s * lora_bias, both times m / ||W + s B A||_row with DoRA."""
        W = self.base.dequantized_weight(torch.float32)
        weight = W + self.scaling * (self.lora_B.float() @ self.lora_A.float())
        bias = self.base.bias.float() if self.base.bias is not None else None
        lora_bias = self.scaling * self.lora_bias.float() if self.lora_bias is not None else None
        if self.lora_magnitude is not None:
            scale = self._dora_scale(W)
            weight = weight * scale[:, None]
            lora_bias = lora_bias * scale if lora_bias is not None else None
        if lora_bias is not None:
            bias = lora_bias if bias is None else bias + lora_bias
        return weight.to(dtype), None if bias is None else bias.to(dtype)

    def merge(self, dtype: torch.dtype | None = None) -> None:
        """Serve from one dense merged weight (inference); ``dtype`` defaults to the base weight's dtype."""
        self.merged_weight, self.merged_bias = self.merged_dense(dtype or self.base.weight_dtype)

    def unmerge(self) -> None:
        """Back to 4-bit base + adapter (exactly the unmerged layer: the base was never modified)."""
        self.merged_weight = self.merged_bias = None

    @torch.no_grad()
    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """An nn.Linear with the merged weight and bias (peft's merge_and_unload for this layer)."""
        dtype = dtype or self.base.weight_dtype
        W, bias = self.merged_dense(dtype)
        linear = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=W.device, dtype=dtype)
        linear.weight.copy_(W)
        if bias is not None:
            linear.bias.copy_(bias)
        return linear

    def extra_repr(self) -> str:
        return (f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, dropout={self.dropout}, "
                f"dora={self.lora_magnitude is not None}, lora_bias={self.lora_bias is not None}")
