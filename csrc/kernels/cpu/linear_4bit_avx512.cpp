#include "linear_4bit_avx512.h"

#include <algorithm>
#include <stdexcept>
#include <vector>

#include "cpu_isa.h"

#if defined(QPEFT_X86_SIMD)
#include "avx512_lut.h"
#include "linear_4bit_grad_buffer.h"

// Every header the kernels use is included above, outside the target region: inline functions first defined
// inside it would carry its target into other translation units through the linker.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")
#include "linear_4bit_avx512_tile.h"

namespace qpeft::cpu {
namespace {

// fp32 x; weights the exact fp32 dequantized values.
struct F32 {
  using X = float;
  using Table = __m512;
  using W = __m512;
  static constexpr int64_t kStep = 16;
  static Table table(__m512 codes, float scale) { return _mm512_mul_ps(codes, _mm512_set1_ps(scale)); }
  static W weights(const uint8_t* bytes, Table t) {
    return _mm512_permutexvar_ps(avx512::indices16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes))), t);
  }
  static __m512 load_x(const float* x) { return _mm512_loadu_ps(x); }
  static __m512 fma(__m512 acc, W w, __m512 x) { return _mm512_fmadd_ps(w, x, acc); }
};

}  // namespace

void linear_4bit_avx512(const float* x, int64_t M, int64_t K, const uint8_t* packed, const BlockScales& scales,
                        int64_t blocksize, QuantType type, float* y, int64_t N, int64_t n_begin, int64_t n_end) {
  linear_rows<F32>(x, M, K, packed, scales, blocksize, type, y, N, n_begin, n_end);
}

// dx[:, k_begin:k_end] accumulated in a local buffer (padded row stride), W walked row by row.
void linear_4bit_grad_input_avx512(const float* dy, int64_t M, int64_t N, const uint8_t* packed,
                                   const BlockScales& scales, int64_t blocksize, QuantType type, float* dx, int64_t K,
                                   int64_t k_begin, int64_t k_end) {
  const __m512 codes = avx512::code_book(type);
  const BlockOf block_of(blocksize);
  const int64_t width = k_end - k_begin;
  GradBuffer buffer(M, width, 16);
  float* acc = buffer.acc();
  const int64_t ld = buffer.ld();
  for (int64_t n = 0; n < N; ++n) {
    const int64_t row_start = n * K + k_begin, row_end = row_start + width;
    for (int64_t e = row_start; e < row_end;) {
      const int64_t block = block_of(e);
      const int64_t seg_end = std::min((block + 1) * blocksize, row_end);
      const float scale = scales(block);
      for (int64_t j = e; j < seg_end; j += 16) {
        const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed + j / 2));
        const __m512 w = _mm512_permutexvar_ps(avx512::indices16(bytes), codes);
        float* column = acc + (j - row_start);
        for (int64_t m = 0; m < M; ++m) {
          const __m512 coeff = _mm512_set1_ps(dy[m * N + n] * scale);
          float* out = column + m * ld;
          _mm512_store_ps(out, _mm512_fmadd_ps(coeff, w, _mm512_load_ps(out)));
        }
      }
      e = seg_end;
    }
  }
  buffer.copy_to(dx, M, K, k_begin);
}

}  // namespace qpeft::cpu
#pragma GCC pop_options

#else
namespace qpeft::cpu {
void linear_4bit_avx512(const float*, int64_t, int64_t, const uint8_t*, const BlockScales&, int64_t, QuantType, float*,
                        int64_t, int64_t, int64_t) {
  throw std::logic_error("qpeft: AVX-512 kernel called in a build without x86 SIMD kernels");
}
void linear_4bit_grad_input_avx512(const float*, int64_t, int64_t, const uint8_t*, const BlockScales&, int64_t,
                                   QuantType, float*, int64_t, int64_t, int64_t) {
  throw std::logic_error("qpeft: AVX-512 kernel called in a build without x86 SIMD kernels");
}
}  // namespace qpeft::cpu
#endif
