#include "linear_4bit_cpu.h"

#include <algorithm>
#include <cstdint>
#include <vector>

#include "code_books.h"
#include "cpu_isa.h"
#include "linear_4bit_avx512.h"
#include "linear_4bit_grad_buffer.h"
#include "cpu_simd.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#include "avx2_lut.h"
#define QPEFT_X86 1
#endif

namespace qpeft::cpu {
namespace {

constexpr int64_t kMaxSegment = 4096;  // the largest blocksize: one block's decoded weights

// The hot loop, compiled for several instruction sets and picked at run time (portable binary).
QPEFT_CPU_INLINE float dot_impl(const float* a, const float* b, int64_t n) {
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
QPEFT_CPU_MULTIVERSION(float, dot, (const float* a, const float* b, int64_t n), (a, b, n))

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

#if defined(QPEFT_X86)
// The 16-entry code book in two AVX registers (avx2::decode8 looks 8 codes up in it).
struct CodeBook8 {
  __m256 lo, hi;

  __attribute__((target("avx2,fma"))) explicit CodeBook8(const float* code_values)
      : lo(_mm256_loadu_ps(code_values)), hi(_mm256_loadu_ps(code_values + 8)) {}

  QPEFT_AVX2_FN __m256 decode8(const uint8_t* bytes4) const { return avx2::decode8(bytes4, lo, hi); }
};

constexpr int64_t kRowsPerPass = 8;  // input rows sharing one decode of the weights (accumulators in registers)

// Adds, for R input rows, the dot of weights [j0, j1) (one quantization block, scale in `scale`) with the inputs
// into the per-row vector totals. U independent accumulator chains per row hide the FMA latency when R is small.
template <int R, int U>
__attribute__((target("avx2,fma"))) inline void block_dot(const CodeBook8& codes, const uint8_t* packed, int64_t j0,
                                                          int64_t j1, const float* x, int64_t K, __m256 scale,
                                                          __m256 (&total)[kRowsPerPass]) {
  __m256 acc[R][U];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < U; ++u) acc[r][u] = _mm256_setzero_ps();
  int64_t j = j0;
  for (; j + 8 * U <= j1; j += 8 * U) {
    for (int u = 0; u < U; ++u) {
      const __m256 w = codes.decode8(packed + (j + 8 * u) / 2);
      for (int r = 0; r < R; ++r)
        acc[r][u] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + r * K + (j - j0) + 8 * u), acc[r][u]);
    }
  }
  for (; j < j1; j += 8) {
    const __m256 w = codes.decode8(packed + j / 2);
    for (int r = 0; r < R; ++r) acc[r][0] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + r * K + (j - j0)), acc[r][0]);
  }
  for (int r = 0; r < R; ++r) {
    __m256 sum = acc[r][0];
    for (int u = 1; u < U; ++u) sum = _mm256_add_ps(sum, acc[r][u]);
    total[r] = _mm256_fmadd_ps(sum, scale, total[r]);
  }
}

// Output row n for R input rows starting at x (row stride K), AVX2 + FMA: y[r * N] = sum_k x[r, k] W[n, k].
template <int R, int U>
__attribute__((target("avx2,fma"))) void row_rows(const CodeBook8& codes, const float* x, int64_t K,
                                                  const uint8_t* packed, const BlockScales& scales, int64_t blocksize,
                                                  float* y, int64_t N, int64_t n) {
  __m256 total[kRowsPerPass];
  for (int r = 0; r < R; ++r) total[r] = _mm256_setzero_ps();
  const int64_t row_begin = n * K, row_end = row_begin + K;
  for (int64_t e = row_begin; e < row_end;) {
    const int64_t block = e / blocksize;
    const int64_t seg_end = std::min((block + 1) * blocksize, row_end);
    block_dot<R, U>(codes, packed, e, seg_end, x + (e - row_begin), K, _mm256_set1_ps(scales(block)), total);
    e = seg_end;
  }
  for (int r = 0; r < R; ++r) {
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, total[r]);
    y[r * N + n] = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
  }
}

// Output row n for all M inputs, AVX2 + FMA. Needs K % 8 == 0, so every block segment of the row starts at a
// multiple of 8 elements (whole bytes) and has a multiple of 8 elements. Per 8 weights: 4 packed bytes -> 8 int32
// code indices -> two 8-entry permutes + blend give code[q]; the block's scale multiplies the block's dot once.
__attribute__((target("avx2,fma"))) void row_avx2(const float* x, int64_t M, int64_t K, const uint8_t* packed,
                                                  const BlockScales& scales, int64_t blocksize,
                                                  const float* code_values, float* y, int64_t N, int64_t n) {
  const CodeBook8 codes(code_values);
  for (int64_t m0 = 0; m0 < M; m0 += kRowsPerPass) {
    const float* xm = x + m0 * K;
    float* ym = y + m0 * N;
    switch (std::min(kRowsPerPass, M - m0)) {
      case 1:
        row_rows<1, 4>(codes, xm, K, packed, scales, blocksize, ym, N, n);
        break;
      case 2:
        row_rows<2, 2>(codes, xm, K, packed, scales, blocksize, ym, N, n);
        break;
      case 3:
        row_rows<3, 2>(codes, xm, K, packed, scales, blocksize, ym, N, n);
        break;
      case 4:
        row_rows<4, 1>(codes, xm, K, packed, scales, blocksize, ym, N, n);
        break;
      case 5:
        row_rows<5, 1>(codes, xm, K, packed, scales, blocksize, ym, N, n);
        break;
      case 6:
        row_rows<6, 1>(codes, xm, K, packed, scales, blocksize, ym, N, n);
        break;
      case 7:
        row_rows<7, 1>(codes, xm, K, packed, scales, blocksize, ym, N, n);
        break;
      default:
        row_rows<8, 1>(codes, xm, K, packed, scales, blocksize, ym, N, n);
    }
  }
}

// Columns [k_begin, k_end) of dx for all M rows, AVX2 + FMA; needs K, k_begin, k_end multiples of 8.
__attribute__((target("avx2,fma"))) void grad_input_avx2(const float* dy, int64_t M, int64_t N, const uint8_t* packed,
                                                         const BlockScales& scales, int64_t blocksize,
                                                         const float* code_values, float* dx, int64_t K,
                                                         int64_t k_begin, int64_t k_end) {
  const CodeBook8 codes(code_values);
  const int64_t width = k_end - k_begin;
  GradBuffer buffer(M, width, 8);
  float* acc = buffer.acc();
  const int64_t ld = buffer.ld();
  for (int64_t n = 0; n < N; ++n) {
    const int64_t row_start = n * K + k_begin, row_end = row_start + width;
    for (int64_t e = row_start; e < row_end;) {
      const int64_t block = e / blocksize;
      const int64_t seg_end = std::min((block + 1) * blocksize, row_end);
      const float scale = scales(block);
      for (int64_t j = e; j < seg_end; j += 8) {
        const __m256 w = codes.decode8(packed + j / 2);
        float* column = acc + (j - row_start);
        for (int64_t m = 0; m < M; ++m) {
          const __m256 coeff = _mm256_set1_ps(dy[m * N + n] * scale);
          float* out = column + m * ld;
          _mm256_store_ps(out, _mm256_fmadd_ps(coeff, w, _mm256_load_ps(out)));
        }
      }
      e = seg_end;
    }
  }
  buffer.copy_to(dx, M, K, k_begin);
}

#endif

}  // namespace

void linear_4bit(const float* x, int64_t M, int64_t K, const uint8_t* packed, const BlockScales& scales,
                 int64_t blocksize, QuantType type, float* y, int64_t N, int64_t n_begin, int64_t n_end) {
  const float* code_values = cpu::code_values(type);
  const CodesKernel kernel = linear_4bit_kernel(K, false);
  if (kernel == CodesKernel::Avx512) {
    linear_4bit_avx512(x, M, K, packed, scales, blocksize, type, y, N, n_begin, n_end);
    return;
  }
#if defined(QPEFT_X86)
  if (kernel == CodesKernel::Avx2) {
    for (int64_t n = n_begin; n < n_end; ++n) row_avx2(x, M, K, packed, scales, blocksize, code_values, y, N, n);
    return;
  }
#endif
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

void linear_4bit_grad_input(const float* dy, int64_t M, int64_t N, const uint8_t* packed, const BlockScales& scales,
                            int64_t blocksize, QuantType type, float* dx, int64_t K, int64_t k_begin, int64_t k_end) {
  const float* code_values = cpu::code_values(type);
  if (K % 16 == 0 && k_begin % 16 == 0 && k_end % 16 == 0 && cpu_has(CpuIsa::Avx512)) {
    linear_4bit_grad_input_avx512(dy, M, N, packed, scales, blocksize, type, dx, K, k_begin, k_end);
    return;
  }
#if defined(QPEFT_X86)
  if (K % 8 == 0 && k_begin % 8 == 0 && k_end % 8 == 0 && cpu_has(CpuIsa::Avx2)) {
    grad_input_avx2(dy, M, N, packed, scales, blocksize, code_values, dx, K, k_begin, k_end);
    return;
  }
#endif
  alignas(64) float segment[kMaxSegment];
  const int64_t width = k_end - k_begin;
  GradBuffer acc(M, width, 8);
  const int64_t ld = acc.ld();
  for (int64_t n = 0; n < N; ++n) {
    const int64_t row_start = n * K + k_begin, row_end = row_start + width;
    for (int64_t e = row_start; e < row_end;) {
      const int64_t block = e / blocksize;
      const int64_t seg_end = std::min((block + 1) * blocksize, row_end);
      decode(packed, code_values, scales(block), e, seg_end, segment);
      for (int64_t m = 0; m < M; ++m) {
        const float coeff = dy[m * N + n];
        float* out = acc.acc() + m * ld + (e - row_start);
        for (int64_t i = 0; i < seg_end - e; ++i) out[i] += coeff * segment[i];
      }
      e = seg_end;
    }
  }
  acc.copy_to(dx, M, K, k_begin);
}

CodesKernel linear_4bit_kernel(int64_t K, bool bf16_x) {
  if (bf16_x && K % 32 == 0 && cpu_has(CpuIsa::Avx512Bf16)) return CodesKernel::Avx512Bf16;
  if (K % 16 == 0 && cpu_has(CpuIsa::Avx512)) return CodesKernel::Avx512;
#if defined(QPEFT_X86)
  if (K % 8 == 0 && cpu_has(CpuIsa::Avx2)) return CodesKernel::Avx2;
#endif
  return CodesKernel::Baseline;
}

const char* codes_kernel_name(CodesKernel kernel) {
  switch (kernel) {
    case CodesKernel::Avx512Bf16:
      return "avx512_bf16";
    case CodesKernel::Avx512:
      return "avx512";
    case CodesKernel::Avx2:
      return "avx2";
    default:
      return "baseline";
  }
}

void linear_4bit_bf16(const uint16_t* x, int64_t M, int64_t K, const uint8_t* packed, const BlockScales& scales,
                      int64_t blocksize, QuantType type, float* y, int64_t N, int64_t n_begin, int64_t n_end) {
  linear_4bit_avx512_bf16(x, M, K, packed, scales, blocksize, type, y, N, n_begin, n_end);
}

}  // namespace qpeft::cpu
