"""The autograd layer: torch.autograd.Function compositions of qpeft's ops for each adapter layer (the ops'
own autograd, where an op has one, is registered with the op in C++)."""

from .base import base_grad_input, base_matmul, frozen_4bit_linear, weight_args
from .ia3 import ia3_linear
from .lora import dora_linear, lora_branch, qlora_linear
from .selective import masked_linear, sparse_term

__all__ = [
    "base_grad_input",
    "base_matmul",
    "dora_linear",
    "frozen_4bit_linear",
    "ia3_linear",
    "lora_branch",
    "masked_linear",
    "qlora_linear",
    "sparse_term",
    "weight_args",
]
