// Torch-free CPU kernels of the blockwise quantization formats. Each function processes the blocks
// [block_begin, block_end) so that callers can split the work across threads (blocks are independent and
// never share an output byte because every 4-bit blocksize is even).
//
// Layouts: `A`/`out` are the row-major flattened tensor of n elements; `packed` holds (n + 1) / 2 bytes
// (element 2j in the high nibble of byte j); `absmax` holds one fp32 per block of `blocksize` elements.
// Input element types: float, and 16-bit floats as raw bits (Float16Bits / BFloat16Bits).
#pragma once

#include <cstdint>

#include "../quant_rules.h"

namespace qpeft::cpu {

// The reciprocal correction table (see reference.py: 2^21 bytes, 4 two-bit entries per byte, delta + 1 in
// ulps for each of the 2^23 fp32 mantissas). Must be installed once before any quantize call.
void set_reciprocal_table(const uint8_t* packed, int64_t nbytes);
bool has_reciprocal_table();

// rcp.approx.ftz.f32(x) for x >= 0 (0 for x == 0): correctly rounded 1/x plus the table's delta; subnormal x
// gives +inf, x >= 2^126 gives 0 (flush to zero), as the GPU instruction.
float approx_reciprocal(float x);

// 4-bit: quantize n elements of `A` (format `fmt`) into `packed` and `absmax`.
void quantize_4bit(const void* A, FloatFormat fmt, int64_t n, int64_t blocksize, QuantType type, uint8_t* packed,
                   float* absmax, int64_t block_begin, int64_t block_end);

// 4-bit: out[i] = fmt(code[q_i] * scale[i / blocksize]), one fp32 product then one rounding.
void dequantize_4bit(const uint8_t* packed, const BlockScales& scales, int64_t n, int64_t blocksize, QuantType type,
                     void* out, FloatFormat fmt, int64_t block_begin, int64_t block_end);

// 4-bit, a tile of the weight seen as a row-major [rows, K] matrix: out[(r - r0) * ld + (c - c0)] =
// fmt(code[q] * scale) of element r * K + c, for r in [r0, r1), c in [c0, c1) (the values dequantize_4bit gives
// there). Lets a matmul dequantize W a slab at a time into a small reused buffer instead of all N x K at once.
void dequantize_4bit_tile(const uint8_t* packed, const BlockScales& scales, int64_t K, int64_t blocksize,
                          QuantType type, int64_t r0, int64_t r1, int64_t c0, int64_t c1, void* out, int64_t ld,
                          FloatFormat fmt);

// 8-bit blockwise (double quantization of the scales): fp32 in, codes of the sorted 256-entry `code` out.
void quantize_blockwise_8bit(const float* A, const float* code, int64_t n, int64_t blocksize, uint8_t* q, float* absmax,
                             int64_t block_begin, int64_t block_end);

// 8-bit blockwise dequantization to fp32: out[i] = code[q_i] * absmax[i / blocksize].
void dequantize_blockwise_8bit(const uint8_t* q, const float* absmax, const float* code, int64_t n, int64_t blocksize,
                               float* out, int64_t block_begin, int64_t block_end);

}  // namespace qpeft::cpu
