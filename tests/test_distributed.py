"""torch.distributed with 2 CPU ranks (gloo, spawned by the test, bounded in time): a QPeftModel under
DistributedDataParallel, and sharded with FSDP2 (fully_shard, the 4-bit codes and scales split across ranks), trains
to the same adapter weights and loss as one process on the same global batch; DDP reduces only the trainable
parameters; save_pretrained writes from rank 0 only."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from safetensors.torch import load_file, save_file

import qpeft

from helpers import tiny_llama

pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available (not run: this is not a pass)")

WORLD = 2
STEPS = 3
CONFIGS = {
    "lora": lambda: qpeft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    "ia3": lambda: qpeft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "prefix": lambda: qpeft.PrefixTuningConfig(num_virtual_tokens=4),
}


def global_batches():
    g = torch.Generator().manual_seed(11)
    return [torch.randint(0, 101, (2 * WORLD, 12), generator=g) for _ in range(STEPS)]


def build(method):
    model = qpeft.get_peft_model(tiny_llama(), CONFIGS[method]())
    torch.manual_seed(5)
    with torch.no_grad():  # away from the identity init, so every trainable tensor gets a gradient
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model


def train(model, batches, rank=0, world=1):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for ids in batches:
        local = ids.chunk(world)[rank]
        loss = model(input_ids=local, labels=local).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return losses


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank, method, port, folder, out, sharding="ddp"):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        model = build(method)
        reduced = []
        if sharding == "ddp":
            wrapped = torch.nn.parallel.DistributedDataParallel(model)
            for p in wrapped.parameters():
                if p.requires_grad:
                    p.register_post_accumulate_grad_hook(lambda p: reduced.append(p.numel()))
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import MixedPrecisionPolicy
            qpeft.distributed.prepare_fsdp(model)  # (fully_shard_model does it too)
            rows = {n: p.shape[0] for n, p in model.named_parameters() if p.dim()}
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16) if sharding == "fsdp_bf16" else None
            wrapped = qpeft.distributed.fully_shard_model(model, init_device_mesh("cpu", (WORLD,)),
                                                          **({"mp_policy": policy} if policy else {}))
            four_bit = [n for n, _ in model.named_parameters() if n.endswith((".base.weight", ".base.weight_absmax"))]
            assert four_bit
            for name, p in model.named_parameters():
                if name in four_bit:  # this rank's rows of the packed codes and of their scales
                    assert p.to_local().shape[0] <= -(-rows[name] // WORLD) < rows[name], name
            q = model.base_model.model.layers[0].self_attn.q_proj.base
            assert q.weight.dtype == torch.uint8 and isinstance(q.weight_absmax, torch.nn.Parameter)
            reduced.append(-1)
        losses = train(wrapped, global_batches(), rank, WORLD)
        # the mean of the ranks' losses is the global batch's (equal halves)
        stacked = torch.stack(losses)
        dist.all_reduce(stacked)
        if sharding == "ddp":
            model.save_pretrained(f"{folder}{rank}")  # written by rank 0 alone
        trained = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone().contiguous()
                   for n, p in model.named_parameters() if p.requires_grad}
        save_file({**trained, "losses": stacked / WORLD, "reduced": torch.tensor(sum(reduced))},
                  f"{out}/rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", list(CONFIGS))
def test_ddp_training_equals_one_process_on_the_global_batch(method, tmp_path):
    reference = build(method)
    losses = torch.stack(train(reference, global_batches()))
    expected = {n: p.detach() for n, p in reference.named_parameters() if p.requires_grad}
    trainable = sum(p.numel() for p in expected.values())
    ctx = mp.get_context("spawn")
    folder = tmp_path / "adapter"
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, method, port, str(folder), str(tmp_path))) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
        if p.is_alive():
            p.kill()
        assert p.exitcode == 0
    for rank in range(WORLD):
        trained = load_file(str(tmp_path / f"rank{rank}.safetensors"))
        ddp_losses, reduced = trained.pop("losses"), int(trained.pop("reduced"))
        torch.testing.assert_close(ddp_losses, losses, rtol=1e-5, atol=1e-6)
        assert trained.keys() == expected.keys()
        for name, p in expected.items():
            torch.testing.assert_close(trained[name], p, rtol=1e-4, atol=1e-6)
        assert reduced == STEPS * trainable  # every trainable tensor reduced each step, nothing else
    assert sorted(os.listdir(f"{folder}0")) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not os.path.exists(f"{folder}1")
    loaded = qpeft.QPeftModel.from_pretrained(tiny_llama(), f"{folder}0")
    ids = global_batches()[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-5,
                                   atol=1e-5)


@pytest.mark.parametrize("sharding", ["fsdp", "fsdp_bf16"])
def test_fsdp2_sharded_4bit_training_equals_one_process(sharding, tmp_path):
    """FSDP2 on each decoder layer and the model: every rank holds half of each 4-bit weight's packed bytes and
    scales; the adapters train as on one process (bf16 mixed precision: within bf16 rounding, packed bytes left
    uint8)."""
    reference = build("lora")
    losses = torch.stack(train(reference, global_batches()))
    expected = {n: p.detach() for n, p in reference.named_parameters() if p.requires_grad}
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, "lora", port, str(tmp_path / "a"), str(tmp_path), sharding))
             for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
        if p.is_alive():
            p.kill()
        assert p.exitcode == 0
    tol = dict(rtol=1e-5, atol=1e-6) if sharding == "fsdp" else dict(rtol=2e-2, atol=2e-3)
    for rank in range(WORLD):
        trained = load_file(str(tmp_path / f"rank{rank}.safetensors"))
        torch.testing.assert_close(trained.pop("losses"), losses, **tol)
        trained.pop("reduced")
        assert trained.keys() == expected.keys()
        for name, p in expected.items():
            torch.testing.assert_close(trained[name], p, **(dict(rtol=1e-4, atol=1e-6) if sharding == "fsdp"
                                                           else dict(rtol=5e-2, atol=5e-3)))

