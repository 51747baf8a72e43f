"""The formats qpeft's kernels and files share with bitsandbytes and peft: block sizes, code books, the 8-bit
map of the double quantization, the GPU reciprocal's table, the dropout hash, LoRA's scaling. The bit-level
rules that use them are defined in ``qpeft.reference``."""

from __future__ import annotations

import functools
import math
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
QUANT_TYPES = ("nf4", "fp4")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NESTED_BLOCKSIZE = 256


def lora_branch_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the LoRA branch's x A^T for activations of ``dtype``: fp32 for fp16 (x A^T can exceed fp16's
    range where the layer's output does not; peft's branch is fp32), else the same (C++: qlora_ops.cpp
    branch_dtype)."""
    return torch.float32 if dtype == torch.float16 else dtype


# ---- the 4-bit weight's tensors: one table ------------------------------------------------------------------
class WeightField(NamedTuple):
    """One tensor of a 4-bit weight. ``name``: the Quantized4bitWeight field (and the ops' argument). ``entry``:
    its bitsandbytes state-dict entry after ``<prefix>.`` ("" the prefix itself; None: a number in the quant
    state's JSON). ``buffer``: its Linear4bit buffer (None: the ``weight`` parameter). ``sharded``: FSDP2 shards it
    along dim 0 with the codes (a parameter then)."""

    name: str
    entry: str | None
    buffer: str | None
    sharded: bool
    optional: bool  # present with double quantization only


WEIGHT_FIELDS = (
    WeightField("packed", "", None, True, False),
    WeightField("absmax", "absmax", "weight_absmax", True, False),
    WeightField("nested_absmax", "nested_absmax", "weight_nested_absmax", True, True),
    WeightField("nested_code", "nested_quant_map", "weight_nested_code", False, True),
    WeightField("nested_offset", None, "weight_nested_offset", False, True),
)


class WeightArgs(NamedTuple):
    """A 4-bit weight as qpeft's ops take it, in their schemas' order: the WEIGHT_FIELDS tensors (packed as uint8
    bytes, nested_offset as one fp32 element), then its format. C++: ``Weight4bitRef``, the same names."""

    packed: torch.Tensor
    absmax: torch.Tensor
    nested_absmax: torch.Tensor | None
    nested_code: torch.Tensor | None
    nested_offset: torch.Tensor | None
    blocksize: int
    quant_type: str

    def tensors(self) -> tuple:
        """The tensors (None where absent), in WEIGHT_FIELDS order."""
        return tuple(self[: len(WEIGHT_FIELDS)])

    def format(self) -> tuple:
        return tuple(self[len(WEIGHT_FIELDS) :])

    @classmethod
    def join(cls, tensors, weight_format) -> "WeightArgs":
        return cls(*tensors, *weight_format)


# NF4 code book (index -> value), fp32. Quantiles of N(0, 1) normalised to [-1, 1] (QLoRA paper).
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
# FP4 (1 sign bit, 2 exponent bits, 1 mantissa bit, bias 2) code book in bit-pattern order, / 12.
FP4_CODE_TIMES_12 = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)


def code_book(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16-entry fp32 code book of ``quant_type`` (what bitsandbytes stores as ``weight.quant_map``)."""
    if quant_type == "nf4":
        return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)
    if quant_type == "fp4":
        values = torch.tensor(FP4_CODE_TIMES_12, dtype=torch.float32, device=device)
        return values / values.abs().max()
    raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


def dynamic_map_8bit(device: torch.device | str = "cpu") -> torch.Tensor:
    """The signed 8-bit "dynamic" map used for double quantization: 256 sorted fp32 values in [-0.993, 1].

    Layout (Dettmers, "8-bit approximations for parallelism"): for exponent e = 0..6, 2^e linearly spaced
    fraction values (bin means of linspace(0.1, 1, 2^e + 1)) scaled by 10^(e - 6), both signs; plus 0 and 1.
    Computed in fp32 exactly as bitsandbytes' ``create_dynamic_map(signed=True)``.
    """
    values: list[float] = []
    for exponent in range(7):
        edges = torch.linspace(0.1, 1, 2**exponent + 1, dtype=torch.float32)
        bin_means = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (exponent - 6)
        values += (scale * bin_means).tolist()
        values += (-scale * bin_means).tolist()
    values += [0.0, 1.0]
    values.sort()
    return torch.tensor(values, dtype=torch.float32, device=device)


RCP_TABLE_PATH = Path(__file__).resolve().parent / "_data" / "rcp_approx_f32.bin"


@functools.cache
def reciprocal_table_bytes() -> bytes:
    """The packed reciprocal correction table: zlib of 2^21 bytes, 4 entries per byte (entry i of byte j is
    bits 2i..2i+1, for mantissa 4j + i), each entry ``delta + 1`` with delta in {-1, 0, +1} ulps."""
    raw = zlib.decompress(RCP_TABLE_PATH.read_bytes())
    if len(raw) != 2**21:
        raise RuntimeError(f"qpeft: corrupt reciprocal table {RCP_TABLE_PATH} ({len(raw)} bytes)")
    return raw


GOLDEN_GAMMA = 0x9E3779B97F4A7C15
MASK64 = (1 << 64) - 1


def mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's output function on uint64 values (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def splitmix64(state: int) -> int:
    """The next SplitMix64 output of ``state``: mix64(state + golden gamma)."""
    return int(mix64(np.array([(state + GOLDEN_GAMMA) & MASK64], dtype=np.uint64))[0])


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """peft's scaling of the LoRA branch: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r
