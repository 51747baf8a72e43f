"""Data parallelism on torch.distributed: a QPeftModel under DistributedDataParallel with 2 CPU ranks (gloo,
spawned by the test, bounded in time) trains to the same adapter weights and loss as one process on the same
global batch; only the trainable parameters are reduced; save_pretrained writes from rank 0 only."""

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


def worker(rank, method, port, folder, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        model = build(method)
        reduced = []
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        for p in ddp.parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(lambda p: reduced.append(p.numel()))
        losses = train(ddp, global_batches(), rank, WORLD)
        # the mean of the ranks' losses is the global batch's (equal halves)
        stacked = torch.stack(losses)
        dist.all_reduce(stacked)
        model.save_pretrained(f"{folder}{rank}")  # written by rank 0 alone
        trained = {n: p.detach().clone().contiguous() for n, p in model.named_parameters() if p.requires_grad}
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
