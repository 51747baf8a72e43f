"""The causal-LM loss at a real vocabulary: peak memory and time of loss + backward from the last hidden states,
through the model's own path (logits, fp32 copy, cross-entropy) and through qpeft's chunked head
(qpeft/autograd/chunked_loss.py), each variant in its own process (peak = VmHWM less the resident set before).

Shapes: Llama-3.2-1B's head (hidden 2048, vocab 128256, bf16, frozen; tied embeddings as the model has them) and
Qwen3's vocabulary (151936), batch 1 x seq 512 and 2048.

    python benchmarks/bench_fused_loss.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch
from harness import benchmark_args, print_table, write_results

SHAPES = {"llama-1b head": (2048, 128256), "qwen3 vocab": (2048, 151936)}
SEQS = (512, 2048)
REPS = 3


def _vm(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def child(variant: str, hidden_size: int, vocab: int, seq: int) -> None:
    from qpeft.autograd.chunked_loss import linear_cross_entropy

    torch.manual_seed(0)
    head = torch.nn.Linear(hidden_size, vocab, bias=False, dtype=torch.bfloat16).requires_grad_(False)
    hidden = (torch.randn(1, seq, hidden_size) * 0.5).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, vocab, (1, seq))
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    times = []
    with open("/proc/self/clear_refs", "w") as f:  # the peak so far (building the head) set back to the current RSS
        f.write("5")
    before = _vm("VmRSS")
    for _ in range(REPS):
        start = time.perf_counter()
        if variant == "model's own":
            logits = head(hidden).float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), shifted.reshape(-1))
        else:
            loss = linear_cross_entropy(hidden, head, shifted, vocab)
        loss.backward()
        hidden.grad = None
        times.append(time.perf_counter() - start)
        del loss
        logits = None
    print(json.dumps({"peak_gib": (_vm("VmHWM") - before) / 2**30, "s": sorted(times)[len(times) // 2]}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
        return
    args = benchmark_args(__doc__.splitlines()[0])
    rows = []
    for shape, (hidden_size, vocab) in SHAPES.items():
        for seq in SEQS:
            row = {"shape": shape, "hidden": hidden_size, "vocab": vocab, "seq": seq}
            for variant in ("model's own", "qpeft chunked"):
                cmd = [sys.executable, __file__, "--child", variant, str(hidden_size), str(vocab), str(seq)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ)
                result = json.loads(out.stdout.strip().splitlines()[-1])
                row[f"{variant} peak GiB"], row[f"{variant} s"] = result["peak_gib"], result["s"]
            row["peak ratio"] = row["qpeft chunked peak GiB"] / row["model's own peak GiB"]
            row["time ratio"] = row["qpeft chunked s"] / row["model's own s"]
            rows.append(row)
            print(row, file=sys.stderr)
    print_table(rows, list(rows[0]))
    print(write_results("fused_loss", args.device, rows, args.out))


if __name__ == "__main__":
    main()
