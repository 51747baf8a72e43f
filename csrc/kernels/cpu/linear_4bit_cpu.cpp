#include "linear_4bit_cpu.h"

#include <algorithm>

namespace qpeft::cpu {
namespace {

constexpr float kNF4Values[16] = {QPEFT_NF4_CODE_VALUES};
constexpr float kFP4Values[16] = {QPEFT_FP4_CODE_VALUES};
constexpr int64_t kMaxSegment = 4096;  // the largest blocksize: one block's decoded weights

// The hot loop, compiled for several instruction sets and picked at run time (portable binary).
__attribute__((target_clones("avx512f", "avx2", "default"))) float dot(const float* a, const float* b,
                                                                         int64_t n) {
  float acc[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    for (int j = 0; j < 16; ++j) acc[j] += a[i + j] * b[i + j];
  }
  float total = 0.0f;
  for (int j = 0; j < 16; ++j) total += acc[j];
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

// Decodes elements [e_begin, e_end) of the flattened weight (all in one block, scale `scale`) into out.
inline void decode(const uint8_t* packed, const float* code_values, float scale, int64_t e_begin, int64_t e_end,
                   float* out) {
  int64_t e = e_begin;
  if (e & 1) *out++ = code_values[packed[e / 2] & 0xF] * scale, ++e;
  for (; e + 1 < e_end; e += 2) {
    const uint8_t byte = packed[e / 2];
    *out++ = code_values[byte >> 4] * scale;
    *out++ = code_values[byte & 0xF] * scale;
  }
  if (e < e_end) *out++ = code_values[packed[e / 2] >> 4] * scale;
}

}  // namespace

void linear_4bit(const float* x, int64_t M, int64_t K, const uint8_t* packed, const BlockScales& scales,
                 int64_t blocksize, QuantType type, float* y, int64_t N, int64_t n_begin, int64_t n_end) {
  const float* code_values = type == QuantType::NF4 ? kNF4Values : kFP4Values;
  alignas(64) float segment[kMaxSegment];
  for (int64_t n = n_begin; n < n_end; ++n) {
    for (int64_t m = 0; m < M; ++m) y[m * N + n] = 0.0f;
    const int64_t row_begin = n * K, row_end = row_begin + K;
    // Walk the row in segments that never cross a quantization block (rows may start mid-block).
    for (int64_t e = row_begin; e < row_end;) {
      const int64_t block = e / blocksize;
      const int64_t seg_end = std::min((block + 1) * blocksize, row_end);
      decode(packed, code_values, scales(block), e, seg_end, segment);
      for (int64_t m = 0; m < M; ++m) y[m * N + n] += dot(segment, x + m * K + (e - row_begin), seg_end - e);
      e = seg_end;
    }
  }
}

}  // namespace qpeft::cpu
