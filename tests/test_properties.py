"""Property-based tests (hypothesis): the ops against the reference over generated shapes, dtypes, strides,
blocksizes and values; the loaders over generated hostile configs and state dicts, which must load or raise the
documented errors, never anything else. Derandomized (the same examples on every run)."""

import json
import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import qpeft  # noqa: E402
from qpeft import functional as F  # noqa: E402
from qpeft import reference as R  # noqa: E402
from qpeft.nn import Linear4bit  # noqa: E402

from helpers import same_bytes  # noqa: E402

SETTINGS = settings(
    derandomize=True,
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@st.composite
def tensors(draw, max_dim=70):
    """A float tensor: 1-3 dims (some 0), a dtype, a magnitude, maybe a non-contiguous view."""
    shape = draw(st.lists(st.integers(0, max_dim), min_size=1, max_size=3))
    dtype = draw(st.sampled_from(DTYPES))
    scale = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    t = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)
    if draw(st.booleans()) and t.dim() >= 2:
        t = t.transpose(0, 1)
    if draw(st.booleans()) and t.dim() >= 1 and t.shape[-1] > 1:
        t = t[..., ::2]
    return t


@SETTINGS
@given(
    A=tensors(),
    blocksize=st.sampled_from(R.VALID_BLOCKSIZES),
    quant_type=st.sampled_from(R.QUANT_TYPES),
    out_dtype=st.sampled_from(DTYPES),
)
def test_quantize_and_dequantize_equal_the_reference(A, blocksize, quant_type, out_dtype):
    packed, absmax = F.quantize_4bit(A, blocksize, quant_type)
    ref_packed, ref_absmax = R.quantize_4bit(A.contiguous(), blocksize, quant_type)
    assert torch.equal(packed, ref_packed) and torch.equal(absmax, ref_absmax)
    out = F.dequantize_4bit(packed, absmax, blocksize, quant_type, A.shape, out_dtype)
    assert same_bytes(out, R.dequantize_4bit(ref_packed, ref_absmax, blocksize, quant_type, A.shape, out_dtype))


@SETTINGS
@given(
    m=st.integers(0, 40),
    k=st.integers(1, 150),
    n=st.integers(0, 40),
    dtype=st.sampled_from(DTYPES),
    blocksize=st.sampled_from([32, 64, 128]),
    double_quant=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
    transposed=st.booleans(),
)
def test_linear_ops_equal_the_reference(m, k, n, dtype, blocksize, double_quant, seed, transposed):
    g = torch.Generator().manual_seed(seed)
    q = qpeft.Quantized4bitWeight.from_float(torch.randn(n, k, generator=g), "nf4", blocksize, double_quant)
    W = R.dequantize_4bit(q.packed.reshape(-1), q.fp32_scales(), blocksize, "nf4", (n, k), torch.float32).double()
    x = (torch.randn(k, m, generator=g).T if transposed else torch.randn(m, k, generator=g)).to(dtype)
    nested = dict(nested_absmax=q.nested_absmax, nested_code=q.nested_code, nested_offset=q.nested_offset)
    y = F.linear_4bit(x, q.packed, q.absmax, blocksize, "nf4", n, **nested)
    dx = F.linear_4bit_grad_input(torch.ones(m, n, dtype=dtype), q.packed, q.absmax, blocksize, "nf4", k, **nested)
    assert y.shape == (m, n) and dx.shape == (m, k) and y.dtype == dx.dtype == dtype
    # Bounded by the magnitudes summed (a sum that cancels keeps the error of its terms): in 16-bit the weights
    # and the outputs are rounded to the dtype (2^-11 / 2^-8 relative each).
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    x64, dy64 = x.double(), torch.ones(m, n, dtype=torch.float64)
    assert ((y.double() - x64 @ W.T).abs() <= tol * (x64.abs() @ W.abs().T) + 1e-30).all()
    assert ((dx.double() - dy64 @ W).abs() <= tol * (dy64.abs() @ W.abs()) + 1e-30).all()


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
CONFIG_KEYS = [
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "bias",
    "use_rslora",
    "use_dora",
    "lora_bias",
    "modules_to_save",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "fan_in_fan_out",
    "rank_pattern",
    "alpha_pattern",
    "init_lora_weights",
    "task_type",
    "peft_type",
    "inference_mode",
]


@SETTINGS
@given(changes=st.dictionaries(st.sampled_from(CONFIG_KEYS), JSON, min_size=1, max_size=3))
def test_generated_adapter_configs_load_or_raise_config_errors(changes):
    """A config dict with generated values: it loads (every value then has the documented type) or raises
    ConfigError / ValueError naming the problem; never TypeError, KeyError, AttributeError, RecursionError."""
    base = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "lora_dropout": 0.0}
    try:
        config = qpeft.LoraConfig.from_peft_dict({**base, **changes}, "generated.json")
    except ValueError as e:
        assert str(e).startswith("qpeft:"), e
        return
    assert isinstance(config.r, int) and not isinstance(config.r, bool) and config.r > 0
    assert isinstance(config.use_rslora, bool) and isinstance(config.use_dora, bool)
    assert 0 <= config.lora_dropout <= F.MAX_DROPOUT_P and math.isfinite(config.lora_alpha)


STATE_KEYS = [
    "weight",
    "weight.absmax",
    "weight.quant_map",
    "weight.nested_absmax",
    "weight.nested_quant_map",
    "weight.quant_state.bitsandbytes__nf4",
]


@st.composite
def hostile_tensors(draw):
    dtype = draw(st.sampled_from([torch.uint8, torch.float32, torch.bfloat16, torch.int64]))
    shape = draw(st.lists(st.integers(0, 300), min_size=0, max_size=2))
    return torch.zeros(shape, dtype=dtype) if dtype != torch.uint8 else torch.randint(0, 256, shape, dtype=dtype)


@SETTINGS
@given(key=st.sampled_from(STATE_KEYS), value=hostile_tensors() | st.just(None), meta=JSON)
def test_generated_hostile_state_dicts_are_refused(key, value, meta):
    """A Linear4bit state dict with one entry replaced (or dropped), or a generated quant_state JSON: it loads and
    runs, or load_state_dict raises with a qpeft message; never a crash or another exception type."""
    good = Linear4bit.from_linear(torch.nn.Linear(64, 8)).state_dict()
    sd = dict(good)
    if key.startswith("weight.quant_state") and value is None:
        sd[key] = torch.tensor(list(json.dumps(meta, allow_nan=True).encode()), dtype=torch.uint8)
    elif value is None:
        del sd[key]
    else:
        sd[key] = value
    layer = Linear4bit(64, 8)
    try:
        layer.load_state_dict(sd)
    except (RuntimeError, ValueError) as e:  # qpeft's checks, or torch's own missing-key report
        assert "qpeft" in str(e) or "Missing key(s)" in str(e), e
        return
    y = layer(torch.randn(2, 64))  # what loads must also run
    assert y.shape == (2, 8)


# ---- adapter files of every method, checkpoint folders with stale or duplicate files --------------------------

_SAVED: dict = {}


def saved_adapter(name: str, folder):
    """The registered method's default example on tiny_llama, trained one step and saved (once per method)."""
    from qpeft.tuners import registry

    from helpers import tiny_llama

    if name not in _SAVED:
        torch.manual_seed(0)
        method = registry.by_name(name)
        model = qpeft.get_peft_model(tiny_llama(), method.examples["default"]())
        if method.warmup:
            ids = torch.randint(0, 101, (2, 6))
            getattr(model, method.warmup)([{"input_ids": ids, "labels": ids}])
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.01)
        model.save_pretrained(folder)
        _SAVED[name] = (json.loads((folder / "adapter_config.json").read_text()), read_weights(folder))
    return _SAVED[name]


def read_weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


EDITS = ["drop", "add", "shape", "dtype", "nan", "config"]


@SETTINGS
@given(
    name=st.sampled_from(qpeft.tuners.registry.names()),
    edit=st.sampled_from(EDITS),
    pick=st.integers(0, 10**6),
    size=st.integers(0, 5),
    dtype=st.sampled_from([torch.int64, torch.bool, torch.float16, torch.uint8]),
    value=JSON,
)
def test_generated_adapter_files_of_every_method_load_or_leave_the_model_as_it_was(
    tmp_path_factory, name, edit, pick, size, dtype, value
):
    """A saved adapter of any method with one generated change (a tensor dropped, added, reshaped, retyped, NaN,
    or a config value replaced): from_pretrained loads it, or raises a qpeft error and leaves the caller's model as
    it was; never another exception type."""
    from safetensors.torch import save_file

    from helpers import tiny_llama

    config, tensors = saved_adapter(name, tmp_path_factory.mktemp("saved"))
    config, tensors = dict(config), dict(tensors)
    keys = sorted(tensors)
    key = keys[pick % len(keys)] if keys else None
    if edit == "drop" and key:
        del tensors[key]
    elif edit == "add":
        tensors[f"base_model.model.extra{pick}.weight"] = torch.zeros(size)
    elif edit == "shape" and key:
        tensors[key] = torch.zeros([size] * max(tensors[key].dim(), 1), dtype=tensors[key].dtype)
    elif edit == "dtype" and key:
        tensors[key] = torch.zeros(tensors[key].shape, dtype=dtype)
    elif edit == "nan" and key and tensors[key].is_floating_point() and tensors[key].numel():
        tensors[key] = tensors[key].clone().fill_(float("nan"))
    elif edit == "config":
        config[sorted(config)[pick % len(config)]] = value
    folder = tmp_path_factory.mktemp("edited")
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(config))
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kinds = [(n, type(m).__name__) for n, m in model.named_modules()]
    try:
        qpeft.QPeftModel.from_pretrained(model, folder)
    except (ValueError, FileNotFoundError, KeyError) as e:
        assert "qpeft" in str(e), repr(e)
        assert [(n, type(m).__name__) for n, m in model.named_modules()] == kinds
        after = model.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


@SETTINGS
@given(
    stale=st.sampled_from(["none", "index_to_old_shard", "index_to_missing_shard", "duplicate_key", "truncated"]),
    resave=st.booleans(),
)
def test_generated_checkpoint_folders_load_what_was_saved_or_are_refused(tmp_path_factory, stale, resave):
    """A folder holding an older sharded save, an index naming a missing shard, a tensor in two shards, or a
    truncated file; then (maybe) a fresh save over it. After a fresh save the folder loads exactly the model
    saved; otherwise it loads what its index (or model.safetensors) names, or raises a qpeft error."""
    from safetensors.torch import save_file

    from helpers import tiny_llama, tokens

    folder = tmp_path_factory.mktemp("ckpt")
    old = qpeft.get_peft_model(tiny_llama(1), qpeft.LoraConfig(r=2, target_modules="all-linear")).base_model
    new = qpeft.get_peft_model(tiny_llama(2), qpeft.LoraConfig(r=2, target_modules="all-linear")).base_model
    qpeft.save_4bit_pretrained(old, folder)
    tensors = qpeft.checkpoint.read_safetensors_folder(folder)
    if stale != "none":
        (folder / "model.safetensors").rename(folder / "shard-1.safetensors")
        weight_map = dict.fromkeys(tensors, "shard-1.safetensors")
        if stale == "index_to_missing_shard":
            weight_map["model.norm.weight"] = "shard-2.safetensors"
        if stale == "duplicate_key":
            save_file({"model.norm.weight": tensors["model.norm.weight"] + 1}, str(folder / "shard-2.safetensors"))
        if stale == "truncated":
            (folder / "shard-1.safetensors").write_bytes((folder / "shard-1.safetensors").read_bytes()[:100])
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    if resave:
        qpeft.save_4bit_pretrained(new, folder)
    try:
        loaded = qpeft.load_4bit_pretrained(folder)
    except (ValueError, FileNotFoundError) as e:
        assert "qpeft" in str(e) and not resave, repr(e)
        return
    expected = new if resave else old
    with torch.no_grad():
        assert torch.equal(loaded(tokens()).logits, expected(tokens()).logits)
