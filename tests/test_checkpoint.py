"""bitsandbytes / transformers 4-bit checkpoints: read straight into qpeft (the exact bytes), written so that
transformers + bitsandbytes load them (same outputs)."""

import copy
import json
import warnings

import pytest
import torch

import qpeft
from qpeft.nn import Linear4bit

from qpeft.checkpoint import read_safetensors_folder

from helpers import reference_float_model, rel_err, same_bytes, tiny_gpt2, tiny_llama, tokens

transformers = pytest.importorskip("transformers")
bnb = pytest.importorskip("bitsandbytes")


def bnb_checkpoint(tmp_path, double_quant=True, quant_type="nf4", make_model=tiny_llama):
    """A tiny Llama (or GPT-2) quantized and saved by transformers + bitsandbytes (CPU backend). Returns the float
    original and the checkpoint's tensors. bitsandbytes' CPU forward is never run: it depends on the CPU's
    instruction set (on AVX-512 it repacks the weight and rounds absmax to bf16, and fails when K is not a multiple
    of the blocksize), so outputs are checked against reference_float_model, the format's definition."""
    original = make_model()
    original.save_pretrained(tmp_path / "fp")
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.float32,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "fp", quantization_config=config, device_map="cpu"
        )
    model.save_pretrained(tmp_path / "bnb")
    return original, read_safetensors_folder(tmp_path / "bnb")


@pytest.mark.parametrize("double_quant,quant_type", [(True, "nf4"), (False, "fp4")])
def test_load_bitsandbytes_checkpoint(tmp_path, double_quant, quant_type):
    original, theirs = bnb_checkpoint(tmp_path, double_quant, quant_type)
    ours = qpeft.load_4bit_pretrained(tmp_path / "bnb")
    layers = [m for m in ours.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 14 and isinstance(ours.lm_head, torch.nn.Linear)
    assert all(p.device.type == "cpu" for p in ours.parameters())
    q_ours = ours.model.layers[1].mlp.down_proj.state_dict()
    prefix = "model.layers.1.mlp.down_proj."
    assert set(prefix + k for k in q_ours) == {k for k in theirs if k.startswith(prefix)}
    for key in q_ours:  # FP4's code book: bitsandbytes' CPU build writes +0.0 for code 8, its CUDA build -0.0
        same = torch.equal if key.endswith("quant_map") else same_bytes
        assert same(q_ours[key], theirs[prefix + key]), key
    ids = tokens()
    with torch.no_grad():
        assert rel_err(ours(ids).logits, reference_float_model(original, theirs)(ids).logits) < 1e-5


def test_load_bitsandbytes_gpt2_checkpoint(tmp_path):
    """GPT-2's Conv1D layers, which transformers quantizes transposed: read as Linear4bit layers marked
    fan_in_fan_out (the exact bytes, the same logits); adapters then train on them and merge back to Conv1D."""
    original, theirs = bnb_checkpoint(tmp_path, make_model=tiny_gpt2)
    ours = qpeft.load_4bit_pretrained(tmp_path / "bnb")
    layer = ours.transformer.h[1].mlp.c_fc
    assert isinstance(layer, Linear4bit) and layer.fan_in_fan_out
    assert (layer.in_features, layer.out_features) == (64, 256)
    for key, t in layer.state_dict().items():
        assert same_bytes(t, theirs["transformer.h.1.mlp.c_fc." + key]), key
    ids = tokens()
    with torch.no_grad():
        assert rel_err(ours(ids).logits, reference_float_model(original, theirs)(ids).logits) < 1e-5
    model = qpeft.get_peft_model(ours, qpeft.LoraConfig(r=2, target_modules=["c_fc"], init_lora_weights=False))
    with torch.no_grad():
        adapted = model(ids).logits
        merged = model.merge_and_unload()
        assert type(merged.transformer.h[1].mlp.c_fc).__name__ == "Conv1D"
        assert rel_err(merged(ids).logits, adapted) < 1e-5


def test_save_loads_in_transformers_bitsandbytes(tmp_path):
    """transformers + bitsandbytes load qpeft's checkpoint into bitsandbytes Linear4bit layers holding our exact
    bytes and the same parsed quantization state; the model those bytes define gives qpeft's logits."""
    original = tiny_llama()
    model = qpeft.get_peft_model(copy.deepcopy(original), qpeft.LoraConfig(r=4, target_modules="all-linear"))
    qpeft.save_4bit_pretrained(model, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", device_map="cpu").eval()
    theirs_layer = theirs.model.layers[0].self_attn.q_proj
    assert isinstance(theirs_layer, bnb.nn.Linear4bit)
    ours_layer = model.get_submodule("model.layers.0.self_attn.q_proj").base
    state, q = theirs_layer.weight.quant_state, ours_layer.quantized_weight
    assert (state.quant_type, state.blocksize, tuple(state.shape)) == (q.quant_type, q.blocksize, tuple(q.shape))
    assert same_bytes(theirs_layer.weight.data.reshape(-1).view(torch.uint8), q.packed.reshape(-1).view(torch.uint8))
    assert state.nested and torch.equal(state.absmax, q.absmax) and torch.equal(state.offset, q.nested_offset)
    assert torch.equal(state.state2.absmax, q.nested_absmax) and torch.equal(state.state2.code, q.nested_code)
    theirs_sd = {
        name + "." + k: v
        for name, m in theirs.named_modules()
        if isinstance(m, bnb.nn.Linear4bit)
        for k, v in m.state_dict().items()
    }
    assert len(theirs_sd) // 6 == 14
    ids = tokens()
    with torch.no_grad(), model.disable_adapter():
        assert rel_err(reference_float_model(original, theirs_sd)(ids).logits, model(ids).logits) < 1e-5
    reloaded = qpeft.load_4bit_pretrained(tmp_path / "ours")  # and back into qpeft
    with torch.no_grad(), model.disable_adapter():
        assert rel_err(reloaded(ids).logits, model(ids).logits) < 1e-6


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        qpeft.load_4bit_pretrained(tmp_path)
    tiny_llama().save_pretrained(tmp_path / "fp")
    with pytest.raises(ValueError, match="no 4-bit layers"):
        qpeft.load_4bit_pretrained(tmp_path / "fp")


def four_bit_llama(seed=0):
    return qpeft.get_peft_model(tiny_llama(seed), qpeft.LoraConfig(r=2, target_modules="all-linear")).base_model


def test_a_save_replaces_a_stale_sharded_index(tmp_path):
    """A folder that held a sharded checkpoint: the new model.safetensors is what loads, not the old shards."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    old = four_bit_llama(seed=1)
    qpeft.save_4bit_pretrained(old, tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "model-00001-of-00001.safetensors")
    keys = safe_open(str(tmp_path / "model-00001-of-00001.safetensors"), framework="pt").keys()
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": dict.fromkeys(keys, "model-00001-of-00001.safetensors")})
    )
    new = four_bit_llama(seed=2)
    qpeft.save_4bit_pretrained(new, tmp_path)
    assert not (tmp_path / "model.safetensors.index.json").exists()
    with torch.no_grad():
        assert torch.equal(qpeft.load_4bit_pretrained(tmp_path)(tokens()).logits, new(tokens()).logits)
    # of two shards holding one tensor, the one the index names is read
    tensors = read_safetensors_folder(tmp_path)
    key = "model.norm.weight"
    save_file({key: torch.full_like(tensors[key], 7.0)}, str(tmp_path / "other.safetensors"))
    save_file(tensors, str(tmp_path / "main.safetensors"))
    weight_map = {**dict.fromkeys(tensors, "main.safetensors"), key: "other.safetensors"}
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert torch.equal(read_safetensors_folder(tmp_path)[key], torch.full_like(tensors[key], 7.0))
    weight_map[key] = "main.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert torch.equal(read_safetensors_folder(tmp_path)[key], tensors[key])
    weight_map["model.missing"] = "main.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(qpeft.ConfigError, match="weight_map"):
        read_safetensors_folder(tmp_path)


@pytest.mark.parametrize("what", ["checkpoint", "adapter"])
def test_an_interrupted_save_leaves_a_folder_that_is_refused(tmp_path, monkeypatch, what):
    """The config is written last and removed first: a save that stops after the weights never leaves new weights
    under an old config (which could load as a wrong model)."""
    from qpeft import adapter_io, checkpoint

    model = qpeft.get_peft_model(tiny_llama(), qpeft.LoraConfig(r=2, target_modules=["q_proj"]))
    save = (
        (lambda: qpeft.save_4bit_pretrained(model, tmp_path))
        if what == "checkpoint"
        else (lambda: model.save_pretrained(tmp_path))
    )
    load = (
        (lambda: qpeft.load_4bit_pretrained(tmp_path))
        if what == "checkpoint"
        else (lambda: qpeft.QPeftModel.from_pretrained(tiny_llama(), tmp_path))
    )
    save()
    load()
    module = checkpoint if what == "checkpoint" else adapter_io

    def interrupted(path, data):
        raise KeyboardInterrupt  # the process stops right after the weights

    monkeypatch.setattr(module, "write_json_atomic", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save()
    with pytest.raises(FileNotFoundError, match="config"):
        load()


def test_a_corrupt_safetensors_file_is_a_config_error_naming_it(tmp_path):
    model = qpeft.get_peft_model(tiny_llama(), qpeft.LoraConfig(r=2, target_modules=["q_proj"]))
    qpeft.save_4bit_pretrained(model, tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    for path in (tmp_path / "base" / "model.safetensors", tmp_path / "adapter" / "adapter_model.safetensors"):
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(qpeft.ConfigError, match="model.safetensors"):
        qpeft.load_4bit_pretrained(tmp_path / "base")
    with pytest.raises(qpeft.ConfigError, match="adapter_model.safetensors"):
        qpeft.QPeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")


def test_a_bias_the_4bit_layer_lacks_is_not_dropped():
    layer = Linear4bit.from_linear(torch.nn.Linear(64, 8, bias=False))
    sd = {**layer.state_dict(), "bias": torch.ones(8)}
    with pytest.raises(RuntimeError, match="bias"):
        layer.load_state_dict(sd)
    assert "bias" in layer.load_state_dict(sd, strict=False).unexpected_keys


@pytest.mark.parametrize(
    "key, value", [("vocab_size", 10**12), ("intermediate_size", 10**9), ("num_hidden_layers", 10**6)]
)
def test_a_config_that_does_not_fit_its_checkpoint_is_refused_before_allocating(tmp_path, key, value):
    """Sizes in config.json are checked against the checkpoint's tensors on the meta device first: a tiny file
    cannot make the loader allocate terabytes."""
    qpeft.save_4bit_pretrained(four_bit_llama(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config[key] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(qpeft.ConfigError, match="config.json"):
        qpeft.load_4bit_pretrained(tmp_path)
