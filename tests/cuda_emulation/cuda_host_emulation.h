// Host emulation of the CUDA features qpeft's kernels use, so that the kernels of csrc/kernels/cuda run on a
// CPU-only machine (this project's CI and development machines) against the same references as the GPU tests.
//
// What it models: a grid runs block after block; a block's threads are cooperative fibers on one OS thread
// (deterministic order), each with its own stack; `__shared__` variables are function statics (one copy, shared by
// the block's threads, since only one block runs at a time); __syncthreads is a barrier of the block's live
// threads; warp collectives (__shfl_xor_sync, mma.sync) are barriers of the warp's 32 lanes that exchange the lanes'
// registers. mma.sync is computed from the documented fragment layouts (PTX ISA, m16n8k16 bf16/fp16 and m16n8k8
// tf32; tf32 operands read as their top 19 bits, products summed in double, rounded once to fp32).
//
// What it checks beyond the kernels' results: a barrier that not all live threads reach (deadlock), threads of a
// block waiting at different __syncthreads (divergent barrier), a warp collective with exited lanes or a partial
// mask; and, by running threads in the opposite order (set_reverse_order) and comparing, data races between two
// barriers that change a result. What it cannot see: races that happen not to change the result, memory ordering
// and timing, out-of-bounds accesses (the tests surround buffers with guard regions instead), register and
// shared-memory limits. Device pointers are host pointers.
//
// Used by compiling a kernel file with this header included first (tests/cuda_emulation/build.py); the kernels
// see QPEFT_CUDA_HOST_EMULATION and route their inline PTX and launches through the functions below.
#pragma once

#define QPEFT_CUDA_HOST_EMULATION 1

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <math.h>  // fmaf, fmaxf, fabsf at global scope, as device code sees them

#include <cstdint>
#include <cstring>
#include <functional>

// __shared__: one copy per kernel (blocks run one at a time). The CUDA headers define it empty for a host compiler.
#undef __shared__
#define __shared__ static
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

// The running emulated thread's coordinates (set by the scheduler before it switches to a thread).
extern uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;

namespace qpeft_emu {

// Runs body() as every thread of every block of the grid (blocks in order). Errors found (see above) are
// reported by cudaGetLastError (cudaErrorLaunchFailure) and last_error_message().
void run_grid(dim3 grid, dim3 block, const std::function<void()>& body);

// `kernel<<<grid, block, 0, stream>>>(args...)` as `launch(grid, block, kernel)(args...)` (QPEFT_LAUNCH).
template <typename Kernel>
struct Launch {
  dim3 grid, block;
  Kernel* kernel;
  template <typename... Args>
  void operator()(Args&&... args) const {
    run_grid(grid, block, [&] { kernel(args...); });
  }
};
template <typename Kernel>
Launch<Kernel> launch(dim3 grid, dim3 block, Kernel* kernel) {
  return {grid, block, kernel};
}

// __syncthreads: the barrier of the block's live threads. Not inlined, so that its return address names the
// call site (threads of one block waiting at different call sites are an error).
void sync_block();
// Warp collectives: every lane of the warp passes its value; returns the value of lane `source` (shuffle).
uint32_t warp_exchange(uint32_t value, int source);
// d += A B for the lane's fragments (layouts as the PTX instructions; see mma_16816 / mma_tf32 in the kernels).
void mma_m16n8k16(bool bf16, float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                  uint32_t b1);
void mma_m16n8k8_tf32(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1);
// cvt.rna.tf32.f32: round to 10 mantissa bits, ties away from zero (the result's low 13 bits are zero).
uint32_t cvt_rna_tf32(float v);
// An instruction the emulator does not model: recorded as a launch error (returns 0).
float unsupported(const char* what);
const char* last_error_message();
// Threads run (until their next barrier) in increasing index order, or decreasing with `reverse`. A kernel whose
// results change with the order has a data race between two barriers.
void set_reverse_order(bool reverse);

}  // namespace qpeft_emu

#define QPEFT_LAUNCH(grid, block, stream, ...) ::qpeft_emu::launch(dim3(grid), dim3(block), &__VA_ARGS__)

inline uint32_t __float_as_uint(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return u;
}
inline float __uint_as_float(uint32_t u) {
  float v;
  std::memcpy(&v, &u, 4);
  return v;
}

inline void __syncthreads() { ::qpeft_emu::sync_block(); }

inline float __shfl_xor_sync(unsigned int mask, float v, int lane_mask) {
  if (mask != 0xffffffffu) return ::qpeft_emu::unsupported("__shfl_xor_sync with a partial mask");
  return __uint_as_float(
      ::qpeft_emu::warp_exchange(__float_as_uint(v), static_cast<int>((threadIdx.x % 32) ^ lane_mask)));
}

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
// Single correctly rounded fp32 operations (the emulation is compiled with -ffp-contract=off).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
