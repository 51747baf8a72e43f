"""qpeft's quantization ops (CPU and CUDA kernels) against the pure-PyTorch reference, bit for bit."""

import math

import pytest
import torch
from torch.library import opcheck

import qpeft
from qpeft import functional as F
from qpeft import reference as R

from helpers import poison_allocator

BLOCKSIZES = R.VALID_BLOCKSIZES
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
QUANT_TYPES = ["nf4", "fp4"]
ODD_SIZES = [0, 1, 2, 31, 33, 63, 4095, 4097, 12345]


def random_values(n, dtype, device, scale=3.0):
    return (torch.randn(n, dtype=torch.float32) * scale).to(dtype).to(device)


def assert_quantize_matches_reference(A, blocksize, quant_type):
    poison_allocator(A.device, A.numel() * 4 + 1024)
    packed, absmax = F.quantize_4bit(A, blocksize, quant_type)
    ref_packed, ref_absmax = R.quantize_4bit(A.cpu(), blocksize, quant_type)
    assert packed.dtype == torch.uint8 and packed.shape == ((A.numel() + 1) // 2,)
    assert absmax.dtype == torch.float32 and absmax.shape == (math.ceil(A.numel() / blocksize),)
    assert torch.equal(packed.cpu(), ref_packed), "packed codes differ from the reference"
    assert torch.equal(absmax.cpu(), ref_absmax), "absmax differs from the reference"
    return packed, absmax


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_quantize_4bit_matches_reference(device, quant_type, dtype, blocksize):
    for n in (blocksize * 7, blocksize * 3 + 17, 2 * blocksize + 1):
        assert_quantize_matches_reference(random_values(n, dtype, device), blocksize, quant_type)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("n", ODD_SIZES)
def test_quantize_4bit_odd_sizes(device, quant_type, n):
    assert_quantize_matches_reference(random_values(n, torch.float32, device), 64, quant_type)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
def test_dequantize_4bit_matches_reference(device, quant_type, out_dtype, blocksize):
    for shape in [(37, 129), (1, 4097), (blocksize * 2, 3), (5,)]:
        A = random_values(math.prod(shape), torch.float32, device).reshape(shape)
        packed, absmax = F.quantize_4bit(A, blocksize, quant_type)
        poison_allocator(device, A.numel() * 4)
        out = F.dequantize_4bit(packed, absmax, blocksize, quant_type, shape, out_dtype)
        ref = R.dequantize_4bit(packed.cpu(), absmax.cpu(), blocksize, quant_type, shape, out_dtype)
        assert out.shape == shape and out.dtype == out_dtype
        assert torch.equal(out.cpu(), ref)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_dequantize_4bit_error_is_within_half_a_code_gap(device, quant_type):
    A = torch.randn(64 * 500, dtype=torch.float64)
    packed, absmax = F.quantize_4bit(A.float().to(device), 64, quant_type)
    out = F.dequantize_4bit(packed, absmax, 64, quant_type, A.shape, torch.float32).cpu().double()
    code = R.code_book(quant_type).double().sort().values
    max_half_gap = (code[1:] - code[:-1]).max().item() / 2
    scale = absmax.cpu().double().repeat_interleave(64)
    assert ((out - A).abs() <= scale * max_half_gap * (1 + 1e-6) + 1e-12).all()
    rel = (out - A).norm() / A.norm()
    assert rel < (0.12 if quant_type == "nf4" else 0.2), rel


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_adversarial_values(device, quant_type):
    """Values exactly on the thresholds and one ulp either side, zeros, all-zero blocks, huge and tiny blocks."""
    thresholds = R.thresholds(quant_type)
    if quant_type == "fp4":
        thresholds = torch.cat([thresholds, -thresholds])
    on = thresholds
    above = torch.nextafter(on, torch.tensor(2.0))
    below = torch.nextafter(on, torch.tensor(-2.0))
    # Each block gets absmax exactly 1.0 so the scaled values are the values themselves.
    edge_values = torch.cat([on, above, below, torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30])])
    blocks = [torch.cat([torch.ones(1), chunk, torch.zeros(63 - chunk.numel())]) for chunk in edge_values.split(32)]
    blocks.append(torch.zeros(64))  # all-zero block
    blocks.append(torch.randn(64) * 1e30)  # huge
    blocks.append(torch.randn(64) * 1e-30)  # tiny (1 / absmax still finite)
    blocks.append(torch.full((64,), -3.5))  # constant block: every element is -absmax
    A = torch.cat(blocks).to(device)
    packed, absmax = assert_quantize_matches_reference(A, 64, quant_type)
    out = F.dequantize_4bit(packed, absmax, 64, quant_type, A.shape, torch.float32).cpu()
    zero_block = out[(len(blocks) - 4) * 64 : (len(blocks) - 3) * 64]
    assert torch.equal(zero_block, torch.zeros(64)) and not torch.signbit(zero_block).any(), "all-zero block"
    assert torch.equal(out[-64:], torch.full((64,), -3.5))


@pytest.mark.parametrize("n", [0, 1, 255, 256, 257, 5000])
def test_blockwise_8bit_matches_reference(device, n):
    code = F.dynamic_map_8bit(device)
    A = torch.randn(n, device=device) * 0.7
    poison_allocator(device, n * 4 + 1024)
    q, absmax = F.quantize_blockwise_8bit(A, code, 256)
    ref_q, ref_absmax = R.quantize_blockwise_8bit(A.cpu(), code.cpu(), 256)
    assert torch.equal(q.cpu(), ref_q) and torch.equal(absmax.cpu(), ref_absmax)
    out = F.dequantize_blockwise_8bit(q, absmax, code, 256)
    assert torch.equal(out.cpu(), R.dequantize_blockwise_8bit(ref_q, ref_absmax, code.cpu(), 256))


def test_8bit_search_is_nearest_and_hits_code_points(device):
    code = F.dynamic_map_8bit(device)
    # The code points themselves (scaled by an absmax of 1) and random values: nearest code, ties aside.
    A = torch.cat([torch.tensor([1.0]), code.cpu(), torch.rand(3000) * 2 - 1]).to(device)  # one block
    q, absmax = F.quantize_blockwise_8bit(A, code, 4096)
    assert torch.equal(absmax.cpu(), torch.ones_like(absmax.cpu()))
    q = q.cpu().long()
    assert torch.equal(code.cpu()[q[1:257]], code.cpu()), "a code point must map to itself"
    values = A.cpu()
    nearest = (values[:, None] - code.cpu()[None]).abs().min(1).values
    assert torch.equal((values - code.cpu()[q]).abs(), nearest)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_nested_dequantize_matches_reference(device, quant_type, out_dtype):
    W = torch.randn(130, 333).to(device)
    q = qpeft.Quantized4bitWeight.from_float(W, quant_type, 64, double_quant=True)
    scales = R.dequantize_nested_absmax(
        q.absmax.cpu(), q.nested_absmax.cpu(), q.nested_code.cpu(), q.nested_offset.cpu()
    )
    assert torch.equal(q.fp32_scales().cpu(), scales)
    expected = R.dequantize_4bit(q.packed.cpu(), scales, 64, quant_type, W.shape, out_dtype)
    poison_allocator(device, W.numel() * 4)
    assert torch.equal(q.dequantize(out_dtype).cpu(), expected)


def test_approx_reciprocal_matches_reference(device):
    special = torch.tensor([0.0, 1.0, 2.0, 0.75, 3.0, 1e-40, 1.1754944e-38, 8.5e37, 3e38, 65504.0])
    x = torch.cat([special, torch.rand(100000) * 10, torch.randn(100000).abs() * 1e-20]).to(device)
    out = torch.ops.qpeft._approx_reciprocal(x)
    assert torch.equal(out.cpu(), R.approx_reciprocal(x.cpu()))
    # a faithful rounding: never more than one ulp from the correctly rounded reciprocal
    normal = (x > 1.2e-38) & (x < 8e37)
    ieee = (1.0 / x[normal]).view(torch.int32)
    assert ((out[normal].view(torch.int32) - ieee).abs() <= 1).all()


@pytest.mark.cuda
def test_cuda_reciprocal_instruction_equals_cpu_emulation_for_every_mantissa():
    mantissas = torch.arange(2**23, dtype=torch.int32)
    for exponent in (1, 100, 127, 140, 200, 252):
        x = (mantissas | (exponent << 23)).view(torch.float32)
        assert torch.equal(torch.ops.qpeft._approx_reciprocal(x.cuda()).cpu(), torch.ops.qpeft._approx_reciprocal(x))


def test_reciprocal_choice_changes_fp4_bytes_of_bf16_weights():
    """Why the reciprocal is emulated: with bf16 weights, FP4 ties at 11/128 are common, so scaling by the
    correctly rounded reciprocal instead would change real bytes (and break identity with bitsandbytes' GPU)."""
    A = (torch.randn(1024, 1024) * 2).to(torch.bfloat16)
    packed, absmax = F.quantize_4bit(A, 64, "fp4")
    scaled_ieee = A.float().reshape(-1, 64) * (1.0 / absmax)[:, None]
    ieee_packed = R.pack_nibbles(R.codes_4bit(scaled_ieee.reshape(-1), "fp4"), 0)
    assert (ieee_packed != packed).any()
    assert torch.equal(packed, R.quantize_4bit(A, 64, "fp4")[0])


def test_non_contiguous_input(device):
    base = torch.randn(96, 200, device=device)
    A = base.t()[:, ::2]  # non-contiguous view
    assert not A.is_contiguous()
    packed, absmax = F.quantize_4bit(A, 64, "nf4")
    ref_packed, ref_absmax = R.quantize_4bit(A.contiguous().cpu(), 64, "nf4")
    assert torch.equal(packed.cpu(), ref_packed) and torch.equal(absmax.cpu(), ref_absmax)
    # a packed view with a storage offset (misaligned for 16-byte loads) still dequantizes correctly
    big_packed, big_absmax = F.quantize_4bit(torch.randn(64 * 40, device=device), 64, "nf4")
    part = big_packed[32 * 3 + 1 :][: 32 * 2]  # not 16-byte aligned
    absmax_part = big_absmax[4:6].clone()
    out = F.dequantize_4bit(part, absmax_part, 64, "nf4", (128,), torch.bfloat16)
    ref = R.dequantize_4bit(part.cpu().clone(), absmax_part.cpu(), 64, "nf4", (128,), torch.bfloat16)
    assert torch.equal(out.cpu(), ref)


def test_opcheck_all_ops(device):
    A = torch.randn(3, 100, device=device)
    packed, absmax = qpeft.functional.quantize_4bit(A, 64, "nf4")
    code = F.dynamic_map_8bit(device)
    q8, absmax2 = F.quantize_blockwise_8bit(absmax - absmax.mean(), code, 256)
    offset = absmax.mean().reshape(1)
    ops = torch.ops.qpeft
    cases = [
        (ops.quantize_4bit, (A, 64, "nf4")),
        (ops.quantize_4bit, (A.to(torch.bfloat16), 32, "fp4")),
        (ops.dequantize_4bit, (packed, absmax, None, None, None, 64, "nf4", [3, 100], torch.bfloat16)),
        (ops.dequantize_4bit, (packed, q8, absmax2, code, offset, 64, "nf4", [3, 100], torch.float16)),
        (ops.quantize_blockwise_8bit, (absmax, code, 256)),
        (ops.dequantize_blockwise_8bit, (q8, absmax2, code, 256)),
        (ops._approx_reciprocal, (absmax,)),
    ]
    for op, args in cases:
        opcheck(op, args)


def test_bad_inputs_raise_clear_errors(device):
    A = torch.randn(128, device=device)
    with pytest.raises(ValueError, match="blocksize"):
        F.quantize_4bit(A, 48, "nf4")
    with pytest.raises(ValueError, match="blocksize"):
        F.quantize_4bit(A, 8192, "nf4")
    with pytest.raises(ValueError, match="quant_type"):
        F.quantize_4bit(A, 64, "int4")
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        F.quantize_4bit(A.double(), 64, "nf4")
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        F.quantize_4bit(A.int(), 64, "nf4")
    with pytest.raises(ValueError, match="inf or NaN"):
        F.quantize_4bit(torch.tensor([1.0, float("nan")], device=device), 64, "nf4")
    packed, absmax = F.quantize_4bit(A, 64, "nf4")
    with pytest.raises(ValueError, match="absmax must have 2 elements"):
        F.dequantize_4bit(packed, absmax[:1], 64, "nf4", (128,), torch.float32)
    with pytest.raises(ValueError, match="packed"):
        F.dequantize_4bit(packed, absmax, 64, "nf4", (300,), torch.float32)
    with pytest.raises(TypeError, match="dequantized dtype"):
        F.dequantize_4bit(packed, absmax, 64, "nf4", (128,), torch.int32)
    with pytest.raises(ValueError, match="nested"):
        F.dequantize_4bit(packed, absmax.to(torch.uint8), 64, "nf4", (128,), torch.float32)
    # the C++ ops check on their own too (direct torch.ops calls never crash)
    with pytest.raises(ValueError, match="blocksize"):
        torch.ops.qpeft.quantize_4bit(A, 100, "nf4")
    with pytest.raises(TypeError, match="absmax must be Float"):
        torch.ops.qpeft.dequantize_4bit(packed, absmax.half(), None, None, None, 64, "nf4", [128], torch.float32)
    with pytest.raises(ValueError, match="code must have 256"):
        torch.ops.qpeft.quantize_blockwise_8bit(A, torch.zeros(10, device=device), 256)


@pytest.mark.cuda
def test_mixed_devices_raise():
    A = torch.randn(128, device="cuda")
    packed, absmax = F.quantize_4bit(A, 64, "nf4")
    with pytest.raises(ValueError, match="absmax is on cpu"):
        F.dequantize_4bit(packed, absmax.cpu(), 64, "nf4", (128,), torch.float32)
    with pytest.raises(ValueError, match="absmax is on cpu"):
        torch.ops.qpeft.dequantize_4bit(packed, absmax.cpu(), None, None, None, 64, "nf4", [128], torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_cuda_matches_cpu_on_a_large_weight(quant_type):
    W = torch.randn(4096, 4096 + 64, dtype=torch.bfloat16)
    cpu = qpeft.Quantized4bitWeight.from_float(W, quant_type, 64, double_quant=False)
    gpu = qpeft.Quantized4bitWeight.from_float(W.cuda(), quant_type, 64, double_quant=False)
    assert torch.equal(gpu.packed.cpu(), cpu.packed) and torch.equal(gpu.absmax.cpu(), cpu.absmax)
    assert torch.equal(gpu.dequantize().cpu(), cpu.dequantize())
    # Double quantization: the offset is torch's mean of the scales, whose summation order is the device's
    # own (bitsandbytes has the same property), so each device is checked against the reference of its state.
    nested = qpeft.Quantized4bitWeight.from_float(W.cuda(), quant_type, 64, double_quant=True)
    q8, absmax2 = R.quantize_blockwise_8bit(gpu.absmax.cpu() - nested.nested_offset.cpu(), nested.nested_code.cpu())
    assert torch.equal(nested.absmax.cpu(), q8) and torch.equal(nested.nested_absmax.cpu(), absmax2)
    scales = R.dequantize_nested_absmax(q8, absmax2, nested.nested_code.cpu(), nested.nested_offset.cpu())
    expected = R.dequantize_4bit(cpu.packed, scales, 64, quant_type, W.shape, torch.bfloat16)
    assert torch.equal(nested.dequantize().cpu(), expected)


def test_values_whose_block_reciprocal_flushes_to_zero_are_refused():
    """Above 2^126 the GPU reciprocal (rcp.approx.ftz) of a block's absmax is 0, so every code would be 0."""
    W = torch.randn(4, 64)
    W[1, 5] = 2.0**127
    with pytest.raises(ValueError, match="2\\^126"):
        F.quantize_4bit(W)
    W[1, 5] = 2.0**125  # representable: dequantizes back to itself (it is its block's absmax)
    packed, absmax = F.quantize_4bit(W)
    assert F.dequantize_4bit(packed, absmax, 64, "nf4", W.shape, torch.float32)[1, 5] == 2.0**125
