// Scalar rules of qpeft's 4-bit / 8-bit blockwise formats, shared by the CPU and CUDA kernels.
// Torch-free: plain C++ that nvcc and a host compiler both accept. The normative definition (and the
// tests' oracle) is qpeft/reference.py; these functions must agree with it bit for bit.
//
// Floating-point contract: every product and sum here is a single correctly rounded fp32 operation.
// Host code is built with -ffp-contract=off, device code uses __fmul_rn/__fadd_rn where a multiply is
// followed by an add, so no fused multiply-add can change a rounding.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define QPEFT_HD __host__ __device__ __forceinline__
#else
#define QPEFT_HD inline
#endif

namespace qpeft {

enum class QuantType : int32_t { NF4 = 0, FP4 = 1 };

// Code books (index -> value), fp32, as bitsandbytes stores them in `weight.quant_map`.
#define QPEFT_NF4_CODE_VALUES                                                                         \
  -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,    \
      -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f, \
      0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f
// FP4: sign bit 0b1000, then magnitudes {0, 1/192, 2/3, 1, 1/3, 1/2, 1/6, 1/4} in bit-pattern order.
#define QPEFT_FP4_CODE_VALUES                                                                                      \
  0.0f, 0.005208333333f, 0.6666666666666666f, 1.0f, 0.3333333333333333f, 0.5f, 0.16666666666666666f, 0.25f, -0.0f, \
      -0.005208333333f, -0.6666666666666666f, -1.0f, -0.3333333333333333f, -0.5f, -0.16666666666666666f, -0.25f

// The 4-bit code of 0.0: pads an odd element count, and fills an all-zero block.
QPEFT_HD uint8_t zero_code_4bit(QuantType type) { return type == QuantType::NF4 ? 7 : 0; }

// Scaling by 1/absmax uses the GPU's approximate reciprocal (rcp.approx.ftz.f32), as bitsandbytes' CUDA kernels
// do; each backend provides approx_reciprocal(absmax) (CUDA: the instruction; CPU: the correctly rounded
// reciprocal corrected by a table measured on the GPU), returning 0 for absmax == 0 (all-zero block).

// NF4 code of a scaled value: the number of thresholds it is strictly greater than (NaN -> 0).
QPEFT_HD uint8_t quantize_nf4(float x) {
  return static_cast<uint8_t>((x > -0.8480964004993439f) + (x > -0.6106329262256622f) + (x > -0.4599952697753906f) +
                              (x > -0.33967943489551544f) + (x > -0.23460740596055984f) + (x > -0.13791173323988914f) +
                              (x > -0.045525018125772476f) + (x > 0.03979014977812767f) + (x > 0.1202552504837513f) +
                              (x > 0.2035212516784668f) + (x > 0.2920137718319893f) + (x > 0.3893125355243683f) +
                              (x > 0.5016634166240692f) + (x > 0.6427869200706482f) + (x > 0.8614784181118011f));
}

// FP4 code: sign bit iff x < 0, magnitude by rank of |x| among 7 thresholds mapped to its bit pattern.
QPEFT_HD uint8_t quantize_fp4(float x) {
  const float a = x < 0.0f ? -x : x;
  const int rank = (a > 0.00260417f) + (a > 0.0859375f) + (a > 0.20833333f) + (a > 0.29166667f) + (a > 0.4166667f) +
                   (a > 0.583333f) + (a > 0.8333333f);
  // rank -> 3-bit pattern {0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011}, packed 4 bits each.
  const uint32_t pattern = (0x32547610u >> (4 * rank)) & 0xFu;
  return static_cast<uint8_t>(pattern | (x < 0.0f ? 0x8u : 0x0u));
}

QPEFT_HD uint8_t quantize_4bit_value(float scaled, QuantType type) {
  return type == QuantType::NF4 ? quantize_nf4(scaled) : quantize_fp4(scaled);
}

QPEFT_HD float fp32_mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

QPEFT_HD float fp32_add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// 8-bit code of x in a sorted 256-entry map: bitsandbytes' binary search (7 halving steps from pivot 127),
// then the final pivot or its bracketing neighbour, decided against the fp32 midpoint (see reference.py).
QPEFT_HD uint8_t quantize_8bit_value(const float* code, float x) {
  int pivot = 127, lower = 0, upper = 255;
  for (int step = 64; step > 0; step >>= 1) {
    if (x > code[pivot]) {
      lower = pivot;
      pivot += step;
    } else {
      upper = pivot;
      pivot -= step;
    }
  }
  const float value = code[pivot];
  if (x > value) {
    const float midpoint = fp32_mul(fp32_add(code[upper], value), 0.5f);
    return static_cast<uint8_t>(x > midpoint ? upper : pivot);
  }
  const float midpoint = fp32_mul(fp32_add(code[lower], value), 0.5f);
  return static_cast<uint8_t>(x < midpoint ? lower : pivot);
}

// fp32 scale of a double-quantized 4-bit block from its parts: fp32(code8 value * absmax2) + offset.
QPEFT_HD float nested_scale_of(float code_value, float absmax2, float offset) {
  return fp32_add(fp32_mul(code_value, absmax2), offset);
}

// fp32 scale of 4-bit block `block` of a double-quantized state.
QPEFT_HD float nested_scale(const uint8_t* absmax_codes, const float* nested_absmax, const float* nested_code,
                            float offset, int64_t block) {
  return nested_scale_of(nested_code[absmax_codes[block]], nested_absmax[block >> 8], offset);
}

// Element formats of float tensors crossing the kernel boundary (16-bit ones as raw bits).
enum class FloatFormat : int32_t { F32 = 0, F16 = 1, BF16 = 2 };

// Per-block fp32 scales of a 4-bit tensor: a plain fp32 array, or a double-quantized one. All pointers
// address memory of the device the kernel runs on (the offset too, so no host sync is needed).
struct BlockScales {
  const float* absmax = nullptr;          // plain scales, or nullptr when nested
  const uint8_t* absmax_codes = nullptr;  // nested: 8-bit codes, one per 4-bit block
  const float* nested_absmax = nullptr;   // nested: one fp32 per 256 codes
  const float* nested_code = nullptr;     // nested: the sorted 256-entry 8-bit map
  const float* nested_offset = nullptr;   // nested: the mean subtracted before quantizing (one fp32)

  QPEFT_HD float operator()(int64_t block) const {
    return absmax ? absmax[block] : nested_scale(absmax_codes, nested_absmax, nested_code, *nested_offset, block);
  }
};

}  // namespace qpeft
