#include "op_args.h"

#include <atomic>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "../kernels/dropout_rng.h"

namespace qpeft::ops {
namespace {

void check_blocksize(int64_t blocksize) {
  TORCH_CHECK_VALUE(blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0,
                    "qpeft: blocksize must be a power of two in [32, 4096], got ", blocksize);
}

void check_dtype(const at::Tensor& t, at::ScalarType expected, const char* what) {
  TORCH_CHECK_TYPE(t.scalar_type() == expected, "qpeft: ", what, " must be ", expected, ", got ", t.scalar_type());
}

void check_numel(const at::Tensor& t, int64_t expected, const char* what) {
  TORCH_CHECK_VALUE(t.numel() == expected, "qpeft: ", what, " must have ", expected, " elements, got ", t.numel(),
                    " (shape ", t.sizes(), ")");
}

void check_same_device(const at::Tensor& reference, const at::Tensor& t, const char* what) {
  TORCH_CHECK_VALUE(t.device() == reference.device(), "qpeft: ", what, " is on ", t.device(),
                    " but the packed data is on ", reference.device());
}

// Element counts the ops accept: every size derived from them ((n + 1) / 2 bytes, blocks rounded up, byte
// offsets of 4-byte elements) then fits in int64.
constexpr int64_t kMaxElements = int64_t{1} << 60;

// a * b for non-negative sizes, or a ValueError naming `what` when it exceeds kMaxElements.
int64_t checked_size_product(int64_t a, int64_t b, const char* what) {
  int64_t product = 0;
  TORCH_CHECK_VALUE(!__builtin_mul_overflow(a, b, &product) && product <= kMaxElements, "qpeft: ", what, " (", a, " x ",
                    b, " elements) is too large: at most 2^60 elements");
  return product;
}

int64_t shape_numel(at::IntArrayRef shape) {
  int64_t n = 1;
  for (int64_t d : shape) {
    TORCH_CHECK_VALUE(d >= 0, "qpeft: shape has a negative dimension: ", shape);
    n = checked_size_product(n, d, "the requested shape");
  }
  return n;
}

Dequantize4bitArgs prepare_common(const at::Tensor& packed, int64_t blocksize, std::string_view quant_type, int64_t n) {
  Dequantize4bitArgs args;
  check_blocksize(blocksize);
  check_dtype(packed, at::kByte, "packed");
  args.type = parse_quant_type(quant_type);
  args.n = n;
  args.blocksize = blocksize;
  check_numel(packed, (args.n + 1) / 2, "packed (for the requested shape)");
  args.packed = packed.contiguous();
  return args;
}

}  // namespace

QuantType parse_quant_type(std::string_view quant_type) {
  if (quant_type == "nf4") return QuantType::NF4;
  if (quant_type == "fp4") return QuantType::FP4;
  TORCH_CHECK_VALUE(false, "qpeft: quant_type must be 'nf4' or 'fp4', got '", std::string(quant_type), "'");
}

FloatFormat float_format(at::ScalarType dtype, const char* what) {
  switch (dtype) {
    case at::kFloat:
      return FloatFormat::F32;
    case at::kHalf:
      return FloatFormat::F16;
    case at::kBFloat16:
      return FloatFormat::BF16;
    default:
      TORCH_CHECK_TYPE(false, "qpeft: ", what, " must be float32, float16 or bfloat16, got ", dtype);
  }
}

int64_t num_blocks(int64_t n, int64_t blocksize) { return (n + blocksize - 1) / blocksize; }

// Non-finite values have no code and would poison a whole block: refused (reads the tensor once; on a GPU a
// sync, which quantization can afford).
void check_finite(const at::Tensor& A, const char* what) {
  TORCH_CHECK_VALUE(A.numel() == 0 || A.is_meta() || at::isfinite(A).all().item<bool>(), "qpeft: ", what,
                    " has inf or NaN values; they cannot be quantized");
}

Quantize4bitArgs prepare_quantize_4bit(const at::Tensor& A, int64_t blocksize, std::string_view quant_type) {
  check_blocksize(blocksize);
  Quantize4bitArgs args;
  args.fmt = float_format(A.scalar_type(), "the input of quantize_4bit");
  args.type = parse_quant_type(quant_type);
  check_finite(A, "the tensor to quantize");
  args.A = A.contiguous();
  args.n = A.numel();
  args.blocksize = blocksize;
  args.packed = at::empty({(args.n + 1) / 2}, A.options().dtype(at::kByte));
  args.absmax = at::empty({num_blocks(args.n, blocksize)}, A.options().dtype(at::kFloat));
  return args;
}

Dequantize4bitArgs prepare_weight_4bit(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                                       std::string_view quant_type, int64_t n) {
  Dequantize4bitArgs args = prepare_common(packed, blocksize, quant_type, n);
  check_dtype(absmax, at::kFloat, "absmax");
  check_numel(absmax, num_blocks(args.n, blocksize), "absmax");
  check_same_device(packed, absmax, "absmax");
  args.absmax = absmax.contiguous();
  return args;
}

Dequantize4bitArgs prepare_weight_4bit_nested(const at::Tensor& packed, const at::Tensor& absmax_codes,
                                              const at::Tensor& nested_absmax, const at::Tensor& nested_code,
                                              const at::Tensor& nested_offset, int64_t blocksize,
                                              std::string_view quant_type, int64_t n) {
  Dequantize4bitArgs args = prepare_common(packed, blocksize, quant_type, n);
  const int64_t blocks = num_blocks(args.n, blocksize);
  check_dtype(absmax_codes, at::kByte, "absmax_codes");
  check_numel(absmax_codes, blocks, "absmax_codes");
  check_dtype(nested_absmax, at::kFloat, "nested_absmax");
  check_numel(nested_absmax, num_blocks(blocks, 256), "nested_absmax");
  check_dtype(nested_code, at::kFloat, "nested_code");
  check_numel(nested_code, 256, "nested_code");
  check_dtype(nested_offset, at::kFloat, "nested_offset");
  check_numel(nested_offset, 1, "nested_offset");
  for (auto [t, what] : {std::pair{&absmax_codes, "absmax_codes"},
                         {&nested_absmax, "nested_absmax"},
                         {&nested_code, "nested_code"},
                         {&nested_offset, "nested_offset"}}) {
    check_same_device(packed, *t, what);
  }
  args.absmax_codes = absmax_codes.contiguous();
  args.nested_absmax = nested_absmax.contiguous();
  args.nested_code = nested_code.contiguous();
  args.nested_offset = nested_offset.contiguous();
  return args;
}

namespace {

void allocate_output(Dequantize4bitArgs& args, const at::Tensor& packed, at::IntArrayRef shape, at::ScalarType dtype) {
  args.fmt = float_format(dtype, "dequantize dtype");
  args.out = at::empty(shape, packed.options().dtype(dtype));
}

}  // namespace

Dequantize4bitArgs prepare_weight(const Weight4bitRef& w, int64_t n) {
  const bool nested = w.nested_absmax.has_value();
  TORCH_CHECK_VALUE(nested == w.nested_code.has_value() && nested == w.nested_offset.has_value(),
                    "qpeft: nested_absmax, nested_code and nested_offset go together");
  return nested ? prepare_weight_4bit_nested(w.packed, w.absmax, *w.nested_absmax, *w.nested_code, *w.nested_offset,
                                             w.blocksize, w.quant_type, n)
                : prepare_weight_4bit(w.packed, w.absmax, w.blocksize, w.quant_type, n);
}

Dequantize4bitArgs prepare_dequantize_4bit(const Weight4bitRef& w, at::IntArrayRef shape, at::ScalarType dtype) {
  Dequantize4bitArgs args = prepare_weight(w, shape_numel(shape));
  allocate_output(args, w.packed, shape, dtype);
  return args;
}

BlockScales Dequantize4bitArgs::scales() const {
  BlockScales s;
  if (absmax.defined()) {
    s.absmax = absmax.data_ptr<float>();
  } else {
    s.absmax_codes = absmax_codes.data_ptr<uint8_t>();
    s.nested_absmax = nested_absmax.data_ptr<float>();
    s.nested_code = nested_code.data_ptr<float>();
    s.nested_offset = nested_offset.data_ptr<float>();
  }
  return s;
}

Quantize8bitArgs prepare_quantize_blockwise_8bit(const at::Tensor& A, const at::Tensor& code, int64_t blocksize) {
  check_blocksize(blocksize);
  check_dtype(A, at::kFloat, "the input of quantize_blockwise_8bit");
  check_dtype(code, at::kFloat, "code");
  check_numel(code, 256, "code");
  check_same_device(A, code, "code");
  check_finite(A, "the input of quantize_blockwise_8bit");
  Quantize8bitArgs args;
  args.A = A.contiguous();
  args.code = code.contiguous();
  args.n = A.numel();
  args.blocksize = blocksize;
  args.q = at::empty({args.n}, A.options().dtype(at::kByte));
  args.absmax = at::empty({num_blocks(args.n, blocksize)}, A.options());
  return args;
}

Dequantize8bitArgs prepare_dequantize_blockwise_8bit(const at::Tensor& q, const at::Tensor& absmax,
                                                     const at::Tensor& code, int64_t blocksize) {
  check_blocksize(blocksize);
  check_dtype(q, at::kByte, "q");
  check_dtype(absmax, at::kFloat, "absmax");
  check_dtype(code, at::kFloat, "code");
  check_numel(code, 256, "code");
  check_numel(absmax, num_blocks(q.numel(), blocksize), "absmax");
  check_same_device(q, absmax, "absmax");
  check_same_device(q, code, "code");
  Dequantize8bitArgs args;
  args.q = q.contiguous();
  args.absmax = absmax.contiguous();
  args.code = code.contiguous();
  args.n = q.numel();
  args.blocksize = blocksize;
  args.out = at::empty(q.sizes(), q.options().dtype(at::kFloat));
  return args;
}

Dequantize4bitArgs prepare_linear_weight(const at::Tensor& activation, const Weight4bitRef& w, int64_t rows,
                                         int64_t cols) {
  TORCH_CHECK_VALUE(activation.dim() == 2, "qpeft: the activation must have shape [M, features], got ",
                    activation.sizes());
  float_format(activation.scalar_type(), "the activation of a 4-bit linear");
  TORCH_CHECK_VALUE(rows >= 0 && cols >= 0, "qpeft: negative weight shape [", rows, ", ", cols, "]");
  TORCH_CHECK_VALUE(activation.device() == w.packed.device(), "qpeft: the activation is on ", activation.device(),
                    " but the weight is on ", w.packed.device());
  return prepare_weight(w, checked_size_product(rows, cols, "the weight"));
}

uint64_t DropoutParams::host_seed() const {
  TORCH_CHECK(seed.device().is_cpu(), "qpeft: host_seed() of a seed on ", seed.device());
  return static_cast<uint64_t>(*seed.data_ptr<int64_t>());
}

DropoutParams prepare_dropout(const at::Tensor& activation, double p, const at::Tensor& seed) {
  TORCH_CHECK_VALUE(p >= 0.0 && p <= kMaxDropoutP, "qpeft: dropout probability must be in [0, ", kMaxDropoutP,
                    "] (the 16-bit dropout mask), got ", p);
  TORCH_CHECK_TYPE(seed.scalar_type() == at::kLong, "qpeft: the dropout seed must be an int64 tensor, got ",
                   seed.scalar_type());
  TORCH_CHECK_VALUE(seed.numel() == 1, "qpeft: the dropout seed must have one element, got shape ", seed.sizes());
  TORCH_CHECK_VALUE(seed.device() == activation.device() || seed.device().is_cpu(), "qpeft: the dropout seed is on ",
                    seed.device(), " but the activation is on ", activation.device(),
                    " (a seed is on the activation's device or on the CPU)");
  DropoutParams params;
  params.seed = seed.reshape({1}).contiguous();
  params.threshold = dropout_threshold(p);
  params.keep_scale = 1.0f / static_cast<float>(1.0 - p);
  return params;
}

DropoutArgs prepare_lora_dropout(const at::Tensor& x, double p, const at::Tensor& seed, int64_t offset) {
  DropoutArgs args;
  args.fmt = float_format(x.scalar_type(), "the input of lora_dropout");
  args.dropout = prepare_dropout(x, p, seed);
  args.x = x.contiguous();
  args.out = at::empty_like(args.x);
  args.offset = static_cast<uint64_t>(offset);
  return args;
}

at::Tensor prepare_activation(const at::Tensor& t, const char* what) {
  TORCH_CHECK_VALUE(t.dim() == 2, "qpeft: ", what, " must have shape [rows, features], got ", t.sizes());
  float_format(t.scalar_type(), what);
  return t.contiguous();
}

at::Tensor prepare_lora_A(const at::Tensor& A, int64_t in_features, const at::Device& device) {
  TORCH_CHECK_VALUE(A.dim() == 2 && A.size(1) == in_features, "qpeft: lora_A must have shape [r, ", in_features,
                    "], got ", A.sizes());
  float_format(A.scalar_type(), "lora_A");
  TORCH_CHECK_VALUE(A.device() == device, "qpeft: lora_A is on ", A.device(), " but the activation is on ", device);
  return A.to(at::kFloat).contiguous();
}

LoraDownArgs prepare_lora_down(const at::Tensor& x, const at::Tensor& lora_A, double p, const at::Tensor& seed) {
  LoraDownArgs args;
  args.x = prepare_activation(x, "the input of lora_down");
  args.A = prepare_lora_A(lora_A, args.x.size(1), args.x.device());
  args.dropout = prepare_dropout(args.x, p, seed);
  return args;
}

LoraDownGradWeightArgs prepare_lora_down_grad_weight(const at::Tensor& g, const at::Tensor& x, double p,
                                                     const at::Tensor& seed) {
  LoraDownGradWeightArgs args;
  args.x = prepare_activation(x, "the input of lora_down_grad_weight");
  const at::Tensor g2 = prepare_activation(g, "the gradient of lora_down_grad_weight");
  TORCH_CHECK_VALUE(g2.size(0) == args.x.size(0), "qpeft: lora_down_grad_weight: g has ", g2.size(0),
                    " rows but x has ", args.x.size(0));
  TORCH_CHECK_VALUE(g2.device() == args.x.device(), "qpeft: g is on ", g2.device(), " but x is on ", args.x.device());
  args.g = g2.to(at::kFloat).contiguous();
  args.dropout = prepare_dropout(args.x, p, seed);
  return args;
}

LoraDownGradInputArgs prepare_lora_down_grad_input(const at::Tensor& dx, const at::Tensor& g, const at::Tensor& lora_A,
                                                   double p, const at::Tensor& seed, const char* op) {
  TORCH_CHECK_VALUE(dx.dim() == 2 && dx.is_contiguous(), "qpeft: ", op, " needs a contiguous 2-D dx, got shape ",
                    dx.sizes(), " strides ", dx.strides());
  LoraDownGradInputArgs args;
  args.fmt = float_format(dx.scalar_type(), "dx of lora_down_grad_input");
  const at::Tensor g2 = prepare_activation(g, "the gradient g of lora_down_grad_input");
  args.A = prepare_lora_A(lora_A, dx.size(1), dx.device());
  TORCH_CHECK_VALUE(g2.size(0) == dx.size(0) && g2.size(1) == args.A.size(0), "qpeft: ", op, ": g must have shape [",
                    dx.size(0), ", ", args.A.size(0), "], got ", g2.sizes());
  TORCH_CHECK_VALUE(g2.device() == dx.device(), "qpeft: g is on ", g2.device(), " but dx is on ", dx.device());
  args.g = g2.to(at::kFloat).contiguous();
  args.dropout = prepare_dropout(dx, p, seed);
  return args;
}

NewGradInputArgs prepare_lora_down_grad_input_new(const at::Tensor& g, const at::Tensor& lora_A, double p,
                                                  const at::Tensor& seed, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(g.dim() == 2, "qpeft: lora_down_grad_input: g must have shape [rows, r], got ", g.sizes());
  TORCH_CHECK_VALUE(lora_A.dim() == 2 && lora_A.size(0) == g.size(1),
                    "qpeft: lora_down_grad_input: lora_A must "
                    "have shape [",
                    g.size(1), ", in_features], got ", lora_A.sizes());
  float_format(dtype, "the dtype of lora_down_grad_input");
  NewGradInputArgs out;
  out.dx = at::empty({g.size(0), lora_A.size(1)}, g.options().dtype(dtype));
  out.args = prepare_lora_down_grad_input(out.dx, g, lora_A, p, seed, "lora_down_grad_input");
  return out;
}

ReciprocalArgs prepare_approx_reciprocal(const at::Tensor& x) {
  check_dtype(x, at::kFloat, "the input of _approx_reciprocal");
  ReciprocalArgs args;
  args.x = x.contiguous();
  args.out = at::empty_like(args.x);
  return args;
}

namespace {
std::atomic<bool> g_cuda_lora_tensor_cores{false};
}  // namespace

bool cuda_lora_tensor_cores() { return g_cuda_lora_tensor_cores.load(std::memory_order_relaxed); }
void set_cuda_lora_tensor_cores(bool enabled) { g_cuda_lora_tensor_cores.store(enabled, std::memory_order_relaxed); }

}  // namespace qpeft::ops
