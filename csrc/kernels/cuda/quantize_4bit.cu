// 4-bit blockwise quantization on CUDA: one warp per quantization block (grid-stride over blocks).
// Pass 1: warp-wide absmax; pass 2: each lane codes element pairs and writes whole bytes. The second read of
// the block hits L1/L2; quantization runs once per weight, so simplicity wins over the last few percent here.
#include "device_utils.cuh"
#include "quant_cuda.h"

namespace qpeft::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void quantize_4bit_kernel(const void* __restrict__ A, FloatFormat fmt, int64_t n, int64_t blocksize,
                                     QuantType type, uint8_t* __restrict__ packed, float* __restrict__ absmax,
                                     int64_t num_blocks) {
  const int lane = threadIdx.x & 31;
  const int64_t first_warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t warp_stride = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  const uint8_t pad = zero_code_4bit(type);
  for (int64_t b = first_warp; b < num_blocks; b += warp_stride) {
    const int64_t begin = b * blocksize;
    const int64_t end = begin + blocksize < n ? begin + blocksize : n;
    float m = 0.0f;
    for (int64_t i = begin + lane; i < end; i += 32) m = fmaxf(m, fabsf(load_as_float(A, fmt, i)));
    m = warp_max(m);
    if (lane == 0) absmax[b] = m;
    const float reciprocal = approx_reciprocal(m);
    for (int64_t i = begin + 2 * lane; i < end; i += 64) {
      const uint8_t hi = quantize_4bit_value(__fmul_rn(load_as_float(A, fmt, i), reciprocal), type);
      const uint8_t lo =
          i + 1 < end ? quantize_4bit_value(__fmul_rn(load_as_float(A, fmt, i + 1), reciprocal), type) : pad;
      packed[i / 2] = static_cast<uint8_t>((hi << 4) | lo);
    }
  }
}

}  // namespace

cudaError_t quantize_4bit(const void* A, FloatFormat fmt, int64_t n, int64_t blocksize, QuantType type, uint8_t* packed,
                          float* absmax, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t num_blocks = (n + blocksize - 1) / blocksize;
  QPEFT_LAUNCH(grid_for(num_blocks * 32, kThreads), kThreads, stream, quantize_4bit_kernel)(A, fmt, n, blocksize, type,
                                                                                            packed, absmax, num_blocks);
  return cudaGetLastError();
}

}  // namespace qpeft::cuda
