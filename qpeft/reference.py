"""Pure-PyTorch reference for every qpeft quantization op.

This is the *definition* of qpeft's bit-level format. The C++ and CUDA kernels must produce exactly the
same bytes and values; the tests and the benchmarks both import this module (one reference, shared).
It is written for clarity, not speed, and runs on any device torch supports.

The rules follow bitsandbytes' CUDA kernels (which produce the 4-bit checkpoints found in the wild):

* 4-bit blockwise quantization (NF4 / FP4) over the row-major flattened tensor, ``blocksize`` elements per
  block (the last block may be partial). ``absmax = max|x|`` in fp32; every element is scaled by a
  *multiply* with the reciprocal of absmax, then mapped to a 4-bit code by strict ``>`` comparisons against
  fp32 thresholds (a value equal to a threshold rounds down).
* The reciprocal is the GPU's approximate one (bitsandbytes' CUDA build computes ``1.0f / absmax`` as
  ``rcp.approx.ftz.f32``): a faithful rounding that is one ulp away from the correctly rounded ``1 / absmax``
  for 13% of mantissas. It is reproduced exactly from a table measured on an H100 over all 2^23 mantissas
  (``_data/rcp_approx_f32.bin``; see ``approx_reciprocal``). With bf16/fp16 weights, exact ties with FP4's
  threshold 11/128 are common, so the choice of reciprocal changes real bytes.
* One documented deviation: an all-zero block (absmax == 0) gets the code of 0.0 for every element
  (NF4 code 7, FP4 code 0), so it dequantizes to exact +0.0. bitsandbytes' CUDA kernel computes
  0 * inf = NaN there and writes NF4 code 0 (which dequantizes to -0.0); its CPU path writes code 7.
  Dequantized values are equal (zero) either way.
* Packing: byte j holds element 2j in the high nibble and element 2j+1 in the low nibble; for an odd
  element count the last low nibble is the code of 0.0 (NF4 7, FP4 0).
* 8-bit blockwise quantization (used for double quantization of the 4-bit scales) maps each scaled value
  to a code of a sorted 256-entry map with bitsandbytes' binary search and fp32 midpoint decision
  (``nearest_code_8bit``); it is the nearest code except within an ulp of a midpoint.
* Dequantization: ``out = to_dtype(code_fp32[q] * absmax_fp32)``: one fp32 product, one rounding.
  Nested scales: ``absmax_i = fp32(fp32(code8[q_i] * absmax2[i // 256]) + offset)`` (two roundings,
  no fused multiply-add).
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Sequence
from fractions import Fraction

import numpy as np
import torch

from .formats import (
    FLOAT_DTYPES as FLOAT_DTYPES,
    FP4_CODE_TIMES_12 as FP4_CODE_TIMES_12,
    GOLDEN_GAMMA,
    NESTED_BLOCKSIZE,
    NF4_CODE as NF4_CODE,
    QUANT_TYPES,
    RCP_TABLE_PATH as RCP_TABLE_PATH,
    VALID_BLOCKSIZES as VALID_BLOCKSIZES,
    code_book,
    dynamic_map_8bit as dynamic_map_8bit,
    lora_scaling as lora_scaling,
    mix64,
    reciprocal_table_bytes,
)

# The 15 decision thresholds between consecutive NF4 codes, as decimal literals: their fp32 values are the
# C literals' (see fp32_from_decimal).
NF4_THRESHOLDS = (
    -0.8480964004993439,
    -0.6106329262256622,
    -0.4599952697753906,
    -0.33967943489551544,
    -0.23460740596055984,
    -0.13791173323988914,
    -0.045525018125772476,
    0.03979014977812767,
    0.1202552504837513,
    0.2035212516784668,
    0.2920137718319893,
    0.3893125355243683,
    0.5016634166240692,
    0.6427869200706482,
    0.8614784181118011,
)
# Thresholds on |x| between consecutive FP4 magnitudes, and the 3-bit code of each magnitude rank.
FP4_MAGNITUDE_THRESHOLDS = (0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333)
FP4_CODE_OF_MAGNITUDE_RANK = (0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011)


def fp32_from_decimal(text: str) -> float:
    """The fp32 value nearest to the decimal ``text`` (ties to even), as a C compiler rounds ``<text>f``.

    Not ``float32(float(text))``: rounding to double first and then to fp32 can land one ulp away (it does
    for 4 of the 15 NF4 thresholds), and bitsandbytes' CUDA kernel compares against the C literals.
    """
    exact = Fraction(text)
    bits = struct.unpack("<I", struct.pack("<f", float(text)))[0]
    candidates = [struct.unpack("<f", struct.pack("<I", b))[0] for b in (bits - 1, bits, bits + 1)]
    return min(candidates, key=lambda c: (abs(Fraction(c) - exact), struct.unpack("<I", struct.pack("<f", c))[0] & 1))


def thresholds(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The decision thresholds of ``quant_type`` as fp32 (NF4: on x; FP4: on |x|), rounded as C literals."""
    values = NF4_THRESHOLDS if quant_type == "nf4" else FP4_MAGNITUDE_THRESHOLDS
    return torch.tensor([fp32_from_decimal(repr(v)) for v in values], dtype=torch.float32, device=device)


@functools.cache
def _reciprocal_deltas() -> torch.Tensor:
    packed = torch.frombuffer(bytearray(reciprocal_table_bytes()), dtype=torch.uint8).to(torch.int32)
    entries = torch.stack([(packed >> (2 * i)) & 3 for i in range(4)], dim=1).reshape(-1)
    return entries - 1


def approx_reciprocal(x: torch.Tensor) -> torch.Tensor:
    """fp32 ``rcp.approx.ftz.f32(x)`` for x >= 0, and 0 for x == 0 (the all-zero block rule).

    = the correctly rounded 1/x moved by the measured per-mantissa delta (independent of the exponent);
    subnormal x is flushed to zero first (result +inf); a result below the normal range (x >= 2^126) is 0.
    """
    x = x.to(torch.float32)
    bits = x.view(torch.int32)
    exponent, mantissa = (bits >> 23) & 0xFF, bits & 0x7FFFFF
    deltas = _reciprocal_deltas().to(x.device)
    corrected = ((1.0 / x).view(torch.int32) + deltas[mantissa.long()]).view(torch.float32)
    out = torch.where(exponent >= 253, torch.zeros_like(x), corrected)
    out = torch.where(exponent == 0, torch.full_like(x, math.inf), out)
    return torch.where(x == 0, torch.zeros_like(x), out)


def _blocked(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """[n] -> [nblocks, blocksize], zero-padded at the end (zeros do not change a block's absmax)."""
    n = flat.numel()
    nblocks = -(-n // blocksize)
    padded = flat.new_zeros(nblocks * blocksize)
    padded[:n] = flat
    return padded.view(nblocks, blocksize)


def _scale_blocks(A: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Flatten A to fp32, return (scaled values [nblocks, blocksize], absmax [nblocks], n)."""
    flat = A.detach().reshape(-1).to(torch.float32)
    blocks = _blocked(flat, blocksize)
    absmax = blocks.abs().amax(dim=1) if blocks.numel() else blocks.new_zeros(0)
    return blocks * approx_reciprocal(absmax)[:, None], absmax, flat.numel()


def codes_4bit(scaled: torch.Tensor, quant_type: str) -> torch.Tensor:
    """Map scaled fp32 values to 4-bit codes (int64), by strict '>' against the fp32 thresholds."""
    if quant_type == "nf4":
        return (scaled[..., None] > thresholds("nf4", scaled.device)).sum(-1)
    if quant_type == "fp4":
        rank = (scaled.abs()[..., None] > thresholds("fp4", scaled.device)).sum(-1)
        magnitude = torch.tensor(FP4_CODE_OF_MAGNITUDE_RANK, device=scaled.device)[rank]
        return magnitude + 8 * (scaled < 0).long()
    raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


def zero_code(quant_type: str) -> int:
    """The 4-bit code of 0.0: what pads an odd element count and fills an all-zero block."""
    return 7 if quant_type == "nf4" else 0


def pack_nibbles(codes: torch.Tensor, pad_code: int) -> torch.Tensor:
    """[n] codes in 0..15 -> [(n + 1) // 2] uint8, element 2j in the high nibble; odd n pads with pad_code."""
    codes = codes.reshape(-1).to(torch.uint8)
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), pad_code)])
    return (codes[0::2] << 4) | codes[1::2]


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of pack_nibbles: [(n + 1) // 2] uint8 -> [n] int64 codes."""
    packed = packed.reshape(-1).view(torch.uint8).long()
    return torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:n]


def quantize_4bit(A: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4") -> tuple[torch.Tensor, torch.Tensor]:
    """Reference 4-bit quantization. Returns (packed uint8 [(n + 1) // 2], absmax fp32 [ceil(n / blocksize)])."""
    scaled, absmax, n = _scale_blocks(A, blocksize)
    codes = codes_4bit(scaled.reshape(-1)[:n], quant_type)
    return pack_nibbles(codes, zero_code(quant_type)), absmax


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    quant_type: str,
    shape: Sequence[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Reference 4-bit dequantization: out = dtype(code[q] * absmax[block]) computed in fp32."""
    n = math.prod(shape)
    codes = unpack_nibbles(packed, n)
    values = code_book(quant_type, packed.device)[codes]
    scales = absmax.to(torch.float32).repeat_interleave(blocksize)[:n]
    return (values * scales).to(dtype).reshape(tuple(shape))


def nearest_code_8bit(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' 8-bit code search over a sorted 256-entry map, vectorised over ``scaled``.

    Seven halving steps from pivot 127 track the last pivot below (``lower``) and not below (``upper``) x;
    the final pivot p is then compared with x, and the answer is p or its bracketing neighbour, decided by
    the fp32 midpoint ``(code[p] + code[neighbour]) * 0.5``: above p, x > midpoint picks ``upper``;
    at or below p, x < midpoint picks ``lower``. NaN ends at index 0 or 1 (never written by qpeft).
    """
    code = code.to(torch.float32)
    pivot = torch.full_like(scaled, 127, dtype=torch.long)
    lower = torch.zeros_like(pivot)
    upper = torch.full_like(pivot, 255)
    step = 64
    while step > 0:
        greater = scaled > code[pivot]
        lower = torch.where(greater, pivot, lower)
        upper = torch.where(greater, upper, pivot)
        pivot = torch.where(greater, pivot + step, pivot - step)
        step //= 2
    value = code[pivot]
    above = scaled > value
    upper_mid = (code[upper] + value) * 0.5
    lower_mid = (code[lower] + value) * 0.5
    pick_upper = above & (scaled > upper_mid)
    pick_lower = ~above & (scaled < lower_mid)
    return torch.where(pick_upper, upper, torch.where(pick_lower, lower, pivot))


def quantize_blockwise_8bit(
    A: torch.Tensor, code: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference 8-bit blockwise quantization. Returns (codes uint8 [n], absmax fp32 [ceil(n / blocksize)])."""
    scaled, absmax, n = _scale_blocks(A, blocksize)
    return nearest_code_8bit(scaled.reshape(-1)[:n], code).to(torch.uint8), absmax


def dequantize_blockwise_8bit(
    q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE
) -> torch.Tensor:
    """Reference 8-bit blockwise dequantization to fp32: code[q] * absmax[block]."""
    n = q.numel()
    scales = absmax.to(torch.float32).repeat_interleave(blocksize)[:n]
    return code.to(torch.float32)[q.reshape(-1).long()] * scales


def dequantize_nested_absmax(
    q: torch.Tensor, nested_absmax: torch.Tensor, nested_code: torch.Tensor, offset: torch.Tensor | float
) -> torch.Tensor:
    """The fp32 4-bit scales of a double-quantized state: fp32(code8[q] * absmax2) + offset, two roundings."""
    offset = torch.as_tensor(offset, dtype=torch.float32, device=q.device)
    return dequantize_blockwise_8bit(q, nested_absmax, nested_code) + offset


# ---- LoRA dropout regenerated from (seed, offset) ----------------------------------------------------------


def dropout_threshold(p: float) -> int:
    """Keep iff bits >= round(p * 2^16) (bits uniform in [0, 2^16)): drop probability p to within 2^-17."""
    t = p * 65536.0 + 0.5
    return 0xFFFF if t >= 65535.0 else int(t)


def dropout_bits(n: int, seed: int, offset: int) -> np.ndarray:
    """16-bit values (as uint32) of counters c = offset .. offset + n - 1: lane c mod 4 of the 64-bit
    SplitMix64(seed + (c // 4) * golden), one hash per group of four consecutive counters."""
    with np.errstate(over="ignore"):
        c = np.arange(n, dtype=np.uint64) + np.uint64(offset % 2**64)
        z = mix64(np.uint64(seed % 2**64) + (c >> np.uint64(2)) * np.uint64(GOLDEN_GAMMA))
        lanes = (z >> (np.uint64(16) * (c & np.uint64(3)))) & np.uint64(0xFFFF)
    return lanes.astype(np.uint32)


def dropout_keep_mask(shape: Sequence[int], p: float, seed: int, offset: int = 0) -> torch.Tensor:
    """The keep mask of a row-major tensor of ``shape``: element i kept iff bits(seed, offset + i) >= threshold."""
    n = math.prod(shape)
    return torch.from_numpy(dropout_bits(n, seed, offset) >= np.uint32(dropout_threshold(p))).reshape(tuple(shape))


def dropout_keep_scale(p: float) -> float:
    """The factor kept values are scaled by: fp32(1 / fp32(1 - p)) (an fp32 value, returned as a Python float)."""
    return (1.0 / torch.tensor(1.0 - p, dtype=torch.float32)).item()


def lora_dropout(x: torch.Tensor, p: float, seed: int, offset: int = 0) -> torch.Tensor:
    """x * mask / (1 - p): kept values are fp32(x) * fp32(1 / fp32(1 - p)), rounded once to x's dtype."""
    keep = dropout_keep_mask(x.shape, p, seed, offset).to(x.device)
    keep_scale = torch.tensor(dropout_keep_scale(p), dtype=torch.float32, device=x.device)
    kept = (x.to(torch.float32) * keep_scale).to(x.dtype)
    return torch.where(keep, kept, torch.zeros_like(kept))


# ---- The LoRA layer on a frozen base (float64 reference of peft's semantics) ---------------------------------


def lora_linear(
    x: torch.Tensor,
    W: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    *,
    bias: torch.Tensor | None = None,
    keep_mask: torch.Tensor | None = None,
    p: float = 0.0,
    magnitude: torch.Tensor | None = None,
    lora_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """One LoRA adapter on a frozen linear layer, in float64, as peft computes it in training mode.

    x [..., K], W [N, K] (the dequantized base weight), A [r, K], B [N, r], bias [N] (base bias), lora_bias [N]
    (the bias of lora_B, scaled with the branch), keep_mask (bool, x's shape; None: no dropout) with drop
    probability p, so drop(x) = x * keep / (1 - p). Plain LoRA:

        y = x W^T + s * (drop(x) A^T B^T + lora_bias) + bias

    DoRA (magnitude m [N]; n = row norms of W + s B A, detached from the graph, 1 where a row is 0):

        y = x W^T + (m / n - 1) * (drop(x) W^T) + (m / n) * s * (drop(x) A^T B^T + lora_bias) + bias

    With dropout active, peft's DoRA takes the base term of the correction from drop(x) (its DoraLinearVariant
    passes base_result=None then); without dropout this is y = (m / n) * (x W^T + s * lora) + bias.
    Gradients flow to every tensor that requires them; use torch.autograd on this function as the reference.
    """

    def f64(t):
        return None if t is None else t.to(torch.float64)

    x, W, A, B, bias, magnitude, lora_bias = map(f64, (x, W, A, B, bias, magnitude, lora_bias))
    dropped = x if keep_mask is None else torch.where(keep_mask.to(x.device), x / (1.0 - p), torch.zeros_like(x))
    lora = dropped @ A.T @ B.T
    if lora_bias is not None:
        lora = lora + lora_bias
    y = x @ W.T
    if magnitude is None:
        y = y + scaling * lora
    else:
        norm = (W + scaling * (B @ A)).norm(dim=1).detach()
        norm = torch.where(norm == 0, torch.ones_like(norm), norm)  # a zero row: m / 1, not 0 / 0
        ratio = magnitude / norm
        y = y + (ratio - 1) * (dropped @ W.T) + ratio * scaling * lora
    return y if bias is None else y + bias


def ia3_linear(
    x: torch.Tensor, W: torch.Tensor, scale: torch.Tensor, feedforward: bool, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """IA3 on a frozen linear layer in float64, as peft computes it: (x * l) W^T + b for a feed-forward target
    (scale [K]), (x W^T + b) * l otherwise (scale [N])."""
    x, W, scale = x.double(), W.double(), scale.double().reshape(-1)
    bias = None if bias is None else bias.double()
    if feedforward:
        y = (x * scale) @ W.T
        return y if bias is None else y + bias
    y = x @ W.T if bias is None else x @ W.T + bias
    return y * scale


def adalora_delta(A: torch.Tensor, E: torch.Tensor, B: torch.Tensor, alpha: float, ranknum: float) -> torch.Tensor:
    """AdaLoRA's update P diag(E) Q as peft scales it, in float64: B (A * E) * s / (ranknum + 1e-5), with s = alpha
    (r when alpha is 0); A [r, K], E [r, 1], B [N, r]."""
    s = alpha if alpha > 0 else float(ranknum)
    return B.double() @ (A.double() * E.double()) * s / (ranknum + 1e-5)
