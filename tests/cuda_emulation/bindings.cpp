// Python bindings of the CUDA kernels' launchers (csrc/kernels/cuda, compiled for the CPU under the host emulator)
// for tests/test_cuda_emulated.py: CPU tensors in, the launcher called with their data pointers, the launcher's
// status checked. Thin on purpose: shapes are read from the tensors the test allocates (outputs included, so
// the test can place them inside poisoned guard regions), and no argument is validated beyond what keeps the
// call in bounds; the ops' argument checks are tested through the real ops.
#include <torch/extension.h>

#include <optional>
#include <string>

#include "../../csrc/kernels/cuda/layer_cuda.h"
#include "../../csrc/kernels/cuda/quant_cuda.h"

namespace qpeft_emu {
const char* last_error_message();
void set_reverse_order(bool reverse);
}  // namespace qpeft_emu
int selftest_launch(const char* which, const float* in, float* out);  // selftest_kernels.cpp

namespace {

using qpeft::BlockScales;
using qpeft::FloatFormat;
using qpeft::QuantType;
using qpeft::cuda::DropoutSpec;

void check(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, op, " failed (cudaError ", static_cast<int>(status),
              "): ", qpeft_emu::last_error_message());
}

FloatFormat format_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return FloatFormat::F32;
    case at::kBFloat16:
      return FloatFormat::BF16;
    case at::kHalf:
      return FloatFormat::F16;
    default:
      TORCH_CHECK(false, "unsupported dtype ", t.scalar_type());
  }
}

void require(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), name, " must be a contiguous CPU tensor");
}

QuantType quant_type_of(const std::string& s) {
  TORCH_CHECK(s == "nf4" || s == "fp4", "quant_type ", s);
  return s == "nf4" ? QuantType::NF4 : QuantType::FP4;
}

// scales: (absmax,) for plain fp32 scales, (absmax_codes, nested_absmax, nested_code, nested_offset) when nested.
BlockScales scales_of(const std::vector<at::Tensor>& scales) {
  for (const auto& t : scales) require(t, "scales");
  BlockScales s;
  if (scales.size() == 1) {
    s.absmax = scales[0].data_ptr<float>();
  } else {
    TORCH_CHECK(scales.size() == 4, "scales: 1 or 4 tensors");
    s.absmax_codes = scales[0].data_ptr<uint8_t>();
    s.nested_absmax = scales[1].data_ptr<float>();
    s.nested_code = scales[2].data_ptr<float>();
    s.nested_offset = scales[3].data_ptr<float>();
  }
  return s;
}

// The dropout: its seed by value, or read by the kernels from a one-element int64 tensor.
DropoutSpec dropout_of(int64_t seed, const std::optional<at::Tensor>& seed_tensor, int64_t threshold,
                       double keep_scale) {
  DropoutSpec spec;
  if (seed_tensor.has_value()) {
    spec.seed.device = seed_tensor->data_ptr<int64_t>();
  } else {
    spec.seed.value = seed;
  }
  spec.threshold = static_cast<uint32_t>(threshold);
  spec.keep_scale = static_cast<float>(keep_scale);
  return spec;
}

void dequantize_4bit(const at::Tensor& packed, const std::vector<at::Tensor>& scales, int64_t blocksize,
                     const std::string& quant_type, at::Tensor out) {
  require(packed, "packed");
  require(out, "out");
  check(qpeft::cuda::dequantize_4bit(packed.data_ptr<uint8_t>(), scales_of(scales), out.numel(), blocksize,
                                     quant_type_of(quant_type), out.data_ptr(), format_of(out), nullptr),
        "dequantize_4bit");
}

void lora_dropout(const at::Tensor& x, at::Tensor out, int64_t seed, const std::optional<at::Tensor>& seed_tensor,
                  int64_t offset, int64_t threshold, double keep_scale) {
  require(x, "x");
  require(out, "out");
  check(qpeft::cuda::lora_dropout(x.data_ptr(), out.data_ptr(), format_of(x), x.numel(),
                                  dropout_of(seed, seed_tensor, threshold, keep_scale), static_cast<uint64_t>(offset),
                                  nullptr),
        "lora_dropout");
}

int64_t lora_down_splits(int64_t M, int64_t K, int64_t r, bool tensor_cores) {
  return tensor_cores ? qpeft::cuda::lora_down_mma_splits(M, K, r) : qpeft::cuda::lora_down_splits(M, K, r);
}

int64_t lora_down_grad_weight_splits(int64_t M, int64_t K, int64_t r, bool tensor_cores) {
  return tensor_cores ? qpeft::cuda::lora_down_grad_weight_mma_splits(M, K, r)
                      : qpeft::cuda::lora_down_grad_weight_splits(M, K, r);
}

// partial [splits, M, r] fp32
void lora_down(const at::Tensor& x, const at::Tensor& A, at::Tensor partial, int64_t seed, int64_t threshold,
               double keep_scale, bool tensor_cores) {
  require(x, "x");
  require(A, "A");
  require(partial, "partial");
  const auto launch = tensor_cores ? &qpeft::cuda::lora_down_mma : &qpeft::cuda::lora_down;
  check(launch(x.data_ptr(), format_of(x), A.data_ptr<float>(), partial.data_ptr<float>(), x.size(0), x.size(1),
               A.size(0), static_cast<int>(partial.size(0)), dropout_of(seed, std::nullopt, threshold, keep_scale),
               nullptr),
        "lora_down");
}

// partial [splits, r, K] fp32
void lora_down_grad_weight(const at::Tensor& g, const at::Tensor& x, at::Tensor partial, int64_t seed,
                           int64_t threshold, double keep_scale, bool tensor_cores) {
  require(g, "g");
  require(x, "x");
  require(partial, "partial");
  const auto launch = tensor_cores ? &qpeft::cuda::lora_down_grad_weight_mma : &qpeft::cuda::lora_down_grad_weight;
  check(launch(g.data_ptr<float>(), x.data_ptr(), format_of(x), partial.data_ptr<float>(), x.size(0), x.size(1),
               g.size(1), static_cast<int>(partial.size(0)), dropout_of(seed, std::nullopt, threshold, keep_scale),
               nullptr),
        "lora_down_grad_weight");
}

void lora_down_grad_input(at::Tensor dx, const at::Tensor& g, const at::Tensor& A, int64_t seed, int64_t threshold,
                          double keep_scale, bool accumulate, bool tensor_cores) {
  require(dx, "dx");
  require(g, "g");
  require(A, "A");
  const auto launch = tensor_cores ? &qpeft::cuda::lora_down_grad_input_mma : &qpeft::cuda::lora_down_grad_input;
  check(launch(dx.data_ptr(), format_of(dx), g.data_ptr<float>(), A.data_ptr<float>(), dx.size(0), dx.size(1),
               A.size(0), dropout_of(seed, std::nullopt, threshold, keep_scale), accumulate, nullptr),
        "lora_down_grad_input");
}

bool lora_tensor_cores_ok(const at::Tensor& x, const at::Tensor& A) {
  return qpeft::cuda::lora_tensor_cores_ok(format_of(x), x.size(1), {x.data_ptr(), A.data_ptr()});
}

// partial [splits, ...] fp32 -> out (numel = partial[0].numel())
void sum_partials(const at::Tensor& partial, at::Tensor out) {
  require(partial, "partial");
  require(out, "out");
  check(qpeft::cuda::sum_partials(partial.data_ptr<float>(), static_cast<int>(partial.size(0)), out.numel(),
                                  out.data_ptr(), format_of(out), nullptr),
        "sum_partials");
}

// y [M, N] in x's format
void linear_4bit(const at::Tensor& x, const at::Tensor& packed, const std::vector<at::Tensor>& scales,
                 int64_t blocksize, const std::string& quant_type, at::Tensor y) {
  require(x, "x");
  require(packed, "packed");
  require(y, "y");
  check(qpeft::cuda::linear_4bit(x.data_ptr(), format_of(x), x.size(0), x.size(1), packed.data_ptr<uint8_t>(),
                                 scales_of(scales), blocksize, quant_type_of(quant_type), y.data_ptr(), y.size(1),
                                 nullptr),
        "linear_4bit");
}

bool linear_4bit_lora_ok(const at::Tensor& x, int64_t r, int64_t blocksize, const at::Tensor& packed) {
  return qpeft::cuda::linear_4bit_lora_ok(format_of(x), x.size(0), x.size(1), r, blocksize, x.data_ptr(),
                                          packed.data_ptr<uint8_t>());
}

// The fused small-M forward: y [M, N] and xa [M, r] in x's format; xa_partial [splits, M, r] fp32, B [N, r].
void linear_4bit_lora(const at::Tensor& x, const at::Tensor& packed, const std::vector<at::Tensor>& scales,
                      int64_t blocksize, const std::string& quant_type, at::Tensor y, const at::Tensor& xa_partial,
                      const at::Tensor& B, const std::optional<at::Tensor>& bias, double scaling, at::Tensor xa) {
  require(x, "x");
  require(packed, "packed");
  require(y, "y");
  require(xa_partial, "xa_partial");
  require(B, "B");
  require(xa, "xa");
  qpeft::cuda::LoraUpEpilogue lora;
  lora.xa_partial = xa_partial.data_ptr<float>();
  lora.splits = static_cast<int>(xa_partial.size(0));
  lora.r = static_cast<int>(B.size(1));
  lora.B = B.data_ptr();
  lora.b_fmt = format_of(B);
  if (bias.has_value()) {
    require(*bias, "bias");
    lora.bias = bias->data_ptr();
    lora.bias_fmt = format_of(*bias);
  }
  lora.scaling = static_cast<float>(scaling);
  lora.xa = xa.data_ptr();
  check(qpeft::cuda::linear_4bit_lora(x.data_ptr(), format_of(x), x.size(0), x.size(1), packed.data_ptr<uint8_t>(),
                                      scales_of(scales), blocksize, quant_type_of(quant_type), y.data_ptr(), y.size(1),
                                      lora, nullptr),
        "linear_4bit_lora");
}

// The emulator's own checks: (status, message) of a self-test kernel; `in`, `out` fp32 of 128 elements.
std::tuple<int64_t, std::string> selftest(const std::string& which, const at::Tensor& in, at::Tensor out) {
  require(in, "in");
  require(out, "out");
  TORCH_CHECK(
      in.numel() >= 128 && out.numel() >= 128 && in.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat,
      "selftest: fp32 tensors of 128 elements");
  const int status = selftest_launch(which.c_str(), in.data_ptr<float>(), out.data_ptr<float>());
  return {status, status == 0 ? std::string() : std::string(qpeft_emu::last_error_message())};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("dequantize_4bit", &dequantize_4bit);
  m.def("lora_dropout", &lora_dropout, py::arg("x"), py::arg("out"), py::arg("seed"), py::arg("seed_tensor"),
        py::arg("offset"), py::arg("threshold"), py::arg("keep_scale"));
  m.def("lora_down_splits", &lora_down_splits);
  m.def("lora_down_grad_weight_splits", &lora_down_grad_weight_splits);
  m.def("lora_down", &lora_down);
  m.def("lora_down_grad_weight", &lora_down_grad_weight);
  m.def("lora_down_grad_input", &lora_down_grad_input);
  m.def("lora_tensor_cores_ok", &lora_tensor_cores_ok);
  m.def("sum_partials", &sum_partials);
  m.def("linear_4bit", &linear_4bit);
  m.def("linear_4bit_lora_ok", &linear_4bit_lora_ok);
  m.def("linear_4bit_lora", &linear_4bit_lora);
  m.def("selftest", &selftest);
  m.def("set_reverse_order", &qpeft_emu::set_reverse_order);
}
