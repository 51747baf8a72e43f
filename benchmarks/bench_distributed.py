"""Training on several CPU processes (gloo): per-rank bytes of the frozen 4-bit base and the step time of a
QPeftModel (LoRA r=16, all projections) on 1 and 2 ranks, under DDP (the base replicated) and FSDP2
(qpeft.distributed.fully_shard_model: the base's codes and scales sharded), the same global batch per step; and
loading the 4-bit checkpoint: whole on every rank (load_4bit_pretrained, then sharded) or each rank its rows
(load_4bit_sharded): checkpoint bytes read per rank and seconds.

    python benchmarks/bench_distributed.py [--steps N] [--out DIR]
"""

from __future__ import annotations

import os
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from harness import PROJECTIONS, SMALL_LLAMA, benchmark_args, print_table, write_results

GLOBAL_BATCH, SEQ = 4, 128


def local_bytes(t: torch.Tensor) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def lora_config():
    import qpeft

    return qpeft.LoraConfig(r=16, lora_alpha=32, target_modules=PROJECTIONS)


def write_checkpoint(folder: str) -> None:
    """The benchmark's model, random bf16 weights, its projections in NF4 (double quantization, bf16 compute)."""
    import transformers

    import qpeft
    from qpeft.nn import Linear4bit
    from qpeft.tuners.targets import linear_modules, set_submodule

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL_LLAMA)).to(torch.bfloat16)
    for name in linear_modules(model):
        set_submodule(model, name, Linear4bit.from_linear(model.get_submodule(name), compute_dtype=torch.bfloat16))
    qpeft.save_4bit_pretrained(model, folder)


def worker(rank, world, sharding, port, steps, checkpoint, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
        import qpeft
        from qpeft.nn import Linear4bit

        from qpeft.checkpoint import SafetensorsFolder

        readers = []
        opened = SafetensorsFolder.__init__
        SafetensorsFolder.__init__ = lambda self, *a: (opened(self, *a), readers.append(self))[0]

        from torch.distributed.device_mesh import init_device_mesh

        torch.manual_seed(0)
        start = time.perf_counter()
        if sharding == "fsdp2_sharded_load":
            mesh = init_device_mesh("cpu", (world,))
            model = qpeft.distributed.load_4bit_sharded(checkpoint, lora_config(), mesh=mesh)
        else:
            model = qpeft.get_peft_model(qpeft.load_4bit_pretrained(checkpoint), lora_config())
            if sharding == "fsdp2":
                qpeft.distributed.fully_shard_model(model, init_device_mesh("cpu", (world,)))
        load_s = time.perf_counter() - start
        read = sum(reader.bytes_read for reader in readers)
        trained = torch.nn.parallel.DistributedDataParallel(model) if sharding == "ddp" else model
        base = sum(
            local_bytes(t)
            for m in model.modules()
            if isinstance(m, Linear4bit)
            for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))
        )
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        g = torch.Generator().manual_seed(1)
        times = []
        for step in range(steps + 2):
            ids = torch.randint(0, SMALL_LLAMA["vocab_size"], (GLOBAL_BATCH, SEQ), generator=g).chunk(world)[rank]
            start = time.perf_counter()
            trained(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
            dist.barrier()
            if step >= 2:
                times.append(time.perf_counter() - start)
        if rank == 0:
            with open(out, "w") as f:
                f.write(f"{base} {statistics.median(times)} {read} {load_s}")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    args = benchmark_args(__doc__, lambda p: p.add_argument("--steps", type=int, default=8))
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = os.path.join(folder, "checkpoint")
        write_checkpoint(checkpoint)
        for sharding in ("ddp", "fsdp2", "fsdp2_sharded_load"):
            for world in (1, 2):
                out = os.path.join(folder, f"{sharding}{world}")
                mp.spawn(worker, args=(world, sharding, free_port(), args.steps, checkpoint, out), nprocs=world)
                base, step, read, load_s = open(out).read().split()
                rows.append(
                    {
                        "sharding": sharding,
                        "ranks": world,
                        "base_MB_per_rank": int(base) / 2**20,
                        "step_ms": 1e3 * float(step),
                        "tokens_per_s": GLOBAL_BATCH * SEQ / float(step),
                        "checkpoint_MB_read_per_rank": int(read) / 2**20,
                        "load_s": float(load_s),
                    }
                )
    print_table(
        rows,
        ["sharding", "ranks", "base_MB_per_rank", "step_ms", "tokens_per_s", "checkpoint_MB_read_per_rank", "load_s"],
    )
    for row in rows:
        row.update({"model": SMALL_LLAMA, "global_batch": GLOBAL_BATCH, "seq": SEQ, "dtype": "bfloat16"})
    print("wrote", write_results("distributed", torch.device("cpu"), rows, args.out))


if __name__ == "__main__":
    main()
