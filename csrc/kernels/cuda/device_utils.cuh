// Small device helpers shared by the CUDA kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../quant_rules.h"

// Kernel launches are written QPEFT_LAUNCH(grid, block, stream, kernel)(args...): `kernel<<<grid, block, 0,
// stream>>>(args...)` here, and a call into the host emulator when tests/cuda_emulation compiles these files for
// the CPU (QPEFT_CUDA_HOST_EMULATION; its header defines the macro and the device functions used below).
#ifndef QPEFT_LAUNCH
#define QPEFT_LAUNCH(grid, block, stream, ...) __VA_ARGS__<<<grid, block, 0, stream>>>
#endif

namespace qpeft::cuda {

__device__ __forceinline__ float load_as_float(const void* A, FloatFormat fmt, int64_t i) {
  switch (fmt) {
    case FloatFormat::F32:
      return static_cast<const float*>(A)[i];
    case FloatFormat::BF16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(A)[i]);
    default:
      return __half2float(static_cast<const __half*>(A)[i]);
  }
}

// rcp.approx.ftz.f32, what `1.0f / x` compiles to under fast math (bitsandbytes' build); 0 for x == 0.
__device__ __forceinline__ float approx_reciprocal(float x) {
#if defined(QPEFT_CUDA_HOST_EMULATION)
  return ::qpeft_emu::unsupported("rcp.approx.ftz.f32");  // the quantize kernels are not run under the emulator
#else
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return x == 0.0f ? 0.0f : r;
#endif
}

// fp32 -> output element type, round to nearest even.
template <typename OutT>
__device__ __forceinline__ OutT from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}

// Element type -> fp32 (exact).
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

// Stores v rounded (RNE) to element i of a tensor of format fmt.
__device__ __forceinline__ void store_from_float(void* A, FloatFormat fmt, int64_t i, float v) {
  switch (fmt) {
    case FloatFormat::F32:
      static_cast<float*>(A)[i] = v;
      break;
    case FloatFormat::BF16:
      static_cast<__nv_bfloat16*>(A)[i] = __float2bfloat16_rn(v);
      break;
    default:
      static_cast<__half*>(A)[i] = __float2half_rn(v);
  }
}

// What the fp32 scale of one 4-bit block is made of, loaded from global memory alone (plain: the scale;
// nested: the 8-bit scale code and its group's fp32 absmax), so that kernels can have these loads in flight
// while they stage the 256-entry nested map in shared memory; value() then applies the map (dequantize's rule).
struct ScaleParts {
  float scale_or_absmax2 = 0.0f;
  uint32_t code = 0;

  __device__ __forceinline__ static ScaleParts load(const BlockScales& scales, int64_t block) {
    ScaleParts parts;
    if (scales.absmax != nullptr) {
      parts.scale_or_absmax2 = __ldg(scales.absmax + block);
    } else {
      parts.scale_or_absmax2 = __ldg(scales.nested_absmax + (block >> 8));
      parts.code = __ldg(scales.absmax_codes + block);
    }
    return parts;
  }
  // nested_code_smem: the nested map in shared memory; offset: *scales.nested_offset (both unused when plain)
  __device__ __forceinline__ float value(bool nested, const float* nested_code_smem, float offset) const {
    return nested ? nested_scale_of(nested_code_smem[code], scale_or_absmax2, offset) : scale_or_absmax2;
  }
};

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Enough blocks of `threads` to cover `work_items` (one item per thread), capped for grid-stride loops.
inline unsigned int grid_for(int64_t work_items, int threads, int64_t cap = 65535) {
  int64_t blocks = (work_items + threads - 1) / threads;
  if (blocks < 1) blocks = 1;
  return static_cast<unsigned int>(blocks < cap ? blocks : cap);
}

}  // namespace qpeft::cuda
