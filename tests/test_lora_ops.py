"""The LoRA-branch ops (dropout inside the kernels) and the fused QLoRA layer ops against float64 references:
lora_down, lora_down_grad_weight, lora_down_grad_input(_), qlora_forward, qlora_backward. Odd shapes, 16-bit
inputs, non-contiguous inputs, poisoned allocations, bad input, opcheck."""

import pytest
import torch
from torch.library import opcheck

import qpeft
from qpeft import functional as F
from qpeft.autograd import weight_args

from helpers import dropped64, linear_4bit, linear_4bit_grad_input, poison_allocator, rel_err

ops = torch.ops.qpeft


def seed_tensor(seed, device):
    return torch.tensor([seed], dtype=torch.int64, device=device)


TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
SHAPES = [(1, 64, 8), (37, 100, 16), (300, 33, 5), (3, 1, 4)]  # (M, K, r): M = 1, odd K, r not a multiple of 8


@pytest.mark.parametrize("m,k,r", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_lora_down_and_gradients_match_reference(device, m, k, r, dtype, p):
    seed = int(torch.randint(-(2**62), 2**62, ()))
    x = torch.randn(m, k, device=device).to(dtype)
    A = torch.randn(r, k, device=device)
    g = torch.randn(m, r, device=device)
    x_drop = dropped64(x, p, seed)
    poison_allocator(device, m * r * 4)
    xa = F.lora_down(x, A, p, seed)
    assert xa.shape == (m, r) and xa.dtype == dtype
    assert rel_err(xa, x_drop @ A.double().T) < TOL[dtype]
    poison_allocator(device, r * k * 4)
    dA = F.lora_down_grad_weight(g, x, p, seed)
    assert dA.shape == (r, k) and dA.dtype == torch.float32
    # fp32 accumulation of exact 16-bit inputs, or bf16 GEMMs on CPUs with bf16 dot products (bf16 x)
    bf16_gemm = device.type == "cpu" and dtype == torch.bfloat16 and F.cpu_isa() == "avx512_bf16"
    assert rel_err(dA, g.double().T @ x_drop) < (1e-2 if bf16_gemm else 1e-5)
    acc = torch.randn(m, k, device=device).to(dtype)
    expected = acc.double() + dropped64(g.double() @ A.double(), p, seed)
    out = F.lora_down_grad_input_(acc.clone(), g, A, p, seed)
    assert out.dtype == dtype and rel_err(out, expected) < TOL[dtype]
    poison_allocator(device, m * k * 4)
    written = F.lora_down_grad_input(g, A, p, seed, dtype)  # the out-of-place form: nothing read from dx
    assert written.shape == (m, k) and written.dtype == dtype and written.is_contiguous()
    assert rel_err(written, dropped64(g.double() @ A.double(), p, seed)) < TOL[dtype]


def test_lora_down_zero_rows_and_noncontiguous(device):
    A = torch.randn(4, 24, device=device)
    assert F.lora_down(torch.randn(0, 24, device=device), A, 0.2, 1).shape == (0, 4)
    empty = F.lora_down_grad_weight(torch.randn(0, 4, device=device), torch.randn(0, 24, device=device), 0.2, 1)
    assert empty.eq(0).all()
    x = torch.randn(24, 10, device=device).T  # [10, 24], not contiguous
    assert torch.allclose(F.lora_down(x, A, 0.2, 7), F.lora_down(x.contiguous(), A, 0.2, 7))
    g = torch.randn(4, 10, device=device).T  # [10, 4], not contiguous
    assert torch.allclose(F.lora_down_grad_weight(g, x, 0.2, 7), F.lora_down_grad_weight(g.contiguous(), x, 0.2, 7))
    assert torch.equal(F.lora_down_grad_input(g, A, 0.2, 7), F.lora_down_grad_input(g.contiguous(), A, 0.2, 7))
    assert F.lora_down_grad_input(torch.randn(0, 4, device=device), A, 0.2, 1, torch.bfloat16).shape == (0, 24)
    assert F.lora_down_grad_input(torch.randn(3, 0, device=device), A[:0], 0.2, 1).eq(0).all()  # r = 0: zeros


def test_ops_take_parameters_that_require_grad(device):
    """The ops are kernels: an adapter weight that requires grad must not break their inner matmuls."""
    x, A = torch.randn(3, 16, device=device), torch.randn(2, 16, device=device, requires_grad=True)
    s = seed_tensor(1, device)
    xa = ops.lora_down(x, A, 0.5, s)
    assert torch.allclose(xa, dropped64(x, 0.5, 1).float() @ A.detach().T, atol=1e-5)
    ops.lora_down_grad_input_(torch.zeros(3, 16, device=device), torch.randn(3, 2, device=device), A, 0.5, s)
    q, x, A, B, b = make_case(device, 20, 64, 16, 4, torch.float32)
    ops.qlora_forward(x, *weight_args(q), A.requires_grad_(), B.requires_grad_(), b, 1.0, 0.5, s)


def test_lora_ops_bad_inputs(device):
    x, A, s = torch.randn(4, 8, device=device), torch.randn(2, 8, device=device), seed_tensor(0, device)
    with pytest.raises(ValueError, match=r"lora_A must have shape \[r, 8\]"):
        ops.lora_down(x, torch.randn(2, 9, device=device), 0.1, s)
    with pytest.raises(ValueError, match=r"\[rows, features\]"):
        ops.lora_down(x.reshape(-1), A, 0.1, s)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        ops.lora_down(x.double(), A, 0.1, s)
    with pytest.raises(ValueError, match=r"\[0, 0.999\]"):
        ops.lora_down(x, A, 1.0, s)
    with pytest.raises(ValueError, match="rows"):
        ops.lora_down_grad_weight(torch.randn(3, 2, device=device), x, 0.1, s)
    with pytest.raises(ValueError, match="contiguous"):
        ops.lora_down_grad_input_(torch.randn(8, 4, device=device).T, torch.randn(4, 2, device=device), A, 0.1, s)
    with pytest.raises(ValueError, match="g must have shape"):
        ops.lora_down_grad_input_(x.clone(), torch.randn(4, 3, device=device), A, 0.1, s)
    with pytest.raises(ValueError, match=r"g must have shape \[rows, r\]"):
        ops.lora_down_grad_input(torch.randn(4, device=device), A, 0.1, s, torch.float32)
    with pytest.raises(ValueError, match=r"lora_A must have shape \[3, in_features\]"):
        ops.lora_down_grad_input(torch.randn(4, 3, device=device), A, 0.1, s, torch.float32)
    with pytest.raises(TypeError, match="dtype of lora_down_grad_input"):
        ops.lora_down_grad_input(torch.randn(4, 2, device=device), A, 0.1, s, torch.float64)
    with pytest.raises(ValueError, match=r"\[0, 0.999\]"):
        F.lora_down_grad_input(torch.randn(4, 2, device=device), A, 1.5, 0)


def test_lora_ops_opcheck(device):
    x, A, s = torch.randn(5, 24, device=device), torch.randn(3, 24, device=device), seed_tensor(9, device)
    opcheck(ops.lora_down, (x, A, 0.2, s))
    opcheck(ops.lora_down, (x.bfloat16(), A, 0.0, s))
    opcheck(ops.lora_down_grad_weight, (torch.randn(5, 3, device=device), x.half(), 0.2, s))
    opcheck(ops.lora_down_grad_input_, (torch.randn(5, 24, device=device), torch.randn(5, 3, device=device), A, 0.2, s))
    opcheck(ops.lora_down_grad_input, (torch.randn(5, 3, device=device), A, 0.2, s, torch.bfloat16))
    opcheck(ops.lora_down_grad_input, (torch.randn(5, 3, device=device), A, 0.0, s, torch.float32))


# ---- the fused layer ops ---------------------------------------------------------------------------------------


def make_case(device, m, k, n, r, dtype, double_quant=True, bias=True):
    q = qpeft.Quantized4bitWeight.from_float(torch.randn(n, k, device=device), "nf4", 64, double_quant)
    x = torch.randn(m, k, device=device).to(dtype)
    A = torch.randn(r, k, device=device) / k**0.5
    B = torch.randn(n, r, device=device)
    b = torch.randn(n, device=device) if bias else None
    return q, x, A, B, b


@pytest.mark.parametrize("m", [1, 16, 17, 70])  # both sides of the small-M switch (16 rows, CPU and CUDA)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p,double_quant,bias", [(0.0, True, True), (0.25, False, False), (0.25, True, True)])
@pytest.mark.parametrize("k,n", [(136, 72), (4109, 300)])  # the second: several CPU GEMM slabs each way
def test_qlora_ops_match_reference(device, m, dtype, p, double_quant, bias, k, n):
    r, s, seed = 8, 0.75, int(torch.randint(0, 2**62, ()))
    q, x, A, B, b = make_case(device, m, k, n, r, dtype, double_quant, bias)
    st = seed_tensor(seed, device)
    poison_allocator(device, m * n * 4)
    y, xa = ops.qlora_forward(x, *weight_args(q), A, B, b, s, p, st)
    W = q.dequantize(torch.float32).double()
    x_drop = dropped64(x, p, seed)
    y_ref = x.double() @ W.T + s * (x_drop @ A.double().T) @ B.double().T + (b.double() if bias else 0)
    assert y.dtype == dtype and xa.dtype == dtype and y.shape == (m, n) and xa.shape == (m, r)
    assert rel_err(y, y_ref) < TOL[dtype] and rel_err(xa, x_drop @ A.double().T) < TOL[dtype]

    dy = torch.randn(m, n, device=device).to(dtype)
    dx, dA, dB = ops.qlora_backward(dy, x, xa, *weight_args(q), A, B, s, p, st)
    g = s * dy.double() @ B.double()
    assert dA.dtype == A.dtype and dB.dtype == B.dtype and dx.dtype == dtype
    assert rel_err(dx, dy.double() @ W + dropped64(g @ A.double(), p, seed)) < TOL[dtype]
    assert rel_err(dA, g.T @ x_drop) < TOL[dtype]
    assert rel_err(dB, s * dy.double().T @ xa.double()) < TOL[dtype]


def test_qlora_ops_opcheck_and_bad_inputs(device):
    q, x, A, B, b = make_case(device, 3, 64, 16, 4, torch.float32)
    st = seed_tensor(5, device)
    opcheck(ops.qlora_forward, (x, *weight_args(q), A, B, b, 0.5, 0.1, st))
    q2, x2, A2, B2, _ = make_case(device, 12, 64, 16, 4, torch.bfloat16, double_quant=False)
    opcheck(ops.qlora_forward, (x2, *weight_args(q2), A2, B2, None, 2.0, 0.0, st))
    y, xa = ops.qlora_forward(x, *weight_args(q), A, B, b, 0.5, 0.1, st)
    opcheck(ops.qlora_backward, (torch.randn_like(y), x, xa, *weight_args(q), A, B, 0.5, 0.1, st))
    with pytest.raises(ValueError, match=r"lora_B must have shape \[out_features, 4\]"):
        ops.qlora_forward(x, *weight_args(q), A, B[:, :3], b, 0.5, 0.1, st)
    with pytest.raises(ValueError, match=r"bias must have shape \[16\]"):
        ops.qlora_forward(x, *weight_args(q), A, B, b[:5], 0.5, 0.1, st)
    with pytest.raises(ValueError, match="dy must have shape"):
        ops.qlora_backward(torch.randn(3, 15, device=device), x, xa, *weight_args(q), A, B, 0.5, 0.1, st)
    with pytest.raises(ValueError, match="elements"):  # K does not match the 4-bit weight
        ops.qlora_forward(
            torch.randn(20, 32, device=device), *weight_args(q), torch.randn(4, 32, device=device), B, b, 0.5, 0.1, st
        )


@pytest.mark.cuda
@pytest.mark.parametrize("m", [1, 16, 300])
def test_cuda_lora_ops_equal_cpu(m):
    """The CUDA kernels drop the same elements as the CPU ones and agree to fp32 rounding."""
    k, r, seed = 200, 12, 77
    x, A, g = torch.randn(m, k).bfloat16(), torch.randn(r, k), torch.randn(m, r)
    for p in (0.0, 0.4):
        on_cuda = F.lora_down(x.cuda(), A.cuda(), p, seed).cpu()
        assert rel_err(on_cuda, F.lora_down(x, A, p, seed)) < 1e-2
        assert (
            rel_err(F.lora_down_grad_weight(g.cuda(), x.cuda(), p, seed).cpu(), F.lora_down_grad_weight(g, x, p, seed))
            < 1e-5
        )
        acc = torch.randn(m, k)
        cpu = F.lora_down_grad_input_(acc.clone(), g, A, p, seed)
        cuda = F.lora_down_grad_input_(acc.cuda(), g.cuda(), A.cuda(), p, seed).cpu()
        assert rel_err(cuda, cpu) < 1e-5
        assert torch.equal(cuda == acc, cpu == acc)  # same dropped positions
        written = F.lora_down_grad_input(g.cuda(), A.cuda(), p, seed).cpu()
        assert rel_err(written, F.lora_down_grad_input(g, A, p, seed)) < 1e-5
        assert torch.equal(written == 0, cuda == acc)


@pytest.mark.cuda
def test_cuda_ops_take_the_seed_on_the_host_or_the_device():
    """A CPU seed tensor (read on the host, passed by value) and the same seed on the GPU (read by the kernels)
    drop the same elements in every op; a GPU seed for CPU tensors is refused."""
    x = torch.randn(70, 136, device="cuda").bfloat16()
    A, g = torch.randn(8, 136, device="cuda"), torch.randn(70, 8, device="cuda")
    results = {}
    for where in ("cpu", "cuda"):
        st = seed_tensor(-12345, where)
        results[where] = (
            ops.lora_down(x, A, 0.3, st),
            ops.lora_down_grad_weight(g, x, 0.3, st),
            F.lora_down_grad_input_(torch.zeros_like(x), g, A, 0.3, st),
            ops.lora_down_grad_input(g, A, 0.3, st, x.dtype),
            ops.lora_dropout(x, 0.3, st, 7),
        )
    for on_host, on_device in zip(results["cpu"], results["cuda"]):
        assert torch.equal(on_host, on_device)
    with pytest.raises(ValueError, match="seed is on"):
        ops.lora_down(x.cpu(), A.cpu(), 0.3, seed_tensor(1, "cuda"))


@pytest.mark.cuda
@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("k", [256, 100, 77])  # vectorized path and element-wise path
@pytest.mark.parametrize("double_quant", [True, False])
def test_cuda_linear_4bit_matches_reference(m, k, double_quant):
    q = qpeft.Quantized4bitWeight.from_float(torch.randn(37, k, device="cuda"), "nf4", 64, double_quant)
    x = torch.randn(m, k, device="cuda")
    y = linear_4bit(x, q)
    ref = x.double() @ q.dequantize(torch.float32).double().T
    assert rel_err(y, ref) < 1e-6
    x = torch.randn(17, k, device="cuda")  # above the codes kernel's rows: a transient dequantized W
    y = linear_4bit(x, q)
    assert rel_err(y, x.double() @ q.dequantize(torch.float32).double().T) < 1e-6


@pytest.mark.cuda
@pytest.mark.parametrize("m", [0, 1, 40])
@pytest.mark.parametrize("double_quant", [True, False])
def test_cuda_linear_4bit_grad_input_matches_reference(m, double_quant):
    """dy W on CUDA (a transient dequantized W, one GEMM), and the op's registration (opcheck)."""
    q = qpeft.Quantized4bitWeight.from_float(torch.randn(37, 100, device="cuda"), "nf4", 64, double_quant)
    dy = torch.randn(m, 37, device="cuda")
    dx = linear_4bit_grad_input(dy, q)
    assert dx.shape == (m, 100) and dx.dtype == dy.dtype
    assert rel_err(dx, dy.double() @ q.dequantize(torch.float32).double()) < 1e-6
    args = qpeft.autograd.weight_args(q)
    opcheck(torch.ops.qpeft.linear_4bit_grad_input, (torch.randn(5, 37, device="cuda"), *args, 100))


@pytest.fixture(params=list(F.CUDA_LORA_KERNELS))
def cuda_lora_kernels(request):
    """Runs a CUDA test once with each kind of LoRA-branch kernel (functional.set_cuda_lora_kernels)."""
    before = F.cuda_lora_kernels()
    F.set_cuda_lora_kernels(request.param)
    yield request.param
    F.set_cuda_lora_kernels(before)


# (M, K, r) where the tensor-core kernels apply (K % 8 == 0): M = 1, M not a multiple of the 128-row blocks,
# K not a multiple of their 32/256-column steps, r not a multiple of 8, r in the 32-rank groups, r > 32.
TC_SHAPES = [
    (1, 4096, 16),
    (130, 264, 16),
    (257, 520, 32),
    (64, 136, 40),
    (300, 200, 12),
    (17, 8, 1),
    (1000, 1024, 64),
    (4096, 512, 16),
]


@pytest.mark.cuda
@pytest.mark.parametrize("m,k,r", TC_SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_cuda_lora_kernels_match_reference(cuda_lora_kernels, m, k, r, dtype, p):
    """Both kinds of CUDA kernel against the float64 reference, with poisoned allocations; dropped positions
    equal to the CPU kernel's."""
    seed = int(torch.randint(-(2**62), 2**62, ()))
    x = torch.randn(m, k, device="cuda").to(dtype)
    A, g = torch.randn(r, k, device="cuda") / k**0.5, torch.randn(m, r, device="cuda")
    x_drop = dropped64(x, p, seed)
    poison_allocator("cuda", 64 * m * r * 4)
    xa = F.lora_down(x, A, p, seed)
    assert xa.dtype == dtype and rel_err(xa, x_drop @ A.double().T) < TOL[dtype]
    poison_allocator("cuda", 64 * r * k * 4)
    dA = F.lora_down_grad_weight(g, x, p, seed)
    assert rel_err(dA, g.double().T @ x_drop) < 1e-5
    acc = torch.randn(m, k, device="cuda").to(dtype)
    out = F.lora_down_grad_input_(acc.clone(), g, A, p, seed)
    assert out.dtype == dtype and rel_err(out, acc.double() + dropped64(g.double() @ A.double(), p, seed)) < TOL[dtype]
    # written where dropout keeps, zero where it drops: the same positions as the CPU kernel
    zeros = F.lora_down_grad_input_(torch.zeros(m, k, dtype=dtype, device="cuda"), g, A, p, seed).cpu()
    cpu = F.lora_down_grad_input_(torch.zeros(m, k, dtype=dtype), g.cpu(), A.cpu(), p, seed)
    assert torch.equal(zeros == 0, cpu == 0)
    poison_allocator("cuda", 4 * m * k * 2)
    written = F.lora_down_grad_input(g, A, p, seed, dtype)  # the write-only variant of each kernel kind
    assert written.dtype == dtype and rel_err(written, dropped64(g.double() @ A.double(), p, seed)) < TOL[dtype]
    assert torch.equal(written.cpu() == 0, cpu == 0)


@pytest.mark.cuda
def test_cuda_lora_kernel_kinds_agree():
    """Tensor cores (tf32 hi + lo) and CUDA cores give the same sums to fp32 rounding, the same xa in bf16 to one
    rounding step, and identical masks."""
    m, k, r, p, seed = 777, 1032, 16, 0.05, 5
    x = torch.randn(m, k, device="cuda").bfloat16()
    A, g = torch.randn(r, k, device="cuda"), torch.randn(m, r, device="cuda")
    results, before = {}, F.cuda_lora_kernels()
    try:
        for kind in F.CUDA_LORA_KERNELS:
            F.set_cuda_lora_kernels(kind)
            results[kind] = (
                F.lora_down(x, A, p, seed).float(),
                F.lora_down_grad_weight(g, x, p, seed),
                F.lora_down_grad_input_(torch.zeros(m, k, device="cuda"), g, A, p, seed),
            )
    finally:
        F.set_cuda_lora_kernels(before)
    (xa_c, dA_c, dx_c), (xa_t, dA_t, dx_t) = results["cuda_cores"], results["tensor_cores"]
    assert (xa_c - xa_t).abs().max() <= 2 * torch.finfo(torch.bfloat16).eps * xa_c.abs().max()
    assert rel_err(dA_t, dA_c) < 1e-6
    assert torch.equal(dx_t == 0, dx_c == 0)  # fp32 dx: the CUDA-core kernel (only 16-bit dx has a tensor-core one)


@pytest.mark.cuda
def test_cuda_tensor_core_kernels_run_when_chosen():
    """The choice reaches the launch: the profiler sees the tensor-core kernels only when they are chosen, and
    only for 16-bit inputs with K % 8 == 0."""
    from torch.profiler import ProfilerActivity, profile

    def kernels(kind, dtype, k):
        before = F.cuda_lora_kernels()
        F.set_cuda_lora_kernels(kind)
        x = torch.randn(64, k, device="cuda").to(dtype)
        A, g = torch.randn(8, k, device="cuda"), torch.randn(64, 8, device="cuda")
        try:
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                F.lora_down(x, A, 0.1, 1)
                F.lora_down_grad_weight(g, x, 0.1, 1)
                F.lora_down_grad_input_(torch.zeros_like(x), g, A, 0.1, 1)
                torch.cuda.synchronize()
        finally:
            F.set_cuda_lora_kernels(before)
        return {e.key for e in prof.key_averages() if "lora_down" in e.key}

    tc = kernels("tensor_cores", torch.bfloat16, 128)
    assert len([n for n in tc if "mma_kernel" in n]) == 3, tc
    assert not any("mma_kernel" in n for n in kernels("cuda_cores", torch.bfloat16, 128))
    assert not any("mma_kernel" in n for n in kernels("tensor_cores", torch.bfloat16, 100))  # K % 8 != 0
    assert not any("mma_kernel" in n for n in kernels("tensor_cores", torch.float32, 128))


# (M, K, N, r) of the fused small-M forward: M = 1, M = 16 (the limit), N not a multiple of the 32-feature blocks,
# r = 1, r = 64 (the limit), K = 4096 (several 128-column blocks per warp).
FUSED_SHAPES = [(1, 128, 40, 1), (5, 384, 96, 16), (16, 4096, 264, 64), (3, 1024, 8, 12)]


@pytest.mark.cuda
@pytest.mark.parametrize("m,k,n,r", FUSED_SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "b_dtype,bias_dtype", [(torch.float32, torch.float32), (torch.bfloat16, None), (torch.float32, torch.bfloat16)]
)
@pytest.mark.parametrize("p,double_quant", [(0.0, True), (0.2, False)])
def test_cuda_small_m_forward_fused(cuda_lora_kernels, m, k, n, r, dtype, b_dtype, bias_dtype, p, double_quant):
    """The decode forward (lora_down + one linear_4bit launch adding the LoRA term, the bias and lora_down's
    partial sums) against float64 from the operands it rounds (W, xa, B and bias in x's dtype): one rounding of
    the output; xa as lora_down gives it; poisoned outputs."""
    seed = int(torch.randint(-(2**62), 2**62, ()))
    q = qpeft.Quantized4bitWeight.from_float(torch.randn(n, k, device="cuda"), "nf4", 64, double_quant)
    x = torch.randn(m, k, device="cuda").to(dtype)
    A, B = torch.randn(r, k, device="cuda") / k**0.5, torch.randn(n, r, device="cuda").to(b_dtype)
    bias = None if bias_dtype is None else torch.randn(n, device="cuda").to(bias_dtype)
    s = 0.5
    poison_allocator("cuda", m * n * 2)
    y, xa = ops.qlora_forward(x, *weight_args(q), A, B, bias, s, p, seed_tensor(seed, "cuda"))
    assert y.dtype == dtype and xa.dtype == dtype and y.shape == (m, n) and xa.shape == (m, r)
    x_drop = dropped64(x, p, seed)
    assert rel_err(xa, x_drop @ A.double().T) < TOL[dtype]
    assert rel_err(xa, F.lora_down(x, A, p, seed)) < 2 * torch.finfo(dtype).eps  # only the split order differs
    W = q.dequantize(dtype).double()
    ref = x.double() @ W.T + s * xa.double() @ B.to(dtype).double().T
    if bias is not None:
        ref = ref + bias.to(dtype).double()
    assert rel_err(y, ref) < torch.finfo(dtype).eps  # one rounding of fp32 sums
    y_full = x.double() @ q.dequantize(torch.float32).double().T + s * x_drop @ A.double().T @ B.double().T
    assert rel_err(y, y_full + (0 if bias is None else bias.double())) < TOL[dtype]


@pytest.mark.cuda
def test_cuda_decode_forward_is_two_launches():
    """The point of the fused kernel: an eval-mode forward of LoraLinear4bit at M = 1 (fp32 adapter and bias on a
    bf16 layer) launches lora_down and the fused linear_4bit kernel, nothing else (no casts, adds or GEMMs)."""
    from torch.profiler import ProfilerActivity, profile

    from qpeft.nn import LoraLinear4bit

    dense = torch.nn.Linear(512, 384, dtype=torch.bfloat16, device="cuda")
    layer = LoraLinear4bit.from_linear(dense, r=16, alpha=32, dropout=0.1).eval()
    torch.nn.init.normal_(layer.lora_B)
    layer.base.bias = torch.nn.Parameter(layer.base.bias.detach().float())
    x = torch.randn(1, 512, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        layer(x)  # first call: lazily built state
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            y = layer(x)
            torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == 2, kernels
    assert any("lora_down" in k for k in kernels) and any("linear_4bit_mma_kernel" in k for k in kernels), kernels
    with torch.no_grad():
        W = layer.base.quantized_weight.dequantize(torch.float32)
        ref = x.float() @ (W + layer.scaling * layer.lora_B.float() @ layer.lora_A.float()).T + layer.base.bias.float()
    assert rel_err(y, ref) < 1e-2


def test_cuda_lora_kernels_setting():
    before = F.cuda_lora_kernels()
    assert before in F.CUDA_LORA_KERNELS
    try:
        F.set_cuda_lora_kernels("tensor_cores")
        assert F.cuda_lora_kernels() == "tensor_cores"
        with pytest.raises(ValueError, match="must be one of"):
            F.set_cuda_lora_kernels("wmma")
    finally:
        F.set_cuda_lora_kernels(before)
