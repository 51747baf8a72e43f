// Round-to-nearest-even conversions of fp32 to the 16-bit float formats, as raw bits; torch-free, host only.
// Same results as torch's .to(torch.bfloat16 / torch.float16) for every finite input (tested).
#pragma once

#include <cstdint>
#include <cstring>

#include "quant_rules.h"

namespace qpeft {

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Exact widenings of the 16-bit formats' raw bits to fp32.
inline float bf16_bits_to_float(uint16_t b) { return bits_float(static_cast<uint32_t>(b) << 16); }

inline float fp16_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1Fu, mantissa = h & 0x3FFu;
  const uint32_t special = sign | 0x7F800000u | (mantissa << 13);  // inf / NaN
  const uint32_t normal = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  const uint32_t subnormal = sign | float_bits(static_cast<float>(mantissa) * 5.9604644775390625e-08f);  // * 2^-24
  return bits_float(exponent == 0x1Fu ? special : exponent != 0 ? normal : subnormal);
}

// Branch-free (selects, no early returns), so the loops of the CPU kernels that call these vectorize.
inline uint16_t float_to_bf16_bits(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t quiet_nan = (u >> 16) | 0x40u;
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? quiet_nan : rounded);
}

inline uint16_t float_to_fp16_bits(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7FFFFFFFu;
  // Normal results: re-bias the exponent by -112 and add the rounding bias (to nearest even).
  const uint32_t normal = (a + 0xC8000FFFu + ((a >> 13) & 1u)) >> 13;
  // Below 2^-14 the result is subnormal (spacing 2^-24). Adding 0.5f puts that spacing at the fp32 ulp, so the
  // FPU's own round-to-nearest-even does the rounding. (Computed for every input: no branch.)
  const uint32_t subnormal = float_bits(bits_float(a) + 0.5f) - 0x3F000000u;
  const uint32_t special = 0x7C00u | (a > 0x7F800000u ? 0x200u : 0u);  // inf, or a quiet NaN
  uint32_t magnitude = a < 0x38800000u ? subnormal : normal;
  magnitude = a >= 0x477FF000u ? 0x7C00u : magnitude;  // >= 65520 rounds to infinity
  magnitude = a >= 0x7F800000u ? special : magnitude;
  return static_cast<uint16_t>(sign | (magnitude & 0xFFFFu));
}

// Element i of a float tensor of format fmt, widened exactly to fp32.
inline float load_as_float(const void* A, FloatFormat fmt, int64_t i) {
  switch (fmt) {
    case FloatFormat::F32:
      return static_cast<const float*>(A)[i];
    case FloatFormat::BF16:
      return bf16_bits_to_float(static_cast<const uint16_t*>(A)[i]);
    default:
      return fp16_bits_to_float(static_cast<const uint16_t*>(A)[i]);
  }
}

// Stores v (rounded to nearest even) as element i of a float tensor of format fmt.
inline void store_from_float(void* A, FloatFormat fmt, int64_t i, float v) {
  switch (fmt) {
    case FloatFormat::F32:
      static_cast<float*>(A)[i] = v;
      break;
    case FloatFormat::BF16:
      static_cast<uint16_t*>(A)[i] = float_to_bf16_bits(v);
      break;
    default:
      static_cast<uint16_t*>(A)[i] = float_to_fp16_bits(v);
  }
}

}  // namespace qpeft
