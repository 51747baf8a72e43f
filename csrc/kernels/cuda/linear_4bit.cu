// Small-M (decode) base matmul on CUDA reading the 4-bit weight once: y[m, n] = sum_k x[m, k] W[n, k], M <= 16.
// One warp per output feature n walks its weight row; with K % 8 == 0 (and `packed` 4-byte aligned) each lane
// loads 4 packed bytes = 8 codes per step (a warp reads 128 contiguous bytes), all 8 in one quantization block
// (blocksize >= 32), so one scale per step; otherwise element by element. Weights are the exact values
// dequantize_4bit gives (code * scale, one fp32 product); sums in fp32, then a warp reduction.
#include "device_utils.cuh"
#include "lora_cuda.h"

namespace qpeft::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxM = static_cast<int>(kLinear4bitMaxM);

__constant__ float kNF4[16] = {QPEFT_NF4_CODE_VALUES};
__constant__ float kFP4[16] = {QPEFT_FP4_CODE_VALUES};

__global__ void __launch_bounds__(kThreads)
    linear_4bit_kernel(const void* __restrict__ x, FloatFormat fmt, int M, int64_t K,
                       const uint8_t* __restrict__ packed, BlockScales scales, int log2_blocksize, QuantType type,
                       float* __restrict__ y, int64_t N, bool vector_ok) {
  __shared__ float code_values[16];
  if (threadIdx.x < 16) code_values[threadIdx.x] = (type == QuantType::NF4 ? kNF4 : kFP4)[threadIdx.x];
  __syncthreads();
  const int lane = threadIdx.x % 32;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (n >= N) return;  // whole warps leave together; no barrier follows
  float acc[kMaxM];
#pragma unroll
  for (int m = 0; m < kMaxM; ++m) acc[m] = 0.0f;
  if (vector_ok) {
    const int64_t units = K / 8;
    const uint32_t* row = reinterpret_cast<const uint32_t*>(packed) + n * units;
    for (int64_t u = lane; u < units; u += 32) {
      const uint32_t word = __ldg(row + u);
      const float scale = scales((n * K + 8 * u) >> log2_blocksize);
      float w[8];
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const uint32_t byte = (word >> (8 * b)) & 0xFFu;  // little endian: elements 2b (high nibble), 2b + 1
        w[2 * b] = __fmul_rn(code_values[byte >> 4], scale);
        w[2 * b + 1] = __fmul_rn(code_values[byte & 0xFu], scale);
      }
#pragma unroll
      for (int m = 0; m < kMaxM; ++m) {
        if (m < M) {
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[m] = fmaf(w[e], load_as_float(x, fmt, m * K + 8 * u + e), acc[m]);
        }
      }
    }
  } else {
    for (int64_t k = lane; k < K; k += 32) {
      const int64_t e = n * K + k;
      const uint8_t byte = packed[e >> 1];
      const float w = __fmul_rn(code_values[(e & 1) ? (byte & 0xFu) : (byte >> 4)], scales(e >> log2_blocksize));
#pragma unroll
      for (int m = 0; m < kMaxM; ++m) {
        if (m < M) acc[m] = fmaf(w, load_as_float(x, fmt, m * K + k), acc[m]);
      }
    }
  }
#pragma unroll
  for (int m = 0; m < kMaxM; ++m) {
    if (m < M) {  // M is uniform across the warp
      const float total = warp_sum(acc[m]);
      if (lane == 0) y[m * N + n] = total;
    }
  }
}

}  // namespace

cudaError_t linear_4bit(const void* x, FloatFormat fmt, int64_t M, int64_t K, const uint8_t* packed,
                        BlockScales scales, int64_t blocksize, QuantType type, float* y, int64_t N,
                        cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  if (M > kLinear4bitMaxM) return cudaErrorInvalidValue;
  int log2_blocksize = 0;
  while ((int64_t{1} << log2_blocksize) < blocksize) ++log2_blocksize;
  const bool vector_ok = K % 8 == 0 && reinterpret_cast<uintptr_t>(packed) % 4 == 0;
  const unsigned int grid = static_cast<unsigned int>((N + kWarps - 1) / kWarps);
  linear_4bit_kernel<<<grid, kThreads, 0, stream>>>(x, fmt, static_cast<int>(M), K, packed, scales, log2_blocksize,
                                                    type, y, N, vector_ok);
  return cudaGetLastError();
}

}  // namespace qpeft::cuda
