"""LoRA initialisations from the weight (PiSSA, OLoRA, LoftQ, orthogonal) against peft's own on the same weights and a
float64 definition of LoftQ; their files both ways and peft's conversion to plain LoRA."""

import copy
import dataclasses
import importlib.util
import json
import sys
import types

import pytest
import safetensors.torch
import torch

import qpeft
from qpeft import Quantized4bitWeight
from qpeft.errors import ConfigError
from qpeft.tuners.lora import init

from helpers import float_model_of, rel_err, same_bytes, tiny_gpt2, tiny_llama, tokens

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "down_proj"]


def qlayers(model) -> dict:
    return {name: layer for name, layer in model.lora_layers()}


def peft_layers(model) -> dict:
    from peft.tuners.lora import LoraLayer

    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def assert_same_q(a: Quantized4bitWeight, b: Quantized4bitWeight) -> None:
    for key, t in a.tensors().items():
        assert same_bytes(t, b.tensors()[key]), key
    assert a.dtype == b.dtype


def plain_error(W: torch.Tensor, **fmt) -> float:
    q = Quantized4bitWeight.from_float(W, **fmt)
    return float(
        torch.linalg.matrix_norm(W.double() - q.dequantize(torch.float32).double())
        / torch.linalg.matrix_norm(W.double())
    )


def approx_error(layer, W: torch.Tensor) -> float:
    a = layer.adapters["default"]
    approx = layer.base.dequantized_weight(torch.float32).double() + a.scaling * a.lora_B.double() @ a.lora_A.double()
    return float(torch.linalg.matrix_norm(W.double() - approx) / torch.linalg.matrix_norm(W.double()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("init_name", ["pissa", "olora"])
def test_pissa_and_olora_start_where_peft_does(init_name, dtype):
    """peft decomposes the float weight and leaves the residual in the model; qpeft's adapter holds the same A and
    B, and its base is the residual quantized (what loading peft's residual model in 4-bit gives)."""
    original = tiny_llama().to(dtype)
    kw = dict(r=4, lora_alpha=12, target_modules=TARGETS, init_lora_weights=init_name)
    ours = qpeft.get_peft_model(copy.deepcopy(original), qpeft.LoraConfig(**kw))
    theirs = peft.get_peft_model(copy.deepcopy(original), peft.LoraConfig(**kw))
    mine, reference = qlayers(ours), peft_layers(theirs)
    assert mine.keys() == reference.keys() and len(mine) == 6
    for name, layer in mine.items():
        p = reference[name]
        a = layer.adapters["default"]
        # peft keeps its adapter in the model's dtype, qpeft in fp32
        close = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-5)
        torch.testing.assert_close(a.lora_A.to(dtype).float(), p.lora_A["default"].weight.float(), **close)
        torch.testing.assert_close(a.lora_B.to(dtype).float(), p.lora_B["default"].weight.float(), **close)
        residual = p.base_layer.weight.detach()
        assert residual.dtype == dtype
        assert_same_q(layer.base.quantized_weight, Quantized4bitWeight.from_float(residual))
    if init_name == "pissa":  # the principal part moved out: the quantized remainder is closer to W
        W = original.model.layers[0].self_attn.q_proj.weight.detach().float()
        assert approx_error(mine["model.layers.0.self_attn.q_proj"], W) < plain_error(W)


def test_pissa_niter_draws_as_peft_does():
    """pissa_niter_[n]: torch's randomized SVD with n subspace iterations, from the same generator state as peft."""
    original = tiny_llama()
    model = peft.get_peft_model(copy.deepcopy(original), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    layer = peft_layers(model)["model.layers.1.self_attn.q_proj"]
    W = layer.base_layer.weight.detach().clone()
    torch.manual_seed(7)
    layer.pissa_init("default", "pissa_niter_3")
    torch.manual_seed(7)
    start = init.start("pissa_niter_3", W, 4, layer.scaling["default"], Quantized4bitWeight.from_float)
    torch.testing.assert_close(start.A, layer.lora_A["default"].weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(start.B, layer.lora_B["default"].weight, rtol=1e-5, atol=1e-6)
    assert_same_q(start.q, Quantized4bitWeight.from_float(layer.base_layer.weight.detach()))


def test_orthogonal_draws_as_peft_does():
    original = tiny_llama()
    model = peft.get_peft_model(copy.deepcopy(original), peft.LoraConfig(r=6, target_modules=["up_proj"]))
    config = dict(r=6, target_modules=["up_proj"])
    layer = peft_layers(model)["model.layers.0.mlp.up_proj"]
    torch.manual_seed(5)
    layer.orthogonal_init("default")
    torch.manual_seed(5)
    A, B = init.orthogonal(6, layer.in_features, layer.out_features)
    torch.testing.assert_close(A, layer.lora_A["default"].weight, rtol=0, atol=0)
    torch.testing.assert_close(B, layer.lora_B["default"].weight, rtol=0, atol=0)
    # B A = 0: a new orthogonal adapter computes what the base computes
    ours = qpeft.get_peft_model(copy.deepcopy(original), qpeft.LoraConfig(**config, init_lora_weights="orthogonal"))
    plain = qpeft.get_peft_model(copy.deepcopy(original), qpeft.LoraConfig(**config))
    a = qlayers(ours)["model.layers.0.mlp.up_proj"].adapters["default"]
    assert a.lora_B.abs().sum() > 0 and (a.lora_B @ a.lora_A).abs().max() < 1e-6
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens()).logits, plain(tokens()).logits, rtol=1e-5, atol=1e-5)


def loftq_reference(W: torch.Tensor, r: int, scaling: float, iterations: int, **fmt):
    """LoftQ by its definition, the SVD in float64: Q_t = quant(W - s B_t A_t), s B_{t+1} A_{t+1} = the rank-r
    truncation of W - dequant(Q_t). Returns (Q, s B A in float64)."""
    W64, low_rank = W.double(), torch.zeros_like(W, dtype=torch.float64)
    for _ in range(iterations):
        q = Quantized4bitWeight.from_float((W64 - low_rank).float(), **fmt)
        U, S, Vh = torch.linalg.svd(W64 - q.dequantize(torch.float32).double(), full_matrices=False)
        low_rank = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
    return q, low_rank


@pytest.mark.parametrize("fmt", [dict(), dict(quant_type="fp4", blocksize=128, double_quant=False)])
@pytest.mark.parametrize("iterations", [1, 4])
def test_loftq_is_its_definition_in_the_base_s_own_format(iterations, fmt):
    """peft's LoftQ runs only on CUDA / XPU (it moves every weight there), so qpeft's is checked against LoftQ's
    definition: the base holds the last Q in the layer's format, s B A is the rank-r SVD of the remaining error (with
    the scaling, which peft leaves out: equal when lora_alpha == r)."""
    original = tiny_llama()
    config = qpeft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="loftq",
        loftq_config=qpeft.LoftQConfig(loftq_iter=iterations), **fmt,
    )  # fmt: skip
    model = qpeft.get_peft_model(copy.deepcopy(original), config)
    for name, layer in qlayers(model).items():
        W = original.get_submodule(name).weight.detach()
        q, low_rank = loftq_reference(W, 4, 2.0, iterations, **fmt)
        if iterations == 1:  # quantized from W itself: the same bytes
            assert_same_q(layer.base.quantized_weight, q)
        else:  # from W - s B A, rounded differently in fp32 and fp64: a code may differ at a rounding boundary
            ours, theirs = layer.base.quantized_weight.packed.view(torch.uint8), q.packed.view(torch.uint8)
            assert (ours != theirs).float().mean() < 0.01
        torch.testing.assert_close(layer.adapters["default"].delta_weight().double(), low_rank, rtol=0, atol=1e-3)
        assert approx_error(layer, W) < plain_error(W, **fmt)


def test_loftq_iterations_reduce_the_error_on_a_real_shape():
    """A Llama-sized weight (heavy-tailed, as trained weights are): LoftQ's error falls with iterations and is
    below plain QLoRA's; QPiSSA's too."""
    g = torch.Generator().manual_seed(0)
    W = (torch.randn(512, 1024, generator=g) * torch.exp(torch.randn(1, 1024, generator=g))).to(torch.bfloat16)
    errors = {}
    for name, n in [("loftq", 1), ("loftq", 5), ("pissa", 1)]:
        s = init.start(name, W, 16, 2.0, Quantized4bitWeight.from_float, loftq_iter=n)
        errors[name, n] = init.relative_error(W, s, 2.0)
    plain = plain_error(W)
    assert errors["loftq", 5] < errors["loftq", 1] < plain and errors["pissa", 1] < plain


def test_dora_magnitude_starts_at_the_norms_of_the_started_weight():
    original = tiny_llama()
    config = qpeft.LoraConfig(r=4, use_dora=True, target_modules=["q_proj"], init_lora_weights="pissa")
    model = qpeft.get_peft_model(copy.deepcopy(original), config)
    layer = qlayers(model)["model.layers.0.self_attn.q_proj"]
    a = layer.adapters["default"]
    started = layer.base.dequantized_weight(torch.float32).double() + a.delta_weight().double()
    torch.testing.assert_close(a.lora_magnitude.double(), started.norm(dim=1), rtol=1e-5, atol=1e-6)
    # DoRA's start is the identity: the output is that of the started weight
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), x.double() @ started.T, rtol=1e-4, atol=1e-4)


def test_gpt2_conv1d_layers_start_from_their_transposed_weight():
    original = tiny_gpt2()
    model = qpeft.get_peft_model(copy.deepcopy(original), qpeft.LoraConfig(r=4, init_lora_weights="pissa"))
    layer = qlayers(model)["transformer.h.0.attn.c_attn"]
    W = original.transformer.h[0].attn.c_attn.weight.detach().T  # Conv1D stores [in, out]
    assert layer.base.fan_in_fan_out and approx_error(layer, W) < plain_error(W)
    merged = model.merge_and_unload()
    torch.testing.assert_close(merged.transformer.h[0].attn.c_attn.weight.T, W, rtol=0, atol=0.25 * W.abs().max())


def test_an_already_4bit_base_restarts_from_its_dequantized_weight_and_loftq_is_refused():
    original = tiny_llama()
    base = qpeft.get_peft_model(copy.deepcopy(original), qpeft.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.warns(UserWarning, match="already 4-bit"):
        base.add_adapter("olora", qpeft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="olora"))
    model = base
    layer = qlayers(model)["model.layers.0.self_attn.q_proj"]
    a = layer.adapters["olora"]
    assert a.lora_B.abs().sum() > 0
    before = state = {k: v.clone() for k, v in model.state_dict().items()}
    config = qpeft.LoraConfig(
        r=4, target_modules=["q_proj"], init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 1}
    )
    with pytest.raises(ValueError, match="LoftQ needs the float weight"):
        model.add_adapter("loftq", config)
    assert list(model.peft_config) == ["default", "olora"]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()) and state


@pytest.mark.parametrize(
    "kw, key",
    [
        (dict(init_lora_weights="lora_ga"), "init_lora_weights"),
        (dict(init_lora_weights="pissa_niter_0"), "init_lora_weights"),
        (dict(init_lora_weights="loftq"), "loftq_config"),
        (dict(init_lora_weights="loftq", loftq_config={"loftq_bits": 8, "loftq_iter": 1}), "loftq_config"),
        (dict(init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 0}), "loftq_config"),
        (dict(init_lora_weights="orthogonal", r=5), "r"),
        (dict(init_lora_weights="orthogonal", rank_pattern={"q_proj": 3}), "r"),
    ],
)
def test_bad_initialisation_configs_are_refused_by_name(kw, key):
    with pytest.raises(ConfigError, match=key):
        qpeft.LoraConfig(**kw)


def test_a_rank_above_the_weight_s_smaller_side_is_refused():
    W = torch.randn(8, 64)
    with pytest.raises(ValueError, match="r=9"):
        init.start("pissa", W, 9, 1.0, Quantized4bitWeight.from_float)
    with pytest.raises(ValueError, match="finite"):
        init.start("olora", torch.full((8, 64), float("nan")), 2, 1.0, Quantized4bitWeight.from_float)


# ---- files -----------------------------------------------------------------------------------------------------
def trained(model, seed=3):
    """Every adapter moved as if trained (A and B both)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in model.lora_layers():
            for a in layer.adapters.values():
                a.lora_A.add_(0.05 * torch.randn(a.lora_A.shape, generator=g))
                a.lora_B.add_(0.05 * torch.randn(a.lora_B.shape, generator=g))
    return model


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(tokens()).logits


@pytest.mark.parametrize("init_name", ["pissa", "olora"])
def test_peft_s_weight_moving_adapter_and_residual_model_load_in_qpeft(tmp_path, init_name):
    """peft's recipe: decompose, save the residual model and the adapter (its init_lora_weights set to True so
    loading does not decompose again). qpeft loads the residual model in 4-bit with the adapter and computes what
    peft computes on the same (dequantized) base."""
    original = tiny_llama()
    theirs = peft.get_peft_model(
        copy.deepcopy(original), peft.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=init_name)
    )
    theirs.peft_config["default"].init_lora_weights = True
    theirs.save_pretrained(tmp_path / "adapter")
    theirs.unload().save_pretrained(tmp_path / "residual")
    residual = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "residual")
    ours = qpeft.PeftModel.from_pretrained(copy.deepcopy(residual), tmp_path / "adapter")
    check = peft.PeftModel.from_pretrained(float_model_of(ours.get_base_model(), residual), tmp_path / "adapter")
    assert rel_err(logits(ours), logits(check)) < 1e-5


def test_qpeft_s_adapter_converts_to_plain_lora_of_the_original_weights_as_peft_converts(tmp_path):
    """save_pretrained(path_initial_model_for_weight_conversion=...) writes what peft's writes for the same adapter,
    and that plain rank-2r adapter on the original float weights adds exactly the trained adapter's change."""
    original = tiny_llama()
    ours = qpeft.get_peft_model(
        copy.deepcopy(original), qpeft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="pissa")
    )
    ours.peft_config["default"].init_lora_weights = True  # peft's recipe for the initial adapter
    ours.save_pretrained(tmp_path / "initial")
    start = {n: layer.adapters["default"].delta_weight() for n, layer in ours.lora_layers()}
    trained(ours)
    ours.save_pretrained(tmp_path / "trained")
    ours.save_pretrained(tmp_path / "ours", path_initial_model_for_weight_conversion=tmp_path / "initial")
    # peft converting the same trained adapter, on the same base
    theirs = peft.PeftModel.from_pretrained(float_model_of(ours.get_base_model(), original), tmp_path / "trained")
    theirs.save_pretrained(tmp_path / "theirs", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    files = {}
    for side in ("ours", "theirs"):
        files[side] = (
            json.loads((tmp_path / side / "adapter_config.json").read_text()),
            safetensors.torch.load_file(tmp_path / side / "adapter_model.safetensors"),
        )
    (cfg, ts), (pcfg, pts) = files["ours"], files["theirs"]
    assert (
        (cfg["r"], cfg["lora_alpha"], cfg["init_lora_weights"])
        == (pcfg["r"], pcfg["lora_alpha"], True)
        == (8, 16, True)
    )
    assert ts.keys() == pts.keys()
    for k in ts:
        torch.testing.assert_close(ts[k], pts[k], rtol=0, atol=0)
    converted = peft.PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "ours")
    for name, layer in ours.lora_layers():
        p = peft_layers(converted)[name]
        change = layer.adapters["default"].delta_weight() - start[name]
        torch.testing.assert_close(p.get_delta_weight("default"), change, rtol=1e-5, atol=1e-6)


def test_conversion_needs_a_matching_initial_adapter(tmp_path):
    original = tiny_llama()
    ours = qpeft.get_peft_model(
        copy.deepcopy(original), qpeft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="olora")
    )
    other = qpeft.get_peft_model(copy.deepcopy(original), qpeft.LoraConfig(r=2, target_modules=["q_proj"]))
    other.save_pretrained(tmp_path / "initial")
    with pytest.raises(ValueError, match="initial adapter has no"):
        ours.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "initial")
    assert not (tmp_path / "out" / "adapter_config.json").exists()


def test_a_loaded_adapter_never_moves_the_base_again(tmp_path):
    """A saved PiSSA adapter whose config still says "pissa" loads onto the base it was saved with as it is (peft
    would decompose that base a second time)."""
    original = tiny_llama()
    ours = trained(
        qpeft.get_peft_model(
            copy.deepcopy(original), qpeft.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="pissa")
        )
    )
    y = logits(ours)
    ours.save_pretrained(tmp_path / "adapter")
    qpeft.save_4bit_pretrained(ours.get_base_model(), tmp_path / "base")
    base = qpeft.load_4bit_pretrained(tmp_path / "base", transformers.AutoModelForCausalLM)
    loaded = qpeft.PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert loaded.peft_config["default"].init_lora_weights == "pissa"
    torch.testing.assert_close(logits(loaded), y, rtol=0, atol=0)


@pytest.mark.parametrize("init_name", ["loftq", "pissa"])
def test_a_base_quantized_at_load_starts_from_the_float_checkpoint_layer_by_layer(tmp_path, init_name):
    """The qpeft quantizer loads the bf16 checkpoint in 4-bit; initialize_lora_weights then reads each layer's float
    weight from the checkpoint and gives what get_peft_model on the float model gives: the same base bytes and
    adapter."""
    original = tiny_llama().to(torch.bfloat16)
    original.save_pretrained(tmp_path / "float")
    extra = dict(loftq_config=qpeft.LoftQConfig(loftq_iter=2)) if init_name == "loftq" else {}
    config = qpeft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init_name, **extra)
    expected = qpeft.get_peft_model(copy.deepcopy(original), copy.deepcopy(config))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "float", quantization_config=qpeft.QuantizationConfig(), dtype=torch.bfloat16
    )
    if init_name == "loftq":
        with pytest.raises(ValueError, match="LoftQ needs the float weight"):
            qpeft.get_peft_model(loaded, copy.deepcopy(config))
        model = qpeft.get_peft_model(loaded, dataclasses.replace(config, init_lora_weights=True, loftq_config={}))
        model.peft_config["default"] = config
    else:
        with pytest.warns(UserWarning, match="already 4-bit"):
            model = qpeft.get_peft_model(loaded, copy.deepcopy(config))
    names = qpeft.initialize_lora_weights(model, tmp_path / "float")
    assert sorted(names) == sorted(qlayers(expected)) and len(names) == 6
    for name, layer in qlayers(model).items():
        want = qlayers(expected)[name]
        assert_same_q(layer.base.quantized_weight, want.base.quantized_weight)
        for t in ("lora_A", "lora_B"):
            torch.testing.assert_close(getattr(layer.adapters["default"], t), getattr(want.adapters["default"], t))


def test_replace_lora_weights_loftq_keeps_the_base_and_takes_a_callback(tmp_path):
    original = tiny_llama()
    original.save_pretrained(tmp_path / "float")
    model = qpeft.get_peft_model(copy.deepcopy(original), qpeft.LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS))
    bases = {n: layer.base.quantized_weight.packed.clone() for n, layer in model.lora_layers()}
    seen = []

    def callback(peft_model, name):
        seen.append(name)
        return "down_proj" not in name  # keep all but down_proj's new start

    names = qpeft.replace_lora_weights_loftq(model, tmp_path / "float", callback=callback)
    assert sorted(seen) == sorted(bases) and sorted(names) == sorted(n for n in bases if "down_proj" not in n)
    for name, layer in model.lora_layers():
        assert torch.equal(layer.base.quantized_weight.packed, bases[name])
        a = layer.adapters["default"]
        W = original.get_submodule(name).weight.detach()
        if name in names:  # s B A = the rank-r truncation of the quantization error
            err = W.double() - layer.base.dequantized_weight(torch.float32).double()
            U, S, Vh = torch.linalg.svd(err, full_matrices=False)
            torch.testing.assert_close(
                a.delta_weight().double(), U[:, :4] @ torch.diag(S[:4]) @ Vh[:4], rtol=0, atol=1e-5
            )
        else:
            assert not a.lora_B.any()
    with pytest.raises(KeyError, match="holds no"):
        other = qpeft.get_peft_model(tiny_gpt2(), qpeft.LoraConfig(r=2))
        qpeft.replace_lora_weights_loftq(other, tmp_path / "float")


@pytest.mark.parametrize("init_name", ["loftq", "pissa_niter_2", "olora", "orthogonal"])
def test_qpeft_s_started_adapters_load_in_peft_on_the_same_base(tmp_path, init_name):
    """Saved after training (its config's init set to True, peft's recipe), each adapter gives peft's logits on the
    dequantized base it was trained on, and comes back to qpeft unchanged."""
    original = tiny_llama()
    extra = dict(loftq_config=qpeft.LoftQConfig(loftq_iter=2)) if init_name == "loftq" else {}
    config = qpeft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init_name, **extra)
    ours = trained(qpeft.get_peft_model(copy.deepcopy(original), config))
    ours.peft_config["default"].init_lora_weights = True
    ours.save_pretrained(tmp_path / "adapter")
    check = peft.PeftModel.from_pretrained(float_model_of(ours.get_base_model(), original), tmp_path / "adapter")
    assert rel_err(logits(ours), logits(check)) < 1e-5
    qpeft.save_4bit_pretrained(ours.get_base_model(), tmp_path / "base")
    base = qpeft.load_4bit_pretrained(tmp_path / "base", transformers.AutoModelForCausalLM)
    back = qpeft.PeftModel.from_pretrained(base, tmp_path / "adapter")
    torch.testing.assert_close(logits(back), logits(ours), rtol=0, atol=0)


# ---- CorDA -----------------------------------------------------------------------------------------------------
def calibration(model, n=4):
    g = torch.Generator().manual_seed(11)
    batches = [torch.randint(0, 101, (1, 12), generator=g) for _ in range(n)]  # peft's hook takes one sequence

    def run():
        with torch.no_grad():
            for ids in batches:
                model(ids)

    return run


def peft_preprocess_corda():
    """peft's preprocess_corda. Its module imports the attrs package for one dataclass decorator, which peft does not
    declare as a dependency: the standard library's decorator stands in when attrs is absent."""
    if "attr" not in sys.modules and importlib.util.find_spec("attr") is None:
        sys.modules["attr"] = types.SimpleNamespace(dataclass=dataclasses.dataclass)
    from peft.tuners.lora.corda import preprocess_corda

    return preprocess_corda


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_corda_starts_where_peft_s_does(method, tmp_path):
    peft_preprocess = peft_preprocess_corda()

    original = tiny_llama()
    kw = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="corda")
    ours_model, theirs_model = copy.deepcopy(original), copy.deepcopy(original)
    config = qpeft.LoraConfig(**kw, corda_config=qpeft.CordaConfig(corda_method=method, cache_file=str(tmp_path / "c")))
    qpeft.preprocess_corda(ours_model, config, run_model=calibration(ours_model))
    ours = qpeft.get_peft_model(ours_model, config)
    peft_config = peft.LoraConfig(**kw, corda_config=peft.tuners.lora.config.CordaConfig(corda_method=method))
    peft_preprocess(theirs_model, peft_config, run_model=calibration(theirs_model))
    theirs = peft.get_peft_model(theirs_model, peft_config)
    reference = peft_layers(theirs)
    for name, layer in qlayers(ours).items():
        p, a = reference[name], layer.adapters["default"]
        torch.testing.assert_close(a.lora_A, p.lora_A["default"].weight, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.lora_B, p.lora_B["default"].weight, rtol=1e-4, atol=1e-5)
        residual = Quantized4bitWeight.from_float(p.base_layer.weight.detach())
        ours_codes, their_codes = (
            layer.base.quantized_weight.packed.view(torch.uint8),
            residual.packed.view(torch.uint8),
        )
        assert (ours_codes != their_codes).float().mean() < 0.002  # a code may differ at a rounding boundary
    # the cache (safetensors) gives the same start again without data
    again = copy.deepcopy(original)
    qpeft.preprocess_corda(again, config)
    cached = qpeft.get_peft_model(again, config)
    for name, layer in qlayers(cached).items():
        assert_same_q(layer.base.quantized_weight, qlayers(ours)[name].base.quantized_weight)


def test_corda_refusals(tmp_path):
    original = tiny_llama()
    config = qpeft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="corda")
    with pytest.raises(ValueError, match="preprocess_corda"):
        qpeft.get_peft_model(copy.deepcopy(original), config)
    with pytest.raises(ValueError, match="run_model"):
        qpeft.preprocess_corda(copy.deepcopy(original), config)
    (tmp_path / "pickled.pt").write_bytes(b"\x80\x04not safetensors")
    bad = dataclasses.replace(config, corda_config=qpeft.CordaConfig(cache_file=str(tmp_path / "pickled.pt")))
    with pytest.raises(ValueError, match="never loads pickle"):
        qpeft.preprocess_corda(copy.deepcopy(original), bad)
    with pytest.raises(ConfigError, match="corda_method"):
        qpeft.CordaConfig(corda_method="fast")
    quantized = qpeft.get_peft_model(copy.deepcopy(original), qpeft.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="4-bit already"):
        quantized.add_adapter("corda", config)
    model = copy.deepcopy(original)
    with pytest.raises(ValueError, match="non-finite"):

        def poisoned():
            model(torch.zeros(1, 3, dtype=torch.long), inputs_embeds=None)

        with torch.no_grad():
            model.model.embed_tokens.weight[0] = float("nan")
        qpeft.preprocess_corda(model, config, run_model=poisoned)


def test_a_checkpoint_without_the_layer_or_of_another_shape_is_refused(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path / "gpt2")
    model = qpeft.get_peft_model(tiny_llama(), qpeft.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(KeyError, match="holds no"):
        qpeft.replace_lora_weights_loftq(model, tmp_path / "gpt2")
    with pytest.raises(ValueError, match="starts from no weight"):
        qpeft.initialize_lora_weights(model, tmp_path / "gpt2")
