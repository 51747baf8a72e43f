"""The LoRA-branch ops alone (lora_down, lora_down_grad_weight, lora_down_grad_input_, lora_down_grad_input), each
CUDA kernel kind side by side in one run: "cuda_cores" (fp32 FMAs) and "tensor_cores" (mma.sync tf32), bf16,
r = 16, dropout 0.05. Each op's time includes its glue (partial-sum reduction, cast), as the layer pays it.

Effective bandwidth counts the bytes each op must move at least: x read once (lora_down, grad_weight), dx read
and written once (grad_input_, which accumulates), dx written once (grad_input, the form the layer's backward
uses); the rank-sized operands are ignored. A copy of the same size gives the device's ceiling in the same run.
Before timing, both kinds are checked against each other.

    python benchmarks/bench_lora_ops.py [--device cuda] [--out DIR]
"""

from __future__ import annotations

import torch

from harness import benchmark_args, median_time_ms, print_table, write_results

from qpeft import functional as F

CASES = [(4096, 4096), (16384, 4096), (4096, 14336), (16384, 14336), (16, 4096), (1, 4096)]  # (M, K)
R, P, SEED = 16, 0.05, 1234


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def main() -> None:
    args = benchmark_args(__doc__)
    device = args.device
    if device.type != "cuda":
        raise SystemExit("bench_lora_ops compares CUDA kernels: run it on a GPU")
    rows = []
    for m, k in CASES:
        x = torch.randn(m, k, dtype=torch.bfloat16, device=device)
        A = torch.randn(R, k, device=device) / k**0.5
        g = torch.randn(m, R, device=device)
        dx = torch.randn(m, k, dtype=torch.bfloat16, device=device)
        ops = {
            "lora_down": (lambda: F.lora_down(x, A, P, SEED), x.numel() * 2),
            "grad_weight": (lambda: F.lora_down_grad_weight(g, x, P, SEED), x.numel() * 2),
            "grad_input_": (lambda: F.lora_down_grad_input_(dx, g, A, P, SEED), 2 * dx.numel() * 2),
            "grad_input": (lambda: F.lora_down_grad_input(g, A, P, SEED, dx.dtype), dx.numel() * 2),
        }
        outputs = {}
        for kind in F.CUDA_LORA_KERNELS:
            F.set_cuda_lora_kernels(kind)
            outputs[kind] = (
                F.lora_down(x, A, P, SEED),
                F.lora_down_grad_weight(g, x, P, SEED),
                F.lora_down_grad_input_(torch.zeros_like(dx), g, A, P, SEED),
                F.lora_down_grad_input(g, A, P, SEED, dx.dtype),
            )
        agree = [rel_err(a, b) for a, b in zip(outputs["tensor_cores"], outputs["cuda_cores"])]
        t_copy = median_time_ms(lambda: dx.clone(), device, reps=100)
        for (op, (fn, nbytes)), rel_diff in zip(ops.items(), agree):
            row = {"M": m, "K": k, "r": R, "op": op, "bytes": nbytes, "kinds_rel_diff": rel_diff}
            for kind in F.CUDA_LORA_KERNELS:
                F.set_cuda_lora_kernels(kind)
                t = median_time_ms(fn, device, reps=100)
                row[f"{kind}_us"] = t * 1e3
                row[f"{kind}_TBps"] = nbytes / t / 1e9
            row["tensor_vs_cuda_cores"] = row["cuda_cores_us"] / row["tensor_cores_us"]
            row["copy_TBps"] = 2 * dx.numel() * 2 / t_copy / 1e9
            rows.append(row)
    F.set_cuda_lora_kernels("cuda_cores")
    print_table(
        rows,
        [
            "M",
            "K",
            "op",
            "cuda_cores_us",
            "tensor_cores_us",
            "tensor_vs_cuda_cores",
            "cuda_cores_TBps",
            "tensor_cores_TBps",
            "copy_TBps",
            "kinds_rel_diff",
        ],
    )
    print("wrote", write_results("lora_ops_bfloat16", device, rows, args.out))


if __name__ == "__main__":
    main()
