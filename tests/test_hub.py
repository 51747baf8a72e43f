"""Adapters and 4-bit checkpoints named by a Hugging Face Hub repository id: resolved through
huggingface_hub.snapshot_download (replaced here by a fake serving local folders: the tests run offline) with
only the safetensors / JSON files qpeft reads requested; local folders are used as they are."""

import copy

import pytest
import torch

import qpeft
from qpeft import hub

from helpers import randomize_adapters, rel_err, tiny_llama, tokens

huggingface_hub = pytest.importorskip("huggingface_hub")


class FakeHub:
    """snapshot_download stand-in: records its calls and answers with the folder registered for the repo id."""

    def __init__(self, repos):
        self.repos, self.calls = repos, []

    def __call__(self, repo_id, **kwargs):
        self.calls.append((repo_id, kwargs))
        if repo_id not in self.repos:
            raise OSError(f"404 Client Error: Repository Not Found for {repo_id}")
        return str(self.repos[repo_id])


@pytest.fixture
def adapter_repo(tmp_path):
    original = tiny_llama()
    model = qpeft.get_peft_model(copy.deepcopy(original), qpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model)
    model.save_pretrained(tmp_path / "snapshot" / "adapters" / "chat")
    with torch.no_grad():
        expected = model(tokens()).logits
    return original, tmp_path / "snapshot", expected


def test_adapter_from_a_hub_repository_id(monkeypatch, adapter_repo):
    original, snapshot, expected = adapter_repo
    fake = FakeHub({"someone/llama-adapters": snapshot})
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    loaded = qpeft.QPeftModel.from_pretrained(
        copy.deepcopy(original), "someone/llama-adapters", subfolder="adapters/chat", revision="v1"
    )
    with torch.no_grad():
        assert rel_err(loaded(tokens()).logits, expected) < 1e-6
    ((repo_id, kwargs),) = fake.calls
    assert repo_id == "someone/llama-adapters" and kwargs["revision"] == "v1"
    assert kwargs["allow_patterns"] == ["adapters/chat/adapter_config.json", "adapters/chat/adapter_model.safetensors"]

    loaded.load_adapter("someone/llama-adapters", "again", subfolder="adapters/chat")  # load_adapter too
    assert "again" in loaded.peft_config and len(fake.calls) == 2


def test_local_folders_never_ask_the_hub(monkeypatch, adapter_repo):
    original, snapshot, expected = adapter_repo
    fake = FakeHub({})
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    loaded = qpeft.QPeftModel.from_pretrained(copy.deepcopy(original), snapshot, subfolder="adapters/chat")
    with torch.no_grad():
        assert rel_err(loaded(tokens()).logits, expected) < 1e-6
    assert fake.calls == []


def test_unknown_names_raise_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", FakeHub({}))
    with pytest.raises(FileNotFoundError, match="nobody/nothing is not a local folder.*Repository Not Found"):
        qpeft.QPeftModel.from_pretrained(tiny_llama(), "nobody/nothing")
    with pytest.raises(FileNotFoundError, match="not a local folder"):
        qpeft.load_4bit_pretrained("nobody/nothing")


def test_4bit_checkpoint_from_a_hub_repository_id(monkeypatch, tmp_path):
    model = qpeft.get_peft_model(tiny_llama(), qpeft.LoraConfig(r=4, target_modules="all-linear"))
    qpeft.save_4bit_pretrained(model, tmp_path / "ckpt")
    fake = FakeHub({"someone/llama-nf4": tmp_path / "ckpt"})
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    loaded = qpeft.load_4bit_pretrained("someone/llama-nf4")
    with torch.no_grad(), model.disable_adapter():
        assert rel_err(loaded(tokens()).logits, model(tokens()).logits) < 1e-6
    ((_, kwargs),) = fake.calls
    assert set(kwargs["allow_patterns"]) == set(hub.CHECKPOINT_FILES)  # safetensors + JSON: never a pickle file
