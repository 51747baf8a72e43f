"""IA3 and AdaLoRA on a 4-bit base: layers against the float64 reference, models against the real peft (logits,
loss with AdaLoRA's orthogonality penalty, gradients, the rank allocator's masks step by step), files both ways
(AdaLoRA trimmed by its rank pattern), merges, memory kept for backward, bad configs."""

import copy
import json

import pytest
import torch

import qpeft
from qpeft import reference as R
from qpeft.nn import IA3Linear4bit, Linear4bit, LoraLinear4bit

from helpers import float_model_of as float_copy, rel_err, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")

IA3_KW = dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
ADALORA_KW = dict(
    init_r=6,
    target_r=2,
    target_modules=["q_proj", "v_proj", "up_proj"],
    total_step=12,
    tinit=2,
    tfinal=3,
    deltaT=1,
    lora_alpha=16,
)


def tokens(seed=1, n=2):
    return torch.randint(0, 101, (n, 12), generator=torch.Generator().manual_seed(seed))


def models(kind, original=None, seed=5):
    """(qpeft model, peft model on the dequantized float copy) holding the same adapter weights (random)."""
    original = original if original is not None else tiny_llama()
    kw = IA3_KW if kind == "ia3" else ADALORA_KW
    config = getattr(qpeft, "IA3Config" if kind == "ia3" else "AdaLoraConfig")
    ours = qpeft.get_peft_model(copy.deepcopy(original), config(**kw))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad:
                p.normal_(1.0 if kind == "ia3" else 0.0, 0.3)
    theirs = peft.get_peft_model(
        float_copy(ours.base_model, original), getattr(peft, config.__name__)(task_type="CAUSAL_LM", **kw)
    )
    mine = ours._file_parameters("default")
    other = {n.replace(".default", ""): p for n, p in theirs.named_parameters() if p.requires_grad}
    assert set(mine) == set(other)
    with torch.no_grad():
        for key, p in other.items():
            p.copy_(mine[key])
    return ours, theirs, mine, other, original


# ---- the IA3 layer ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 128), (7, 100), (3, 64), (0, 128)])
@pytest.mark.parametrize("feedforward", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("train_vector", [True, False])
def test_ia3_layer_matches_the_float64_reference(feedforward, shape, dtype, bias, train_vector):
    """Output and gradients (x, the vector) vs reference.ia3_linear; in_features a multiple of the blocksize
    (scaling inside the block scales) or not (after the matmul), M = 0 / 1, non-contiguous x, the vector trained
    or frozen."""
    m, k = shape
    torch.manual_seed(0)
    base = Linear4bit.from_linear(torch.nn.Linear(k, 48, bias=bias))
    layer = IA3Linear4bit(base, feedforward, init_ones=False)
    layer.adapters["default"].requires_grad_(train_vector)
    x = torch.randn(k, m, 2).permute(1, 2, 0).to(dtype).requires_grad_()  # [m, 2, k], non-contiguous
    y = layer(x)
    W = base.dequantized_weight(torch.float32)
    scale = layer.adapters["default"]
    x64, s64 = x.detach().double().requires_grad_(), scale.detach().double().requires_grad_()
    ref = R.ia3_linear(x64, W, s64, feedforward, base.bias.detach() if bias else None)
    assert y.shape == ref.shape and y.dtype == dtype
    g = torch.randn_like(ref)
    y.backward(g.to(dtype))
    ref.backward(g)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    if not train_vector:
        assert scale.grad is None
    elif m:
        assert rel_err(scale.grad, s64.grad) < tol
    else:
        assert not scale.grad.any()
    if m:
        assert rel_err(y, ref) < tol and rel_err(x.grad, x64.grad) < tol


def test_ia3_adapters_multiply_merge_exactly_and_disable():
    torch.manual_seed(1)
    base = Linear4bit.from_linear(torch.nn.Linear(128, 32))
    layer = IA3Linear4bit(base, False, init_ones=False)
    layer.add_adapter("second", init_ones=False)
    layer.set_adapter(["default", "second"])
    x = torch.randn(4, 128)
    product = layer.adapters["default"].reshape(-1) * layer.adapters["second"].reshape(-1)
    W = base.dequantized_weight(torch.float32)
    ref = R.ia3_linear(x, W, product.detach(), False, base.bias.detach())
    with torch.no_grad():
        assert rel_err(layer(x), ref) < 1e-5
        dense = layer.to_linear(torch.float32)
        assert rel_err(dense(x), ref) < 1e-5
        layer.merge(torch.float32)
        assert rel_err(layer(x), ref) < 1e-5
        layer.unmerge()
        with layer.disable_adapter():
            assert torch.equal(layer(x), base(x))


def test_ia3_keeps_for_backward_what_peft_keeps():
    """Output scaling keeps the base output x W^T + b [M, N] (not x); input scaling keeps x (the input itself)."""
    for feedforward in (False, True):
        base = Linear4bit.from_linear(torch.nn.Linear(128, 64))
        layer = IA3Linear4bit(base, feedforward, init_ones=False)
        x = torch.randn(8, 128, requires_grad=True)
        own = {
            t.untyped_storage().data_ptr()
            for t in (*base.op_weight_args()[:2], layer.adapters["default"], base.bias)
            if isinstance(t, torch.Tensor)
        }
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = layer(x)
        activations = [t for t in saved if t.untyped_storage().data_ptr() not in own]
        if feedforward:
            assert [t.untyped_storage().data_ptr() for t in activations] == [x.untyped_storage().data_ptr()]
        else:
            assert [tuple(t.shape) for t in activations] == [(8, 64)]
        y.sum().backward()
        assert x.grad is not None and layer.adapters["default"].grad is not None
    with torch.no_grad():  # no gradient for the vector: the scaling runs inside the matmul, nothing kept
        layer = IA3Linear4bit(Linear4bit.from_linear(torch.nn.Linear(128, 64)), False, init_ones=False)
        x = torch.randn(8, 128)
        ref = R.ia3_linear(
            x, layer.base.dequantized_weight(torch.float32), layer.adapters["default"], False, layer.base.bias
        )
        assert rel_err(layer(x), ref) < 1e-5


# ---- the AdaLoRA layer -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m, k", [(1, 128), (9, 100), (0, 64)])
@pytest.mark.parametrize("kept", [[True] * 6, [True, False, True, False, False, True], [False] * 6])
def test_adalora_layer_matches_the_float64_reference(m, k, dtype, kept):
    """x W^T + drop(x) (A*E)^T B^T s / (ranknum + 1e-5) + b on the fused path, masked ranks left out; the
    gradients of x, A, E, B vs float64 autograd of reference.adalora_delta (masked ranks: zero)."""
    from qpeft.nn.lora import AdaLoraAdapter

    torch.manual_seed(3)
    base = Linear4bit.from_linear(torch.nn.Linear(k, 40))
    layer = LoraLinear4bit(base, r=None)
    adapter = AdaLoraAdapter(k, 40, r=6, alpha=16, ranknum=12)
    with torch.no_grad():
        adapter.lora_E.normal_()
    layer.register_adapter("default", adapter)
    keep = torch.tensor(kept)
    adapter.set_rank_mask(keep)
    x = torch.randn(k, m).T.to(dtype).requires_grad_()  # non-contiguous
    y = layer(x)
    A, E, B = (t.detach().double().requires_grad_() for t in (adapter.lora_A, adapter.lora_E, adapter.lora_B))
    x64 = x.detach().double().requires_grad_()
    W = base.dequantized_weight(torch.float32).double()
    keep64 = keep.double().reshape(-1, 1)
    ref = x64 @ W.T + x64 @ R.adalora_delta(A, E * keep64, B, 16, 12).T + base.bias.double()
    g = torch.randn_like(ref)
    y.backward(g.to(dtype))
    ref.backward(g)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    if m:
        assert rel_err(y, ref) < tol and rel_err(x.grad, x64.grad) < tol
        for ours, theirs in ((adapter.lora_A, A), (adapter.lora_E, E), (adapter.lora_B, B)):
            if keep.any():
                assert rel_err(ours.grad, theirs.grad * (keep64 if ours is not adapter.lora_B else keep64.T)) < tol
            else:
                assert ours.grad is None or not ours.grad.any()
    assert y.shape == (m, 40)


# ---- models against peft ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ia3", "adalora"])
def test_logits_loss_and_gradients_match_peft(kind):
    ours, theirs, mine, other, _ = models(kind)
    ids = tokens()
    a, b = ours(input_ids=ids, labels=ids), theirs(input_ids=ids, labels=ids)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)  # AdaLoRA: with the orthogonality penalty
    a.loss.backward()
    b.loss.backward()
    for key, p in other.items():
        assert mine[key].grad is not None and mine[key].grad.abs().sum() > 0, key
        torch.testing.assert_close(mine[key].grad, p.grad, rtol=1e-4, atol=1e-6)
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n, p in ours.named_parameters() if ".adapters.default" in n
    }


def test_ia3_on_gpt2_conv1d_layers_matches_peft(tmp_path):
    original = tiny_gpt2()
    kw = dict(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"])
    ours = qpeft.get_peft_model(copy.deepcopy(original), qpeft.IA3Config(**kw))
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.normal_(1.0, 0.3)
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    theirs = peft.PeftModel.from_pretrained(float_copy(ours.base_model, original), tmp_path)
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        merged = ours.merge_and_unload(torch.float32)
        assert type(merged.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
        torch.testing.assert_close(merged(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_adalora_rank_allocation_follows_peft_step_by_step():
    """The same data and optimizer on both: equal losses and rank patterns at every step through the budget phase
    and the final one; masked ranks are not computed (their A rows and B columns get no gradient)."""
    ours, theirs, _, _, _ = models("adalora")
    with torch.no_grad():  # E starts at 0 in both libraries; away from it, ranks differ in importance at once
        for _, layer in ours.lora_layers():
            layer.adapters["default"].lora_E.normal_(0, 0.3)
        for n, p in theirs.named_parameters():
            if "lora_E" in n:
                p.copy_(
                    ours.get_submodule(n.replace("base_model.model.", "").replace(".lora_E.default", ""))
                    .adapters["default"]
                    .lora_E
                )
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    opt_theirs = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(3)
    budgets = []
    for step in range(12):
        ids = torch.randint(0, 101, (2, 12), generator=g)
        losses = []
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            loss = model(input_ids=ids, labels=ids).loss  # after the previous step's masking, as in training
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) < 1e-4 * abs(losses[1])
        ours.update_and_allocate(step)
        theirs.base_model.update_and_allocate(step)
        opt_ours.zero_grad()
        opt_theirs.zero_grad()
        pattern = {k.replace(".default", ""): v for k, v in (theirs.peft_config["default"].rank_pattern or {}).items()}
        assert (ours.peft_config["default"].rank_pattern or {}) == pattern
        budgets.append(sum(map(sum, pattern.values())))
    assert budgets[0] == 0 and budgets[-1] == 2 * 6  # 6 layers at target_r 2
    assert budgets[3] > budgets[6] > budgets[-1]
    adapters = [layer.adapters["default"] for _, layer in ours.lora_layers()]
    assert any(not a.rank_mask.any() for a in adapters)  # a layer left with no rank: nothing computed
    assert all(a.branch() is None for a in adapters if not a.rank_mask.any())
    a = next(a for a in adapters if 0 < int(a.rank_mask.sum()) < a.r)
    kept = a.rank_mask
    assert a.branch()[0].shape[0] == int(kept.sum())
    ids = tokens(seed=9)
    ours(input_ids=ids).logits.square().mean().backward()  # (no labels: no orthogonality penalty, which sees all)
    assert not a.lora_A.grad[~kept].any() and not a.lora_B.grad[:, ~kept].any() and a.lora_A.grad[kept].any()


def test_adalora_files_both_ways_trimmed_by_the_rank_pattern(tmp_path):
    ours, theirs, _, _, original = models("adalora")
    pattern = {f"{name}.lora_E": [True, False, True, True, False, False] for name, _ in ours.lora_layers()}
    ours.peft_config["default"].rank_pattern = pattern
    from qpeft.tuners.adalora.model import mask_using_rank_pattern

    mask_using_rank_pattern(ours.base_model, "default", pattern)
    ours.save_pretrained(tmp_path / "q")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "q" / "adapter_model.safetensors"))
    assert saved["base_model.model.model.layers.0.self_attn.q_proj.lora_A"].shape == (3, 64)
    assert saved["base_model.model.model.layers.0.self_attn.q_proj.lora_B"].shape == (64, 3)
    ids = tokens()
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
        loaded = peft.PeftModel.from_pretrained(float_copy(ours.base_model, original), tmp_path / "q")
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        loaded.save_pretrained(tmp_path / "p")
        back = qpeft.QPeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "p")
        assert back.base_model.model.layers[0].self_attn.q_proj.adapters["default"].r == 3
        torch.testing.assert_close(back(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    back.save_pretrained(tmp_path / "again")  # a trimmed adapter saves as it is
    assert load_file(str(tmp_path / "again" / "adapter_model.safetensors")).keys() == saved.keys()
    with torch.no_grad():
        merged = back.merge_and_unload(torch.float32)
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_ia3_files_both_ways_merge_and_several_adapters(tmp_path):
    ours, theirs, _, _, original = models("ia3")
    ids = tokens()
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
    ours.save_pretrained(tmp_path / "q")
    theirs.save_pretrained(tmp_path / "p")
    for folder in ("q", "p"):
        back = qpeft.QPeftModel.from_pretrained(copy.deepcopy(original), tmp_path / folder)
        assert isinstance(back.base_model.model.layers[0].mlp.down_proj, IA3Linear4bit)
        assert back.base_model.model.layers[0].mlp.down_proj.feedforward
        with torch.no_grad():
            torch.testing.assert_close(back(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    loaded = peft.PeftModel.from_pretrained(float_copy(ours.base_model, original), tmp_path / "q")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    ours.add_adapter("other", qpeft.IA3Config(**IA3_KW))  # ones: the base model's output
    ours.set_adapter("other")
    with torch.no_grad():
        with ours.disable_adapter():
            base = ours(input_ids=ids).logits
        torch.testing.assert_close(ours(input_ids=ids).logits, base)
        ours.set_adapter("default")
        torch.testing.assert_close(ours(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        ours.delete_adapter("other")
        torch.testing.assert_close(
            ours.merge_and_unload(torch.float32)(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4
        )


def test_ia3_and_adalora_train(tmp_path):
    for kind in ("ia3", "adalora"):
        ours, _, _, _, _ = models(kind)
        ours.train()
        opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=2e-2)
        ids = tokens(seed=4)
        losses = []
        for step in range(8):
            loss = ours(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            if kind == "adalora":
                ours.update_and_allocate(step)
            opt.zero_grad()
            losses.append(loss.item())
        assert losses[-1] < losses[0], (kind, losses)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(target_modules=["q_proj"]), "total_step"),
        (dict(target_modules=["q_proj"], total_step=10, tinit=8, tfinal=2), "tinit"),
        (dict(target_modules=["q_proj"], total_step=10, beta1=1.5), "beta1"),
        (dict(target_modules=["q_proj"], total_step=10, orth_reg_weight=-1), "orth_reg_weight"),
        (dict(target_modules=["q_proj"], total_step=10, use_dora=True), "use_dora"),
        (dict(target_modules=["q_proj"], total_step=10, rank_pattern={"q_proj": 3}), "rank_pattern"),
        (dict(target_modules=["q_proj"], total_step=10, init_r=0), "init_r"),
    ],
)
def test_bad_adalora_configs_name_the_key(kwargs, key):
    with pytest.raises(qpeft.ConfigError, match=key):
        qpeft.AdaLoraConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(target_modules=["q_proj"], feedforward_modules=["down_proj"]), "feedforward_modules"),
        (dict(target_modules=["q_proj"], init_ia3_weights="yes"), "init_ia3_weights"),
        (dict(target_modules=3), "target_modules"),
    ],
)
def test_bad_ia3_configs_name_the_key(kwargs, key):
    with pytest.raises(qpeft.ConfigError, match=key):
        qpeft.IA3Config(**kwargs)


def test_an_ia3_config_without_targets_names_its_own_field():
    """A model type with no default targets (as in peft): the error names the config class in use."""
    model = tiny_llama()
    model.config.model_type = "phi3"
    with pytest.raises(ValueError, match=r"IA3Config\.target_modules is required"):
        qpeft.get_peft_model(model, qpeft.IA3Config())


def test_adalora_needs_its_adapter_for_update_and_allocate_and_files_are_checked(tmp_path):
    model = qpeft.get_peft_model(tiny_llama(), qpeft.IA3Config(**IA3_KW))
    with pytest.raises(ValueError, match="update_and_allocate is adalora.s"):
        model.update_and_allocate(0)
    with pytest.raises(ValueError, match="one peft_type"):
        model.add_adapter("x", qpeft.AdaLoraConfig(target_modules=["q_proj"], total_step=5))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["feedforward_modules"] = ["o_proj"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(qpeft.ConfigError, match="feedforward_modules"):
        qpeft.QPeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert isinstance(
        qpeft.get_peft_model(tiny_llama(), qpeft.AdaLoraConfig(target_modules=["q_proj"], total_step=5))
        .base_model.model.layers[0]
        .self_attn.q_proj,
        LoraLinear4bit,
    )
