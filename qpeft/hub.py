"""Where a model or adapter named by the user lives: a local folder as given, or a Hugging Face Hub repository id
fetched (only the safetensors and JSON files qpeft reads) into the Hub's local cache, as peft and transformers
resolve their ``from_pretrained`` names. Pickle files are never downloaded."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
CHECKPOINT_FILES = ("config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json")


def resolve_folder(
    model_id: str | Path,
    files: Sequence[str],
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
) -> Path:
    """The local folder holding ``files`` (names or glob patterns) for ``model_id``: the folder itself when it
    exists on disk, else a snapshot of the Hub repository ``model_id`` (at ``revision``) with just those files,
    downloaded on first use and read from the Hub cache afterwards (offline too, with HF_HUB_OFFLINE=1).
    ``subfolder``: the files' folder inside the repository or local folder."""
    local = Path(model_id)
    if local.is_dir():
        return local / subfolder if subfolder else local
    try:
        import huggingface_hub
    except ImportError as e:  # transformers brings it; without it only local folders work
        raise FileNotFoundError(
            f"qpeft: {model_id} is not a local folder, and huggingface_hub (needed to fetch it "
            f"from the Hub) is not installed"
        ) from e
    patterns = [f"{subfolder}/{f}" for f in files] if subfolder else list(files)
    try:
        snapshot = huggingface_hub.snapshot_download(
            str(model_id), revision=revision, allow_patterns=patterns, token=token, library_name="qpeft"
        )
    except Exception as e:  # no such repo, no network and not cached, bad revision, gated, ...
        raise FileNotFoundError(
            f"qpeft: {model_id} is not a local folder and could not be fetched from the Hugging "
            f"Face Hub ({type(e).__name__}: {e})"
        ) from e
    folder = Path(snapshot)
    return folder / subfolder if subfolder else folder
