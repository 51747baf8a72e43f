// Kernels that break the CUDA execution rules on purpose, so that tests/test_cuda_emulated.py can check that the
// emulator reports them (a checker that cannot fail checks nothing), plus one warp reduction it must get right.
#include "cuda_host_emulation.h"

#include <string>

#include "../../csrc/kernels/cuda/device_utils.cuh"

namespace {

__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x < 64) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

__global__ void partial_warp_shuffle_kernel(float* out) {
  if (threadIdx.x % 32 >= 16) return;  // half of each warp exits, the rest reduce over all 32 lanes
  out[threadIdx.x] = qpeft::cuda::warp_sum(1.0f);
}

__global__ void deadlock_kernel(float* out) {
  if (threadIdx.x == 0) __syncthreads();  // lane 0 waits for the block, lanes 1..31 for lane 0 in the shuffle
  out[threadIdx.x] = qpeft::cuda::warp_sum(1.0f);
}

__global__ void racy_kernel(const float* in, float* out) {
  __shared__ float staged[128];
  staged[threadIdx.x] = in[threadIdx.x];
  out[threadIdx.x] = staged[(threadIdx.x + 1) % 128];  // missing __syncthreads: the neighbour may not have written
}

__global__ void warp_sum_kernel(const float* in, float* out) {
  out[threadIdx.x + blockIdx.x * blockDim.x] = qpeft::cuda::warp_sum(in[threadIdx.x + blockIdx.x * blockDim.x]);
}

}  // namespace

// Returns the launch status (0: success).
int selftest_launch(const char* which, const float* in, float* out) {
  const std::string w = which;
  if (w == "divergent_barrier") QPEFT_LAUNCH(1, 128, nullptr, divergent_barrier_kernel)(out);
  if (w == "partial_warp_shuffle") QPEFT_LAUNCH(1, 64, nullptr, partial_warp_shuffle_kernel)(out);
  if (w == "deadlock") QPEFT_LAUNCH(1, 32, nullptr, deadlock_kernel)(out);
  if (w == "racy") QPEFT_LAUNCH(1, 128, nullptr, racy_kernel)(in, out);
  if (w == "warp_sum") QPEFT_LAUNCH(2, 64, nullptr, warp_sum_kernel)(in, out);
  return static_cast<int>(cudaGetLastError());
}
