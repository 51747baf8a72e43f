"""Where the time of one QLoRA layer goes on a GPU: per-kernel device time of forward+backward (torch.profiler),
qpeft beside the dense frozen bf16 linear, plus the host time to enqueue one step (launch overhead shows at small M).

    python benchmarks/profile_layer.py [--shapes M,K,N ...] [--dropout P]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from qpeft.nn import LoraLinear4bit

DEFAULT_SHAPES = ["4096,4096,4096", "16384,4096,4096", "4096,4096,14336", "1,4096,4096", "16,4096,4096"]


def step(module, x, grad, backward: bool):
    y = module(x)
    if backward:
        y.backward(grad)


def kernel_table(module, x, grad, backward: bool, iters: int = 5) -> tuple[str, float]:
    for _ in range(3):
        step(module, x, grad, backward)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step(module, x, grad, backward)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    events.sort(key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in events) / iters
    lines = [f"{e.device_time_total / iters:9.1f} us  x{e.count // iters:<3d} {e.key[:110]}" for e in events[:14]]
    return "\n".join(lines), total


def host_table(module, x, grad, iters: int = 5) -> str:
    """Host (CPU) self time per op of forward+backward: where the Python/C++ launch overhead goes."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            step(module, x, grad, True)
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    return "\n".join(
        f"  host {e.self_cpu_time_total / iters:9.1f} us  x{e.count // iters:<3d} {e.key[:100]}" for e in events[:18]
    )


def enqueue_us(module, x, grad, backward: bool, reps: int = 50) -> float:
    """Host time per step with the GPU kept ahead (no sync inside): at small M this is the floor of a step."""
    for _ in range(5):
        step(module, x, grad, backward)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        step(module, x, grad, backward)
    host = (time.perf_counter() - t0) / reps * 1e6
    torch.cuda.synchronize()
    return host


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", nargs="*", default=DEFAULT_SHAPES)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--host", action="store_true", help="also print host time per op of qpeft's fwd+bwd")
    args = parser.parse_args()
    torch.manual_seed(0)
    for shape in args.shapes:
        m, k, n = map(int, shape.split(","))
        dense = torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16, device="cuda").requires_grad_(False)
        ours = LoraLinear4bit.from_linear(dense, r=16, alpha=32, dropout=args.dropout).train()
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda", requires_grad=True)
        grad = torch.randn(m, n, dtype=torch.bfloat16, device="cuda")
        for backward in (False, True):
            what = "fwd+bwd" if backward else "fwd"
            for name, module in (("dense", dense), ("qpeft", ours)):
                table, total = kernel_table(module, x, grad, backward)
                host = enqueue_us(module, x, grad, backward)
                print(
                    f"== M={m} K={k} N={n} {what} {name}: kernels {total:.1f} us/step, host enqueue {host:.1f} us/step"
                )
                print(table)
                if args.host and backward and name == "qpeft":
                    print(host_table(module, x, grad))


if __name__ == "__main__":
    main()
