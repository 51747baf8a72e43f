// The 4-bit code books as CPU arrays (fp32, index -> value): the one home of the CPU kernels' tables.
#pragma once

#include "../quant_rules.h"

namespace qpeft::cpu {

alignas(64) inline constexpr float kNF4CodeValues[16] = {QPEFT_NF4_CODE_VALUES};
alignas(64) inline constexpr float kFP4CodeValues[16] = {QPEFT_FP4_CODE_VALUES};

inline const float* code_values(QuantType type) { return type == QuantType::NF4 ? kNF4CodeValues : kFP4CodeValues; }

}  // namespace qpeft::cpu
