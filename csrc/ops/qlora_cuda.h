// The CUDA-only piece of the QLoRA layer ops (csrc/ops/qlora_ops.cpp composes everything else from the ops).
#pragma once

#ifdef QPEFT_WITH_CUDA
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "op_args.h"

namespace qpeft::ops {

// The small-M (decode) forward of qlora_forward in two launches, lora_down and the linear_4bit kernel with the
// LoRA up-projection, bias and lora_down's partial sums in its epilogue: (y [M, N], xa [M, r]) in x2's dtype.
// x2 [M, K] validated and contiguous, `weight` validated against it, the adapter and bias checked by the caller.
// std::nullopt where the fused kernel does not apply (fp32 x, K % 128 != 0, r > 64, ...): compose the ops then.
std::optional<std::tuple<at::Tensor, at::Tensor>> qlora_forward_small_m_cuda(
    const at::Tensor& x2, const Dequantize4bitArgs& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
    const std::optional<at::Tensor>& bias, double scaling, double p, const at::Tensor& seed);

}  // namespace qpeft::ops
#endif
