"""bitsandbytes / transformers 4-bit checkpoints: read straight into qpeft (the exact bytes), written so that
transformers + bitsandbytes load them (same outputs)."""

import copy
import warnings

import pytest
import torch

import qpeft
from qpeft.nn import Linear4bit

from helpers import reference_float_model, same_bytes
from qpeft.checkpoint import read_safetensors_folder
from helpers import rel_err, tiny_gpt2, tiny_llama, tokens

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
