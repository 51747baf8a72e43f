// 4-bit blockwise dequantization on CUDA, memory-bound. Work unit: 8 elements = 4 packed bytes (one 4-byte
// load) -> 8 outputs (one 16-byte store for 16-bit outputs, two for fp32), so a warp reads 128 contiguous bytes
// and writes 512 contiguous bytes per unit. Each thread keeps kUnroll units in flight (all loads issued before
// the first use; the first ones before the shared tables are filled). A unit never straddles a quantization
// block (blocksize >= 32). Code book and, when nested, the 256-entry 8-bit map sit in shared memory.
// out = fmt(code[q] * scale): one fp32 product, one RNE rounding.
#include "device_utils.cuh"
#include "quant_cuda.h"

namespace qpeft::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kUnitElements = 8;
constexpr int kUnroll = 4;

__constant__ float kNF4Values[16] = {QPEFT_NF4_CODE_VALUES};
__constant__ float kFP4Values[16] = {QPEFT_FP4_CODE_VALUES};

// Stores 8 outputs with 16-byte stores (dst is 16-byte aligned).
template <typename OutT>
__device__ __forceinline__ void store_unit(OutT* dst, const float (&values)[kUnitElements]) {
  constexpr int kPerVector = 16 / sizeof(OutT);
  union Vector {
    uint4 raw;
    OutT elements[kPerVector];
  };
#pragma unroll
  for (int v = 0; v < kUnitElements / kPerVector; ++v) {
    Vector vec;
#pragma unroll
    for (int e = 0; e < kPerVector; ++e) vec.elements[e] = from_float<OutT>(values[v * kPerVector + e]);
    reinterpret_cast<uint4*>(dst)[v] = vec.raw;
  }
}

// The global loads of kUnroll units (units base, base + stride, ...): codes and their scales' parts, none of it
// needing the shared tables, so they can be in flight while the tables are filled.
struct RawUnits {
  uint32_t words[kUnroll];
  ScaleParts scale[kUnroll];
};

__device__ __forceinline__ void load_units(RawUnits& raw, const uint8_t* __restrict__ packed, const BlockScales& scales,
                                           int log2_blocksize, int64_t base, int64_t stride, int64_t num_units) {
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t unit = base + u * stride;
    if (unit < num_units) {
      raw.words[u] = __ldg(reinterpret_cast<const uint32_t*>(packed) + unit);
      raw.scale[u] = ScaleParts::load(scales, (unit * kUnitElements) >> log2_blocksize);
    }
  }
}

template <typename OutT>
__device__ __forceinline__ void store_units(const RawUnits& raw, const float* code_values, const float* nested_code,
                                            bool nested, float offset, OutT* __restrict__ out, int64_t base,
                                            int64_t stride, int64_t num_units) {
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t unit = base + u * stride;
    if (unit < num_units) {
      const float scale = raw.scale[u].value(nested, nested_code, offset);
      float values[kUnitElements];
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const uint32_t byte = (raw.words[u] >> (8 * b)) & 0xFFu;  // little endian: element pair 2b, 2b+1
        values[2 * b] = __fmul_rn(code_values[byte >> 4], scale);
        values[2 * b + 1] = __fmul_rn(code_values[byte & 0xFu], scale);
      }
      store_unit(out + unit * kUnitElements, values);
    }
  }
}

template <typename OutT>
__global__ void __launch_bounds__(kThreads)
    dequantize_4bit_kernel(const uint8_t* __restrict__ packed, BlockScales scales, int64_t n, int log2_blocksize,
                           QuantType type, OutT* __restrict__ out, bool vector_ok) {
  __shared__ float code_values[16];
  __shared__ float nested_code[256];
  const bool nested = scales.absmax == nullptr;
  const int64_t num_units = n / kUnitElements;  // full units; the tail is done below
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  // The first units' loads go out before the tables are filled: with about one pass per thread (the grid covers
  // the weight), waiting for the tables first left a whole memory latency per block with no data in flight.
  RawUnits raw;
  if (vector_ok) load_units(raw, packed, scales, log2_blocksize, first, stride, num_units);
  if (threadIdx.x < 16) code_values[threadIdx.x] = (type == QuantType::NF4 ? kNF4Values : kFP4Values)[threadIdx.x];
  if (nested) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) nested_code[i] = scales.nested_code[i];
  }
  const float offset = nested ? __ldg(scales.nested_offset) : 0.0f;
  __syncthreads();

  if (vector_ok) {
    for (int64_t base = first; base < num_units;) {
      store_units(raw, code_values, nested_code, nested, offset, out, base, stride, num_units);
      base += stride * kUnroll;
      if (base < num_units) load_units(raw, packed, scales, log2_blocksize, base, stride, num_units);
    }
  }
  // Elements not covered above (all of them when unaligned, else the last n % 8), one per thread.
  const int64_t scalar_begin = vector_ok ? num_units * kUnitElements : 0;
  for (int64_t i = scalar_begin + first; i < n; i += stride) {
    const uint8_t byte = packed[i / 2];
    const uint8_t code = (i & 1) ? (byte & 0xFu) : (byte >> 4);
    const float scale = ScaleParts::load(scales, i >> log2_blocksize).value(nested, nested_code, offset);
    out[i] = from_float<OutT>(__fmul_rn(code_values[code], scale));
  }
}

template <typename OutT>
cudaError_t launch(const uint8_t* packed, const BlockScales& scales, int64_t n, int64_t blocksize, QuantType type,
                   void* out, cudaStream_t stream) {
  int log2_blocksize = 0;
  while ((int64_t{1} << log2_blocksize) < blocksize) ++log2_blocksize;
  const bool vector_ok = reinterpret_cast<uintptr_t>(packed) % 4 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0;
  const int64_t work = vector_ok ? (n / kUnitElements + kUnroll - 1) / kUnroll : n;
  QPEFT_LAUNCH(grid_for(work, kThreads, int64_t{1} << 20), kThreads, stream, dequantize_4bit_kernel<OutT>)(
      packed, scales, n, log2_blocksize, type, static_cast<OutT*>(out), vector_ok);
  return cudaGetLastError();
}

}  // namespace

cudaError_t dequantize_4bit(const uint8_t* packed, BlockScales scales, int64_t n, int64_t blocksize, QuantType type,
                            void* out, FloatFormat fmt, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  switch (fmt) {
    case FloatFormat::F32:
      return launch<float>(packed, scales, n, blocksize, type, out, stream);
    case FloatFormat::BF16:
      return launch<__nv_bfloat16>(packed, scales, n, blocksize, type, out, stream);
    default:
      return launch<__half>(packed, scales, n, blocksize, type, out, stream);
  }
}

}  // namespace qpeft::cuda
