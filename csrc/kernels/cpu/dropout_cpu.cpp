#include "dropout_cpu.h"

#include "../dropout_rng.h"
#include "../float_convert.h"

namespace qpeft::cpu {

void lora_dropout(const void* x, void* out, FloatFormat fmt, uint64_t seed, uint64_t offset, uint32_t threshold,
                  float keep_scale, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const bool keep = dropout_keep(seed, offset + static_cast<uint64_t>(i), threshold);
    switch (fmt) {
      case FloatFormat::F32:
        static_cast<float*>(out)[i] = keep ? static_cast<const float*>(x)[i] * keep_scale : 0.0f;
        break;
      case FloatFormat::BF16: {
        const float v = bf16_bits_to_float(static_cast<const uint16_t*>(x)[i]);
        static_cast<uint16_t*>(out)[i] = keep ? float_to_bf16_bits(v * keep_scale) : 0;
        break;
      }
      default: {
        const float v = fp16_bits_to_float(static_cast<const uint16_t*>(x)[i]);
        static_cast<uint16_t*>(out)[i] = keep ? float_to_fp16_bits(v * keep_scale) : 0;
      }
    }
  }
}

}  // namespace qpeft::cpu
