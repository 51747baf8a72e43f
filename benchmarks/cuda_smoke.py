"""Exercises every CUDA kernel once on odd sizes (for compute-sanitizer runs): quantize/dequantize 4-bit in all
formats and dtypes, nested scales, 8-bit, misaligned packed input, the LoRA-branch kernels (grad_input both
accumulating and writing), the small-M linear and the fused layer forward/backward (QPEFT_CUDA_LORA_KERNELS picks
the LoRA kernel kind). Prints OK when every result matches the CPU."""

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
F.dequantize_4bit(packed[17 : 17 + 64], absmax[:2].contiguous(), 64, "nf4", (128,), torch.bfloat16)
for m, k, r in ((1, 77, 3), (33, 200, 17), (300, 64, 40)):
    x, A, g = torch.randn(m, k).bfloat16(), torch.randn(r, k), torch.randn(m, r)
    assert torch.allclose(
        F.lora_down(x.cuda(), A.cuda(), 0.3, 5).cpu().float(), F.lora_down(x, A, 0.3, 5).float(), rtol=2e-2, atol=2e-2
    )
    assert torch.allclose(
        F.lora_down_grad_weight(g.cuda(), x.cuda(), 0.3, 5).cpu(),
        F.lora_down_grad_weight(g, x, 0.3, 5),
        rtol=1e-4,
        atol=1e-4,
    )
    dx = torch.randn(m, k)
    assert torch.allclose(
        F.lora_down_grad_input_(dx.cuda(), g.cuda(), A.cuda(), 0.3, 5).cpu(),
        F.lora_down_grad_input_(dx.clone(), g, A, 0.3, 5),
        rtol=1e-4,
        atol=1e-4,
    )
    dx16 = dx.bfloat16()  # 16-bit dx: the tensor-core kernel where chosen (QPEFT_CUDA_LORA_KERNELS) and K % 8 == 0
    assert torch.allclose(
        F.lora_down_grad_input_(dx16.cuda(), g.cuda(), A.cuda(), 0.3, 5).cpu().float(),
        F.lora_down_grad_input_(dx16.clone(), g, A, 0.3, 5).float(),
        rtol=2e-2,
        atol=2e-2,
    )
    assert torch.allclose(
        F.lora_down_grad_input(g.cuda(), A.cuda(), 0.3, 5, torch.bfloat16).cpu().float(),
        F.lora_down_grad_input(g, A, 0.3, 5, torch.bfloat16).float(),
        rtol=2e-2,
        atol=2e-2,
    )
    q = qpeft.Quantized4bitWeight.from_float(torch.randn(45, k, device="cuda"))
    if m <= 16:
        y = F.linear_4bit(
            x.cuda(),
            q.packed,
            q.absmax,
            q.blocksize,
            q.quant_type,
            45,
            nested_absmax=q.nested_absmax,
            nested_code=q.nested_code,
            nested_offset=q.nested_offset,
        )
        assert torch.allclose(y.float(), x.cuda().float() @ q.dequantize(torch.float32).T, rtol=2e-2, atol=2e-2)
    layer = qpeft.nn.LoraLinear4bit.from_linear(torch.nn.Linear(k, 45, device="cuda"), r=r, dropout=0.1).train()
    xc = x.cuda().requires_grad_(True)
    layer(xc, dropout_seed=3).float().sum().backward()
    assert torch.isfinite(xc.grad).all() and torch.isfinite(layer.lora_A.grad).all()
torch.cuda.synchronize()
print("OK")
