// 4-bit blockwise dequantization on CUDA, memory-bound: each thread turns one 16-byte chunk of packed codes
// (32 elements, always inside a single quantization block since blocksize >= 32) into 32 outputs with one
// 16-byte load and 16-byte stores. The 16-entry code book sits in shared memory (distinct banks, so lookups
// never conflict). out = fmt(code[q] * scale): one fp32 product, one round-to-nearest-even conversion.
#include "device_utils.cuh"
#include "quant_cuda.h"

namespace qpeft::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kChunkBytes = 16;
constexpr int kChunkElements = 2 * kChunkBytes;

__constant__ float kNF4Values[16] = {QPEFT_NF4_CODE_VALUES};
__constant__ float kFP4Values[16] = {QPEFT_FP4_CODE_VALUES};

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

// Writes the 32 outputs of one chunk with 16-byte stores (out_chunk is 16-byte aligned).
template <typename OutT>
__device__ __forceinline__ void store_chunk(OutT* out_chunk, const float (&values)[kChunkElements]) {
  constexpr int kPerVector = 16 / sizeof(OutT);
  union Vector {
    uint4 raw;
    OutT elements[kPerVector];
  };
#pragma unroll
  for (int v = 0; v < kChunkElements / kPerVector; ++v) {
    Vector vec;
#pragma unroll
    for (int e = 0; e < kPerVector; ++e) vec.elements[e] = from_float<OutT>(values[v * kPerVector + e]);
    reinterpret_cast<uint4*>(out_chunk)[v] = vec.raw;
  }
}

template <typename OutT>
__global__ void __launch_bounds__(kThreads)
    dequantize_4bit_kernel(const uint8_t* __restrict__ packed, BlockScales scales, int64_t n, int log2_blocksize,
                           QuantType type, OutT* __restrict__ out, bool vector_ok) {
  __shared__ float code_values[16];
  if (threadIdx.x < 16) code_values[threadIdx.x] = (type == QuantType::NF4 ? kNF4Values : kFP4Values)[threadIdx.x];
  __syncthreads();

  const int64_t num_chunks = (n + kChunkElements - 1) / kChunkElements;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < num_chunks; c += stride) {
    const int64_t first = c * kChunkElements;
    const float scale = scales(first >> log2_blocksize);
    if (vector_ok && first + kChunkElements <= n) {
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(packed + first / 2));
      const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
      float values[kChunkElements];
#pragma unroll
      for (int w = 0; w < 4; ++w) {
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          const uint32_t byte = (words[w] >> (8 * b)) & 0xFFu;  // little endian: byte 4w+b
          values[8 * w + 2 * b] = __fmul_rn(code_values[byte >> 4], scale);
          values[8 * w + 2 * b + 1] = __fmul_rn(code_values[byte & 0xFu], scale);
        }
      }
      store_chunk(out + first, values);
    } else {
      const int64_t last = first + kChunkElements < n ? first + kChunkElements : n;
      for (int64_t i = first; i < last; ++i) {
        const uint8_t byte = packed[i / 2];
        const uint8_t code = (i & 1) ? (byte & 0xFu) : (byte >> 4);
        out[i] = from_float<OutT>(__fmul_rn(code_values[code], scale));
      }
    }
  }
}

template <typename OutT>
cudaError_t launch(const uint8_t* packed, const BlockScales& scales, int64_t n, int64_t blocksize, QuantType type,
                   void* out, cudaStream_t stream) {
  int log2_blocksize = 0;
  while ((int64_t{1} << log2_blocksize) < blocksize) ++log2_blocksize;
  const bool vector_ok = (reinterpret_cast<uintptr_t>(packed) % 16 == 0) && (reinterpret_cast<uintptr_t>(out) % 16 == 0);
  const int64_t num_chunks = (n + kChunkElements - 1) / kChunkElements;
  dequantize_4bit_kernel<OutT><<<grid_for(num_chunks, kThreads, int64_t{1} << 20), kThreads, 0, stream>>>(
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
