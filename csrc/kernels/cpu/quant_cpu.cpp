// CPU implementations of quant_cpu.h. Portable C++ (no -march flags): the inner loops are simple enough
// for the compiler's auto-vectorizer, and dequantization works from a per-block 16-entry table of already
// converted outputs, so the per-element work is two table lookups per packed byte.
#include "quant_cpu.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <vector>

#include "../float_convert.h"
#include "code_books.h"
#include "cpu_isa.h"
#include "dequantize_4bit_avx2.h"
#include "dequantize_4bit_avx512.h"
#include "cpu_simd.h"

namespace qpeft::cpu {
namespace {

template <typename Load>
float block_absmax(Load load, int64_t begin, int64_t end) {
  float m = 0.0f;
  for (int64_t i = begin; i < end; ++i) m = std::max(m, std::fabs(load(i)));
  return m;
}

// Fills table[c] with the output-format bits of fp32(code[c] * scale), for the 16 codes.
template <typename OutT>
void scaled_table(const float* code_values, float scale, FloatFormat fmt, OutT* table) {
  for (int c = 0; c < 16; ++c) {
    const float v = code_values[c] * scale;
    if constexpr (sizeof(OutT) == 4) {
      table[c] = v;
    } else {
      table[c] = fmt == FloatFormat::BF16 ? float_to_bf16_bits(v) : float_to_fp16_bits(v);
    }
  }
}

// dst[i - e_begin] = table[code of element i] for the elements [e_begin, e_end) (one block's table).
template <typename OutT>
inline void lookup_elements(const uint8_t* packed, const OutT* __restrict table, int64_t e_begin, int64_t e_end,
                            OutT* __restrict dst) {
  int64_t e = e_begin;
  if (e < e_end && (e & 1)) *dst++ = table[packed[e / 2] & 0xF], ++e;  // starts on a low nibble
  const uint8_t* bytes = packed + e / 2;
  const int64_t pairs = (e_end - e) / 2;
  for (int64_t j = 0; j < pairs; ++j) {
    const uint8_t byte = bytes[j];
    dst[2 * j] = table[byte >> 4];
    dst[2 * j + 1] = table[byte & 0xF];
  }
  if (e + 2 * pairs < e_end) dst[2 * pairs] = table[bytes[pairs] >> 4];  // ends on a high nibble
}

template <typename OutT>
QPEFT_NO_AUTOVEC void dequantize_4bit_tile_typed(const uint8_t* packed, const BlockScales& scales, int64_t K,
                                                 int64_t blocksize, QuantType type, int64_t r0, int64_t r1, int64_t c0,
                                                 int64_t c1, OutT* out, int64_t ld, FloatFormat fmt) {
  const float* code_values = cpu::code_values(type);
  // Block of element e: a shift for the power-of-two blocksizes qpeft's ops take (a 64-bit division per
  // segment cost ~15% of the instructions at blocksize 64).
  const int shift =
      std::has_single_bit(static_cast<uint64_t>(blocksize)) ? std::countr_zero(static_cast<uint64_t>(blocksize)) : -1;
  OutT table[16];
  int64_t table_block = -1;
  for (int64_t r = r0; r < r1; ++r) {
    OutT* dst = out + (r - r0) * ld;
    const int64_t row_end = r * K + c1;
    // Segments of the row that stay in one quantization block (rows and tiles may start mid-block).
    for (int64_t e = r * K + c0; e < row_end;) {
      const int64_t block = shift >= 0 ? e >> shift : e / blocksize;
      const int64_t seg_end = std::min((block + 1) * blocksize, row_end);
      if (block != table_block) scaled_table(code_values, scales(block), fmt, table), table_block = block;
      lookup_elements(packed, table, e, seg_end, dst);
      dst += seg_end - e;
      e = seg_end;
    }
  }
}

std::vector<uint8_t>& reciprocal_table() {
  static std::vector<uint8_t> table;
  return table;
}

constexpr int64_t kReciprocalTableBytes = int64_t{1} << 21;

}  // namespace

void set_reciprocal_table(const uint8_t* packed, int64_t nbytes) {
  if (nbytes != kReciprocalTableBytes) throw std::invalid_argument("qpeft: reciprocal table must be 2^21 bytes");
  reciprocal_table().assign(packed, packed + nbytes);
}

bool has_reciprocal_table() { return reciprocal_table().size() == kReciprocalTableBytes; }

float approx_reciprocal(float x) {
  if (x == 0.0f) return 0.0f;
  const uint32_t bits = float_bits(x);
  const uint32_t exponent = (bits >> 23) & 0xFFu, mantissa = bits & 0x7FFFFFu;
  if (exponent == 0) return std::numeric_limits<float>::infinity();  // subnormal input flushed to zero
  if (exponent >= 253) return 0.0f;                                  // subnormal result flushed to zero
  const int delta = ((reciprocal_table()[mantissa >> 2] >> (2 * (mantissa & 3))) & 3) - 1;
  return bits_float(float_bits(1.0f / x) + static_cast<uint32_t>(delta));
}

namespace {

// The common half of every blockwise quantizer: for each block of [block_begin, block_end), write its absmax
// and call code_block(begin, end, reciprocal) to code its elements [begin, end) scaled by the reciprocal.
template <typename Load, typename CodeBlock>
void quantize_blocks(Load load, int64_t n, int64_t blocksize, float* absmax, int64_t block_begin, int64_t block_end,
                     CodeBlock code_block) {
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t begin = b * blocksize;
    const int64_t end = std::min(begin + blocksize, n);
    absmax[b] = block_absmax(load, begin, end);
    code_block(begin, end, approx_reciprocal(absmax[b]));
  }
}

}  // namespace

void quantize_4bit(const void* A, FloatFormat fmt, int64_t n, int64_t blocksize, QuantType type, uint8_t* packed,
                   float* absmax, int64_t block_begin, int64_t block_end) {
  auto load = [&](int64_t i) { return load_as_float(A, fmt, i); };
  const uint8_t pad = zero_code_4bit(type);
  quantize_blocks(load, n, blocksize, absmax, block_begin, block_end, [&](int64_t begin, int64_t end, float r) {
    for (int64_t i = begin; i < end; i += 2) {
      const uint8_t hi = quantize_4bit_value(load(i) * r, type);
      const uint8_t lo = i + 1 < end ? quantize_4bit_value(load(i + 1) * r, type) : pad;
      packed[i / 2] = static_cast<uint8_t>((hi << 4) | lo);
    }
  });
}

void dequantize_4bit(const uint8_t* packed, const BlockScales& scales, int64_t n, int64_t blocksize, QuantType type,
                     void* out, FloatFormat fmt, int64_t block_begin, int64_t block_end) {
  // The blocks' elements as columns of the flattened tensor seen as one row of n elements.
  const int64_t c0 = block_begin * blocksize, c1 = std::min(block_end * blocksize, n);
  if (c0 >= c1) return;
  void* dst = static_cast<char*>(out) + c0 * (fmt == FloatFormat::F32 ? 4 : 2);
  dequantize_4bit_tile(packed, scales, n, blocksize, type, 0, 1, c0, c1, dst, 0, fmt);
}

void dequantize_4bit_tile(const uint8_t* packed, const BlockScales& scales, int64_t K, int64_t blocksize,
                          QuantType type, int64_t r0, int64_t r1, int64_t c0, int64_t c1, void* out, int64_t ld,
                          FloatFormat fmt) {
  if (cpu_has(CpuIsa::Avx512)) {
    dequantize_4bit_tile_avx512(packed, scales, K, blocksize, type, r0, r1, c0, c1, out, ld, fmt);
    return;
  }
  if (cpu_has(CpuIsa::Avx2)) {
    dequantize_4bit_tile_avx2(packed, scales, K, blocksize, type, r0, r1, c0, c1, out, ld, fmt);
    return;
  }
  if (fmt == FloatFormat::F32) {
    dequantize_4bit_tile_typed(packed, scales, K, blocksize, type, r0, r1, c0, c1, static_cast<float*>(out), ld, fmt);
  } else {
    dequantize_4bit_tile_typed(packed, scales, K, blocksize, type, r0, r1, c0, c1, static_cast<uint16_t*>(out), ld,
                               fmt);
  }
}

void quantize_blockwise_8bit(const float* A, const float* code, int64_t n, int64_t blocksize, uint8_t* q, float* absmax,
                             int64_t block_begin, int64_t block_end) {
  auto load = [&](int64_t i) { return A[i]; };
  quantize_blocks(load, n, blocksize, absmax, block_begin, block_end, [&](int64_t begin, int64_t end, float r) {
    for (int64_t i = begin; i < end; ++i) q[i] = quantize_8bit_value(code, A[i] * r);
  });
}

void dequantize_blockwise_8bit(const uint8_t* q, const float* absmax, const float* code, int64_t n, int64_t blocksize,
                               float* out, int64_t block_begin, int64_t block_end) {
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t begin = b * blocksize;
    const int64_t end = std::min(begin + blocksize, n);
    const float scale = absmax[b];
    for (int64_t i = begin; i < end; ++i) out[i] = code[q[i]] * scale;
  }
}

}  // namespace qpeft::cpu
