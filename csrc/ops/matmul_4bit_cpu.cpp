#include "matmul_4bit_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "../kernels/cpu/quant_cpu.h"

namespace qpeft::ops {
namespace {

constexpr int64_t kSlabBytes = int64_t{2} << 20;

// Slab extent along a dimension of `length` whose lines hold `line_bytes`: ~kSlabBytes, a multiple of `quantum`
// (whole GEMM tiles / quantization blocks), at least one quantum, at most the whole dimension.
int64_t slab_extent(int64_t length, int64_t line_bytes, int64_t quantum) {
  const int64_t lines = std::max<int64_t>(quantum, kSlabBytes / std::max<int64_t>(line_bytes, 1) / quantum * quantum);
  return std::max<int64_t>(1, std::min(length, lines));
}

}  // namespace

void matmul_4bit_cpu(const at::Tensor& out, const at::Tensor& a, const Dequantize4bitArgs& w, int64_t N, int64_t K,
                     bool transpose_w, bool accumulate) {
  TORCH_CHECK(out.device().is_cpu() && a.device().is_cpu(), "qpeft: matmul_4bit_cpu takes CPU tensors");
  const int64_t M = a.size(0);
  if (M == 0) return;
  const FloatFormat fmt = float_format(a.scalar_type(), "the activation of a 4-bit linear");
  const int64_t element = a.element_size();
  const BlockScales scales = w.scales();
  const uint8_t* codes = w.packed.data_ptr<uint8_t>();
  const double beta = accumulate ? 1.0 : 0.0;  // beta 0: out's old contents (even NaN) are ignored
  if (transpose_w) {
    // out[:, n0:n1] = a W[n0:n1, :]^T: slabs of whole rows of W.
    const int64_t rows = slab_extent(N, K * element, 16);
    at::Tensor slab = at::empty({rows, K}, a.options());
    char* base = static_cast<char*>(slab.data_ptr());
    for (int64_t n0 = 0; n0 < N; n0 += rows) {
      const int64_t nr = std::min(rows, N - n0);
      at::parallel_for(0, nr, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), [&](int64_t r0, int64_t r1) {
        cpu::dequantize_4bit_tile(codes, scales, K, w.blocksize, w.type, n0 + r0, n0 + r1, 0, K,
                                  base + r0 * K * element, K, fmt);
      });
      out.narrow(1, n0, nr).addmm_(a, slab.narrow(0, 0, nr).t(), beta);
    }
  } else {
    // out[:, k0:k1] = a W[:, k0:k1]: slabs of columns of W (all N rows), row stride `cols` in the buffer.
    const int64_t cols = slab_extent(K, N * element, 64);
    at::Tensor slab = at::empty({N, cols}, a.options());
    char* base = static_cast<char*>(slab.data_ptr());
    for (int64_t k0 = 0; k0 < K; k0 += cols) {
      const int64_t kc = std::min(cols, K - k0);
      at::parallel_for(0, N, std::max<int64_t>(1, 16384 / kc), [&](int64_t r0, int64_t r1) {
        cpu::dequantize_4bit_tile(codes, scales, K, w.blocksize, w.type, r0, r1, k0, k0 + kc,
                                  base + r0 * cols * element, cols, fmt);
      });
      out.narrow(1, k0, kc).addmm_(a, slab.narrow(1, 0, kc), beta);
    }
  }
}

}  // namespace qpeft::ops
