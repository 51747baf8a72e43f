"""LoRA dropout regenerated from (seed, offset): exact against the NumPy reference, statistically sound."""

import math

import pytest
import torch
from torch.library import opcheck

from qpeft import functional as F
from qpeft import reference as R

from helpers import poison_allocator


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(0, 7), (1, 1), (3, 5, 17), (64, 4097)])
@pytest.mark.parametrize("p", [0.0, 0.05, 0.5])
def test_matches_reference(device, dtype, shape, p):
    x = torch.randn(shape, dtype=dtype, device=device)
    seed, offset = int(torch.randint(-(2**62), 2**62, ())), int(torch.randint(0, 2**40, ()))
    poison_allocator(device, x.numel() * x.element_size())
    out = F.lora_dropout(x, p, seed, offset)
    assert out.shape == x.shape and out.dtype == dtype
    assert torch.equal(out.cpu(), R.lora_dropout(x.cpu(), p, seed, offset))


def test_non_contiguous_input_uses_logical_order(device):
    base = torch.randn(40, 30, device=device)
    x = base.t()
    assert torch.equal(F.lora_dropout(x, 0.3, 7).cpu(), R.lora_dropout(x.contiguous().cpu(), 0.3, 7))


def test_offset_selects_a_slice_of_the_same_stream(device):
    x = torch.randn(100, 64, device=device)
    full = F.lora_dropout(x, 0.25, seed=123)
    assert torch.equal(F.lora_dropout(x[37:], 0.25, seed=123, offset=37 * 64), full[37:])


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_keep_rate(p):
    n = 2_000_000
    keep = R.dropout_keep_mask((n,), p, seed=2024)
    kept = F.lora_dropout(torch.ones(n), p, seed=2024) != 0
    assert torch.equal(kept, keep)
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(kept.sum().item() - n * (1 - p)) < 6 * sigma
    # kept values are exactly 1 / (1 - p) in fp32
    assert torch.equal(F.lora_dropout(torch.ones(4), 0.0, 1), torch.ones(4))
    values = F.lora_dropout(torch.ones(n), p, seed=2024)[kept]
    assert torch.equal(values, torch.full_like(values, (1.0 / torch.tensor(1 - p, dtype=torch.float32)).item()))


def test_seeds_and_neighbours_are_independent():
    n, p = 1_000_000, 0.5
    a = R.dropout_keep_mask((n,), p, seed=1).float()
    b = R.dropout_keep_mask((n,), p, seed=2).float()
    assert torch.equal(F.lora_dropout(torch.ones(n), p, 1) != 0, a.bool())  # the op is the reference
    for u, v in ((a, b), (a[:-1], a[1:]), (a[:-64], a[64:])):
        corr = torch.corrcoef(torch.stack([u, v]))[0, 1].item()
        assert abs(corr) < 6 / math.sqrt(n), corr
    assert not torch.equal(a, b)


def test_bad_inputs(device):
    x = torch.randn(4, 4, device=device)
    for p in (1.0, 0.999999, -0.1, float("nan"), "0.1", True):  # 0.999999: the 16-bit mask cannot keep 1e-6
        with pytest.raises(ValueError, match=r"\[0, 0.999\]"):
            F.lora_dropout(x, p, 0)
    for p in (-0.1, 0.9995, 1.0):
        with pytest.raises(ValueError, match=r"\[0, 0.999\]"):
            torch.ops.qpeft.lora_dropout(x, p, seed_tensor(0, device), 0)
    assert F.lora_dropout(x, F.MAX_DROPOUT_P, 0).shape == x.shape
    with pytest.raises(TypeError, match="int64"):
        torch.ops.qpeft.lora_dropout(x, 0.1, torch.zeros(1, device=device), 0)
    with pytest.raises(ValueError, match="one element"):
        torch.ops.qpeft.lora_dropout(x, 0.1, torch.zeros(2, dtype=torch.int64, device=device), 0)
    with pytest.raises(TypeError, match="one int64 element"):
        F.lora_dropout(x, 0.1, torch.zeros(2, dtype=torch.int64))
    for seed in ("7", 1.5, True, None):  # never converted silently
        with pytest.raises(TypeError, match="dropout seed must be an integer"):
            F.lora_dropout(x, 0.1, seed)
    with pytest.raises(ValueError, match="int64"):
        F.lora_dropout(x, 0.1, 2**64)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        F.lora_dropout(x.double(), 0.1, 0)


def test_opcheck(device):
    opcheck(torch.ops.qpeft.lora_dropout, (torch.randn(3, 33, device=device), 0.1, seed_tensor(5, device), 11))
    opcheck(
        torch.ops.qpeft.lora_dropout,
        (torch.randn(2, 8, device=device, dtype=torch.bfloat16), 0.5, seed_tensor(-3, device), 0),
    )


def seed_tensor(seed, device):
    return torch.tensor([seed], dtype=torch.int64, device=device)


def test_seed_tensor_equals_int_seed(device):
    x = torch.randn(5, 17, device=device)
    assert torch.equal(F.lora_dropout(x, 0.3, seed_tensor(2**62 + 5, device)), F.lora_dropout(x, 0.3, 2**62 + 5))


def finite_fp32_edge_values():
    """Finite fp32 values of both signs over every exponent, with mantissas that put a rounding tie (and its
    neighbours) at every bit position: the fp16 ties (13 dropped bits, more for fp16 subnormals), the bf16 ties
    (16 bits), the overflow edge of fp16 (65504 / 65520); and random mantissas."""
    positions = torch.arange(23, dtype=torch.int64)
    one_bit = 1 << positions
    mantissas = torch.cat(
        [
            one_bit,
            one_bit | (one_bit << 1),
            one_bit - 1,
            (one_bit - 1) | (1 << 22),
            torch.randint(0, 1 << 23, (64,)),
            torch.tensor([0, (1 << 23) - 1]),
        ]
    ) & ((1 << 23) - 1)
    exponents = torch.arange(0, 255, dtype=torch.int64)
    bits = (exponents[:, None] << 23 | mantissas[None, :]).flatten()
    bits = torch.cat([bits, bits | (1 << 31)])
    values = bits.to(torch.int32).view(torch.float32)  # int64 -> int32 wraps the sign bit in
    return torch.cat([values, torch.tensor([65504.0, 65519.99, 65520.0, -65520.0, 2.0**-24, 2.0**-25, 3 * 2.0**-26])])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_format_conversions_round_like_torch(device, dtype):
    """The kernels' fp32 -> 16-bit rounding (to nearest even, overflow to inf, subnormals) and 16-bit -> fp32
    widening equal torch's .to() for every kind of finite value. Written through lora_down_grad_input with
    r = 1, A = [[1]] and no dropout (dx = round(g)), its accumulating form (dx = round(float(dx) + g)) and
    lora_dropout's identity for every finite 16-bit pattern. (At CPU level avx512_bf16 a bf16 dx is a bf16 GEMM's
    output, which flushes subnormals; the kernels' own rounding is checked one level below.)"""
    previous = F.set_cpu_isa("avx512")
    try:
        check_format_conversions(device, dtype)
    finally:
        F.set_cpu_isa(previous)


def check_format_conversions(device, dtype):
    g = finite_fp32_edge_values()
    g = g[g.view(torch.int32) != -(2**31)].to(device)  # not -0.0: the GEMM g A gives 0 + (-0) = +0 there
    A = torch.ones(1, 1, device=device)
    narrowed = F.lora_down_grad_input(g[:, None], A, 0.0, 0, dtype=dtype)[:, 0]
    assert torch.equal(narrowed.view(torch.int16).cpu(), g.to(dtype).view(torch.int16).cpu())

    patterns = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    finite = patterns[torch.isfinite(patterns)].to(device)
    assert torch.equal(F.lora_dropout(finite, 0.0, 0).view(torch.int16), finite.view(torch.int16))
    base = finite[torch.randint(0, finite.numel(), (g.numel(),))]
    acc = base.clone()[:, None]
    F.lora_down_grad_input_(acc, (g * 0.5)[:, None], A, 0.0, 0)
    assert torch.equal(acc[:, 0].view(torch.int16).cpu(), (base.float() + g * 0.5).to(dtype).view(torch.int16).cpu())


def test_mean_is_kept_near_the_largest_p():
    """E[drop(x)] = x up to MAX_DROPOUT_P: the mask's keep rate is within 1% of 1 - p there (above it the 16-bit
    threshold saturates while 1 / (1 - p) does not, so larger p are refused)."""
    p = F.MAX_DROPOUT_P
    keep = 1 - R.dropout_threshold(p) / 65536
    assert abs(keep / (1 - p) - 1) < 0.01
    x = torch.ones(4_000_000)
    mean = F.lora_dropout(x, p, 123).double().mean().item()
    assert abs(mean - 1) < 5 * math.sqrt(p / (1 - p) / x.numel()) + 0.01
