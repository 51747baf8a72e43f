// Validation and output allocation shared by every backend of the qpeft ops: each op's arguments are checked
// once here (clear ValueError / TypeError messages naming the argument), and outputs are allocated on the
// inputs' device, so the backends only launch kernels.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <string_view>

#include "../kernels/quant_rules.h"

namespace qpeft::ops {

// Op implementations that call ATen ops on their inputs run below autograd: they are kernels, not graphs (an
// adapter weight that requires grad must not make an inner matmul record history or reject an out= argument).
using BelowAutograd = at::AutoDispatchBelowADInplaceOrView;

// Which CUDA kernels run the LoRA branch (lora_down and its two gradients) where both kinds apply (16-bit x,
// K % 8 == 0, aligned rows): the tensor-core ones (true) or the CUDA-core ones (false, the default). Process-wide;
// set from Python (qpeft.functional.set_cuda_lora_kernels) or the QPEFT_CUDA_LORA_KERNELS environment variable.
bool cuda_lora_tensor_cores();
void set_cuda_lora_tensor_cores(bool enabled);

QuantType parse_quant_type(std::string_view quant_type);
FloatFormat float_format(at::ScalarType dtype, const char* what);
int64_t num_blocks(int64_t n, int64_t blocksize);

struct Quantize4bitArgs {
  at::Tensor A;  // contiguous
  int64_t n, blocksize;
  QuantType type;
  FloatFormat fmt;
  at::Tensor packed, absmax;  // outputs
};
Quantize4bitArgs prepare_quantize_4bit(const at::Tensor& A, int64_t blocksize, std::string_view quant_type);

struct Dequantize4bitArgs {
  at::Tensor packed;                                                           // contiguous uint8
  at::Tensor absmax, absmax_codes, nested_absmax, nested_code, nested_offset;  // contiguous; unused ones undefined
  int64_t n, blocksize;
  QuantType type;
  FloatFormat fmt;
  at::Tensor out;              // undefined for a weight prepared without an output
  BlockScales scales() const;  // raw pointers into the tensors above
};
// The 4-bit weight of n elements alone (validated, contiguous; no output allocated).
Dequantize4bitArgs prepare_weight_4bit(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                                       std::string_view quant_type, int64_t n);
Dequantize4bitArgs prepare_weight_4bit_nested(const at::Tensor& packed, const at::Tensor& absmax_codes,
                                              const at::Tensor& nested_absmax, const at::Tensor& nested_code,
                                              const at::Tensor& nested_offset, int64_t blocksize,
                                              std::string_view quant_type, int64_t n);
// A 4-bit weight as the ops take it (schema.cpp): the op's arguments, grouped (references: no copies). The
// nested three go together (double quantization) or are all absent.
struct Weight4bitRef {
  const at::Tensor& packed;
  const at::Tensor& absmax;
  const std::optional<at::Tensor>& nested_absmax;
  const std::optional<at::Tensor>& nested_code;
  const std::optional<at::Tensor>& nested_offset;
  int64_t blocksize;
  std::string_view quant_type;
};
// The weight of n elements, validated, contiguous; no output allocated.
Dequantize4bitArgs prepare_weight(const Weight4bitRef& w, int64_t n);
Dequantize4bitArgs prepare_dequantize_4bit(const Weight4bitRef& w, at::IntArrayRef shape, at::ScalarType dtype);
// The weight [rows, cols] of a fused linear op, checked against the 2-D activation that multiplies it (dtype,
// device); no output allocated.
Dequantize4bitArgs prepare_linear_weight(const at::Tensor& activation, const Weight4bitRef& w, int64_t rows,
                                         int64_t cols);

struct Quantize8bitArgs {
  at::Tensor A, code;  // contiguous fp32
  int64_t n, blocksize;
  at::Tensor q, absmax;
};
Quantize8bitArgs prepare_quantize_blockwise_8bit(const at::Tensor& A, const at::Tensor& code, int64_t blocksize);

struct Dequantize8bitArgs {
  at::Tensor q, absmax, code;
  int64_t n, blocksize;
  at::Tensor out;
};
Dequantize8bitArgs prepare_dequantize_blockwise_8bit(const at::Tensor& q, const at::Tensor& absmax,
                                                     const at::Tensor& code, int64_t blocksize);

// Dropout of the LoRA branch: drop probability p and the seed, a one-element int64 tensor on the activation's
// device (kernels read it there: no host sync, and CUDA graph replays see a freshly drawn seed) or on the CPU
// (its value is passed to the kernels).
struct DropoutParams {
  at::Tensor seed;  // int64 [1], contiguous, on the activation's device or the CPU (then read on the host)
  uint32_t threshold;
  float keep_scale;
  uint64_t host_seed() const;  // the seed's value; CPU tensors only
};
DropoutParams prepare_dropout(const at::Tensor& activation, double p, const at::Tensor& seed);

struct DropoutArgs {
  at::Tensor x, out;  // contiguous, same dtype
  FloatFormat fmt;
  DropoutParams dropout;
  uint64_t offset;
};
DropoutArgs prepare_lora_dropout(const at::Tensor& x, double p, const at::Tensor& seed, int64_t offset);

// The LoRA-branch ops (validated inputs; g and A as contiguous fp32, activations contiguous).
struct LoraDownArgs {
  at::Tensor x, A;  // x [M, K], A fp32 [r, K]
  DropoutParams dropout;
};
LoraDownArgs prepare_lora_down(const at::Tensor& x, const at::Tensor& lora_A, double p, const at::Tensor& seed);

struct LoraDownGradWeightArgs {
  at::Tensor g, x;  // g fp32 [M, r], x [M, K]
  DropoutParams dropout;
};
LoraDownGradWeightArgs prepare_lora_down_grad_weight(const at::Tensor& g, const at::Tensor& x, double p,
                                                     const at::Tensor& seed);

struct LoraDownGradInputArgs {
  FloatFormat fmt;  // of dx (contiguous, updated in place)
  at::Tensor g, A;  // fp32 [M, r], [r, K]
  DropoutParams dropout;
};
// `op` names the op in messages (the in-place lora_down_grad_input_ or the out-of-place lora_down_grad_input).
LoraDownGradInputArgs prepare_lora_down_grad_input(const at::Tensor& dx, const at::Tensor& g, const at::Tensor& lora_A,
                                                   double p, const at::Tensor& seed,
                                                   const char* op = "lora_down_grad_input_");
// The out-of-place form: dx = drop(g A) in a new contiguous [M, K] tensor of `dtype` (allocated, not filled).
struct NewGradInputArgs {
  at::Tensor dx;
  LoraDownGradInputArgs args;
};
NewGradInputArgs prepare_lora_down_grad_input_new(const at::Tensor& g, const at::Tensor& lora_A, double p,
                                                  const at::Tensor& seed, at::ScalarType dtype);

// Checks a 2-D activation [rows, features] (float dtype) and returns it contiguous.
at::Tensor prepare_activation(const at::Tensor& t, const char* what);
// Checks lora_A [r, in_features] (float dtype, on `device`) and returns it as contiguous fp32.
at::Tensor prepare_lora_A(const at::Tensor& A, int64_t in_features, const at::Device& device);

struct ReciprocalArgs {
  at::Tensor x, out;  // contiguous fp32
};
ReciprocalArgs prepare_approx_reciprocal(const at::Tensor& x);

}  // namespace qpeft::ops
