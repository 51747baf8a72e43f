"""Models bitsandbytes quantized at load time (transformers' BitsAndBytesConfig) taken over by get_peft_model: every
bitsandbytes 4-bit layer becomes a qpeft Linear4bit holding the same bytes. The oracle is the bytes themselves and
qpeft.reference's decoding of them, never bitsandbytes' CPU forward (it differs by instruction set)."""

import warnings

import pytest
import torch
import transformers
from helpers import float_model_of, reference_float_model, same_bytes, same_state, tiny_gpt2, tiny_llama, tokens

import qpeft
from qpeft.checkpoint import quantized_state_dict
from qpeft.nn import Linear4bit

bnb = pytest.importorskip("bitsandbytes")


def bnb_model(folder, dtype=torch.bfloat16, **options):
    settings = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    config = transformers.BitsAndBytesConfig(**{**settings, **options})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, dtype=dtype)


def bnb_layers(model):
    return [n for n, m in model.named_modules() if type(m).__module__.startswith("bitsandbytes.")]


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    tiny_llama().to(torch.bfloat16).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "options",
    [
        dict(bnb_4bit_compute_dtype=torch.bfloat16),
        dict(bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False),
        dict(bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.bfloat16),
    ],
    ids=["nf4-double-bf16", "fp4", "fp32-compute-bf16-storage"],
)
def test_get_peft_model_takes_over_every_bitsandbytes_layer_with_its_bytes(llama_folder, options):
    model = bnb_model(llama_folder, **options)
    names = bnb_layers(model)
    assert len(names) == 14
    before = {k: v.clone() for k, v in model.state_dict().items()}
    original = transformers.AutoModelForCausalLM.from_pretrained(llama_folder, dtype=torch.float32)
    qmodel = qpeft.get_peft_model(model, qpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert not bnb_layers(qmodel.base_model)
    after = quantized_state_dict(qmodel.base_model)
    assert same_state(after, before)  # the same bytes: nothing requantized
    compute = options.get("bnb_4bit_compute_dtype", torch.float32)  # BitsAndBytesConfig's default
    assert all(m.compute_dtype == compute for m in qmodel.base_model.modules() if isinstance(m, Linear4bit))
    ids = tokens()
    with torch.no_grad():  # the adapters start at zero: the base as the bytes define it
        got = qmodel(input_ids=ids).logits.float()
        want = reference_float_model(original, before).to(torch.bfloat16)(input_ids=ids).logits.float()
    torch.testing.assert_close(got, want, rtol=0.02, atol=0.05)


def test_a_peft_bitsandbytes_qlora_script_runs_with_only_its_import_changed(llama_folder, tmp_path):
    """peft's QLoRA recipe as its docs write it (BitsAndBytesConfig, prepare_model_for_kbit_training, LoraConfig
    without targets, Trainer, save, PeftModel.from_pretrained on a newly loaded 4-bit base, merge_and_unload),
    with only `from peft import ...` made `from qpeft import ...`."""
    from helpers import trainer_losses

    from qpeft import LoraConfig, PeftModel, TaskType, get_peft_model, prepare_model_for_kbit_training

    model = bnb_model(llama_folder, bnb_4bit_compute_dtype=torch.bfloat16)
    model = prepare_model_for_kbit_training(model)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, task_type=TaskType.CAUSAL_LM))
    ids = tokens(seed=3)

    def item(i):
        row = ids[i % 2]
        return {"input_ids": row, "labels": row}

    losses = trainer_losses(model, item, tmp_path / "run", epochs=2, learning_rate=5e-2, bf16=True)
    assert losses[-1] < losses[0]
    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = model(input_ids=ids).logits.float()
        reloaded = PeftModel.from_pretrained(
            bnb_model(llama_folder, bnb_4bit_compute_dtype=torch.bfloat16), tmp_path / "adapter"
        )
        torch.testing.assert_close(reloaded(input_ids=ids).logits.float(), expected, rtol=0, atol=0)
        merged = reloaded.merge_and_unload()
        assert not bnb_layers(merged)
        torch.testing.assert_close(merged(input_ids=ids).logits.float(), expected, rtol=0.02, atol=0.05)


def test_a_layer_repacked_for_bitsandbytes_cpu_kernel_is_read_from_that_layout(llama_folder):
    """bitsandbytes repacks a layer for its CPU kernel on an inference forward (AVX-512 BF16 CPUs); built here with
    its own conversion function, so the test runs on every CPU: the codes come back exactly, the scales as the
    bf16 copies that layout keeps."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    model = bnb_model(llama_folder, bnb_4bit_use_double_quant=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = bnb_layers(model)
    converted = []
    for name in names:
        layer = model.get_submodule(name)
        if layer.out_features % 32 == 0 and layer.in_features % layer.weight.quant_state.blocksize == 0:
            layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(
                layer.weight.data, layer.weight.quant_state
            )
            converted.append(name)
    assert converted
    with pytest.warns(UserWarning, match="repacked"):
        qmodel = qpeft.get_peft_model(model, qpeft.LoraConfig(r=4, target_modules=["q_proj"]))
    after = quantized_state_dict(qmodel.base_model)
    for name in names:
        assert same_bytes(after[f"{name}.weight"], before[f"{name}.weight"]), name
        absmax = before[f"{name}.weight.absmax"]
        expected = absmax.to(torch.bfloat16).float() if name in converted else absmax
        assert torch.equal(after[f"{name}.weight.absmax"], expected), name


def test_gpt2_conv1d_layers_are_taken_over_and_unload_as_conv1d(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path)
    model = bnb_model(tmp_path, dtype=torch.float32, bnb_4bit_compute_dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qmodel = qpeft.get_peft_model(model, qpeft.LoraConfig(r=4, target_modules=["c_attn"]))
    after = quantized_state_dict(qmodel.base_model)
    assert same_state(after, before)
    ids = tokens()
    with torch.no_grad():
        expected = qmodel(input_ids=ids).logits
        dense = float_model_of(qmodel.base_model, tiny_gpt2())
        torch.testing.assert_close(dense(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
        merged = qmodel.merge_and_unload()
    assert type(merged.transformer.h[0].attn.c_attn).__name__ == "Conv1D"  # the adapted layer, dense again


def test_a_layer_bitsandbytes_has_not_quantized_yet_is_quantized_as_a_linear():
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(64, 32, bias=True, quant_type="nf4", compress_statistics=True)
    assert layer.weight.quant_state is None  # bitsandbytes quantizes on its move to a device
    model = torch.nn.Sequential(layer)
    qpeft.get_peft_model(model, qpeft.LoraConfig(r=2, target_modules=["0"]))
    taken = model[0].base
    linear = torch.nn.Linear(64, 32)
    with torch.no_grad():
        linear.weight.copy_(layer.weight.data)
        linear.bias.copy_(layer.bias)
    expected = Linear4bit.from_linear(linear).state_dict()
    assert all(same_bytes(taken.state_dict()[k], expected[k]) for k in expected)
    assert taken.bias is layer.bias


def test_an_8bit_bitsandbytes_layer_is_refused_and_the_model_left_unchanged():
    model = tiny_llama()
    model.model.layers[0].mlp.down_proj = bnb.nn.Linear8bitLt(96, 64, has_fp16_weights=False)
    modules = dict(model.named_modules())
    with pytest.raises(TypeError, match="8-bit layer"):
        qpeft.get_peft_model(model, qpeft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert dict(model.named_modules()) == modules


def test_a_malformed_bitsandbytes_layer_is_refused_by_name_and_the_model_left_unchanged(llama_folder):
    model = bnb_model(llama_folder, bnb_4bit_use_double_quant=False)
    state = model.model.layers[1].mlp.up_proj.weight.quant_state
    state.absmax[0] = float("nan")
    modules = dict(model.named_modules())
    with pytest.raises(qpeft.ConfigError, match="NaN"):
        qpeft.get_peft_model(model, qpeft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert dict(model.named_modules()) == modules and len(bnb_layers(model)) == 14
