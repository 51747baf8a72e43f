"""Builds the CUDA kernels of csrc/kernels/cuda for the CPU under the host emulator (cuda_host_emulation.h), with
their launchers bound to Python (bindings.cpp), as a JIT torch extension. Needs the CUDA toolkit's headers (for the
vector and 16-bit float types; nothing is linked from the toolkit) and a C++ compiler, no GPU and no CUDA torch.

Emulated: dequantize_4bit, dropout, linear_4bit, lora_branch, lora_branch_mma. Not: quantize_4bit and
blockwise_8bit (their rcp.approx.ftz reciprocal is a GPU-measured function the emulator does not model).
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
EMULATED_KERNELS = ("dequantize_4bit", "dropout", "linear_4bit", "lora_branch", "lora_branch_mma")


def cuda_include_dir() -> Path | None:
    """The CUDA toolkit's include folder ($CUDA_HOME, $CUDA_PATH, /usr/local/cuda, /usr/local/cuda-*), or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_runtime.h").is_file():
            return Path(c) / "include"
    return None


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def load_emulated_kernels(verbose: bool = False):
    """The compiled extension module (built once into build/cuda_emulation; rebuilt when a source changes)."""
    from torch.utils.cpp_extension import load

    include = cuda_include_dir()
    if include is None:
        raise FileNotFoundError("the CUDA toolkit's headers (cuda_runtime.h) were not found; set CUDA_HOME")
    build_dir = ROOT / "build" / "cuda_emulation"
    build_dir.mkdir(parents=True, exist_ok=True)
    sources = [str(HERE / "emulator.cpp"), str(HERE / "bindings.cpp"), str(HERE / "selftest_kernels.cpp")]
    for name in EMULATED_KERNELS:
        # One translation unit per kernel file, as nvcc compiles them (each has its own anonymous namespace).
        wrapper = build_dir / f"emulated_{name}.cpp"
        _write_if_changed(
            wrapper,
            f'#include "{HERE / "cuda_host_emulation.h"}"\n'
            f'#include "{ROOT / "csrc" / "kernels" / "cuda" / (name + ".cu")}"\n',
        )
        sources.append(str(wrapper))
    return load(
        name="qpeft_cuda_emulation",
        sources=sources,
        build_directory=str(build_dir),
        extra_cflags=["-O1", "-ffp-contract=off"],
        extra_include_paths=[str(include)],
        verbose=verbose,
    )
