// The LoRA down-projection with dropout applied inside the kernels (no mask, no dropped copy of x), and its two
// gradients. The adapter rank r is small (4..256) and K, M large: each kernel is a skinny GEMM in fp32 on CUDA
// cores, memory-bound on reading x (forward, weight gradient) or writing dx (input gradient), so the design is
// about bytes: x is read with 16-byte loads (a warp reads 512 contiguous bytes), each element is hashed for its
// dropout decision exactly once, staged in shared memory as fp32, and the small operand (A or g) is read as
// broadcast float4s. Ranks are processed in tiles of kRankTile; the row (or column) dimension is split across
// blocks when one pass would not fill the GPU, each split writing its own fp32 partial sum (the caller adds
// them: deterministic, no atomics).
// Dropped values are fp32(x) * keep_scale, never rounded to x's format (as the CPU path).
#include <type_traits>

#include "lora_common.cuh"
#include "layer_cuda.h"

namespace qpeft::cuda {
namespace {

using namespace lora;

constexpr int kThreads = 256;
constexpr int kRankTile = 16;

// ---- lora_down: partial[split, m, j] = sum over the split's columns k of drop(x)[m, k] * A[j, k] ---------------
// Block: 64 rows x one split of columns x kRankTile ranks. Per 64-column tile the block stages drop(x) [64 x 64]
// and A^T [64 x 16] in shared memory; thread t then owns row t % 64 and the 16-column quarter t / 64 of the tile,
// accumulating 16 ranks (x as float4 per thread, A^T as broadcast float4s). The four quarters meet at the end.
constexpr int kDownRows = 64, kDownCols = 64;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    lora_down_kernel(const T* __restrict__ x, const float* __restrict__ A, float* __restrict__ partial, int64_t M,
                     int64_t K, int64_t r, int64_t cols_per_split, DropoutSpec dropout, bool vec_ok) {
  __shared__ __align__(16) float xs[kDownRows][kDownCols + 4];  // +4: conflict-free float4 reads down a column
  __shared__ __align__(16) float at[kDownCols][kRankTile];      // A^T tile: at[k][j]
  const Dropout drop = resolve(dropout);
  const int t = threadIdx.x;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kDownRows;
  const int64_t split = blockIdx.y, j0 = static_cast<int64_t>(blockIdx.z) * kRankTile;
  const int64_t k_begin = split * cols_per_split;
  const int64_t k_end = k_begin + cols_per_split < K ? k_begin + cols_per_split : K;
  const int row = t % kDownRows, quarter = t / kDownRows;
  float acc[kRankTile];
#pragma unroll
  for (int j = 0; j < kRankTile; ++j) acc[j] = 0.0f;

  // Software pipeline: the raw loads of tile i + 1 are in flight while tile i is computed from shared memory.
  float v[2][8], a4[4];
  const auto load_tile = [&](int64_t k0) {
#pragma unroll
    for (int s = 0; s < 2; ++s) {  // 64 rows x 64 columns = 512 vectors of 8 (a warp covers 4 rows x 64 columns)
      const int vi = t + kThreads * s;
      load_row8(x, m0 + vi / 8, M, K, k0 + (vi % 8) * 8, k_end, vec_ok, v[s]);
    }
    const int jj = t % kRankTile, c = (t / kRankTile) * 4;  // A: rank t % 16, columns (t / 16) * 4 .. + 4
    const int64_t j = j0 + jj;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t k = k0 + c + i;
      a4[i] = (j < r && k < k_end) ? __ldg(A + j * K + k) : 0.0f;
    }
  };
  if (k_begin < k_end) load_tile(k_begin);
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kDownCols) {
    __syncthreads();  // the previous tile is consumed
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      const int vi = t + kThreads * s, rs = vi / 8, cs = (vi % 8) * 8;
      stage_dropped8(drop, v[s], (m0 + rs) * K + k0 + cs, &xs[rs][cs]);
    }
    {
      const int jj = t % kRankTile, c = (t / kRankTile) * 4;
#pragma unroll
      for (int i = 0; i < 4; ++i) at[c + i][jj] = a4[i];
    }
    __syncthreads();
    if (k0 + kDownCols < k_end) load_tile(k0 + kDownCols);
#pragma unroll
    for (int kk = quarter * 16; kk < quarter * 16 + 16; kk += 4) {
      const float4 xv = *reinterpret_cast<const float4*>(&xs[row][kk]);
      const float xq[4] = {xv.x, xv.y, xv.z, xv.w};
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const float4* a_row = reinterpret_cast<const float4*>(&at[kk + q][0]);
#pragma unroll
        for (int jq = 0; jq < kRankTile / 4; ++jq) {
          const float4 a = a_row[jq];
          acc[4 * jq + 0] = fmaf(xq[q], a.x, acc[4 * jq + 0]);
          acc[4 * jq + 1] = fmaf(xq[q], a.y, acc[4 * jq + 1]);
          acc[4 * jq + 2] = fmaf(xq[q], a.z, acc[4 * jq + 2]);
          acc[4 * jq + 3] = fmaf(xq[q], a.w, acc[4 * jq + 3]);
        }
      }
    }
  }
  // The four column quarters of each row meet in shared memory (xs is free: 4 x 64 x 16 floats fit).
  __syncthreads();
  float* red = &xs[0][0];
#pragma unroll
  for (int j = 0; j < kRankTile; ++j) red[(quarter * kDownRows + row) * kRankTile + j] = acc[j];
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kDownRows * kRankTile / kThreads; ++i) {
    const int o = t + kThreads * i, rr = o / kRankTile, jj = o % kRankTile;
    float sum = 0.0f;
#pragma unroll
    for (int q = 0; q < 4; ++q) sum += red[(q * kDownRows + rr) * kRankTile + jj];
    const int64_t m = m0 + rr, j = j0 + jj;
    if (m < M && j < r) partial[(split * M + m) * r + j] = sum;
  }
}

// ---- lora_down_grad_weight: partial[split, j, k] = sum over the split's rows m of g[m, j] * drop(x)[m, k] -------
// Block: 256 columns x one split of rows x kRankTile ranks. Per 32-row tile it stages drop(x) [32 x 256] and
// g [32 x 16]; thread t owns columns 4 (t % 64) .. + 4 and ranks 4 (t / 64) .. + 4 (16 sums).
constexpr int kGwRows = 32, kGwCols = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    lora_down_grad_weight_kernel(const float* __restrict__ g, const T* __restrict__ x, float* __restrict__ partial,
                                 int64_t M, int64_t K, int64_t r, int64_t rows_per_split, DropoutSpec dropout,
                                 bool vec_ok) {
  __shared__ __align__(16) float xs[kGwRows][kGwCols + 4];
  __shared__ __align__(16) float gs[kGwRows][kRankTile];
  const Dropout drop = resolve(dropout);
  const int t = threadIdx.x;
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * kGwCols;
  const int64_t split = blockIdx.y, j0 = static_cast<int64_t>(blockIdx.z) * kRankTile;
  const int64_t m_begin = split * rows_per_split;
  const int64_t m_end = m_begin + rows_per_split < M ? m_begin + rows_per_split : M;
  const int c4 = (t % 64) * 4, rank_group = (t / 64) * 4;
  float acc[4][4];
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b) acc[a][b] = 0.0f;

  // Software pipeline: the raw loads of row tile i + 1 are in flight while tile i is computed.
  float v[4][8], gv[2];
  const auto load_tile = [&](int64_t m0) {
#pragma unroll
    for (int s = 0; s < 4; ++s) {  // 32 rows x 256 columns = 1024 vectors of 8 (a warp reads one row's 256)
      const int vi = t + kThreads * s;
      load_row8(x, m0 + vi / 32, m_end, K, k0 + (vi % 32) * 8, K, vec_ok, v[s]);
    }
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      const int o = t + kThreads * s, rr = o / kRankTile, jj = o % kRankTile;
      const int64_t m = m0 + rr, j = j0 + jj;
      gv[s] = (m < m_end && j < r) ? __ldg(g + m * r + j) : 0.0f;
    }
  };
  if (m_begin < m_end) load_tile(m_begin);
  for (int64_t m0 = m_begin; m0 < m_end; m0 += kGwRows) {
    __syncthreads();
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      const int vi = t + kThreads * s, rs = vi / 32, cs = (vi % 32) * 8;
      stage_dropped8(drop, v[s], (m0 + rs) * K + k0 + cs, &xs[rs][cs]);
    }
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      const int o = t + kThreads * s;
      gs[o / kRankTile][o % kRankTile] = gv[s];
    }
    __syncthreads();
    if (m0 + kGwRows < m_end) load_tile(m0 + kGwRows);
#pragma unroll 8
    for (int rr = 0; rr < kGwRows; ++rr) {
      const float4 xv = *reinterpret_cast<const float4*>(&xs[rr][c4]);
      const float4 gq = *reinterpret_cast<const float4*>(&gs[rr][rank_group]);  // broadcast within the warp
      const float xa[4] = {xv.x, xv.y, xv.z, xv.w}, ga[4] = {gq.x, gq.y, gq.z, gq.w};
#pragma unroll
      for (int a = 0; a < 4; ++a)
#pragma unroll
        for (int b = 0; b < 4; ++b) acc[a][b] = fmaf(ga[a], xa[b], acc[a][b]);
    }
  }
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    const int64_t j = j0 + rank_group + a;
    if (j >= r) continue;
    float* out = partial + (split * r + j) * K + k0 + c4;
    if (K % 4 == 0 && k0 + c4 + 4 <= K) {  // partial comes from the allocator: 16-byte aligned
      store4(out, acc[a]);
      continue;
    }
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      if (k0 + c4 + b < K) out[b] = acc[a][b];
    }
  }
}

// ---- lora_down_grad_input: dx[m, k] (+)= keep(m K + k) ? keep_scale * sum_j g[m, j] A[j, k] : 0 ---------------
// Block: 32 rows x 256 columns; loops over all ranks in tiles of 16 (A tile [16 x 256] and g tile [32 x 16] in
// shared memory). Thread t owns columns 4 (t % 64) .. + 4 of rows t / 64 + 4 i, i < 8 (32 sums).
constexpr int kGiRows = 32, kGiCols = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    lora_down_grad_input_kernel(T* __restrict__ dx, const float* __restrict__ g, const float* __restrict__ A, int64_t M,
                                int64_t K, int64_t r, DropoutSpec dropout, bool accumulate, bool vec_ok) {
  __shared__ __align__(16) float as[kRankTile][kGiCols];
  __shared__ __align__(16) float gs[kGiRows][kRankTile];
  const Dropout drop = resolve(dropout);
  const int t = threadIdx.x;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kGiRows, k0 = static_cast<int64_t>(blockIdx.y) * kGiCols;
  const int c4 = (t % 64) * 4, row_group = t / 64;
  float acc[8][4];
#pragma unroll
  for (int i = 0; i < 8; ++i)
#pragma unroll
    for (int b = 0; b < 4; ++b) acc[i][b] = 0.0f;
  const bool vec_cols = vec_ok && k0 + c4 + 4 <= K;

  for (int64_t j0 = 0; j0 < r; j0 += kRankTile) {
    float av[4][4];
#pragma unroll
    for (int s = 0; s < 4; ++s) {  // A: 16 ranks x 256 columns, a warp reads 128 contiguous floats of one rank
      const int vi = t + kThreads * s, jj = vi / 64, c = (vi % 64) * 4;
      const int64_t j = j0 + jj;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t k = k0 + c + i;
        av[s][i] = (j < r && k < K) ? __ldg(A + j * K + k) : 0.0f;
      }
    }
    float gv[2];
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      const int o = t + kThreads * s, rr = o / kRankTile, jj = o % kRankTile;
      const int64_t m = m0 + rr, j = j0 + jj;
      gv[s] = (m < M && j < r) ? __ldg(g + m * r + j) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      const int vi = t + kThreads * s;
      *reinterpret_cast<float4*>(&as[vi / 64][(vi % 64) * 4]) = make_float4(av[s][0], av[s][1], av[s][2], av[s][3]);
    }
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      const int o = t + kThreads * s;
      gs[o / kRankTile][o % kRankTile] = gv[s];
    }
    __syncthreads();
#pragma unroll
    for (int jj = 0; jj < kRankTile; jj += 4) {
      float a[4][4];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const float4 v = *reinterpret_cast<const float4*>(&as[jj + q][c4]);
        a[q][0] = v.x, a[q][1] = v.y, a[q][2] = v.z, a[q][3] = v.w;
      }
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float4 gq = *reinterpret_cast<const float4*>(&gs[row_group + 4 * i][jj]);  // broadcast
        const float ga[4] = {gq.x, gq.y, gq.z, gq.w};
#pragma unroll
        for (int q = 0; q < 4; ++q)
#pragma unroll
          for (int b = 0; b < 4; ++b) acc[i][b] = fmaf(ga[q], a[q][b], acc[i][b]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int64_t m = m0 + row_group + 4 * i;
    if (m >= M) continue;
    const int64_t e0 = m * K + k0 + c4;
    drop.apply(acc[i], e0);  // columns past K are never stored
    if (vec_cols) {
      float out[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      if (accumulate) load4(dx + e0, out);
#pragma unroll
      for (int b = 0; b < 4; ++b) out[b] = accumulate ? __fadd_rn(out[b], acc[i][b]) : acc[i][b];
      store4(dx + e0, out);
      continue;
    }
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      if (k0 + c4 + b >= K) continue;
      dx[e0 + b] = from_float<T>(accumulate ? __fadd_rn(to_float(dx[e0 + b]), acc[i][b]) : acc[i][b]);
    }
  }
}

// ---- sum_partials: out[i] = fmt(sum over s of partial[s, i]), s in increasing order ---------------------------
__global__ void __launch_bounds__(kThreads) sum_partials_kernel(const float* __restrict__ partial, int splits,
                                                                int64_t n, void* __restrict__ out, FloatFormat fmt) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    float sum = 0.0f;
    for (int s = 0; s < splits; ++s) sum = __fadd_rn(sum, __ldg(partial + s * n + i));
    store_from_float(out, fmt, i, sum);
  }
}

}  // namespace

int lora_down_splits(int64_t M, int64_t K, int64_t r) {
  // Enough blocks for ~4 per SM of a large GPU; never more splits than 64-column tiles, and the partial sums
  // (splits x M x r fp32) stay small next to x.
  int64_t blocks = ((M + kDownRows - 1) / kDownRows) * ((r + kRankTile - 1) / kRankTile);
  if (blocks < 1) blocks = 1;  // M or r == 0: nothing to launch
  const int64_t tiles = (K + kDownCols - 1) / kDownCols;
  int64_t splits = (512 + blocks - 1) / blocks;
  splits = splits < tiles ? splits : tiles;
  splits = splits < 64 ? splits : 64;
  return static_cast<int>(splits < 1 ? 1 : splits);
}

int lora_down_grad_weight_splits(int64_t M, int64_t K, int64_t r) {
  // ~512 blocks, each split at least 256 rows (so the partials stay a few MB), at most 64 splits.
  int64_t blocks = ((K + kGwCols - 1) / kGwCols) * ((r + kRankTile - 1) / kRankTile);
  if (blocks < 1) blocks = 1;  // K or r == 0: nothing to launch
  int64_t splits = (512 + blocks - 1) / blocks;
  const int64_t by_rows = (M + 255) / 256;
  splits = splits < by_rows ? splits : by_rows;
  splits = splits < 64 ? splits : 64;
  return static_cast<int>(splits < 1 ? 1 : splits);
}

cudaError_t lora_down(const void* x, FloatFormat fmt, const float* A, float* partial, int64_t M, int64_t K, int64_t r,
                      int splits, DropoutSpec dropout, cudaStream_t stream) {
  if (M == 0 || r == 0) return cudaSuccess;
  if (splits < 1) splits = 1;
  const int64_t tiles = (K + kDownCols - 1) / kDownCols;
  const int64_t cols_per_split = ((tiles + splits - 1) / splits) * kDownCols;
  const dim3 grid(ceil_div(M, kDownRows), static_cast<unsigned int>(splits), ceil_div(r, kRankTile));
  const bool vec_ok = K % 8 == 0 && aligned16(x);
  return by_format(fmt, [&](auto tag) {
    using T = decltype(tag);
    QPEFT_LAUNCH(grid, kThreads, stream, lora_down_kernel<T>)(static_cast<const T*>(x), A, partial, M, K, r,
                                                              cols_per_split, dropout, vec_ok);
  });
}

cudaError_t lora_down_grad_weight(const float* g, const void* x, FloatFormat fmt, float* partial, int64_t M, int64_t K,
                                  int64_t r, int splits, DropoutSpec dropout, cudaStream_t stream) {
  if (K == 0 || r == 0) return cudaSuccess;
  if (splits < 1) splits = 1;
  int64_t rows_per_split = (M + splits - 1) / splits;
  rows_per_split = (rows_per_split + kGwRows - 1) / kGwRows * kGwRows;
  if (rows_per_split == 0) rows_per_split = kGwRows;
  const dim3 grid(ceil_div(K, kGwCols), static_cast<unsigned int>(splits), ceil_div(r, kRankTile));
  const bool vec_ok = K % 8 == 0 && aligned16(x);
  return by_format(fmt, [&](auto tag) {
    using T = decltype(tag);
    QPEFT_LAUNCH(grid, kThreads, stream, lora_down_grad_weight_kernel<T>)(g, static_cast<const T*>(x), partial, M, K, r,
                                                                          rows_per_split, dropout, vec_ok);
  });
}

cudaError_t lora_down_grad_input(void* dx, FloatFormat fmt, const float* g, const float* A, int64_t M, int64_t K,
                                 int64_t r, DropoutSpec dropout, bool accumulate, cudaStream_t stream) {
  if (M == 0 || K == 0) return cudaSuccess;
  if (K > int64_t{65535} * kGiCols) return cudaErrorInvalidValue;
  const dim3 grid(ceil_div(M, kGiRows), ceil_div(K, kGiCols));  // rows on x: M may exceed 65535 tiles
  const bool vec_ok = K % 4 == 0 && reinterpret_cast<uintptr_t>(dx) % 16 == 0;
  return by_format(fmt, [&](auto tag) {
    using T = decltype(tag);
    QPEFT_LAUNCH(grid, kThreads, stream, lora_down_grad_input_kernel<T>)(static_cast<T*>(dx), g, A, M, K, r, dropout,
                                                                         accumulate, vec_ok);
  });
}

cudaError_t sum_partials(const float* partial, int splits, int64_t n, void* out, FloatFormat fmt, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  QPEFT_LAUNCH(grid_for(n, kThreads, 4096), kThreads, stream, sum_partials_kernel)(partial, splits, n, out, fmt);
  return cudaGetLastError();
}

}  // namespace qpeft::cuda
