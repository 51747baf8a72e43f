"""End-to-end QLoRA training on a Llama-architecture model built from a config (random init, no downloads):
tokens/s and peak memory of qpeft vs bitsandbytes + peft vs a 16/32-bit base + peft, same model, same data, same
run; plus the loss check (qpeft and bitsandbytes + peft QLoRA on the same data and seed end within noise).

Each variant runs in its own process (so CPU peak RSS is its own). LoRA r=16 on all 7 projections, AdamW,
gradient checkpointing, dropout 0.05. Two bitsandbytes + peft set-ups: "bnb_peft" as PROJECTIONS.md's baseline was
run (quantized model, checkpointing, non-LoRA parameters left in the compute dtype) — the ratios are against it —
and "bnb_peft_kbit" through peft.prepare_model_for_kbit_training, which also upcasts every non-quantized
parameter (norms, embeddings, lm_head) to fp32: the common recipe, slower and larger.

    python benchmarks/bench_e2e.py [--device cpu|cuda] [--size small|kernels] [--steps N] [--out DIR]

GPU: PROJECTIONS.md's model (8 layers, hidden 4096, intermediate 14336, 32/8 heads, vocab 32000, batch 4 x 2048, bf16);
CPU --size small (default): a scaled-down one (2 layers, hidden 256, batch 2 x 128, fp32; results e2e_cpu.json);
CPU --size kernels: one where the 4-bit kernels dominate (4 layers, hidden 1024, batch 2 x 256, bf16 on CPUs with
AVX512_BF16, else fp32; results e2e_kernels_cpu.json).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile

import torch

from harness import GPU_LLAMA, PROJECTIONS, benchmark_args, peak_memory_mb, print_table, train_steps, write_results

CPU_MODEL = dict(
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=2000,
    max_position_embeddings=256,
)
CPU_KERNELS_MODEL = dict(
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=4,
    num_attention_heads=16,
    num_key_value_heads=4,
    vocab_size=2000,
    max_position_embeddings=256,
)
VARIANTS = ["qpeft", "bnb_peft", "bnb_peft_kbit", "dense_peft"]


def batches(vocab: int, batch: int, seq: int, steps: int):
    """The same token stream for every variant: a fixed random 'corpus' of repeating phrases (learnable)."""
    g = torch.Generator().manual_seed(1234)
    phrases = torch.randint(0, vocab, (64, 16), generator=g)
    for _ in range(steps):
        pick = torch.randint(0, 64, (batch, seq // 16), generator=g)
        yield phrases[pick].reshape(batch, seq)


def build(variant: str, folder: str, device: torch.device, dtype: torch.dtype):
    import transformers

    torch.manual_seed(0)
    if variant == "qpeft":
        import qpeft

        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
        qpeft.prepare_model_for_kbit_training(model)
        return qpeft.get_peft_model(
            model,
            qpeft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=PROJECTIONS, compute_dtype=dtype),
        )
    import peft

    config = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=PROJECTIONS)
    checkpointing = {"use_reentrant": False}
    if variant.startswith("bnb_peft"):
        quant = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=quant, dtype=dtype, device_map={"": str(device)}
        )
        if variant == "bnb_peft_kbit":
            model = peft.prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs=checkpointing)
        else:  # frozen by get_peft_model; nothing upcast
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    return peft.get_peft_model(model, config)


def run_variant(
    variant: str, folder: str, device: torch.device, dtype: torch.dtype, batch: int, seq: int, steps: int, warmup: int
) -> dict:
    model = build(variant, folder, device, dtype)
    model.train()
    vocab = model.config.vocab_size
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    losses, times = train_steps(model, batches(vocab, batch, seq, steps + warmup), optimizer, device, warmup)
    times.sort()
    result = {
        "variant": variant,
        "steps": steps,
        "tokens_per_s": batch * seq / times[len(times) // 2],
        "loss_first": losses[0],
        "loss_last_20_mean": sum(losses[-20:]) / len(losses[-20:]),
        "loss_last_20_std": _std(losses[-20:]),
        "losses": losses,
    }
    result["peak_MB"] = peak_memory_mb(device)
    return result


def _std(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1))


def main() -> None:
    args = benchmark_args(
        __doc__,
        lambda p: (
            p.add_argument("--steps", type=int, default=None),
            p.add_argument("--size", default="small", choices=["small", "kernels"]),
            p.add_argument("--variant", default=None, help=argparse_hidden()),
            p.add_argument("--folder", default=None, help=argparse_hidden()),
        ),
    )
    device = args.device
    gpu = device.type == "cuda"
    kernels = not gpu and args.size == "kernels"
    if gpu:
        model_config, dtype, batch, seq, default_steps = GPU_LLAMA, torch.bfloat16, 4, 2048, 30
    elif kernels:
        from qpeft import functional as F

        dtype = torch.bfloat16 if F.detected_cpu_isa() == "avx512_bf16" else torch.float32
        model_config, batch, seq, default_steps = CPU_KERNELS_MODEL, 2, 256, 30
    else:
        model_config, dtype, batch, seq, default_steps = CPU_MODEL, torch.float32, 2, 128, 200
    steps = args.steps or default_steps
    if args.variant:  # child process: one variant, JSON on the last line of stdout
        print(json.dumps(run_variant(args.variant, args.folder, device, dtype, batch, seq, steps, warmup=3)))
        return
    import transformers

    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**model_config)).to(dtype).save_pretrained(folder)
        rows = []
        for variant in VARIANTS:
            cmd = [
                sys.executable,
                __file__,
                "--device",
                str(device),
                "--steps",
                str(steps),
                "--variant",
                variant,
                "--folder",
                folder,
                "--size",
                args.size,
            ]
            done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
            if done.returncode != 0:
                print(f"{variant} failed (reported, not invented):\n{done.stderr[-2000:]}")
                continue
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    by_name = {r["variant"]: r for r in rows}
    if "qpeft" in by_name and "bnb_peft" in by_name:
        q, b = by_name["qpeft"], by_name["bnb_peft"]
        noise = 2 * math.hypot(q["loss_last_20_std"], b["loss_last_20_std"]) / math.sqrt(20)
        q["loss_gap_vs_bnb_peft"] = q["loss_last_20_mean"] - b["loss_last_20_mean"]
        q["loss_within_noise"] = abs(q["loss_gap_vs_bnb_peft"]) <= max(noise, 0.02 * b["loss_last_20_mean"])
    for row in rows:  # every variant against the PROJECTIONS.md baseline set-up
        if "bnb_peft" in by_name:
            row["tokens_per_s_vs_bnb_peft"] = row["tokens_per_s"] / by_name["bnb_peft"]["tokens_per_s"]
            row["peak_vs_bnb_peft"] = row["peak_MB"] / by_name["bnb_peft"]["peak_MB"]
    print_table(
        rows,
        [
            "variant",
            "tokens_per_s",
            "peak_MB",
            "loss_first",
            "loss_last_20_mean",
            "loss_last_20_std",
            "tokens_per_s_vs_bnb_peft",
            "peak_vs_bnb_peft",
            "loss_within_noise",
        ],
    )
    for row in rows:
        row.update({"dtype": str(dtype).removeprefix("torch."), "batch": batch, "seq": seq, "model": model_config})
    print("wrote", write_results("e2e_kernels" if kernels else "e2e", device, rows, args.out))


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
