// 8-bit blockwise quantization / dequantization on CUDA (double quantization of the 4-bit scales: small
// tensors, one value per 4-bit block). Quantize: one warp per block, the 256-entry map in shared memory.
// Also the elementwise approximate reciprocal, so tests can compare the CPU emulation with the instruction.
#include "device_utils.cuh"
#include "quant_cuda.h"

namespace qpeft::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void quantize_8bit_kernel(const float* __restrict__ A, const float* __restrict__ code, int64_t n,
                                     int64_t blocksize, uint8_t* __restrict__ q, float* __restrict__ absmax,
                                     int64_t num_blocks) {
  __shared__ float code_smem[256];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) code_smem[i] = code[i];
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t first_warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t warp_stride = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  for (int64_t b = first_warp; b < num_blocks; b += warp_stride) {
    const int64_t begin = b * blocksize;
    const int64_t end = begin + blocksize < n ? begin + blocksize : n;
    float m = 0.0f;
    for (int64_t i = begin + lane; i < end; i += 32) m = fmaxf(m, fabsf(A[i]));
    m = warp_max(m);
    if (lane == 0) absmax[b] = m;
    const float reciprocal = approx_reciprocal(m);
    for (int64_t i = begin + lane; i < end; i += 32) q[i] = quantize_8bit_value(code_smem, __fmul_rn(A[i], reciprocal));
  }
}

__global__ void dequantize_8bit_kernel(const uint8_t* __restrict__ q, const float* __restrict__ absmax,
                                       const float* __restrict__ code, int64_t n, int64_t blocksize,
                                       float* __restrict__ out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    out[i] = __fmul_rn(code[q[i]], absmax[i / blocksize]);
  }
}

__global__ void approx_reciprocal_kernel(const float* __restrict__ x, int64_t n, float* __restrict__ out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    out[i] = approx_reciprocal(x[i]);
  }
}

}  // namespace

cudaError_t approx_reciprocal(const float* x, int64_t n, float* out, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  QPEFT_LAUNCH(grid_for(n, kThreads), kThreads, stream, approx_reciprocal_kernel)(x, n, out);
  return cudaGetLastError();
}

cudaError_t quantize_blockwise_8bit(const float* A, const float* code, int64_t n, int64_t blocksize, uint8_t* q,
                                    float* absmax, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t num_blocks = (n + blocksize - 1) / blocksize;
  QPEFT_LAUNCH(grid_for(num_blocks * 32, kThreads), kThreads, stream, quantize_8bit_kernel)(A, code, n, blocksize, q,
                                                                                            absmax, num_blocks);
  return cudaGetLastError();
}

cudaError_t dequantize_blockwise_8bit(const uint8_t* q, const float* absmax, const float* code, int64_t n,
                                      int64_t blocksize, float* out, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  QPEFT_LAUNCH(grid_for(n, kThreads), kThreads, stream, dequantize_8bit_kernel)(q, absmax, code, n, blocksize, out);
  return cudaGetLastError();
}

}  // namespace qpeft::cuda
