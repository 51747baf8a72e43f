"""The targets a config gets when it leaves ``target_modules`` None, by the model's transformers ``model_type``: the
same defaults peft uses for LoRA / AdaLoRA and for IA3 (with its feed-forward modules); tests compare the values with
the installed peft. A model type without an entry has no default (as in peft): the config must name targets."""

from __future__ import annotations

_QV = ("q_proj", "v_proj")
_QVD = ("q_proj", "v_proj", "down_proj")

# model_type -> LoRA / AdaLoRA target_modules
LORA = {
    **dict.fromkeys(
        (
            "llama",
            "llama4",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen3",
            "gemma",
            "gemma2",
            "gemma3_text",
            "stablelm",
            "opt",
            "gptj",
            "gpt_neo",
            "bart",
        ),
        _QV,
    ),
    "phi": ("q_proj", "v_proj", "fc1", "fc2"),
    **dict.fromkeys(("gpt2", "gpt_bigcode"), ("c_attn",)),
    **dict.fromkeys(("gpt_neox", "falcon", "bloom"), ("query_key_value",)),
    "mpt": ("Wqkv",),
    "codegen": ("qkv_proj",),
    **dict.fromkeys(("t5", "mt5"), ("q", "v")),
}

# model_type -> IA3 (target_modules, feedforward_modules)
IA3 = {
    **dict.fromkeys(("llama", "mistral"), (("k_proj", "v_proj", "down_proj"), ("down_proj",))),
    **dict.fromkeys(("llama4", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"), (_QVD, ("down_proj",))),
    "mixtral": (("k_proj", "v_proj", "w2"), ("w2",)),
    "phi": (("q_proj", "v_proj", "fc2"), ("fc2",)),
    "opt": (("q_proj", "k_proj", "fc2"), ("fc2",)),
    "gptj": (("q_proj", "v_proj", "fc_out"), ("fc_out",)),
    "gpt_neo": (("q_proj", "v_proj", "c_proj"), ("c_proj",)),
    **dict.fromkeys(("gpt2", "gpt_bigcode"), (("c_attn", "mlp.c_proj"), ("mlp.c_proj",))),
    **dict.fromkeys(("gpt_neox", "falcon"), (("query_key_value", "dense_4h_to_h"), ("dense_4h_to_h",))),
    "bloom": (("query_key_value", "mlp.dense_4h_to_h"), ("mlp.dense_4h_to_h",)),
    "t5": (("k", "v", "wo"), ("wo",)),
    "mt5": (("k", "v", "wi_1"), ()),
    "bart": (("q_proj", "v_proj", "fc2"), ("fc2",)),
}


def model_type(model) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def fill(config, defaults: dict[str, tuple]) -> None:
    """Each of ``defaults``' fields (field -> its value) that ``config`` leaves None set to it, as peft does."""
    for key, value in defaults.items():
        if getattr(config, key) is None:
            setattr(config, key, sorted(value))
    config.validate()


def fill_lora(model, config) -> None:
    if config.target_modules is None:
        fill(config, {"target_modules": _lookup(LORA, model, config)})


def fill_ia3(model, config) -> None:
    if config.target_modules is None:
        targets, feedforward = _lookup(IA3, model, config)
        fill(config, {"target_modules": targets, "feedforward_modules": feedforward})


def _lookup(table: dict, model, config):
    kind = model_type(model)
    if kind not in table:
        raise ValueError(
            f"qpeft: {type(config).__name__}.target_modules is required for this model: there is no default for "
            f"model type {kind!r} (as in peft); name the layers, a regex, or 'all-linear'"
        )
    return table[kind]
