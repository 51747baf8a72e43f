// The small-M switch, in one place: row counts M up to which the base matmul x W^T (and its input gradient
// dy W) reads W straight from its 4-bit codes; above them W is dequantized for a GEMM (CPU: a slab at a time).
#pragma once

#include <cstdint>

namespace qpeft {

constexpr int64_t kCudaLinear4bitMaxM = 16;  // the CUDA codes kernel's row tile: its limit
constexpr int64_t kCpuSmallM = 16;           // CPU forward crossover (benchmarks/NOTES.md)
constexpr int64_t kCpuSmallMGradInput = 8;   // CPU input-gradient crossover

}  // namespace qpeft
