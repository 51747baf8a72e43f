// The CPU dropout kernels. The mask bits of a chunk of counters are generated first into a small buffer (one
// SplitMix64 hash per group of four counters, its four 16-bit lanes stored in counter order), then a straight
// loop applies them: both loops have no branches and compile to SIMD code (QPEFT_CPU_MULTIVERSION: AVX-512 / AVX2 /
// baseline, picked by cpu_isa()). The arithmetic per element is the same as dropout_rng.h's scalar rule.
#include "dropout_cpu.h"

#include <algorithm>

#include "../dropout_rng.h"
#include "../float_convert.h"
#include "cpu_simd.h"

namespace qpeft::cpu {
namespace {

constexpr int64_t kChunk = 1024;  // counters whose bits are generated at once (a multiple of 4; 2 KB of bits)

// bits[j] = dropout_bits(seed, 4 * group0 + j) for j in [0, 4 * groups).
QPEFT_CPU_INLINE void fill_bits(uint64_t seed, uint64_t group0, int64_t groups, uint16_t* bits) {
  for (int64_t g = 0; g < groups; ++g) {
    const uint64_t h = dropout_hash(seed, group0 + static_cast<uint64_t>(g));
    bits[4 * g] = static_cast<uint16_t>(h);
    bits[4 * g + 1] = static_cast<uint16_t>(h >> 16);
    bits[4 * g + 2] = static_cast<uint16_t>(h >> 32);
    bits[4 * g + 3] = static_cast<uint16_t>(h >> 48);
  }
}

// Calls chunk(i, n, bits) for consecutive element ranges [i, i + n) of [begin, end), bits[j] being the 16 mask
// bits of counter offset + i + j.
template <typename Chunk>
QPEFT_CPU_INLINE void for_each_bits_chunk(uint64_t seed, uint64_t offset, int64_t begin, int64_t end, Chunk chunk) {
  alignas(64) uint16_t bits[kChunk];
  for (int64_t i = begin; i < end;) {
    const uint64_t counter = offset + static_cast<uint64_t>(i);
    const int64_t lead = static_cast<int64_t>(counter & 3u);  // counters of the first group before element i
    const int64_t n = std::min(end - i, kChunk - lead);
    fill_bits(seed, counter >> 2, (lead + n + 3) / 4, bits);
    chunk(i, n, bits + lead);
    i += n;
  }
}

template <FloatFormat In, FloatFormat Out>
QPEFT_CPU_INLINE void dropout_convert_typed(const void* x, void* out, uint64_t seed, uint64_t offset,
                                            uint32_t threshold, float keep_scale, int64_t begin, int64_t end) {
  if (threshold == 0 && keep_scale == 1.0f) {  // p = 0: a format conversion (or copy)
    for (int64_t i = begin; i < end; ++i) store_from_float(out, Out, i, load_as_float(x, In, i));
    return;
  }
  for_each_bits_chunk(seed, offset, begin, end, [&](int64_t i0, int64_t n, const uint16_t* bits) {
    for (int64_t j = 0; j < n; ++j) {
      const float kept = load_as_float(x, In, i0 + j) * keep_scale;  // unconditional: a select, not a branch
      store_from_float(out, Out, i0 + j, bits[j] >= threshold ? kept : 0.0f);
    }
  });
}

template <FloatFormat Out>
QPEFT_CPU_INLINE void add_dropped_typed(const float* v, void* out, uint64_t seed, uint64_t offset, uint32_t threshold,
                                        float keep_scale, int64_t begin, int64_t end) {
  for_each_bits_chunk(seed, offset, begin, end, [&](int64_t i0, int64_t n, const uint16_t* bits) {
    for (int64_t j = 0; j < n; ++j) {
      const float kept = v[i0 + j] * keep_scale;
      const float add = bits[j] >= threshold ? kept : 0.0f;
      store_from_float(out, Out, i0 + j, load_as_float(out, Out, i0 + j) + add);
    }
  });
}

template <FloatFormat In>
QPEFT_CPU_INLINE void dropout_convert_from(const void* x, void* out, FloatFormat out_fmt, uint64_t seed,
                                           uint64_t offset, uint32_t threshold, float keep_scale, int64_t begin,
                                           int64_t end) {
  switch (out_fmt) {
    case FloatFormat::F32:
      return dropout_convert_typed<In, FloatFormat::F32>(x, out, seed, offset, threshold, keep_scale, begin, end);
    case FloatFormat::BF16:
      return dropout_convert_typed<In, FloatFormat::BF16>(x, out, seed, offset, threshold, keep_scale, begin, end);
    default:
      return dropout_convert_typed<In, FloatFormat::F16>(x, out, seed, offset, threshold, keep_scale, begin, end);
  }
}

QPEFT_CPU_INLINE void dropout_convert_impl(const void* x, FloatFormat in_fmt, void* out, FloatFormat out_fmt,
                                           uint64_t seed, uint64_t offset, uint32_t threshold, float keep_scale,
                                           int64_t begin, int64_t end) {
  switch (in_fmt) {
    case FloatFormat::F32:
      return dropout_convert_from<FloatFormat::F32>(x, out, out_fmt, seed, offset, threshold, keep_scale, begin, end);
    case FloatFormat::BF16:
      return dropout_convert_from<FloatFormat::BF16>(x, out, out_fmt, seed, offset, threshold, keep_scale, begin, end);
    default:
      return dropout_convert_from<FloatFormat::F16>(x, out, out_fmt, seed, offset, threshold, keep_scale, begin, end);
  }
}

QPEFT_CPU_INLINE void add_dropped_impl(const float* v, void* out, FloatFormat out_fmt, uint64_t seed, uint64_t offset,
                                       uint32_t threshold, float keep_scale, int64_t begin, int64_t end) {
  switch (out_fmt) {
    case FloatFormat::F32:
      return add_dropped_typed<FloatFormat::F32>(v, out, seed, offset, threshold, keep_scale, begin, end);
    case FloatFormat::BF16:
      return add_dropped_typed<FloatFormat::BF16>(v, out, seed, offset, threshold, keep_scale, begin, end);
    default:
      return add_dropped_typed<FloatFormat::F16>(v, out, seed, offset, threshold, keep_scale, begin, end);
  }
}

}  // namespace

QPEFT_CPU_MULTIVERSION(void, dropout_convert,
                       (const void* x, FloatFormat in_fmt, void* out, FloatFormat out_fmt, uint64_t seed,
                        uint64_t offset, uint32_t threshold, float keep_scale, int64_t begin, int64_t end),
                       (x, in_fmt, out, out_fmt, seed, offset, threshold, keep_scale, begin, end))

QPEFT_CPU_MULTIVERSION(void, add_dropped,
                       (const float* v, void* out, FloatFormat out_fmt, uint64_t seed, uint64_t offset,
                        uint32_t threshold, float keep_scale, int64_t begin, int64_t end),
                       (v, out, out_fmt, seed, offset, threshold, keep_scale, begin, end))

}  // namespace qpeft::cpu
