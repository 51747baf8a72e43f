// Fused 4-bit linear for small M on the CPU: y[m, n] = sum_k x[m, k] * W[n, k], W read once from its 4-bit
// codes (never materialized), accumulating in fp32. Portable path: each quantization block is decoded into an fp32
// buffer in L1 (the exact values dequantize_4bit gives) and dotted with every input row. x86 CPUs with AVX2+FMA
// (checked at run time) take a SIMD path for K % 8 == 0 that looks codes up in registers and applies each
// block's scale once to the block's dot. Torch-free.
#pragma once

#include <cstdint>

#include "../quant_rules.h"

namespace qpeft::cpu {

// x: [M, K] fp32 row-major; y: [M, N] fp32 row-major; packed/scales: the 4-bit weight [N, K]. Computes the
// output columns [n_begin, n_end) for all M rows.
void linear_4bit(const float* x, int64_t M, int64_t K, const uint8_t* packed, const BlockScales& scales,
                 int64_t blocksize, QuantType type, float* y, int64_t N, int64_t n_begin, int64_t n_end);

// The input gradient of the same layer: dx[m, k] = sum_n dy[m, n] * W[n, k] for dy [M, N] fp32 and dx [M, K]
// fp32 (both row-major), W read once from its codes. Computes the columns [k_begin, k_end) of dx (threads split
// the columns, so none shares an output element).
void linear_4bit_grad_input(const float* dy, int64_t M, int64_t N, const uint8_t* packed, const BlockScales& scales,
                            int64_t blocksize, QuantType type, float* dx, int64_t K, int64_t k_begin, int64_t k_end);

// The kernel linear_4bit (fp32 x) or linear_4bit_bf16 (bf16 x) runs for K columns at the current CPU level.
enum class CodesKernel { Baseline, Avx2, Avx512, Avx512Bf16 };
CodesKernel linear_4bit_kernel(int64_t K, bool bf16_x);
const char* codes_kernel_name(CodesKernel kernel);

// bf16 x (raw bits) and fp32 y, with bf16 weights and products (vdpbf16ps): the same result as dequantizing W
// to bf16 and a bf16 matmul with fp32 accumulation. Only where linear_4bit_bf16_supported(K) (CPU level
// avx512_bf16, K % 32 == 0: linear_4bit_kernel(K, true) == Avx512Bf16); elsewhere a bf16 x is widened to fp32 for
// linear_4bit.
void linear_4bit_bf16(const uint16_t* x, int64_t M, int64_t K, const uint8_t* packed, const BlockScales& scales,
                      int64_t blocksize, QuantType type, float* y, int64_t N, int64_t n_begin, int64_t n_end);

}  // namespace qpeft::cpu
