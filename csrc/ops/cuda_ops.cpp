// CUDA registrations of the qpeft ops (built only when the installed torch has CUDA): validate + allocate
// (op_args), then launch the torch-free kernels of kernels/cuda on the current stream of the inputs' device.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../kernels/cuda/lora_cuda.h"
#include "../kernels/cuda/quant_cuda.h"
#include "op_args.h"

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
                                   a.absmax.data_ptr<float>(), at::cuda::getCurrentCUDAStream()),
               "quantize_4bit");
  return {a.packed, a.absmax};
}

at::Tensor run_dequantize_4bit_cuda(const Dequantize4bitArgs& a) {
  check_launch(cuda::dequantize_4bit(a.packed.data_ptr<uint8_t>(), a.scales(), a.n, a.blocksize, a.type,
                                     a.out.data_ptr(), a.fmt, at::cuda::getCurrentCUDAStream()),
               "dequantize_4bit");
  return a.out;
}

at::Tensor dequantize_4bit_cuda(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                                c10::string_view quant_type, at::IntArrayRef shape, at::ScalarType dtype) {
  const c10::cuda::CUDAGuard guard(packed.device());
  return run_dequantize_4bit_cuda(prepare_dequantize_4bit(packed, absmax, blocksize, quant_type, shape, dtype));
}

at::Tensor dequantize_4bit_nested_cuda(const at::Tensor& packed, const at::Tensor& absmax_codes,
                                       const at::Tensor& nested_absmax, const at::Tensor& nested_code,
                                       const at::Tensor& nested_offset, int64_t blocksize,
                                       c10::string_view quant_type, at::IntArrayRef shape, at::ScalarType dtype) {
  const c10::cuda::CUDAGuard guard(packed.device());
  return run_dequantize_4bit_cuda(prepare_dequantize_4bit_nested(
      packed, absmax_codes, nested_absmax, nested_code, nested_offset, blocksize, quant_type, shape, dtype));
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_8bit_cuda(const at::Tensor& A, const at::Tensor& code,
                                                                int64_t blocksize) {
  const c10::cuda::CUDAGuard guard(A.device());
  auto a = prepare_quantize_blockwise_8bit(A, code, blocksize);
  check_launch(cuda::quantize_blockwise_8bit(a.A.data_ptr<float>(), a.code.data_ptr<float>(), a.n, a.blocksize,
                                             a.q.data_ptr<uint8_t>(), a.absmax.data_ptr<float>(),
                                             at::cuda::getCurrentCUDAStream()),
               "quantize_blockwise_8bit");
  return {a.q, a.absmax};
}

at::Tensor dequantize_blockwise_8bit_cuda(const at::Tensor& q, const at::Tensor& absmax, const at::Tensor& code,
                                          int64_t blocksize) {
  const c10::cuda::CUDAGuard guard(q.device());
  auto a = prepare_dequantize_blockwise_8bit(q, absmax, code, blocksize);
  check_launch(cuda::dequantize_blockwise_8bit(a.q.data_ptr<uint8_t>(), a.absmax.data_ptr<float>(),
                                               a.code.data_ptr<float>(), a.n, a.blocksize, a.out.data_ptr<float>(),
                                               at::cuda::getCurrentCUDAStream()),
               "dequantize_blockwise_8bit");
  return a.out;
}

at::Tensor lora_dropout_cuda(const at::Tensor& x, double p, int64_t seed, int64_t offset) {
  const c10::cuda::CUDAGuard guard(x.device());
  auto a = prepare_lora_dropout(x, p, seed, offset);
  check_launch(cuda::lora_dropout(a.x.data_ptr(), a.out.data_ptr(), a.fmt, a.x.numel(), a.seed, a.offset, a.threshold,
                                  a.keep_scale, at::cuda::getCurrentCUDAStream()),
               "lora_dropout");
  return a.out;
}

at::Tensor approx_reciprocal_cuda(const at::Tensor& x) {
  const c10::cuda::CUDAGuard guard(x.device());
  auto a = prepare_approx_reciprocal(x);
  check_launch(cuda::approx_reciprocal(a.x.data_ptr<float>(), a.x.numel(), a.out.data_ptr<float>(),
                                       at::cuda::getCurrentCUDAStream()),
               "_approx_reciprocal");
  return a.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qpeft, CUDA, m) {
  m.impl("quantize_4bit", &quantize_4bit_cuda);
  m.impl("dequantize_4bit", &dequantize_4bit_cuda);
  m.impl("dequantize_4bit_nested", &dequantize_4bit_nested_cuda);
  m.impl("quantize_blockwise_8bit", &quantize_blockwise_8bit_cuda);
  m.impl("dequantize_blockwise_8bit", &dequantize_blockwise_8bit_cuda);
  m.impl("_approx_reciprocal", &approx_reciprocal_cuda);
  m.impl("lora_dropout", &lora_dropout_cuda);
}

}  // namespace qpeft::ops
