#include "dropout_cpu.h"

#include "../dropout_rng.h"
#include "../float_convert.h"

namespace qpeft::cpu {

void dropout_convert(const void* x, FloatFormat in_fmt, void* out, FloatFormat out_fmt, uint64_t seed,
                     uint64_t offset, uint32_t threshold, float keep_scale, int64_t begin, int64_t end) {
  if (threshold == 0 && keep_scale == 1.0f && in_fmt == FloatFormat::F32 && out_fmt == FloatFormat::F32) {
    if (x != out)
      for (int64_t i = begin; i < end; ++i) static_cast<float*>(out)[i] = static_cast<const float*>(x)[i];
    return;
  }
  DropoutStream stream{seed, threshold};
  for (int64_t i = begin; i < end; ++i) {
    const bool keep = stream.keep(offset + static_cast<uint64_t>(i));
    store_from_float(out, out_fmt, i, keep ? load_as_float(x, in_fmt, i) * keep_scale : 0.0f);
  }
}

void add_dropped(const float* v, void* out, FloatFormat out_fmt, uint64_t seed, uint64_t offset, uint32_t threshold,
                 float keep_scale, int64_t begin, int64_t end) {
  DropoutStream stream{seed, threshold};
  for (int64_t i = begin; i < end; ++i) {
    const bool keep = stream.keep(offset + static_cast<uint64_t>(i));
    store_from_float(out, out_fmt, i, load_as_float(out, out_fmt, i) + (keep ? v[i] * keep_scale : 0.0f));
  }
}

}  // namespace qpeft::cpu
