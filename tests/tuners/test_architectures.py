"""Every registered method on the architectures people fine-tune (tiny random configs built here, nothing
downloaded): a training step moves the adapter, the adapter saves and reloads to the same logits; LoRA, prompt and
prefix tuning generate."""

import copy

import pytest
import torch

import qpeft
from qpeft.tuners import registry

from helpers import ENCODER_DECODERS

transformers = pytest.importorskip("transformers")

_DECODER = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
_COMMON = dict(vocab_size=101, max_position_embeddings=64)
ARCHITECTURES = {
    "llama": lambda t: t.LlamaConfig(**_DECODER, **_COMMON),
    "qwen2": lambda t: t.Qwen2Config(**_DECODER, **_COMMON),
    "qwen3": lambda t: t.Qwen3Config(**_DECODER, head_dim=16, **_COMMON),
    "mistral": lambda t: t.MistralConfig(**_DECODER, **_COMMON),
    "gemma2": lambda t: t.Gemma2Config(**_DECODER, head_dim=16, **_COMMON),
    "gemma3_text": lambda t: t.Gemma3TextConfig(**_DECODER, head_dim=16, **_COMMON),
    "phi3": lambda t: t.Phi3Config(**_DECODER, pad_token_id=0, **_COMMON),
    "olmo2": lambda t: t.Olmo2Config(**_DECODER, pad_token_id=0, **_COMMON),
    "granite": lambda t: t.GraniteConfig(**_DECODER, **_COMMON),
    "gpt_neox": lambda t: t.GPTNeoXConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, **_COMMON
    ),
    "opt": lambda t: t.OPTConfig(
        hidden_size=64,
        ffn_dim=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=64,
        pad_token_id=1,
        **_COMMON,
    ),
    "gpt2": lambda t: t.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=101, n_positions=64),
    "falcon": lambda t: t.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=101),
}
GENERATES = {"lora", "prompt-tuning", "prefix-tuning"}


def tiny(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(ARCHITECTURES[kind](transformers)).eval()


def any_architecture(method):
    """The method's default example with its Llama layer names replaced by 'all-linear' (or the method's own
    placement), so it applies to any architecture."""
    config = method.examples["default"]()
    for key, value in (("target_modules", "all-linear"), ("feedforward_modules", None), ("bias_modules", None)):
        if getattr(config, key, None) is not None:
            setattr(config, key, value)
    return config


@pytest.mark.parametrize("kind", list(ARCHITECTURES))
@pytest.mark.parametrize("name", registry.names())
def test_every_method_trains_saves_and_reloads_on_every_architecture(kind, name, tmp_path):
    method = registry.by_name(name)
    model = tiny(kind)
    peft_model = qpeft.get_peft_model(copy.deepcopy(model), any_architecture(method))
    ids = torch.randint(0, 101, (2, 6), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids}
    if hasattr(peft_model.active_peft_config, "num_tasks"):
        inputs["task_ids"] = torch.tensor([0, 1])
    if method.warmup:
        getattr(peft_model, method.warmup)([{**inputs, "labels": ids}])
    trained = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    peft_model.train()
    loss = peft_model(**inputs, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad and p.grad is not None:
                p.sub_(1e-2 * p.grad.sign())
    moved = [n for n, p in peft_model.named_parameters() if n in trained and not torch.equal(p, trained[n])]
    assert moved
    peft_model.eval()
    peft_model.save_pretrained(tmp_path)
    back = qpeft.QPeftModel.from_pretrained(copy.deepcopy(model), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(back(**inputs).logits, peft_model(**inputs).logits, rtol=0, atol=0)
    if name in GENERATES:
        out = back.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
        assert out.shape == (2, 9) and torch.equal(out[:, :6], ids)


@pytest.mark.parametrize("kind", list(ENCODER_DECODERS))
@pytest.mark.parametrize("config", ["lora_defaults", "ia3_defaults"])
def test_lora_and_ia3_on_encoder_decoders(kind, config, tmp_path):
    """LoRA and IA3 with peft's default targets on T5 and BART: train, save, reload equal, generate. (T5's IA3
    defaults include its feed-forward output wo, which transformers keeps out of quantization: T5 casts wo's input to
    wo.weight's dtype, so a 4-bit wo is refused with a clear error rather than run on integers.)"""
    model = ENCODER_DECODERS[kind]()
    make = qpeft.LoraConfig if config == "lora_defaults" else qpeft.IA3Config
    if kind == "t5" and config == "ia3_defaults":
        peft_model = qpeft.get_peft_model(copy.deepcopy(model), make())
        with pytest.raises(TypeError, match="floating-point input"):
            peft_model(input_ids=torch.ones(1, 3, dtype=torch.long), labels=torch.ones(1, 2, dtype=torch.long))
        return
    peft_model = qpeft.get_peft_model(copy.deepcopy(model), make(task_type="SEQ_2_SEQ_LM"))
    ids = torch.randint(1, 101, (2, 6), generator=torch.Generator().manual_seed(1))
    labels = torch.randint(1, 101, (2, 5), generator=torch.Generator().manual_seed(2))
    peft_model.train()
    peft_model(input_ids=ids, labels=labels).loss.backward()
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad and p.grad is not None:
                p.sub_(1e-2 * p.grad.sign())
    peft_model.eval()
    peft_model.save_pretrained(tmp_path)
    back = qpeft.QPeftModel.from_pretrained(copy.deepcopy(model), tmp_path)
    with torch.no_grad():
        expected = peft_model(input_ids=ids, labels=labels).logits
        torch.testing.assert_close(back(input_ids=ids, labels=labels).logits, expected, rtol=0, atol=0)
    assert back.generate(input_ids=ids, max_new_tokens=3, do_sample=False).shape[0] == 2
