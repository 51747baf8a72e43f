// dequantize_4bit_tile (quant_cpu.h) for AVX-512 F/BW/VL/DQ CPUs: per block, the 16 scaled and rounded code
// values in one register, looked up by permute 32 (16-bit out) or 16 (fp32 out) elements at a time. Same
// contract and the same bits as the portable version; call only when cpu_has(CpuIsa::Avx512).
#pragma once

#include <cstdint>

#include "../quant_rules.h"

namespace qpeft::cpu {

void dequantize_4bit_tile_avx512(const uint8_t* packed, const BlockScales& scales, int64_t K, int64_t blocksize,
                                 QuantType type, int64_t r0, int64_t r1, int64_t c0, int64_t c1, void* out, int64_t ld,
                                 FloatFormat fmt);

}  // namespace qpeft::cpu
