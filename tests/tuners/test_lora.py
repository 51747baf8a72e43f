"""Model-level API on a (tiny, randomly initialised) transformers Llama: targeting, freezing, peft-format adapters
proven both ways with the real peft package, merge_and_unload, disable_adapter, training with checkpointing."""

import copy

import pytest
import torch

import qpeft
from qpeft.nn import LoraLinear4bit
from qpeft.nn.adapter_holder import AdapterLayer4bit

from helpers import randomize_adapters, rel_err, tiny_gpt2, tiny_llama, tokens, trainer_losses

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def dequantized_float_copy(qmodel, original):
    """The original float model with every quantized layer's weight replaced by qpeft's dequantized weight
    (transposed back for a Conv1D, which stores [in, out])."""
    float_model = copy.deepcopy(original)
    with torch.no_grad():
        for name, layer in qmodel.lora_layers():
            W = layer.base.dequantized_weight(torch.float32)
            float_model.get_submodule(name).weight.copy_(W.T if layer.base.fan_in_fan_out else W)
    return float_model


def peft_lora_names(model):
    """The module names peft gave a LoRA layer."""
    from peft.tuners.lora import LoraLayer

    return sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, LoraLayer))


def test_all_linear_targets_and_freezing(capsys):
    model = qpeft.get_peft_model(tiny_llama(), qpeft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    names = [n for n, _ in model.lora_layers()]
    assert len(names) == 2 * 7 and all(n.split(".")[-1] in PROJECTIONS for n in names)
    assert isinstance(model.base_model.lm_head, torch.nn.Linear)  # the output head is skipped
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.default.lora_" in n for n in trainable)
    model.print_trainable_parameters()
    out = capsys.readouterr().out
    t, total = model.get_nb_trainable_parameters()
    assert f"trainable params: {t:,d}" in out and t == sum(
        4 * (layer.in_features + layer.out_features) for _, layer in model.lora_layers()
    )
    assert total > 64 * 96 * 3 * 2  # 4-bit weights counted as elements


def test_target_forms_and_patterns():
    cfg = qpeft.LoraConfig(
        r=4,
        target_modules=["q_proj", "model.layers.1.mlp.down_proj"],
        rank_pattern={"q_proj": 2},
        alpha_pattern={r"layers\.1\.self_attn\.q_proj": 7},
    )
    model = qpeft.get_peft_model(tiny_llama(), cfg)
    layers = dict(model.lora_layers())
    assert sorted(layers) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.mlp.down_proj",
        "model.layers.1.self_attn.q_proj",
    ]
    assert layers["model.layers.0.self_attn.q_proj"].r == 2 and layers["model.layers.1.mlp.down_proj"].r == 4
    assert layers["model.layers.1.self_attn.q_proj"].alpha == 7 and layers["model.layers.0.self_attn.q_proj"].alpha == 8
    regex = qpeft.get_peft_model(tiny_llama(), qpeft.LoraConfig(target_modules=r".*\.(v|o)_proj"))
    assert len(list(regex.lora_layers())) == 4
    with pytest.raises(ValueError, match="match no linear layer"):
        qpeft.get_peft_model(tiny_llama(), qpeft.LoraConfig(target_modules=["nope"]))
    with pytest.raises(ValueError, match="only linear layers"):
        qpeft.get_peft_model(tiny_llama(), qpeft.LoraConfig(target_modules=["input_layernorm"]))


@pytest.mark.parametrize("use_dora,bias", [(False, "none"), (True, "lora_only"), (False, "all")])
def test_qpeft_adapter_loads_in_peft(tmp_path, use_dora, bias):
    original = tiny_llama()
    cfg = qpeft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        use_dora=use_dora,
        bias=bias,
        modules_to_save=["lm_head"],
    )
    model = qpeft.get_peft_model(copy.deepcopy(original), cfg)
    randomize_adapters(model)
    with torch.no_grad():
        model.base_model.lm_head.weight.mul_(1.5)  # a trained module_to_save
        if bias == "all":
            for n, p in model.named_parameters():
                if n.endswith("bias"):
                    p.add_(0.1)
    model.save_pretrained(tmp_path)
    ids = tokens()
    with torch.no_grad():
        ours = model(ids).logits
    theirs_model = peft.PeftModel.from_pretrained(dequantized_float_copy(model, original), tmp_path).eval()
    with torch.no_grad():
        theirs = theirs_model(ids).logits
    assert rel_err(ours, theirs) < 1e-5


@pytest.mark.parametrize("use_dora,use_rslora", [(False, False), (True, False), (False, True)])
def test_peft_adapter_loads_in_qpeft(tmp_path, use_dora, use_rslora):
    original = tiny_llama()
    pcfg = peft.LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=["q_proj", "up_proj"],
        use_dora=use_dora,
        use_rslora=use_rslora,
        init_lora_weights=False,
        rank_pattern={"up_proj": 2},
    )
    peft_model = peft.get_peft_model(copy.deepcopy(original), pcfg)
    peft_model.save_pretrained(tmp_path)
    model = qpeft.QPeftModel.from_pretrained(copy.deepcopy(original), tmp_path)
    assert not any(p.requires_grad for p in model.parameters())
    ids = tokens()
    with torch.no_grad():
        ours = model(ids).logits
        check = peft.PeftModel.from_pretrained(dequantized_float_copy(model, original), tmp_path).eval()(ids).logits
    assert rel_err(ours, check) < 1e-5
    layer = model.base_model.model.layers[0].mlp.up_proj
    assert isinstance(layer, LoraLinear4bit) and layer.r == 2


def test_merge_disable_and_unload():
    original = tiny_llama()
    model = qpeft.get_peft_model(copy.deepcopy(original), qpeft.LoraConfig(r=4, target_modules="all-linear"))
    randomize_adapters(model)
    ids = tokens()
    with torch.no_grad():
        y = model(ids).logits
        with model.disable_adapter():
            y_base = model(ids).logits
        base_check = dequantized_float_copy(model, original)(ids).logits
        merged = model.merge_and_unload()(ids).logits
    assert rel_err(y_base, base_check) < 1e-5
    assert rel_err(merged, y) < 1e-5 and rel_err(y, y_base) > 1e-3
    assert not any(isinstance(m, LoraLinear4bit) for m in model.base_model.modules())


def test_multiple_adapters_save_load(tmp_path):
    original = tiny_llama()
    model = qpeft.get_peft_model(copy.deepcopy(original), qpeft.LoraConfig(r=4, target_modules=["q_proj"]))
    model.add_adapter("other", qpeft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    assert model.active_adapter == "default"  # as in peft, adding keeps the active adapter
    assert not any(".adapters.other." in n for n, p in model.named_parameters() if p.requires_grad)
    model.set_adapter("other")
    randomize_adapters(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.other." in n for n in trainable)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").exists() and (tmp_path / "other" / "adapter_model.safetensors").exists()
    ids = tokens()
    with torch.no_grad():
        y_other = model(ids).logits
    loaded = qpeft.QPeftModel.from_pretrained(copy.deepcopy(original), tmp_path)
    loaded.load_adapter(tmp_path / "other", "other")
    assert loaded.active_adapter == "default"
    loaded.set_adapter("other")
    with torch.no_grad():
        assert rel_err(loaded(ids).logits, y_other) < 1e-6
    import json  # a config that no longer matches its weights (v_proj tensors without a v_proj target)

    cfg_path = tmp_path / "other" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["target_modules"] = ["q_proj"]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not fit.*unexpected.*v_proj"):
        qpeft.QPeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "other")
    bad = qpeft.get_peft_model(copy.deepcopy(original), qpeft.LoraConfig(r=3, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="shape"):
        qpeft.adapter_io.assign_tensors(
            bad._file_parameters("default"), qpeft.adapter_io.load_adapter_files(tmp_path)[1]
        )


def test_training_step_with_gradient_checkpointing():
    model = tiny_llama().train()
    qpeft.prepare_model_for_kbit_training(model)
    model = qpeft.get_peft_model(model, qpeft.LoraConfig(r=4, lora_dropout=0.1, target_modules="all-linear"))
    assert model.base_model.is_gradient_checkpointing
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = tokens()
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_hf_trainer_trains_the_adapter(tmp_path):
    """transformers.Trainer drives a QPeftModel: the loss goes down, only adapter weights change."""
    model = tiny_llama().train()
    model = qpeft.get_peft_model(model, qpeft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    frozen_before = model.base_model.model.embed_tokens.weight.clone()
    ids = tokens(seed=3)

    losses = trainer_losses(model, lambda i: {"input_ids": ids[i % 2], "labels": ids[i % 2]}, tmp_path, 3, 5e-3)
    assert len(losses) >= 6 and losses[-1] < losses[0]
    assert torch.equal(model.base_model.model.embed_tokens.weight, frozen_before)


def test_torch_compile_of_the_model():
    original = tiny_llama()
    model = qpeft.get_peft_model(
        copy.deepcopy(original), qpeft.LoraConfig(r=4, lora_dropout=0.1, target_modules="all-linear")
    )
    randomize_adapters(model)
    model.eval()
    ids = tokens()
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        assert rel_err(compiled(ids).logits, model(ids).logits) < 1e-5
    model.train()
    loss = compiled(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


# ---- peft's target selection: layers_to_transform, layers_pattern, exclude_modules, modules_to_save -------------

SELECTIONS = [
    dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[1]),
    dict(target_modules=["q_proj", "v_proj"], layers_to_transform=0),
    dict(target_modules=["q_proj", "up_proj"], layers_to_transform=[0, 1], layers_pattern="layers"),
    dict(target_modules=["q_proj"], layers_to_transform=[1], layers_pattern=["blocks", "layers"]),
    dict(target_modules="all-linear", exclude_modules=["k_proj", "model.layers.0.mlp.up_proj"]),
    dict(target_modules="all-linear", exclude_modules=r".*\.mlp\..*"),
    dict(target_modules=r".*layers\.0\..*_proj", exclude_modules=["q_proj"]),
    dict(target_modules=["q_proj", "o_proj"], modules_to_save=["model.layers.1.self_attn"]),
]


@pytest.mark.parametrize("selection", SELECTIONS)
def test_target_selection_matches_peft(selection):
    """qpeft quantizes and adapts exactly the layers peft adapts for the same config."""
    ours = qpeft.get_peft_model(tiny_llama(), qpeft.LoraConfig(r=2, **selection))
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, **selection))
    names = sorted(n for n, _ in ours.lora_layers())
    assert names and names == peft_lora_names(theirs)


def test_layer_index_reads_names_as_peft_does():
    from peft.tuners.tuners_utils import check_target_module_exists

    from qpeft.tuners.targets import layer_index as _layer_index

    names = [
        "model.layers.3.mlp.up_proj",
        "transformer.h.0.attn.c_attn",
        "layers.2.q",
        "a.b.7",
        "a.1.2.x",
        "model.layers.1.experts.0.w1",
        "encoder.block.10.layer.0.DenseReluDense.wi",
        "x.y.z",
        "model.layers.x.q",
    ]
    for pattern in (None, "layers", ["block", "h"], "h"):
        for name in names:
            for index in range(12):
                cfg = peft.LoraConfig(
                    target_modules=[name.split(".")[-1]], layers_to_transform=[index], layers_pattern=pattern
                )
                assert bool(check_target_module_exists(cfg, name)) == (_layer_index(name, pattern) == index), (
                    name,
                    pattern,
                    index,
                )


def test_layer_selection_round_trips_through_the_adapter_files(tmp_path):
    """An adapter over some layers only (layers_to_transform): peft's file loads in qpeft and qpeft's in peft."""
    original = tiny_llama()
    pcfg = peft.LoraConfig(
        r=4,
        target_modules=["q_proj", "up_proj"],
        layers_to_transform=[1],
        layers_pattern="layers",
        exclude_modules=["model.layers.1.mlp.up_proj"],
        init_lora_weights=False,
    )
    peft.get_peft_model(copy.deepcopy(original), pcfg).save_pretrained(tmp_path / "peft")
    model = qpeft.QPeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "peft")
    assert [n for n, _ in model.lora_layers()] == ["model.layers.1.self_attn.q_proj"]
    ids = tokens()
    with torch.no_grad():
        check = peft.PeftModel.from_pretrained(dequantized_float_copy(model, original), tmp_path / "peft")
        assert rel_err(model(ids).logits, check.eval()(ids).logits) < 1e-5
    model.save_pretrained(tmp_path / "qpeft")
    with torch.no_grad():
        again = peft.PeftModel.from_pretrained(dequantized_float_copy(model, original), tmp_path / "qpeft")
        assert rel_err(model(ids).logits, again.eval()(ids).logits) < 1e-5
    with pytest.raises(ValueError, match="layers_pattern only applies"):
        qpeft.LoraConfig(target_modules=["q_proj"], layers_pattern="layers")
    with pytest.raises(ValueError, match="need target_modules as a list"):
        qpeft.LoraConfig(target_modules="all-linear", layers_to_transform=[0])
    with pytest.raises(ValueError, match="in layers_to_transform"):
        qpeft.get_peft_model(tiny_llama(), qpeft.LoraConfig(target_modules=["q_proj"], layers_to_transform=[5]))


# ---- GPT-2: transformers Conv1D layers ---------------------------------------------------------------------------


def test_gpt2_conv1d_layers_quantize_train_and_merge_back():
    """Conv1D targets are quantized from their transposed [in, out] weight: the frozen model computes with the
    dequantized weights, training moves only the adapters, and merge_and_unload gives Conv1D layers back (the
    model's own checkpoint shapes) computing the same logits."""
    original = tiny_gpt2()
    model = qpeft.get_peft_model(copy.deepcopy(original), qpeft.LoraConfig(r=4, target_modules="all-linear"))
    names = [n for n, _ in model.lora_layers()]
    assert len(names) == 2 * 4 and {n.split(".")[-1] for n in names} == {"c_attn", "c_proj", "c_fc"}
    assert model.peft_config["default"].fan_in_fan_out
    layer = model.base_model.transformer.h[0].attn.c_attn
    assert layer.in_features == 64 and layer.out_features == 3 * 64
    ids = tokens()
    with torch.no_grad():
        base = model(ids).logits
        assert rel_err(base, dequantized_float_copy(model, original)(ids).logits) < 1e-5
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        adapted = model(ids).logits
        assert rel_err(adapted, base) > 1e-4
        merged = model.merge_and_unload()
        conv1d = type(original.transformer.h[0].attn.c_attn)
        assert isinstance(merged.transformer.h[0].attn.c_attn, conv1d)
        assert merged.transformer.h[0].attn.c_attn.weight.shape == (64, 3 * 64)
        assert rel_err(merged(ids).logits, adapted) < 1e-5
        assert set(merged.state_dict()) == set(original.state_dict())


def test_gpt2_adapters_move_between_peft_and_qpeft(tmp_path):
    original = tiny_gpt2()
    pcfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, init_lora_weights=False
    )
    peft.get_peft_model(copy.deepcopy(original), pcfg).save_pretrained(tmp_path / "peft")
    model = qpeft.QPeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "peft")
    ids = tokens()
    with torch.no_grad():
        check = peft.PeftModel.from_pretrained(dequantized_float_copy(model, original), tmp_path / "peft").eval()
        assert rel_err(model(ids).logits, check(ids).logits) < 1e-5
    ours = qpeft.get_peft_model(copy.deepcopy(original), qpeft.LoraConfig(r=4, target_modules=["c_proj"]))
    randomize_adapters(ours)
    ours.save_pretrained(tmp_path / "qpeft")
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(dequantized_float_copy(ours, original), tmp_path / "qpeft").eval()
        assert rel_err(ours(ids).logits, theirs(ids).logits) < 1e-5


# ---- modules_to_save: one trainable copy per adapter, as peft's ModulesToSaveWrapper ----------------------------


def test_modules_to_save_copies_match_peft(tmp_path):
    """Each adapter trains its own copy of a modules_to_save module; disable_adapter() gives the original back
    (what TRL's DPO reference pass relies on); the model's state-dict names and disabled / enabled logits are
    peft's."""
    original = tiny_llama()
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    model = qpeft.get_peft_model(copy.deepcopy(original), qpeft.LoraConfig(**cfg))
    randomize_adapters(model)
    with torch.no_grad():
        model.base_model.lm_head.weight.mul_(1.5)  # trains the adapter's copy, never the original
    assert torch.equal(model.base_model.lm_head.original_module.weight, original.lm_head.weight)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "base_model.lm_head.modules_to_save.default.weight" in trainable
    assert not any("original_module" in n for n in trainable)

    theirs = peft.get_peft_model(dequantized_float_copy(model, original), peft.LoraConfig(**cfg))
    ours_keys = {k.removeprefix("base_model.") for k in model.state_dict() if "lm_head" in k}
    theirs_keys = {k.removeprefix("base_model.model.") for k in theirs.state_dict() if "lm_head" in k}
    assert ours_keys == theirs_keys == {"lm_head.original_module.weight", "lm_head.modules_to_save.default.weight"}

    model.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(dequantized_float_copy(model, original), tmp_path).eval()
    ids = tokens()
    with torch.no_grad():
        assert rel_err(model(ids).logits, theirs(ids).logits) < 1e-5
        with model.disable_adapter(), theirs.disable_adapter():
            disabled, theirs_disabled = model(ids).logits, theirs(ids).logits
        base = dequantized_float_copy(model, original)(ids).logits
    assert rel_err(disabled, base) < 1e-6 and rel_err(theirs_disabled, base) < 1e-6
    with torch.no_grad():
        assert rel_err(model(ids).logits, theirs(ids).logits) < 1e-5  # enabled again after the context


def test_modules_to_save_per_adapter_switching_deleting_and_unloading(tmp_path):
    original = tiny_llama()
    model = qpeft.get_peft_model(
        copy.deepcopy(original), qpeft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    )
    model.add_adapter("other", qpeft.LoraConfig(r=2, target_modules=["v_proj"], modules_to_save=["lm_head"]))
    model.add_adapter("plain", qpeft.LoraConfig(r=2, target_modules=["k_proj"]))
    wrapper = model.base_model.lm_head
    assert sorted(wrapper.modules_to_save) == ["default", "other"]
    with torch.no_grad():
        wrapper.modules_to_save["other"].weight.add_(0.5)
    ids = tokens()
    model.set_adapter("default")
    with torch.no_grad():
        y_default = model(ids).logits
    model.set_adapter("other")
    assert wrapper.modules_to_save["other"].weight.requires_grad
    assert not wrapper.modules_to_save["default"].weight.requires_grad
    with torch.no_grad():
        y_other = model(ids).logits
    assert rel_err(y_other, y_default) > 1e-2  # its own lm_head
    model.set_adapter("plain")  # no copy of its own: the original lm_head
    assert wrapper.in_use() is wrapper.original_module
    with pytest.raises(ValueError, match="only one of them can be active"):
        model.set_adapter(["default", "other"])

    model.save_pretrained(tmp_path)  # each adapter's file holds its own copy under the module's name
    loaded = qpeft.QPeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "other", adapter_name="other")
    assert torch.equal(loaded.base_model.lm_head.weight, wrapper.modules_to_save["other"].weight)

    model.set_adapter("other")
    merged = copy.deepcopy(model).merge_and_unload()
    assert type(merged.lm_head) is torch.nn.Linear and torch.equal(
        merged.lm_head.weight, wrapper.modules_to_save["other"].weight
    )
    with pytest.warns(UserWarning, match="'default' is active now"):
        model.delete_adapter("other")  # the active one: the first remaining adapter takes over, as in peft
    assert model.active_adapter == "default"
    assert wrapper.active == "default" and sorted(wrapper.modules_to_save) == ["default"]
    model.delete_adapter("default")  # the last copy gone: the plain module is back
    assert model.base_model.lm_head is wrapper.original_module


def test_4bit_checkpoint_keeps_the_original_of_modules_to_save(tmp_path):
    original = tiny_llama()
    model = qpeft.get_peft_model(
        copy.deepcopy(original), qpeft.LoraConfig(r=4, target_modules="all-linear", modules_to_save=["lm_head"])
    )
    with torch.no_grad():
        model.base_model.lm_head.weight.mul_(2.0)
    state = qpeft.checkpoint.quantized_state_dict(model.base_model)
    assert torch.equal(state["lm_head.weight"], original.lm_head.weight)
    assert not any("original_module" in k or "modules_to_save" in k for k in state)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.uint8])
def test_integer_or_bool_tensors_for_floating_parameters_are_refused(dtype, tmp_path):
    """A file tensor of another kind than its parameter (ints or bools for fp32 LoRA weights) is refused by name,
    not cast."""
    from safetensors.torch import load_file, save_file

    qpeft.get_peft_model(tiny_llama(), qpeft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    key = sorted(tensors)[0]
    tensors[key] = torch.ones(tensors[key].shape, dtype=dtype)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=f"{key} is torch.{str(dtype).split('.')[-1]} in the file"):
        qpeft.QPeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_default_targets_are_peft_s():
    """Configs without target_modules get peft's defaults for the model type: the tables equal the installed peft's
    for every model type qpeft lists, and on Llama and GPT-2 the same layers are adapted as by peft."""
    from peft.utils import constants

    from qpeft.tuners import default_targets

    for kind, modules in default_targets.LORA.items():
        assert sorted(modules) == sorted(constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[kind]), kind
    for kind, (modules, feedforward) in default_targets.IA3.items():
        assert sorted(modules) == sorted(constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING[kind]), kind
        assert sorted(feedforward) == sorted(constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING[kind])
    for make in (tiny_llama, tiny_gpt2):
        for ours, theirs in (
            (qpeft.LoraConfig(r=2), peft.LoraConfig(r=2)),
            (qpeft.AdaLoraConfig(init_r=2, total_step=10), peft.AdaLoraConfig(init_r=2, total_step=10)),
            (qpeft.IA3Config(), peft.IA3Config()),
        ):
            q = qpeft.get_peft_model(make(), ours)
            p = peft.get_peft_model(make(), theirs)
            adapted = {n for n, m in q.base_model.named_modules() if isinstance(m, AdapterLayer4bit)}
            theirs_adapted = {
                n.removeprefix("base_model.model.") for n, m in p.named_modules() if hasattr(m, "base_layer")
            }
            assert adapted == theirs_adapted and adapted, (make.__name__, type(ours).__name__)
            if isinstance(ours, qpeft.IA3Config):
                assert sorted(ours.feedforward_modules) == sorted(p.peft_config["default"].feedforward_modules)


def test_a_peft_script_runs_with_only_its_import_changed(tmp_path):
    """peft's names as scripts use them: TaskType, LoraConfig without targets (the model type's defaults),
    prepare_model_for_kbit_training, get_peft_model, print_trainable_parameters, save_pretrained, PeftConfig,
    PeftModel.from_pretrained, AutoPeftModelForCausalLM, merge_and_unload."""
    from qpeft import (
        AutoPeftModelForCausalLM,
        LoraConfig,
        PeftConfig,
        PeftModel,
        TaskType,
        get_peft_model,
        prepare_model_for_kbit_training,
    )

    tiny_llama().save_pretrained(tmp_path / "base")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model = prepare_model_for_kbit_training(model)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, task_type=TaskType.CAUSAL_LM))
    model.print_trainable_parameters()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = tokens()
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    config = PeftConfig.from_pretrained(tmp_path / "adapter")
    assert config.task_type == "CAUSAL_LM" and sorted(config.target_modules) == ["q_proj", "v_proj"]
    assert config.base_model_name_or_path == str(tmp_path / "base")
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
        reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=0, atol=0)
        auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
        torch.testing.assert_close(auto(input_ids=ids).logits, expected, rtol=0, atol=0)
        merged = reloaded.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_prepare_model_for_kbit_training_uses_transformers_current_checkpointing_name():
    """transformers 5 renamed gradient checkpointing to activation checkpointing; the old name warns."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        model = qpeft.prepare_model_for_kbit_training(tiny_llama())
    assert model.is_activation_checkpointing and not any(p.requires_grad for p in model.parameters())
