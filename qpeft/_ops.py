"""Loads the compiled ops (torch.ops.qpeft.*) and registers their fake (meta) implementations.

The schemas live in csrc/ops/schema.cpp; each backend (CPU, CUDA) registers its kernel in C++. The fake
implementations below only describe output shapes/dtypes so that torch.compile and opcheck can trace them.
"""

from __future__ import annotations

import os

import torch


def _required_torch() -> str | None:
    """The torch version series this installed qpeft was built against ("2.13"), from its metadata's pin."""
    import importlib.metadata
    import re

    try:
        requires = importlib.metadata.requires("qpeft") or []
    except importlib.metadata.PackageNotFoundError:  # run from a source tree: nothing installed to check
        return None
    pin = next(
        (
            re.fullmatch(r"torch\s*==\s*(\d+\.\d+)\.\*", r.split(";")[0].strip())
            for r in requires
            if r.startswith("torch")
        ),
        None,
    )
    return pin.group(1) if pin else None


def _check_torch_version() -> None:
    """torch keeps no stable C++ ABI across minor versions: refuse to load the extension into another one."""
    required = _required_torch()
    installed = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    if required is not None and installed != required:
        raise ImportError(
            f"qpeft: this qpeft was built against torch {required}.x, but torch {torch.__version__} "
            f"is installed; install torch=={required}.* or rebuild qpeft against this torch "
            "(pip install --no-build-isolation .)"
        )


_check_torch_version()
from . import _C  # noqa: E402  (importing the extension runs its TORCH_LIBRARY registrations)
from .formats import lora_branch_dtype, reciprocal_table_bytes  # noqa: E402

ops = torch.ops.qpeft
# The CPU kernels reproduce the GPU's approximate reciprocal from this table (reference.approx_reciprocal).
_C._set_reciprocal_table(reciprocal_table_bytes())

CUDA_LORA_KERNELS = ("cuda_cores", "tensor_cores")


def set_cuda_lora_kernels(kind: str) -> None:
    """Which CUDA kernels run the LoRA branch (lora_down, lora_down_grad_weight, lora_down_grad_input(_), and so
    the fused layer): "cuda_cores" (fp32 FMAs; the default) or "tensor_cores" (mma.sync tf32 with fp32 operands
    split into hi + lo parts: same results to fp32 rounding, same dropout mask). Tensor cores apply to bf16/fp16
    activations with K % 8 == 0 and 16-byte aligned rows; other calls keep the CUDA-core kernels. Process-wide;
    the environment variable QPEFT_CUDA_LORA_KERNELS sets the value at import."""
    if kind not in CUDA_LORA_KERNELS:
        raise ValueError(
            f"qpeft: CUDA LoRA kernels (set_cuda_lora_kernels, QPEFT_CUDA_LORA_KERNELS) must be one of "
            f"{CUDA_LORA_KERNELS}, got {kind!r}"
        )
    _C._set_cuda_lora_tensor_cores(kind == "tensor_cores")


def cuda_lora_kernels() -> str:
    """The kind set by set_cuda_lora_kernels."""
    return "tensor_cores" if _C._cuda_lora_tensor_cores() else "cuda_cores"


# QPEFT_CUDA_LORA_KERNELS=tensor_cores|cuda_cores: the LoRA-branch CUDA kernels chosen at import.
set_cuda_lora_kernels(os.environ.get("QPEFT_CUDA_LORA_KERNELS", "cuda_cores"))


CPU_ISA_LEVELS: tuple[str, ...] = _C.CPU_ISA_LEVELS  # lowest first, as the C++ dispatch orders them


def detected_cpu_isa() -> str:
    """The best CPU kernel level this CPU and OS support, one of CPU_ISA_LEVELS: "avx2" (AVX2 + FMA + F16C), "avx512"
    (AVX-512 F/BW/VL/DQ), "avx512_bf16" (+ AVX512_BF16); "baseline" is portable C++."""
    return _C._detected_cpu_isa()


def cpu_isa() -> str:
    """The level the CPU kernels run at: the detected one, or lower where set_cpu_isa capped it."""
    return _C._cpu_isa()


def set_cpu_isa(level: str) -> str:
    """Caps the CPU kernels' level at ``level`` (one of CPU_ISA_LEVELS; a level above the detected one runs the
    detected one) and returns the previous cap. Process-wide; QPEFT_CPU_ISA sets it at import. Every level gives
    results within the tested tolerances of the reference, and dequantization gives the same bits at each."""
    if level not in CPU_ISA_LEVELS:
        raise ValueError(
            f"qpeft: CPU kernel level (set_cpu_isa, QPEFT_CPU_ISA) must be one of {CPU_ISA_LEVELS}, got {level!r}"
        )
    return _C._set_cpu_isa_cap(level)


def cpu_isa_levels() -> tuple[str, ...]:
    """The levels this machine can run, lowest first (the ones tests check)."""
    return CPU_ISA_LEVELS[: CPU_ISA_LEVELS.index(detected_cpu_isa()) + 1]


def cpu_linear_4bit_path(rows: int, in_features: int, dtype: torch.dtype) -> str:
    """Which CPU kernels a frozen 4-bit linear forward of ``rows`` rows runs now: "codes:<level>" (W read from its
    codes by that level's kernel) or "slabs:<level>+aten_gemm" (W dequantized a slab at a time, ATen GEMMs)."""
    return _C._cpu_linear_4bit_path(rows, in_features, dtype == torch.bfloat16)


# QPEFT_CPU_ISA=baseline|avx2|avx512|avx512_bf16: the highest CPU kernel level used, set at import.
set_cpu_isa(os.environ.get("QPEFT_CPU_ISA") or CPU_ISA_LEVELS[-1])


def _nblocks(n: int, blocksize: int) -> int:
    return -(-n // blocksize)


@torch.library.register_fake("qpeft::quantize_4bit")
def _(A, blocksize, quant_type):
    n = A.numel()
    return A.new_empty(((n + 1) // 2,), dtype=torch.uint8), A.new_empty((_nblocks(n, blocksize),), dtype=torch.float32)


@torch.library.register_fake("qpeft::dequantize_4bit")
def _(packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, quant_type, shape, dtype):
    return packed.new_empty(shape, dtype=dtype)


@torch.library.register_fake("qpeft::quantize_blockwise_8bit")
def _(A, code, blocksize):
    n = A.numel()
    return A.new_empty((n,), dtype=torch.uint8), A.new_empty((_nblocks(n, blocksize),), dtype=torch.float32)


@torch.library.register_fake("qpeft::dequantize_blockwise_8bit")
def _(q, absmax, code, blocksize):
    return q.new_empty(q.shape, dtype=torch.float32)


@torch.library.register_fake("qpeft::linear_4bit")
def _(x, packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, quant_type, out_features):
    return x.new_empty((x.shape[0], out_features))


@torch.library.register_fake("qpeft::linear_4bit_grad_input")
def _(dy, packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, quant_type, in_features):
    return dy.new_empty((dy.shape[0], in_features))


@torch.library.register_fake("qpeft::lora_dropout")
def _(x, p, seed, offset):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("qpeft::lora_down")
def _(x, lora_A, p, seed):
    return x.new_empty((x.shape[0], lora_A.shape[0]))


@torch.library.register_fake("qpeft::lora_down_grad_weight")
def _(g, x, p, seed):
    return x.new_empty((g.shape[1], x.shape[1]), dtype=torch.float32)


@torch.library.register_fake("qpeft::lora_down_grad_input_")
def _(dx, g, lora_A, p, seed):
    return None


@torch.library.register_fake("qpeft::lora_down_grad_input")
def _(g, lora_A, p, seed, dtype):
    return g.new_empty((g.shape[0], lora_A.shape[1]), dtype=dtype)


@torch.library.register_fake("qpeft::qlora_forward")
def _(
    x,
    packed,
    absmax,
    nested_absmax,
    nested_code,
    nested_offset,
    blocksize,
    quant_type,
    lora_A,
    lora_B,
    bias,
    scaling,
    p,
    seed,
):
    xa = x.new_empty((x.shape[0], lora_A.shape[0]), dtype=lora_branch_dtype(x.dtype))
    return x.new_empty((x.shape[0], lora_B.shape[0])), xa


@torch.library.register_fake("qpeft::qlora_backward")
def _(
    dy,
    x,
    xa,
    packed,
    absmax,
    nested_absmax,
    nested_code,
    nested_offset,
    blocksize,
    quant_type,
    lora_A,
    lora_B,
    scaling,
    p,
    seed,
):
    return dy.new_empty(x.shape), torch.empty_like(lora_A), torch.empty_like(lora_B)


@torch.library.register_fake("qpeft::_approx_reciprocal")
def _(x):
    return torch.empty_like(x)


def build_info() -> dict:
    """How the extension was built: version, CUDA kernels present, CUDA architectures, compiler."""
    return dict(_C.build_info())
