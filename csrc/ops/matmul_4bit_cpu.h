// The CPU matmul with a 4-bit weight at training sizes: W is dequantized one slab at a time into a small reused
// buffer (~2 MB, cache-resident) and each slab multiplied by ATen's GEMM into its columns of the output, so no
// dense N x K copy of W is ever allocated. (A whole dequantized W cost a fresh allocation of N*K elements per
// call, whose page faults alone took ~20 ms of a 75 ms training step at M = 256, K = N = 2048, plus writing and
// re-reading it through memory; the slab buffer is the same few MB every call.)
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

#include "op_args.h"

namespace qpeft::ops {

// Rows up to which the CPU reads W straight from its 4-bit codes (linear_4bit kernels, fp32 accumulation); above
// them, matmul_4bit_cpu. Measured (2 cores, AVX2, fp32; K x N = 2048^2, 4096^2, 4096 x 14336): the forward's codes
// kernel is faster through 16 rows (e.g. 3.9 vs 5.0-6.3 ms at 2048^2), the two are even near 24; the input
// gradient's through 8 (at 12 rows: 9.8 / 44 ms vs ~10 / 34 ms by slabs at 2048^2 / 4096^2).
constexpr int64_t kCpuSmallM = 16;
constexpr int64_t kCpuSmallMGradInput = 8;

// Which CPU kernels a forward linear_4bit of M rows, K columns, x of `dtype` runs, for reports and benchmarks:
// "codes:<level>" (W read from its codes, that level's kernel) or "slabs:<level>+aten_gemm".
std::string linear_4bit_cpu_path(int64_t M, int64_t K, at::ScalarType dtype);

// out (+)= a W^T when transpose_w (a [M, K], out [M, N]), else out (+)= a W (a [M, N], out [M, K]), W the validated
// 4-bit weight [N, K] (prepare_linear_weight), dequantized slab-wise in a's dtype: the values and GEMM of
// dequantize + matmul in that dtype. accumulate: added to out; else out is written (its old contents never read).
// out may be a strided view whose rows are contiguous (stride(1) == 1).
void matmul_4bit_cpu(const at::Tensor& out, const at::Tensor& a, const Dequantize4bitArgs& w, int64_t N, int64_t K,
                     bool transpose_w, bool accumulate);

}  // namespace qpeft::ops
