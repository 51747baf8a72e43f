// AVX2 building block of the 4-bit CPU kernels: the 16-entry code-book lookup of 8 codes. Call only when
// cpu_has(CpuIsa::Avx2).
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#define QPEFT_AVX2_FN inline __attribute__((target("avx2,fma")))

namespace qpeft::cpu::avx2 {

// The 8 fp32 table values of the 8 codes in 4 packed bytes (high nibble first), the 16-entry table in two
// registers (entries 0-7 in lo, 8-15 in hi): bytes -> int32 lanes -> nibbles -> two 8-entry permutes + blend.
QPEFT_AVX2_FN __m256 decode8(const uint8_t* bytes4, __m256 lo, __m256 hi) {
  uint32_t word;
  std::memcpy(&word, bytes4, 4);
  const __m128i duplicate = _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m256i bytes = _mm256_cvtepu8_epi32(_mm_shuffle_epi8(_mm_cvtsi32_si128(static_cast<int>(word)), duplicate));
  const __m256i idx =
      _mm256_and_si256(_mm256_srlv_epi32(bytes, _mm256_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0)), _mm256_set1_epi32(0xF));
  const __m256 upper = _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, _mm256_set1_epi32(7)));
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx), upper);
}

}  // namespace qpeft::cpu::avx2
