#include "dequantize_4bit_avx2.h"

#include <stdexcept>

#include "cpu_isa.h"

#if defined(QPEFT_X86_SIMD)
#include <immintrin.h>

#include <algorithm>
#include <bit>
#include <cstring>
#include <type_traits>

#include "../float_convert.h"
#include "avx2_lut.h"
#include "code_books.h"

// Every header the kernels use is included above, outside the target region: inline functions first defined
// inside it would carry its target into other translation units through the linker.
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#include "dequantize_4bit_walk.h"

namespace qpeft::cpu {
namespace {

// A block's 16 outputs: fp32 entries 0-7 and 8-15 (F32), or for 16-bit outputs their low and high bytes, each
// 16-byte table repeated in both 128-bit lanes for vpshufb.
struct Avx2 {
  struct Table {
    __m256 lo, hi;      // F32
    __m256i low, high;  // 16-bit: byte tables
  };

  // float_convert.h's 16-bit bits of 8 fp32 lanes, one per 32-bit lane.
  static __m256i bits16(__m256 v, FloatFormat fmt) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i nan =
        _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7FFFFFFF)), _mm256_set1_epi32(0x7F800000));
    if (fmt == FloatFormat::BF16) {
      const __m256i top = _mm256_srli_epi32(u, 16);
      const __m256i lsb = _mm256_and_si256(top, _mm256_set1_epi32(1));
      const __m256i rounded =
          _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
      return _mm256_blendv_epi8(rounded, _mm256_or_si256(top, _mm256_set1_epi32(0x40)), nan);
    }
    const __m256i h = _mm256_cvtepu16_epi32(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    const __m256i quiet = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x8000)),
                                          _mm256_set1_epi32(0x7E00));
    return _mm256_blendv_epi8(h, quiet, nan);
  }

  template <FloatFormat F>
  static Table table(QuantType type, float scale) {
    const float* codes = code_values(type);
    const __m256 s = _mm256_set1_ps(scale);
    Table t{};
    t.lo = _mm256_mul_ps(_mm256_loadu_ps(codes), s);
    t.hi = _mm256_mul_ps(_mm256_loadu_ps(codes + 8), s);
    if constexpr (F != FloatFormat::F32) {
      // 16 words in order, then their low bytes and high bytes gathered: [low 0-7, high 0-7 | low 8-15, high 8-15].
      __m256i w = _mm256_permute4x64_epi64(_mm256_packus_epi32(bits16(t.lo, F), bits16(t.hi, F)), 0xD8);
      const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 4, 6, 8, 10,
                                             12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
      w = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(w, split), 0xD8);  // [low 0-15 | high 0-15]
      t.low = _mm256_permute2x128_si256(w, w, 0x00);
      t.high = _mm256_permute2x128_si256(w, w, 0x11);
    }
    return t;
  }

  // 8 fp32 outputs of the 8 codes in 4 packed bytes.
  static __m256 decode8(const uint8_t* bytes4, const Table& t) { return avx2::decode8(bytes4, t.lo, t.hi); }

  // 32 16-bit outputs of the 32 codes in 16 packed bytes, stored to out.
  static void decode32(__m128i bytes, const Table& t, uint16_t* out) {
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask), lo = _mm_and_si128(bytes, mask);
    const __m256i codes = _mm256_set_m128i(_mm_unpackhi_epi8(hi, lo), _mm_unpacklo_epi8(hi, lo));  // in order
    const __m256i low = _mm256_shuffle_epi8(t.low, codes), high = _mm256_shuffle_epi8(t.high, codes);
    const __m256i w0 = _mm256_unpacklo_epi8(low, high),
                  w1 = _mm256_unpackhi_epi8(low, high);  // [0-7|16-23], [8-15|24-31]
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_permute2x128_si256(w0, w1, 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16), _mm256_permute2x128_si256(w0, w1, 0x31));
  }

  template <FloatFormat F, typename OutT>
  static void lookup(const uint8_t* packed, const Table& t, int64_t e, int64_t e_end, OutT* out) {
    constexpr int64_t kStep = F == FloatFormat::F32 ? 8 : 32;
    for (; e + kStep <= e_end; e += kStep, out += kStep) {
      if constexpr (F == FloatFormat::F32) {
        _mm256_storeu_ps(out, decode8(packed + e / 2, t));
      } else {
        decode32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + e / 2)), t, out);
      }
    }
    if (e < e_end) {  // the last < kStep elements through stack buffers (never reading past the codes)
      const int64_t n = e_end - e;
      alignas(32) uint8_t bytes[16] = {};
      std::memcpy(bytes, packed + e / 2, static_cast<size_t>((n + 1) / 2));
      alignas(32) OutT values[kStep];
      if constexpr (F == FloatFormat::F32) {
        _mm256_store_ps(values, decode8(bytes, t));
      } else {
        decode32(_mm_load_si128(reinterpret_cast<const __m128i*>(bytes)), t, values);
      }
      std::memcpy(out, values, static_cast<size_t>(n) * sizeof(OutT));
    }
  }
};

}  // namespace

void dequantize_4bit_tile_avx2(const uint8_t* packed, const BlockScales& scales, int64_t K, int64_t blocksize,
                               QuantType type, int64_t r0, int64_t r1, int64_t c0, int64_t c1, void* out, int64_t ld,
                               FloatFormat fmt) {
  dispatch_tile<Avx2>(packed, scales, K, blocksize, type, r0, r1, c0, c1, out, ld, fmt);
}

}  // namespace qpeft::cpu
#pragma GCC pop_options

#else
namespace qpeft::cpu {
void dequantize_4bit_tile_avx2(const uint8_t*, const BlockScales&, int64_t, int64_t, QuantType, int64_t, int64_t,
                               int64_t, int64_t, void*, int64_t, FloatFormat) {
  throw std::logic_error("qpeft: AVX2 kernel called in a build without x86 SIMD kernels");
}
}  // namespace qpeft::cpu
#endif
