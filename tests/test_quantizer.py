"""qpeft as a transformers quantizer: from_pretrained(..., quantization_config=qpeft.QuantizationConfig(...)) gives
the layers qpeft's own quantization gives (same bytes), saves a bitsandbytes checkpoint that qpeft and transformers +
bitsandbytes read back, and trains under the Trainer."""

import copy
import json
import warnings

import pytest
import torch
import transformers
from helpers import float_model_of, same_state, tiny_gpt2, tiny_llama, tokens, trainer_losses

import qpeft
from qpeft.checkpoint import quantized_state_dict
from qpeft.errors import ConfigError
from qpeft.nn import Linear4bit


def load(folder, **options):
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=qpeft.QuantizationConfig(**options)
    )


def own_quantization(model, skip=(), **options) -> dict:
    """The state dict qpeft's get_peft_model path gives ``model`` (every linear layer but the head, 4-bit; those
    ``skip`` names stay float)."""
    from qpeft.tuners.targets import quantize_linears

    model = copy.deepcopy(model)
    config = qpeft.LoraConfig(target_modules="all-linear", **options)
    quantize_linears(model, config, skip=lambda name: name.endswith(tuple(skip)))
    return quantized_state_dict(model)


FORMATS = [dict(), dict(quant_type="fp4", double_quant=False), dict(blocksize=128, compute_dtype=torch.float32)]


@pytest.mark.parametrize("options", FORMATS, ids=["nf4", "fp4", "blocksize128-fp32-compute"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_the_quantizer_gives_qpeft_own_bytes_and_the_dequantized_model(tmp_path, options, dtype):
    original = tiny_llama().to(dtype)
    original.save_pretrained(tmp_path)
    model = load(tmp_path, **options)
    assert model.dtype == dtype and isinstance(model.lm_head, torch.nn.Linear)
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 14 and all(m.compute_dtype == options.get("compute_dtype") for m in layers)
    assert same_state(model.state_dict(), own_quantization(original, **options))
    ids = tokens()
    with torch.no_grad():
        expected = float_model_of(model, original)(input_ids=ids).logits.float()
        torch.testing.assert_close(model(input_ids=ids).logits.float(), expected, rtol=0.02, atol=0.02)


def test_a_sharded_checkpoint_and_its_biases_and_the_skipped_modules(tmp_path):
    config = transformers.Qwen2Config(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=101,
    )  # fmt: skip
    torch.manual_seed(0)
    original = transformers.Qwen2ForCausalLM(config).eval()  # q, k, v have biases
    original.save_pretrained(tmp_path, max_shard_size="40KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    model = load(tmp_path, skip_modules=["down_proj"])
    assert isinstance(model.model.layers[1].mlp.down_proj, torch.nn.Linear)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, Linear4bit) and torch.equal(q_proj.bias, original.model.layers[0].self_attn.q_proj.bias)
    assert same_state(model.state_dict(), own_quantization(original, skip=("down_proj",)))


def test_gpt2_conv1d_weights_are_quantized_transposed(tmp_path):
    original = tiny_gpt2()
    original.save_pretrained(tmp_path)
    model = load(tmp_path)
    c_attn = model.transformer.h[0].attn.c_attn
    assert isinstance(c_attn, Linear4bit) and c_attn.fan_in_fan_out
    assert same_state(model.state_dict(), own_quantization(tiny_gpt2()))
    assert type(c_attn.to_linear()).__name__ == "Conv1D"


def test_save_pretrained_writes_a_bitsandbytes_checkpoint_both_read(tmp_path):
    tiny_llama().to(torch.bfloat16).save_pretrained(tmp_path / "float")
    model = load(tmp_path / "float")
    model.save_pretrained(tmp_path / "4bit")
    qconfig = json.loads((tmp_path / "4bit" / "config.json").read_text())["quantization_config"]
    assert qconfig["quant_method"] == "bitsandbytes" and qconfig["load_in_4bit"]
    assert qconfig["bnb_4bit_compute_dtype"] == "bfloat16"  # the weights' dtype: they compute in it
    ids = tokens()
    ours = qpeft.load_4bit_pretrained(tmp_path / "4bit")
    assert same_state(ours.state_dict(), model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    pytest.importorskip("bitsandbytes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "4bit")
    assert type(theirs.model.layers[0].self_attn.q_proj).__module__.startswith("bitsandbytes.")
    assert same_state(theirs.state_dict(), model.state_dict())  # bytes, not bitsandbytes' CPU forward


def test_a_model_the_quantizer_loaded_trains_under_the_trainer(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "float")
    model = load(tmp_path / "float")
    model = qpeft.prepare_model_for_kbit_training(model)
    model = qpeft.get_peft_model(model, qpeft.LoraConfig(r=4, target_modules="all-linear"))
    ids = tokens(seed=3)

    def item(i):
        return {"input_ids": ids[i % 2], "labels": ids[i % 2]}

    losses = trainer_losses(model, item, tmp_path / "run", epochs=2, learning_rate=5e-2)
    assert losses[-1] < losses[0]


def test_bad_configs_are_refused_with_the_field_named(tmp_path):
    with pytest.raises(ConfigError, match="quant_type"):
        qpeft.QuantizationConfig(quant_type="nf3")
    with pytest.raises(ConfigError, match="blocksize"):
        qpeft.QuantizationConfig(blocksize=48)
    with pytest.raises(ConfigError, match="quant_storage"):
        qpeft.QuantizationConfig(quant_storage=torch.int64)
    with pytest.raises(ConfigError, match="skip_modules"):
        qpeft.QuantizationConfig(skip_modules="lm_head")
    with pytest.raises(ConfigError, match="load_in_4bit"):
        qpeft.QuantizationConfig(load_in_4bit=True)
    tiny_llama().save_pretrained(tmp_path / "float")
    load(tmp_path / "float").save_pretrained(tmp_path / "4bit")
    with pytest.raises(ValueError, match="BitsAndBytesConfig"):  # an already-quantized checkpoint
        load(tmp_path / "4bit")
