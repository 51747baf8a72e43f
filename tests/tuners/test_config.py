"""Bad adapter configs, from code or from adapter_config.json: one error type (qpeft.ConfigError, a ValueError)
naming the file, the key and the problem, raised before any model is changed; never a value reinterpreted
(the string "false" is not true) or a raw TypeError / KeyError."""

import json

import pytest
import torch

import qpeft

from helpers import tiny_llama


def write_adapter(tmp_path, **overrides):
    model = qpeft.get_peft_model(tiny_llama(), qpeft.LoraConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(overrides)
    path.write_text(json.dumps(config))
    return path


BAD_FIELDS = [
    ("use_rslora", "false"),
    ("use_dora", 1),
    ("r", True),
    ("r", 0),
    ("r", "8"),
    ("lora_alpha", "16"),
    ("lora_alpha", float("inf")),
    ("lora_dropout", 0.9999),
    ("lora_dropout", "0.1"),
    ("target_modules", 5),
    ("target_modules", ["q_proj", 3]),
    ("rank_pattern", {"q_proj": "4"}),
    ("rank_pattern", {"q_proj": 0}),
    ("alpha_pattern", {"q_proj": None}),
    ("layers_to_transform", "1"),
    ("modules_to_save", "lm_head"),
    ("bias", "some"),
    ("init_lora_weights", "mica"),
    ("fan_in_fan_out", None),
    ("task_type", 3),
]


@pytest.mark.parametrize("key,value", BAD_FIELDS)
def test_bad_field_in_adapter_config_names_file_and_key(tmp_path, key, value):
    path = write_adapter(tmp_path, **{key: value})
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(qpeft.ConfigError, match=key) as info:
        qpeft.QPeftModel.from_pretrained(model, tmp_path)
    assert str(path) in str(info.value) and info.value.key == key
    assert isinstance(info.value, ValueError)
    after = model.state_dict()  # the caller's model is untouched
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_malformed_adapter_config_files(tmp_path):
    path = write_adapter(tmp_path)
    for text in ("[1, 2]", "null", "{not json", '"LORA"'):
        path.write_text(text)
        with pytest.raises(qpeft.ConfigError, match="adapter_config") as info:
            qpeft.QPeftModel.from_pretrained(tiny_llama(), tmp_path)
        assert str(path) in str(info.value)
    path.write_bytes(b"\xff\xfe\x00{")
    with pytest.raises(qpeft.ConfigError, match="not valid JSON"):
        qpeft.QPeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_peft_null_patterns_load(tmp_path):
    """peft writes null or {} for 'no pattern': both load."""
    write_adapter(tmp_path, rank_pattern=None, alpha_pattern=None, layers_pattern=None, exclude_modules=None)
    model = qpeft.QPeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert model.peft_config["default"].rank_pattern == {} and model.peft_config["default"].alpha_pattern == {}


@pytest.mark.parametrize(
    "kwargs,key",
    [
        (dict(compute_dtype=torch.nn), "compute_dtype"),
        (dict(compute_dtype=torch.int8), "compute_dtype"),
        (dict(blocksize=64.0), "blocksize"),
        (dict(blocksize=48), "blocksize"),
        (dict(quant_type="int4"), "quant_type"),
        (dict(double_quant="yes"), "double_quant"),
        (dict(lora_dropout=1.0), "lora_dropout"),
        (dict(r=2.5), "r"),
    ],
)
def test_bad_config_in_code(kwargs, key):
    with pytest.raises(qpeft.ConfigError, match=key) as info:
        qpeft.LoraConfig(target_modules=["q_proj"], **kwargs)
    assert info.value.key == key


def test_checkpoint_compute_dtype_must_be_a_float_dtype(tmp_path):
    model = qpeft.get_peft_model(tiny_llama(), qpeft.LoraConfig(r=4, target_modules="all-linear"))
    qpeft.save_4bit_pretrained(model, tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    for bad in ("nn", "int8", "cuda"):
        config["quantization_config"]["bnb_4bit_compute_dtype"] = bad
        path.write_text(json.dumps(config))
        with pytest.raises(qpeft.ConfigError, match="bnb_4bit_compute_dtype") as info:
            qpeft.load_4bit_pretrained(tmp_path)
        assert str(path) in str(info.value)
    config["quantization_config"]["bnb_4bit_compute_dtype"] = "bfloat16"
    path.write_text(json.dumps(config))
    assert qpeft.load_4bit_pretrained(tmp_path) is not None


HOSTILE = "(.|.)*y"  # exponential backtracking on a long name with a 'y' that is not its end


@pytest.mark.parametrize(
    "key,value",
    [
        ("target_modules", HOSTILE),
        ("exclude_modules", HOSTILE),
        ("target_modules", "(q_proj"),
        ("rank_pattern", {HOSTILE: 4}),
        ("alpha_pattern", {HOSTILE: 4}),
        ("rank_pattern", {"[": 4}),
    ],
)
def test_hostile_regexes_in_adapter_config_are_refused_quickly(tmp_path, key, value):
    """Regexes from a file run with a time bound: a catastrophically backtracking pattern (minutes with Python's
    re on a long module name) or one that does not compile is a ConfigError within seconds, the model untouched."""
    import time

    path = write_adapter(tmp_path, **{key: value})
    model = tiny_llama()
    model.model.layers[0].self_attn.add_module("x" * 40 + "yz", torch.nn.Linear(4, 4))  # a long name
    before = [(n, type(m).__name__) for n, m in model.named_modules()]
    start = time.perf_counter()
    with pytest.raises(qpeft.ConfigError, match=key):
        qpeft.QPeftModel.from_pretrained(model, path.parent)
    assert time.perf_counter() - start < 30
    assert [(n, type(m).__name__) for n, m in model.named_modules()] == before


def test_many_slow_patterns_share_one_time_budget_per_load(tmp_path, monkeypatch):
    """Hundreds of distinct patterns, each ~20 ms on a module name (under the per-match bound), would keep a load
    busy for tens of seconds; one load's matches share patterns.LOAD_SECONDS."""
    import time

    from qpeft import patterns

    monkeypatch.setattr(patterns, "LOAD_SECONDS", 0.5)
    slow = {f"(?:.|.){{16}}(?<=Z)(?#{i})": 2 for i in range(300)}
    path = write_adapter(tmp_path, rank_pattern=slow)
    model = tiny_llama()
    start = time.perf_counter()
    with pytest.raises(qpeft.ConfigError, match="rank_pattern patterns took over"):
        qpeft.QPeftModel.from_pretrained(model, path.parent)
    assert time.perf_counter() - start < 5
    assert not any(isinstance(m, qpeft.nn.Linear4bit) for m in model.modules())


def test_sharded_checkpoint_index_is_checked(tmp_path):
    """model.safetensors.index.json names shards: only files of the folder, in a JSON object."""
    model = qpeft.get_peft_model(tiny_llama(), qpeft.LoraConfig(r=4, target_modules="all-linear"))
    qpeft.save_4bit_pretrained(model, tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "shard.safetensors")
    index = tmp_path / "model.safetensors.index.json"
    keys = list(load_keys(tmp_path / "shard.safetensors"))
    for weight_map in (
        {k: "../shard.safetensors" for k in keys},
        {k: "/etc/passwd" for k in keys},
        [1, 2],
        {k: 3 for k in keys},
    ):
        index.write_text(json.dumps({"weight_map": weight_map}))
        with pytest.raises(qpeft.ConfigError, match="weight_map"):
            qpeft.load_4bit_pretrained(tmp_path)
    index.write_text("[" * 100_000 + "]" * 100_000)  # deep nesting: RecursionError inside json
    with pytest.raises(qpeft.ConfigError, match="weight_map"):
        qpeft.load_4bit_pretrained(tmp_path)
    index.write_text(json.dumps({"weight_map": {k: "shard.safetensors" for k in keys}}))
    assert qpeft.load_4bit_pretrained(tmp_path) is not None


def load_keys(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def test_deeply_nested_adapter_config_is_a_config_error(tmp_path):
    path = write_adapter(tmp_path)
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(qpeft.ConfigError, match="adapter_config"):
        qpeft.QPeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_oversized_config_files_are_refused_unread(tmp_path):
    path = write_adapter(tmp_path)
    with open(path, "ab") as f:  # valid JSON followed by 17 MB of spaces
        f.write(b" " * (17 << 20))
    with pytest.raises(qpeft.ConfigError, match="refused"):
        qpeft.QPeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_every_field_of_every_method_config_declares_its_check():
    """validate() runs the checks declared with the fields: a field added without one would go unchecked."""
    import dataclasses

    from qpeft.tuners import registry

    for method in registry.METHODS.values():
        unchecked = [f.name for f in dataclasses.fields(method.config_class) if f.metadata.get("check") is None]
        assert not unchecked, (method.name, unchecked)


@pytest.mark.parametrize(
    "make, key",
    [
        (lambda n: qpeft.LoraConfig(r=n), "r"),
        (lambda n: qpeft.LoraConfig(rank_pattern={"q_proj": n}), "rank_pattern"),
        (lambda n: qpeft.AdaLoraConfig(init_r=n, total_step=10), "init_r"),
        (lambda n: qpeft.PromptTuningConfig(num_virtual_tokens=n), "num_virtual_tokens"),
        (lambda n: qpeft.MultitaskPromptTuningConfig(num_virtual_tokens=2, num_tasks=n), "num_tasks"),
        (lambda n: qpeft.MultitaskPromptTuningConfig(num_virtual_tokens=2, num_ranks=n), "num_ranks"),
        (lambda n: qpeft.PrefixTuningConfig(num_virtual_tokens=2, num_layers=n), "num_layers"),
        (lambda n: qpeft.BottleneckConfig(bottleneck_size=n), "bottleneck_size"),
    ],
)
def test_sizes_from_a_config_are_capped_before_anything_is_allocated(make, key):
    from qpeft.tuners.config import MAX_SIZE

    make(MAX_SIZE)  # the largest accepted size: a config only, nothing allocated
    with pytest.raises(qpeft.ConfigError, match=key):
        make(MAX_SIZE + 1)
    with pytest.raises(qpeft.ConfigError, match=key):
        make(1 << 40)


def test_a_piggyback_start_is_checked_in_the_score_dtype():
    """init_score 1.001 > threshold 1.0 in double, but both round to 1.0 in bfloat16: no weight would be kept."""
    qpeft.PiggybackConfig(threshold=1.0, init_score=1.001)
    with pytest.raises(qpeft.ConfigError, match="init_score"):
        qpeft.PiggybackConfig(threshold=1.0, init_score=1.001, score_dtype="bfloat16")


@pytest.mark.parametrize(
    "config, match",
    [
        (lambda: qpeft.LoraConfig(r=1000, target_modules=["q_proj"]), "rank 1000 exceeds"),
        (lambda: qpeft.LoraConfig(r=2, rank_pattern={"q_proj": 4096}, target_modules=["q_proj"]), "rank 4096"),
        (lambda: qpeft.AdaLoraConfig(init_r=500, target_modules=["q_proj"], total_step=10), "rank 500"),
        (lambda: qpeft.BottleneckConfig(bottleneck_size=65), "bottleneck_size"),
    ],
)
def test_sizes_above_what_the_model_can_use_are_refused_before_allocating(config, match):
    """tiny_llama's layers are at most 96 wide: a larger rank or bottleneck adds nothing and is refused by name,
    the model left as it was."""
    model = tiny_llama()
    before = [(n, type(m).__name__) for n, m in model.named_modules()]
    with pytest.raises(ValueError, match=match):
        qpeft.get_peft_model(model, config())
    assert [(n, type(m).__name__) for n, m in model.named_modules()] == before
