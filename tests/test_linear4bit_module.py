"""qpeft.nn.Linear4bit and Quantized4bitWeight: forward, state dicts (safetensors), device/dtype handling."""

import pytest
import torch
from safetensors.torch import load_file, save_file

import qpeft
from qpeft import reference as R
from qpeft.nn import Linear4bit

from helpers import rel_err, same_bytes


def reference_forward(module: Linear4bit, x: torch.Tensor) -> torch.Tensor:
    """float64 y = x W^T + b with W the reference dequantization of the module's own state."""
    q = module.quantized_weight
    scales = (
        R.dequantize_nested_absmax(q.absmax.cpu(), q.nested_absmax.cpu(), q.nested_code.cpu(), q.nested_offset.cpu())
        if q.double_quant
        else q.absmax.cpu()
    )
    W = R.dequantize_4bit(q.packed.cpu(), scales, q.blocksize, q.quant_type, q.shape, torch.float32).double()
    bias = module.bias.detach().cpu().double() if module.bias is not None else None
    return torch.nn.functional.linear(x.detach().cpu().double(), W, bias)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("shape", [(1, 257), (3, 5, 257), (16, 257), (17, 257), (0, 257), (64, 257)])
def test_forward_matches_reference(device, dtype, tol, shape):
    dense = torch.nn.Linear(257, 130, dtype=dtype, device=device)
    layer = Linear4bit.from_linear(dense, "nf4", 64, double_quant=True)
    x = torch.randn(shape, dtype=dtype, device=device)
    y = layer(x)
    assert y.shape == (*shape[:-1], 130) and y.dtype == dtype
    if x.numel():
        assert rel_err(y, reference_forward(layer, x)) < tol


def test_forward_non_contiguous_input_and_compute_dtype(device):
    dense = torch.nn.Linear(96, 40, device=device)
    layer = Linear4bit.from_linear(dense, "fp4", 32, double_quant=False, compute_dtype=torch.bfloat16)
    x = torch.randn(96, 12, device=device).t()
    assert not x.is_contiguous()
    y = layer(x)
    assert y.dtype == torch.float32
    assert rel_err(y, reference_forward(layer, x)) < 1e-2


def test_quantization_error_is_small():
    dense = torch.nn.Linear(512, 256)
    layer = Linear4bit.from_linear(dense)
    W = dense.weight.detach()
    assert rel_err(layer.dequantized_weight(torch.float32), W) < 0.12


@pytest.mark.parametrize("quant_storage", [torch.uint8, torch.bfloat16])
def test_half_and_to_do_not_corrupt_scales(device, quant_storage):
    layer = Linear4bit.from_linear(torch.nn.Linear(128, 64), "nf4", 64, True, quant_storage=quant_storage).to(device)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer = layer.half()
    after = layer.state_dict()
    for key, value in before.items():
        if key == "bias":
            assert after[key].dtype == torch.float16
        else:
            assert same_bytes(after[key], value), key
    x = torch.randn(4, 128, dtype=torch.float16, device=device)
    assert layer(x).dtype == torch.float16


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("quant_storage", [torch.uint8, torch.bfloat16, torch.float32])
def test_safetensors_round_trip(tmp_path, double_quant, quant_storage):
    layer = Linear4bit.from_linear(
        torch.nn.Linear(256, 64, dtype=torch.bfloat16), "nf4", 64, double_quant, quant_storage=quant_storage
    )
    path = tmp_path / "layer.safetensors"
    save_file(layer.state_dict(), str(path))
    loaded = Linear4bit(
        256, 64, quant_type="fp4", blocksize=128, double_quant=not double_quant, bias_dtype=torch.bfloat16
    )
    loaded.load_state_dict(load_file(str(path)))
    for key, value in layer.state_dict().items():
        assert same_bytes(loaded.state_dict()[key], value), key
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    assert torch.equal(loaded(x), layer(x))


def test_load_state_dict_errors():
    layer = Linear4bit.from_linear(torch.nn.Linear(128, 64))
    sd = layer.state_dict()
    wrong_shape = Linear4bit(64, 128)
    with pytest.raises(RuntimeError, match="shape"):
        wrong_shape.load_state_dict(sd)
    missing = {k: v for k, v in sd.items() if k != "bias"}
    with pytest.raises(RuntimeError, match="Missing key"):
        Linear4bit(128, 64).load_state_dict(missing)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        Linear4bit(128, 64).load_state_dict({**sd, "extra": torch.zeros(1)})
    bad_map = dict(sd)
    bad_map["weight.quant_map"] = torch.zeros(16)
    with pytest.raises(RuntimeError, match="code book"):
        Linear4bit(128, 64).load_state_dict(bad_map)
    truncated = dict(sd)
    truncated["weight"] = sd["weight"][:-1]
    with pytest.raises(RuntimeError, match="bytes"):
        Linear4bit(128, 64).load_state_dict(truncated)


def test_meta_construction_then_load():
    """As model loaders do: build on the meta device (no memory, no compute), then load real weights."""
    source = Linear4bit.from_linear(torch.nn.Linear(256, 96), "nf4", 64, True)
    layer = Linear4bit(256, 96, device="meta")
    assert layer.weight.device.type == "meta"
    layer.load_state_dict(source.state_dict())
    assert layer.weight.device.type == "cpu" and layer.bias.device.type == "cpu"
    x = torch.randn(3, 256)
    assert torch.equal(layer(x), source(x))


def test_forward_bad_input():
    layer = Linear4bit.from_linear(torch.nn.Linear(32, 16))
    with pytest.raises(ValueError, match="last dimension 32"):
        layer(torch.randn(2, 31))


def test_to_linear_and_nested_model_state_dict():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    model[0] = Linear4bit.from_linear(model[0])
    sd = model.state_dict()
    assert "0.weight.quant_state.bitsandbytes__nf4" in sd and "2.weight" in sd
    fresh = torch.nn.Sequential(Linear4bit(64, 64, quant_type="fp4"), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    fresh.load_state_dict(sd)
    x = torch.randn(5, 64)
    assert torch.equal(fresh(x), model(x))
    dense = model[0].to_linear(torch.float32)
    assert torch.equal(dense.weight, model[0].dequantized_weight(torch.float32))


def test_quantized_weight_to_device_and_bad_from_float(device):
    q = qpeft.Quantized4bitWeight.from_float(torch.randn(33, 65))
    moved = q.to(device)
    assert moved.device.type == device.type
    assert torch.equal(moved.dequantize().cpu(), q.dequantize())
    with pytest.raises(ValueError, match="cannot be stored"):
        qpeft.Quantized4bitWeight.from_float(torch.randn(3, 3), quant_storage=torch.float32)  # 5 bytes
    with pytest.raises(TypeError, match="nn.Linear"):
        Linear4bit.from_linear(torch.nn.Conv1d(3, 3, 1))


def test_torch_compile_fullgraph():
    layer = Linear4bit.from_linear(torch.nn.Linear(128, 32), "nf4", 64, True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 128)
    assert torch.equal(compiled(x), layer(x))


def test_torch_save_and_deepcopy_after_a_forward(tmp_path):
    """The weight-derived caches a forward builds never reach pickling or deepcopy: torch.save of a used layer
    works, and a copy derives its caches from its own weight (an in-place edit of the copy is seen by the copy
    alone)."""
    import copy

    layer = Linear4bit.from_linear(torch.nn.Linear(64, 32, bias=False), double_quant=False, compute_dtype=torch.float32)
    x = torch.randn(3, 64)
    y = layer(x)
    layer.row_norms_squared()
    torch.save(layer, tmp_path / "layer.pt")
    loaded = torch.load(tmp_path / "layer.pt", weights_only=False)
    assert torch.equal(loaded(x), y)
    twin = copy.deepcopy(layer)
    assert not any(k in twin.__dict__ for k in Linear4bit._WEIGHT_CACHES)
    with torch.no_grad():
        twin.quantized_weight.absmax.mul_(2)  # every weight doubles exactly
    assert torch.equal(twin(x), 2 * y)
    assert torch.equal(layer(x), y)


def _blob(meta):
    import json

    return torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)


def test_hostile_state_dicts_are_refused_at_load():
    """Every malformed field of a 4-bit state dict is refused by load_state_dict with a message naming it (not at
    the first forward, not a raw KeyError / TypeError)."""
    import json

    good = Linear4bit.from_linear(torch.nn.Linear(600, 32)).state_dict()  # 300 blocks: two nested blocks
    key = "weight.quant_state.bitsandbytes__nf4"
    meta = json.loads(bytes(good[key].tolist()))

    def load(**changes):
        sd = {**good, **changes}
        Linear4bit(600, 32).load_state_dict({k: v for k, v in sd.items() if v is not None})

    load()  # the unchanged dict loads
    bad = [
        (dict(**{"weight.nested_absmax": torch.empty(0)}), "nested_absmax"),
        (dict(**{"weight.nested_quant_map": torch.zeros(255)}), "nested_quant_map"),
        (dict(**{key: _blob({**meta, "nested_offset": None})}), "nested_offset"),
        (dict(**{key: _blob({**meta, "nested_offset": "0.1"})}), "nested_offset"),
        (dict(**{key: _blob({k: v for k, v in meta.items() if k != "shape"})}), "shape"),
        (dict(**{key: _blob({**meta, "shape": [32, -600]})}), "shape"),
        (dict(**{key: _blob({**meta, "shape": "32x600"})}), "shape"),
        (dict(**{key: _blob([1, 2])}), "quant_state"),
        (dict(**{key: torch.tensor([0xFF, 0xFE], dtype=torch.uint8)}), "quant_state"),
        (dict(**{key: torch.zeros(1 << 17, dtype=torch.uint8)}), "quant_state"),
        (dict(**{key: _blob({**meta, "blocksize": 64.0})}), "blocksize"),
        (dict(**{"weight.absmax": torch.zeros(299, dtype=torch.uint8)}), "absmax"),
        (dict(**{"weight.absmax": torch.zeros(300, dtype=torch.float32)}), "absmax"),  # fp32 while nested
        (dict(**{key: _blob({**meta, "nested_offset": 1e39})}), "nested_offset"),  # finite in double, not float32
        (dict(**{"weight.nested_absmax": torch.tensor([1.0, float("nan")])}), "nested_absmax"),
        (dict(**{"weight.quant_map": None}), "quant_map"),
    ]
    for changes, what in bad:
        with pytest.raises(RuntimeError, match=what):  # load_state_dict's error, naming the field
            load(**changes)


def test_integer_inputs_are_refused_as_nn_linear_refuses_them():
    """With a compute dtype the input is cast for the matmul: an integer input would silently return integers."""
    import qpeft

    layers = [
        Linear4bit.from_linear(torch.nn.Linear(64, 8), compute_dtype=torch.float32),
        qpeft.nn.LoraLinear4bit.from_linear(torch.nn.Linear(64, 8), r=2, compute_dtype=torch.float32),
    ]
    for layer in layers:
        with pytest.raises(TypeError, match="floating-point input"):
            layer(torch.ones(2, 64, dtype=torch.int64))
    with pytest.raises(RuntimeError):
        torch.nn.Linear(64, 8)(torch.ones(2, 64, dtype=torch.int64))  # (what nn.Linear does)
