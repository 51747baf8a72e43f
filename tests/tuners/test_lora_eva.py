"""EVA on the 4-bit base against peft's EVA on the same (dequantized) weights and data: the components, the
redistributed ranks, the adapters and config it leaves, its files both ways; the refusals."""

import copy

import pytest
import torch

import qpeft
from qpeft.tuners.lora import eva

from helpers import float_model_of, rel_err, tiny_llama

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from peft.tuners.lora import eva as peft_eva  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "down_proj"]


def batches(n=6, seed=0):
    """Batches of 4 x 16 tokens; some padding and some -100 labels, which EVA leaves out."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 101, (4, 16), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 10:] = 0
        labels = ids.clone()
        labels[1, :3] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def both(**kw):
    """(qpeft's EVA model, peft's EVA model on qpeft's dequantized base) before initialisation."""
    original = tiny_llama()
    cfg = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="eva", **kw)
    ours = qpeft.get_peft_model(copy.deepcopy(original), qpeft.LoraConfig(**cfg))
    peft_cfg = dict(cfg)
    if "eva_config" in kw:
        peft_cfg["eva_config"] = peft.tuners.lora.config.EvaConfig(**vars(kw["eva_config"]))
    with pytest.warns(UserWarning):
        theirs = peft.get_peft_model(float_model_of(ours.get_base_model(), original), peft.LoraConfig(**peft_cfg))
    return original, ours, theirs


def stripped(d: dict) -> dict:
    return {k.removeprefix("base_model.model."): v for k, v in d.items()}


@pytest.mark.parametrize(
    "eva_config",
    [
        qpeft.EvaConfig(),
        qpeft.EvaConfig(rho=1.0, whiten=True),
        qpeft.EvaConfig(tau=0.9, use_label_mask=False, adjust_scaling_factors=False),
    ],
)
def test_components_and_ranks_are_peft_s(eva_config):
    _, ours, theirs = both(eva_config=eva_config)
    data = batches()
    mine = qpeft.get_eva_state_dict(ours, data)
    reference = stripped(peft_eva.get_eva_state_dict(theirs, data, show_progress_bar=False))
    assert mine.keys() == reference.keys()
    assert sum(v.shape[0] for v in mine.values()) == 4 * 8  # the rank budget, redistributed
    if eva_config.rho > 1:
        assert len({v.shape[0] for v in mine.values()}) > 1
    for name, rows in mine.items():
        theirs_rows = reference[name].float()
        assert rows.shape == theirs_rows.shape, name
        if eva_config.whiten and "_proj" in name and "down" not in name:
            # peft whitens the shared rows of q, k and v in place once per layer (three times): equal directions
            rows, theirs_rows = (
                rows / rows.norm(dim=1, keepdim=True),
                theirs_rows / theirs_rows.norm(dim=1, keepdim=True),
            )
        torch.testing.assert_close(rows, theirs_rows, rtol=1e-4, atol=1e-5)


def test_initialised_adapters_config_and_files_match_peft(tmp_path):
    original, ours, theirs = both()
    data = batches()
    with torch.no_grad():
        before = ours(**data[0]).logits
    qpeft.initialize_lora_eva_weights(ours, data)
    peft_eva.initialize_lora_eva_weights(theirs, data, show_progress_bar=False)
    cfg, pcfg = ours.peft_config["default"], theirs.peft_config["default"]
    assert stripped(cfg.rank_pattern) == stripped(pcfg.rank_pattern)
    assert stripped(cfg.alpha_pattern) == pytest.approx(stripped(pcfg.alpha_pattern))
    layers = dict(ours.lora_layers())
    from peft.tuners.lora import LoraLayer

    theirs_layers = stripped({n: m for n, m in theirs.named_modules() if isinstance(m, LoraLayer)})
    assert layers.keys() == theirs_layers.keys()
    for name, layer in layers.items():
        a = layer.adapters["default"]
        p = theirs_layers[name]
        torch.testing.assert_close(a.lora_A, p.lora_A["default"].weight, rtol=1e-4, atol=1e-5)
        assert not a.lora_B.any() and a.scaling == pytest.approx(p.scaling["default"])
        assert a.lora_A.requires_grad and a.lora_B.requires_grad
    with torch.no_grad():  # B = 0: the model computes what it did
        torch.testing.assert_close(ours(**data[0]).logits, before, rtol=0, atol=0)
    # trained a little, the adapter moves to peft and back
    with torch.no_grad():
        for layer in layers.values():
            layer.adapters["default"].lora_B.normal_(0, 0.05)
    ours.save_pretrained(tmp_path / "ours")
    check = peft.PeftModel.from_pretrained(float_model_of(ours.get_base_model(), original), tmp_path / "ours")
    with torch.no_grad():
        y, y_check = ours(**data[1]).logits, check(**data[1]).logits
    assert rel_err(y, y_check) < 1e-5
    check.save_pretrained(tmp_path / "theirs")
    back = qpeft.PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(back(**data[1]).logits, y, rtol=0, atol=0)


def test_a_layer_given_rank_zero_loses_its_adapter():
    _, ours, _ = both()
    data = batches()
    state = qpeft.get_eva_state_dict(ours, data)
    state["model.layers.1.mlp.down_proj"] = state["model.layers.1.mlp.down_proj"][:0]
    qpeft.initialize_lora_eva_weights(ours, eva_state_dict=state)
    assert "model.layers.1.mlp.down_proj" not in dict(ours.lora_layers())
    assert type(ours.get_base_model().model.layers[1].mlp.down_proj).__name__ == "Linear4bit"
    assert "model.layers.1.mlp.down_proj" not in ours.peft_config["default"].target_modules


def test_the_incremental_pca_equals_the_pca_of_all_rows():
    """Fed batches one by one, the kept components are those of the whole data (when k covers the data's rank)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 24, generator=g, dtype=torch.float64)
    X += 3.0
    pca = eva.InputPCA(k=5, tau=0.99)
    for part in X.split(60):
        pca.update(part.float())
    centered = X - X.mean(0)
    _, S, Vh = torch.linalg.svd(centered, full_matrices=False)
    Vh = Vh[:5] * eva._signs(Vh[:5])[:, None]
    torch.testing.assert_close(pca.components.double(), Vh, rtol=0, atol=1e-4)
    torch.testing.assert_close(pca.singular_values.double(), S[:5], rtol=1e-4, atol=0)
    torch.testing.assert_close(pca.var, X.var(0, unbiased=False), rtol=1e-6, atol=0)


def test_refusals_and_the_step_cap():
    _, ours, _ = both()
    with pytest.raises(ValueError, match="empty"):
        qpeft.get_eva_state_dict(ours, [])
    with pytest.raises(ValueError, match="max_steps"):
        qpeft.get_eva_state_dict(ours, batches(), max_steps=0)
    plain = qpeft.get_peft_model(tiny_llama(), qpeft.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="init_lora_weights='eva'"):
        qpeft.initialize_lora_eva_weights(plain, batches())
    with pytest.raises(KeyError, match="names layers"):
        qpeft.initialize_lora_eva_weights(ours, eva_state_dict={"model.embed_tokens": torch.zeros(1, 64)})
    with pytest.raises(ValueError, match="finite"):
        name = "model.layers.0.self_attn.q_proj"
        qpeft.initialize_lora_eva_weights(ours, eva_state_dict={name: torch.full((2, 64), float("nan"))})
    tokens_too_few = [{"input_ids": torch.randint(0, 101, (1, 3))}]
    with pytest.raises(ValueError, match="as many tokens as their rank"):
        qpeft.get_eva_state_dict(ours, tokens_too_few, max_steps=3)
    # data that never settles (a fresh random batch each time, tau 1): stops at max_steps with a warning
    _, moving, _ = both(eva_config=qpeft.EvaConfig(tau=1.0))
    with pytest.warns(UserWarning, match="still moving"):
        state = qpeft.get_eva_state_dict(moving, batches(n=5, seed=1), max_steps=4)
    assert sum(v.shape[0] for v in state.values()) == 32
    with pytest.raises(qpeft.ConfigError, match="rho"):
        qpeft.EvaConfig(rho=0.5)
