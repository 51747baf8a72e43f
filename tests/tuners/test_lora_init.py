"""LoRA initialisations from the weight (PiSSA, OLoRA, LoftQ, orthogonal) against peft's own on the same weights and a
float64 definition of LoftQ; their files both ways and peft's conversion to plain LoRA."""

import copy

import pytest
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
    return float(torch.linalg.matrix_norm(W.double() - q.dequantize(torch.float32).double()) / torch.linalg.matrix_norm(W.double()))


def approx_error(layer, W: torch.Tensor) -> float:
    a = layer.adapters["default"]
    approx = layer.base.dequantized_weight(torch.float32).double() + a.scaling * a.lora_B.double() @ a.lora_A.double()
    return float(torch.linalg.matrix_norm(W.double() - approx) / torch.linalg.matrix_norm(W.double()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
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
    config = qpeft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 1})
    with pytest.raises(ValueError, match="LoftQ needs the float weight"):
        model.add_adapter("loftq", config)
    assert list(model.peft_config) == ["default", "olora"]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()) and state


@pytest.mark.parametrize(
    "kw, key",
    [
        (dict(init_lora_weights="corda"), "init_lora_weights"),
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
