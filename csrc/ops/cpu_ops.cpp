// CPU registrations of the qpeft ops: validate + allocate (op_args), then split the blocks across torch's
// intra-op thread pool and run the torch-free kernels of kernels/cpu.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../kernels/cpu/dropout_cpu.h"
#include "../kernels/cpu/quant_cpu.h"
#include "op_args.h"

namespace qpeft::ops {
namespace {

// About 16K elements per task: large enough to amortize scheduling, small enough to balance two cores.
int64_t grain_blocks(int64_t blocksize) { return std::max<int64_t>(1, 16384 / blocksize); }

void check_reciprocal_table() {
  TORCH_CHECK(cpu::has_reciprocal_table(),
              "qpeft: the reciprocal table is not installed (import qpeft, which installs it, before the ops)");
}

std::tuple<at::Tensor, at::Tensor> quantize_4bit_cpu(const at::Tensor& A, int64_t blocksize,
                                                     c10::string_view quant_type) {
  auto a = prepare_quantize_4bit(A, blocksize, quant_type);
  check_reciprocal_table();
  const void* src = a.A.data_ptr();
  auto* packed = a.packed.data_ptr<uint8_t>();
  auto* absmax = a.absmax.data_ptr<float>();
  at::parallel_for(0, a.absmax.numel(), grain_blocks(blocksize), [&](int64_t b0, int64_t b1) {
    cpu::quantize_4bit(src, a.fmt, a.n, a.blocksize, a.type, packed, absmax, b0, b1);
  });
  return {a.packed, a.absmax};
}

at::Tensor run_dequantize_4bit_cpu(const Dequantize4bitArgs& a) {
  const BlockScales scales = a.scales();
  const auto* packed = a.packed.data_ptr<uint8_t>();
  void* out = a.out.data_ptr();
  at::parallel_for(0, num_blocks(a.n, a.blocksize), grain_blocks(a.blocksize), [&](int64_t b0, int64_t b1) {
    cpu::dequantize_4bit(packed, scales, a.n, a.blocksize, a.type, out, a.fmt, b0, b1);
  });
  return a.out;
}

at::Tensor dequantize_4bit_cpu(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                               c10::string_view quant_type, at::IntArrayRef shape, at::ScalarType dtype) {
  return run_dequantize_4bit_cpu(prepare_dequantize_4bit(packed, absmax, blocksize, quant_type, shape, dtype));
}

at::Tensor dequantize_4bit_nested_cpu(const at::Tensor& packed, const at::Tensor& absmax_codes,
                                      const at::Tensor& nested_absmax, const at::Tensor& nested_code,
                                      const at::Tensor& nested_offset, int64_t blocksize, c10::string_view quant_type,
                                      at::IntArrayRef shape, at::ScalarType dtype) {
  return run_dequantize_4bit_cpu(prepare_dequantize_4bit_nested(packed, absmax_codes, nested_absmax, nested_code,
                                                                nested_offset, blocksize, quant_type, shape, dtype));
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_8bit_cpu(const at::Tensor& A, const at::Tensor& code,
                                                               int64_t blocksize) {
  auto a = prepare_quantize_blockwise_8bit(A, code, blocksize);
  check_reciprocal_table();
  const float* src = a.A.data_ptr<float>();
  const float* code_values = a.code.data_ptr<float>();
  auto* q = a.q.data_ptr<uint8_t>();
  auto* absmax = a.absmax.data_ptr<float>();
  at::parallel_for(0, a.absmax.numel(), grain_blocks(blocksize), [&](int64_t b0, int64_t b1) {
    cpu::quantize_blockwise_8bit(src, code_values, a.n, a.blocksize, q, absmax, b0, b1);
  });
  return {a.q, a.absmax};
}

at::Tensor dequantize_blockwise_8bit_cpu(const at::Tensor& q, const at::Tensor& absmax, const at::Tensor& code,
                                         int64_t blocksize) {
  auto a = prepare_dequantize_blockwise_8bit(q, absmax, code, blocksize);
  const auto* codes = a.q.data_ptr<uint8_t>();
  const float* scales = a.absmax.data_ptr<float>();
  const float* code_values = a.code.data_ptr<float>();
  float* out = a.out.data_ptr<float>();
  at::parallel_for(0, a.absmax.numel(), grain_blocks(blocksize), [&](int64_t b0, int64_t b1) {
    cpu::dequantize_blockwise_8bit(codes, scales, code_values, a.n, a.blocksize, out, b0, b1);
  });
  return a.out;
}

at::Tensor lora_dropout_cpu(const at::Tensor& x, double p, int64_t seed, int64_t offset) {
  auto a = prepare_lora_dropout(x, p, seed, offset);
  const void* src = a.x.data_ptr();
  void* out = a.out.data_ptr();
  at::parallel_for(0, a.x.numel(), 16384, [&](int64_t i0, int64_t i1) {
    cpu::lora_dropout(src, out, a.fmt, a.seed, a.offset, a.threshold, a.keep_scale, i0, i1);
  });
  return a.out;
}

at::Tensor approx_reciprocal_cpu(const at::Tensor& x) {
  auto a = prepare_approx_reciprocal(x);
  check_reciprocal_table();
  const float* src = a.x.data_ptr<float>();
  float* out = a.out.data_ptr<float>();
  at::parallel_for(0, a.x.numel(), 16384, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) out[i] = cpu::approx_reciprocal(src[i]);
  });
  return a.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qpeft, CPU, m) {
  m.impl("quantize_4bit", &quantize_4bit_cpu);
  m.impl("dequantize_4bit", &dequantize_4bit_cpu);
  m.impl("dequantize_4bit_nested", &dequantize_4bit_nested_cpu);
  m.impl("quantize_blockwise_8bit", &quantize_blockwise_8bit_cpu);
  m.impl("dequantize_blockwise_8bit", &dequantize_blockwise_8bit_cpu);
  m.impl("_approx_reciprocal", &approx_reciprocal_cpu);
  m.impl("lora_dropout", &lora_dropout_cpu);
}

}  // namespace qpeft::ops
