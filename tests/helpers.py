"""Helpers shared by the tests."""

import copy
import json

import torch

from qpeft import reference as R


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 on the CPU (the norm of b floored at 1e-30)."""
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def dropped64(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """drop(x) in float64 with the reference mask (counters = row-major index of the [M, K] input)."""
    if p == 0:
        return x.double()
    keep = R.dropout_keep_mask(x.shape, p, seed).to(x.device)
    return torch.where(keep, x.double() / (1 - p), torch.zeros((), dtype=torch.float64, device=x.device))


def poison_allocator(device: torch.device, nbytes: int) -> None:
    """Fill and free blocks of the sizes an op is about to allocate, so that an output element the kernel
    forgets to write holds 0xFF garbage (NaN for floats) instead of fresh zeros (caching allocators and malloc
    hand the same memory back)."""
    for size in (nbytes, max(1, nbytes // 2), max(1, nbytes // 4)):
        t = torch.full((size,), 0xFF, dtype=torch.uint8, device=device)
        del t


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """dtype, shape and every byte equal (unlike torch.equal, packed bytes that read as NaN compare equal)."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))
    )


def same_state(a: dict, b: dict) -> bool:
    """Two 4-bit state dicts hold the same keys and bytes; code books compare by value (bitsandbytes' FP4 book
    holds -0.0 where qpeft's holds 0.0)."""
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if k.endswith("quant_map") else same_bytes(a[k], b[k]) for k in a
    )


def reference_weight_4bit(sd: dict, prefix: str = "", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense weight that a bitsandbytes 4-bit state dict (``<prefix>weight``, ``weight.absmax``, ...)
    describes, decoded from its bytes and JSON with qpeft.reference alone: the format's definition, the same on
    every CPU (bitsandbytes' own CPU dequantize and forward are not: they differ by instruction set)."""
    key = next(k for k in sd if k.startswith(prefix + "weight.quant_state.bitsandbytes__"))
    state = json.loads(bytes(sd[key].tolist()))
    absmax = sd[prefix + "weight.absmax"]
    if "nested_offset" in state:
        absmax = R.dequantize_nested_absmax(
            absmax, sd[prefix + "weight.nested_absmax"], sd[prefix + "weight.nested_quant_map"], state["nested_offset"]
        )
    packed = sd[prefix + "weight"].contiguous().reshape(-1).view(torch.uint8)
    assert torch.equal(sd[prefix + "weight.quant_map"], R.code_book(state["quant_type"]))  # -0.0 == +0.0
    return R.dequantize_4bit(packed, absmax, state["blocksize"], state["quant_type"], state["shape"], dtype)


def reference_float_model(original: torch.nn.Module, sd: dict) -> torch.nn.Module:
    """A float copy of ``original`` whose 4-bit layers (those with a quant_state in ``sd``, a checkpoint's
    tensors) hold reference_weight_4bit of their bytes (transposed back for a Conv1D, which stores [in, out])."""
    model = copy.deepcopy(original)
    names = [k.split(".weight.quant_state.")[0] for k in sd if ".weight.quant_state.bitsandbytes__" in k]
    assert names, "no 4-bit layer in the state dict"
    with torch.no_grad():
        for name in names:
            layer = model.get_submodule(name)
            W = reference_weight_4bit(sd, name + ".")
            layer.weight.copy_(W.T if type(layer).__name__ == "Conv1D" else W)
    return model


def tiny_llama(seed=0):
    """A randomly initialised transformers Llama with grouped-query attention (4 query heads, 2 key/value)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=101,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).eval()


def tokens(seed=1):
    """Two rows of 12 token ids of the tiny models' vocabulary."""
    return torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(seed))


def randomize_adapters(model):
    """Every LoRA adapter's B drawn from N(0, 0.05): the adapters change the output."""
    with torch.no_grad():
        for _, layer in model.lora_layers():
            for a in layer.adapters.values():
                a.lora_B.normal_(0, 0.05)


def tiny_gpt2(seed=0):
    """GPT-2's attention and MLP projections are transformers Conv1D layers (weight [in, out])."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=101, n_positions=64)
    return transformers.GPT2LMHeadModel(config).eval()


def trainer_losses(model, items, folder, epochs: int, learning_rate: float, **arguments) -> list[float]:
    """transformers.Trainer over the 16 examples ``items(i)`` (batch 4, checkpointing on, CPU; ``arguments``
    override TrainingArguments): the logged losses."""
    import transformers

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            return items(i)

    settings = dict(
        output_dir=str(folder),
        per_device_train_batch_size=4,
        num_train_epochs=epochs,
        learning_rate=learning_rate,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        activation_checkpointing=True,
        activation_checkpointing_kwargs={"use_reentrant": False},
    )
    args = transformers.TrainingArguments(**{**settings, **arguments})
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Data())
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def float_model_of(
    qmodel: torch.nn.Module, original: torch.nn.Module, dtype: torch.dtype | None = None, with_biases: bool = False
) -> torch.nn.Module:
    """``original`` (in ``dtype``) with the weight of every qpeft 4-bit layer of ``qmodel`` (a layer's ``base``
    included) replaced by its dequantization, transposed back for a Conv1D; ``with_biases``: the 4-bit layers'
    biases too (added where the original has none)."""
    from qpeft.nn import Linear4bit

    model = copy.deepcopy(original)
    if dtype is not None:
        model = model.to(dtype)
    with torch.no_grad():
        for name, m in qmodel.named_modules():
            if isinstance(m, Linear4bit):
                target = model.get_submodule(name.removesuffix(".base"))
                W = m.dequantized_weight(torch.float32)
                target.weight.copy_(W.T if m.fan_in_fan_out else W)
                if with_biases and m.bias is not None:
                    if target.bias is None:
                        target.bias = torch.nn.Parameter(torch.zeros(m.out_features, dtype=target.weight.dtype))
                    target.bias.copy_(m.bias)
    return model


def fit(model, batches, optimizer) -> list[torch.Tensor]:
    """One causal-LM step (labels = the tokens) per batch of token ids: the losses, detached."""
    losses = []
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return losses


def linear_4bit(x, q):
    """functional.linear_4bit of x and the Quantized4bitWeight q (its tensors as the keywords)."""
    from qpeft import functional as F

    return F.linear_4bit(x, q.packed, q.absmax, q.blocksize, q.quant_type, q.shape[0], **nested_of(q))


def linear_4bit_grad_input(dy, q):
    """functional.linear_4bit_grad_input of dy and the Quantized4bitWeight q."""
    from qpeft import functional as F

    return F.linear_4bit_grad_input(dy, q.packed, q.absmax, q.blocksize, q.quant_type, q.shape[1], **nested_of(q))


def nested_of(q):
    """q's double-quantization tensors as functional's keywords (None without double quantization)."""
    return dict(nested_absmax=q.nested_absmax, nested_code=q.nested_code, nested_offset=q.nested_offset)


class SeededDropout(torch.nn.Module):
    """peft's dropout slot filled with qpeft's deterministic mask."""

    def __init__(self, p: float, seed: int):
        super().__init__()
        self.p, self.seed = p, seed

    def forward(self, x):
        from qpeft import reference as R

        keep = R.dropout_keep_mask(x.shape, self.p, self.seed)
        return torch.where(keep, x / (1 - self.p), torch.zeros_like(x))


def tiny_t5(seed=0):
    import transformers

    torch.manual_seed(seed)
    config = transformers.T5Config(
        vocab_size=101, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4, decoder_start_token_id=0
    )
    return transformers.T5ForConditionalGeneration(config).eval()


def tiny_bart(seed=0):
    import transformers

    torch.manual_seed(seed)
    config = transformers.BartConfig(
        vocab_size=101,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=96,
        decoder_ffn_dim=96,
        max_position_embeddings=64,
    )
    return transformers.BartForConditionalGeneration(config).eval()


ENCODER_DECODERS = {"t5": tiny_t5, "bart": tiny_bart}
