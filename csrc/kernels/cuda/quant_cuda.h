// Torch-free CUDA launchers of the blockwise quantization formats (same contract as cpu/quant_cpu.h, whole
// tensors at once). All pointers are device pointers on the current device; work is enqueued on `stream`.
// Each returns the launch status (cudaSuccess or the error of the failed launch).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../quant_rules.h"

namespace qpeft::cuda {

cudaError_t quantize_4bit(const void* A, FloatFormat fmt, int64_t n, int64_t blocksize, QuantType type, uint8_t* packed,
                          float* absmax, cudaStream_t stream);

// Any alignment works: a 4-byte aligned `packed` with a 16-byte aligned `out` takes the vectorized path, others
// the element-wise one.
cudaError_t dequantize_4bit(const uint8_t* packed, BlockScales scales, int64_t n, int64_t blocksize, QuantType type,
                            void* out, FloatFormat fmt, cudaStream_t stream);

cudaError_t quantize_blockwise_8bit(const float* A, const float* code, int64_t n, int64_t blocksize, uint8_t* q,
                                    float* absmax, cudaStream_t stream);

cudaError_t dequantize_blockwise_8bit(const uint8_t* q, const float* absmax, const float* code, int64_t n,
                                      int64_t blocksize, float* out, cudaStream_t stream);

// out[i] = approx_reciprocal(x[i]) (exposed for tests of the CPU emulation).
cudaError_t approx_reciprocal(const float* x, int64_t n, float* out, cudaStream_t stream);

}  // namespace qpeft::cuda
