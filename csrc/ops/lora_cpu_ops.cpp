// CPU registrations of the LoRA-branch ops (lora_dropout, lora_down and its two gradients). The dropout is
// applied to row tiles of ~1 MB (fp32) that are consumed at once by a matmul, so neither a mask nor a dropped
// copy of the whole input ever exists; the LoRA arithmetic runs in fp32 (fast and exact enough on any CPU,
// unlike bf16 matmuls on CPUs without bf16 units).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../kernels/cpu/dropout_cpu.h"
#include "op_args.h"

namespace qpeft::ops {
namespace {

constexpr int64_t kElementsPerTask = 16384;

// Rows per tile of a [M, K] activation: about 256K fp32 elements.
int64_t tile_rows(int64_t M, int64_t K) {
  return std::max<int64_t>(1, std::min<int64_t>(M, std::max<int64_t>(16, 262144 / std::max<int64_t>(K, 1))));
}

// Calls fn(m0, tile) for consecutive row ranges [m0, m0 + tile.size(0)) of src [M, K] (contiguous), tile = fp32
// drop(src[m0 : m0 + rows]) with the counters of the whole tensor (element (m, k) -> m * K + k).
template <typename Fn>
void for_each_dropped_tile(const at::Tensor& src, const DropoutParams& d, Fn&& fn) {
  const int64_t M = src.size(0), K = src.size(1), T = tile_rows(M, K);
  const FloatFormat fmt = float_format(src.scalar_type(), "the LoRA input");
  const uint64_t seed = d.host_seed();
  at::Tensor tile = at::empty({T, K}, src.options().dtype(at::kFloat));
  for (int64_t m0 = 0; m0 < M; m0 += T) {
    const int64_t rows = std::min(T, M - m0);
    const char* base = static_cast<const char*>(src.data_ptr()) + m0 * K * src.element_size();
    float* out = tile.data_ptr<float>();
    at::parallel_for(0, rows * K, kElementsPerTask, [&](int64_t i0, int64_t i1) {
      cpu::dropout_convert(base, fmt, out, FloatFormat::F32, seed, static_cast<uint64_t>(m0 * K), d.threshold,
                           d.keep_scale, i0, i1);
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
  at::Tensor xa = at::empty({a.x.size(0), a.A.size(0)}, a.x.options().dtype(at::kFloat));
  for_each_dropped_tile(a.x, a.dropout, [&](int64_t m0, const at::Tensor& tile) {
    at::Tensor rows = xa.narrow(0, m0, tile.size(0));
    at::mm_out(rows, tile, a.A.t());
  });
  return xa.to(a.x.scalar_type());
}

at::Tensor lora_down_grad_weight_cpu(const at::Tensor& g, const at::Tensor& x, double p, const at::Tensor& seed) {
  const BelowAutograd below_autograd;
  const LoraDownGradWeightArgs a = prepare_lora_down_grad_weight(g, x, p, seed);
  if (plain_fp32(a.x, p)) return at::mm(a.g.t(), a.x);
  at::Tensor dA = at::zeros({a.g.size(1), a.x.size(1)}, a.x.options().dtype(at::kFloat));
  for_each_dropped_tile(a.x, a.dropout, [&](int64_t m0, const at::Tensor& tile) {
    dA.addmm_(a.g.narrow(0, m0, tile.size(0)).t(), tile);
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
  at::Tensor tile = at::empty({T, K}, dx.options().dtype(at::kFloat));
  for (int64_t m0 = 0; m0 < M; m0 += T) {
    const int64_t rows = std::min(T, M - m0);
    at::Tensor product = tile.narrow(0, 0, rows);
    at::mm_out(product, a.g.narrow(0, m0, rows), a.A);
    const float* v = product.data_ptr<float>();
    void* out = static_cast<char*>(dx.data_ptr()) + m0 * K * dx.element_size();
    const auto offset = static_cast<uint64_t>(m0 * K);
    at::parallel_for(0, rows * K, kElementsPerTask, [&](int64_t i0, int64_t i1) {
      if (accumulate) {
        cpu::add_dropped(v, out, a.fmt, seed_value, offset, a.dropout.threshold, a.dropout.keep_scale, i0, i1);
      } else {
        cpu::dropout_convert(v, FloatFormat::F32, out, a.fmt, seed_value, offset, a.dropout.threshold,
                             a.dropout.keep_scale, i0, i1);
      }
    });
  }
}

void lora_down_grad_input_cpu(const at::Tensor& dx, const at::Tensor& g, const at::Tensor& lora_A, double p,
                              const at::Tensor& seed) {
  const BelowAutograd below_autograd;
  lora_down_grad_input_tiles(dx, prepare_lora_down_grad_input(dx, g, lora_A, p, seed), p, /*accumulate=*/true);
}

at::Tensor lora_down_grad_input_new_cpu(const at::Tensor& g, const at::Tensor& lora_A, double p,
                                        const at::Tensor& seed, at::ScalarType dtype) {
  const BelowAutograd below_autograd;
  const NewGradInputArgs a = prepare_lora_down_grad_input_new(g, lora_A, p, seed, dtype);
  lora_down_grad_input_tiles(a.dx, a.args, p, /*accumulate=*/false);
  return a.dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(qpeft, CPU, m) {
  m.impl("lora_dropout", &lora_dropout_cpu);
  m.impl("lora_down", &lora_down_cpu);
  m.impl("lora_down_grad_weight", &lora_down_grad_weight_cpu);
  m.impl("lora_down_grad_input_", &lora_down_grad_input_cpu);
  m.impl("lora_down_grad_input", &lora_down_grad_input_new_cpu);
}

}  // namespace qpeft::ops
