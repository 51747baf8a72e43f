"""Functional API of the 4-bit and 8-bit blockwise formats (thin checks over torch.ops.qpeft).

Arguments are validated here with messages that name the problem (shape, dtype, device, blocksize); the C++
ops check again, so a direct torch.ops call with bad input also raises instead of crashing.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch

from . import _C, formats
from ._ops import (
    CPU_ISA_LEVELS as CPU_ISA_LEVELS,
    CUDA_LORA_KERNELS as CUDA_LORA_KERNELS,
    cpu_isa as cpu_isa,
    cpu_isa_levels as cpu_isa_levels,
    cpu_linear_4bit_path as cpu_linear_4bit_path,
    cuda_lora_kernels as cuda_lora_kernels,
    detected_cpu_isa as detected_cpu_isa,
    ops,
    set_cpu_isa as set_cpu_isa,
    set_cuda_lora_kernels as set_cuda_lora_kernels,
)
from .formats import FLOAT_DTYPES, NESTED_BLOCKSIZE, QUANT_TYPES, VALID_BLOCKSIZES, WeightArgs

_DYNAMIC_MAPS: dict[torch.device, torch.Tensor] = {}


def dynamic_map_8bit(device: torch.device | str = "cpu") -> torch.Tensor:
    """The signed 8-bit dynamic map (256 sorted fp32) used for double quantization, cached per device."""
    device = torch.device(device)
    if device not in _DYNAMIC_MAPS:
        _DYNAMIC_MAPS[device] = formats.dynamic_map_8bit(device)
    return _DYNAMIC_MAPS[device]


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """t [..., F] as a 2-D [rows, F] tensor (a view when possible); unlike reshape(-1, F) also when F = 0."""
    if t.dim() == 0:
        raise ValueError("qpeft: expected a tensor with a feature (last) dimension, got a 0-dim tensor")
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def check_layer_input(x: torch.Tensor, in_features: int, layer: str, device: torch.device) -> None:
    """A layer's input: a floating tensor on the layer's ``device``, at least 1-D with ``in_features`` in its last
    dimension (as nn.Linear)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"qpeft: {layer} takes a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"qpeft: {layer} takes a floating-point input, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"qpeft: {layer} expects inputs with last dimension {in_features}, got shape {list(x.shape)}")
    if x.device != device:
        raise ValueError(f"qpeft: input is on {x.device} but the layer's weight is on {device}")


def check_blocksize(blocksize: int) -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"qpeft: blocksize must be one of {VALID_BLOCKSIZES}, got {blocksize!r}")


def check_quant_type(quant_type: str) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"qpeft: quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


def check_float_dtype(dtype: torch.dtype, what: str) -> None:
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"qpeft: {what} must be float32, float16 or bfloat16, got {dtype}")


def _packed_bytes(packed: torch.Tensor) -> torch.Tensor:
    """The packed codes as uint8, whatever quant_storage dtype holds them (their bytes are what count)."""
    return packed if packed.dtype == torch.uint8 else packed.reshape(-1).view(torch.uint8)


def _offset_arg(nested_offset: torch.Tensor | None) -> torch.Tensor | None:
    """The double-quantization offset as the ops take it: one fp32 element."""
    return None if nested_offset is None else nested_offset.reshape(1).to(torch.float32)


def weight_args(weight) -> WeightArgs:
    """A Quantized4bitWeight as the ops take it (packed as uint8 bytes, nested_offset as one fp32 element)."""
    return WeightArgs(
        _packed_bytes(weight.packed),
        weight.absmax,
        weight.nested_absmax,
        weight.nested_code,
        _offset_arg(weight.nested_offset),
        weight.blocksize,
        weight.quant_type,
    )


MAX_QUANTIZABLE = 2.0**126  # above it, rcp.approx.ftz of the block's absmax is 0


def quantize_4bit(A: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4") -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 4-bit quantization of ``A`` (any shape, fp32/fp16/bf16, any device with a kernel).

    Returns ``(packed, absmax)``: uint8 ``[(n + 1) // 2]`` and fp32 ``[ceil(n / blocksize)]``.
    Raises ValueError for non-finite values (they have no 4-bit code and would poison a whole block) and for
    magnitudes above MAX_QUANTIZABLE (the GPU reciprocal of such a block scale flushes to zero: every code 0).
    """
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"qpeft: expected a tensor to quantize, got {type(A).__name__}")
    check_float_dtype(A.dtype, "the tensor to quantize")
    check_blocksize(blocksize)
    check_quant_type(quant_type)
    packed, absmax = ops.quantize_4bit(A, blocksize, quant_type)  # the op refuses inf / NaN (one pass over A)
    if absmax.numel() and not absmax.is_meta and not torch.compiler.is_compiling() and absmax.max() > MAX_QUANTIZABLE:
        raise ValueError(
            f"qpeft: values above 2^126 in magnitude cannot be quantized (largest {float(absmax.max()):.3g}): "
            "their block's reciprocal scale flushes to zero"
        )
    return packed, absmax


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    quant_type: str,
    shape: Sequence[int],
    dtype: torch.dtype,
    *,
    nested_absmax: torch.Tensor | None = None,
    nested_code: torch.Tensor | None = None,
    nested_offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inverse of quantize_4bit, into a new tensor of ``shape`` and ``dtype``.

    ``absmax`` is the fp32 per-block scale, or (double quantization) the uint8 codes of the scales together
    with ``nested_absmax``, ``nested_code`` and ``nested_offset``; the scales are then decoded inside the kernel.
    ``packed`` may be stored in any dtype (bitsandbytes' quant_storage); its bytes are what count.
    """
    check_blocksize(blocksize)
    check_quant_type(quant_type)
    check_float_dtype(dtype, "the dequantized dtype")
    shape = [int(s) for s in shape]
    packed = _packed_bytes(packed)
    for name, t in (
        ("absmax", absmax),
        ("nested_absmax", nested_absmax),
        ("nested_code", nested_code),
        ("nested_offset", nested_offset),
    ):
        if t is not None and t.device != packed.device:
            raise ValueError(f"qpeft: {name} is on {t.device} but the packed weight is on {packed.device}")
    if absmax.dtype == torch.uint8:
        if nested_absmax is None or nested_code is None or nested_offset is None:
            raise ValueError(
                "qpeft: uint8 absmax means double quantization; nested_absmax, nested_code and "
                "nested_offset are required"
            )
        nested = (nested_absmax, nested_code, _offset_arg(nested_offset))
    else:  # plain fp32 scales: nested tensors, if given, play no part
        nested = (None, None, None)
    return ops.dequantize_4bit(packed, absmax, *nested, blocksize, quant_type, shape, dtype)


def quantize_blockwise_8bit(
    A: torch.Tensor, code: torch.Tensor | None = None, blocksize: int = NESTED_BLOCKSIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantization of fp32 ``A`` with a sorted 256-entry ``code`` (default: dynamic map)."""
    check_blocksize(blocksize)
    if A.dtype != torch.float32:
        raise TypeError(f"qpeft: quantize_blockwise_8bit takes float32 input, got {A.dtype}")
    code = dynamic_map_8bit(A.device) if code is None else code
    return ops.quantize_blockwise_8bit(A, code, blocksize)


def dequantize_blockwise_8bit(
    q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor | None = None, blocksize: int = NESTED_BLOCKSIZE
) -> torch.Tensor:
    """fp32 ``code[q] * absmax[block]``, shaped like ``q``."""
    check_blocksize(blocksize)
    code = dynamic_map_8bit(q.device) if code is None else code
    return ops.dequantize_blockwise_8bit(q, absmax, code, blocksize)


def dropout_seed(seed: int | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """The dropout seed as the ops take it: a one-element int64 tensor, either on the CPU (read on the host and
    passed to the kernels by value) or on the activation's device (read by the kernels there: a seed drawn on
    the GPU costs no host sync and CUDA graph replays draw new ones). An int becomes a CPU tensor; a tensor on
    another accelerator moves to ``device``."""
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1:
            raise TypeError(
                f"qpeft: a dropout seed tensor must be one int64 element, got {seed.dtype} {list(seed.shape)}"
            )
        seed = seed.reshape(1)
        return seed if seed.device.type == "cpu" else seed.to(device)
    if isinstance(seed, bool) or not hasattr(seed, "__index__"):  # "7", 1.5, True are not seeds
        raise TypeError(f"qpeft: a dropout seed must be an integer or a one-element int64 tensor, got {seed!r}")
    value = operator.index(seed)
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"qpeft: a dropout seed must fit in int64, got {value}")
    return torch.tensor([value], dtype=torch.int64)


_UNUSED_SEED = torch.zeros(1, dtype=torch.int64)


def unused_seed() -> torch.Tensor:
    """The seed of a call without dropout (p = 0; never read): one shared zero on the CPU, so an eval forward
    allocates and launches nothing for it on any device."""
    return _UNUSED_SEED


def draw_dropout_seed(device: torch.device | str) -> torch.Tensor:
    """A fresh seed from torch's generator of ``device``, so torch.manual_seed makes runs reproducible and
    torch.utils.checkpoint's restored RNG state gives the recomputed forward the same seed.

    CUDA, eager: computed on the host from the CUDA generator's (seed, offset), whose offset is then advanced as
    by a kernel drawing 4 numbers; a CPU tensor (the kernels take it by value): no random_ kernel, no host sync.
    While a CUDA graph is being
    captured or torch.compile traces, and on other devices: drawn by torch.randint on the device, so each graph
    replay draws anew."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.compiler.is_compiling() and not torch.cuda.is_current_stream_capturing():
        generator = torch.cuda.default_generators[
            device.index if device.index is not None else torch.cuda.current_device()
        ]
        offset = generator.get_offset()
        generator.set_offset(offset + 4)
        value = formats.splitmix64(formats.splitmix64(generator.initial_seed() & formats.MASK64) ^ offset)
        return torch.tensor([value - (1 << 64) if value >= 1 << 63 else value], dtype=torch.int64)
    return torch.randint(-(2**62), 2**62, (1,), dtype=torch.int64, device=device)


# The largest dropout probability: the 16-bit mask keeps with probability within 1% of 1 - p up to it.
MAX_DROPOUT_P: float = _C.MAX_DROPOUT_P


def check_dropout_p(p: float, what: str = "dropout probability") -> None:
    """p must be a number in [0, MAX_DROPOUT_P]; ValueError naming ``what`` otherwise."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= MAX_DROPOUT_P:
        raise ValueError(f"qpeft: {what} must be a number in [0, {MAX_DROPOUT_P}] (the 16-bit dropout mask), got {p!r}")


def lora_dropout(x: torch.Tensor, p: float, seed: int | torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Dropout whose mask is regenerated from (seed, offset): element i of the row-major (logical) x is kept iff
    keep(seed, offset + i), and kept values are scaled by 1 / (1 - p). The same call gives the same mask on any
    device, so a backward pass recomputes it instead of storing it; a slice of rows [r:] of an [M, K] input
    uses offset + r * K. Returns a new contiguous tensor."""
    check_float_dtype(x.dtype, "the input of lora_dropout")
    check_dropout_p(p)
    return ops.lora_dropout(x, float(p), dropout_seed(seed, x.device), int(offset))


def lora_down(x: torch.Tensor, lora_A: torch.Tensor, p: float, seed: int | torch.Tensor) -> torch.Tensor:
    """drop(x) A^T for x [..., K] and A [r, K] with the dropout inside the kernel (counters: row-major index of
    x flattened to [M, K]); fp32 accumulation, result in x's dtype, [..., r]."""
    check_dropout_p(p)
    x2 = as_rows(x)
    xa = ops.lora_down(x2, lora_A, float(p), dropout_seed(seed, x.device))
    return xa.reshape(*x.shape[:-1], lora_A.shape[0])


def lora_down_grad_weight(g: torch.Tensor, x: torch.Tensor, p: float, seed: int | torch.Tensor) -> torch.Tensor:
    """g^T drop(x) for g [M, r], x [M, K] (the gradient of A in drop(x) A^T), fp32 [r, K]. Summed in fp32; for a
    bf16 x on a CPU at level avx512_bf16 the operands are bf16 (g rounded to bf16) and each tile of rows' sums is
    rounded to bf16 once, the precision of any bf16 GEMM (as in lora_down and lora_down_grad_input there)."""
    check_dropout_p(p)
    return ops.lora_down_grad_weight(g, x, float(p), dropout_seed(seed, x.device))


def lora_down_grad_input_(
    dx: torch.Tensor, g: torch.Tensor, lora_A: torch.Tensor, p: float, seed: int | torch.Tensor
) -> torch.Tensor:
    """In place dx += drop(g A) for contiguous dx [M, K], g [M, r], A [r, K] (the input gradient of drop(x) A^T
    added to an existing one); returns dx."""
    check_dropout_p(p)
    ops.lora_down_grad_input_(dx, g, lora_A, float(p), dropout_seed(seed, dx.device))
    return dx


def lora_down_grad_input(
    g: torch.Tensor, lora_A: torch.Tensor, p: float, seed: int | torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """dx = drop(g A) for g [M, r], A [r, K], a new [M, K] tensor of ``dtype`` (the input gradient of
    drop(x) A^T; written without reading anything, so a GEMM can then add another gradient onto it)."""
    check_dropout_p(p)
    return ops.lora_down_grad_input(g, lora_A, float(p), dropout_seed(seed, g.device), dtype)


def linear_4bit(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    quant_type: str,
    out_features: int,
    *,
    nested_absmax: torch.Tensor | None = None,
    nested_code: torch.Tensor | None = None,
    nested_offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [..., K] @ W^T for the 4-bit weight W [out_features, K] in x's dtype. Up to 16 rows W is read once from its
    codes with fp32 accumulation; more rows: W dequantized in x's dtype, on the CPU a slab of ~2 MB at a time (one
    GEMM per slab, no dense W), on CUDA into a transient tensor for one GEMM."""
    check_blocksize(blocksize)
    check_quant_type(quant_type)
    y = ops.linear_4bit(
        as_rows(x),
        _packed_bytes(packed),
        absmax,
        nested_absmax,
        nested_code,
        _offset_arg(nested_offset),
        blocksize,
        quant_type,
        out_features,
    )
    return y.reshape(*x.shape[:-1], out_features)


def linear_4bit_grad_input(
    dy: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    quant_type: str,
    in_features: int,
    *,
    nested_absmax: torch.Tensor | None = None,
    nested_code: torch.Tensor | None = None,
    nested_offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """dy [..., N] @ W for the 4-bit weight W [N, in_features]: the input gradient of linear_4bit, in dy's dtype
    (CPU: W read from its codes with fp32 accumulation up to 8 rows, then slab-wise GEMMs; CUDA: a transient
    dequantized W for one GEMM)."""
    check_blocksize(blocksize)
    check_quant_type(quant_type)
    dx = ops.linear_4bit_grad_input(
        as_rows(dy),
        _packed_bytes(packed),
        absmax,
        nested_absmax,
        nested_code,
        _offset_arg(nested_offset),
        blocksize,
        quant_type,
        in_features,
    )
    return dx.reshape(*dy.shape[:-1], in_features)
