"""Frozen 4-bit linear forward: qpeft Linear4bit vs dense torch vs bitsandbytes Linear4bit, side by side.

qpeft's forward: up to 16 rows the linear_4bit kernel (W read once from its codes, CPU and CUDA); more rows: on
the CPU W dequantized a ~2 MB slab at a time, one GEMM per slab; on CUDA dequantize + matmul. On the CPU each row
records the kernels taken (`path`: qpeft.functional.cpu_linear_4bit_path) and the JSON the CPU's flags and level.
The three variants are timed in interleaved rounds. Shapes follow ../shared/TARGETS.md (CPU: K = N = 2048 and
4096; GPU: 4096 -> 4096 and the Llama MLP shapes).

    python benchmarks/bench_linear4bit.py [--device cpu|cuda] [--out DIR]
"""

from __future__ import annotations

import torch

from qpeft import functional as F
from harness import benchmark_args, bitsandbytes_nf4, median_times_ms, print_table, write_results

from qpeft.nn import Linear4bit

CPU_CASES = [(torch.bfloat16, m, k, k) for k in (2048, 4096) for m in (1, 16, 256)] + [
    (torch.bfloat16, 1024, 2048, 2048),
    (torch.float32, 1, 2048, 2048),
    (torch.float32, 16, 2048, 2048),
]
GPU_CASES = [(torch.bfloat16, m, 4096, 4096) for m in (1, 16, 512, 4096)] + [
    (torch.bfloat16, 4096, 4096, 14336),
    (torch.bfloat16, 4096, 14336, 4096),
]


def bitsandbytes_layer(dense: torch.nn.Linear, dtype: torch.dtype):
    try:
        return bitsandbytes_nf4(dense, dtype)
    except Exception as e:  # no bitsandbytes here: the row says so instead of inventing a baseline
        print(f"bitsandbytes baseline unavailable: {e}")
        return None


def main() -> None:
    args = benchmark_args(__doc__)
    device = args.device
    cases = GPU_CASES if device.type == "cuda" else CPU_CASES
    reps = 100 if device.type == "cuda" else 20
    rows = []
    with torch.no_grad():
        for dtype, m, k, n in cases:
            dense = torch.nn.Linear(k, n, bias=False, dtype=dtype, device=device)
            ours = Linear4bit.from_linear(dense, "nf4", 64, double_quant=True, compute_dtype=dtype)
            theirs = bitsandbytes_layer(dense, dtype)
            x = torch.randn(m, k, dtype=dtype, device=device)
            fns = {"dense": lambda: dense(x), "qpeft": lambda: ours(x)}
            if theirs is not None:
                fns["bnb"] = lambda: theirs(x)
            times = median_times_ms(fns, device, warmup=10 if device.type == "cuda" else 3, reps=reps)
            t_dense, t_ours, t_bnb = times["dense"], times["qpeft"], times.get("bnb")
            path = F.cpu_linear_4bit_path(m, k, dtype) if device.type == "cpu" else None
            rows.append(
                {
                    "dtype": str(dtype).removeprefix("torch."),
                    "M": m,
                    "K": k,
                    "N": n,
                    "path": path,
                    "dense_ms": t_dense,
                    "qpeft_ms": t_ours,
                    "bnb_ms": t_bnb,
                    "qpeft_vs_dense": t_ours / t_dense,
                    "bnb_vs_qpeft": t_bnb / t_ours if t_bnb else None,
                }
            )
    print_table(
        rows, ["dtype", "M", "K", "N", "path", "dense_ms", "qpeft_ms", "bnb_ms", "qpeft_vs_dense", "bnb_vs_qpeft"]
    )
    print("wrote", write_results("linear4bit_forward", device, rows, args.out))


if __name__ == "__main__":
    main()
