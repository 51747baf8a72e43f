"""The 4-bit linear ops against float64 x @ W_ref^T: the small-M kernels (W read once from its codes) and, on the
CPU above 16 rows, the slab-wise dequantize + GEMM (no dense W)."""

import pytest
import torch
from torch.library import opcheck

import qpeft
from qpeft import functional as F
from qpeft import reference as R

from helpers import linear_4bit, linear_4bit_grad_input, poison_allocator


def reference_linear(x, q):
    scales = (
        R.dequantize_nested_absmax(q.absmax, q.nested_absmax, q.nested_code, q.nested_offset)
        if q.double_quant
        else q.absmax
    )
    W = R.dequantize_4bit(q.packed, scales, q.blocksize, q.quant_type, q.shape, torch.float32).double()
    return x.double() @ W.T


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("k,blocksize", [(256, 64), (100, 64), (77, 32), (4096, 4096), (333, 128)])
@pytest.mark.parametrize("m", [1, 3, 16])
def test_matches_reference(quant_type, double_quant, k, blocksize, m):
    q = qpeft.Quantized4bitWeight.from_float(torch.randn(37, k), quant_type, blocksize, double_quant)
    x = torch.randn(m, k)
    y = linear_4bit(x, q)
    ref = reference_linear(x, q)
    assert y.shape == (m, 37) and y.dtype == torch.float32
    assert ((y.double() - ref).norm() / ref.norm()) < 1e-6


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_16bit_inputs_and_3d(dtype, tol):
    q = qpeft.Quantized4bitWeight.from_float(torch.randn(64, 192, dtype=dtype))
    x = torch.randn(2, 3, 192, dtype=dtype)
    y = linear_4bit(x, q)
    assert y.shape == (2, 3, 64) and y.dtype == dtype
    ref = reference_linear(x.reshape(-1, 192), q).reshape(2, 3, 64)
    assert ((y.double() - ref).norm() / ref.norm()) < tol


def test_opcheck_and_bad_inputs():
    q = qpeft.Quantized4bitWeight.from_float(torch.randn(16, 64))
    x = torch.randn(2, 64)
    opcheck(
        torch.ops.qpeft.linear_4bit,
        (x, q.packed.reshape(-1), q.absmax, q.nested_absmax, q.nested_code, q.nested_offset.reshape(1), 64, "nf4", 16),
    )
    plain = qpeft.Quantized4bitWeight.from_float(torch.randn(16, 64), double_quant=False)
    opcheck(torch.ops.qpeft.linear_4bit, (x, plain.packed.reshape(-1), plain.absmax, None, None, None, 64, "fp4", 16))
    with pytest.raises(ValueError, match=r"\[M, K\]"):
        torch.ops.qpeft.linear_4bit(
            torch.randn(64), plain.packed.reshape(-1), plain.absmax, None, None, None, 64, "nf4", 16
        )
    with pytest.raises(ValueError, match="packed"):  # K does not match the weight
        torch.ops.qpeft.linear_4bit(
            torch.randn(2, 65), plain.packed.reshape(-1), plain.absmax, None, None, None, 64, "nf4", 16
        )
    with pytest.raises(ValueError, match="go together"):
        torch.ops.qpeft.linear_4bit(x, q.packed.reshape(-1), q.absmax, q.nested_absmax, None, None, 64, "nf4", 16)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("k,blocksize", [(256, 64), (100, 64), (77, 32), (136, 128)])
@pytest.mark.parametrize("m", [1, 5, 8, 16])  # 8: the codes kernel's limit in the input gradient; 16: slabs
def test_grad_input_matches_reference(quant_type, double_quant, k, blocksize, m):
    q = qpeft.Quantized4bitWeight.from_float(torch.randn(45, k), quant_type, blocksize, double_quant)
    dy = torch.randn(m, 45)
    dx = linear_4bit_grad_input(dy, q)
    scales = (
        R.dequantize_nested_absmax(q.absmax, q.nested_absmax, q.nested_code, q.nested_offset)
        if q.double_quant
        else q.absmax
    )
    W = R.dequantize_4bit(q.packed, scales, q.blocksize, q.quant_type, q.shape, torch.float32).double()
    ref = dy.double() @ W
    assert dx.shape == (m, k) and ((dx.double() - ref).norm() / ref.norm()) < 1e-6


def test_grad_input_opcheck():
    q = qpeft.Quantized4bitWeight.from_float(torch.randn(16, 64))
    opcheck(
        torch.ops.qpeft.linear_4bit_grad_input,
        (
            torch.randn(2, 16),
            q.packed.reshape(-1),
            q.absmax,
            q.nested_absmax,
            q.nested_code,
            q.nested_offset.reshape(1),
            64,
            "nf4",
            64,
        ),
    )


def reference_weight(q):
    scales = (
        R.dequantize_nested_absmax(q.absmax, q.nested_absmax, q.nested_code, q.nested_offset)
        if q.double_quant
        else q.absmax
    )
    return R.dequantize_4bit(q.packed, scales, q.blocksize, q.quant_type, q.shape, torch.float32).double()


# Shapes whose slab loops run several times with a short last slab: ~2 MB slabs are 128 rows of W at K = 4109
# (fp32; 256 in 16-bit) in the forward, and 1728 (fp32) columns at N = 300 in the input gradient. K is not a
# multiple of the blocksize, so quantization blocks straddle rows of W and slab edges.
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("m", [17, 70])  # above the small-M switch (16 rows)
@pytest.mark.parametrize("double_quant", [True, False])
def test_cpu_slab_matmul_matches_reference(dtype, tol, m, double_quant):
    n = 300 if dtype == torch.float32 else 600
    k = 4109
    q = qpeft.Quantized4bitWeight.from_float(torch.randn(n, k, dtype=dtype), "nf4", 64, double_quant)
    W = reference_weight(q)
    x = torch.randn(k, m, dtype=dtype).T  # non-contiguous rows
    poison_allocator(torch.device("cpu"), m * n * x.element_size())
    y = linear_4bit(x, q)
    assert y.shape == (m, n) and y.dtype == dtype and torch.isfinite(y).all()
    ref = x.double() @ W.T
    assert ((y.double() - ref).norm() / ref.norm()) < tol
    dy = torch.randn(m, n, dtype=dtype)
    poison_allocator(torch.device("cpu"), m * k * x.element_size())
    dx = linear_4bit_grad_input(dy, q)
    assert dx.shape == (m, k) and dx.dtype == dtype and torch.isfinite(dx).all()
    ref = dy.double() @ W
    assert ((dx.double() - ref).norm() / ref.norm()) < tol


@pytest.mark.parametrize("m,n,k", [(0, 5, 64), (12, 0, 64), (12, 5, 0)])
def test_cpu_slab_matmul_empty_shapes(m, n, k):
    q = qpeft.Quantized4bitWeight.from_float(torch.randn(n, k))
    poison_allocator(torch.device("cpu"), max(m * max(n, k) * 4, 1))
    assert torch.equal(linear_4bit(torch.randn(m, k), q), torch.zeros(m, n))
    assert torch.equal(linear_4bit_grad_input(torch.randn(m, n), q), torch.zeros(m, k))


def test_cpu_slab_matmul_opcheck():
    q = qpeft.Quantized4bitWeight.from_float(torch.randn(24, 100))
    args = (q.packed.reshape(-1), q.absmax, q.nested_absmax, q.nested_code, q.nested_offset.reshape(1), 64, "nf4")
    opcheck(torch.ops.qpeft.linear_4bit, (torch.randn(20, 100), *args, 24))
    opcheck(torch.ops.qpeft.linear_4bit_grad_input, (torch.randn(20, 24), *args, 100))


def largest_cpu_allocation(fn) -> int:
    """Bytes of the largest single CPU allocation made while fn() runs (torch.profiler's memory events)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(
        (e.cpu_memory_usage for e in prof.events() if e.name in ("aten::empty", "aten::empty_strided")), default=0
    )


def test_cpu_training_sizes_never_allocate_a_dense_weight():
    """The memory contract of the CPU path above 16 rows: the forward and backward of the frozen base and of the
    QLoRA layer (plain LoRA and DoRA, whose weight norm uses cached row norms of W) allocate slabs of ~2 MB,
    never the dense N x K weight (32 MB here)."""
    from qpeft.nn import Linear4bit, LoraLinear4bit

    n, k, m = 2048, 4096, 64
    dense_bytes = n * k * 4
    q = qpeft.Quantized4bitWeight.from_float(torch.randn(n, k))
    x = torch.randn(m, k)
    assert largest_cpu_allocation(lambda: linear_4bit(x, q)) < dense_bytes / 8
    assert largest_cpu_allocation(lambda: linear_4bit_grad_input(torch.randn(m, n), q)) < dense_bytes / 8
    base = Linear4bit.from_linear(torch.nn.Linear(k, n, bias=False))
    layer = LoraLinear4bit(base, r=8, alpha=16, dropout=0.1).train()
    xg = x.clone().requires_grad_(True)
    assert largest_cpu_allocation(lambda: layer(xg).sum().backward()) < dense_bytes / 8
    assert largest_cpu_allocation(lambda: base(xg).sum().backward()) < dense_bytes / 8
    dora = LoraLinear4bit(base, r=8, alpha=16, dropout=0.1, use_dora=True).train()  # row norms of W cached here
    assert largest_cpu_allocation(lambda: dora(xg).sum().backward()) < dense_bytes / 8
    assert largest_cpu_allocation(lambda: q.dequantize(torch.float32)) == dense_bytes  # the probe sees it


def test_every_op_rejects_overflowing_sizes():
    """Sizes whose element counts wrap int64 (or exceed 2^60) are refused with a ValueError before any kernel runs
    (they used to pass the numel checks and read past the buffers)."""
    packed, absmax = torch.zeros(128, dtype=torch.uint8), torch.ones(4)
    x0 = torch.empty(0, 4)
    huge = [2**62 + 64, 2**61, 2**60 + 1]
    for n in huge:
        with pytest.raises(ValueError, match="too large"):
            torch.ops.qpeft.linear_4bit(x0, packed, absmax, None, None, None, 64, "nf4", n)
        with pytest.raises(ValueError, match="too large"):
            torch.ops.qpeft.linear_4bit_grad_input(torch.empty(0, 4), packed, absmax, None, None, None, 64, "nf4", n)
        with pytest.raises(ValueError, match="too large"):
            F.linear_4bit(x0, packed, absmax, 64, "nf4", n)
    q = qpeft.Quantized4bitWeight.from_float(torch.randn(16, 64))
    nested = (q.absmax, q.nested_absmax, q.nested_code, q.nested_offset.reshape(1))
    for shape in ([2**32, 2**32], [2**31, 2**31, 4], [2**62, 2, 2], [3, 2**62]):
        with pytest.raises(ValueError, match="too large"):
            torch.ops.qpeft.dequantize_4bit(packed, absmax, None, None, None, 64, "nf4", shape, torch.float32)
        with pytest.raises(ValueError, match="too large"):
            torch.ops.qpeft.dequantize_4bit(q.packed.reshape(-1), *nested, 64, "nf4", shape, torch.float32)
    A = torch.zeros(1, 4)
    B = torch.zeros(1, 1).expand(2**60, 1)  # a huge N without memory (stride 0): N x K = 2^62
    with pytest.raises(ValueError, match="too large"):
        torch.ops.qpeft.qlora_forward(
            torch.zeros(1, 4),
            packed,
            absmax,
            None,
            None,
            None,
            64,
            "nf4",
            A,
            B,
            None,
            1.0,
            0.0,
            torch.zeros(1, dtype=torch.int64),
        )


def test_zero_dim_inputs_raise_value_errors():
    from qpeft.nn import Linear4bit, LoraLinear4bit

    q = qpeft.Quantized4bitWeight.from_float(torch.randn(4, 64))
    for fn in (
        lambda x: linear_4bit(x, q),
        lambda x: linear_4bit_grad_input(x, q),
        Linear4bit.from_linear(torch.nn.Linear(64, 4)),
        LoraLinear4bit.from_linear(torch.nn.Linear(64, 4)),
    ):
        with pytest.raises(ValueError, match="0-dim|last dimension"):
            fn(torch.tensor(1.0))


def test_raw_quantize_ops_refuse_non_finite_values():
    """The ops themselves (not only qpeft.functional) refuse inf / NaN, which have no code."""
    for bad in (float("nan"), float("inf"), -float("inf")):
        A = torch.tensor([1.0, bad, 0.5])
        with pytest.raises(ValueError, match="inf or NaN"):
            torch.ops.qpeft.quantize_4bit(A, 64, "nf4")
        with pytest.raises(ValueError, match="inf or NaN"):
            torch.ops.qpeft.quantize_blockwise_8bit(A, F.dynamic_map_8bit(), 256)
