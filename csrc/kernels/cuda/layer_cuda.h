// Torch-free CUDA launchers of the linear layer's kernels: the LoRA branch (its dropout included) and the 4-bit
// base matmul with its fused LoRA epilogue. Device pointers; work enqueued on `stream`. The dropout
// seed is a SeedRef: read inside the kernel from device memory (a seed drawn on the GPU needs no host sync and
// CUDA graph replays see new seeds) or passed by value (a seed the host already knows: no draw kernel).
// Dropout decisions follow ../dropout_rng.h with counter = row-major element index of the logical [M, K] input
// (+ offset for lora_dropout).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>

#include "../linear_4bit_rows.h"
#include "../quant_rules.h"

namespace qpeft::cuda {

struct SeedRef {
  const int64_t* device = nullptr;  // one int64 in device memory, or nullptr: use `value`
  int64_t value = 0;
#if defined(__CUDACC__) || defined(QPEFT_CUDA_HOST_EMULATION)
  __device__ __forceinline__ uint64_t get() const { return static_cast<uint64_t>(device != nullptr ? *device : value); }
#endif
};

// A LoRA dropout as the launchers take it: element c kept iff bits(seed, c) >= threshold (../dropout_rng.h),
// kept values scaled by keep_scale; threshold 0 and keep_scale 1: no dropout.
struct DropoutSpec {
  SeedRef seed;
  uint32_t threshold = 0;
  float keep_scale = 1.0f;
};

// out[i] = keep(seed, offset + i) ? fmt(float(x[i]) * keep_scale) : 0 over n contiguous elements.
cudaError_t lora_dropout(const void* x, void* out, FloatFormat fmt, int64_t n, DropoutSpec dropout, uint64_t offset,
                         cudaStream_t stream);

// Row/column splits the launchers below are asked for (the caller allocates the partial sums and adds them).
int lora_down_splits(int64_t M, int64_t K, int64_t r);
int lora_down_grad_weight_splits(int64_t M, int64_t K, int64_t r);

// out[i] = fmt(partial[0, i] + partial[1, i] + ...) for i < n: the split kernels' fp32 partial sums [splits, n]
// added in split order (deterministic) and rounded once to the output format, in one launch.
cudaError_t sum_partials(const float* partial, int splits, int64_t n, void* out, FloatFormat fmt, cudaStream_t stream);

// partial[s, m, j] = sum over split s's columns k of drop(x)[m, k] * A[j, k]: x [M, K] contiguous (fmt), A [r, K]
// fp32 contiguous, partial fp32 [splits, M, r]; xa = the sum over s.
cudaError_t lora_down(const void* x, FloatFormat fmt, const float* A, float* partial, int64_t M, int64_t K, int64_t r,
                      int splits, DropoutSpec dropout, cudaStream_t stream);

// Partial sums of dA[j, k] = sum_m g[m, j] * drop(x)[m, k]: g [M, r] fp32, x [M, K] (fmt); the rows are split
// into `splits` consecutive ranges and split s writes partial[s, j, k] (fp32 [splits, r, K]); the caller sums
// them (deterministic: no atomics).
cudaError_t lora_down_grad_weight(const float* g, const void* x, FloatFormat fmt, float* partial, int64_t M, int64_t K,
                                  int64_t r, int splits, DropoutSpec dropout, cudaStream_t stream);

// dx[m, k] = fmt([float(dx[m, k]) +] (keep(m * K + k) ? keep_scale * sum_j g[m, j] A[j, k] : 0)) — accumulated
// into dx when `accumulate`, else written (dx's old contents never read); dx [M, K] contiguous (fmt),
// g [M, r] fp32, A [r, K] fp32, K <= 65535 * 256.
cudaError_t lora_down_grad_input(void* dx, FloatFormat fmt, const float* g, const float* A, int64_t M, int64_t K,
                                 int64_t r, DropoutSpec dropout, bool accumulate, cudaStream_t stream);

// Tensor-core versions of the three kernels above (lora_branch_mma.cu: mma.sync tf32, the fp32 operands A and g
// split into hi + lo tf32 pairs, so results agree with the CUDA-core kernels to fp32 rounding; same dropout
// decisions). They take 16-bit x/dx (bf16, fp16) with K % 8 == 0 and 16-byte aligned x, dx and A
// (lora_tensor_cores_ok); any other call returns cudaErrorInvalidValue without launching. Split counts are their
// own (the partial-sum layouts are the same as above).
bool lora_tensor_cores_ok(FloatFormat fmt, int64_t K, std::initializer_list<const void*> pointers);
int lora_down_mma_splits(int64_t M, int64_t K, int64_t r);
int lora_down_grad_weight_mma_splits(int64_t M, int64_t K, int64_t r);
cudaError_t lora_down_mma(const void* x, FloatFormat fmt, const float* A, float* partial, int64_t M, int64_t K,
                          int64_t r, int splits, DropoutSpec dropout, cudaStream_t stream);
cudaError_t lora_down_grad_weight_mma(const float* g, const void* x, FloatFormat fmt, float* partial, int64_t M,
                                      int64_t K, int64_t r, int splits, DropoutSpec dropout, cudaStream_t stream);
cudaError_t lora_down_grad_input_mma(void* dx, FloatFormat fmt, const float* g, const float* A, int64_t M, int64_t K,
                                     int64_t r, DropoutSpec dropout, bool accumulate, cudaStream_t stream);

// Small-M base matmul reading the 4-bit weight once: y[m, n] = sum_k x[m, k] * W[n, k] for M <= kLinear4bitMaxM,
// x [M, K] contiguous (fmt), W the 4-bit weight [N, K] (packed/scales as dequantize_4bit), y [M, N] contiguous in
// x's format fmt (fp32 sums rounded once).
constexpr int64_t kLinear4bitMaxM = kCudaLinear4bitMaxM;
cudaError_t linear_4bit(const void* x, FloatFormat fmt, int64_t M, int64_t K, const uint8_t* packed, BlockScales scales,
                        int64_t blocksize, QuantType type, void* y, int64_t N, cudaStream_t stream);

// The small-M QLoRA layer forward in the same launch (a decode step is lora_down + this, two launches):
// y[m, n] = T(sum_k x[m, k] W[n, k] + T(bias[n]) + scaling * sum_j xa[m, j] T(B[n, j])), T = x's format, with
// xa = T(sum over s of xa_partial[s]) (lora_down's split partial sums added in split order: the value
// sum_partials gives), also written to `xa` [M, r] in x's format. B [N, r] and bias [N] (or nullptr) contiguous in
// any float format. Only where linear_4bit_lora_ok: 16-bit x, K % 128 == 0, blocksize >= 32, 16-byte aligned x and
// packed, 1 <= M <= kLinear4bitMaxM, 1 <= r <= kFusedLoraMaxRank; any other call returns cudaErrorInvalidValue.
// Each block re-adds the partials it needs (splits x M x r loads from L2): keep splits small (kFusedLoraMaxSplits).
constexpr int64_t kFusedLoraMaxRank = 64;
constexpr int kFusedLoraMaxSplits = 16;
struct LoraUpEpilogue {
  const float* xa_partial = nullptr;  // [splits, M, r] fp32
  int splits = 0;
  int r = 0;
  const void* B = nullptr;
  FloatFormat b_fmt = FloatFormat::F32;
  const void* bias = nullptr;
  FloatFormat bias_fmt = FloatFormat::F32;
  float scaling = 0.0f;
  void* xa = nullptr;  // out: [M, r] in x's format
};
bool linear_4bit_lora_ok(FloatFormat fmt, int64_t M, int64_t K, int64_t r, int64_t blocksize, const void* x,
                         const uint8_t* packed);
cudaError_t linear_4bit_lora(const void* x, FloatFormat fmt, int64_t M, int64_t K, const uint8_t* packed,
                             BlockScales scales, int64_t blocksize, QuantType type, void* y, int64_t N,
                             const LoraUpEpilogue& lora, cudaStream_t stream);

}  // namespace qpeft::cuda
