#include <algorithm>
#include <stdexcept>

#include "linear_4bit_avx512.h"

#include "cpu_isa.h"

#if defined(QPEFT_X86_SIMD)
#include "avx512_lut.h"

// Every header the kernels use is included above, outside the target region: inline functions first defined
// inside it would carry its target into other translation units through the linker.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")
#include "linear_4bit_avx512_tile.h"

namespace qpeft::cpu {
namespace {

// bf16 x; weights the block's scaled code values rounded to bf16 (vcvtneps2bf16), pairwise bf16 products summed
// in fp32 (vdpbf16ps).
struct Bf16 {
  using X = uint16_t;
  using Table = __m512i;
  using W = __m512i;
  static constexpr int64_t kStep = 32;
  static Table table(__m512 codes, float scale) {
    const __m256bh t = _mm512_cvtneps_pbh(_mm512_mul_ps(codes, _mm512_set1_ps(scale)));
    return avx512::repeat_table(reinterpret_cast<const __m256i&>(t));
  }
  static W weights(const uint8_t* bytes, Table t) {
    return _mm512_permutexvar_epi16(avx512::indices32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes))), t);
  }
  static __m512i load_x(const uint16_t* x) { return _mm512_loadu_si512(x); }
  static __m512 fma(__m512 acc, W w, __m512i x) {
    return _mm512_dpbf16_ps(acc, reinterpret_cast<const __m512bh&>(w), reinterpret_cast<const __m512bh&>(x));
  }
};

}  // namespace

void linear_4bit_avx512_bf16(const uint16_t* x, int64_t M, int64_t K, const uint8_t* packed, const BlockScales& scales,
                             int64_t blocksize, QuantType type, float* y, int64_t N, int64_t n_begin, int64_t n_end) {
  linear_rows<Bf16>(x, M, K, packed, scales, blocksize, type, y, N, n_begin, n_end);
}

}  // namespace qpeft::cpu
#pragma GCC pop_options

#else
namespace qpeft::cpu {
void linear_4bit_avx512_bf16(const uint16_t*, int64_t, int64_t, const uint8_t*, const BlockScales&, int64_t, QuantType,
                             float*, int64_t, int64_t, int64_t) {
  throw std::logic_error("qpeft: AVX-512 kernel called in a build without x86 SIMD kernels");
}
}  // namespace qpeft::cpu
#endif
