"""Writes stay inside their folder and are atomic: adapter names cannot lead outside the save directory or
through a symbolic link, and an interrupted save leaves every file whole (the old one or the new one)."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import qpeft
from qpeft import files
from qpeft.nn import LoraLinear4bit

from helpers import tiny_llama, tokens

BAD_NAMES = ["../evil", "/tmp/evil", "a/b", "a\\b", "", "a.b", "-x", "x" * 129, 5, None, "é"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_adapter_names_are_confined(name):
    model = qpeft.get_peft_model(tiny_llama(), qpeft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(qpeft.ConfigError, match="adapter name"):
        model.add_adapter(name, qpeft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert list(model.peft_config) == ["default"]
    with pytest.raises(qpeft.ConfigError, match="adapter name"):
        qpeft.get_peft_model(tiny_llama(), qpeft.LoraConfig(r=2, target_modules=["q_proj"]), adapter_name=name)
    with pytest.raises(qpeft.ConfigError, match="adapter name"):
        LoraLinear4bit.from_linear(torch.nn.Linear(8, 4)).add_adapter(name)


def test_save_refuses_a_symlinked_adapter_folder(tmp_path):
    model = qpeft.get_peft_model(tiny_llama(), qpeft.LoraConfig(r=2, target_modules=["q_proj"]))
    model.add_adapter("style", qpeft.LoraConfig(r=2, target_modules=["q_proj"]))
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "save").mkdir()
    (tmp_path / "save" / "style").symlink_to(outside)
    with pytest.raises(ValueError, match="symbolic link"):
        model.save_pretrained(tmp_path / "save")
    assert list(outside.iterdir()) == []


def interrupt_write(monkeypatch, n):
    """The n-th atomic write (counted at its fsync) is interrupted, as by Ctrl-C."""
    calls = {"n": 0}
    real_fsync = os.fsync

    def failing_fsync(fd):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", failing_fsync)


@pytest.mark.parametrize("interrupt_at", [1, 2])
def test_interrupted_adapter_save_leaves_whole_files_and_no_config(tmp_path, monkeypatch, interrupt_at):
    """A second save interrupted at its first write (the weights) or its second (the config): every file left is
    whole, and the config (the folder's completion mark, removed first, written last) is the new one or absent, so
    the folder is refused rather than loaded as new weights under the old config."""
    model = qpeft.get_peft_model(tiny_llama(), qpeft.LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        for _, layer in model.lora_layers():
            layer.lora_B.fill_(0.5)
    model.peft_config["default"].lora_alpha = 7
    interrupt_write(monkeypatch, interrupt_at)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_path)
    monkeypatch.undo()
    weights = load_file(tmp_path / "adapter_model.safetensors")  # whole: old (1) or new (2)
    b_key = next(k for k in weights if k.endswith("lora_B.weight"))
    assert torch.equal(weights[b_key], torch.full_like(weights[b_key], 0.5)) == (interrupt_at == 2)
    assert not (tmp_path / "adapter_config.json").exists()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        qpeft.QPeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    model.save_pretrained(tmp_path)  # and a complete save afterwards
    assert json.loads((tmp_path / "adapter_config.json").read_text())["lora_alpha"] == 7


@pytest.mark.parametrize("interrupt_at", [1, 2])
def test_interrupted_checkpoint_save_leaves_whole_files_and_no_config(tmp_path, monkeypatch, interrupt_at):
    """A second save of a changed model, interrupted at its first or second write: every file is whole, the old
    or the new one, and without its config.json the folder is refused (never the new weights under the old
    config); a complete save afterwards loads."""
    model = qpeft.get_peft_model(tiny_llama(), qpeft.LoraConfig(r=2, target_modules="all-linear"))
    qpeft.save_4bit_pretrained(model, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with torch.no_grad():
        model.get_submodule("model.norm").weight.add_(1.0)
    qpeft.save_4bit_pretrained(model, tmp_path / "new")
    after = {p.name: p.read_bytes() for p in (tmp_path / "new").iterdir()}
    interrupt_write(monkeypatch, interrupt_at)
    with pytest.raises(KeyboardInterrupt):
        qpeft.save_4bit_pretrained(model, tmp_path)
    monkeypatch.undo()
    for name in before:
        if (tmp_path / name).exists():
            assert (tmp_path / name).read_bytes() in (before[name], after[name]), name
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert not (tmp_path / "config.json").exists()
    with pytest.raises(FileNotFoundError, match="config.json"):
        qpeft.load_4bit_pretrained(tmp_path)
    qpeft.save_4bit_pretrained(model, tmp_path)
    assert qpeft.load_4bit_pretrained(tmp_path) is not None


def corrupt_adapter(folder, how):
    from safetensors.torch import save_file

    tensors = load_file(folder / "adapter_model.safetensors")
    key = sorted(k for k in tensors if k.endswith("lora_A.weight"))[-1]
    if how == "missing":
        del tensors[key]
    else:
        tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})


def model_state(model):
    return (
        [(n, type(m).__name__) for n, m in model.named_modules()],
        {k: v.clone() for k, v in model.state_dict().items()},
        [p.requires_grad for p in model.parameters()],
    )


def same_state(a, b):
    return a[0] == b[0] and a[2] == b[2] and set(a[1]) == set(b[1]) and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


@pytest.mark.parametrize("how", ["missing", "shape"])
def test_failed_from_pretrained_leaves_the_model_as_it_was(tmp_path, how):
    qpeft.get_peft_model(tiny_llama(), qpeft.LoraConfig(r=2, target_modules="all-linear")).save_pretrained(tmp_path)
    corrupt_adapter(tmp_path, how)
    model = tiny_llama()
    before = model_state(model)
    with pytest.raises((ValueError, KeyError)):
        qpeft.QPeftModel.from_pretrained(model, tmp_path)
    assert same_state(model_state(model), before)  # not quantized, nothing added


@pytest.mark.parametrize("how", ["missing", "shape"])
def test_failed_load_adapter_leaves_no_adapter_behind(tmp_path, how):

    good = tmp_path / "good"
    bad = tmp_path / "bad"
    source = qpeft.get_peft_model(
        tiny_llama(), qpeft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    )
    source.save_pretrained(good)
    source.save_pretrained(bad)
    corrupt_adapter(bad, how)
    model = qpeft.get_peft_model(tiny_llama(), qpeft.LoraConfig(r=4, target_modules=["q_proj"]))
    with torch.no_grad():
        y = model(tokens()).logits
    before = model_state(model)
    with pytest.raises((ValueError, KeyError)):
        model.load_adapter(bad, adapter_name="other")
    assert list(model.peft_config) == ["default"] and model.active_adapter == "default"
    assert same_state(model_state(model), before)
    with torch.no_grad():
        assert torch.equal(model(tokens()).logits, y)
    model.load_adapter(good, adapter_name="other")  # a retry with good files works
    assert set(model.peft_config) == {"default", "other"}


def _pagemap_readable() -> bool:
    try:
        with open("/proc/self/pagemap", "rb") as f:
            return len(f.read(8)) == 8
    except OSError:
        return False


def _rss_file_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile"))


@pytest.mark.skipif(not _pagemap_readable(), reason="needs Linux's /proc/self/pagemap (pages of mapped files)")
def test_released_checkpoint_pages_keep_their_values_and_a_written_page_its_writes(tmp_path):
    """release_file_pages drops a mapped file's clean pages (read from the file again when touched) and leaves a
    page written since mapping (the process's own copy) as it is."""
    n = 4 << 20  # 16 MiB of fp32
    path = tmp_path / "w.bin"
    torch.arange(n, dtype=torch.float32).numpy().tofile(path)
    t = torch.from_file(str(path), shared=False, size=n, dtype=torch.float32)  # a private mapping, as checkpoints
    assert t.sum().item() > 0  # every page read: resident
    t[100] = -1.0  # one page written: now private to the process
    before = _rss_file_kib()
    files.release_file_pages(t)
    assert before - _rss_file_kib() > (n * 4 // 1024) // 2  # most of the 16 MiB left the resident set
    expected = torch.arange(n, dtype=torch.float32)
    expected[100] = -1.0
    assert torch.equal(t, expected)
    anonymous = torch.arange(n, dtype=torch.float32)  # not a file's: left alone
    files.release_file_pages(anonymous)
    assert torch.equal(anonymous, torch.arange(n, dtype=torch.float32))


def test_get_peft_model_releases_the_checkpoint_pages_it_quantized(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "m")
    import transformers

    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    reference = {n: p.detach().clone() for n, p in loaded.named_parameters()}
    peft_model = qpeft.get_peft_model(loaded, qpeft.LoraConfig(r=2, target_modules="all-linear"))
    float_copy = qpeft.get_peft_model(model, qpeft.LoraConfig(r=2, target_modules="all-linear"))
    with torch.no_grad():  # the same bytes quantized, and the unquantized tensors intact
        torch.testing.assert_close(peft_model(tokens()).logits, float_copy(tokens()).logits, rtol=0, atol=0)
    for n, p in peft_model.get_base_model().named_parameters():
        if n in reference:
            assert torch.equal(p, reference[n]), n
