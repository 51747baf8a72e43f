// dequantize_4bit_tile (quant_cpu.h) for AVX2 + FMA + F16C CPUs: per block the 16 scaled and rounded code values
// as byte tables (16-bit out: 32 elements per pair of byte shuffles) or two 8-entry fp32 tables (8 elements per
// pair of permutes). Same contract and the same bits as the portable version; call only when
// cpu_has(CpuIsa::Avx2).
#pragma once

#include <cstdint>

#include "../quant_rules.h"

namespace qpeft::cpu {

void dequantize_4bit_tile_avx2(const uint8_t* packed, const BlockScales& scales, int64_t K, int64_t blocksize,
                               QuantType type, int64_t r0, int64_t r1, int64_t c0, int64_t c1, void* out, int64_t ld,
                               FloatFormat fmt);

}  // namespace qpeft::cpu
