// The QLoRA layer ops (qlora_forward / qlora_backward), one implementation for every backend: it validates once
// and composes qpeft's own ops through the dispatcher (so each runs its CPU or CUDA kernel) with ATen GEMMs.
#include <ATen/ScalarOps.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "matmul_4bit_cpu.h"
#include "op_args.h"
#include "qlora_cuda.h"

namespace qpeft::ops {
namespace {

using OptTensor = std::optional<at::Tensor>;

// Rows up to which the base matmul reads the 4-bit codes directly.
int64_t small_m(const at::Device& device) { return device.is_cuda() ? kCudaLinear4bitMaxM : kCpuSmallM; }

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// The base matmul's paths for one weight (the ops it calls pick their kernels).
struct Weight4bit : Weight4bitRef {
  at::Tensor dequantize(int64_t N, int64_t K, at::ScalarType dtype) const {
    static auto dequant =
        op<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                      int64_t, c10::string_view, at::IntArrayRef, at::ScalarType)>("qpeft::dequantize_4bit");
    return dequant.call(packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, quant_type, {N, K},
                        dtype);
  }

  using FusedSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                                    const OptTensor&, const OptTensor&, int64_t, c10::string_view, int64_t);
  at::Tensor linear(const at::Tensor& x, int64_t N) const {  // x W^T from the codes
    static auto fused = op<FusedSignature>("qpeft::linear_4bit");
    return fused.call(x, packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, quant_type, N);
  }
  at::Tensor grad_input(const at::Tensor& dy, int64_t K) const {  // dy W from the codes
    static auto fused = op<FusedSignature>("qpeft::linear_4bit_grad_input");
    return fused.call(dy, packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, quant_type, K);
  }
  // out += a W^T (transpose_w; a [M, K], out [M, N]) or out += a W (a [M, N], out [M, K]) in a's dtype, the GEMM
  // adding onto out in its epilogue: the CPU slab by slab, elsewhere one GEMM with a transient dequantized W.
  void add_matmul(const at::Tensor& out, const at::Tensor& a, int64_t N, int64_t K, bool transpose_w) const {
    if (a.device().is_cpu()) {
      const Dequantize4bitArgs w = prepare_linear_weight(a, *this, N, K);
      matmul_4bit_cpu(out, a, w, N, K, transpose_w, /*accumulate=*/true);
      return;
    }
    const at::Tensor W = dequantize(N, K, a.scalar_type());
    out.addmm_(a, transpose_w ? W.t() : W);
  }
};

void check_adapter(const at::Tensor& x2, const at::Tensor& A, const at::Tensor& B) {
  TORCH_CHECK_VALUE(A.dim() == 2 && A.size(1) == x2.size(1), "qpeft: lora_A must have shape [r, ", x2.size(1),
                    "], got ", A.sizes());
  TORCH_CHECK_VALUE(B.dim() == 2 && B.size(1) == A.size(0), "qpeft: lora_B must have shape [out_features, ", A.size(0),
                    "], got ", B.sizes());
  float_format(A.scalar_type(), "lora_A");
  float_format(B.scalar_type(), "lora_B");
  TORCH_CHECK_VALUE(A.device() == x2.device() && B.device() == x2.device(), "qpeft: the adapter is on ", A.device(),
                    "/", B.device(), " but the activation is on ", x2.device());
}

// a @ b summed in fp32 and returned in fp32 [rows, cols], a and b of one dtype: on CUDA one GEMM writing fp32
// (aten::mm.dtype; looked up at run time, so an older torch without it still builds and runs), elsewhere the
// GEMM in a's dtype and a cast.
at::Tensor mm_float(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == at::kFloat) return at::mm(a, b);
  if (a.is_cuda()) {
    static const auto mm_dtype = []()
        -> std::optional<c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, at::ScalarType)>> {
      const auto handle = c10::Dispatcher::singleton().findOp({"aten::mm", "dtype"});
      if (!handle.has_value() || !handle->hasKernelForDispatchKey(c10::DispatchKey::CUDA)) return std::nullopt;
      return handle->typed<at::Tensor(const at::Tensor&, const at::Tensor&, at::ScalarType)>();
    }();
    if (mm_dtype.has_value()) return mm_dtype->call(a, b, at::kFloat);
  }
  return at::mm(a, b).to(at::kFloat);
}

// dtype(scaling * t) in one launch (the product in fp32, rounded once), e.g. s B for the backward's g = dy (s B).
at::Tensor scaled_as(const at::Tensor& t, double scaling, at::ScalarType dtype) {
  at::Tensor out = at::empty(t.sizes(), t.options().dtype(dtype));
  return at::mul_out(out, t, at::native::wrapped_scalar_tensor(scaling));
}

// The dtype of the LoRA branch's xa for activations of `dtype`: fp32 for fp16 (its range), else the same.
at::ScalarType branch_dtype(at::ScalarType dtype) { return dtype == at::kHalf ? at::kFloat : dtype; }

at::Tensor lora_down(const at::Tensor& x, const at::Tensor& A, double p, const at::Tensor& seed) {
  static auto down =
      op<at::Tensor(const at::Tensor&, const at::Tensor&, double, const at::Tensor&)>("qpeft::lora_down");
  return down.call(x, A, p, seed);
}

// Base term x W^T: for M <= small_m(device) the linear_4bit kernel reads W once from its 4-bit codes; above,
// CUDA: W is dequantized into a transient [N, K] tensor in x's dtype (freed when the op returns; the caching
// allocator hands the same block back next call) for one GEMM; CPU: W is dequantized a slab at a time into a
// small reused buffer, one GEMM per slab (matmul_4bit_cpu.h), so no dense W is allocated.
// LoRA term: xa = lora_down(x) (dropout inside), in branch_dtype (fp32 for fp16 x: x A^T can exceed fp16's range
// where the layer's output does not; peft's branch is fp32 too). Large M: y = bias + s xa B^T first, then the base
// GEMM adds x W^T onto y in its epilogue (beta = 1); small M: y += s xa B^T after the base term, or on CUDA (bf16 x,
// K % 128 == 0, r <= 64) lora_down + one linear_4bit launch that adds the LoRA term and bias (qlora_cuda.h).
std::tuple<at::Tensor, at::Tensor> qlora_forward(const at::Tensor& x, const at::Tensor& packed,
                                                 const at::Tensor& absmax, const OptTensor& nested_absmax,
                                                 const OptTensor& nested_code, const OptTensor& nested_offset,
                                                 int64_t blocksize, c10::string_view quant_type,
                                                 const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                 const OptTensor& bias, double scaling, double p,
                                                 const at::Tensor& seed) {
  const BelowAutograd below_autograd;
  const at::Tensor x2 = prepare_activation(x, "the input of qlora_forward");
  check_adapter(x2, lora_A, lora_B);
  const int64_t M = x2.size(0), K = x2.size(1), N = lora_B.size(0);
  const at::ScalarType dtype = x2.scalar_type();
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, "qpeft: bias must have shape [", N, "], got ",
                      bias->sizes());
    TORCH_CHECK_VALUE(bias->device() == x2.device(), "qpeft: bias is on ", bias->device(), " but x is on ",
                      x2.device());
  }
  const Weight4bit weight{{packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, quant_type}};
  const at::ScalarType branch = branch_dtype(dtype);
#ifdef QPEFT_WITH_CUDA
  if (x2.is_cuda() && M <= small_m(x2.device()) && branch == dtype) {  // decode: two launches where it applies
    const Dequantize4bitArgs w = prepare_linear_weight(x2, weight, N, K);
    if (auto fused = qlora_forward_small_m_cuda(x2, w, lora_A, lora_B, bias, scaling, p, seed)) return *fused;
  }
#endif
  at::Tensor xa = lora_down(branch == dtype ? x2 : x2.to(branch), lora_A, p, seed);
  const at::Tensor Bt = lora_B.to(branch).t();
  at::Tensor y;
  if (M <= small_m(x2.device())) {
    y = weight.linear(x2, N);
    if (bias.has_value()) y.add_(bias->to(dtype));
    if (branch == dtype) {
      y.addmm_(xa, Bt, 1.0, scaling);
    } else {
      y.add_(at::mm(xa, Bt).mul_(scaling).to(dtype));
    }
  } else {
    // The LoRA term (+ bias) first, then the base GEMM accumulates onto it (beta = 1: C is read in the GEMM's
    // epilogue), so y is written twice and read once instead of written, read and written again.
    y = bias.has_value() ? at::addmm(bias->to(branch), xa, Bt, 1.0, scaling)
                         : at::addmm(at::empty({M, N}, xa.options()), xa, Bt, 0.0, scaling);
    if (branch != dtype) y = y.to(dtype);
    weight.add_matmul(y, x2, N, K, /*transpose_w=*/true);
  }
  return {y, xa};
}

// Backward: g = dy (s B) (M x r, fp32 out of the GEMM on CUDA), dB = s dy^T xa, dA = lora_down_grad_weight(g, x),
// dx = dy W + drop(g A): small M on the CPU, linear_4bit_grad_input then drop(g A) accumulated in place; else
// drop(g A) written first and the base GEMM(s) adding dy W onto it.
std::tuple<at::Tensor, at::Tensor, at::Tensor> qlora_backward(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& xa, const at::Tensor& packed, const at::Tensor& absmax,
    const OptTensor& nested_absmax, const OptTensor& nested_code, const OptTensor& nested_offset, int64_t blocksize,
    c10::string_view quant_type, const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling, double p,
    const at::Tensor& seed) {
  const BelowAutograd below_autograd;
  const at::Tensor dy2 = prepare_activation(dy, "the gradient of qlora_backward");
  const at::Tensor x2 = prepare_activation(x, "the input of qlora_backward");
  check_adapter(x2, lora_A, lora_B);
  const int64_t M = x2.size(0), K = x2.size(1), N = lora_B.size(0), r = lora_A.size(0);
  TORCH_CHECK_VALUE(dy2.size(0) == M && dy2.size(1) == N, "qpeft: qlora_backward: dy must have shape [", M, ", ", N,
                    "], got ", dy2.sizes());
  TORCH_CHECK_VALUE(xa.dim() == 2 && xa.size(0) == M && xa.size(1) == r, "qpeft: qlora_backward: xa must have shape [",
                    M, ", ", r, "], got ", xa.sizes());
  TORCH_CHECK_TYPE(dy2.scalar_type() == x2.scalar_type() && xa.scalar_type() == branch_dtype(x2.scalar_type()),
                   "qpeft: qlora_backward: dy and x must share a dtype and xa be in its branch dtype, got ",
                   dy2.scalar_type(), ", ", x2.scalar_type(), ", ", xa.scalar_type());
  const at::ScalarType dtype = dy2.scalar_type();
  const at::Tensor g = mm_float(dy2, scaled_as(lora_B, scaling, dtype));  // [M, r] fp32: s dy B
  at::Tensor dB = mm_float(xa.scalar_type() == dtype ? dy2.t() : dy2.t().to(xa.scalar_type()), xa)
                      .mul_(scaling)
                      .to(lora_B.scalar_type());
  static auto grad_weight =
      op<at::Tensor(const at::Tensor&, const at::Tensor&, double, const at::Tensor&)>("qpeft::lora_down_grad_weight");
  at::Tensor dA = grad_weight.call(g, x2, p, seed).to(lora_A.scalar_type());
  const Weight4bit weight{{packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, quant_type}};
  at::Tensor dx;
  if (x2.device().is_cpu() && M <= kCpuSmallMGradInput) {  // dy W from the codes, then += drop(g A)
    dx = weight.grad_input(dy2, K);
    static auto grad_input_ =
        op<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, const at::Tensor&)>(
            "qpeft::lora_down_grad_input_");
    grad_input_.call(dx, g, lora_A, p, seed);
  } else {
    // drop(g A) written first, then the GEMM adds dy W onto it in its epilogue (beta = 1): dx is written twice
    // and read once, where GEMM-then-accumulate wrote, read and wrote it again (as the forward orders y).
    static auto grad_input =
        op<at::Tensor(const at::Tensor&, const at::Tensor&, double, const at::Tensor&, at::ScalarType)>(
            "qpeft::lora_down_grad_input");
    dx = grad_input.call(g, lora_A, p, seed, dtype);
    weight.add_matmul(dx, dy2, N, K, /*transpose_w=*/false);
  }
  return {dx, dA, dB};
}

// ---- autograd --------------------------------------------------------------------------------------------------
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

int64_t defined(const OptTensor& t) { return t.has_value() && t->defined() ? 1 : 0; }

// Autograd of qlora_forward is a C++ torch::autograd::Function registered for the Autograd key (a few
// microseconds of host time per call). It saves x, xa and the 4-bit weight; the backward is the qlora_backward op.
struct QLoraFunction : public torch::autograd::Function<QLoraFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& packed,
                               const at::Tensor& absmax, const OptTensor& nested_absmax, const OptTensor& nested_code,
                               const OptTensor& nested_offset, int64_t blocksize, c10::string_view quant_type,
                               const at::Tensor& lora_A, const at::Tensor& lora_B, const OptTensor& bias,
                               double scaling, double p, const at::Tensor& seed) {
    at::AutoDispatchBelowADInplaceOrView below;
    static auto fwd = op<std::tuple<at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
        int64_t, c10::string_view, const at::Tensor&, const at::Tensor&, const OptTensor&, double, double,
        const at::Tensor&)>("qpeft::qlora_forward");
    auto [y, xa] = fwd.call(x, packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, quant_type, lora_A,
                            lora_B, bias, scaling, p, seed);
    ctx->save_for_backward({x, xa, packed, absmax, nested_absmax.value_or(at::Tensor()),
                            nested_code.value_or(at::Tensor()), nested_offset.value_or(at::Tensor()), lora_A, lora_B,
                            seed});
    ctx->mark_non_differentiable({xa});
    // needs_input_grad counts the tensor arguments that were given: x, packed, absmax, the nested ones present, ...
    const int64_t a_index = 3 + defined(nested_absmax) + defined(nested_code) + defined(nested_offset);
    ctx->saved_data["a_index"] = a_index;
    ctx->saved_data["bias_dtype"] = defined(bias) ? static_cast<int64_t>(bias->scalar_type()) : int64_t{-1};
    ctx->saved_data["blocksize"] = blocksize;
    ctx->saved_data["quant_type"] = std::string(quant_type);
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["p"] = p;
    return {y, xa};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto optional = [](const at::Tensor& t) { return t.defined() ? OptTensor(t) : OptTensor(); };
    const int64_t a_index = ctx->saved_data["a_index"].toInt();
    const int64_t bias_dtype = ctx->saved_data["bias_dtype"].toInt();
    variable_list out(14);
    const at::Tensor& dy = grads[0];
    if (!dy.defined()) return out;
    const std::string quant_type = ctx->saved_data["quant_type"].toStringRef();
    static auto bwd = op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
        const OptTensor&, const OptTensor&, int64_t, c10::string_view, const at::Tensor&, const at::Tensor&, double,
        double, const at::Tensor&)>("qpeft::qlora_backward");
    auto [dx, dA, dB] =
        bwd.call(dy.contiguous(), saved[0], saved[1], saved[2], saved[3], optional(saved[4]), optional(saved[5]),
                 optional(saved[6]), ctx->saved_data["blocksize"].toInt(), quant_type, saved[7], saved[8],
                 ctx->saved_data["scaling"].toDouble(), ctx->saved_data["p"].toDouble(), saved[9]);
    if (ctx->needs_input_grad(0)) out[0] = dx;
    if (ctx->needs_input_grad(a_index)) out[8] = dA;
    if (ctx->needs_input_grad(a_index + 1)) out[9] = dB;
    if (bias_dtype >= 0 && ctx->needs_input_grad(a_index + 2))
      out[10] = dy.sum(0).to(static_cast<at::ScalarType>(bias_dtype));
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> qlora_forward_autograd(const at::Tensor& x, const at::Tensor& packed,
                                                          const at::Tensor& absmax, const OptTensor& nested_absmax,
                                                          const OptTensor& nested_code, const OptTensor& nested_offset,
                                                          int64_t blocksize, c10::string_view quant_type,
                                                          const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                          const OptTensor& bias, double scaling, double p,
                                                          const at::Tensor& seed) {
  auto outs = QLoraFunction::apply(x, packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, quant_type,
                                   lora_A, lora_B, bias, scaling, p, seed);
  return {outs[0], outs[1]};
}

// lora_dropout's gradient is the same seeded dropout of dy: nothing but the seed is saved.
struct LoraDropoutFunction : public torch::autograd::Function<LoraDropoutFunction> {
  static at::Tensor dropout(const at::Tensor& x, double p, const at::Tensor& seed, int64_t offset) {
    static auto op_ = op<at::Tensor(const at::Tensor&, double, const at::Tensor&, int64_t)>("qpeft::lora_dropout");
    return op_.call(x, p, seed, offset);
  }

  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, double p, const at::Tensor& seed,
                            int64_t offset) {
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->save_for_backward({seed});
    ctx->saved_data["p"] = p;
    ctx->saved_data["offset"] = offset;
    return dropout(x, p, seed, offset);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(4);
    if (grads[0].defined())
      out[0] = dropout(grads[0], ctx->saved_data["p"].toDouble(), ctx->get_saved_variables()[0],
                       ctx->saved_data["offset"].toInt());
    return out;
  }
};

at::Tensor lora_dropout_autograd(const at::Tensor& x, double p, const at::Tensor& seed, int64_t offset) {
  return LoraDropoutFunction::apply(x, p, seed, offset);
}

}  // namespace

TORCH_LIBRARY_IMPL(qpeft, Autograd, m) {
  m.impl("qlora_forward", &qlora_forward_autograd);
  m.impl("lora_dropout", &lora_dropout_autograd);
}

TORCH_LIBRARY_IMPL(qpeft, CPU, m) {
  m.impl("qlora_forward", &qlora_forward);
  m.impl("qlora_backward", &qlora_backward);
}

#ifdef QPEFT_WITH_CUDA
TORCH_LIBRARY_IMPL(qpeft, CUDA, m) {
  m.impl("qlora_forward", &qlora_forward);
  m.impl("qlora_backward", &qlora_backward);
}
#endif

}  // namespace qpeft::ops
