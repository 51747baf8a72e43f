// Device helpers shared by the LoRA-branch kernels (lora_branch.cu: CUDA cores; lora_branch_mma.cu: tensor
// cores): dropout decisions in registers (../dropout_rng.h), 16-bit/fp32 element loads and stores.
#pragma once

#include "../dropout_rng.h"
#include "device_utils.cuh"
#include "layer_cuda.h"

namespace qpeft::cuda {
namespace lora {

struct Dropout {
  uint64_t seed;
  uint32_t threshold;
  float keep_scale;
  // v[i] = drop(x)[e0 + i] given v[i] = x[e0 + i], e0 the row-major index of the logical input: one hash per group
  // of four counters (../dropout_rng.h); p = 0 skips hashing.
  template <int N>
  __device__ __forceinline__ void apply(float (&v)[N], int64_t e0) const {
    if (threshold == 0u && keep_scale == 1.0f) return;
    const uint64_t first = static_cast<uint64_t>(e0), group0 = first >> 2;
    const int skew = static_cast<int>(first & 3u);
    static_assert(N == 4 || N == 8, "groups of 4 or 8 counters");
    // N consecutive counters touch at most N / 4 + 1 groups; named registers, not an array (no local memory)
    const uint64_t h0 = dropout_hash(seed, group0), h1 = dropout_hash(seed, group0 + 1);
    const uint64_t h2 = (N == 8 && skew > 0) ? dropout_hash(seed, group0 + 2) : 0;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const int lane = skew + i;
      const uint64_t h = (lane >> 2) == 0 ? h0 : (lane >> 2) == 1 ? h1 : h2;
      v[i] = dropout_lane(h, static_cast<uint64_t>(lane)) >= threshold ? __fmul_rn(v[i], keep_scale) : 0.0f;
    }
  }
  // apply() for e0 % 4 == 0 (groups start at v[0]): N / 4 hashes, lane positions known at compile time.
  template <int N>
  __device__ __forceinline__ void apply_aligned(float (&v)[N], int64_t e0) const {
    static_assert(N % 4 == 0, "whole groups of four counters");
    if (threshold == 0u && keep_scale == 1.0f) return;
    const uint64_t group0 = static_cast<uint64_t>(e0) >> 2;
#pragma unroll
    for (int q = 0; q < N / 4; ++q) {
      const uint64_t h = dropout_hash(seed, group0 + q);
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        v[4 * q + l] =
            dropout_lane(h, static_cast<uint64_t>(l)) >= threshold ? __fmul_rn(v[4 * q + l], keep_scale) : 0.0f;
      }
    }
  }
};

// The kernel-side dropout of a launcher's spec (the seed read from device memory where it lives there).
__device__ __forceinline__ Dropout resolve(const DropoutSpec& d) { return {d.seed.get(), d.threshold, d.keep_scale}; }

// v[i] = float(row[k + i]) for k + i < k_end, else 0 (16-byte loads when `vec_ok`: K % 8 == 0, 16-byte aligned x).
template <typename T>
__device__ __forceinline__ void load8(const T* __restrict__ row, int64_t k, int64_t k_end, bool vec_ok, float (&v)[8]) {
  if (vec_ok && k + 8 <= k_end) {
    if constexpr (sizeof(T) == 2) {
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(row + k));
      const T* h = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = to_float(h[i]);
    } else {
      const float4 a = __ldg(reinterpret_cast<const float4*>(row + k));
      const float4 b = __ldg(reinterpret_cast<const float4*>(row + k + 4));
      v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = k + i < k_end ? to_float(row[k + i]) : 0.0f;
  }
}

// v = x[m, k .. k + 8) as fp32 for a row m < row_end of x [*, K]; rows past row_end read as zeros (as columns
// past k_end do in load8).
template <typename T>
__device__ __forceinline__ void load_row8(const T* __restrict__ x, int64_t m, int64_t row_end, int64_t K, int64_t k,
                                          int64_t k_end, bool vec_ok, float (&v)[8]) {
  if (m < row_end) {
    load8(x + m * K, k, k_end, vec_ok, v);
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = 0.0f;
  }
}

// Writes drop(v) (v = elements e0 .. e0 + 7 of the logical input; zeros stay zero) to 8 floats of shared memory
// (16-byte aligned).
__device__ __forceinline__ void stage_dropped8(const Dropout& drop, float (&v)[8], int64_t e0, float* dst) {
  drop.apply(v, e0);
  reinterpret_cast<float4*>(dst)[0] = make_float4(v[0], v[1], v[2], v[3]);
  reinterpret_cast<float4*>(dst)[1] = make_float4(v[4], v[5], v[6], v[7]);
}

// Four consecutive elements as fp32 and back (8- or 16-byte accesses; p must be aligned to 4 elements).
template <typename T>
__device__ __forceinline__ void load4(const T* p, float (&v)[4]) {
  if constexpr (sizeof(T) == 2) {
    const uint2 raw = *reinterpret_cast<const uint2*>(p);
    const T* h = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = to_float(h[i]);
  } else {
    const float4 a = *reinterpret_cast<const float4*>(p);
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
  }
}

template <typename T>
__device__ __forceinline__ void store4(T* p, const float (&v)[4]) {
  if constexpr (sizeof(T) == 2) {
    uint2 raw;
    T* h = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = from_float<T>(v[i]);
    *reinterpret_cast<uint2*>(p) = raw;
  } else {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  }
}

// ---- tensor-core (mma.sync) helpers, sm_80+ -------------------------------------------------------------------
// An fp32 value as a pair of tf32 values with hi + lo == v to within 2^-22 |v| (hi = v rounded to 10 mantissa
// bits, lo = the rest rounded the same way; v - hi is exact in fp32). Products against an operand that is exact
// in tf32 (bf16 or fp16 values widened to fp32) then need two MMAs (hi, lo) for fp32 accuracy; two split operands
// need three (hi hi, hi lo, lo hi; lo lo is below fp32 rounding).
struct Tf32Pair {
  uint32_t hi, lo;
};
__device__ __forceinline__ uint32_t to_tf32(float v) {
#if defined(QPEFT_CUDA_HOST_EMULATION)
  return ::qpeft_emu::cvt_rna_tf32(v);
#else
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(v));
  return r;
#endif
}
__device__ __forceinline__ Tf32Pair split_tf32(float v) {
  const uint32_t hi = to_tf32(v);
  return {hi, to_tf32(v - __uint_as_float(hi))};
}
// A bf16/fp16 value widened to fp32 is exact in tf32 (at most 11 significant bits, 8 exponent bits): its bits are
// the operand as they are.
__device__ __forceinline__ uint32_t exact_tf32(float v) { return __float_as_uint(v); }

// d += A (16 x 8, row-major) * B (8 x 8, column-major), tf32 inputs, fp32 accumulators. With g = lane / 4 and
// t = lane % 4, lane (g, t) holds a0 = A[g][t], a1 = A[g + 8][t], a2 = A[g][t + 4], a3 = A[g + 8][t + 4],
// b0 = B[t][g], b1 = B[t + 4][g] and d0 = D[g][2 t], d1 = D[g][2 t + 1], d2 = D[g + 8][2 t], d3 = D[g + 8][2 t + 1].
// The k index of A and of B held by a lane is the same (t or t + 4), so a kernel may assign any physical k to
// the lanes' k slots as long as A and B use the same assignment.
__device__ __forceinline__ void mma_tf32(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                         uint32_t b1) {
#if defined(QPEFT_CUDA_HOST_EMULATION)
  ::qpeft_emu::mma_m16n8k8_tf32(d, a0, a1, a2, a3, b0, b1);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

// *p through the read-only cache where `in`, else zeros (V = uint4 or float4): the bounds-guarded 16-byte operand
// loads of the tensor-core kernels (p is only dereferenced where `in`).
template <typename V>
__device__ __forceinline__ V ldg_or_zero(const V* p, bool in) {
  return in ? __ldg(p) : V{};
}

// Eight 16-bit values (one 16-byte load) widened to fp32.
template <typename T>
__device__ __forceinline__ void widen8(const uint4& raw, float (&v)[8]) {
  const T* h = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = to_float(h[i]);
}

inline unsigned int ceil_div(int64_t a, int64_t b) { return static_cast<unsigned int>((a + b - 1) / b); }

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Runs launch(T{}) with T the element type of fmt; returns the launch status.
template <typename Launch>
cudaError_t by_format(FloatFormat fmt, Launch&& launch) {
  switch (fmt) {
    case FloatFormat::F32:
      launch(float{});
      break;
    case FloatFormat::BF16:
      launch(__nv_bfloat16{});
      break;
    default:
      launch(__half{});
  }
  return cudaGetLastError();
}

}  // namespace lora
}  // namespace qpeft::cuda
