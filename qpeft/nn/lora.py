"""``LoraLinear4bit``: the module a user swaps in for an nn.Linear — a frozen 4-bit base plus named trainable LoRA
adapters (rsLoRA, DoRA, LoRA bias, dropout regenerated from a seed), with peft's math
(qpeft.reference.lora_linear is the float64 definition, proven equal to peft in tests).

Active adapters are summed, as peft does; ``disable_adapters`` (or the ``disable_adapter()`` context) runs the
base alone. Memory: with one plain adapter the layer is two fused ops, and backward keeps only the input
(shared with the caller) and x A^T (M x r); several adapters keep x A^T each; a DoRA adapter adds its [N]
magnitude ratio. No dequantized weight and no dropout mask survive a call.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from .. import functional as F
from .. import formats
from ..autograd import dora_linear, frozen_4bit_linear, lora_branch, qlora_linear
from .adapter_holder import AdapterLayer4bit
from .linear4bit import Linear4bit


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """One LoRA adapter's hyperparameters: rank ``r``, ``alpha`` (scaling alpha / r, or alpha / sqrt(r) with
    ``use_rslora``), ``dropout`` probability, ``use_dora``, ``lora_bias`` (a bias on the up-projection), ``init`` of
    A ("kaiming" or "gaussian"; B starts at 0) and ``adapter_dtype`` of the trainable tensors. The LoRA layer's
    constructors and ``add_adapter`` take these as keywords."""

    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False
    lora_bias: bool = False
    init: str = "kaiming"
    adapter_dtype: torch.dtype = torch.float32

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"qpeft: LoRA rank r must be a positive integer, got {self.r!r}")
        F.check_dropout_p(self.dropout, "LoRA dropout")
        if self.init not in ("kaiming", "gaussian"):
            raise ValueError(f"qpeft: init must be 'kaiming' or 'gaussian', got {self.init!r}")

    @property
    def scaling(self) -> float:
        return formats.lora_scaling(self.r, self.alpha, self.use_rslora)


def _nonzero_norm(norm: torch.Tensor) -> torch.Tensor:
    """DoRA's row norms with 1 for a zero row (an all-zero weight row, B still 0): m / 1 instead of 0 / 0 = NaN,
    so such a row computes what the base computes (0) and m keeps a finite gradient."""
    return torch.where(norm == 0, torch.ones_like(norm), norm)


def check_rank(r: int, in_features: int, out_features: int) -> None:
    """A rank above max(in, out) adds nothing a full-rank update lacks, and would allocate r x (in + out)."""
    if r > max(in_features, out_features):
        raise ValueError(
            f"qpeft: LoRA rank {r} exceeds the layer's larger dimension ({in_features} -> {out_features}); "
            "refused before allocating"
        )


class LowRankAdapter(nn.Module):
    """What a LoRA layer asks of an adapter (LoRA, DoRA, AdaLoRA): ``branch()``, the low-rank term's (A, B, s) or
    None when no rank is computed; ``dropout`` (its probability); ``lora_bias`` ([out], scaled with the branch) and
    ``lora_magnitude`` (DoRA's m [out]), each None when absent; ``scaling``; ``delta_weight()`` = s B A."""

    lora_bias: nn.Parameter | None
    lora_magnitude: nn.Parameter | None
    dropout: float
    scaling: float

    @property
    def use_dora(self) -> bool:
        return self.lora_magnitude is not None

    def branch(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """s B A in fp32 [out, in]."""
        branch = self.branch()
        if branch is None:
            return torch.zeros(self.lora_B.shape[0], self.lora_A.shape[1], device=self.lora_A.device)
        A, B, s = branch
        return s * (B.float() @ A.float())


class LoraAdapter(LowRankAdapter):
    """One adapter's trainable tensors: ``lora_A`` [r, in], ``lora_B`` [out, r], optional ``lora_bias`` [out]
    (the bias of peft's lora_B, scaled with the branch) and ``lora_magnitude`` [out] (DoRA's m); its
    hyperparameters are those of ``spec``."""

    def __init__(self, in_features: int, out_features: int, spec: LoraSpec, device: torch.device | str | None = None):
        super().__init__()
        check_rank(spec.r, in_features, out_features)
        self.spec = spec
        self.r, self.alpha, self.dropout, self.use_rslora = spec.r, spec.alpha, spec.dropout, spec.use_rslora
        self.scaling, self.init = spec.scaling, spec.init
        dtype = spec.adapter_dtype
        self.lora_A = nn.Parameter(torch.empty(spec.r, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(out_features, spec.r, dtype=dtype, device=device))
        self.lora_bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if spec.lora_bias else None
        # DoRA's magnitude; the owner sets it to the base's row norms (B = 0 makes that the identity).
        self.lora_magnitude = (
            nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if spec.use_dora else None
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The initial values: A by ``init`` (the only draw from torch's generator), B and the bias 0, m 1."""
        if self.init == "kaiming":  # nn.Linear's default, as peft's "kaiming" init
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        else:
            nn.init.normal_(self.lora_A, std=1.0 / self.r)
        self.lora_B.zero_()
        if self.lora_bias is not None:
            self.lora_bias.zero_()
        if self.lora_magnitude is not None:
            self.lora_magnitude.fill_(1.0)

    def branch(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A, B, s) of the low-rank term s * drop(x) A^T B^T."""
        return self.lora_A, self.lora_B, self.scaling

    def extra_repr(self) -> str:
        return (
            f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, dropout={self.dropout}, "
            f"dora={self.use_dora}, lora_bias={self.lora_bias is not None}"
        )


class AdaLoraAdapter(LowRankAdapter):
    """One AdaLoRA adapter (peft's SVD form): ``lora_A`` [r, in] (Q), ``lora_E`` [r, 1] (the singular values),
    ``lora_B`` [out, r] (P); the term is drop(x) (A * E)^T B^T * s / (ranknum + 1e-5), s = alpha (r if alpha is 0),
    ranknum the initial rank. ``rank_mask`` (bool [r], set by ``set_rank_mask``) is the rank allocator's: masked ranks
    are not computed, so their A, B and E get no gradient. Init as peft: E = 0, A and B ~ N(0, 0.02)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        ranknum: int | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if not isinstance(r, int) or r < 0:
            raise ValueError(f"qpeft: AdaLoRA rank must be a non-negative integer, got {r!r}")
        check_rank(r, in_features, out_features)
        F.check_dropout_p(dropout, "LoRA dropout")
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.ranknum = float(r if ranknum is None else ranknum)
        self.scaling = (alpha if alpha > 0 else self.ranknum) / (self.ranknum + 1e-5)
        self.lora_bias = self.lora_magnitude = None  # (no LoRA bias or DoRA with AdaLoRA)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device).normal_(0.0, 0.02))
        self.lora_E = nn.Parameter(torch.zeros(r, 1, device=device))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, device=device).normal_(0.0, 0.02))
        self.register_buffer("rank_mask", torch.ones(r, dtype=torch.bool, device=device), persistent=False)
        # the kept ranks' indices, read once when the mask is set (no device sync per forward); None: all kept
        self.register_buffer("rank_index", None, persistent=False)

    @torch.no_grad()
    def set_rank_mask(self, keep: torch.Tensor) -> None:
        """Ranks outside ``keep`` (bool [r]) are not computed and their E is 0."""
        keep = keep.to(self.rank_mask.device, torch.bool).reshape(-1)
        self.rank_mask.copy_(keep)
        self.lora_E.masked_fill_(~keep.reshape(-1, 1), 0.0)
        self.rank_index = None if bool(keep.all()) else keep.nonzero().reshape(-1)

    def branch(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        index = self.rank_index
        if self.r == 0 or (index is not None and index.numel() == 0):
            return None
        A, B = self.lora_A * self.lora_E, self.lora_B
        if index is not None:
            A, B = A.index_select(0, index), B.index_select(1, index)
        return A, B, self.scaling

    def extra_repr(self) -> str:
        return (
            f"r={self.r}, active ranks={int(self.rank_mask.sum())}, alpha={self.alpha}, ranknum={self.ranknum}, "
            f"dropout={self.dropout}"
        )


class LoraLinear4bit(AdapterLayer4bit):
    """y = x W^T + sum over active adapters of s * (drop(x) A^T B^T + lora_bias) + bias, W frozen 4-bit; DoRA
    adapters as in reference.lora_linear.

    Attributes: ``base`` (Linear4bit, frozen), ``adapters`` (name -> LoraAdapter), ``active_adapters``,
    ``disable_adapters``. With one active adapter, ``lora_A``, ``lora_B``, ``lora_bias``, ``lora_magnitude``,
    ``scaling``, ``r``, ``alpha`` and ``dropout`` are its attributes.
    """

    adapter_type = LowRankAdapter

    def __init__(self, base: Linear4bit, r: int | None = 8, *, adapter_name: str = "default", **spec):
        """An adapter ``adapter_name`` of rank ``r`` and LoraSpec ``spec`` (``r`` None: no adapter yet; ``attach``
        adds one built elsewhere)."""
        super().__init__(base)
        self.adapters = nn.ModuleDict()
        if r is not None:
            self.add_adapter(adapter_name, r=r, **spec)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
        adapter_name: str = "default",
        **spec,
    ) -> "LoraLinear4bit":
        """``linear`` quantized in the given 4-bit format, with one adapter of LoraSpec ``spec``."""
        base = Linear4bit.from_linear(linear, quant_type, blocksize, double_quant, compute_dtype)
        return cls(base, adapter_name=adapter_name, **spec)

    # ---- adapters -----------------------------------------------------------------------------------------
    def add_adapter(self, name: str, *, activate: bool = True, **spec) -> LoraAdapter:
        """Adds a fresh adapter of LoraSpec ``spec`` (B = 0: the layer's output is unchanged) and, by default, makes
        it the active one."""
        self.check_new_adapter(name)
        spec = LoraSpec(**spec)
        adapter = LoraAdapter(self.in_features, self.out_features, spec, self.base.weight.device)
        if spec.use_dora:  # m starts as the row norms of W, in fp32
            with torch.no_grad():
                adapter.lora_magnitude.copy_(self.base.row_norms_squared().sqrt())
        self.register_adapter(name, adapter, activate)
        return adapter

    @torch.no_grad()
    def start_adapter(self, name: str, A: torch.Tensor, B: torch.Tensor) -> None:
        """Adapter ``name`` starts at ``A`` [r, in], ``B`` [out, r] (an initialisation from the weight or at random;
        DoRA's magnitude becomes the row norms of the layer's weight with s B A added, the identity at the start)."""
        adapter = self.adapters[name]
        if tuple(A.shape) != tuple(adapter.lora_A.shape) or tuple(B.shape) != tuple(adapter.lora_B.shape):
            raise ValueError(
                f"qpeft: start of adapter {name!r} has A {list(A.shape)}, B {list(B.shape)}; the adapter has "
                f"A {list(adapter.lora_A.shape)}, B {list(adapter.lora_B.shape)}"
            )
        adapter.lora_A.copy_(A)
        adapter.lora_B.copy_(B)
        if adapter.lora_magnitude is not None:
            adapter.lora_magnitude.copy_(self._dora_norm(adapter))

    def _active(self) -> list[LowRankAdapter]:
        return [self.adapters[n] for n in self.active_names()]

    def _single(self) -> LoraAdapter:
        if len(self.active_adapters) != 1:
            raise RuntimeError(f"qpeft: {len(self.active_adapters)} active adapters; use layer.adapters[name]")
        return self.adapters[self.active_adapters[0]]

    # The single active adapter's attributes, for the common one-adapter case.
    lora_A = property(lambda self: self._single().lora_A)
    lora_B = property(lambda self: self._single().lora_B)
    lora_bias = property(lambda self: self._single().lora_bias)
    lora_magnitude = property(lambda self: self._single().lora_magnitude)
    scaling = property(lambda self: self._single().scaling)
    r = property(lambda self: self._single().r)
    alpha = property(lambda self: self._single().alpha)

    @property
    def dropout(self) -> float:
        return self._single().dropout

    @dropout.setter
    def dropout(self, p: float) -> None:
        F.check_dropout_p(p, "LoRA dropout")
        self._single().dropout = p

    # ---- forward ------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, dropout_seed: int | torch.Tensor | None = None) -> torch.Tensor:
        """``dropout_seed`` fixes the dropout stream (tests; adapter i uses seed + i); by default each training call
        draws a seed per adapter from torch's generator on x's device (torch.manual_seed makes runs reproducible;
        no host sync, so it works under torch.compile and CUDA graph capture)."""
        dtype = self.check_input(x)
        xc = x if x.dtype == dtype else x.to(dtype)
        merged = self.merged_forward(xc, dtype)  # (disabled: the base alone, below)
        if merged is not None:
            return merged.to(x.dtype)
        adapters = self._active()
        base_bias = self.base.bias
        branches = [a.branch() for a in adapters]
        if len(adapters) == 1 and not adapters[0].use_dora and branches[0] is not None:  # one fused op
            a, (A, B, scaling) = adapters[0], branches[0]
            p = a.dropout if self.training else 0.0
            seed = self._seed(0, a, dropout_seed, x.device)
            y = qlora_linear(xc, self.base.op_weight_args(), A, B, self._total_bias(a, dtype), scaling, p, seed)
            return y if y.dtype == x.dtype else y.to(x.dtype)
        weight = self.base.quantized_weight
        if all(b is None for b in branches):
            y = frozen_4bit_linear(xc, weight)
            return (y if base_bias is None else y + base_bias.to(dtype)).to(x.dtype)
        seeds = [self._seed(i, a, dropout_seed, x.device) for i, a in enumerate(adapters)]
        ps = [a.dropout if self.training else 0.0 for a in adapters]
        if len(adapters) == 1:  # one DoRA adapter
            a, p, seed = adapters[0], ps[0], seeds[0]
            ratio = a.lora_magnitude.float() / self._dora_norm(a)
            y = dora_linear(xc, weight, a.lora_A, a.lora_B, ratio, a.lora_bias, base_bias, a.scaling, p, seed)
            return y.to(x.dtype)
        if any(a.use_dora for a in adapters):
            raise NotImplementedError("qpeft: a DoRA adapter cannot be active together with other adapters")
        y = frozen_4bit_linear(xc, weight)
        for a, branch, p, seed in zip(adapters, branches, ps, seeds):
            if branch is not None:
                y = y + lora_branch(xc, *branch, p, seed)
            if a.lora_bias is not None:
                y = y + a.scaling * a.lora_bias.to(dtype)
        if base_bias is not None:
            y = y + base_bias.to(dtype)
        return y.to(x.dtype)

    def _seed(self, index: int, adapter: LoraAdapter, dropout_seed, device) -> torch.Tensor:
        if not (self.training and adapter.dropout > 0):
            return F.unused_seed()
        if dropout_seed is None:
            return F.draw_dropout_seed(device)
        return F.dropout_seed(dropout_seed, device) + index

    def _total_bias(self, adapter: LoraAdapter, dtype: torch.dtype) -> torch.Tensor | None:
        """base bias + s * lora_bias (differentiable in both), or None. The base bias alone is passed in its own
        dtype (qlora_forward rounds it to x's dtype itself: one launch fewer per call)."""
        bias = self.base.bias
        if adapter.lora_bias is not None:
            lora = adapter.scaling * adapter.lora_bias.to(dtype)
            bias = lora if bias is None else bias.to(dtype) + lora
        return bias

    def _dora_norm(self, adapter: LoraAdapter) -> torch.Tensor:
        """||W + s B A||_row in fp32, detached (DoRA section 4.3), without a dense W or s B A [N, K]: expanded as
        ||W_n||^2 + 2 s B_n . (W A^T)_n + s^2 B_n (A A^T) B_n^T, from the cached row norms of the frozen W, one
        4-bit matmul W A^T [N, r] (r rows: the small-M path) and the r x r Gram matrix, combined in fp64."""
        with torch.no_grad():
            A = adapter.lora_A.float()
            B = adapter.lora_B.double()
            wa = frozen_4bit_linear(A, self.base.quantized_weight).double()  # [r, N] = A W^T
            s = adapter.scaling
            gram = A.double() @ A.double().T
            squared = self.base.row_norms_squared() + 2 * s * (B * wa.T).sum(1) + s * s * ((B @ gram) * B).sum(1)
            return _nonzero_norm(squared.clamp_min(0).sqrt().float())

    # ---- merging (into a dense weight: the 4-bit base is never requantized) --------------------------------
    @torch.no_grad()
    def merged_dense(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The merged layer's weight and bias from one dequantization of the base, in fp32 then ``dtype``: the
        active adapters applied in order as peft merges them (W += s B A, b += s * lora_bias; a DoRA adapter then
        scales both rows by m / ||W + s B A||_row of the weight merged so far)."""
        weight = self.base.dequantized_weight(torch.float32)
        bias = self.base.bias.float() if self.base.bias is not None else None
        for a in self._active():
            merged = weight + a.delta_weight()
            lora_bias = a.scaling * a.lora_bias.float() if a.lora_bias is not None else None
            if a.use_dora:
                scale = a.lora_magnitude.float() / _nonzero_norm(merged.norm(dim=1))
                merged = merged * scale[:, None]
                lora_bias = lora_bias * scale if lora_bias is not None else None
            weight = merged
            if lora_bias is not None:
                bias = lora_bias if bias is None else bias + lora_bias
        return weight.to(dtype), None if bias is None else bias.to(dtype)
