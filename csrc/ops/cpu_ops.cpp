// CPU registrations of the qpeft ops: validate + allocate (op_args), then split the work across torch's
// intra-op thread pool and run the torch-free kernels of kernels/cpu.
// LoRA-branch ops: the dropout is applied to row tiles of ~256K elements that are consumed at once by a matmul, so
// neither a mask nor a dropped copy of the whole input ever exists. The tiles and GEMMs are in gemm_dtype: bf16
// for bf16 activations on CPUs with bf16 dot products (level avx512_bf16), else fp32.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../kernels/cpu/cpu_isa.h"
#include "../kernels/cpu/dropout_cpu.h"
#include "../kernels/cpu/linear_4bit_cpu.h"
#include "../kernels/cpu/quant_cpu.h"
#include "matmul_4bit_cpu.h"
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

at::Tensor dequantize_4bit_cpu(const at::Tensor& packed, const at::Tensor& absmax,
                               const std::optional<at::Tensor>& nested_absmax,
                               const std::optional<at::Tensor>& nested_code,
                               const std::optional<at::Tensor>& nested_offset, int64_t blocksize,
                               c10::string_view quant_type, at::IntArrayRef shape, at::ScalarType dtype) {
  return run_dequantize_4bit_cpu(prepare_dequantize_4bit(
      {packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, quant_type}, shape, dtype));
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

at::Tensor linear_4bit_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                           const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
                           const std::optional<at::Tensor>& nested_offset, int64_t blocksize,
                           c10::string_view quant_type, int64_t out_features) {
  TORCH_CHECK_VALUE(x.dim() == 2, "qpeft: linear_4bit takes x of shape [M, K], got ", x.sizes());
  const int64_t M = x.size(0), K = x.size(1), N = out_features;
  const Dequantize4bitArgs w = prepare_linear_weight(
      x, {packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, quant_type}, N, K);
  if (M > kCpuSmallM) {  // training sizes: W dequantized a slab at a time, GEMMs in x's dtype
    at::Tensor y = at::empty({M, N}, x.options());
    matmul_4bit_cpu(y, x, w, N, K, /*transpose_w=*/true, /*accumulate=*/false);
    return y;
  }
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  const BlockScales scales = w.scales();
  float* ys = y.data_ptr<float>();
  const uint8_t* codes = w.packed.data_ptr<uint8_t>();
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(K, 1));
  if (cpu::linear_4bit_kernel(K, x.scalar_type() == at::kBFloat16) == cpu::CodesKernel::Avx512Bf16) {
    const at::Tensor xc = x.contiguous();
    const auto* xs = static_cast<const uint16_t*>(xc.data_ptr());
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
      cpu::linear_4bit_bf16(xs, M, K, codes, scales, blocksize, w.type, ys, N, n0, n1);
    });
  } else {
    const at::Tensor x32 = x.to(at::kFloat).contiguous();
    const float* xs = x32.data_ptr<float>();
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
      cpu::linear_4bit(xs, M, K, codes, scales, blocksize, w.type, ys, N, n0, n1);
    });
  }
  return y.scalar_type() == x.scalar_type() ? y : y.to(x.scalar_type());
}

at::Tensor linear_4bit_grad_input_cpu(const at::Tensor& dy, const at::Tensor& packed, const at::Tensor& absmax,
                                      const std::optional<at::Tensor>& nested_absmax,
                                      const std::optional<at::Tensor>& nested_code,
                                      const std::optional<at::Tensor>& nested_offset, int64_t blocksize,
                                      c10::string_view quant_type, int64_t in_features) {
  TORCH_CHECK_VALUE(dy.dim() == 2, "qpeft: linear_4bit_grad_input takes dy of shape [M, N], got ", dy.sizes());
  const int64_t M = dy.size(0), N = dy.size(1), K = in_features;
  const Dequantize4bitArgs w = prepare_linear_weight(
      dy, {packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, quant_type}, N, K);
  if (M > kCpuSmallMGradInput) {
    at::Tensor dx = at::empty({M, K}, dy.options());
    matmul_4bit_cpu(dx, dy, w, N, K, /*transpose_w=*/false, /*accumulate=*/false);
    return dx;
  }
  const at::Tensor dy32 = dy.to(at::kFloat).contiguous();
  at::Tensor dx = at::empty({M, K}, dy.options().dtype(at::kFloat));
  const BlockScales scales = w.scales();
  const float* g = dy32.data_ptr<float>();
  float* out = dx.data_ptr<float>();
  const uint8_t* codes = w.packed.data_ptr<uint8_t>();
  constexpr int64_t kColumns = 64;  // columns per task: a multiple of 8 for the SIMD path
  at::parallel_for(0, (K + kColumns - 1) / kColumns, 1, [&](int64_t c0, int64_t c1) {
    cpu::linear_4bit_grad_input(g, M, N, codes, scales, blocksize, w.type, out, K, c0 * kColumns,
                                std::min(c1 * kColumns, K));
  });
  return dx.scalar_type() == dy.scalar_type() ? dx : dx.to(dy.scalar_type());
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

// ---- the LoRA branch ------------------------------------------------------------------------------------------

constexpr int64_t kElementsPerTask = 16384;

// Rows per tile of a [M, K] activation: about 256K fp32 elements.
int64_t tile_rows(int64_t M, int64_t K) {
  return std::max<int64_t>(1, std::min<int64_t>(M, std::max<int64_t>(16, 262144 / std::max<int64_t>(K, 1))));
}

// The dtype of the LoRA branch's tiles and GEMMs for an activation of `dtype`.
at::ScalarType gemm_dtype(at::ScalarType dtype) {
  return dtype == at::kBFloat16 && cpu::cpu_has(cpu::CpuIsa::Avx512Bf16) ? at::kBFloat16 : at::kFloat;
}

// Calls fn(m0, tile) for consecutive row ranges [m0, m0 + tile.size(0)) of src [M, K] (contiguous), tile =
// drop(src[m0 : m0 + rows]) in gemm_dtype with the counters of the whole tensor (element (m, k) -> m * K + k).
template <typename Fn>
void for_each_dropped_tile(const at::Tensor& src, const DropoutParams& d, Fn&& fn) {
  const int64_t M = src.size(0), K = src.size(1), T = tile_rows(M, K);
  const FloatFormat fmt = float_format(src.scalar_type(), "the LoRA input");
  const at::ScalarType tile_dtype = gemm_dtype(src.scalar_type());
  const FloatFormat tile_fmt = float_format(tile_dtype, "the LoRA tile");
  const uint64_t seed = d.host_seed();
  at::Tensor tile = at::empty({T, K}, src.options().dtype(tile_dtype));
  for (int64_t m0 = 0; m0 < M; m0 += T) {
    const int64_t rows = std::min(T, M - m0);
    const char* base = static_cast<const char*>(src.data_ptr()) + m0 * K * src.element_size();
    void* out = tile.data_ptr();
    at::parallel_for(0, rows * K, kElementsPerTask, [&](int64_t i0, int64_t i1) {
      cpu::dropout_convert(base, fmt, out, tile_fmt, seed, static_cast<uint64_t>(m0 * K), d.threshold, d.keep_scale, i0,
                           i1);
    });
    fn(m0, tile.narrow(0, 0, rows));
  }
}

bool plain_fp32(const at::Tensor& t, double p) { return p == 0.0 && t.scalar_type() == at::kFloat; }

at::Tensor lora_dropout_cpu(const at::Tensor& x, double p, const at::Tensor& seed, int64_t offset) {
  auto a = prepare_lora_dropout(x, p, seed, offset);
  const void* src = a.x.data_ptr();
  void* out = a.out.data_ptr();
  const uint64_t seed_value = a.dropout.host_seed();
  at::parallel_for(0, a.x.numel(), kElementsPerTask, [&](int64_t i0, int64_t i1) {
    cpu::dropout_convert(src, a.fmt, out, a.fmt, seed_value, a.offset, a.dropout.threshold, a.dropout.keep_scale, i0,
                         i1);
  });
  return a.out;
}

at::Tensor lora_down_cpu(const at::Tensor& x, const at::Tensor& lora_A, double p, const at::Tensor& seed) {
  const BelowAutograd below_autograd;
  const LoraDownArgs a = prepare_lora_down(x, lora_A, p, seed);
  if (plain_fp32(a.x, p)) return at::mm(a.x, a.A.t());
  const at::ScalarType dtype = gemm_dtype(a.x.scalar_type());
  const at::Tensor At = a.A.to(dtype).t();
  at::Tensor xa = at::empty({a.x.size(0), a.A.size(0)}, a.x.options().dtype(dtype));
  for_each_dropped_tile(a.x, a.dropout, [&](int64_t m0, const at::Tensor& tile) {
    at::Tensor rows = xa.narrow(0, m0, tile.size(0));
    at::mm_out(rows, tile, At);
  });
  return xa.to(a.x.scalar_type());
}

at::Tensor lora_down_grad_weight_cpu(const at::Tensor& g, const at::Tensor& x, double p, const at::Tensor& seed) {
  const BelowAutograd below_autograd;
  const LoraDownGradWeightArgs a = prepare_lora_down_grad_weight(g, x, p, seed);
  if (plain_fp32(a.x, p)) return at::mm(a.g.t(), a.x);
  at::Tensor dA = at::zeros({a.g.size(1), a.x.size(1)}, a.x.options().dtype(at::kFloat));
  const at::ScalarType dtype = gemm_dtype(a.x.scalar_type());
  const at::Tensor g_c = a.g.to(dtype);
  for_each_dropped_tile(a.x, a.dropout, [&](int64_t m0, const at::Tensor& tile) {
    const at::Tensor gt = g_c.narrow(0, m0, tile.size(0)).t();
    if (dtype == at::kFloat) {
      dA.addmm_(gt, tile);
    } else {
      dA.add_(at::mm(gt, tile));  // each tile's sums rounded once to bf16, the tiles summed in fp32
    }
  });
  return dA;
}

// dx (+)= drop(g A) for the validated arguments, one row tile of fp32 products at a time: added to dx when
// `accumulate`, else written (dx's old contents never read).
void lora_down_grad_input_tiles(at::Tensor dx, const LoraDownGradInputArgs& a, double p, bool accumulate) {
  if (plain_fp32(dx, p)) {
    if (accumulate) {
      dx.addmm_(a.g, a.A);
    } else {
      at::mm_out(dx, a.g, a.A);
    }
    return;
  }
  const int64_t M = dx.size(0), K = dx.size(1), T = tile_rows(M, K);
  const uint64_t seed_value = a.dropout.host_seed();
  // add_dropped adds fp32 products; a written dx takes them in gemm_dtype.
  const at::ScalarType dtype = accumulate ? at::kFloat : gemm_dtype(dx.scalar_type());
  const FloatFormat product_fmt = float_format(dtype, "the LoRA tile");
  const at::Tensor g = a.g.to(dtype), A = a.A.to(dtype);
  at::Tensor tile = at::empty({T, K}, dx.options().dtype(dtype));
  for (int64_t m0 = 0; m0 < M; m0 += T) {
    const int64_t rows = std::min(T, M - m0);
    at::Tensor product = tile.narrow(0, 0, rows);
    at::mm_out(product, g.narrow(0, m0, rows), A);
    const void* v = product.data_ptr();
    void* out = static_cast<char*>(dx.data_ptr()) + m0 * K * dx.element_size();
    const auto offset = static_cast<uint64_t>(m0 * K);
    at::parallel_for(0, rows * K, kElementsPerTask, [&](int64_t i0, int64_t i1) {
      if (accumulate) {
        cpu::add_dropped(static_cast<const float*>(v), out, a.fmt, seed_value, offset, a.dropout.threshold,
                         a.dropout.keep_scale, i0, i1);
      } else {
        cpu::dropout_convert(v, product_fmt, out, a.fmt, seed_value, offset, a.dropout.threshold, a.dropout.keep_scale,
                             i0, i1);
      }
    });
  }
}

void lora_down_grad_input_cpu(const at::Tensor& dx, const at::Tensor& g, const at::Tensor& lora_A, double p,
                              const at::Tensor& seed) {
  const BelowAutograd below_autograd;
  lora_down_grad_input_tiles(dx, prepare_lora_down_grad_input(dx, g, lora_A, p, seed), p, /*accumulate=*/true);
}

at::Tensor lora_down_grad_input_new_cpu(const at::Tensor& g, const at::Tensor& lora_A, double p, const at::Tensor& seed,
                                        at::ScalarType dtype) {
  const BelowAutograd below_autograd;
  const NewGradInputArgs a = prepare_lora_down_grad_input_new(g, lora_A, p, seed, dtype);
  lora_down_grad_input_tiles(a.dx, a.args, p, /*accumulate=*/false);
  return a.dx;
}

}  // namespace

std::string linear_4bit_cpu_path(int64_t M, int64_t K, at::ScalarType dtype) {
  if (M > kCpuSmallM) return std::string("slabs:") + cpu::cpu_isa_name(cpu::cpu_isa()) + "+aten_gemm";
  return std::string("codes:") + cpu::codes_kernel_name(cpu::linear_4bit_kernel(K, dtype == at::kBFloat16));
}

TORCH_LIBRARY_IMPL(qpeft, CPU, m) {
  m.impl("quantize_4bit", &quantize_4bit_cpu);
  m.impl("dequantize_4bit", &dequantize_4bit_cpu);
  m.impl("quantize_blockwise_8bit", &quantize_blockwise_8bit_cpu);
  m.impl("dequantize_blockwise_8bit", &dequantize_blockwise_8bit_cpu);
  m.impl("_approx_reciprocal", &approx_reciprocal_cpu);
  m.impl("linear_4bit", &linear_4bit_cpu);
  m.impl("linear_4bit_grad_input", &linear_4bit_grad_input_cpu);
  m.impl("lora_dropout", &lora_dropout_cpu);
  m.impl("lora_down", &lora_down_cpu);
  m.impl("lora_down_grad_weight", &lora_down_grad_weight_cpu);
  m.impl("lora_down_grad_input_", &lora_down_grad_input_cpu);
  m.impl("lora_down_grad_input", &lora_down_grad_input_new_cpu);
}

}  // namespace qpeft::ops
