#include "dequantize_4bit_avx512.h"

#include <stdexcept>

#include "cpu_isa.h"

#if defined(QPEFT_X86_SIMD)
#include <algorithm>
#include <bit>
#include <type_traits>

#include "../float_convert.h"
#include "avx512_lut.h"
#include "code_books.h"

// Every header the kernels use is included above, outside the target region: inline functions first defined
// inside it would carry its target into other translation units through the linker.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")
#include "dequantize_4bit_walk.h"

namespace qpeft::cpu {
namespace {

// A block's 16 outputs in one register: fp32 lanes, or 16-bit lanes repeated in both halves; permute lookups of
// 16 (fp32) or 32 (16-bit) elements at a time, masked at a segment's end.
struct Avx512 {
  using Table = __m512i;

  template <FloatFormat F>
  static Table table(QuantType type, float scale) {
    const __m512 v = _mm512_mul_ps(avx512::code_book(type), _mm512_set1_ps(scale));
    if constexpr (F == FloatFormat::F32)
      return _mm512_castps_si512(v);
    else if constexpr (F == FloatFormat::BF16)
      return avx512::repeat_table(avx512::to_bf16_bits(v));
    else
      return avx512::repeat_table(avx512::to_fp16_bits(v));
  }

  template <FloatFormat F, typename OutT>
  static void lookup(const uint8_t* packed, Table table, int64_t e, int64_t e_end, OutT* out) {
    if constexpr (F == FloatFormat::F32) {
      const __m512 t = _mm512_castsi512_ps(table);
      for (; e + 16 <= e_end; e += 16, out += 16)
        _mm512_storeu_ps(out,
                         _mm512_permutexvar_ps(
                             avx512::indices16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed + e / 2))), t));
      if (e < e_end) {
        const int64_t n = e_end - e;
        const __m512 v = _mm512_permutexvar_ps(avx512::indices16(avx512::load_codes(packed, e, n)), t);
        _mm512_mask_storeu_ps(out, static_cast<__mmask16>((1u << n) - 1u), v);
      }
    } else {
      for (; e + 32 <= e_end; e += 32, out += 32)
        _mm512_storeu_si512(
            out, _mm512_permutexvar_epi16(
                     avx512::indices32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + e / 2))), table));
      if (e < e_end) {
        const int64_t n = e_end - e;
        const __m512i v = _mm512_permutexvar_epi16(avx512::indices32(avx512::load_codes(packed, e, n)), table);
        _mm512_mask_storeu_epi16(out, static_cast<__mmask32>((uint64_t{1} << n) - 1u), v);
      }
    }
  }
};

}  // namespace

void dequantize_4bit_tile_avx512(const uint8_t* packed, const BlockScales& scales, int64_t K, int64_t blocksize,
                                 QuantType type, int64_t r0, int64_t r1, int64_t c0, int64_t c1, void* out, int64_t ld,
                                 FloatFormat fmt) {
  dispatch_tile<Avx512>(packed, scales, K, blocksize, type, r0, r1, c0, c1, out, ld, fmt);
}

}  // namespace qpeft::cpu
#pragma GCC pop_options

#else
namespace qpeft::cpu {
void dequantize_4bit_tile_avx512(const uint8_t*, const BlockScales&, int64_t, int64_t, QuantType, int64_t, int64_t,
                                 int64_t, int64_t, void*, int64_t, FloatFormat) {
  throw std::logic_error("qpeft: AVX-512 kernel called in a build without x86 SIMD kernels");
}
}  // namespace qpeft::cpu
#endif
