"""How qpeft writes files: atomically (a temporary file in the same folder, flushed, then renamed over the target,
so an interrupted save leaves the previous file or none, never a partial one) and only inside the folder it was
given (names from configs or users never lead elsewhere; a symbolic link in the way is refused, not followed)."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

from .errors import ConfigError

ADAPTER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]{0,127}")


def check_adapter_name(name) -> str:
    """Adapter names are 1-128 letters, digits, '_' or '-' (not starting with '-'): they become module keys and
    the names of subfolders of a save directory."""
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
        raise ConfigError(None, "adapter name", f"must be 1-128 letters, digits, '_' or '-', got {name!r}")
    return name


def folder_inside(root: str | Path, *parts: str) -> Path:
    """root / parts (names checked by check_adapter_name), created; a symbolic link among parts is refused, and
    the result never resolves outside root."""
    root = folder = Path(root)
    for part in parts:
        folder = folder / part
        if folder.is_symlink():
            raise ValueError(f"qpeft: {folder} is a symbolic link; qpeft does not write through links")
    if parts and not folder.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"qpeft: {folder} is outside {root}")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


MAX_JSON_BYTES = 16 << 20  # config and index files are kilobytes; a larger one is refused unread


def read_json_file(path: Path, key: str):
    """A config / index JSON file of at most MAX_JSON_BYTES, parsed; ConfigError naming the file otherwise."""
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise ConfigError(str(path), key, f"is {size} bytes; config files of over {MAX_JSON_BYTES} are refused")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ConfigError(str(path), key, f"is not valid JSON ({type(e).__name__})") from None


def write_atomic(path: Path, data: bytes) -> None:
    """path's content becomes ``data`` all at once (temporary file + fsync + rename); a symbolic link at path is
    replaced, never followed."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with_suppressed(os.unlink, tmp)
        raise


def with_suppressed(fn, *args) -> None:
    try:
        fn(*args)
    except OSError:
        pass


def write_json_atomic(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode("utf-8"))


def write_safetensors_atomic(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    write_atomic(path, safetensors_bytes(tensors, metadata={"format": "pt"}))
