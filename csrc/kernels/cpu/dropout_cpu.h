// CPU kernel of the counter-based LoRA dropout (see ../dropout_rng.h), torch-free.
#pragma once

#include <cstdint>

#include "../quant_rules.h"

namespace qpeft::cpu {

// out[i] = keep(seed, offset + i) ? fmt(float(x[i]) * keep_scale) : 0, for i in [begin, end) of the
// contiguous row-major tensors x and out (format fmt).
void lora_dropout(const void* x, void* out, FloatFormat fmt, uint64_t seed, uint64_t offset, uint32_t threshold,
                  float keep_scale, int64_t begin, int64_t end);

}  // namespace qpeft::cpu
