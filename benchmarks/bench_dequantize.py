"""NF4 dequantization speed: qpeft vs bitsandbytes (same run), and the device's copy bandwidth as a ceiling.

Effective bandwidth counts the fewest bytes the op must move: the packed codes and the scales read once
(double-quantized: uint8 codes + nested fp32 absmax + the 256-entry map), the output written once (GB/s). The
copy baselines move a bf16 tensor of the output's size (read + write): `clone` into a fresh tensor per call, as
dequantize allocates its output, and `copy` into a preallocated one. All variants timed in interleaved rounds.

    python benchmarks/bench_dequantize.py [--device cuda|cpu] [--out DIR]
"""

from __future__ import annotations

import torch

from harness import benchmark_args, median_times_ms, print_table, write_results

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
    reps = 100 if device.type == "cuda" else 30
    rows = []
    for shape in shapes:
        W = torch.randn(shape, dtype=torch.bfloat16, device=device)
        dst = torch.empty_like(W)
        for double_quant in (True, False):
            q = qpeft.Quantized4bitWeight.from_float(W, "nf4", 64, double_quant)
            nbytes = min_bytes(q, torch.bfloat16)
            # The copies move the output's bytes twice (read + write): into a fresh tensor (clone: allocated per
            # call, as dequantize's output is) and into a preallocated one (copy_).
            fns = {"qpeft": lambda: q.dequantize(torch.bfloat16), "clone": W.clone, "copy": lambda: dst.copy_(W)}
            bnb_fn = try_bitsandbytes(W, double_quant)
            if bnb_fn is not None:
                fns["bnb"] = bnb_fn
            times = median_times_ms(fns, device, warmup=5, reps=reps)
            t_qpeft, t_bnb = times["qpeft"], times.get("bnb")
            copy_bytes = 2 * W.numel() * W.element_size()
            row = {
                "shape": f"{shape[0]}x{shape[1]}",
                "double_quant": double_quant,
                "bytes": nbytes,
                "qpeft_ms": t_qpeft,
                "qpeft_GBps": nbytes / t_qpeft / 1e6,
                "bnb_ms": t_bnb,
                "bnb_GBps": nbytes / t_bnb / 1e6 if t_bnb else None,
                "speedup_vs_bnb": t_bnb / t_qpeft if t_bnb else None,
                "clone_GBps": copy_bytes / times["clone"] / 1e6,
                "copy_GBps": copy_bytes / times["copy"] / 1e6,
            }
            row["qpeft_of_clone_bw"] = row["qpeft_GBps"] / row["clone_GBps"]
            row["qpeft_of_copy_bw"] = row["qpeft_GBps"] / row["copy_GBps"]
            rows.append(row)
    print_table(
        rows,
        [
            "shape",
            "double_quant",
            "qpeft_ms",
            "qpeft_GBps",
            "bnb_ms",
            "bnb_GBps",
            "speedup_vs_bnb",
            "clone_GBps",
            "copy_GBps",
            "qpeft_of_clone_bw",
            "qpeft_of_copy_bw",
        ],
    )
    print("wrote", write_results("dequantize_nf4", device, rows, args.out))


if __name__ == "__main__":
    main()
