// The small-M 4-bit linear kernels (linear_4bit_cpu.h) for AVX-512 CPUs: per quantization block the 16 scaled
// code values sit in one register and a permute decodes 16 (fp32) or 32 (bf16) weights at a time. Same
// contracts as linear_4bit / linear_4bit_grad_input; call only at the level and shapes named.
#pragma once

#include <cstdint>

#include "../quant_rules.h"

namespace qpeft::cpu {

// cpu_has(Avx512), K % 16 == 0. fp32 weights (the exact dequantized values) times fp32 x, fp32 accumulation.
void linear_4bit_avx512(const float* x, int64_t M, int64_t K, const uint8_t* packed, const BlockScales& scales,
                        int64_t blocksize, QuantType type, float* y, int64_t N, int64_t n_begin, int64_t n_end);

// cpu_has(Avx512Bf16), K % 32 == 0. x as bf16 bits; weights rounded to bf16 (as dequantizing to bf16 does),
// pairwise bf16 products accumulated in fp32 (vdpbf16ps).
void linear_4bit_avx512_bf16(const uint16_t* x, int64_t M, int64_t K, const uint8_t* packed, const BlockScales& scales,
                             int64_t blocksize, QuantType type, float* y, int64_t N, int64_t n_begin, int64_t n_end);

// cpu_has(Avx512), K, k_begin, k_end multiples of 16.
void linear_4bit_grad_input_avx512(const float* dy, int64_t M, int64_t N, const uint8_t* packed,
                                   const BlockScales& scales, int64_t blocksize, QuantType type, float* dx, int64_t K,
                                   int64_t k_begin, int64_t k_end);

}  // namespace qpeft::cpu
