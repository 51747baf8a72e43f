"""Loading a bf16 checkpoint straight to 4-bit: peak memory and time of transformers' from_pretrained with qpeft's
quantizer, with bitsandbytes' quantizer, and unquantized, each in its own process, at a real model shape.

The checkpoint (random init of the shape's config, bf16, sharded as the Hub's are) is made once and cached in
benchmarks/.cache/ (git-ignored). Peak memory is VmHWM: the whole resident set as the machine sees it, the
checkpoint's memory-mapped file pages included while they are mapped; load_peak is VmHWM less the resident set just
before from_pretrained (the interpreter with torch and transformers). The goal: load_peak <= the 4-bit model + the
largest checkpoint shard + 20%.

    python benchmarks/bench_quantizer.py [--shape llama-1b] [--shard-size 1GB]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from harness import SMALL_LLAMA, benchmark_args, print_table, write_results

CACHE = Path(__file__).resolve().parent / ".cache"
SHAPES = {  # transformers LlamaConfig fields
    "llama-1b": dict(  # Llama-3.2-1B's dimensions
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
    ),
    "small": SMALL_LLAMA,
}
VARIANTS = ("qpeft", "qpeft-no-mmap", "bitsandbytes", "bf16")


def checkpoint(shape: str, shard_size: str) -> Path:
    """The shape's random bf16 checkpoint, made once (filled tensor by tensor: no fp32 copy of the model)."""
    import transformers

    folder = CACHE / f"{shape}-{shard_size}"
    if (folder / "config.json").is_file():
        return folder
    config = transformers.LlamaConfig(**SHAPES[shape])
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model = model.to_empty(device="cpu")
    model.tie_weights()  # to_empty gave the tied head a tensor of its own
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=generator).mul_(0.02))
    model.save_pretrained(folder, max_shard_size=shard_size)
    return folder


def status(field: str) -> int:
    """A /proc/self/status field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's distinct tensors (parameters and buffers)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def load_one(variant: str, folder: Path) -> dict:
    """Runs in the child process: one load, its numbers."""
    import warnings

    import transformers

    import qpeft

    options = {
        "qpeft": dict(quantization_config=qpeft.QuantizationConfig()),
        "qpeft-no-mmap": dict(quantization_config=qpeft.QuantizationConfig(), disable_mmap=True),
        "bitsandbytes": dict(
            quantization_config=transformers.BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
            )
        ),
        "bf16": {},
    }[variant]
    baseline = status("VmRSS")  # the interpreter with torch and transformers imported
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, **options)
    seconds = time.perf_counter() - start
    return dict(
        variant=variant,
        load_s=round(seconds, 1),
        peak_GiB=status("VmHWM") / 2**30,
        load_peak_GiB=(status("VmHWM") - baseline) / 2**30,
        rss_after_GiB=status("VmRSS") / 2**30,
        file_pages_after_GiB=status("RssFile") / 2**30,  # the checkpoint's pages still mapped
        model_GiB=model_bytes(model) / 2**30,
    )


def main() -> None:
    def options(parser):
        parser.add_argument("--shape", default="llama-1b", choices=sorted(SHAPES))
        parser.add_argument("--shard-size", default="1GB")
        parser.add_argument("--child", default=None, help="internal: load with one variant, print its numbers")

    args = benchmark_args(__doc__.splitlines()[0], options)
    folder = checkpoint(args.shape, args.shard_size)
    if args.child:
        print(json.dumps(load_one(args.child, folder)))
        return
    shards = [f.stat().st_size for f in folder.glob("*.safetensors")]
    rows = []
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--shape", args.shape, "--shard-size", args.shard_size, "--child", variant]
        done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        if done.returncode:
            rows.append(dict(variant=variant, error=done.stderr.strip().splitlines()[-1][:200]))
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    four_bit = next(r for r in rows if r["variant"] == "qpeft")["model_GiB"]
    goal = (four_bit + max(shards) / 2**30) * 1.2
    for r in rows:
        if "peak_GiB" in r:
            r["load_peak_over_goal"] = r["load_peak_GiB"] / goal
    print(f"{args.shape}: checkpoint {sum(shards) / 2**30:.2f} GiB in {len(shards)} shards (largest "
          f"{max(shards) / 2**30:.2f} GiB); goal: peak <= {goal:.2f} GiB")  # fmt: skip
    print_table(
        rows,
        [
            "variant",
            "load_s",
            "peak_GiB",
            "load_peak_GiB",
            "rss_after_GiB",
            "file_pages_after_GiB",
            "model_GiB",
            "load_peak_over_goal",
            "error",
        ],
    )
    extra = dict(shape=args.shape, checkpoint_GiB=sum(shards) / 2**30, largest_shard_GiB=max(shards) / 2**30)
    write_results(f"quantizer_{args.shape}", args.device, [dict(extra, **r) for r in rows])


if __name__ == "__main__":
    main()
