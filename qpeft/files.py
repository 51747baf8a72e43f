"""How qpeft writes files: atomically (a temporary file in the same folder, flushed, then renamed over the target,
so an interrupted save leaves the previous file or none, never a partial one) and only inside the folder it was
given (names from configs or users never lead elsewhere; a symbolic link in the way is refused, not followed)."""

from __future__ import annotations

import ctypes
import functools
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
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


# ---- pages of memory-mapped files ------------------------------------------------------------------------------
_MADV_DONTNEED = 4
# a /proc/self/pagemap entry's bits 63 (the page is resident) and 61 (it is a file's page, not a private copy)
_PAGEMAP_PRESENT_FILE = np.uint64((1 << 63) | (1 << 61))
_libc = functools.cache(lambda: ctypes.CDLL(None, use_errno=True))


def release_file_pages(t: torch.Tensor) -> None:
    """Drops from this process's resident set the pages wholly inside ``t`` that are unmodified pages of a
    memory-mapped file (a checkpoint tensor transformers mapped and a quantization has read: they would otherwise
    stay resident while the file stays mapped). Such a page is read from the file again if touched, so ``t`` keeps
    its values; a page written since it was mapped (now the process's own copy), anonymous memory, CUDA tensors
    and other systems are left alone."""
    if sys.platform != "linux" or t.device.type != "cpu" or t.numel() == 0 or not t.is_contiguous():
        return
    page = os.sysconf("SC_PAGE_SIZE")
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    first, last = -(-start // page) * page, end // page * page
    if last <= first or not _in_file_mapping(first, last):
        return
    try:
        with open("/proc/self/pagemap", "rb") as f:
            f.seek(first // page * 8)
            entries = f.read((last - first) // page * 8)
    except OSError:
        return
    flags = np.frombuffer(entries, dtype=np.uint64)
    for lo, hi in _runs(((flags & _PAGEMAP_PRESENT_FILE) == _PAGEMAP_PRESENT_FILE).tolist()):
        _libc().madvise(ctypes.c_void_p(first + lo * page), ctypes.c_size_t((hi - lo) * page), _MADV_DONTNEED)


def _in_file_mapping(first: int, last: int) -> bool:
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if low <= first and last <= high:
                return len(fields) >= 6 and fields[5].startswith("/")  # a file's pages, not anonymous memory
    return False


def _runs(flags: list[bool]) -> list[tuple[int, int]]:
    """[start, stop) of each run of True."""
    runs, begin = [], None
    for i, f in enumerate([*flags, False]):
        if f and begin is None:
            begin = i
        elif not f and begin is not None:
            runs.append((begin, i))
            begin = None
    return runs
