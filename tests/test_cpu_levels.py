"""Every CPU kernel level this machine supports (baseline, avx2, avx512, avx512_bf16: whichever it has) against the
references: dequantization bit for bit (the same bits at every level, NaN and infinite scales included), the
small-M linear kernels and the input gradient against float64, the slab matmul, dropout, and the QLoRA layer's
forward and backward. The `cpu_isa` fixture (conftest.py) runs each test once per level; the level detection and
its cap are checked against /proc/cpuinfo and the QPEFT_CPU_ISA variable."""

import math
import os
import subprocess
import sys

import pytest
import torch

import qpeft
from qpeft import functional as F
from qpeft import reference as R
from qpeft.nn import LoraLinear4bit

from helpers import linear_4bit, linear_4bit_grad_input, poison_allocator, rel_err, same_bytes

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def expected_level(flags: set[str]) -> str:
    if not {"avx2", "fma", "f16c"} <= flags:
        return "baseline"
    if not {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "avx2"
    return "avx512_bf16" if "avx512_bf16" in flags else "avx512"


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo") or os.uname().machine != "x86_64", reason="needs x86-64 Linux")
def test_detected_level_follows_cpuinfo():
    gcc = qpeft.build_info()["compiler"].startswith("gcc")  # the SIMD kernels' target regions need GCC
    assert F.detected_cpu_isa() == (expected_level(cpu_flags()) if gcc else "baseline")
    assert F.cpu_isa_levels() == F.CPU_ISA_LEVELS[: F.CPU_ISA_LEVELS.index(F.detected_cpu_isa()) + 1]


def test_cap_and_environment_variable():
    top = F.detected_cpu_isa()
    previous = F.set_cpu_isa("baseline")
    try:
        assert F.cpu_isa() == "baseline"
        F.set_cpu_isa("avx512_bf16")  # above the machine: the machine's own level
        assert F.cpu_isa() == top
    finally:
        F.set_cpu_isa(previous)
    with pytest.raises(ValueError, match="must be one of"):
        F.set_cpu_isa("avx9000")
    code = "import qpeft.functional as F; print(F.cpu_isa())"
    env = dict(os.environ, QPEFT_CPU_ISA="avx2")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ("avx2" if top != "baseline" else "baseline")
    env["QPEFT_CPU_ISA"] = "fast"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "QPEFT_CPU_ISA" in bad.stderr and "'fast'" in bad.stderr


def dequantize_all_levels(q: qpeft.Quantized4bitWeight, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = {}
    previous = F.cpu_isa()
    try:
        for level in F.cpu_isa_levels():
            F.set_cpu_isa(level)
            poison_allocator(torch.device("cpu"), q.numel * 4)
            out[level] = q.dequantize(dtype)
    finally:
        F.set_cpu_isa(previous)
    return out


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("double_quant", [True, False])
def test_dequantize_same_bits_at_every_level(cpu_isa, quant_type, dtype, blocksize, double_quant):
    for shape in [(37, 129), (3, 64), (1, 4097), (2 * blocksize + 5,), (1,), (0, 8)]:
        q = qpeft.Quantized4bitWeight.from_float(torch.randn(shape) * 3, quant_type, blocksize, double_quant)
        poison_allocator(torch.device("cpu"), q.numel * 4)
        out = q.dequantize(dtype)
        ref = R.dequantize_4bit(q.packed.reshape(-1), q.fp32_scales(), blocksize, quant_type, shape, dtype)
        assert out.shape == shape and same_bytes(out, ref), (shape, cpu_isa)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_special_scales_same_bits_at_every_level(dtype):
    """Scales that overflow fp16, make subnormal or zero outputs, are infinite, NaN (both signs) or negative: every
    level writes the same bits, and the reference's wherever the output is not NaN."""
    scales = torch.tensor(
        [
            1.0,
            7e4,
            1e5,
            3e38,
            math.inf,
            -math.inf,
            math.nan,
            -math.nan,
            1e-5,
            6e-8,
            1e-40,
            1e-45,
            0.0,
            -0.0,
            -2.5,
            65504.0,
            2.0**-14,
            2.0**-24,
            3e-39,
            1.5,
        ]
    )
    n = scales.numel() * 64 + 33
    packed = torch.randint(0, 256, ((n + 1) // 2,), dtype=torch.uint8)
    absmax = torch.cat([scales, torch.ones(1)])
    q = qpeft.Quantized4bitWeight(
        packed=packed, absmax=absmax, shape=torch.Size((n,)), dtype=torch.float32, blocksize=64, quant_type="nf4"
    )
    outs = dequantize_all_levels(q, dtype)
    first = outs["baseline"]
    for level, out in outs.items():
        assert same_bytes(out, first), level
    ref = R.dequantize_4bit(packed, absmax, 64, "nf4", (n,), dtype)
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(first), nan)
    assert same_bytes(first[~nan], ref[~nan])


def reference_weight(q) -> torch.Tensor:
    return R.dequantize_4bit(
        q.packed.reshape(-1), q.fp32_scales(), q.blocksize, q.quant_type, q.shape, torch.float32
    ).double()


# K: multiples of 32 (every vector path), of 16 but not 32 (no bf16 path), of 8 only (AVX2 only), odd; K = 96 and
# 48 with blocksize 64 put quantization blocks across rows of W. N = 37: tails of the W-row tiles.
@pytest.mark.parametrize("k,blocksize", [(256, 64), (4096, 4096), (96, 64), (48, 32), (40, 32), (77, 32), (128, 128)])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 9, 16])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_small_m_linear_at_every_level(cpu_isa, k, blocksize, m, dtype, tol):
    quant_type = "fp4" if m % 2 else "nf4"
    q = qpeft.Quantized4bitWeight.from_float(torch.randn(37, k), quant_type, blocksize, double_quant=m < 8)
    W = reference_weight(q)
    x = torch.randn(k, m).to(dtype).T  # non-contiguous rows
    poison_allocator(torch.device("cpu"), m * 37 * 4)
    y = linear_4bit(x, q)
    ref = x.double() @ W.T
    assert y.shape == (m, 37) and y.dtype == dtype and rel_err(y, ref) < tol, cpu_isa
    dy = torch.randn(m, 37).to(dtype)
    poison_allocator(torch.device("cpu"), m * k * 4)
    dx = linear_4bit_grad_input(dy, q)
    assert dx.shape == (m, k) and dx.dtype == dtype and rel_err(dx, dy.double() @ W) < tol, cpu_isa


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_slab_matmul_at_every_level(cpu_isa, dtype, tol):
    k, n, m = 1037, 300, 40  # above the small-M switch; rows of W start mid-block, mid-byte
    q = qpeft.Quantized4bitWeight.from_float(torch.randn(n, k, dtype=dtype), "nf4", 64, double_quant=True)
    W = reference_weight(q)
    x = torch.randn(m, k, dtype=dtype)
    y = linear_4bit(x, q)
    assert torch.isfinite(y).all() and rel_err(y, x.double() @ W.T) < tol
    dy = torch.randn(m, n, dtype=dtype)
    assert rel_err(linear_4bit_grad_input(dy, q), dy.double() @ W) < tol


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_same_bits_at_every_level(cpu_isa, dtype):
    x = torch.randn(33, 1031).to(dtype)
    seed, offset = 987654321, 12345
    assert torch.equal(F.lora_dropout(x, 0.3, seed, offset), R.lora_dropout(x, 0.3, seed, offset))
    assert torch.equal(F.lora_dropout(x, 0.0, seed), x)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2), (torch.float16, 4e-3)])
@pytest.mark.parametrize("rows", [3, 40])  # the codes kernels; slabs
def test_qlora_layer_at_every_level(cpu_isa, dtype, tol, rows):
    k, n, p, seed = 128, 96, 0.1, 77
    torch.manual_seed(0)
    layer = LoraLinear4bit.from_linear(torch.nn.Linear(k, n, dtype=dtype), r=8, alpha=16, dropout=p).train()
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    x = torch.randn(rows, k, dtype=dtype, requires_grad=True)
    y = layer(x, dropout_seed=seed)
    grad = torch.randn_like(y)
    y.backward(grad)

    def leaf(t):
        return t.detach().double().requires_grad_(True)

    x_ref, A_ref, B_ref = leaf(x), leaf(layer.lora_A), leaf(layer.lora_B)
    W = layer.base.dequantized_weight(torch.float32).double()
    y_ref = R.lora_linear(
        x_ref,
        W,
        A_ref,
        B_ref,
        layer.scaling,
        bias=layer.base.bias.detach().double(),
        keep_mask=R.dropout_keep_mask(x.shape, p, seed),
        p=p,
    )
    y_ref.backward(grad.double())
    assert rel_err(y, y_ref) < tol
    assert rel_err(x.grad, x_ref.grad) < tol
    assert rel_err(layer.lora_A.grad, A_ref.grad) < tol
    assert rel_err(layer.lora_B.grad, B_ref.grad) < tol


def test_linear_path_names_the_kernel_of_the_level(cpu_isa):
    """cpu_linear_4bit_path (what benchmarks record) follows the level and the shape rules of the kernels."""
    path = F.cpu_linear_4bit_path
    assert path(1, 4096, torch.bfloat16) == f"codes:{cpu_isa}"
    assert path(16, 4096, torch.float32) == "codes:" + ("avx512" if cpu_isa == "avx512_bf16" else cpu_isa)
    assert path(1, 48, torch.bfloat16) == "codes:" + ("avx512" if cpu_isa == "avx512_bf16" else cpu_isa)
    assert path(1, 40, torch.float32) == "codes:" + ("baseline" if cpu_isa == "baseline" else "avx2")
    assert path(1, 77, torch.bfloat16) == "codes:baseline"
    assert path(17, 4096, torch.bfloat16) == f"slabs:{cpu_isa}+aten_gemm"


def test_import_refuses_another_torch_series(monkeypatch):
    """An installed qpeft requires the torch major.minor it was built against (its metadata's pin and
    build_info()["torch"]); import says which when another is installed."""
    import torch

    built = qpeft.build_info()["torch"].split("+")[0]
    assert built.split(".")[:2] == torch.__version__.split("+")[0].split(".")[:2]
    required = qpeft._ops._required_torch()
    if required is None:
        pytest.skip("qpeft is not installed (run from a source tree): no metadata pin to check")
    assert required == ".".join(built.split(".")[:2])
    monkeypatch.setattr(torch, "__version__", "2.99.0+cpu")
    with pytest.raises(ImportError, match=rf"built against torch {required}\.x, but torch 2\.99\.0"):
        qpeft._ops._check_torch_version()
