"""The ``qpeft`` command.

qpeft info                 build (version, CUDA kernels and archs), torch, devices, CPU SIMD features
qpeft demo [--steps N] [--method M]
                           fine-tuning of a small 4-bit Llama built from an embedded config on embedded text
                           (QLoRA by default, or any method qpeft has: see --help): progress bar, loss, time and
                           peak memory; runs on a laptop CPU in about a minute
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time

import torch

# The demo's model (Llama architecture, random init, byte-level vocabulary) and data: no downloads.
DEMO_MODEL = dict(
    hidden_size=128,
    intermediate_size=352,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=256,
)
DEMO_TEXT = (
    "QLoRA fine-tunes a large model by freezing its weights in four bits and training small low-rank adapters. "
    "The frozen weights are stored as NF4 codes with one scale per block of sixty-four values; the scales are "
    "themselves quantized to eight bits. Each adapter adds two thin matrices to a linear layer, so the number of "
    "trainable parameters is a fraction of a percent of the model. Dropout on the adapter input regularizes "
    "training; the mask is regenerated from a seed in the backward pass instead of being stored. "
)


def cpu_features() -> list[str]:
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    wanted = [
        "sse4_2",
        "avx",
        "avx2",
        "fma",
        "f16c",
        "avx512f",
        "avx512bw",
        "avx512vl",
        "avx512dq",
        "avx512vbmi",
        "avx512_bf16",
        "avx512_fp16",
        "amx_tile",
        "amx_bf16",
    ]
    return [f for f in wanted if f in flags]


def info(_args) -> int:
    import qpeft

    build = qpeft.build_info()
    report = {
        "qpeft": qpeft.__version__,
        "build": build,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cpu": platform.processor() or platform.machine(),
        "cpu_features": cpu_features(),
        "cpu_kernels": {"detected": qpeft.functional.detected_cpu_isa(), "active": qpeft.functional.cpu_isa()},
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available() and not build.get("cuda"):
        report["warning"] = "torch has CUDA but qpeft was built without CUDA kernels: reinstall qpeft"
    print(json.dumps(report, indent=2, default=str))
    return 0


def demo_batches(batch: int, seq: int, steps: int, generator: torch.Generator):
    data = torch.tensor(list(DEMO_TEXT.encode()), dtype=torch.long)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=generator)
        yield torch.stack([data[s : s + seq] for s in starts])


def demo_config(method: str, r: int, dtype: torch.dtype, steps: int):
    """The adapter config of ``qpeft demo --method``: the method's registered default example."""
    from .tuners import registry

    config = registry.by_name(method).examples["default"](r=r, steps=steps)
    config.compute_dtype = dtype
    return config


def demo(args) -> int:
    import transformers
    from tqdm import tqdm

    import qpeft

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(args.seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**DEMO_MODEL)).to(device, dtype)
    qpeft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.checkpointing)
    config = demo_config(args.method, args.r, dtype, args.steps)
    model = qpeft.get_peft_model(model, config)
    verbs = model.active_method.verbs
    multitask = hasattr(config, "num_tasks")
    if model.active_method.warmup:  # e.g. sparse entries by gradient magnitude: two warm-up batches
        warmup = demo_batches(args.batch, args.seq, 2, torch.Generator().manual_seed(args.seed + 1))
        getattr(model, model.active_method.warmup)([ids.to(device) for ids in warmup])
    model.print_trainable_parameters()
    model.train()
    lr = args.lr or model.active_method.example_lr
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses, start = [], time.perf_counter()
    batches = demo_batches(args.batch, args.seq, args.steps, torch.Generator().manual_seed(args.seed))
    with tqdm(batches, total=args.steps, desc="qpeft demo", file=sys.stdout, disable=args.quiet) as bar:
        for ids in bar:
            ids = ids.to(device)
            task = {"task_ids": torch.zeros(ids.shape[0], dtype=torch.long, device=device)} if multitask else {}
            loss = model(input_ids=ids, labels=ids, **task).loss
            loss.backward()
            optimizer.step()
            if "update_and_allocate" in verbs:
                model.update_and_allocate(len(losses))
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    seconds = time.perf_counter() - start
    tokens = args.steps * args.batch * args.seq
    result = {
        "method": args.method,
        "device": str(device),
        "steps": args.steps,
        "loss_first": losses[0],
        "loss_last_10_mean": sum(losses[-10:]) / len(losses[-10:]),
        "tokens_per_s": tokens / seconds,
        "peak_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if device.type == "cuda":
        result["cuda_peak_MB"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(result, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    from .tuners import registry

    parser = argparse.ArgumentParser(
        prog="qpeft", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="build, CUDA and CPU facts").set_defaults(run=info)
    d = commands.add_parser("demo", help="fine-tune a small model end to end on built-in data")
    d.add_argument("--steps", type=int, default=60)
    d.add_argument("--batch", type=int, default=4)
    d.add_argument("--seq", type=int, default=96)
    d.add_argument("--method", choices=registry.names(), default="lora", help="PEFT method (default: lora)")
    d.add_argument(
        "--r",
        type=int,
        default=16,
        help="LoRA / AdaLoRA initial rank, the number of virtual tokens, or the bottleneck width",
    )
    d.add_argument("--lr", type=float, default=None, help="default: the method's example_lr (3e-3 or 3e-2)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    d.add_argument(
        "--no-checkpointing", dest="checkpointing", action="store_false", help="turn gradient checkpointing off"
    )
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.set_defaults(run=demo)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
