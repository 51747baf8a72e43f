// Torch-free CUDA launchers of the LoRA-branch kernels. Device pointers, work enqueued on `stream`.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../quant_rules.h"

namespace qpeft::cuda {

// out[i] = keep(seed, offset + i) ? fmt(float(x[i]) * keep_scale) : 0 over n contiguous elements.
cudaError_t lora_dropout(const void* x, void* out, FloatFormat fmt, int64_t n, uint64_t seed, uint64_t offset,
                         uint32_t threshold, float keep_scale, cudaStream_t stream);

}  // namespace qpeft::cuda
