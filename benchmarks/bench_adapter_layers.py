"""IA3 and AdaLoRA layers: forward, forward+backward and the memory kept for backward, qpeft vs the frozen dense
linear vs peft on bitsandbytes 4-bit vs peft on the dense linear, side by side in one run (interleaved rounds).

Methods: ia3 (output scaling: attention targets), ia3_ff (input scaling: feed-forward targets), adalora (init_r
12, every rank active), adalora_pruned (4 of the 12 ranks kept by the allocator's mask: qpeft computes 4, peft
computes 12 with E zeroed). "saved_MB" is what the layer keeps for backward beyond its input and parameters.

    python benchmarks/bench_adapter_layers.py [--device cpu|cuda] [--out DIR]
"""

from __future__ import annotations

import copy

import torch

from bench_lora_layer import measure, peft_on_bnb
from harness import benchmark_args, print_table, write_results

import qpeft
from qpeft import functional as F

CPU_CASES = [(256, 2048, 2048), (1024, 2048, 2048)]
GPU_CASES = [(4096, 4096, 4096), (16384, 4096, 4096)]
METHODS = ["ia3", "ia3_ff", "adalora", "adalora_pruned"]
KEPT = 4


def configs(method: str):
    """(qpeft config, peft config) of ``method`` on the module "proj"."""
    import peft

    if method.startswith("ia3"):
        kw = dict(target_modules=["proj"], feedforward_modules=["proj"] if method == "ia3_ff" else [])
        return qpeft.IA3Config(**kw), peft.IA3Config(**kw)
    kw = dict(target_modules=["proj"], init_r=12, target_r=KEPT, total_step=100, lora_alpha=32)
    return qpeft.AdaLoraConfig(**kw), peft.AdaLoraConfig(**kw)


class Holder(torch.nn.Module):
    def __init__(self, proj: torch.nn.Module):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


@torch.no_grad()
def prune(model, method: str) -> None:
    """adalora_pruned: the allocator's mask keeping the first KEPT ranks (E of the others zeroed, as peft does)."""
    if method != "adalora_pruned":
        return
    for name, p in model.named_parameters():
        if "lora_E" in name:
            p[KEPT:] = 0
    for m in model.modules():
        if hasattr(m, "set_rank_mask"):  # qpeft's AdaLoraAdapter
            keep = torch.zeros_like(m.rank_mask)
            keep[:KEPT] = True
            m.set_rank_mask(keep)


def build(method: str, dense: torch.nn.Linear, dtype: torch.dtype) -> dict:
    ours_config, peft_config = configs(method)
    variants = {"dense": dense}
    ours = qpeft.get_peft_model(Holder(copy.deepcopy(dense)), ours_config).train()
    if method.startswith("adalora"):
        with torch.no_grad():  # E = 0 at init would make the branch vanish
            for name, p in ours.named_parameters():
                if "lora_E" in name:
                    p.normal_(0, 0.1)
    variants["qpeft"] = ours
    import peft

    variants["dense_peft"] = peft.get_peft_model(Holder(copy.deepcopy(dense)), copy.deepcopy(peft_config)).train()
    theirs = peft_on_bnb(dense, dtype, copy.deepcopy(peft_config))
    if theirs is not None:
        variants["bnb_peft"] = theirs
    for model in variants.values():
        prune(model, method)
    return variants


def main() -> None:
    args = benchmark_args(__doc__)
    device = args.device
    cases, reps = (GPU_CASES, 50) if device.type == "cuda" else (CPU_CASES, 15)
    dtype = torch.bfloat16 if device.type == "cuda" or F.detected_cpu_isa() == "avx512_bf16" else torch.float32
    rows = []
    for m, k, n in cases:
        dense = torch.nn.Linear(k, n, bias=False, dtype=dtype, device=device).requires_grad_(False)
        x = torch.randn(m, k, dtype=dtype, device=device, requires_grad=True)
        for method in METHODS:
            variants = build(method, dense, dtype)
            results = measure({name: (module, None) for name, module in variants.items()}, x, device, reps)
            row = {"method": method, "M": m, "K": k, "N": n, "dtype": str(dtype).removeprefix("torch.")}
            for name, (fwd, fb, saved, peak) in results.items():
                row.update(
                    {f"{name}_fwd_ms": fwd, f"{name}_fb_ms": fb, f"{name}_saved_MB": saved, f"{name}_peak_MB": peak}
                )
            for name in ("qpeft", "bnb_peft", "dense_peft"):
                if name in results:
                    row[f"{name}_fb_vs_dense"] = row[f"{name}_fb_ms"] / row["dense_fb_ms"]
            if "bnb_peft" in results:
                row["bnb_peft_fb_vs_qpeft"] = row["bnb_peft_fb_ms"] / row["qpeft_fb_ms"]
                row["bnb_peft_fwd_vs_qpeft"] = row["bnb_peft_fwd_ms"] / row["qpeft_fwd_ms"]
            rows.append(row)
    print_table(
        rows,
        [
            "method",
            "M",
            "K",
            "N",
            "dense_fwd_ms",
            "qpeft_fwd_ms",
            "bnb_peft_fwd_ms",
            "dense_peft_fwd_ms",
            "dense_fb_ms",
            "qpeft_fb_ms",
            "bnb_peft_fb_ms",
            "dense_peft_fb_ms",
            "qpeft_fb_vs_dense",
            "bnb_peft_fb_vs_qpeft",
            "qpeft_saved_MB",
            "bnb_peft_saved_MB",
            "dense_peft_saved_MB",
        ],
    )
    print("wrote", write_results(f"adapter_layers_{str(dtype).removeprefix('torch.')}", device, rows, args.out))


if __name__ == "__main__":
    main()
