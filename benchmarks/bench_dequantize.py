"""NF4 dequantization speed: qpeft vs bitsandbytes (same run), and the device's copy bandwidth as a ceiling.

Effective bandwidth counts the fewest bytes the op must move: the packed codes and the scales read once
(double-quantized: uint8 codes + nested fp32 absmax + the 256-entry map), the output written once.

    python benchmarks/bench_dequantize.py [--device cuda|cpu] [--out DIR]
"""

from __future__ import annotations

import math

import torch

from harness import benchmark_args, median_time_ms, print_table, write_results

import qpeft

GPU_SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (8192, 8192)]
CPU_SHAPES = [(2048, 2048), (4096, 4096)]


def min_bytes(q: qpeft.Quantized4bitWeight, out_dtype: torch.dtype) -> int:
    out = q.numel * torch.empty((), dtype=out_dtype).element_size()
    return q.nbytes() + out


def try_bitsandbytes(W: torch.Tensor, double_quant: bool):
    try:
        import bitsandbytes.functional as bF

        packed, state = bF.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
        return lambda: bF.dequantize_4bit(packed, state)
    except Exception as e:  # no bitsandbytes here: the row says so instead of inventing a baseline
        print(f"bitsandbytes baseline unavailable: {e}")
        return None


def main() -> None:
    args = benchmark_args(__doc__)
    device = args.device
    shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    reps = 100 if device.type == "cuda" else 10
    rows = []
    for shape in shapes:
        W = torch.randn(shape, dtype=torch.bfloat16, device=device)
        for double_quant in (True, False):
            q = qpeft.Quantized4bitWeight.from_float(W, "nf4", 64, double_quant)
            nbytes = min_bytes(q, torch.bfloat16)
            t_qpeft = median_time_ms(lambda: q.dequantize(torch.bfloat16), device, reps=reps)
            bnb_fn = try_bitsandbytes(W, double_quant)
            t_bnb = median_time_ms(bnb_fn, device, reps=reps) if bnb_fn else None
            row = {"shape": f"{shape[0]}x{shape[1]}", "double_quant": double_quant, "bytes": nbytes,
                   "qpeft_ms": t_qpeft, "qpeft_TBps": nbytes / t_qpeft / 1e9,
                   "bnb_ms": t_bnb, "bnb_TBps": nbytes / t_bnb / 1e9 if t_bnb else None,
                   "speedup_vs_bnb": t_bnb / t_qpeft if t_bnb else None}
            rows.append(row)
    if device.type == "cuda":
        src = torch.empty(512 * 2**20, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        t_copy = median_time_ms(lambda: dst.copy_(src), device, reps=50)
        rows.append({"shape": "copy 512MiB", "bytes": 2 * src.numel(), "qpeft_ms": t_copy,
                     "qpeft_TBps": 2 * src.numel() / t_copy / 1e9})
    print_table(rows, ["shape", "double_quant", "qpeft_ms", "qpeft_TBps", "bnb_ms", "bnb_TBps", "speedup_vs_bnb"])
    print("wrote", write_results("dequantize_nf4", device, rows, args.out))


if __name__ == "__main__":
    main()
