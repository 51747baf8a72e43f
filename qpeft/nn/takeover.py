"""Taking over bitsandbytes' layers: a layer of a model transformers loaded with ``BitsAndBytesConfig(load_in_4bit=
True)`` becomes a qpeft ``Linear4bit`` holding the same bytes (nothing requantized), on the layer's device. Read
through the layer's own attributes (``weight.quant_state``), so bitsandbytes is never imported here.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..quantized import Quantized4bitWeight, _as_storage
from .linear4bit import Linear4bit


def bitsandbytes_kind(module: nn.Module) -> str | None:
    """ "4bit" for a bitsandbytes 4-bit linear layer, "8bit" for an 8-bit one, None for anything else."""
    if not type(module).__module__.startswith("bitsandbytes."):
        return None
    if hasattr(getattr(module, "weight", None), "quant_state"):
        return "4bit"
    if type(module).__name__.startswith("Linear8bit"):
        return "8bit"
    return None


def from_bitsandbytes(module: nn.Module) -> Linear4bit:
    """The qpeft layer of a bitsandbytes 4-bit layer: its codes, scales and double quantization as bitsandbytes
    holds them (checked as a checkpoint is), its bias Parameter itself, its compute dtype; a layer transformers
    made from a Conv1D gives a Conv1D back on ``to_linear``. A layer bitsandbytes repacked for its CPU kernel (an
    inference forward on an AVX-512 BF16 CPU) is read from that layout: the same codes, and the bf16 scales that
    layout keeps (not double-quantized)."""
    weight, state = module.weight, getattr(module.weight, "quant_state", None)
    fan_in_fan_out = getattr(getattr(module, "source_cls", None), "__name__", "") == "Conv1D"
    if state is None:  # not quantized yet: bitsandbytes quantizes when the layer moves to its device
        if not weight.is_floating_point():
            raise ValueError(f"qpeft: a bitsandbytes 4-bit layer holds {weight.dtype} codes but no quant_state")
        q = Quantized4bitWeight.from_float(
            weight.detach(), weight.quant_type, weight.blocksize, weight.compress_statistics, weight.quant_storage
        )
    elif getattr(state, "packing_format_for_cpu", False):
        q = _from_cpu_layout(weight.detach(), state)
    else:
        entries = {f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}
        q = Quantized4bitWeight.from_state_dict({"weight": weight.detach(), **entries}, "weight")
    return Linear4bit.from_quantized(q, module.bias, getattr(module, "compute_dtype", None), fan_in_fan_out)


_CPU_BLOCK_ROWS = 32  # bitsandbytes' CPU layout interleaves 32 output rows


def _from_cpu_layout(packed: torch.Tensor, state) -> Quantized4bitWeight:
    """bitsandbytes' CPU layout -> qpeft's. That layout stores [N, K/2] bytes: for each group of 32 rows and each
    pair of columns (2k, 2k+1), 64 codes (row-major over (row, column of the pair)) in 32 bytes, the first 32 codes
    in the low nibbles, the last 32 in the high ones; the scales are bf16 [K / blocksize, N]."""
    N, K = state.shape
    warnings.warn(
        "qpeft: this bitsandbytes layer was repacked for bitsandbytes' CPU kernel (an inference forward ran): its "
        "codes are taken over exactly, its scales as the bf16 copies that layout keeps (the checkpoint's double "
        "quantization is not recoverable from it)",
        stacklevel=3,
    )
    if packed.dtype != torch.uint8 or packed.shape != (N, K // 2) or N % _CPU_BLOCK_ROWS:
        raise ValueError(f"qpeft: a repacked bitsandbytes layer of shape {[N, K]} holds {list(packed.shape)} bytes")
    groups = packed.reshape(-1, _CPU_BLOCK_ROWS)
    codes = torch.cat([groups & 0xF, groups >> 4], dim=1)  # [N/32 * K/2, 64]: (row, column of the pair)
    codes = codes.reshape(N // _CPU_BLOCK_ROWS, K // 2, _CPU_BLOCK_ROWS, 2).transpose(1, 2).reshape(-1)
    standard = (codes[0::2] << 4) | codes[1::2]  # element 2j in the high nibble of byte j
    absmax = state.absmax.T.reshape(-1).float()
    if not bool(torch.isfinite(absmax).all()):
        raise ValueError("qpeft: a repacked bitsandbytes layer holds a NaN or infinite scale")
    storage = getattr(state, "original_storage_type", None) or torch.uint8
    return Quantized4bitWeight(
        _as_storage(standard.contiguous(), storage),
        absmax.contiguous(),
        torch.Size((N, K)),
        state.original_dtype,
        state.blocksize,
        state.quant_type,
    )
