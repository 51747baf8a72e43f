// AVX-512 building blocks of the 4-bit CPU kernels: 16-entry code-book lookups by permute, and fp32 -> 16-bit
// conversions bit-identical to float_convert.h. Call only when cpu_has(CpuIsa::Avx512).
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "../quant_rules.h"
#include "code_books.h"

#define QPEFT_AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#define QPEFT_AVX512_FN inline QPEFT_AVX512_TARGET

namespace qpeft::cpu::avx512 {

// 16 fp32 code values, in index order.
QPEFT_AVX512_FN __m512 code_book(QuantType type) { return _mm512_load_ps(code_values(type)); }

// Code indices of 16 elements from 8 packed bytes (high nibble first), one per 32-bit lane, for
// _mm512_permutexvar_ps (which reads bits 0-3 of each lane: the bits above them are left in place).
QPEFT_AVX512_FN __m512i indices16(__m128i bytes8) {
  const __m512i v = _mm512_cvtepu8_epi64(bytes8);
  return _mm512_or_si512(_mm512_srli_epi64(v, 4), _mm512_slli_epi64(v, 32));
}

// Code indices of 32 elements from 16 packed bytes, one per 16-bit lane, for _mm512_permutexvar_epi16 on a table
// whose 16 entries are repeated in lanes 16-31 (it reads bits 0-4; bit 4 then selects the same entry).
QPEFT_AVX512_FN __m512i indices32(__m128i bytes16) {
  const __m512i v = _mm512_cvtepu8_epi32(bytes16);
  return _mm512_or_si512(_mm512_srli_epi32(v, 4), _mm512_slli_epi32(v, 16));
}

// Loads the packed bytes of elements [e, e + n) (e even, n <= 2 * max_bytes), never past them.
QPEFT_AVX512_FN __m128i load_codes(const uint8_t* packed, int64_t e, int64_t n) {
  const __mmask16 mask = static_cast<__mmask16>((uint32_t{1} << ((n + 1) / 2)) - 1u);
  return _mm_maskz_loadu_epi8(mask, packed + e / 2);
}

// float_to_bf16_bits of 16 lanes (round to nearest even; NaN -> the quiet NaN of its top bits).
QPEFT_AVX512_FN __m256i to_bf16_bits(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i hi = _mm512_srli_epi32(u, 16);
  const __m512i lsb = _mm512_and_si512(hi, _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  const __m512i quiet = _mm512_or_si512(hi, _mm512_set1_epi32(0x40));
  const __mmask16 nan =
      _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF)), _mm512_set1_epi32(0x7F800000));
  return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, nan, quiet));
}

// float_to_fp16_bits of 16 lanes: the hardware conversion (round to nearest even, subnormals kept), NaN lanes
// replaced by the sign + 0x7E00 that float_convert.h writes.
QPEFT_AVX512_FN __m256i to_fp16_bits(__m512 v) {
  const __m256i h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512i u = _mm512_castps_si512(v);
  const __mmask16 nan =
      _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF)), _mm512_set1_epi32(0x7F800000));
  const __m512i quiet =
      _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x8000)), _mm512_set1_epi32(0x7E00));
  return _mm256_mask_mov_epi16(h, nan, _mm512_cvtepi32_epi16(quiet));
}

// A 16-bit table (16 entries) repeated in both halves of a register, for indices32 lookups.
QPEFT_AVX512_FN __m512i repeat_table(__m256i table16) { return _mm512_broadcast_i64x4(table16); }

QPEFT_AVX512_FN float reduce(__m512 v) { return _mm512_reduce_add_ps(v); }

}  // namespace qpeft::cpu::avx512
