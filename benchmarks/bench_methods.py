"""A training step of every PEFT method on a 4-bit base: qpeft vs peft on a bitsandbytes 4-bit model vs peft on a
16/32-bit model, the same Llama-architecture model (random init, no downloads) and data: tokens/s, peak memory,
trainable parameters, loss first and last. Methods peft does not have (BitFit, layer-wise, sparse, bottleneck,
Piggyback) run in qpeft alone.

Each (method, variant) runs in its own process (so the CPU peak RSS is its own); the processes of a method run in
rounds, variants interleaved, and each reports the median step time of its steps. Gradient checkpointing
(non-reentrant) is on wherever peft allows it: peft refuses it with prefix tuning, so the prefix rows run without
(``checkpointing`` false in the JSON), plus a "qpeft_checkpointed" row of qpeft's prefix tuning with it.

    python benchmarks/bench_methods.py [--device cpu|cuda] [--steps N] [--rounds R] [--methods a,b] [--out DIR]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile

import torch

from harness import GPU_LLAMA, SMALL_LLAMA, benchmark_args, peak_memory_mb, print_table, train_steps, write_results

from qpeft.tuners import registry

METHODS = registry.names()
QPEFT_ONLY = {m.name for m in registry.METHODS.values() if m.peft_type.startswith("QPEFT_")}  # not in peft
STEPS_FOR_ADALORA = 40  # AdaLoRA's total_step: its budget phase spans the measured steps
VARIANTS = ["qpeft", "bnb_peft", "dense_peft", "qpeft_checkpointed"]
RANK = 16  # LoRA / AdaLoRA rank, virtual tokens, bottleneck width


def config(library, method: str, dtype: torch.dtype):
    """The method's registered default example (rank 16) in qpeft, or the same config in peft (``library``), made
    from the adapter_config.json qpeft writes for it."""
    ours = registry.by_name(method).examples["default"](r=RANK, steps=STEPS_FOR_ADALORA)
    if library.__name__ != "peft":
        ours.compute_dtype = dtype
        return ours
    return library.get_peft_config({**ours.to_peft_dict(), "inference_mode": False, "task_type": "CAUSAL_LM"})


def build(variant: str, method: str, folder: str, device: torch.device, dtype: torch.dtype):
    """(model, checkpointing used)."""
    import transformers

    torch.manual_seed(0)
    checkpointing = {"use_reentrant": False}
    # peft: prefix tuning "does not work with gradient checkpointing"
    use_checkpointing = method != "prefix-tuning" or variant == "qpeft_checkpointed"
    if variant.startswith("qpeft"):
        import qpeft

        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
        qpeft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=use_checkpointing)
        return qpeft.get_peft_model(model, config(qpeft, method, dtype)), use_checkpointing
    import peft

    if variant == "bnb_peft":
        quant = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=quant, dtype=dtype, device_map={"": str(device)}
        )
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
    if use_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
        model.enable_input_require_grads()
    return peft.get_peft_model(model, config(peft, method, dtype)), use_checkpointing


def run_variant(
    variant: str,
    method: str,
    folder: str,
    device: torch.device,
    dtype: torch.dtype,
    batch: int,
    seq: int,
    steps: int,
    warmup: int,
) -> dict:
    model, checkpointing = build(variant, method, folder, device, dtype)
    model.train()
    if method == "sparse":  # the gradient-magnitude warm-up, not timed
        g = torch.Generator().manual_seed(99)
        model.select_sparse_entries(
            [torch.randint(0, model.config.vocab_size, (batch, seq), generator=g) for _ in range(2)]
        )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4 if method in ("lora", "adalora") else 3e-2)
    g = torch.Generator().manual_seed(1234)
    phrases = torch.randint(0, model.config.vocab_size, (64, 16), generator=g)
    task = {"task_ids": torch.zeros(batch, dtype=torch.long, device=device)} if method.startswith("multitask") else {}
    batches = (
        phrases[torch.randint(0, 64, (batch, seq // 16), generator=g)].reshape(batch, seq)
        for _ in range(steps + warmup)
    )
    after_step = None
    if method == "adalora":  # the rank allocator, as each library is driven
        after_step = model.update_and_allocate if variant.startswith("qpeft") else model.base_model.update_and_allocate
    losses, times = train_steps(model, batches, optimizer, device, warmup, after_step, **task)
    peak = peak_memory_mb(device)
    return {
        "method": method,
        "variant": variant,
        "checkpointing": checkpointing,
        "steps": steps,
        "step_ms": 1e3 * statistics.median(times),
        "tokens_per_s": batch * seq / statistics.median(times),
        "peak_MB": peak,
        "trainable_params": sum(p.numel() for p in params),
        "loss_first": losses[0],
        "loss_last_5_mean": sum(losses[-5:]) / 5,
    }


def main() -> None:
    args = benchmark_args(
        __doc__,
        lambda p: (
            p.add_argument("--steps", type=int, default=12),
            p.add_argument("--rounds", type=int, default=2),
            p.add_argument("--methods", default=",".join(METHODS)),
            p.add_argument("--variant", default=None),
            p.add_argument("--method", default=None),
            p.add_argument("--folder", default=None),
        ),
    )
    device = args.device
    if device.type == "cuda":
        model_config, dtype, batch, seq = GPU_LLAMA, torch.bfloat16, 4, 1024
    else:
        from qpeft import functional as F

        dtype = torch.bfloat16 if F.detected_cpu_isa() == "avx512_bf16" else torch.float32
        model_config, batch, seq = SMALL_LLAMA, 2, 128
    if args.variant:  # child process: one run, JSON on the last line of stdout
        print(
            json.dumps(
                run_variant(args.variant, args.method, args.folder, device, dtype, batch, seq, args.steps, warmup=2)
            )
        )
        return
    import transformers

    runs: dict[tuple[str, str], list[dict]] = {}
    failures = {}
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**model_config)).to(dtype).save_pretrained(folder)
        for method in args.methods.split(","):
            for _ in range(args.rounds):
                variants = VARIANTS if method == "prefix-tuning" else VARIANTS[:-1]
                for variant in ["qpeft"] if method in QPEFT_ONLY else variants:
                    cmd = [
                        sys.executable,
                        __file__,
                        "--device",
                        str(device),
                        "--steps",
                        str(args.steps),
                        "--variant",
                        variant,
                        "--method",
                        method,
                        "--folder",
                        folder,
                    ]
                    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
                    if done.returncode != 0:
                        failures[f"{method}/{variant}"] = done.stderr[-1500:]
                        print(f"{method}/{variant} failed (reported, not invented):\n{done.stderr[-1500:]}")
                        continue
                    runs.setdefault((method, variant), []).append(json.loads(done.stdout.strip().splitlines()[-1]))
    rows = []
    for (method, variant), results in runs.items():
        row = dict(results[0])
        row["step_ms"] = statistics.median(r["step_ms"] for r in results)
        row["tokens_per_s"] = batch * seq / (row["step_ms"] / 1e3)
        row["peak_MB"] = statistics.median(r["peak_MB"] for r in results)
        row["rounds"] = len(results)
        rows.append(row)
    by_key = {(r["method"], r["variant"]): r for r in rows}
    for row in rows:
        for base in ("bnb_peft", "dense_peft"):
            other = by_key.get((row["method"], base))
            if other is not None:
                row[f"tokens_per_s_vs_{base}"] = row["tokens_per_s"] / other["tokens_per_s"]
                row[f"peak_vs_{base}"] = row["peak_MB"] / other["peak_MB"]
        row.update({"dtype": str(dtype).removeprefix("torch."), "batch": batch, "seq": seq, "model": model_config})
    print_table(
        rows,
        [
            "method",
            "variant",
            "checkpointing",
            "trainable_params",
            "tokens_per_s",
            "peak_MB",
            "tokens_per_s_vs_bnb_peft",
            "tokens_per_s_vs_dense_peft",
            "peak_vs_bnb_peft",
            "loss_first",
            "loss_last_5_mean",
        ],
    )
    if failures:
        rows.append({"failures": failures})
    print("wrote", write_results("methods", device, rows, args.out))


if __name__ == "__main__":
    main()
