"""BitFit, layer-wise and sparse fine-tuning, bottleneck adapters and Piggyback masks on a 4-bit base: each against
a float64 reference of its definition (outputs and gradients), training whose loss falls, files (qpeft's own
format) round trips, merges equal to the reference, bad configs."""

import copy
import json

import pytest
import torch

import qpeft
from qpeft.nn import Linear4bit
from qpeft.nn.piggyback import MaskedLinear4bit, pack_bits, unpack_bits
from qpeft.nn.sparse_delta import SparseDeltaLinear4bit

from helpers import fit, float_model_of, rel_err, tiny_gpt2, tiny_llama

pytest.importorskip("transformers")


def tokens(seed=1):
    return torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(seed))


def float_reference(model, original):
    """``original`` in float64 holding each 4-bit layer's dequantized weight and current bias."""
    return float_model_of(model.base_model, original, torch.float64, with_biases=True)


def train(model, steps=6, lr=2e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    return [loss.item() for loss in fit(model, [tokens(seed=4)] * steps, opt)]


# ---- BitFit ----------------------------------------------------------------------------------------------------


def test_bitfit_trains_exactly_the_chosen_biases_against_the_float64_model(tmp_path):
    original = tiny_llama()
    model = qpeft.get_peft_model(
        copy.deepcopy(original), qpeft.BitFitConfig(bias_modules=["q_proj", "up_proj"], add_missing_bias=True)
    )
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(
        f"base_model.model.layers.{i}.{m}.bias" for i in range(2) for m in ("self_attn.q_proj", "mlp.up_proj")
    )
    assert all(
        isinstance(model.base_model.get_submodule(n), Linear4bit)
        for n in qpeft.tuners.targets.linear_modules(model.base_model)
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    ref = float_reference(model, original)
    ids = tokens()
    ours, theirs = model(input_ids=ids, labels=ids), ref(input_ids=ids, labels=ids)
    assert rel_err(ours.logits, theirs.logits) < 1e-5
    ours.loss.backward()
    theirs.loss.backward()
    for name in ("layers.0.self_attn.q_proj", "layers.1.mlp.up_proj"):
        assert (
            rel_err(model.base_model.model.get_submodule(name).bias.grad, ref.model.get_submodule(name).bias.grad)
            < 1e-4
        )
    losses = train(model)
    assert losses[-1] < losses[0]
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "QPEFT_BITFIT" and "quantize" not in saved
    back = qpeft.QPeftModel.from_pretrained(copy.deepcopy(original), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, model(input_ids=ids).logits)


def test_bitfit_on_gpt2_trains_every_bias():
    model = qpeft.get_peft_model(tiny_gpt2(), qpeft.BitFitConfig())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".bias") for n in trainable)
    assert len(trainable) == sum(1 for n, p in model.base_model.named_parameters() if n.endswith(".bias"))
    losses = train(model)
    assert losses[-1] < losses[0]
    with pytest.raises(ValueError, match="select no module"):
        qpeft.get_peft_model(tiny_llama(), qpeft.BitFitConfig(bias_modules=["q_proj"]))


# ---- layer-wise ------------------------------------------------------------------------------------------------


def test_layerwise_makes_the_chosen_layers_dense_exactly_and_round_trips(tmp_path, capsys):
    """On a 4-bit model the chosen layers become the exact dequantization; on a float model they keep their
    weights (nothing is quantized there); the other layers are 4-bit and frozen."""
    original = tiny_llama()
    four_bit = qpeft.get_peft_model(copy.deepcopy(original), qpeft.PromptTuningConfig(num_virtual_tokens=2)).unload()
    expected_W = four_bit.model.layers[1].self_attn.q_proj.dequantized_weight(torch.float32)
    from_4bit = qpeft.get_peft_model(four_bit, qpeft.LayerwiseConfig(layers=[1]))
    assert torch.equal(from_4bit.base_model.model.layers[1].self_attn.q_proj.weight, expected_W)
    model = qpeft.get_peft_model(copy.deepcopy(original), qpeft.LayerwiseConfig(last_k=1))
    layer1, layer0 = model.base_model.model.layers[1], model.base_model.model.layers[0]
    assert isinstance(layer1.self_attn.q_proj, torch.nn.Linear) and isinstance(layer0.self_attn.q_proj, Linear4bit)
    assert torch.equal(layer1.self_attn.q_proj.weight, original.model.layers[1].self_attn.q_proj.weight)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"base_model.model.layers.1.{n}" for n, _ in layer1.named_parameters()}
    model.print_trainable_parameters()
    assert "weights: 4-bit layers" in capsys.readouterr().out
    ref = float_reference(model, original)
    with torch.no_grad():
        for name, p in layer1.named_parameters():
            ref.model.layers[1].get_parameter(name).copy_(p.double())
    ids = tokens()
    assert rel_err(model(input_ids=ids).logits, ref(input_ids=ids).logits) < 1e-5
    losses = train(model, lr=5e-3)
    assert losses[-1] < losses[0]
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "adapter_model.safetensors")).keys()
    assert keys and all(k.startswith("base_model.model.model.layers.1.") for k in keys)  # the trained layer alone
    assert json.loads((tmp_path / "adapter_config.json").read_text())["layers"] == [1]
    back = qpeft.QPeftModel.from_pretrained(copy.deepcopy(original), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, model(input_ids=ids).logits)
    with pytest.raises(ValueError, match="not in the model"):
        qpeft.get_peft_model(tiny_llama(), qpeft.LayerwiseConfig(layers=[5]))
    with pytest.raises(qpeft.ConfigError, match="exactly one"):
        qpeft.LayerwiseConfig(layers=[0], last_k=1)


# ---- sparse fine-tuning ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 128), (1, 100), (0, 64)])
def test_sparse_delta_layer_matches_the_float64_reference(shape):
    m, k = shape
    torch.manual_seed(0)
    base = Linear4bit.from_linear(torch.nn.Linear(k, 48))
    layer = SparseDeltaLinear4bit(base)
    index = torch.randperm(48 * k)[:37]
    delta = layer.add_entries("default", index)
    with torch.no_grad():
        delta.values.normal_()
    x = torch.randn(3, m, k).transpose(0, 1).requires_grad_()  # [m, 3, k], non-contiguous
    y = layer(x)
    W = base.dequantized_weight(torch.float32).double() + delta.dense((48, k)).double()
    x64, v64 = x.detach().double().requires_grad_(), delta.values.detach().double().requires_grad_()
    S = torch.zeros(48 * k, dtype=torch.float64).index_put((delta.index,), v64).reshape(48, k)
    ref = x64 @ (base.dequantized_weight(torch.float32).double() + S).T + base.bias.double()
    assert rel_err(y, x64.detach() @ W.T + base.bias.double()) < 1e-5 if m else y.shape == ref.shape
    g = torch.randn_like(ref)
    y.backward(g.float())
    ref.backward(g)
    if m:
        assert rel_err(x.grad, x64.grad) < 1e-5 and rel_err(delta.values.grad, v64.grad) < 1e-5
    merged = layer.to_linear(torch.float32)
    assert rel_err(merged.weight, W) < 1e-6


def test_sparse_selection_by_gradient_magnitude_training_and_files(tmp_path):
    original = tiny_llama()
    model = qpeft.get_peft_model(
        copy.deepcopy(original), qpeft.SparseConfig(target_modules=["q_proj", "down_proj"], budget=40)
    )
    assert all(layer.adapters["default"].index.numel() == 0 for _, layer in model.adapter_layers())
    batches = [tokens(seed=s) for s in (5, 6)]
    # the reference: |sum over batches of dL/dW| per layer, from the float64 model, summed as absolute values
    layer = model.base_model.model.layers[0].self_attn.q_proj
    captured = {}
    x_in = {}

    def keep(m, a, out):
        x_in["x"] = a[0].detach()

    def grad(m, gi, go):
        dy, x = go[0], x_in["x"]
        captured.setdefault("s", torch.zeros(layer.out_features, layer.in_features, dtype=torch.float64))
        captured["s"] += (dy.reshape(-1, dy.shape[-1]).double().T @ x.reshape(-1, x.shape[-1]).double()).abs()

    ref = float_reference(model, original)
    ref.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_(True))
    target = ref.model.layers[0].self_attn.q_proj
    target.register_forward_hook(keep)
    target.register_full_backward_hook(grad)
    for ids in batches:
        ref(input_ids=ids, labels=ids).loss.backward()
    model.select_sparse_entries(batches)
    chosen = layer.adapters["default"].index
    assert chosen.numel() == 40
    expected = captured["s"].reshape(-1).topk(40).indices.sort().values
    assert torch.equal(chosen, expected)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if n.endswith(".values")
    }
    losses = train(model)
    assert losses[-1] < losses[0]
    model.save_pretrained(tmp_path)
    back = qpeft.QPeftModel.from_pretrained(copy.deepcopy(original), tmp_path)
    ids = tokens()
    with torch.no_grad():
        expected_logits = model(input_ids=ids).logits
        torch.testing.assert_close(back(input_ids=ids).logits, expected_logits)
        merged = back.merge_and_unload(torch.float32)
        torch.testing.assert_close(merged(input_ids=ids).logits, expected_logits, rtol=1e-4, atol=1e-5)
    random_pick = qpeft.get_peft_model(
        tiny_llama(), qpeft.SparseConfig(target_modules=["q_proj"], budget=0.25, selection="random")
    )
    assert random_pick.base_model.model.layers[0].self_attn.q_proj.adapters["default"].index.numel() == 64 * 64 // 4


def test_sparse_keeps_only_the_input_and_entries_for_backward():
    base = Linear4bit.from_linear(torch.nn.Linear(128, 64))
    layer = SparseDeltaLinear4bit(base)
    delta = layer.add_entries("default", torch.arange(0, 64 * 128, 97))
    x = torch.randn(16, 128, requires_grad=True)
    own = {
        t.untyped_storage().data_ptr()
        for t in (*base.op_weight_args(), delta.values, delta.index)
        if isinstance(t, torch.Tensor)
    }
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    extra = [t for t in saved if t.untyped_storage().data_ptr() not in own | {x.untyped_storage().data_ptr()}]
    assert sum(t.numel() for t in extra) <= 2 * delta.index.numel()  # rows / cols of the entries


# ---- bottleneck adapters -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, style, places",
    [
        (
            tiny_llama,
            "houlsby",
            ["model.layers.0.self_attn", "model.layers.0.mlp", "model.layers.1.self_attn", "model.layers.1.mlp"],
        ),
        (tiny_llama, "pfeiffer", ["model.layers.0.mlp", "model.layers.1.mlp"]),
        (
            tiny_gpt2,
            "houlsby",
            ["transformer.h.0.attn", "transformer.h.0.mlp", "transformer.h.1.attn", "transformer.h.1.mlp"],
        ),
    ],
)
def test_bottleneck_placement_identity_start_reference_and_files(make, style, places, tmp_path):
    original = make()
    model = qpeft.get_peft_model(
        copy.deepcopy(original), qpeft.BottleneckConfig(style=style, bottleneck_size=8, non_linearity="gelu")
    )
    assert sorted(n for n, _ in qpeft.tuners.bottleneck.model.bottleneck_sets(model.base_model)) == sorted(places)
    ids = tokens()
    with torch.no_grad():
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        torch.testing.assert_close(model(input_ids=ids).logits, base)  # up = 0: the base model
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    # float64 reference: the same hooks' arithmetic on the module outputs of the float64 model
    ref = float_reference(model, original)
    for place in places:
        adapter = model.base_model.get_submodule(place).qpeft_bottlenecks.adapters["default"]
        d, u = adapter.down, adapter.up

        def hook(module, args, out, d=d, u=u):
            h = out[0] if isinstance(out, tuple) else out
            h = (
                h
                + torch.nn.functional.gelu(h @ d.weight.double().T + d.bias.double()) @ u.weight.double().T
                + u.bias.double()
            )
            return (h, *out[1:]) if isinstance(out, tuple) else h

        ref.get_submodule(place).register_forward_hook(hook)
    assert rel_err(model(input_ids=ids).logits, ref(input_ids=ids).logits) < 1e-5
    losses = train(model, lr=1e-2)
    assert losses[-1] < losses[0]
    model.save_pretrained(tmp_path)
    back = qpeft.QPeftModel.from_pretrained(copy.deepcopy(original), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, model(input_ids=ids).logits)
    with pytest.raises(ValueError, match="do not merge"):
        back.merge_and_unload()
    plain = back.unload()
    assert not any(hasattr(m, "qpeft_bottlenecks") for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, base)


# ---- Piggyback -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, k", [(48, 128), (7, 9), (1, 64)])
def test_packed_bits_round_trip(n, k):
    mask = torch.rand(n, k, generator=torch.Generator().manual_seed(n)) > 0.5
    bits = pack_bits(mask)
    assert bits.dtype == torch.uint8 and bits.numel() == (n * k + 7) // 8
    assert torch.equal(unpack_bits(bits, (n, k)), mask)
    import numpy as np

    assert np.array_equal(bits.numpy(), np.packbits(mask.reshape(-1).numpy()))
    with pytest.raises(ValueError, match="packed mask"):
        unpack_bits(bits[:-1], (n, k))


@pytest.mark.parametrize("m, k", [(6, 128), (1, 100), (0, 64)])
def test_piggyback_layer_matches_the_float64_reference_with_a_straight_through_gradient(m, k):
    torch.manual_seed(0)
    base = Linear4bit.from_linear(torch.nn.Linear(k, 48))
    layer = MaskedLinear4bit(base)
    scores = layer.add_mask("default", threshold=0.0, init_score=0.5).scores
    with torch.no_grad():
        scores.normal_()
    x = torch.randn(k, m).T.requires_grad_()  # non-contiguous
    y = layer(x)
    W = base.dequantized_weight(torch.float32).double()
    mask = (scores > 0).double()
    x64 = x.detach().double().requires_grad_()
    ref = x64 @ (W * mask).T + base.bias.double()
    g = torch.randn_like(ref)
    y.backward(g.float())
    ref.backward(g)
    if m:
        assert rel_err(y, ref) < 1e-5 and rel_err(x.grad, x64.grad) < 1e-5
        assert rel_err(scores.grad, (g.T @ x64.detach()) * W) < 1e-5  # dS = dL/d(W m) * W
    else:
        assert y.shape == (0, 48) and not scores.grad.any()
    assert rel_err(layer.to_linear(torch.float32).weight, W * mask) == 0


def test_piggyback_trains_saves_bits_and_loads(tmp_path):
    original = tiny_llama()
    model = qpeft.get_peft_model(copy.deepcopy(original), qpeft.PiggybackConfig(target_modules=["q_proj", "v_proj"]))
    ids = tokens()
    with torch.no_grad():
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        torch.testing.assert_close(model(input_ids=ids).logits, base)  # every weight kept at first
    losses = train(model, lr=1e-2)
    assert losses[-1] < losses[0]
    layer = model.base_model.model.layers[0].self_attn.q_proj
    assert 0 < int((~layer.adapters["default"].mask()).sum()) < layer.out_features * layer.in_features
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert saved["base_model.model.model.layers.0.self_attn.q_proj.mask_bits"].numel() == 64 * 64 // 8
    back = qpeft.QPeftModel.from_pretrained(copy.deepcopy(original), tmp_path)
    assert torch.equal(
        back.base_model.model.layers[0].self_attn.q_proj.adapters["default"].mask(), layer.adapters["default"].mask()
    )
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        torch.testing.assert_close(back(input_ids=ids).logits, expected)
        torch.testing.assert_close(
            back.merge_and_unload(torch.float32)(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5
        )


# ---- configs and files -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, key",
    [
        (lambda: qpeft.BitFitConfig(bias_modules=3), "bias_modules"),
        (lambda: qpeft.LayerwiseConfig(), "layers"),
        (lambda: qpeft.LayerwiseConfig(last_k=0), "last_k"),
        (lambda: qpeft.SparseConfig(target_modules=["q_proj"], budget=0), "budget"),
        (lambda: qpeft.SparseConfig(target_modules=["q_proj"], budget=1.5), "budget"),
        (lambda: qpeft.SparseConfig(target_modules=["q_proj"], selection="magnitude"), "selection"),
        (lambda: qpeft.BottleneckConfig(style="parallel"), "style"),
        (lambda: qpeft.BottleneckConfig(non_linearity="swish"), "non_linearity"),
        (lambda: qpeft.PiggybackConfig(target_modules=["q_proj"], threshold=0.1, init_score=0.05), "init_score"),
        (lambda: qpeft.PiggybackConfig(target_modules=["q_proj"], score_dtype="int8"), "score_dtype"),
    ],
)
def test_bad_configs_name_the_key(make, key):
    with pytest.raises(qpeft.ConfigError, match=key):
        make()


def test_files_of_unknown_methods_or_keys_are_refused(tmp_path):
    model = qpeft.get_peft_model(tiny_llama(), qpeft.BottleneckConfig(bottleneck_size=4))
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    config["adapter_scaling"] = 2.0
    path.write_text(json.dumps(config))
    with pytest.raises(qpeft.ConfigError, match="adapter_scaling"):
        qpeft.QPeftModel.from_pretrained(tiny_llama(), tmp_path)
    config.pop("adapter_scaling")
    config["peft_type"] = "QPEFT_HYPERNETWORK"
    path.write_text(json.dumps(config))
    with pytest.raises(qpeft.ConfigError, match="peft_type"):
        qpeft.QPeftModel.from_pretrained(tiny_llama(), tmp_path)
    bitfit = qpeft.get_peft_model(tiny_gpt2(), qpeft.BitFitConfig())
    with pytest.raises(ValueError, match="one adapter per model"):
        bitfit.add_adapter("second", qpeft.BitFitConfig())


def test_a_failed_bottleneck_load_leaves_the_model_as_it_was(tmp_path):
    """A file whose tensor does not fit: the error names it, and the model has no adapter, no hook left behind."""
    from safetensors.torch import load_file, save_file

    qpeft.get_peft_model(tiny_llama(), qpeft.BottleneckConfig(bottleneck_size=4)).save_pretrained(tmp_path)
    path = str(tmp_path / "adapter_model.safetensors")
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("down.weight"))
    save_file({**tensors, key: tensors[key][:2]}, path)
    base = tiny_llama()
    ids = tokens()
    with torch.no_grad():
        before = base(input_ids=ids).logits
    with pytest.raises(ValueError, match="down.weight has shape"):
        qpeft.QPeftModel.from_pretrained(base, tmp_path)
    assert not any(m._forward_hooks or hasattr(m, "qpeft_bottlenecks") for m in base.modules())
    with torch.no_grad():
        torch.testing.assert_close(base(input_ids=ids).logits, before)


def test_bottlenecks_after_modules_whose_output_is_not_hidden_sized_are_refused_by_name():
    with pytest.raises(qpeft.ConfigError, match="up_proj"):
        qpeft.get_peft_model(tiny_llama(), qpeft.BottleneckConfig(target_modules=["up_proj"], bottleneck_size=4))
    # a module without out_features (a whole attention block returning another width): a clear error at forward
    model = qpeft.get_peft_model(tiny_llama(), qpeft.BottleneckConfig(target_modules=["act_fn"], bottleneck_size=4))
    with pytest.raises(ValueError, match="hidden size 64"):
        model(input_ids=torch.zeros(1, 3, dtype=torch.long))


@pytest.mark.parametrize(
    "config",
    [
        lambda: qpeft.BitFitConfig(),
        lambda: qpeft.LoraConfig(r=2, target_modules=["c_attn"], bias="all"),
        lambda: qpeft.LayerwiseConfig(last_k=1),
    ],
)
def test_a_refused_file_leaves_the_models_own_parameters_as_they_were(config, tmp_path):
    """Methods that load into the model's own parameters (GPT-2's biases, a layer in full): a file whose last
    tensor has the wrong shape is refused before any tensor is copied, so the earlier ones do not overwrite the
    model's values."""
    from safetensors.torch import load_file, save_file

    trained = qpeft.get_peft_model(tiny_gpt2(seed=1), config())
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(1.0)
    trained.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    last = sorted(tensors)[-1]
    tensors[last] = torch.zeros(tensors[last].shape[0] + 1, *tensors[last].shape[1:])
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    model = tiny_gpt2(seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="shape"):
        qpeft.QPeftModel.from_pretrained(model, tmp_path)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
