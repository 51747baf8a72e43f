// The LoRA down-projection with dropout applied inside the kernels (no mask, no dropped copy of x), and its two
// gradients. The adapter rank r is small (4..256) and K, M large, so each kernel is a tiled skinny GEMM in fp32
// on CUDA cores: memory-bound on reading x (forward, weight gradient) or writing dx (input gradient).
// Tiles: 32 rows x 32 rank entries x 32 (or 64) columns through shared memory, 256 threads per block.
// Dropped values are fp32(x) * keep_scale, never rounded to x's format (as the CPU path).
#include "../dropout_rng.h"
#include "device_utils.cuh"
#include "lora_cuda.h"

namespace qpeft::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kRows = 32;  // rows of x / g per tile
constexpr int kRank = 32;  // adapter rank entries per tile

struct Dropout {
  uint64_t seed;
  uint32_t threshold;
  float keep_scale;
  // drop(x)[e] for the row-major element index e of the logical input.
  __device__ __forceinline__ float apply(const void* x, FloatFormat fmt, int64_t e) const {
    return dropout_keep(seed, static_cast<uint64_t>(e), threshold) ? __fmul_rn(load_as_float(x, fmt, e), keep_scale)
                                                                  : 0.0f;
  }
};

// xa tile [32 rows, 32 ranks]; thread t owns row t / 8 and ranks (t % 8) + 8 q, q < 4.
__global__ void __launch_bounds__(kThreads)
    lora_down_kernel(const void* __restrict__ x, FloatFormat fmt, const float* __restrict__ A, float* __restrict__ xa,
                     int64_t M, int64_t K, int64_t r, const int64_t* __restrict__ seed, uint32_t threshold,
                     float keep_scale) {
  constexpr int kCols = 32;
  __shared__ float x_tile[kRows][kCols + 1];
  __shared__ float a_tile[kRank][kCols + 1];
  const Dropout drop{static_cast<uint64_t>(*seed), threshold, keep_scale};
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kRows, j0 = static_cast<int64_t>(blockIdx.y) * kRank;
  const int t = threadIdx.x, row = t / 8, lane_rank = t % 8;
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int64_t k0 = 0; k0 < K; k0 += kCols) {
#pragma unroll 1
    for (int i = 0; i < kRows * kCols / kThreads; ++i) {
      const int idx = t + kThreads * i, rr = idx / kCols, kk = idx % kCols;
      const int64_t m = m0 + rr, j = j0 + rr, k = k0 + kk;
      x_tile[rr][kk] = (m < M && k < K) ? drop.apply(x, fmt, m * K + k) : 0.0f;
      a_tile[rr][kk] = (j < r && k < K) ? A[j * K + k] : 0.0f;
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kCols; ++kk) {
      const float xv = x_tile[row][kk];
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[q] = fmaf(xv, a_tile[lane_rank + 8 * q][kk], acc[q]);
    }
    __syncthreads();
  }
  const int64_t m = m0 + row;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const int64_t j = j0 + lane_rank + 8 * q;
    if (m < M && j < r) xa[m * r + j] = acc[q];
  }
}

// partial[split, j, k] over the split's rows; tile [32 ranks, 64 columns]; thread t owns column t % 64 and
// ranks t / 64 + 4 q, q < 8.
__global__ void __launch_bounds__(kThreads)
    lora_down_grad_weight_kernel(const float* __restrict__ g, const void* __restrict__ x, FloatFormat fmt,
                                 float* __restrict__ partial, int64_t M, int64_t K, int64_t r, int64_t rows_per_split,
                                 const int64_t* __restrict__ seed, uint32_t threshold, float keep_scale) {
  constexpr int kCols = 64;
  __shared__ float g_tile[kRows][kRank + 1];
  __shared__ float x_tile[kRows][kCols + 1];
  const Dropout drop{static_cast<uint64_t>(*seed), threshold, keep_scale};
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * kCols, j0 = static_cast<int64_t>(blockIdx.y) * kRank;
  const int64_t split = blockIdx.z;
  const int64_t m_begin = split * rows_per_split;
  const int64_t m_end = m_begin + rows_per_split < M ? m_begin + rows_per_split : M;
  const int t = threadIdx.x, col = t % kCols, rank_group = t / kCols;
  float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  for (int64_t m0 = m_begin; m0 < m_end; m0 += kRows) {
#pragma unroll
    for (int i = 0; i < kRows * kRank / kThreads; ++i) {
      const int idx = t + kThreads * i, rr = idx / kRank, jj = idx % kRank;
      const int64_t m = m0 + rr, j = j0 + jj;
      g_tile[rr][jj] = (m < m_end && j < r) ? g[m * r + j] : 0.0f;
    }
#pragma unroll
    for (int i = 0; i < kRows * kCols / kThreads; ++i) {
      const int idx = t + kThreads * i, rr = idx / kCols, kk = idx % kCols;
      const int64_t m = m0 + rr, k = k0 + kk;
      x_tile[rr][kk] = (m < m_end && k < K) ? drop.apply(x, fmt, m * K + k) : 0.0f;
    }
    __syncthreads();
#pragma unroll 8
    for (int rr = 0; rr < kRows; ++rr) {
      const float xv = x_tile[rr][col];
#pragma unroll
      for (int q = 0; q < 8; ++q) acc[q] = fmaf(g_tile[rr][rank_group + 4 * q], xv, acc[q]);
    }
    __syncthreads();
  }
  const int64_t k = k0 + col;
#pragma unroll
  for (int q = 0; q < 8; ++q) {
    const int64_t j = j0 + rank_group + 4 * q;
    if (k < K && j < r) partial[(split * r + j) * K + k] = acc[q];
  }
}

// dx tile [32 rows, 64 columns]; thread t owns column t % 64 and rows t / 64 + 4 q, q < 8.
__global__ void __launch_bounds__(kThreads)
    lora_down_grad_input_kernel(void* __restrict__ dx, FloatFormat fmt, const float* __restrict__ g,
                                const float* __restrict__ A, int64_t M, int64_t K, int64_t r,
                                const int64_t* __restrict__ seed, uint32_t threshold, float keep_scale) {
  constexpr int kCols = 64;
  __shared__ float g_tile[kRows][kRank + 1];
  __shared__ float a_tile[kRank][kCols + 1];
  const uint64_t seed_value = static_cast<uint64_t>(*seed);
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kRows, k0 = static_cast<int64_t>(blockIdx.y) * kCols;
  const int t = threadIdx.x, col = t % kCols, row_group = t / kCols;
  float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  for (int64_t j0 = 0; j0 < r; j0 += kRank) {
#pragma unroll
    for (int i = 0; i < kRows * kRank / kThreads; ++i) {
      const int idx = t + kThreads * i, rr = idx / kRank, jj = idx % kRank;
      const int64_t m = m0 + rr, j = j0 + jj;
      g_tile[rr][jj] = (m < M && j < r) ? g[m * r + j] : 0.0f;
    }
#pragma unroll
    for (int i = 0; i < kRank * kCols / kThreads; ++i) {
      const int idx = t + kThreads * i, jj = idx / kCols, kk = idx % kCols;
      const int64_t j = j0 + jj, k = k0 + kk;
      a_tile[jj][kk] = (j < r && k < K) ? A[j * K + k] : 0.0f;
    }
    __syncthreads();
#pragma unroll 8
    for (int jj = 0; jj < kRank; ++jj) {
      const float av = a_tile[jj][col];
#pragma unroll
      for (int q = 0; q < 8; ++q) acc[q] = fmaf(g_tile[row_group + 4 * q][jj], av, acc[q]);
    }
    __syncthreads();
  }
  const int64_t k = k0 + col;
#pragma unroll
  for (int q = 0; q < 8; ++q) {
    const int64_t m = m0 + row_group + 4 * q;
    if (m < M && k < K) {
      const int64_t e = m * K + k;
      const float add = dropout_keep(seed_value, static_cast<uint64_t>(e), threshold) ? __fmul_rn(acc[q], keep_scale)
                                                                                      : 0.0f;
      store_from_float(dx, fmt, e, __fadd_rn(load_as_float(dx, fmt, e), add));
    }
  }
}

unsigned int ceil_div(int64_t a, int64_t b) { return static_cast<unsigned int>((a + b - 1) / b); }

}  // namespace

cudaError_t lora_down(const void* x, FloatFormat fmt, const float* A, float* xa, int64_t M, int64_t K, int64_t r,
                      const int64_t* seed, uint32_t threshold, float keep_scale, cudaStream_t stream) {
  if (M == 0 || r == 0) return cudaSuccess;
  const dim3 grid(ceil_div(M, kRows), ceil_div(r, kRank));
  lora_down_kernel<<<grid, kThreads, 0, stream>>>(x, fmt, A, xa, M, K, r, seed, threshold, keep_scale);
  return cudaGetLastError();
}

cudaError_t lora_down_grad_weight(const float* g, const void* x, FloatFormat fmt, float* partial, int64_t M,
                                  int64_t K, int64_t r, int splits, const int64_t* seed, uint32_t threshold,
                                  float keep_scale, cudaStream_t stream) {
  if (K == 0 || r == 0) return cudaSuccess;
  if (splits < 1) splits = 1;
  int64_t rows_per_split = (M + splits - 1) / splits;
  rows_per_split = (rows_per_split + kRows - 1) / kRows * kRows;
  if (rows_per_split == 0) rows_per_split = kRows;
  const dim3 grid(ceil_div(K, 64), ceil_div(r, kRank), static_cast<unsigned int>(splits));
  lora_down_grad_weight_kernel<<<grid, kThreads, 0, stream>>>(g, x, fmt, partial, M, K, r, rows_per_split, seed,
                                                              threshold, keep_scale);
  return cudaGetLastError();
}

cudaError_t lora_down_grad_input(void* dx, FloatFormat fmt, const float* g, const float* A, int64_t M, int64_t K,
                                 int64_t r, const int64_t* seed, uint32_t threshold, float keep_scale,
                                 cudaStream_t stream) {
  if (M == 0 || K == 0 || r == 0) return cudaSuccess;
  const dim3 grid(ceil_div(M, kRows), ceil_div(K, 64));  // rows on x: M may exceed 65535 tiles
  lora_down_grad_input_kernel<<<grid, kThreads, 0, stream>>>(dx, fmt, g, A, M, K, r, seed, threshold, keep_scale);
  return cudaGetLastError();
}

}  // namespace qpeft::cuda
