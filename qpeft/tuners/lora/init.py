"""LoRA initialisations by peft's ``init_lora_weights`` names that start from the layer's weight.

PiSSA ("pissa", "pissa_niter_[n]"), OLoRA ("olora") and LoftQ ("loftq") move a rank-r part of the float weight W
[out, in] into the adapter (A [r, in], B [out, r]) and quantize the rest, so the layer starts at
dequant(Q) + s B A ~= W instead of dequant(quant(W)); "orthogonal" draws A and B; EVA (eva.py) starts A from the
layer inputs of data. Each works on one layer's weight at a time: the whole float model never has to be in memory
at once (``initialize_lora_weights`` reads a checkpoint tensor by tensor).

Differences from peft, where peft's own results would be off: the adapter carries s B A (peft's LoftQ leaves out
the scaling s, right only when lora_alpha == r); LoftQ quantizes in the base's own format (double quantization and
blocksize included: the base keeps exactly the Q the adapter was fitted to).
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Callable

import torch

from ...quantized import Quantized4bitWeight

NITER = re.compile(r"pissa_niter_(\d+)")
MAX_NITER = 1000
MAX_LOFTQ_ITER = 100
# inits that replace part of W by the adapter (the base is re-quantized)
WEIGHT_INITS = ("pissa", "olora", "loftq", "corda")


def family(init) -> str | None:
    """ "pissa" / "olora" / "loftq" / "orthogonal" / "eva" for a config's ``init_lora_weights``; None for the
    plain ones (True, False, "kaiming", "gaussian")."""
    if not isinstance(init, str):
        return None
    if init == "pissa" or NITER.fullmatch(init):
        return "pissa"
    return init if init in ("olora", "loftq", "corda", "orthogonal", "eva") else None


def is_valid(init) -> bool:
    if isinstance(init, bool) or init in ("kaiming", "gaussian"):
        return True
    m = NITER.fullmatch(init) if isinstance(init, str) else None
    if m:
        return 1 <= int(m.group(1)) <= MAX_NITER
    return family(init) is not None


def moves_weight(init) -> bool:
    return family(init) in WEIGHT_INITS


@dataclasses.dataclass
class Start:
    """A layer's starting point: the 4-bit base ``q`` and the adapter's ``A`` [r, in], ``B`` [out, r] (fp32)."""

    q: Quantized4bitWeight
    A: torch.Tensor
    B: torch.Tensor


Quantize = Callable[[torch.Tensor], Quantized4bitWeight]


def _split(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with s B A = U diag(S) Vh: the singular values shared evenly, sqrt(S / s) on each side."""
    root = (S / scaling).sqrt()
    return root[:, None] * Vh, U * root[None, :]


def _top_svd(W: torch.Tensor, r: int, niter: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The r leading singular triplets of fp32 ``W``: exact, or torch's randomized svd_lowrank with ``niter``
    subspace iterations (draws from torch's generator)."""
    if niter is None:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        return U[:, :r], S[:r], Vh[:r]
    U, S, V = torch.svd_lowrank(W, r, niter=niter)
    return U, S, V.T


def pissa(W: torch.Tensor, r: int, scaling: float, quantize: Quantize, niter: int | None = None) -> Start:
    """PiSSA on a 4-bit base (QPiSSA): the adapter takes W's r principal singular components, the residual
    W - s B A (in W's dtype, as peft leaves it) is quantized."""
    W32 = W.float()
    A, B = _split(*_top_svd(W32, r, niter), scaling)
    return Start(quantize((W32 - scaling * B @ A).to(W.dtype)), A.contiguous(), B.contiguous())


def olora(W: torch.Tensor, r: int, scaling: float, quantize: Quantize) -> Start:
    """OLoRA: W = QR; B = the first r columns of Q, A = the first r rows of R; the residual W - s B A is
    quantized."""
    W32 = W.float()
    Q, R = torch.linalg.qr(W32)
    A, B = R[:r].contiguous(), Q[:, :r].contiguous()
    return Start(quantize((W32 - scaling * B @ A).to(W.dtype)), A, B)


def corda(W: torch.Tensor, eigens: tuple[torch.Tensor, ...], scaling: float, quantize: Quantize) -> Start:
    """CorDA: ``eigens`` = (S [r], U [out, r], V [in, r]) of the decomposition W C = U diag(S) V^T C (C the layer's
    input covariance, corda.py); s B A = U diag(S) V^T, the residual W - s B A is quantized."""
    S, U, V = (t.float() for t in eigens)
    root = (S / scaling).sqrt()
    A, B = (V.T * root[:, None]).contiguous(), (U * root[None, :]).contiguous()
    return Start(quantize((W.float() - scaling * B @ A).to(W.dtype)), A, B)


def loftq(W: torch.Tensor, r: int, scaling: float, quantize: Quantize, iterations: int = 1) -> Start:
    """LoftQ: alternately Q = quant(W - s B A) and s B A = the rank-r SVD of W - dequant(Q), starting from B A = 0;
    the base keeps the last Q (fitted to in fp32, recorded with W's dtype)."""
    W32 = W.float()
    residual = W32
    for _ in range(iterations):
        q = quantize(residual)
        A, B = _split(*_top_svd(W32 - q.dequantize(torch.float32), r, None), scaling)
        residual = W32 - scaling * B @ A
    return Start(dataclasses.replace(q, dtype=W.dtype), A.contiguous(), B.contiguous())


def loftq_keep_base(W: torch.Tensor, q: Quantized4bitWeight, r: int, scaling: float) -> tuple[torch.Tensor, ...]:
    """One LoftQ step for a base already quantized (peft's replace_lora_weights_loftq): (A, B) of the rank-r SVD of
    W - dequant(q), q unchanged."""
    return _split(*_top_svd(W.float() - q.dequantize(torch.float32), r, None), scaling)


def orthogonal(r: int, in_features: int, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's orthogonal init (A and B from the odd and even rows of a random orthogonal r x r matrix, so B A = 0
    at the start), drawing from torch's generator in peft's order; r must be even."""
    if r % 2:
        raise ValueError(f"qpeft: the orthogonal init needs an even LoRA rank (as in peft), got r={r}")
    Q, _ = torch.linalg.qr(torch.randn(r, r))
    A = (torch.randn(in_features, r // 2) @ Q[0::2]).T / 10.0
    B = torch.randn(r // 2, out_features).T @ Q[1::2] / 10.0
    return A.contiguous(), B.contiguous()


def start(init, W: torch.Tensor, r: int, scaling: float, quantize: Quantize, loftq_iter: int = 1, eigens=None) -> Start:
    """The starting point of a weight-moving ``init`` (moves_weight) for float weight ``W`` [out, in] (CorDA: from
    the layer's ``eigens``)."""
    if not W.is_floating_point() or not torch.isfinite(W).all():
        raise ValueError(f"qpeft: {init} needs a finite float weight, got {W.dtype} with non-finite values or codes")
    if r > min(W.shape):
        raise ValueError(f"qpeft: {init} needs the LoRA rank r={r} <= min(out, in) of the weight {list(W.shape)}")
    kind = family(init)
    if kind == "pissa":
        m = NITER.fullmatch(init)
        return pissa(W, r, scaling, quantize, int(m.group(1)) if m else None)
    if kind == "olora":
        return olora(W, r, scaling, quantize)
    if kind == "loftq":
        return loftq(W, r, scaling, quantize, loftq_iter)
    if kind == "corda":
        return corda(W, eigens, scaling, quantize)
    raise ValueError(f"qpeft: {init!r} does not start from the weight")


def warn_requantized(init: str) -> None:
    warnings.warn(
        f"qpeft: init_lora_weights={init!r} on a base that is already 4-bit starts from its dequantized weight and "
        "quantizes the residual again; the float weights give a better start "
        "(get_peft_model on the float model, or qpeft.initialize_lora_weights(model, checkpoint))",
        stacklevel=4,
    )


def relative_error(W: torch.Tensor, s: Start, scaling: float) -> float:
    """||W - (dequant(Q) + s B A)||_F / ||W||_F, in float64."""
    approx = s.q.dequantize(torch.float32).double() + scaling * s.B.double() @ s.A.double()
    return float(torch.linalg.matrix_norm(W.double() - approx) / torch.linalg.matrix_norm(W.double()).clamp_min(1e-300))


__all__ = ["Start", "corda", "family", "is_valid", "loftq", "moves_weight", "olora", "orthogonal", "pissa", "start"]
