// Counter-based dropout for the LoRA branch: the keep decision of element i of a logical row-major [M, K]
// input is a pure function of (seed, offset + i), so forward and backward regenerate the same mask instead of
// storing it, on any device and for any memory layout. Torch-free; the reference is qpeft/reference.py.
//
// bits(seed, c) = the high 32 bits of SplitMix64's output for state seed + c * 0x9E3779B97F4A7C15 (mod 2^64).
// keep iff bits >= threshold, threshold = round(p * 2^32) (so the drop probability is p to within 2^-33);
// kept values are multiplied by 1 / (1 - p) computed in fp32, as nn.Dropout does.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define QPEFT_RNG_HD __host__ __device__ __forceinline__
#else
#define QPEFT_RNG_HD inline
#endif

namespace qpeft {

QPEFT_RNG_HD uint32_t dropout_bits(uint64_t seed, uint64_t counter) {
  uint64_t z = seed + counter * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<uint32_t>(z >> 32);
}

// The keep threshold for drop probability p in [0, 1): round(p * 2^32), computed in double.
inline uint32_t dropout_threshold(double p) {
  const double t = p * 4294967296.0 + 0.5;
  return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
}

QPEFT_RNG_HD bool dropout_keep(uint64_t seed, uint64_t counter, uint32_t threshold) {
  return dropout_bits(seed, counter) >= threshold;
}

}  // namespace qpeft
