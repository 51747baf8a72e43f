// CUDA registrations of the qpeft ops (built only when the installed torch has CUDA): validate + allocate
// (op_args), then launch the torch-free kernels of kernels/cuda on the current stream of the inputs' device.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>

#include "../kernels/cuda/layer_cuda.h"
#include "../kernels/cuda/quant_cuda.h"
#include "op_args.h"
#include "qlora_cuda.h"

namespace qpeft::ops {
namespace {

void check_launch(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, "qpeft: CUDA launch of ", op, " failed: ", cudaGetErrorString(status));
}

std::tuple<at::Tensor, at::Tensor> quantize_4bit_cuda(const at::Tensor& A, int64_t blocksize,
                                                      c10::string_view quant_type) {
  const c10::cuda::CUDAGuard guard(A.device());
  auto a = prepare_quantize_4bit(A, blocksize, quant_type);
  check_launch(cuda::quantize_4bit(a.A.data_ptr(), a.fmt, a.n, a.blocksize, a.type, a.packed.data_ptr<uint8_t>(),
                                   a.absmax.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()),
               "quantize_4bit");
  return {a.packed, a.absmax};
}

at::Tensor run_dequantize_4bit_cuda(const Dequantize4bitArgs& a) {
  check_launch(cuda::dequantize_4bit(a.packed.data_ptr<uint8_t>(), a.scales(), a.n, a.blocksize, a.type,
                                     a.out.data_ptr(), a.fmt, c10::cuda::getCurrentCUDAStream()),
               "dequantize_4bit");
  return a.out;
}

at::Tensor dequantize_4bit_cuda(const at::Tensor& packed, const at::Tensor& absmax,
                                const std::optional<at::Tensor>& nested_absmax,
                                const std::optional<at::Tensor>& nested_code,
                                const std::optional<at::Tensor>& nested_offset, int64_t blocksize,
                                c10::string_view quant_type, at::IntArrayRef shape, at::ScalarType dtype) {
  const c10::cuda::CUDAGuard guard(packed.device());
  return run_dequantize_4bit_cuda(prepare_dequantize_4bit(
      {packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, quant_type}, shape, dtype));
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_8bit_cuda(const at::Tensor& A, const at::Tensor& code,
                                                                int64_t blocksize) {
  const c10::cuda::CUDAGuard guard(A.device());
  auto a = prepare_quantize_blockwise_8bit(A, code, blocksize);
  check_launch(cuda::quantize_blockwise_8bit(a.A.data_ptr<float>(), a.code.data_ptr<float>(), a.n, a.blocksize,
                                             a.q.data_ptr<uint8_t>(), a.absmax.data_ptr<float>(),
                                             c10::cuda::getCurrentCUDAStream()),
               "quantize_blockwise_8bit");
  return {a.q, a.absmax};
}

at::Tensor dequantize_blockwise_8bit_cuda(const at::Tensor& q, const at::Tensor& absmax, const at::Tensor& code,
                                          int64_t blocksize) {
  const c10::cuda::CUDAGuard guard(q.device());
  auto a = prepare_dequantize_blockwise_8bit(q, absmax, code, blocksize);
  check_launch(
      cuda::dequantize_blockwise_8bit(a.q.data_ptr<uint8_t>(), a.absmax.data_ptr<float>(), a.code.data_ptr<float>(),
                                      a.n, a.blocksize, a.out.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()),
      "dequantize_blockwise_8bit");
  return a.out;
}

// The dropout as the kernels take it: a CUDA seed tensor is read on the device, a CPU one by value
// (prepare_dropout allows both).
cuda::DropoutSpec dropout_spec(const DropoutParams& dropout) {
  cuda::DropoutSpec spec;
  if (dropout.seed.is_cuda()) {
    spec.seed.device = dropout.seed.data_ptr<int64_t>();
  } else {
    spec.seed.value = static_cast<int64_t>(dropout.host_seed());
  }
  spec.threshold = dropout.threshold;
  spec.keep_scale = dropout.keep_scale;
  return spec;
}

at::Tensor lora_dropout_cuda(const at::Tensor& x, double p, const at::Tensor& seed, int64_t offset) {
  const c10::cuda::CUDAGuard guard(x.device());
  auto a = prepare_lora_dropout(x, p, seed, offset);
  check_launch(cuda::lora_dropout(a.x.data_ptr(), a.out.data_ptr(), a.fmt, a.x.numel(), dropout_spec(a.dropout),
                                  a.offset, c10::cuda::getCurrentCUDAStream()),
               "lora_dropout");
  return a.out;
}

// Tensor cores when asked for (cuda_lora_tensor_cores) and the arguments allow them.
bool use_tensor_cores(FloatFormat fmt, int64_t K, std::initializer_list<const void*> pointers) {
  return cuda_lora_tensor_cores() && cuda::lora_tensor_cores_ok(fmt, K, pointers);
}

// The per-split fp32 partial sums [splits, rows, cols] a split kernel wrote, added in split order (deterministic)
// and rounded once to `dtype`, in one launch (none when there is one fp32 split).
at::Tensor sum_partials(const at::Tensor& partial, at::ScalarType dtype, const char* op) {
  if (partial.size(0) == 1 && dtype == at::kFloat) return partial.squeeze(0);
  at::Tensor out = at::empty({partial.size(1), partial.size(2)}, partial.options().dtype(dtype));
  check_launch(cuda::sum_partials(partial.data_ptr<float>(), static_cast<int>(partial.size(0)), out.numel(),
                                  out.data_ptr(), float_format(dtype, "output"), c10::cuda::getCurrentCUDAStream()),
               op);
  return out;
}

// Launches lora_down (the kernel kind set by cuda_lora_tensor_cores where it applies) with at most `max_splits`
// column splits; returns its fp32 partial sums [splits, M, r].
at::Tensor lora_down_partials(const LoraDownArgs& a, FloatFormat fmt, int max_splits) {
  const int64_t M = a.x.size(0), K = a.x.size(1), r = a.A.size(0);
  const bool mma = use_tensor_cores(fmt, K, {a.x.data_ptr(), a.A.data_ptr()});
  const int splits = std::min(max_splits, mma ? cuda::lora_down_mma_splits(M, K, r) : cuda::lora_down_splits(M, K, r));
  at::Tensor partial = at::empty({splits, M, r}, a.x.options().dtype(at::kFloat));
  const auto launch = mma ? &cuda::lora_down_mma : &cuda::lora_down;
  check_launch(launch(a.x.data_ptr(), fmt, a.A.data_ptr<float>(), partial.data_ptr<float>(), M, K, r, splits,
                      dropout_spec(a.dropout), c10::cuda::getCurrentCUDAStream()),
               "lora_down");
  return partial;
}

at::Tensor lora_down_cuda(const at::Tensor& x, const at::Tensor& lora_A, double p, const at::Tensor& seed) {
  const BelowAutograd below_autograd;
  const c10::cuda::CUDAGuard guard(x.device());
  const LoraDownArgs a = prepare_lora_down(x, lora_A, p, seed);
  const at::Tensor partial = lora_down_partials(a, float_format(a.x.scalar_type(), "x"), INT_MAX);
  return sum_partials(partial, a.x.scalar_type(), "lora_down (sum of partials)");
}

at::Tensor lora_down_grad_weight_cuda(const at::Tensor& g, const at::Tensor& x, double p, const at::Tensor& seed) {
  const BelowAutograd below_autograd;
  const c10::cuda::CUDAGuard guard(x.device());
  const LoraDownGradWeightArgs a = prepare_lora_down_grad_weight(g, x, p, seed);
  const int64_t M = a.x.size(0), K = a.x.size(1), r = a.g.size(1);
  const FloatFormat fmt = float_format(a.x.scalar_type(), "x");
  const bool mma = use_tensor_cores(fmt, K, {a.x.data_ptr()});
  const int splits =
      mma ? cuda::lora_down_grad_weight_mma_splits(M, K, r) : cuda::lora_down_grad_weight_splits(M, K, r);
  at::Tensor partial = at::empty({splits, r, K}, a.x.options().dtype(at::kFloat));
  const auto launch = mma ? &cuda::lora_down_grad_weight_mma : &cuda::lora_down_grad_weight;
  check_launch(launch(a.g.data_ptr<float>(), a.x.data_ptr(), fmt, partial.data_ptr<float>(), M, K, r, splits,
                      dropout_spec(a.dropout), c10::cuda::getCurrentCUDAStream()),
               "lora_down_grad_weight");
  return sum_partials(partial, at::kFloat, "lora_down_grad_weight (sum of partials)");
}

// dx (+)= drop(g A) for the validated arguments (the kernel kind set by cuda_lora_tensor_cores where it applies):
// added to dx when `accumulate`, else written without reading dx.
void launch_lora_down_grad_input(const at::Tensor& dx, const LoraDownGradInputArgs& a, bool accumulate) {
  TORCH_CHECK_VALUE(dx.size(1) <= int64_t{65535} * 256, "qpeft: lora_down_grad_input: too many features (", dx.size(1),
                    ")");
  const bool mma = use_tensor_cores(a.fmt, dx.size(1), {dx.data_ptr(), a.A.data_ptr()});
  const auto launch = mma ? &cuda::lora_down_grad_input_mma : &cuda::lora_down_grad_input;
  check_launch(launch(dx.data_ptr(), a.fmt, a.g.data_ptr<float>(), a.A.data_ptr<float>(), dx.size(0), dx.size(1),
                      a.A.size(0), dropout_spec(a.dropout), accumulate, c10::cuda::getCurrentCUDAStream()),
               accumulate ? "lora_down_grad_input_" : "lora_down_grad_input");
}

void lora_down_grad_input_cuda(const at::Tensor& dx, const at::Tensor& g, const at::Tensor& lora_A, double p,
                               const at::Tensor& seed) {
  const BelowAutograd below_autograd;
  const c10::cuda::CUDAGuard guard(dx.device());
  launch_lora_down_grad_input(dx, prepare_lora_down_grad_input(dx, g, lora_A, p, seed), /*accumulate=*/true);
}

at::Tensor lora_down_grad_input_new_cuda(const at::Tensor& g, const at::Tensor& lora_A, double p,
                                         const at::Tensor& seed, at::ScalarType dtype) {
  const BelowAutograd below_autograd;
  const c10::cuda::CUDAGuard guard(g.device());
  const NewGradInputArgs a = prepare_lora_down_grad_input_new(g, lora_A, p, seed, dtype);
  launch_lora_down_grad_input(a.dx, a.args, /*accumulate=*/false);
  return a.dx;
}

// W [rows, cols] dequantized in the activation's dtype into a transient tensor (freed when the op returns).
at::Tensor dequantized_weight_cuda(Dequantize4bitArgs w, const at::Tensor& activation, int64_t rows, int64_t cols) {
  w.out = at::empty({rows, cols}, activation.options());
  w.fmt = float_format(activation.scalar_type(), "the activation of a 4-bit linear");
  return run_dequantize_4bit_cuda(w);
}

at::Tensor linear_4bit_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                            const std::optional<at::Tensor>& nested_absmax,
                            const std::optional<at::Tensor>& nested_code,
                            const std::optional<at::Tensor>& nested_offset, int64_t blocksize,
                            c10::string_view quant_type, int64_t out_features) {
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK_VALUE(x.dim() == 2, "qpeft: linear_4bit takes x of shape [M, K], got ", x.sizes());
  const int64_t M = x.size(0), K = x.size(1), N = out_features;
  const Dequantize4bitArgs w = prepare_linear_weight(
      x, {packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, quant_type}, N, K);
  if (M == 0) return at::empty({0, N}, x.options());
  if (M > cuda::kLinear4bitMaxM) return at::mm(x, dequantized_weight_cuda(w, x, N, K).t());
  const at::Tensor x2 = x.contiguous();
  at::Tensor y = at::empty({M, N}, x2.options());
  check_launch(cuda::linear_4bit(x2.data_ptr(), float_format(x2.scalar_type(), "x"), M, K, w.packed.data_ptr<uint8_t>(),
                                 w.scales(), blocksize, w.type, y.data_ptr(), N, c10::cuda::getCurrentCUDAStream()),
               "linear_4bit");
  return y;
}

at::Tensor linear_4bit_grad_input_cuda(const at::Tensor& dy, const at::Tensor& packed, const at::Tensor& absmax,
                                       const std::optional<at::Tensor>& nested_absmax,
                                       const std::optional<at::Tensor>& nested_code,
                                       const std::optional<at::Tensor>& nested_offset, int64_t blocksize,
                                       c10::string_view quant_type, int64_t in_features) {
  const c10::cuda::CUDAGuard guard(dy.device());
  TORCH_CHECK_VALUE(dy.dim() == 2, "qpeft: linear_4bit_grad_input takes dy of shape [M, N], got ", dy.sizes());
  const int64_t N = dy.size(1), K = in_features;
  const Dequantize4bitArgs w = prepare_linear_weight(
      dy, {packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, quant_type}, N, K);
  return at::mm(dy, dequantized_weight_cuda(w, dy, N, K));
}

}  // namespace

std::optional<std::tuple<at::Tensor, at::Tensor>> qlora_forward_small_m_cuda(
    const at::Tensor& x2, const Dequantize4bitArgs& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
    const std::optional<at::Tensor>& bias, double scaling, double p, const at::Tensor& seed) {
  const int64_t M = x2.size(0), K = x2.size(1), N = lora_B.size(0), r = lora_A.size(0);
  const FloatFormat fmt = float_format(x2.scalar_type(), "x");
  if (!cuda::linear_4bit_lora_ok(fmt, M, K, r, weight.blocksize, x2.data_ptr(), weight.packed.data_ptr<uint8_t>()))
    return std::nullopt;
  const c10::cuda::CUDAGuard guard(x2.device());
  const LoraDownArgs a = prepare_lora_down(x2, lora_A, p, seed);
  const at::Tensor partial = lora_down_partials(a, fmt, cuda::kFusedLoraMaxSplits);
  const at::Tensor B = lora_B.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty({M, N}, a.x.options()), xa = at::empty({M, r}, a.x.options());
  cuda::LoraUpEpilogue lora;
  lora.xa_partial = partial.data_ptr<float>();
  lora.splits = static_cast<int>(partial.size(0));
  lora.r = static_cast<int>(r);
  lora.B = B.data_ptr();
  lora.b_fmt = float_format(B.scalar_type(), "lora_B");
  lora.bias = b.defined() ? b.data_ptr() : nullptr;
  lora.bias_fmt = b.defined() ? float_format(b.scalar_type(), "bias") : FloatFormat::F32;
  lora.scaling = static_cast<float>(scaling);
  lora.xa = xa.data_ptr();
  check_launch(
      cuda::linear_4bit_lora(a.x.data_ptr(), fmt, M, K, weight.packed.data_ptr<uint8_t>(), weight.scales(),
                             weight.blocksize, weight.type, y.data_ptr(), N, lora, c10::cuda::getCurrentCUDAStream()),
      "qlora_forward (small-M fused kernel)");
  return std::make_tuple(y, xa);
}

namespace {

at::Tensor approx_reciprocal_cuda(const at::Tensor& x) {
  const c10::cuda::CUDAGuard guard(x.device());
  auto a = prepare_approx_reciprocal(x);
  check_launch(cuda::approx_reciprocal(a.x.data_ptr<float>(), a.x.numel(), a.out.data_ptr<float>(),
                                       c10::cuda::getCurrentCUDAStream()),
               "_approx_reciprocal");
  return a.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qpeft, CUDA, m) {
  m.impl("quantize_4bit", &quantize_4bit_cuda);
  m.impl("dequantize_4bit", &dequantize_4bit_cuda);
  m.impl("quantize_blockwise_8bit", &quantize_blockwise_8bit_cuda);
  m.impl("dequantize_blockwise_8bit", &dequantize_blockwise_8bit_cuda);
  m.impl("_approx_reciprocal", &approx_reciprocal_cuda);
  m.impl("lora_dropout", &lora_dropout_cuda);
  m.impl("lora_down", &lora_down_cuda);
  m.impl("lora_down_grad_weight", &lora_down_grad_weight_cuda);
  m.impl("lora_down_grad_input_", &lora_down_grad_input_cuda);
  m.impl("lora_down_grad_input", &lora_down_grad_input_new_cuda);
  m.impl("linear_4bit", &linear_4bit_cuda);
  m.impl("linear_4bit_grad_input", &linear_4bit_grad_input_cuda);
}

}  // namespace qpeft::ops
