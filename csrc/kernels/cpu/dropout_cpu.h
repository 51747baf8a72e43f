// CPU kernel of the counter-based LoRA dropout (see ../dropout_rng.h), torch-free.
#pragma once

#include <cstdint>

#include "../quant_rules.h"

namespace qpeft::cpu {

// out[i] = keep(seed, offset + i) ? out_fmt(float(x[i]) * keep_scale) : 0, for i in [begin, end) of the
// contiguous tensors x (format in_fmt) and out (format out_fmt). x and out may be the same buffer when the
// formats are equal. threshold 0 and keep_scale 1 make it a plain format conversion.
void dropout_convert(const void* x, FloatFormat in_fmt, void* out, FloatFormat out_fmt, uint64_t seed, uint64_t offset,
                     uint32_t threshold, float keep_scale, int64_t begin, int64_t end);

// In place: out[i] = out_fmt(float(out[i]) + (keep(seed, offset + i) ? v[i] * keep_scale : 0)) for i in
// [begin, end); v is fp32. Accumulates a dropped gradient into a gradient tensor.
void add_dropped(const float* v, void* out, FloatFormat out_fmt, uint64_t seed, uint64_t offset, uint32_t threshold,
                 float keep_scale, int64_t begin, int64_t end);

}  // namespace qpeft::cpu
