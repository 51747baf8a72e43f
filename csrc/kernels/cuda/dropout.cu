// Counter-based LoRA dropout on CUDA (see ../dropout_rng.h): elementwise, grid-stride.
#include "../dropout_rng.h"
#include "device_utils.cuh"
#include "layer_cuda.h"

namespace qpeft::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void lora_dropout_kernel(const T* __restrict__ x, T* __restrict__ out, FloatFormat fmt, int64_t n,
                                    DropoutSpec dropout, uint64_t offset) {
  const uint64_t seed = dropout.seed.get();
  const uint32_t threshold = dropout.threshold;
  const float keep_scale = dropout.keep_scale;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const bool keep = dropout_keep(seed, offset + static_cast<uint64_t>(i), threshold);
    out[i] = keep ? from_float<T>(__fmul_rn(load_as_float(x, fmt, i), keep_scale)) : from_float<T>(0.0f);
  }
}

}  // namespace

cudaError_t lora_dropout(const void* x, void* out, FloatFormat fmt, int64_t n, DropoutSpec dropout, uint64_t offset,
                         cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const unsigned int grid = grid_for(n, kThreads);
  switch (fmt) {
    case FloatFormat::F32:
      QPEFT_LAUNCH(grid, kThreads, stream, lora_dropout_kernel<float>)(
          static_cast<const float*>(x), static_cast<float*>(out), fmt, n, dropout, offset);
      break;
    case FloatFormat::BF16:
      QPEFT_LAUNCH(grid, kThreads, stream, lora_dropout_kernel<__nv_bfloat16>)(
          static_cast<const __nv_bfloat16*>(x), static_cast<__nv_bfloat16*>(out), fmt, n, dropout, offset);
      break;
    default:
      QPEFT_LAUNCH(grid, kThreads, stream, lora_dropout_kernel<__half>)(
          static_cast<const __half*>(x), static_cast<__half*>(out), fmt, n, dropout, offset);
  }
  return cudaGetLastError();
}

}  // namespace qpeft::cuda
