// Counter-based dropout for the LoRA branch: the keep decision of element i of a logical row-major [M, K]
// input is a pure function of (seed, offset + i), so forward and backward regenerate the same mask instead of
// storing it, on any device and for any memory layout. Torch-free; the reference is qpeft/reference.py.
//
// bits(seed, c) = 16-bit lane (c mod 4) of SplitMix64's output for state seed + (c / 4) * 0x9E3779B97F4A7C15
// (mod 2^64): one 64-bit hash serves four consecutive counters, so kernels hash once per group of four elements.
// keep iff bits >= threshold, threshold = round(p * 2^16) (so the drop probability is p to within 2^-17);
// kept values are multiplied by 1 / (1 - p) computed in fp32, as nn.Dropout does.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define QPEFT_RNG_HD __host__ __device__ __forceinline__
#else
#define QPEFT_RNG_HD inline
#endif

namespace qpeft {

QPEFT_RNG_HD uint64_t dropout_hash(uint64_t seed, uint64_t group) {
  uint64_t z = seed + group * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// The 16 bits of counter c within its group's hash.
QPEFT_RNG_HD uint32_t dropout_lane(uint64_t hash, uint64_t counter) {
  return static_cast<uint32_t>(hash >> (16 * (counter & 3u))) & 0xFFFFu;
}

QPEFT_RNG_HD uint32_t dropout_bits(uint64_t seed, uint64_t counter) {
  return dropout_lane(dropout_hash(seed, counter >> 2), counter);
}

// The largest drop probability the ops take: the 16-bit mask keeps with probability 1 - round(p * 2^16) / 2^16,
// within 2^-17 of 1 - p, so within 1% of it up to here (p = 0.999999 would keep 1/2^16 instead of 1e-6).
constexpr double kMaxDropoutP = 0.999;

// The keep threshold for drop probability p in [0, kMaxDropoutP]: round(p * 2^16), computed in double.
inline uint32_t dropout_threshold(double p) {
  const double t = p * 65536.0 + 0.5;
  return t >= 65535.0 ? 0xFFFFu : static_cast<uint32_t>(t);
}

QPEFT_RNG_HD bool dropout_keep(uint64_t seed, uint64_t counter, uint32_t threshold) {
  return dropout_bits(seed, counter) >= threshold;
}

// Keep decisions for counters visited in increasing order: hashes each group of four once.
struct DropoutStream {
  uint64_t seed;
  uint32_t threshold;
  uint64_t group = ~uint64_t{0};
  uint64_t hash = 0;
  QPEFT_RNG_HD bool keep(uint64_t counter) {
    if ((counter >> 2) != group) {
      group = counter >> 2;
      hash = dropout_hash(seed, group);
    }
    return dropout_lane(hash, counter) >= threshold;
  }
};

}  // namespace qpeft
