"""The CUDA kernels (csrc/kernels/cuda) run on the CPU under the host emulator (tests/cuda_emulation) against the
references the GPU tests use: this machine and CI have no GPU, and kernels written without one had never run.

The emulator executes the kernels' own code: every thread of every block, shared memory, __syncthreads, warp
shuffles and mma.sync from the PTX fragment layouts. It finds indexing, fragment-layout, masking, bounds and
barrier mistakes, and races between two barriers that change a result (threads run in both orders); it cannot
find other races, timing or memory-model problems (the GPU tests and compute-sanitizer on the device are for
those). Outputs sit inside poisoned guard regions: a stray write or a read of unwritten memory shows. Shapes are
small (each emulated thread is a fiber on one core).
"""

import contextlib
import math
import os

import pytest
import torch

from qpeft import reference as R
from qpeft.quantized import Quantized4bitWeight

from cuda_emulation.build import cuda_include_dir, load_emulated_kernels
from helpers import dropped64, rel_err

ops = torch.ops.qpeft
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
HALF = [torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def emu():
    if cuda_include_dir() is None and not os.environ.get("QPEFT_REQUIRE_CUDA_EMULATION"):
        pytest.skip("the CUDA toolkit's headers are not installed (not run: this is not a pass)")
    return load_emulated_kernels()


class Guarded:
    """A tensor of `shape` inside a buffer whose `pad` elements either side hold a poison pattern; `offset` more
    elements before it misalign it (offset 1: 2 or 4 bytes off 16-byte alignment)."""

    def __init__(self, shape, dtype, offset=0, pad=64, fill=None):
        self.begin = pad + offset
        self.end = self.begin + math.prod(shape)
        self.buffer = torch.empty(self.end + pad, dtype=dtype)
        self.buffer.view(torch.uint8).fill_(0xFF)  # NaN in every float format
        self.poison = self.buffer.clone()
        self.tensor = self.buffer[self.begin : self.end].view(shape)
        if fill is not None:
            self.tensor.copy_(fill)

    def guards_intact(self):
        bits = self.buffer.view(torch.uint8).reshape(self.buffer.numel(), -1)
        poison = self.poison.view(torch.uint8).reshape(self.buffer.numel(), -1)
        return torch.equal(bits[: self.begin], poison[: self.begin]) and torch.equal(
            bits[self.end :], poison[self.end :]
        )


def dropout_args(p):
    """(threshold, keep_scale) as the ops pass them to the kernels."""
    return R.dropout_threshold(p), R.dropout_keep_scale(p)


@contextlib.contextmanager
def threads_in_reverse_order(emu):
    emu.set_reverse_order(True)
    try:
        yield
    finally:
        emu.set_reverse_order(False)


def random_seed():
    return int(torch.randint(-(2**62), 2**62, ()))


def weight(n_out, k, quant_type="nf4", blocksize=64, double_quant=True):
    q = Quantized4bitWeight.from_float(torch.randn(n_out, k), quant_type, blocksize, double_quant)
    packed = q.packed.view(torch.uint8).reshape(-1).contiguous()
    if double_quant:
        scales = [
            q.absmax.contiguous(),
            q.nested_absmax.contiguous(),
            q.nested_code.contiguous(),
            q.nested_offset.reshape(1).contiguous(),
        ]
    else:
        scales = [q.absmax.contiguous()]
    return q, packed, scales


# ---- the emulator's own checks ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "which,message",
    [
        ("divergent_barrier", "different __syncthreads"),
        ("partial_warp_shuffle", "exited or missing lanes"),
        ("deadlock", "deadlock"),
    ],
)
def test_emulator_reports_broken_kernels(emu, which, message):
    status, text = emu.selftest(which, torch.zeros(128), torch.zeros(128))
    assert status != 0 and message in text


def test_emulator_warp_sum(emu):
    x = torch.randn(128)
    out = torch.full((128,), float("nan"))
    status, text = emu.selftest("warp_sum", x, out)
    assert status == 0, text
    expected = x.double().reshape(4, 32).sum(1, keepdim=True).expand(4, 32).reshape(-1)
    assert rel_err(out, expected) < 1e-6


def test_emulator_thread_order_exposes_a_race(emu):
    x = torch.randn(128)
    forward, backward = torch.full((128,), float("nan")), torch.full((128,), float("nan"))
    assert emu.selftest("racy", x, forward)[0] == 0
    with threads_in_reverse_order(emu):
        assert emu.selftest("racy", x, backward)[0] == 0
    assert not torch.equal(forward.nan_to_num(), backward.nan_to_num())


def _order_cases():
    """Launches of every emulated kernel (both LoRA kinds, nested scales, the fused epilogue): name -> run(emu)
    returning the output tensors. Inputs are drawn once per call, so both orders see the same."""
    q, packed, scales = weight(72, 256)
    x16, x32 = torch.randn(70, 264).to(torch.bfloat16), torch.randn(70, 264)
    A, g = torch.randn(24, 264), torch.randn(70, 24)
    xs = torch.randn(16, 256).to(torch.float16)
    partial_xa, B = torch.randn(3, 16, 16), torch.randn(72, 16)
    seed, (threshold, keep) = 99, dropout_args(0.25)

    def dequantize(emu):
        out = torch.empty(72 * 256, dtype=torch.bfloat16)
        emu.dequantize_4bit(packed, scales, 64, "nf4", out)
        return [out]

    def down(x, mma):
        def run(emu):
            partial = torch.empty(emu.lora_down_splits(70, 264, 24, mma) + 1, 70, 24)
            emu.lora_down(x, A, partial, seed, threshold, keep, mma)
            return [partial]

        return run

    def grad_weight(x, mma):
        def run(emu):
            partial = torch.empty(2, 24, 264)
            emu.lora_down_grad_weight(g, x, partial, seed, threshold, keep, mma)
            return [partial]

        return run

    def grad_input(dtype, mma):
        def run(emu):
            dx = torch.ones(70, 264, dtype=dtype)
            emu.lora_down_grad_input(dx, g, A, seed, threshold, keep, True, mma)
            return [dx]

        return run

    def linear(emu):
        y = torch.empty(16, 72, dtype=torch.float16)
        emu.linear_4bit(xs, packed, scales, 64, "nf4", y)
        return [y]

    def fused(emu):
        y, xa = torch.empty(16, 72, dtype=torch.float16), torch.empty(16, 16, dtype=torch.float16)
        emu.linear_4bit_lora(xs, packed, scales, 64, "nf4", y, partial_xa, B, B[:, 0].contiguous(), 0.5, xa)
        return [y, xa]

    return {
        "dequantize_4bit": dequantize,
        "lora_down": down(x32, False),
        "lora_down_mma": down(x16, True),
        "lora_down_grad_weight": grad_weight(x32, False),
        "lora_down_grad_weight_mma": grad_weight(x16, True),
        "lora_down_grad_input": grad_input(torch.float32, False),
        "lora_down_grad_input_mma": grad_input(torch.bfloat16, True),
        "linear_4bit": linear,
        "linear_4bit_lora": fused,
    }


@pytest.mark.parametrize(
    "name",
    [
        "dequantize_4bit",
        "lora_down",
        "lora_down_mma",
        "lora_down_grad_weight",
        "lora_down_grad_weight_mma",
        "lora_down_grad_input",
        "lora_down_grad_input_mma",
        "linear_4bit",
        "linear_4bit_lora",
    ],
)
def test_results_do_not_depend_on_thread_order(emu, name):
    """A race between two barriers (a thread reading shared memory another thread of the interval writes) gives
    results that depend on which thread runs first: run every kernel with the threads in both orders."""
    run = _order_cases()[name]
    forward = run(emu)
    with threads_in_reverse_order(emu):
        backward = run(emu)
    for a, b in zip(forward, backward):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


# ---- dequantize_4bit: bit-identical to the CPU op ------------------------------------------------------------


@pytest.mark.parametrize("n,blocksize", [(1, 64), (13, 64), (200, 64), (64 * 37 + 5, 64), (1000, 128), (4096, 32)])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("offset", [0, 1])  # 1: misaligned output, the element-wise path
def test_dequantize_4bit(emu, n, blocksize, quant_type, double_quant, dtype, offset):
    q, packed, scales = weight(1, n, quant_type, blocksize, double_quant)
    expected = q.dequantize(dtype).reshape(-1)
    out = Guarded((n,), dtype, offset)
    emu.dequantize_4bit(packed, scales, blocksize, quant_type, out.tensor)
    assert torch.equal(out.tensor.view(torch.uint8), expected.view(torch.uint8)) and out.guards_intact()


# ---- lora_dropout: the CPU op's mask and values, bit for bit --------------------------------------------------


@pytest.mark.parametrize("n", [1, 1000, 4099])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("seed_in_memory", [False, True])
def test_lora_dropout(emu, n, dtype, p, seed_in_memory):
    seed, offset = random_seed(), 7
    x = torch.randn(n).to(dtype)
    expected = ops.lora_dropout(x, p, torch.tensor([seed]), offset)
    out = Guarded((n,), dtype)
    threshold, keep_scale = dropout_args(p)
    emu.lora_dropout(
        x, out.tensor, seed, torch.tensor([seed]) if seed_in_memory else None, offset, threshold, keep_scale
    )
    assert torch.equal(out.tensor.view(torch.uint8), expected.view(torch.uint8)) and out.guards_intact()


# ---- the LoRA-branch kernels, CUDA cores and tensor cores ----------------------------------------------------

CORE_SHAPES = [(1, 64, 8), (37, 100, 16), (300, 40, 5), (130, 512, 16), (64, 136, 33)]
TC_SHAPES = [(1, 64, 8), (37, 96, 16), (130, 512, 16), (300, 256, 24), (70, 264, 64)]  # K % 8 == 0
KIND_CASES = [(False, dt, s) for dt in [torch.float32, torch.bfloat16, torch.float16] for s in CORE_SHAPES] + [
    (True, dt, s) for dt in HALF for s in TC_SHAPES
]


def kind_id(case):
    mma, dtype, (m, k, r) = case
    return f"{'mma' if mma else 'core'}-{str(dtype)[6:]}-{m}x{k}x{r}"


def lora_branch_cases(name, values):
    """Both kernel kinds over KIND_CASES, dropout off and on, and `name` over `values`."""

    def mark(test):
        test = pytest.mark.parametrize(name, values)(test)
        test = pytest.mark.parametrize("p", [0.0, 0.25])(test)
        return pytest.mark.parametrize("case", KIND_CASES, ids=kind_id)(test)

    return mark


def sum_in_split_order(partial):
    """partial[0] + partial[1] + ... as fp32 adds, one rounding each (what the kernels' split sums are)."""
    total = partial[0].clone()
    for s in range(1, partial.shape[0]):
        total = total + partial[s]
    return total


@lora_branch_cases("more_splits", [False, True])
def test_lora_down(emu, case, p, more_splits):
    tensor_cores, dtype, (m, k, r) = case
    seed = random_seed()
    x, A = torch.randn(m, k).to(dtype), torch.randn(r, k)
    if tensor_cores:
        assert emu.lora_tensor_cores_ok(x, A)
    splits = emu.lora_down_splits(m, k, r, tensor_cores) + (2 if more_splits else 0)
    partial = Guarded((splits, m, r), torch.float32)
    emu.lora_down(x, A, partial.tensor, seed, *dropout_args(p), tensor_cores)
    assert partial.guards_intact() and not partial.tensor.isnan().any()
    assert rel_err(partial.tensor.double().sum(0), dropped64(x, p, seed) @ A.double().T) < 1e-5


@lora_branch_cases("more_splits", [False, True])
def test_lora_down_grad_weight(emu, case, p, more_splits):
    tensor_cores, dtype, (m, k, r) = case
    seed = random_seed()
    x, g = torch.randn(m, k).to(dtype), torch.randn(m, r)
    splits = emu.lora_down_grad_weight_splits(m, k, r, tensor_cores) + (2 if more_splits else 0)
    partial = Guarded((splits, r, k), torch.float32)
    emu.lora_down_grad_weight(g, x, partial.tensor, seed, *dropout_args(p), tensor_cores)
    assert partial.guards_intact() and not partial.tensor.isnan().any()
    assert rel_err(partial.tensor.double().sum(0), g.double().T @ dropped64(x, p, seed)) < 1e-5


@lora_branch_cases("accumulate", [False, True])
def test_lora_down_grad_input(emu, case, p, accumulate):
    tensor_cores, dtype, (m, k, r) = case
    seed = random_seed()
    g, A = torch.randn(m, r), torch.randn(r, k)
    before = torch.randn(m, k).to(dtype)
    # write mode never reads dx: it starts as poison (NaN) there
    dx = Guarded((m, k), dtype, fill=before if accumulate else None)
    emu.lora_down_grad_input(dx.tensor, g, A, seed, *dropout_args(p), accumulate, tensor_cores)
    expected = dropped64(g.double() @ A.double(), p, seed) + (before.double() if accumulate else 0.0)
    assert dx.guards_intact() and not dx.tensor.isnan().any()
    assert rel_err(dx.tensor, expected) < TOL[dtype]


def test_tensor_core_kernels_refuse_what_they_cannot_do(emu):
    x, A = torch.randn(4, 100).to(torch.bfloat16), torch.randn(8, 100)  # K % 8 != 0
    assert not emu.lora_tensor_cores_ok(x, A)
    with pytest.raises(RuntimeError, match="lora_down failed"):
        emu.lora_down(x, A, torch.zeros(1, 4, 8), 0, 0, 1.0, True)
    x32 = torch.randn(4, 64)  # fp32 x
    assert not emu.lora_tensor_cores_ok(x32, torch.randn(8, 64))


@pytest.mark.parametrize("splits", [1, 3, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sum_partials_adds_in_split_order(emu, splits, dtype):
    partial = torch.randn(splits, 37, 5) * torch.logspace(-3, 3, splits).reshape(-1, 1, 1)
    out = Guarded((37, 5), dtype)
    emu.sum_partials(partial, out.tensor)
    assert torch.equal(out.tensor, sum_in_split_order(partial).to(dtype)) and out.guards_intact()


# ---- linear_4bit (small-M base matmul) and the fused decode forward --------------------------------------------


@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize(
    "dtype,k",
    [(torch.float32, 256), (torch.float32, 100), (torch.bfloat16, 100), (torch.bfloat16, 384), (torch.float16, 256)],
)  # 16-bit, K % 128 == 0: MMA
@pytest.mark.parametrize("n_out", [1, 72])
@pytest.mark.parametrize(
    "quant_type,blocksize,double_quant", [("nf4", 64, True), ("fp4", 32, False), ("nf4", 256, False)]
)
def test_linear_4bit(emu, m, dtype, k, n_out, quant_type, blocksize, double_quant):
    q, packed, scales = weight(n_out, k, quant_type, blocksize, double_quant)
    x = torch.randn(m, k).to(dtype)
    mma = dtype != torch.float32 and k % 128 == 0
    W = q.dequantize(dtype if mma else torch.float32)  # the MMA path rounds W to x's format, the others do not
    y = Guarded((m, n_out), dtype)
    emu.linear_4bit(x, packed, scales, blocksize, quant_type, y.tensor)
    assert y.guards_intact() and not y.tensor.isnan().any()
    assert rel_err(y.tensor, x.double() @ W.double().T) < TOL[dtype]


@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("r", [1, 16, 64])
@pytest.mark.parametrize("splits", [1, 3, 16])
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("bias_dtype", [None, torch.float32, "x"])
def test_linear_4bit_lora(emu, m, r, splits, dtype, bias_dtype):
    n_out, k, scaling = 72, 256, 0.37
    q, packed, scales = weight(n_out, k)
    x = torch.randn(m, k).to(dtype)
    assert emu.linear_4bit_lora_ok(x, r, 64, packed)
    partial = torch.randn(splits, m, r)
    B = torch.randn(n_out, r)
    bias = None if bias_dtype is None else torch.randn(n_out).to(dtype if bias_dtype == "x" else bias_dtype)
    y, xa = Guarded((m, n_out), dtype), Guarded((m, r), dtype)
    emu.linear_4bit_lora(x, packed, scales, 64, "nf4", y.tensor, partial, B, bias, scaling, xa.tensor)
    xa_sum = sum_in_split_order(partial)
    assert torch.equal(xa.tensor, xa_sum.to(dtype)) and xa.guards_intact()  # what lora_down + sum_partials give
    expected = x.double() @ q.dequantize(dtype).double().T
    expected += scaling * (xa_sum.to(dtype).double() @ B.to(dtype).double().T)
    if bias is not None:
        expected += bias.to(dtype).double()
    assert y.guards_intact() and rel_err(y.tensor, expected) < TOL[dtype]


@pytest.mark.parametrize("m,r,k", [(17, 8, 256), (4, 65, 256), (4, 8, 200)])
def test_linear_4bit_lora_refuses_what_it_cannot_do(emu, m, r, k):
    _, packed, scales = weight(8, k)
    x = torch.randn(m, k).to(torch.bfloat16)
    assert not emu.linear_4bit_lora_ok(x, r, 64, packed)
    with pytest.raises(RuntimeError, match="linear_4bit_lora failed"):
        y, xa = torch.empty(m, 8, dtype=torch.bfloat16), torch.empty(m, r, dtype=torch.bfloat16)
        emu.linear_4bit_lora(x, packed, scales, 64, "nf4", y, torch.zeros(1, m, r), torch.zeros(8, r), None, 1.0, xa)
