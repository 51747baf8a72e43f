// The qpeft operator schemas, in one place. Each backend registers its implementation in its own file
// (cpu_ops.cpp, cuda_ops.cpp); the fake (meta) implementations for torch.compile live in qpeft/_ops.py.
//
// Shapes: a 4-bit tensor of n elements is `packed` uint8 [(n + 1) / 2] (element 2j in the high nibble of
// byte j) plus one scale per block of `blocksize` elements: fp32 `absmax` [nblocks], or, double-quantized,
// uint8 `absmax` codes [nblocks] + fp32 `nested_absmax` [ceil(nblocks / 256)] + fp32 `nested_code` [256]
// + fp32 `nested_offset` (one element).
#include <torch/library.h>

TORCH_LIBRARY(qpeft, m) {
  m.def("quantize_4bit(Tensor A, int blocksize, str quant_type) -> (Tensor packed, Tensor absmax)");
  // The 4-bit weight of every op below: packed, absmax, then nested_absmax, nested_code, nested_offset (all three
  // or none: double quantization), blocksize, quant_type.
  m.def(
      "dequantize_4bit(Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, "
      "Tensor? nested_offset, int blocksize, str quant_type, int[] shape, ScalarType dtype) -> Tensor");
  m.def("quantize_blockwise_8bit(Tensor A, Tensor code, int blocksize) -> (Tensor q, Tensor absmax)");
  m.def("dequantize_blockwise_8bit(Tensor q, Tensor absmax, Tensor code, int blocksize) -> Tensor");
  // y = x W^T for x [M, K] and the 4-bit weight W [out_features, K] (plain or nested scales), in x's dtype: the
  // frozen base's matmul on every backend, which picks the path (kernels/linear_4bit_rows.h). Small M: W read once
  // from its codes, fp32 accumulation. More rows: CPU, W dequantized in x's dtype a slab at a time into a small
  // buffer, one GEMM per slab; CUDA, W dequantized into a transient tensor for one GEMM.
  m.def(
      "linear_4bit(Tensor x, Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, "
      "Tensor? nested_offset, int blocksize, str quant_type, int out_features) -> Tensor");
  // dx = dy W for dy [M, out_features] and the same weight: the input gradient of linear_4bit.
  m.def(
      "linear_4bit_grad_input(Tensor dy, Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, "
      "Tensor? nested_offset, int blocksize, str quant_type, int in_features) -> Tensor");
  // LoRA dropout regenerated from (seed, offset): element i of the row-major input is kept iff
  // keep(seed, offset + i) (csrc/kernels/dropout_rng.h); kept values are scaled by 1 / (1 - p). `seed` is a
  // one-element int64 tensor on x's device (read by the kernel: no host sync, capturable in CUDA graphs).
  m.def("lora_dropout(Tensor x, float p, Tensor seed, int offset) -> Tensor");
  // The LoRA down-projection and its gradients with the dropout applied inside (counters = row-major index of
  // the [M, K] input, offset 0): no mask and no dropped copy of x is ever stored.
  //   lora_down:             xa = drop(x) A^T             x [M, K], A [r, K]  -> [M, r] in x's dtype
  //   lora_down_grad_weight: dA = g^T drop(x)             g [M, r], x [M, K]  -> [r, K] fp32
  //   lora_down_grad_input_: dx += drop(g A) (in place)   dx [M, K] contiguous, g [M, r], A [r, K]
  //   lora_down_grad_input:  dx = drop(g A)               g [M, r], A [r, K]  -> [M, K] in `dtype` (written
  //                          once, never read: the form to start a gradient that a GEMM then adds onto)
  m.def("lora_down(Tensor x, Tensor lora_A, float p, Tensor seed) -> Tensor");
  m.def("lora_down_grad_weight(Tensor g, Tensor x, float p, Tensor seed) -> Tensor");
  m.def("lora_down_grad_input_(Tensor(a!) dx, Tensor g, Tensor lora_A, float p, Tensor seed) -> ()");
  m.def("lora_down_grad_input(Tensor g, Tensor lora_A, float p, Tensor seed, ScalarType dtype) -> Tensor");
  // The QLoRA layer, forward: y = x W^T + s * drop(x) A^T B^T (+ bias) and xa = drop(x) A^T (kept for backward),
  // x [M, K], W the 4-bit weight [N, K], A [r, K], B [N, r], bias [N]; y in x's dtype, xa too (fp32 for fp16 x).
  m.def(
      "qlora_forward(Tensor x, Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, "
      "Tensor? nested_offset, int blocksize, str quant_type, Tensor lora_A, Tensor lora_B, Tensor? bias, "
      "float scaling, float p, Tensor seed) -> (Tensor y, Tensor xa)");
  // Backward from dy [M, N], x and xa alone (dropout regenerated): dx = dy W + drop(s dy B A) in dy's dtype,
  // dA = (s dy B)^T drop(x) and dB = s dy^T xa in the adapter's dtypes. W is decoded per call, never kept.
  m.def(
      "qlora_backward(Tensor dy, Tensor x, Tensor xa, Tensor packed, Tensor absmax, Tensor? nested_absmax, "
      "Tensor? nested_code, Tensor? nested_offset, int blocksize, str quant_type, Tensor lora_A, Tensor lora_B, "
      "float scaling, float p, Tensor seed) -> (Tensor dx, Tensor dA, Tensor dB)");
  // The approximate reciprocal used to scale blocks (fp32 in, fp32 out); exposed to test the CPU emulation.
  m.def("_approx_reciprocal(Tensor x) -> Tensor");
}
