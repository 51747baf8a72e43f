"""Helpers shared by the tests."""

import torch

from qpeft import reference as R


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 on the CPU (the norm of b floored at 1e-30)."""
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def dropped64(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """drop(x) in float64 with the reference mask (counters = row-major index of the [M, K] input)."""
    if p == 0:
        return x.double()
    keep = R.dropout_keep_mask(x.shape, p, seed).to(x.device)
    return torch.where(keep, x.double() / (1 - p), torch.zeros((), dtype=torch.float64, device=x.device))


def poison_allocator(device: torch.device, nbytes: int) -> None:
    """Fill and free blocks of the sizes an op is about to allocate, so that an output element the kernel
    forgets to write holds 0xFF garbage (NaN for floats) instead of fresh zeros (caching allocators and malloc
    hand the same memory back)."""
    for size in (nbytes, max(1, nbytes // 2), max(1, nbytes // 4)):
        t = torch.full((size,), 0xFF, dtype=torch.uint8, device=device)
        del t


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """dtype, shape and every byte equal (unlike torch.equal, packed bytes that read as NaN compare equal)."""
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)))
