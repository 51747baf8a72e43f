"""QLoRA layer: forward, forward+backward and memory, qpeft vs dense frozen linear vs bitsandbytes + peft,
side by side in one run. LoRA r=16, dropout 0.05 (qpeft and peft), NF4 double-quantized base. On a GPU, qpeft
is measured twice: with the CUDA-core LoRA-branch kernels (qpeft_*) and the tensor-core ones (qpeft_tc_*).

"saved_MB" is what the layer keeps for backward beyond its input and parameters (saved-tensor hooks);
on a GPU "peak_MB" is the CUDA peak of one forward+backward. Times: median ms (harness) of the variants timed in
interleaved rounds (one call of each per round), eager calls: the host's
launch overhead counts where it exceeds the GPU's work. On a GPU the training step is also timed replayed from
CUDA graphs (torch.cuda.make_graphed_callables: *_fb_graph_ms), which leaves the device time alone.

    python benchmarks/bench_lora_layer.py [--device cpu|cuda] [--out DIR]
"""

from __future__ import annotations

import torch

from harness import benchmark_args, bitsandbytes_nf4, median_time_ms, median_times_ms, print_table, write_results

from qpeft import functional as F
from qpeft.nn import LoraLinear4bit

CPU_CASES = [(1, 2048, 2048), (256, 2048, 2048), (1024, 2048, 2048), (1024, 4096, 4096)]  # TARGETS.md's + issue 15
GPU_CASES = [(m, 4096, 4096) for m in (1, 16, 4096, 16384)] + [
    (4096, 4096, 14336),
    (4096, 14336, 4096),
    (16384, 4096, 14336),
    (16384, 14336, 4096),
]
R, ALPHA, DROPOUT = 16, 32, 0.05


def peft_on_bnb(dense: torch.nn.Linear, dtype: torch.dtype, config=None):
    """bitsandbytes Linear4bit (NF4, double quant) of the module "proj" wrapped by peft (``config``, default this
    benchmark's LoRA), or None with the reason printed."""
    try:
        import peft

        class Holder(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.proj = bitsandbytes_nf4(dense, dtype)

            def forward(self, x):
                return self.proj(x)

        holder = Holder()
        if config is None:
            config = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=["proj"])
        return peft.get_peft_model(holder, config).train()
    except Exception as e:  # a missing or broken baseline is reported, never invented
        print(f"bitsandbytes + peft baseline unavailable: {type(e).__name__}: {e}")
        return None


def saved_bytes(module: torch.nn.Module, x: torch.Tensor) -> int:
    known = {t.untyped_storage().data_ptr() for t in list(module.parameters()) + list(module.buffers()) + [x]}
    extra = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in known:
            extra[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(extra.values())


def graphed_forward_ms(module, x, reps) -> float | None:
    """Inference forward (eval, no grad) replayed from a CUDA graph: the device time without the Python launch
    overhead, the fair comparison at decode sizes (M <= 16). None when the module cannot be captured."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            xs = x.detach()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    module(xs)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                module(xs)
            return median_time_ms(graph.replay, x.device, reps=reps)
    except Exception as e:  # reported, not invented
        print(f"CUDA graph capture failed for {type(module).__name__}: {type(e).__name__}: {e}")
        return None
    finally:
        module.train(was_training)


def graphed_fb_ms(module, x, reps) -> float | None:
    """Forward + backward of a training step replayed from CUDA graphs (torch.cuda.make_graphed_callables, which
    a user can apply to a layer the same way), or None when the module cannot be captured. The module's forward
    is restored afterwards."""
    own_forward = module.__dict__.get("forward")
    try:
        graphed = torch.cuda.make_graphed_callables(module, (x,))
        grad = torch.randn_like(graphed(x))
        return median_time_ms(lambda: graphed(x).backward(grad), x.device, reps=reps)
    except Exception as e:  # reported, not invented
        print(f"CUDA graph capture of the training step failed for {type(module).__name__}: {type(e).__name__}: {e}")
        return None
    finally:
        if own_forward is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = own_forward


def peak_memory_MB(module, x, grad, device) -> float | None:
    """CUDA peak of one forward + backward above what was allocated before it (None on the CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    module(x).backward(grad)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def measure(variants: dict, x, device, reps) -> dict[str, tuple]:
    """(fwd ms, fb ms, saved MB, peak MB) of each variant {name: (module, cuda LoRA kernel kind or None)}, the
    times from interleaved rounds (harness.median_times_ms); each call first selects its variant's kernels."""
    grad = torch.randn_like(next(iter(variants.values()))[0](x))

    def call(module, kernels, backward):
        def run():
            if kernels is not None:
                F.set_cuda_lora_kernels(kernels)
            y = module(x)
            if backward:
                y.backward(grad)

        return run

    fns = {}
    for name, (module, kernels) in variants.items():
        fns[f"{name}_fwd"] = call(module, kernels, backward=False)
        fns[f"{name}_fb"] = call(module, kernels, backward=True)
    times = median_times_ms(fns, device, warmup=10 if device.type == "cuda" else 3, reps=reps)
    results = {}
    for name, (module, kernels) in variants.items():
        if kernels is not None:
            F.set_cuda_lora_kernels(kernels)
        results[name] = (
            times[f"{name}_fwd"],
            times[f"{name}_fb"],
            saved_bytes(module, x) / 2**20,
            peak_memory_MB(module, x, grad, device),
        )
    if device.type == "cuda":
        F.set_cuda_lora_kernels("cuda_cores")
    return results


def main() -> None:
    args = benchmark_args(
        __doc__,
        lambda parser: parser.add_argument(
            "--dtype",
            default=None,
            choices=["bfloat16", "float16", "float32"],
            help="default: bfloat16 on a GPU and on CPUs with AVX512_BF16, else float32 (CPUs without it run bf16 "
            "GEMMs tens of times slower, which would swamp every column)",
        ),
    )
    device = args.device
    cases, reps = (GPU_CASES, 50) if device.type == "cuda" else (CPU_CASES, 15)
    bf16_cpu = F.detected_cpu_isa() == "avx512_bf16"
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" or bf16_cpu else "float32"))
    rows = []
    for m, k, n in cases:
        dense = torch.nn.Linear(k, n, bias=False, dtype=dtype, device=device).requires_grad_(False)
        ours = LoraLinear4bit.from_linear(dense, r=R, alpha=ALPHA, dropout=DROPOUT).train()
        theirs = peft_on_bnb(dense, dtype)
        x = torch.randn(m, k, dtype=dtype, device=device, requires_grad=True)
        # On a GPU the qpeft_* columns use the CUDA-core LoRA kernels whatever the environment says, and qpeft_tc
        # is the same module with the tensor-core ones.
        gpu = device.type == "cuda"
        variants = {"dense": (dense, None), "qpeft": (ours, "cuda_cores" if gpu else None)}
        if gpu:
            variants["qpeft_tc"] = (ours, "tensor_cores")
        if theirs is not None:
            variants["bnb_peft"] = (theirs, None)
        results = measure(variants, x, device, reps)
        row = {"M": m, "K": k, "N": n, "dtype": str(dtype).removeprefix("torch.")}
        for name, (fwd, fb, saved, peak) in results.items():
            row.update({f"{name}_fwd_ms": fwd, f"{name}_fb_ms": fb, f"{name}_saved_MB": saved, f"{name}_peak_MB": peak})
        if device.type == "cuda" and m <= 16:
            for name, module in (("dense", dense), ("qpeft", ours), ("bnb_peft", theirs)):
                row[f"{name}_fwd_graph_ms"] = graphed_forward_ms(module, x, reps) if module is not None else None
            if row["qpeft_fwd_graph_ms"] is not None and row["dense_fwd_graph_ms"] is not None:
                row["qpeft_fwd_graph_vs_dense"] = row["qpeft_fwd_graph_ms"] / row["dense_fwd_graph_ms"]
        if device.type == "cuda":  # training step without host overhead: CUDA-graph replays
            # (bitsandbytes + peft is left out: a capture that fails inside a library can leave the stream unusable
            # for the cases after it)
            for name, module in (("dense", dense), ("qpeft", ours), ("qpeft_tc", ours)):
                F.set_cuda_lora_kernels("tensor_cores" if name == "qpeft_tc" else "cuda_cores")
                row[f"{name}_fb_graph_ms"] = graphed_fb_ms(module, x, reps)
            F.set_cuda_lora_kernels("cuda_cores")
            for name in ("qpeft", "qpeft_tc"):
                if row[f"{name}_fb_graph_ms"] is not None and row["dense_fb_graph_ms"] is not None:
                    row[f"{name}_fb_graph_vs_dense"] = row[f"{name}_fb_graph_ms"] / row["dense_fb_graph_ms"]
        row["qpeft_fb_vs_dense"] = row["qpeft_fb_ms"] / row["dense_fb_ms"]
        if "qpeft_tc" in results:
            row["qpeft_tc_fb_vs_dense"] = row["qpeft_tc_fb_ms"] / row["dense_fb_ms"]
            row["qpeft_tc_fwd_vs_dense"] = row["qpeft_tc_fwd_ms"] / row["dense_fwd_ms"]
        row["qpeft_fwd_vs_dense"] = row["qpeft_fwd_ms"] / row["dense_fwd_ms"]
        row["bnb_peft_fwd_vs_qpeft"] = row["bnb_peft_fwd_ms"] / row["qpeft_fwd_ms"] if "bnb_peft" in results else None
        row["bnb_peft_fb_vs_qpeft"] = row["bnb_peft_fb_ms"] / row["qpeft_fb_ms"] if "bnb_peft" in results else None
        rows.append(row)
    print_table(
        rows,
        [
            "M",
            "K",
            "N",
            "dtype",
            "dense_fwd_ms",
            "qpeft_fwd_ms",
            "bnb_peft_fwd_ms",
            "dense_fb_ms",
            "qpeft_fb_ms",
            "bnb_peft_fb_ms",
            "qpeft_tc_fwd_ms",
            "qpeft_tc_fb_ms",
            "qpeft_fwd_vs_dense",
            "bnb_peft_fwd_vs_qpeft",
            "qpeft_fb_vs_dense",
            "qpeft_tc_fb_vs_dense",
            "bnb_peft_fb_vs_qpeft",
            "qpeft_saved_MB",
            "bnb_peft_saved_MB",
            "qpeft_peak_MB",
            "bnb_peft_peak_MB",
        ],
    )
    graphed = [r for r in rows if "dense_fb_graph_ms" in r]
    if graphed:
        print("training step (forward + backward) replayed from CUDA graphs (ms):")
        print_table(
            graphed,
            [
                "M",
                "K",
                "N",
                "dense_fb_graph_ms",
                "qpeft_fb_graph_ms",
                "qpeft_tc_fb_graph_ms",
                "qpeft_fb_graph_vs_dense",
                "qpeft_tc_fb_graph_vs_dense",
            ],
        )
    small = [r for r in rows if "qpeft_fwd_graph_ms" in r]
    if small:
        print("inference forward replayed from a CUDA graph (ms):")
        print_table(
            small,
            [
                "M",
                "K",
                "N",
                "dense_fwd_graph_ms",
                "qpeft_fwd_graph_ms",
                "bnb_peft_fwd_graph_ms",
                "qpeft_fwd_graph_vs_dense",
            ],
        )
    print("wrote", write_results(f"lora_layer_{str(dtype).removeprefix('torch.')}", device, rows, args.out))


if __name__ == "__main__":
    main()
