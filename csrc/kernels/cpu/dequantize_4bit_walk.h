// The block walk of dequantize_4bit_tile (quant_cpu.h), shared by its SIMD levels: each level's file includes it
// after `#pragma GCC target` for its instruction set (compiled once per set, internal linkage) with a Kernel type:
//   Kernel::Table                                   one block's 16 outputs in the level's register layout
//   Kernel::table<F>(type, scale)                   fmt F of code * scale for the 16 codes (float_convert.h bits)
//   Kernel::lookup<F>(packed, table, e, e_end, dst) dst[i - e] = table[code of element i], e even
// An element that starts a segment on a low nibble is converted alone, as the portable code does.
#pragma once

#include <algorithm>
#include <bit>
#include <type_traits>

#include "../float_convert.h"
#include "code_books.h"

namespace qpeft::cpu {
namespace {

template <class Kernel, FloatFormat F>
void walk_tile(const uint8_t* packed, const BlockScales& scales, int64_t K, int64_t blocksize, QuantType type,
               int64_t r0, int64_t r1, int64_t c0, int64_t c1, void* out, int64_t ld) {
  using OutT = std::conditional_t<F == FloatFormat::F32, float, uint16_t>;
  const int shift =
      std::has_single_bit(static_cast<uint64_t>(blocksize)) ? std::countr_zero(static_cast<uint64_t>(blocksize)) : -1;
  typename Kernel::Table table{};
  float scale = 0.0f;
  int64_t table_block = -1;
  for (int64_t r = r0; r < r1; ++r) {
    OutT* dst = static_cast<OutT*>(out) + (r - r0) * ld;
    const int64_t row_end = r * K + c1;
    for (int64_t e = r * K + c0; e < row_end;) {
      const int64_t block = shift >= 0 ? e >> shift : e / blocksize;
      const int64_t seg_end = std::min((block + 1) * blocksize, row_end);
      if (block != table_block) {
        scale = scales(block);
        table = Kernel::template table<F>(type, scale);
        table_block = block;
      }
      int64_t s = e;
      if (s & 1) {  // starts on a low nibble
        const float v = code_values(type)[packed[s / 2] & 0xF] * scale;
        if constexpr (F == FloatFormat::F32)
          *dst = v;
        else
          *dst = F == FloatFormat::BF16 ? float_to_bf16_bits(v) : float_to_fp16_bits(v);
        ++s;
      }
      Kernel::template lookup<F>(packed, table, s, seg_end, dst + (s - e));
      dst += seg_end - e;
      e = seg_end;
    }
  }
}

template <class Kernel>
void dispatch_tile(const uint8_t* packed, const BlockScales& scales, int64_t K, int64_t blocksize, QuantType type,
                   int64_t r0, int64_t r1, int64_t c0, int64_t c1, void* out, int64_t ld, FloatFormat fmt) {
  switch (fmt) {
    case FloatFormat::F32:
      return walk_tile<Kernel, FloatFormat::F32>(packed, scales, K, blocksize, type, r0, r1, c0, c1, out, ld);
    case FloatFormat::BF16:
      return walk_tile<Kernel, FloatFormat::BF16>(packed, scales, K, blocksize, type, r0, r1, c0, c1, out, ld);
    default:
      return walk_tile<Kernel, FloatFormat::F16>(packed, scales, K, blocksize, type, r0, r1, c0, c1, out, ld);
  }
}

}  // namespace
}  // namespace qpeft::cpu
