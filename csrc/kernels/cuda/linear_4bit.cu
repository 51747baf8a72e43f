// Small-M (decode) base matmul on CUDA reading the 4-bit weight once: y[m, n] = sum_k x[m, k] W[n, k], M <= 16,
// summed in fp32 and written once in x's format (round to nearest even): tensor cores for 16-bit x with
// K % 128 == 0, else one warp per output feature.
#include <type_traits>

#include "device_utils.cuh"
#include "layer_cuda.h"

namespace qpeft::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxM = static_cast<int>(kLinear4bitMaxM);

__constant__ float kNF4[16] = {QPEFT_NF4_CODE_VALUES};
__constant__ float kFP4[16] = {QPEFT_FP4_CODE_VALUES};

// fp32 x or K % 128 != 0: one warp per output feature n walks its weight row; with K % 8 == 0 (and `packed` 4-byte
// aligned) each lane loads 4 packed bytes = 8 codes per step (a warp reads 128 contiguous bytes), all 8 in one
// quantization block (blocksize >= 32), so one scale per step; otherwise element by element. Weights are the exact
// values dequantize_4bit gives (code * scale, one fp32 product); sums in fp32, then a warp reduction.
__global__ void __launch_bounds__(kThreads)
    linear_4bit_kernel(const void* __restrict__ x, FloatFormat fmt, int M, int64_t K,
                       const uint8_t* __restrict__ packed, BlockScales scales, int log2_blocksize, QuantType type,
                       void* __restrict__ y, int64_t N, bool vector_ok) {
  __shared__ float code_values[16];
  if (threadIdx.x < 16) code_values[threadIdx.x] = (type == QuantType::NF4 ? kNF4 : kFP4)[threadIdx.x];
  __syncthreads();
  const int lane = threadIdx.x % 32;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (n >= N) return;  // whole warps leave together; no barrier follows
  float acc[kMaxM];
#pragma unroll
  for (int m = 0; m < kMaxM; ++m) acc[m] = 0.0f;
  if (vector_ok) {
    const int64_t units = K / 8;
    const uint32_t* row = reinterpret_cast<const uint32_t*>(packed) + n * units;
    for (int64_t u = lane; u < units; u += 32) {
      const uint32_t word = __ldg(row + u);
      const float scale = scales((n * K + 8 * u) >> log2_blocksize);
      float w[8];
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const uint32_t byte = (word >> (8 * b)) & 0xFFu;  // little endian: elements 2b (high nibble), 2b + 1
        w[2 * b] = __fmul_rn(code_values[byte >> 4], scale);
        w[2 * b + 1] = __fmul_rn(code_values[byte & 0xFu], scale);
      }
#pragma unroll
      for (int m = 0; m < kMaxM; ++m) {
        if (m < M) {
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[m] = fmaf(w[e], load_as_float(x, fmt, m * K + 8 * u + e), acc[m]);
        }
      }
    }
  } else {
    for (int64_t k = lane; k < K; k += 32) {
      const int64_t e = n * K + k;
      const uint8_t byte = packed[e >> 1];
      const float w = __fmul_rn(code_values[(e & 1) ? (byte & 0xFu) : (byte >> 4)], scales(e >> log2_blocksize));
#pragma unroll
      for (int m = 0; m < kMaxM; ++m) {
        if (m < M) acc[m] = fmaf(w, load_as_float(x, fmt, m * K + k), acc[m]);
      }
    }
  }
#pragma unroll
  for (int m = 0; m < kMaxM; ++m) {
    if (m < M) {  // M is uniform across the warp
      const float total = warp_sum(acc[m]);
      if (lane == 0) store_from_float(y, fmt, m * N + n, total);
    }
  }
}

constexpr int kMmaWarps = 8;
constexpr int kTilesPerWarp = 4;  // n-tiles of 8 output features: 32 per block
constexpr int kMmaKBlock = 128;

template <typename T>
__device__ __forceinline__ uint32_t pack2(float first, float second);  // first in the low half
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float first, float second) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(first, second);
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float first, float second) {
  const __half2 v = __floats2half2_rn(first, second);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// d += A (16 x 16, row-major fragments a0..a3) * B (16 x 8, column fragments b0, b1), fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1) {
#if defined(QPEFT_CUDA_HOST_EMULATION)
  ::qpeft_emu::mma_m16n8k16(std::is_same_v<T, __nv_bfloat16>, d, a0, a1, a2, a3, b0, b1);
#else
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
#endif
}

// The raw operands of one 128-column block of a warp: x rows g, g + 8 (8 elements per uint4), the codes of
// its n-tiles and what their scales are made of (plain: the fp32 scale; nested: the 8-bit scale code and the
// fp32 absmax of its group of 256). Loaded one block ahead of the MMAs (software pipeline), so a warp's few blocks
// do not each wait for their loads (and, nested, for the scale code before the table lookup).
struct GemvStep {
  uint4 x[2][4];
  uint4 codes[kTilesPerWarp];
  ScaleParts scale[kTilesPerWarp];
};

template <typename T>
__device__ __forceinline__ void load_gemv_step(GemvStep& s, const T* __restrict__ x, int M, int64_t K,
                                               const uint8_t* __restrict__ packed, const BlockScales& scales,
                                               int log2_blocksize, int64_t N, int64_t n_block, int64_t kb, int g,
                                               int t) {
  const int64_t k = kb * kMmaKBlock + 32 * t;  // this lane's 32 columns
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int m = g + 8 * h;
#pragma unroll
    for (int q = 0; q < 4; ++q)
      s.x[h][q] = m < M ? __ldg(reinterpret_cast<const uint4*>(x + m * K + k) + q) : make_uint4(0u, 0u, 0u, 0u);
  }
#pragma unroll
  for (int i = 0; i < kTilesPerWarp; ++i) {
    const int64_t n = n_block + 8 * i + g;
    const int64_t e = n * K + k, block = e >> log2_blocksize;
    const bool in = n < N;
    s.codes[i] = in ? __ldg(reinterpret_cast<const uint4*>(packed + e / 2)) : make_uint4(0u, 0u, 0u, 0u);
    s.scale[i] = in ? ScaleParts::load(scales, block) : ScaleParts{};
  }
}

constexpr int kBlockFeatures = kTilesPerWarp * 8;  // output features per block
constexpr int kMaxRank = static_cast<int>(kFusedLoraMaxRank);

// The LoRA operands of a fused call staged in shared memory as the fp32 values of x's format T: xa[m][j] (the
// split partial sums added in order, rounded to T: the value lora_down + sum_partials would give) and B[f][j]
// for the block's features f (lora_B rounded to T, as lora_B.to(dtype)). Block 0 also writes xa out.
template <typename T>
__device__ void stage_lora_operands(const LoraUpEpilogue& lora, int M, int64_t N, int64_t n_block,
                                    float (&xa_s)[kMaxM][kMaxRank], float (&b_s)[kBlockFeatures][kMaxRank]) {
  const int r = lora.r;
  const int64_t stride = static_cast<int64_t>(M) * r;
  for (int i = threadIdx.x; i < M * r; i += kThreads) {
    float sum = 0.0f;
    for (int s0 = 0; s0 < lora.splits; s0 += 8) {  // 8 loads in flight, then added in split order
      float part[8];
#pragma unroll
      for (int u = 0; u < 8; ++u)
        part[u] = s0 + u < lora.splits ? __ldg(lora.xa_partial + (s0 + u) * stride + i) : 0.0f;
#pragma unroll
      for (int u = 0; u < 8; ++u) sum = s0 + u < lora.splits ? __fadd_rn(sum, part[u]) : sum;
    }
    const T rounded = from_float<T>(sum);
    xa_s[i / r][i % r] = to_float(rounded);
    if (blockIdx.x == 0) static_cast<T*>(lora.xa)[i] = rounded;
  }
  for (int i = threadIdx.x; i < kBlockFeatures * r; i += kThreads) {
    const int64_t n = n_block + i / r;
    b_s[i / r][i % r] = n < N ? to_float(from_float<T>(load_as_float(lora.B, lora.b_fmt, n * r + i % r))) : 0.0f;
  }
}

// y[m, n] before rounding, with the fused LoRA epilogue: base + T(bias[n]) + s * sum_j xa[m, j] B[n, j].
__device__ __forceinline__ float add_lora_up(float base, const LoraUpEpilogue& lora, float bias_value,
                                             const float* xa_row, const float* b_row) {
  float up = 0.0f;
  for (int j = 0; j < lora.r; ++j) up = fmaf(xa_row[j], b_row[j], up);
  return fmaf(lora.scaling, up, base + bias_value);
}

// bf16/fp16 activations, K % 128 == 0 (the LLM case): tensor cores. The M <= 16 rows of x are the A operand of
// mma.m16n8k16 (rows >= M are zeros), 8 weight rows dequantized in registers the B operand. Within one MMA a lane
// owns the same four k slots of A and of B, so the k order inside a 128-column block is free: lane (g, t) takes
// the 32 contiguous columns 32 t .. 32 t + 31, i.e. one 16-byte load of codes (one scale) per weight row and
// four 16-byte loads per x row. A block is 8 warps over 32 output features; warp w takes the 128-column blocks
// w, w + 8, ... and the 8 warps' sums meet in shared memory. Weights are dequantize_4bit's values (code * scale
// in fp32, rounded to x's format), products exact, sums fp32.
// kLora: the small-M QLoRA forward (see LoraUpEpilogue): the LoRA up-projection, the bias and the sum of
// lora_down's partials are done by this launch, so a decode step's layer is two launches (lora_down + this).
template <typename T, bool kLora>
__global__ void __launch_bounds__(kThreads)
    linear_4bit_mma_kernel(const T* __restrict__ x, int M, int64_t K, const uint8_t* __restrict__ packed,
                           BlockScales scales, int log2_blocksize, QuantType type, T* __restrict__ y, int64_t N,
                           LoraUpEpilogue lora) {
  __shared__ float code_values[16];
  __shared__ float nested_code[256];  // the 8-bit scale map of a double-quantized weight (dequantize's values)
  __shared__ float red[kMmaWarps][kTilesPerWarp][32][4];
  __shared__ float xa_s[kLora ? kMaxM : 1][kMaxRank];
  __shared__ float b_s[kLora ? kBlockFeatures : 1][kMaxRank];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane >> 2, t = lane & 3;
  const int64_t n_block = static_cast<int64_t>(blockIdx.x) * kBlockFeatures;
  const int64_t kblocks = K / kMmaKBlock;
  // The first block's loads go out before anything waits: the tables below and (kLora) the LoRA operands are
  // filled while they are in flight, so the kernel pays one memory latency before its first MMA, not two.
  GemvStep cur, next;
  if (warp < kblocks) load_gemv_step(cur, x, M, K, packed, scales, log2_blocksize, N, n_block, warp, g, t);
  const bool nested = scales.absmax == nullptr;
  if (threadIdx.x < 16) code_values[threadIdx.x] = (type == QuantType::NF4 ? kNF4 : kFP4)[threadIdx.x];
  static_assert(kThreads == 256, "one thread per entry of the 256-entry scale map");
  if (nested) nested_code[threadIdx.x] = scales.nested_code[threadIdx.x];
  const float nested_offset = nested ? *scales.nested_offset : 0.0f;
  if constexpr (kLora) stage_lora_operands<T>(lora, M, N, n_block, xa_s, b_s);  // read after the reduction
  __syncthreads();
  float acc[kTilesPerWarp][4];
#pragma unroll
  for (int i = 0; i < kTilesPerWarp; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
  for (int64_t kb = warp; kb < kblocks; kb += kMmaWarps) {
    if (kb + kMmaWarps < kblocks)
      load_gemv_step(next, x, M, K, packed, scales, log2_blocksize, N, n_block, kb + kMmaWarps, g, t);
#pragma unroll
    for (int i = 0; i < kTilesPerWarp; ++i) {
      const float scale = cur.scale[i].value(nested, nested_code, nested_offset);
      const uint32_t words[4] = {cur.codes[i].x, cur.codes[i].y, cur.codes[i].z, cur.codes[i].w};
#pragma unroll
      for (int s = 0; s < 4; ++s) {  // word s: columns k + 8 s .. + 7; byte b: 2b (high nibble), 2b + 1
        uint32_t w[4];
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          const uint32_t byte = (words[s] >> (8 * b)) & 0xFFu;
          w[b] = pack2<T>(__fmul_rn(code_values[byte >> 4], scale), __fmul_rn(code_values[byte & 0xFu], scale));
        }
        const uint32_t* x0 = reinterpret_cast<const uint32_t*>(&cur.x[0][s]);
        const uint32_t* x1 = reinterpret_cast<const uint32_t*>(&cur.x[1][s]);
        mma_16816<T>(acc[i], x0[0], x1[0], x0[1], x1[1], w[0], w[1]);  // columns +0..3
        mma_16816<T>(acc[i], x0[2], x1[2], x0[3], x1[3], w[2], w[3]);  // columns +4..7
      }
    }
    cur = next;
  }
#pragma unroll
  for (int i = 0; i < kTilesPerWarp; ++i)
#pragma unroll
    for (int c = 0; c < 4; ++c) red[warp][i][lane][c] = acc[i][c];
  __syncthreads();
  if (threadIdx.x < kTilesPerWarp * 32) {
    const int i = threadIdx.x / 32, l = threadIdx.x % 32, gg = l >> 2, tt = l & 3;
#pragma unroll
    for (int c = 0; c < 4; ++c) {  // c0, c1: row gg, columns 2 tt, 2 tt + 1; c2, c3: row gg + 8
      float sum = 0.0f;
#pragma unroll
      for (int w = 0; w < kMmaWarps; ++w) sum += red[w][i][l][c];
      const int m = gg + (c >= 2 ? 8 : 0);
      const int64_t n = n_block + 8 * i + 2 * tt + (c & 1);
      if (m < M && n < N) {
        if constexpr (kLora) {
          const float bias_value =
              lora.bias != nullptr ? to_float(from_float<T>(load_as_float(lora.bias, lora.bias_fmt, n))) : 0.0f;
          sum = add_lora_up(sum, lora, bias_value, xa_s[m], b_s[n - n_block]);
        }
        y[m * N + n] = from_float<T>(sum);
      }
    }
  }
}

int log2_of(int64_t blocksize) {
  int log2_blocksize = 0;
  while ((int64_t{1} << log2_blocksize) < blocksize) ++log2_blocksize;
  return log2_blocksize;
}

bool mma_ok(FloatFormat fmt, int64_t K, int64_t blocksize, const void* x, const uint8_t* packed) {
  return (fmt == FloatFormat::BF16 || fmt == FloatFormat::F16) && K % kMmaKBlock == 0 && blocksize >= 32 &&
         reinterpret_cast<uintptr_t>(packed) % 16 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
}

template <bool kLora>
void launch_mma(const void* x, FloatFormat fmt, int64_t M, int64_t K, const uint8_t* packed, BlockScales scales,
                int64_t blocksize, QuantType type, void* y, int64_t N, const LoraUpEpilogue& lora,
                cudaStream_t stream) {
  const unsigned int grid = static_cast<unsigned int>((N + kBlockFeatures - 1) / kBlockFeatures);
  const int log2_blocksize = log2_of(blocksize);
  if (fmt == FloatFormat::BF16) {
    QPEFT_LAUNCH(grid, kThreads, stream, linear_4bit_mma_kernel<__nv_bfloat16, kLora>)(
        static_cast<const __nv_bfloat16*>(x), static_cast<int>(M), K, packed, scales, log2_blocksize, type,
        static_cast<__nv_bfloat16*>(y), N, lora);
  } else {
    QPEFT_LAUNCH(grid, kThreads, stream, linear_4bit_mma_kernel<__half, kLora>)(
        static_cast<const __half*>(x), static_cast<int>(M), K, packed, scales, log2_blocksize, type,
        static_cast<__half*>(y), N, lora);
  }
}

}  // namespace

cudaError_t linear_4bit(const void* x, FloatFormat fmt, int64_t M, int64_t K, const uint8_t* packed, BlockScales scales,
                        int64_t blocksize, QuantType type, void* y, int64_t N, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  if (M > kLinear4bitMaxM) return cudaErrorInvalidValue;
  if (mma_ok(fmt, K, blocksize, x, packed)) {
    launch_mma<false>(x, fmt, M, K, packed, scales, blocksize, type, y, N, LoraUpEpilogue{}, stream);
    return cudaGetLastError();
  }
  const bool vector_ok = K % 8 == 0 && reinterpret_cast<uintptr_t>(packed) % 4 == 0;
  const unsigned int grid = static_cast<unsigned int>((N + kWarps - 1) / kWarps);
  QPEFT_LAUNCH(grid, kThreads, stream, linear_4bit_kernel)(x, fmt, static_cast<int>(M), K, packed, scales,
                                                           log2_of(blocksize), type, y, N, vector_ok);
  return cudaGetLastError();
}

bool linear_4bit_lora_ok(FloatFormat fmt, int64_t M, int64_t K, int64_t r, int64_t blocksize, const void* x,
                         const uint8_t* packed) {
  return M >= 1 && M <= kLinear4bitMaxM && r >= 1 && r <= kFusedLoraMaxRank && mma_ok(fmt, K, blocksize, x, packed);
}

cudaError_t linear_4bit_lora(const void* x, FloatFormat fmt, int64_t M, int64_t K, const uint8_t* packed,
                             BlockScales scales, int64_t blocksize, QuantType type, void* y, int64_t N,
                             const LoraUpEpilogue& lora, cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  if (!linear_4bit_lora_ok(fmt, M, K, lora.r, blocksize, x, packed) || lora.splits < 1) return cudaErrorInvalidValue;
  launch_mma<true>(x, fmt, M, K, packed, scales, blocksize, type, y, N, lora, stream);
  return cudaGetLastError();
}

}  // namespace qpeft::cuda
