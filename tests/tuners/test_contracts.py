"""The contract battery: every registered method (each example variant a row) against the same contracts, under
three compute set-ups (the checkpoint's dtype, fp32 compute on a bf16 model, fp16). A method added to the registry
is tested here by its examples alone."""

import copy
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

import qpeft
from qpeft.nn import Linear4bit
from qpeft.nn.adapter_holder import AdapterLayer4bit
from qpeft.nn.modules_to_save import ModulesToSave
from qpeft.tuners import registry

from helpers import tiny_llama

pytest.importorskip("transformers")

ROWS = [(m, variant) for m in registry.METHODS.values() for variant in m.examples]
SETUPS = {  # name -> (the model's dtype, the 4-bit layers' compute dtype)
    "bf16": (torch.bfloat16, None),
    "bf16_model_fp32_compute": (torch.bfloat16, torch.float32),
    "fp16": (torch.float16, None),
}
TOLERANCE = {torch.bfloat16: dict(rtol=3e-2, atol=3e-2), torch.float16: dict(rtol=5e-3, atol=5e-3)}


def rows(where=lambda method: True):
    return [pytest.param(m, v, id=f"{m.name}-{v}") for m, v in ROWS if where(m)]


def setups():
    return pytest.mark.parametrize("setup", list(SETUPS))


def original_model(setup: str) -> torch.nn.Module:
    """The tiny Llama with its parameters in the set-up's dtype, buffers (rotary frequencies) fp32: as
    from_pretrained(dtype=...) gives it."""
    model = tiny_llama(seed=1)
    for p in model.parameters():
        p.data = p.data.to(SETUPS[setup][0])
    return model


def new_config(method, variant: str, setup: str):
    config = method.examples[variant]()
    config.compute_dtype = SETUPS[setup][1]
    return config


def build(method, variant: str, setup: str) -> tuple[torch.nn.Module, qpeft.QPeftModel]:
    """(the unquantized original, a new QPeftModel of the row on a copy of it)."""
    original = original_model(setup)
    torch.manual_seed(2)
    model = qpeft.get_peft_model(copy.deepcopy(original), new_config(method, variant, setup))
    if method.warmup:
        getattr(model, method.warmup)([batch(model)])
    return original, model


def batch(model) -> dict:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 101, (2, 7), generator=g)
    inputs = {"input_ids": ids, "labels": ids}
    config = model.peft_config[model.active_adapter] if isinstance(model, qpeft.QPeftModel) else None
    if hasattr(config, "num_tasks"):
        inputs["task_ids"] = torch.tensor([0, 1])
    return inputs


@torch.no_grad()
def logits(model) -> torch.Tensor:
    was = model.training
    model.eval()
    try:
        return model(**batch(model)).logits.float()
    finally:
        model.train(was)


def base_of(peft_model: qpeft.QPeftModel, original: torch.nn.Module) -> torch.nn.Module:
    """``original`` holding the adapted model's base layers (its 4-bit layers, and the dense ones it made), with
    no adapter: what the model computes before its adapters do anything. Built from the layers themselves, not
    through unload / disable_adapter, which the contracts test."""
    base = copy.deepcopy(original)
    layers = dict(peft_model.base_model.named_modules())
    for name, module in original.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        ours = layers[name]
        if isinstance(ours, (AdapterLayer4bit, ModulesToSave)):
            ours = getattr(ours, ours.BASE_CHILD)
        parent, _, child = name.rpartition(".")
        setattr(base.get_submodule(parent) if parent else base, child, copy.deepcopy(ours))
    return base


def step(model) -> None:
    """One training step that moves every trainable tensor with a gradient (a sign step: visible in 16 bits)."""
    model.train()
    loss = model(**batch(model)).loss
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.grad is not None:
                p.sub_(1e-2 * p.grad.sign())
                p.grad = None


def assert_close(a, b, dtype):
    torch.testing.assert_close(a, b, **TOLERANCE[dtype])


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def assert_same_state(before: dict, model) -> None:
    after = model.state_dict(keep_vars=True)
    assert sorted(after) == sorted(before)
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k].detach(), v), k


# ---- the contracts ----------------------------------------------------------------------------------------------


@setups()
@pytest.mark.parametrize("method, variant", rows(lambda m: m.starts_as_base))
def test_a_new_model_computes_what_its_base_computes(method, variant, setup):
    original, model = build(method, variant, setup)
    assert_close(logits(model), logits(base_of(model, original)), SETUPS[setup][0])


@setups()
@pytest.mark.parametrize("method, variant", rows())
def test_exactly_the_named_parameters_train_and_nothing_else_moves(method, variant, setup):
    _, model = build(method, variant, setup)
    train = trainable(model)
    assert train, "nothing trains"
    file_tensors = model._file_parameters(model.active_adapter)
    if all(isinstance(t, torch.nn.Parameter) for t in file_tensors.values()) and not method.is_prompt_learning:
        assert {id(p) for p in train.values()} == {id(t) for t in file_tensors.values()}
    frozen = {k: v for k, v in state(model).items() if k not in train}
    before = {k: p.detach().clone() for k, p in train.items()}
    step(model)
    after = model.state_dict(keep_vars=True)
    for k, v in frozen.items():
        assert torch.equal(after[k].detach(), v), f"{k} moved"
    moved = [k for k, p in train.items() if not torch.equal(p.detach(), before[k])]
    assert moved or all(p.numel() == 0 for p in train.values())


@setups()
@pytest.mark.parametrize("method, variant", rows())
def test_save_then_load_gives_the_same_outputs(method, variant, setup, tmp_path):
    original, model = build(method, variant, setup)
    step(model)
    model.save_pretrained(tmp_path)
    loaded = qpeft.QPeftModel.from_pretrained(copy.deepcopy(original), tmp_path, compute_dtype=SETUPS[setup][1])
    assert not trainable(loaded)  # is_trainable=False
    torch.testing.assert_close(logits(loaded), logits(model), rtol=1e-5, atol=1e-5)
    again = qpeft.QPeftModel.from_pretrained(
        copy.deepcopy(original), tmp_path, is_trainable=True, compute_dtype=SETUPS[setup][1]
    )
    assert trainable(again)


def corrupt(folder) -> None:
    """The adapter file's last tensor one row longer: the keys all fit, one shape does not."""
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    key = sorted(tensors)[-1]
    t = tensors[key]
    tensors[key] = torch.cat([t, t[:1]]) if t.dim() and t.shape[0] else torch.zeros(3, dtype=t.dtype)
    save_file(tensors, str(folder / "adapter_model.safetensors"))


@setups()
@pytest.mark.parametrize("method, variant", rows())
def test_a_failed_load_leaves_the_model_as_it_was(method, variant, setup, tmp_path):
    original, model = build(method, variant, setup)
    step(model)
    model.save_pretrained(tmp_path / "good")
    model.save_pretrained(tmp_path / "bad")
    corrupt(tmp_path / "bad")
    fresh = copy.deepcopy(original)
    pristine = state(fresh)
    with pytest.raises(ValueError):
        qpeft.QPeftModel.from_pretrained(fresh, tmp_path / "bad", compute_dtype=SETUPS[setup][1])
    assert_same_state(pristine, fresh)
    assert not any(isinstance(m, (Linear4bit, AdapterLayer4bit)) for m in fresh.modules())
    if method.own_parameters:  # one adapter per model: refused before anything is read
        with pytest.raises(ValueError, match="one adapter per model"):
            model.load_adapter(tmp_path / "good", "second")
        return
    before, names, y = state(model), sorted(trainable(model)), logits(model)
    with pytest.raises(ValueError):
        model.load_adapter(tmp_path / "bad", "second")
    assert_same_state(before, model)
    assert list(model.peft_config) == ["default"] and sorted(trainable(model)) == names
    torch.testing.assert_close(logits(model), y, rtol=0, atol=0)


@setups()
@pytest.mark.parametrize("method, variant", rows(lambda m: not m.own_parameters))
def test_disabling_the_adapters_gives_the_base(method, variant, setup):
    original, model = build(method, variant, setup)
    step(model)
    y = logits(model)
    with model.disable_adapter():
        assert_close(logits(model), logits(base_of(model, original)), SETUPS[setup][0])
    torch.testing.assert_close(logits(model), y, rtol=0, atol=0)


@setups()
@pytest.mark.parametrize("method, variant", rows(lambda m: m.own_parameters))
def test_a_method_training_the_model_itself_has_no_base_to_disable_to(method, variant, setup):
    _, model = build(method, variant, setup)
    with pytest.raises(ValueError, match="own parameters"), model.disable_adapter():
        pass
    with pytest.raises(ValueError, match="one adapter per model"):
        model.add_adapter("second", new_config(method, variant, setup))


@setups()
@pytest.mark.parametrize("method, variant", rows(lambda m: not m.own_parameters))
def test_set_and_delete_adapters(method, variant, setup):
    original, model = build(method, variant, setup)
    step(model)
    y = logits(model)
    trained = sorted(trainable(model))
    model.add_adapter("second", new_config(method, variant, setup))
    assert model.active_adapter == "default" and sorted(trainable(model)) == trained  # as in peft
    torch.testing.assert_close(logits(model), y, rtol=0, atol=0)
    model.set_adapter("second")
    second = sorted(trainable(model))
    assert second and not set(second) & set(trained)
    if method.starts_as_base:
        assert_close(logits(model), logits(base_of(model, original)), SETUPS[setup][0])
    with pytest.raises(KeyError):
        model.set_adapter("missing")
    with pytest.raises(ValueError):
        model.set_adapter([])
    assert model.active_adapter == "second" and sorted(trainable(model)) == second  # a refused change changes nothing
    with pytest.warns(UserWarning, match="'default' is active now"):
        model.delete_adapter("second")
    assert model.active_adapter == "default" and list(model.peft_config) == ["default"]
    assert sorted(trainable(model)) == trained
    torch.testing.assert_close(logits(model), y, rtol=0, atol=0)
    with pytest.raises(ValueError, match="only adapter"):
        model.delete_adapter("default")


@setups()
@pytest.mark.parametrize("method, variant", rows(lambda m: m.mergeable))
def test_merging_gives_the_unmerged_outputs(method, variant, setup):
    _, model = build(method, variant, setup)
    step(model)
    y = logits(model)
    model.merge_adapter()
    assert_close(logits(model), y, SETUPS[setup][0])
    model.unmerge_adapter()
    torch.testing.assert_close(logits(model), y, rtol=0, atol=0)
    merged = copy.deepcopy(model).merge_and_unload()
    assert not any(isinstance(m, (AdapterLayer4bit, ModulesToSave)) for m in merged.modules())
    assert_close(logits(merged), y, SETUPS[setup][0])


@setups()
@pytest.mark.parametrize("method, variant", rows(lambda m: not m.mergeable))
def test_a_method_that_does_not_merge_says_so(method, variant, setup):
    _, model = build(method, variant, setup)
    for verb in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(ValueError, match="do not merge|not the weights"):
            verb()


@setups()
@pytest.mark.parametrize("method, variant", rows())
def test_a_4bit_checkpoint_and_the_adapter_load_back_equal(method, variant, setup, tmp_path):
    _, model = build(method, variant, setup)
    step(model)
    qpeft.save_4bit_pretrained(model, tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    base = qpeft.load_4bit_pretrained(tmp_path / "base")
    config = model.peft_config["default"]
    loaded = qpeft.QPeftModel.from_pretrained(
        base,
        tmp_path / "adapter",
        compute_dtype=SETUPS[setup][1],
        quant_type=config.quant_type,
        blocksize=config.blocksize,
        double_quant=config.double_quant,
    )
    torch.testing.assert_close(logits(loaded), logits(model), rtol=1e-5, atol=1e-5)


@setups()
@pytest.mark.parametrize("method, variant", rows())
def test_deepcopy_and_pickle(method, variant, setup):
    _, model = build(method, variant, setup)
    step(model)
    y = logits(model)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        torch.testing.assert_close(logits(twin), y, rtol=0, atol=0)
        assert sorted(trainable(twin)) == sorted(trainable(model))


@setups()
@pytest.mark.parametrize("method, variant", rows())
def test_linear_outputs_may_be_modified_in_place(method, variant, setup):
    """Models that modify a linear layer's output in place (Falcon's attention) train: no layer returns a view
    made inside an autograd Function."""
    _, model = build(method, variant, setup)
    linear = (torch.nn.Linear, Linear4bit, AdapterLayer4bit)
    handles = [
        m.register_forward_hook(lambda m, args, out: out.mul_(1.0) if isinstance(out, torch.Tensor) else None)
        for m in model.modules()
        if isinstance(m, linear)
    ]
    try:
        model.train()
        model(**batch(model)).loss.backward()
    finally:
        for h in handles:
            h.remove()
    assert any(p.grad is not None for p in trainable(model).values())


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method, variant", rows())
def test_mixed_precision_autocast_trains_and_computes_the_model(method, variant, autocast_dtype):
    """Under torch.autocast (the Trainer's bf16 / fp16 on an fp32 model) every method computes what it computes
    without autocast, to the autocast dtype's rounding, and trains: 4-bit layers behave as nn.Linear does there."""
    torch.manual_seed(2)
    model = qpeft.get_peft_model(tiny_llama(seed=1), method.examples[variant]())
    if method.warmup:
        getattr(model, method.warmup)([batch(model)])
    step(model)  # adapters away from their start: their part of the output counts
    expected = logits(model)
    with torch.autocast("cpu", dtype=autocast_dtype):
        got = logits(model)
        model.train()
        loss = model(**batch(model)).loss
    loss.backward()
    torch.testing.assert_close(got, expected, rtol=0.05, atol=0.05)
    grads = [p.grad for p in trainable(model).values() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)


@pytest.mark.parametrize("name", ["prompt-tuning", "bitfit", "lora"])
def test_falcon_which_modifies_linear_outputs_in_place_trains(name):
    """transformers' Falcon adds to its attention projections' outputs in place."""
    import transformers

    config = transformers.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=101)
    torch.manual_seed(0)
    peft_config = registry.by_name(name).examples["default"]()
    if name == "lora":
        peft_config = qpeft.LoraConfig(r=2, use_dora=True, target_modules="all-linear")
    if name == "bitfit":
        peft_config = qpeft.BitFitConfig(add_missing_bias=True)
    model = qpeft.get_peft_model(transformers.FalconForCausalLM(config), peft_config)
    ids = torch.randint(0, 101, (2, 5))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in trainable(model).values())
