// The register tile of the AVX-512 small-M 4-bit linear kernels, shared by the fp32 and the bf16 kernel: each
// includes it after `#pragma GCC target` for its instruction set (so it is compiled once per set, with internal
// linkage), with a Traits type giving the step and the three operations:
//   Traits::kStep                        elements per vector step (16 fp32 / 32 bf16)
//   Traits::table(codes, scale)          the block's 16 scaled code values in register form
//   Traits::weights(packed_bytes, table) kStep decoded weights of the step
//   Traits::fma(acc, w, x_ptr)           acc += w * x[0, kStep) in fp32
// Needs K % kStep == 0 and blocksize % kStep == 0, so that a step never crosses a quantization block.
#pragma once

#include <algorithm>

namespace qpeft::cpu {
namespace {

constexpr int64_t kRowsPerPass = 8;  // input rows sharing one decode of the weights

// Block of element e (a shift for power-of-two blocksizes).
struct BlockOf {
  int shift;
  int64_t blocksize;
  explicit BlockOf(int64_t bs)
      : shift((bs & (bs - 1)) == 0 ? __builtin_ctzll(static_cast<unsigned long long>(bs)) : -1), blocksize(bs) {}
  int64_t operator()(int64_t e) const { return shift >= 0 ? e >> shift : e / blocksize; }
};

// y[r * N + n0 + b] = sum_k x[r, k] W[n0 + b, k] for r < R, b < NB: R rows of x (row stride K) against NB rows
// of W, R * NB accumulators in registers, each x load shared by NB rows of W.
template <class Traits, int R, int NB>
void tile(QuantType type, const typename Traits::X* x, int64_t K, const uint8_t* packed, const BlockScales& scales,
          BlockOf block_of, float* y, int64_t N, int64_t n0) {
  const __m512 codes = avx512::code_book(type);
  __m512 acc[R][NB];
  typename Traits::Table table[NB];
  int64_t table_block[NB];
  for (int b = 0; b < NB; ++b) {
    table_block[b] = -1;
    for (int r = 0; r < R; ++r) acc[r][b] = _mm512_setzero_ps();
  }
  // acc += the products of the steps [k0, k1), which lie in one block of each of the NB rows (tables set).
  auto steps = [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; k += Traits::kStep) {
      typename Traits::W w[NB];
      for (int b = 0; b < NB; ++b)
        w[b] = Traits::weights(packed + static_cast<uint64_t>((n0 + b) * K + k) / 2, table[b]);
      for (int r = 0; r < R; ++r) {
        const auto xv = Traits::load_x(x + r * K + k);
        for (int b = 0; b < NB; ++b) acc[r][b] = Traits::fma(acc[r][b], w[b], xv);
      }
    }
  };
  const int64_t bs = block_of.blocksize;
  if (K % bs == 0) {  // every block lies inside a row: one table per row and block
    for (int64_t k0 = 0; k0 < K; k0 += bs) {
      for (int b = 0; b < NB; ++b) table[b] = Traits::table(codes, scales(block_of((n0 + b) * K + k0)));
      steps(k0, k0 + bs);
    }
  } else {  // blocks straddle rows: look the block up at every step
    for (int64_t k = 0; k < K; k += Traits::kStep) {
      for (int b = 0; b < NB; ++b) {
        const int64_t block = block_of((n0 + b) * K + k);
        if (block != table_block[b]) table[b] = Traits::table(codes, scales(block)), table_block[b] = block;
      }
      steps(k, k + Traits::kStep);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < NB; ++b) y[r * N + n0 + b] = _mm512_reduce_add_ps(acc[r][b]);
}

// Output rows [n_begin, n_end) for R rows of x: W rows in tiles of NB (4 for up to 4
// rows of x, else 2: at most 16 accumulators), then one at a time.
template <class Traits, int R>
void pass(QuantType type, const typename Traits::X* x, int64_t K, const uint8_t* packed, const BlockScales& scales,
          BlockOf block_of, float* y, int64_t N, int64_t n_begin, int64_t n_end) {
  constexpr int NB = R <= 4 ? 4 : 2;
  int64_t n = n_begin;
  for (; n + NB <= n_end; n += NB) tile<Traits, R, NB>(type, x, K, packed, scales, block_of, y, N, n);
  for (; n < n_end; ++n) tile<Traits, R, 1>(type, x, K, packed, scales, block_of, y, N, n);
}

// All M rows of x, in passes of up to kRowsPerPass rows (K is not split: W is read in long contiguous runs).
template <class Traits>
void linear_rows(const typename Traits::X* x, int64_t M, int64_t K, const uint8_t* packed, const BlockScales& scales,
                 int64_t blocksize, QuantType type, float* y, int64_t N, int64_t n_begin, int64_t n_end) {
  const BlockOf block_of(blocksize);
  for (int64_t m0 = 0; m0 < M; m0 += kRowsPerPass) {
    const auto* xm = x + m0 * K;
    float* ym = y + m0 * N;
    switch (std::min(kRowsPerPass, M - m0)) {
      case 1:
        pass<Traits, 1>(type, xm, K, packed, scales, block_of, ym, N, n_begin, n_end);
        break;
      case 2:
        pass<Traits, 2>(type, xm, K, packed, scales, block_of, ym, N, n_begin, n_end);
        break;
      case 3:
        pass<Traits, 3>(type, xm, K, packed, scales, block_of, ym, N, n_begin, n_end);
        break;
      case 4:
        pass<Traits, 4>(type, xm, K, packed, scales, block_of, ym, N, n_begin, n_end);
        break;
      case 5:
        pass<Traits, 5>(type, xm, K, packed, scales, block_of, ym, N, n_begin, n_end);
        break;
      case 6:
        pass<Traits, 6>(type, xm, K, packed, scales, block_of, ym, N, n_begin, n_end);
        break;
      case 7:
        pass<Traits, 7>(type, xm, K, packed, scales, block_of, ym, N, n_begin, n_end);
        break;
      default:
        pass<Traits, 8>(type, xm, K, packed, scales, block_of, ym, N, n_begin, n_end);
    }
  }
}

}  // namespace
}  // namespace qpeft::cpu
