"""The torch-free CPU kernels built with AddressSanitizer + UndefinedBehaviorSanitizer and run at every
instruction-set level this machine has (tests/sanitize/kernel_checks.cpp): an out-of-bounds access, a use of
uninitialized-size arithmetic that overflows, or a level that disagrees with the baseline fails the test."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from qpeft import reference as R

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "csrc" / "kernels"


def test_cpu_kernels_under_asan_and_ubsan(tmp_path):
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        pytest.skip("no C++ compiler on this machine (not run: this is not a pass)")
    exe = tmp_path / "kernel_checks"
    sources = [str(ROOT / "tests" / "sanitize" / "kernel_checks.cpp")] + sorted(
        str(p) for p in (KERNELS / "cpu").glob("*.cpp")
    )
    flags = [
        "-std=c++20",
        "-O1",
        "-g",
        "-fno-omit-frame-pointer",
        "-fsanitize=address,undefined",
        "-fno-sanitize-recover=all",
        "-ffp-contract=off",
        "-fno-fast-math",
        "-fno-trapping-math",
        f"-I{KERNELS}",
    ]
    build = subprocess.run([compiler, *flags, *sources, "-o", str(exe)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-4000:]
    table = tmp_path / "rcp_table.bin"
    table.write_bytes(R.reciprocal_table_bytes())
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0", UBSAN_OPTIONS="print_stacktrace=1")
    env.pop("LD_PRELOAD", None)
    run = subprocess.run([str(exe), str(table)], capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, (run.stdout + run.stderr)[-6000:]
    assert run.stdout.startswith("ok: 0 failures"), run.stdout
