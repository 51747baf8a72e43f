#include "dequantize_4bit_avx512.h"

#if defined(__x86_64__) || defined(__i386__)
#include <algorithm>
#include <bit>

#include "../float_convert.h"

#include "avx512_lut.h"

namespace qpeft::cpu {
namespace {

// The 16 outputs fmt(code * scale) of one block: fp32 lanes (F32) or 16-bit lanes repeated twice.
template <FloatFormat F>
QPEFT_AVX512_FN __m512i block_table(__m512 codes, float scale) {
  const __m512 v = _mm512_mul_ps(codes, _mm512_set1_ps(scale));
  if constexpr (F == FloatFormat::F32) return _mm512_castps_si512(v);
  else if constexpr (F == FloatFormat::BF16) return avx512::repeat_table(avx512::to_bf16_bits(v));
  else return avx512::repeat_table(avx512::to_fp16_bits(v));
}

// dst[0, e_end - e) = table[code of element e ...]; e even.
template <FloatFormat F>
QPEFT_AVX512_FN void lookup(const uint8_t* packed, __m512i table, int64_t e, int64_t e_end, void* dst) {
  if constexpr (F == FloatFormat::F32) {
    float* out = static_cast<float*>(dst);
    const __m512 t = _mm512_castsi512_ps(table);
    for (; e + 16 <= e_end; e += 16, out += 16)
      _mm512_storeu_ps(out, _mm512_permutexvar_ps(avx512::indices16(_mm_loadl_epi64(
                                                       reinterpret_cast<const __m128i*>(packed + e / 2))), t));
    if (e < e_end) {
      const int64_t n = e_end - e;
      const __m512 v = _mm512_permutexvar_ps(avx512::indices16(avx512::load_codes(packed, e, n)), t);
      _mm512_mask_storeu_ps(out, static_cast<__mmask16>((1u << n) - 1u), v);
    }
  } else {
    uint16_t* out = static_cast<uint16_t*>(dst);
    for (; e + 32 <= e_end; e += 32, out += 32)
      _mm512_storeu_si512(out, _mm512_permutexvar_epi16(avx512::indices32(_mm_loadu_si128(
                                                            reinterpret_cast<const __m128i*>(packed + e / 2))), table));
    if (e < e_end) {
      const int64_t n = e_end - e;
      const __m512i v = _mm512_permutexvar_epi16(avx512::indices32(avx512::load_codes(packed, e, n)), table);
      _mm512_mask_storeu_epi16(out, static_cast<__mmask32>((uint64_t{1} << n) - 1u), v);
    }
  }
}

template <FloatFormat F>
QPEFT_AVX512_TARGET void tile(const uint8_t* packed, const BlockScales& scales, int64_t K, int64_t blocksize, QuantType type, int64_t r0,
          int64_t r1, int64_t c0, int64_t c1, void* out, int64_t ld) {
  using OutT = std::conditional_t<F == FloatFormat::F32, float, uint16_t>;
  const __m512 codes = avx512::code_book(type);
  const int shift = std::has_single_bit(static_cast<uint64_t>(blocksize))
                        ? std::countr_zero(static_cast<uint64_t>(blocksize)) : -1;
  __m512i table = _mm512_setzero_si512();
  float scale = 0.0f;
  int64_t table_block = -1;
  for (int64_t r = r0; r < r1; ++r) {
    OutT* dst = static_cast<OutT*>(out) + (r - r0) * ld;
    const int64_t row_end = r * K + c1;
    for (int64_t e = r * K + c0; e < row_end;) {
      const int64_t block = shift >= 0 ? e >> shift : e / blocksize;
      const int64_t seg_end = std::min((block + 1) * blocksize, row_end);
      if (block != table_block) {
        scale = scales(block);
        table = block_table<F>(codes, scale);
        table_block = block;
      }
      int64_t s = e;
      if (s & 1) {  // starts on a low nibble: that element alone, as the portable code computes it
        const float v = code_values(type)[packed[s / 2] & 0xF] * scale;
        if constexpr (F == FloatFormat::F32) *dst = v;
        else *dst = F == FloatFormat::BF16 ? float_to_bf16_bits(v) : float_to_fp16_bits(v);
        ++s;
      }
      lookup<F>(packed, table, s, seg_end, dst + (s - e));
      dst += seg_end - e;
      e = seg_end;
    }
  }
}

}  // namespace

void dequantize_4bit_tile_avx512(const uint8_t* packed, const BlockScales& scales, int64_t K, int64_t blocksize,
                                 QuantType type, int64_t r0, int64_t r1, int64_t c0, int64_t c1, void* out,
                                 int64_t ld, FloatFormat fmt) {
  switch (fmt) {
    case FloatFormat::F32: return tile<FloatFormat::F32>(packed, scales, K, blocksize, type, r0, r1, c0, c1, out, ld);
    case FloatFormat::BF16: return tile<FloatFormat::BF16>(packed, scales, K, blocksize, type, r0, r1, c0, c1, out, ld);
    default: return tile<FloatFormat::F16>(packed, scales, K, blocksize, type, r0, r1, c0, c1, out, ld);
  }
}

}  // namespace qpeft::cpu

#else
#include <stdexcept>
namespace qpeft::cpu {
void dequantize_4bit_tile_avx512(const uint8_t*, const BlockScales&, int64_t, int64_t, QuantType, int64_t, int64_t,
                                 int64_t, int64_t, void*, int64_t, FloatFormat) {
  throw std::logic_error("qpeft: AVX-512 kernel called on a non-x86 build");
}
}  // namespace qpeft::cpu
#endif
