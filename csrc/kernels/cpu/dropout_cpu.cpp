#include "dropout_cpu.h"

#include "../dropout_rng.h"
#include "../float_convert.h"

namespace qpeft::cpu {
namespace {

inline float load(const void* x, FloatFormat fmt, int64_t i) {
  switch (fmt) {
    case FloatFormat::F32:
      return static_cast<const float*>(x)[i];
    case FloatFormat::BF16:
      return bf16_bits_to_float(static_cast<const uint16_t*>(x)[i]);
    default:
      return fp16_bits_to_float(static_cast<const uint16_t*>(x)[i]);
  }
}

inline void store(void* out, FloatFormat fmt, int64_t i, float v) {
  switch (fmt) {
    case FloatFormat::F32:
      static_cast<float*>(out)[i] = v;
      break;
    case FloatFormat::BF16:
      static_cast<uint16_t*>(out)[i] = float_to_bf16_bits(v);
      break;
    default:
      static_cast<uint16_t*>(out)[i] = float_to_fp16_bits(v);
  }
}

}  // namespace

void dropout_convert(const void* x, FloatFormat in_fmt, void* out, FloatFormat out_fmt, uint64_t seed,
                     uint64_t offset, uint32_t threshold, float keep_scale, int64_t begin, int64_t end) {
  if (threshold == 0 && keep_scale == 1.0f && in_fmt == FloatFormat::F32 && out_fmt == FloatFormat::F32) {
    if (x != out)
      for (int64_t i = begin; i < end; ++i) static_cast<float*>(out)[i] = static_cast<const float*>(x)[i];
    return;
  }
  for (int64_t i = begin; i < end; ++i) {
    const bool keep = dropout_keep(seed, offset + static_cast<uint64_t>(i), threshold);
    store(out, out_fmt, i, keep ? load(x, in_fmt, i) * keep_scale : 0.0f);
  }
}

void add_dropped(const float* v, void* out, FloatFormat out_fmt, uint64_t seed, uint64_t offset, uint32_t threshold,
                 float keep_scale, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const bool keep = dropout_keep(seed, offset + static_cast<uint64_t>(i), threshold);
    store(out, out_fmt, i, load(out, out_fmt, i) + (keep ? v[i] * keep_scale : 0.0f));
  }
}

}  // namespace qpeft::cpu
