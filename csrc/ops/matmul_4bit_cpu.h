// The CPU matmul with a 4-bit weight at training sizes: W is dequantized one slab at a time into a small reused
// buffer (~2 MB, cache-resident) and each slab multiplied by ATen's GEMM into its columns of the output, so no
// dense N x K copy of W is ever allocated.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

#include "../kernels/linear_4bit_rows.h"
#include "op_args.h"

namespace qpeft::ops {

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
