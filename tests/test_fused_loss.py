"""The causal-LM loss through the head in chunks: loss and gradients against float64 cross-entropy on the whole
logits, for frozen, trained and LoRA heads; the model-level path against the model's own loss; no [tokens, vocab]
tensor kept for backward."""

import copy

import pytest
import torch

import qpeft
from qpeft.autograd.chunked_loss import linear_cross_entropy
from qpeft.nn import LoraLinear4bit

from helpers import tiny_llama

transformers = pytest.importorskip("transformers")

V, H = 37, 24


def labels_with_ignored(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, V, shape, generator=g)
    y[0, :2] = -100
    y[-1, -1] = -100
    return y


def reference(hidden, weight, bias, y, num_items=None):
    """float64 cross-entropy of the whole logits (the definition)."""
    logits = hidden.double() @ weight.double().T + (0 if bias is None else bias.double())
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), y.reshape(-1), reduction="sum")
    return loss / (num_items if num_items is not None else (y != -100).sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_elements", [V, 3 * V, 1 << 20])
@pytest.mark.parametrize("num_items", [None, 11])
def test_loss_and_gradients_equal_the_whole_logits_in_float64(dtype, chunk_elements, num_items):
    torch.manual_seed(0)
    head = torch.nn.Linear(H, V).to(dtype)
    hidden = torch.randn(3, 5, H, dtype=dtype, requires_grad=True)
    y = labels_with_ignored((3, 5))
    loss = linear_cross_entropy(hidden, head, y, V, num_items_in_batch=num_items, chunk_elements=chunk_elements)
    loss.backward()
    h64 = hidden.detach().double().requires_grad_()
    w64 = head.weight.detach().double().requires_grad_()
    b64 = head.bias.detach().double().requires_grad_()
    ref = reference(h64, w64, b64, y, num_items)
    ref.backward()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(loss.double(), ref.detach(), **tol)
    torch.testing.assert_close(hidden.grad.double(), h64.grad, **tol)
    torch.testing.assert_close(head.weight.grad.double(), w64.grad, **tol)
    torch.testing.assert_close(head.bias.grad.double(), b64.grad, **tol)
    assert not hidden.grad[0, :2].any()  # ignored rows get no gradient


def test_a_lora_head_trains_through_the_chunks():
    torch.manual_seed(1)
    layer = LoraLinear4bit.from_linear(torch.nn.Linear(H, V, bias=False), r=4)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    hidden = torch.randn(4, 6, H)
    y = labels_with_ignored((4, 6))
    loss = linear_cross_entropy(hidden, layer, y, V, chunk_elements=2 * V)
    loss.backward()
    grads = [layer.lora_A.grad.clone(), layer.lora_B.grad.clone()]
    layer.zero_grad()
    whole = torch.nn.functional.cross_entropy(layer(hidden).float().reshape(-1, V), y.reshape(-1))
    whole.backward()
    torch.testing.assert_close(loss, whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads, [layer.lora_A.grad, layer.lora_B.grad], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("lora", [False, True])
def test_no_vocab_sized_tensor_is_kept_for_backward(lora):
    torch.manual_seed(0)
    vocab = 512
    head = torch.nn.Linear(H, vocab)
    head = LoraLinear4bit.from_linear(head, r=4) if lora else head
    hidden = torch.randn(8, 16, H, requires_grad=True)
    y = torch.randint(0, vocab, (8, 16))
    kept = []

    def pack(t):
        kept.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = linear_cross_entropy(hidden, head, y, vocab, chunk_elements=4 * vocab)
    loss.backward()
    assert kept and max(kept) < 8 * 16 * vocab / 4  # the whole logits would be 8 * 16 * vocab


def test_label_smoothing_and_a_frozen_head():
    torch.manual_seed(2)
    head = torch.nn.Linear(H, V, bias=False).requires_grad_(False)
    hidden = torch.randn(4, 5, H, requires_grad=True)
    y = labels_with_ignored((4, 5))
    loss = linear_cross_entropy(hidden, head, y, V, label_smoothing=0.1, chunk_elements=3 * V)
    loss.backward()
    h64 = hidden.detach().double().requires_grad_()
    logits = h64 @ head.weight.double().T
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, V), y.reshape(-1), label_smoothing=0.1)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=1e-5, atol=1e-6)
    assert head.weight.grad is None


def test_bad_labels_are_refused():
    head = torch.nn.Linear(H, V)
    hidden = torch.randn(2, 3, H)
    with pytest.raises(ValueError, match="outside"):
        linear_cross_entropy(hidden, head, torch.full((2, 3), V), V)
    with pytest.raises(TypeError, match="integer"):
        linear_cross_entropy(hidden, head, torch.zeros(2, 3), V)
    with pytest.raises(ValueError, match="do not match"):
        linear_cross_entropy(hidden, head, torch.zeros(2, 4, dtype=torch.long), V)
    assert linear_cross_entropy(hidden, head, torch.full((2, 3), -100), V).isnan()  # as torch's mean of nothing


# ---- the model's forward ----------------------------------------------------------------------------------------
def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 101, (2, 9), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "config",
    [
        dict(target_modules="all-linear"),
        dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
        dict(target_modules=["q_proj", "lm_head"]),
    ],
)
@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_training_forward_gives_the_model_s_loss_and_gradients_without_logits(config, checkpointing):
    torch.manual_seed(0)
    model = qpeft.get_peft_model(tiny_llama(), qpeft.LoraConfig(r=4, **config))
    with torch.no_grad():
        for _, layer in model.lora_layers():
            layer.lora_B.normal_(0, 0.05)
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    out = model(**batch(), num_items_in_batch=torch.tensor(13))
    assert out.logits is None
    out.loss.backward()
    fused = grads(model)
    model.zero_grad()
    model.fused_loss = False
    plain = model(**batch(), num_items_in_batch=torch.tensor(13))
    assert plain.logits is not None
    plain.loss.backward()
    torch.testing.assert_close(out.loss, plain.loss, rtol=1e-5, atol=1e-6)
    assert fused.keys() == grads(model).keys() and fused
    torch.testing.assert_close(fused, grads(model), rtol=1e-4, atol=1e-6)
    model.fused_loss = True
    model.eval()  # evaluation: the model's own forward, logits included
    with torch.no_grad():
        assert model(**batch()).logits is not None


def test_a_model_that_transforms_its_logits_falls_back_to_its_own_loss():
    torch.manual_seed(0)
    config = transformers.Gemma2Config(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, final_logit_softcapping=5.0,
    )  # fmt: skip
    base = transformers.Gemma2ForCausalLM(config)
    model = qpeft.get_peft_model(copy.deepcopy(base), qpeft.LoraConfig(r=4, target_modules=["q_proj"]))
    model.train()
    with pytest.warns(UserWarning, match="transforms its logits"):
        out = model(**batch())
    model.fused_loss = False
    torch.testing.assert_close(out.loss, model(**batch()).loss)
    model.fused_loss = True
    out = model(**batch())  # marked: no second warning, the model's own path
    assert out.logits is not None


def test_calls_that_ask_for_the_model_s_own_outputs_keep_them():
    model = qpeft.get_peft_model(tiny_llama(), qpeft.LoraConfig(r=4, target_modules=["q_proj"]))
    model.train()
    loss, logits = model(**batch(), return_dict=False)[:2]
    assert logits.shape == (2, 9, 101) and loss.ndim == 0
