"""Shared benchmark harness: timing, environment metadata, and JSON output.

GPU work is timed with CUDA events after warm-up, the median of many repetitions; CPU work with
time.perf_counter, also a median. Variants compared side by side are timed in interleaved rounds
(median_times_ms). Every benchmark writes one JSON file to benchmarks/results/ with the
environment it ran in, so committed numbers say where they came from.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# The benchmarks' models (transformers LlamaConfig fields) and the LoRA targets they all use.
GPU_LLAMA = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=8,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=32000,
    max_position_embeddings=2048,
)
SMALL_LLAMA = dict(
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    vocab_size=2000,
    max_position_embeddings=512,
)
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def bitsandbytes_nf4(dense: torch.nn.Linear, dtype: torch.dtype) -> torch.nn.Module:
    """bitsandbytes' Linear4bit (NF4, double quant, no bias, ``dtype`` compute) holding ``dense``'s weight, on its
    device. Raises where bitsandbytes is missing or fails."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(
        dense.in_features,
        dense.out_features,
        bias=False,
        compute_dtype=dtype,
        quant_type="nf4",
        compress_statistics=True,
    )
    layer.weight = bnb.nn.Params4bit(
        dense.weight.data.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True
    )
    return layer.to(dense.weight.device)


def benchmark_args(description: str, add_options=None) -> argparse.Namespace:
    """The common command line: --device (default: cuda when available) and --out (default: results/)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None)
    if add_options is not None:
        add_options(parser)
    args = parser.parse_args()
    args.device = torch.device(args.device)
    return args


def _timed_call_ms(fn: Callable[[], object], device: torch.device) -> float:
    """One call of ``fn`` in milliseconds: CUDA events around it on a GPU, perf_counter on the CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def median_time_ms(fn: Callable[[], object], device: torch.device, warmup: int = 10, reps: int = 50) -> float:
    """Median wall time of ``fn()`` in milliseconds (CUDA events on a GPU, perf_counter on the CPU)."""
    return median_times_ms({"fn": fn}, device, warmup, reps)["fn"]


def median_times_ms(
    fns: dict[str, Callable[[], object]], device: torch.device, warmup: int = 10, reps: int = 50
) -> dict[str, float]:
    """Median time in ms of each of several functions compared side by side, timed in interleaved rounds (one
    call of each per round, after ``warmup`` rounds): a slow spell of a shared machine then hits every variant
    alike instead of whichever happened to run during it (on the 2-core CI kind, back-to-back blocks of the same
    layer moved by 30-50% between runs)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(_timed_call_ms(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


def environment(device: torch.device) -> dict:
    import qpeft

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "qpeft": qpeft.build_info(),
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "cpu": cpu_description(),
    }
    try:
        import bitsandbytes

        env["bitsandbytes"] = bitsandbytes.__version__
    except Exception:  # bitsandbytes missing or broken on this machine: baselines are left out, and said so
        env["bitsandbytes"] = None
    return env


def cpu_description() -> dict:
    """The CPU the numbers come from: model, the SIMD flags that select kernels, qpeft's CPU kernel level (detected
    and active: QPEFT_CPU_ISA may cap it) and torch's own dispatch level."""
    from qpeft import functional as F
    from qpeft.cli import cpu_features

    model = None
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        pass
    return {
        "model": model or platform.processor(),
        "flags": cpu_features(),
        "qpeft_cpu_isa": F.cpu_isa(),
        "qpeft_cpu_isa_detected": F.detected_cpu_isa(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def write_results(name: str, device: torch.device, rows: list[dict], out_dir: Path | None = None) -> Path:
    out_dir = Path(out_dir or RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = "cuda" if device.type == "cuda" else "cpu"
    path = out_dir / f"{name}_{tag}.json"
    path.write_text(json.dumps({"benchmark": name, "environment": environment(device), "rows": rows}, indent=2) + "\n")
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.rjust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).rjust(widths[c]) for c in columns))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def train_steps(
    model, batches, optimizer, device: torch.device, warmup: int, after_step=None, **forward_kwargs
) -> tuple[list[float], list[float]]:
    """One causal-LM training step (labels = input_ids) per batch, ``after_step(step)`` (if given) between the
    optimizer step and zero_grad: (every loss, the wall time in seconds of each step after ``warmup``). CUDA peak
    memory statistics are reset first."""
    losses, times = [], []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for step, ids in enumerate(batches):
        ids = ids.to(device)
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids, **forward_kwargs).loss
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step(step)
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        losses.append(loss.item())
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return losses, times


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated CUDA memory on a GPU, this process's peak RSS on the CPU (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
