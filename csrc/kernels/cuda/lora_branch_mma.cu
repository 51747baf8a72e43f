// Tensor-core versions of the three LoRA-branch kernels (same contracts as lora_branch.cu, see layer_cuda.h) for
// 16-bit activations with K % 8 == 0 and 16-byte aligned rows: the training case.
//
// Why: the CUDA-core kernels are bound by their instruction stream (one FFMA per multiply-add plus loads, the
// dropout hash and addressing); mma.sync.m16n8k8 (tf32) does 1024 multiply-adds per instruction, leaving the
// 16-byte loads, the dropout hash and the stores (benchmarks/NOTES.md).
//
// Precision: x (bf16/fp16) is exact in tf32; A and g (fp32) enter as hi + lo tf32 pairs (lora_common.cuh), so
// every product is fp32-accurate and sums are fp32, as on the CUDA-core path. Dropout: the mask is applied to x
// in registers right after its load (keep -> x, drop -> 0, keep_scale applied once to the fp32 sums), with the
// decisions of ../dropout_rng.h (counter = m * K + k).
//
// Fragments: no shared memory. Each lane loads its operands straight from global memory with 16-byte loads and
// places them into MMA fragments; because a lane holds the same k slots of A and B (lora_common.cuh, mma_tf32),
// the k order inside a chunk is free and is chosen so that a lane's slots are 8 contiguous columns of x. Lanes
// are (g, t) = (lane / 4, lane % 4) throughout.
#include "lora_common.cuh"
#include "layer_cuda.h"

namespace qpeft::cuda {
namespace {

using namespace lora;

constexpr int kMmaThreads = 128;  // 4 warps
constexpr int kMmaWarps = kMmaThreads / 32;

// ---- lora_down: partial[split, m, j] = keep_scale * sum over the split's columns k of mask(m, k) x[m, k] A[j, k] -
// Warp: 32 rows (two m-tiles) x 8 NT ranks (NT n-tiles) over the split's columns, 32 columns per step. In a step
// lane (g, t) loads columns c0 .. c0 + 7 (c0 = step start + 8 t) of rows g, g + 8, g + 16, g + 24 of the warp's
// rows (x) and of ranks g, g + 8, ... of the rank group (A). MMA i (i < 4) of the step gives k slot t the column
// c0 + 2 i and slot t + 4 the column c0 + 2 i + 1: the four MMAs cover the 32 columns once.
// Block: 4 warps = 128 consecutive rows; grid (row blocks, splits, rank groups).
constexpr int kDownMmaRows = 32 * kMmaWarps;

template <typename T, int NT>
__global__ void __launch_bounds__(kMmaThreads)
    lora_down_mma_kernel(const T* __restrict__ x, const float* __restrict__ A, float* __restrict__ partial, int64_t M,
                         int64_t K, int64_t r, int64_t cols_per_split, DropoutSpec dropout) {
  const Dropout mask{dropout.seed.get(), dropout.threshold, 1.0f};  // keep -> x, drop -> 0
  const float keep_scale = dropout.keep_scale;
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t m_base = static_cast<int64_t>(blockIdx.x) * kDownMmaRows + (threadIdx.x / 32) * 32;
  const int64_t split = blockIdx.y, j_base = static_cast<int64_t>(blockIdx.z) * 8 * NT;
  const int64_t k_begin = split * cols_per_split;
  const int64_t k_end = k_begin + cols_per_split < K ? k_begin + cols_per_split : K;
  float acc[2][NT][4];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[mt][nt][c] = 0.0f;

  // Raw operands of one step: x rows (m-tile mt, half h) and A rows (n-tile nt); zeros outside the tensors
  // (K % 8 == 0: a lane's 8 columns are all inside or all outside).
  uint4 xr[2][2];
  float4 ar[NT][2];
  const auto load_step = [&](int64_t kc) {
    const int64_t k = kc + 8 * t;
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t m = m_base + 16 * mt + 8 * h + g;
        xr[mt][h] = ldg_or_zero(reinterpret_cast<const uint4*>(x + m * K + k), m < M && k < k_end);
      }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int64_t j = j_base + 8 * nt + g;
      const bool in = j < r && k < k_end;
      ar[nt][0] = ldg_or_zero(reinterpret_cast<const float4*>(A + j * K + k), in);
      ar[nt][1] = ldg_or_zero(reinterpret_cast<const float4*>(A + j * K + k + 4), in);
    }
  };
  if (k_begin < k_end) load_step(k_begin);
  for (int64_t kc = k_begin; kc < k_end; kc += 32) {
    // This step's operands to registers, then the next step's loads go out before the MMAs.
    float xv[2][2][8];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        widen8<T>(xr[mt][h], xv[mt][h]);
        const int64_t m = m_base + 16 * mt + 8 * h + g, k = kc + 8 * t;
        if (m < M && k < k_end) mask.apply_aligned(xv[mt][h], m * K + k);
      }
    float av[NT][8];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      av[nt][0] = ar[nt][0].x, av[nt][1] = ar[nt][0].y, av[nt][2] = ar[nt][0].z, av[nt][3] = ar[nt][0].w;
      av[nt][4] = ar[nt][1].x, av[nt][5] = ar[nt][1].y, av[nt][6] = ar[nt][1].z, av[nt][7] = ar[nt][1].w;
    }
    if (kc + 32 < k_end) load_step(kc + 32);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const Tf32Pair b0 = split_tf32(av[nt][2 * i]), b1 = split_tf32(av[nt][2 * i + 1]);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          const uint32_t a0 = exact_tf32(xv[mt][0][2 * i]), a1 = exact_tf32(xv[mt][1][2 * i]);
          const uint32_t a2 = exact_tf32(xv[mt][0][2 * i + 1]), a3 = exact_tf32(xv[mt][1][2 * i + 1]);
          mma_tf32(acc[mt][nt], a0, a1, a2, a3, b0.hi, b1.hi);
          mma_tf32(acc[mt][nt], a0, a1, a2, a3, b0.lo, b1.lo);
        }
      }
    }
  }
  // d0, d1: row g, ranks 2 t, 2 t + 1 of the n-tile; d2, d3: row g + 8.
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t m = m_base + 16 * mt + 8 * h + g;
      if (m >= M) continue;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const int64_t j = j_base + 8 * nt + 2 * t;
        float* out = partial + (split * M + m) * r + j;
        if (j < r) out[0] = acc[mt][nt][2 * h] * keep_scale;
        if (j + 1 < r) out[1] = acc[mt][nt][2 * h + 1] * keep_scale;
      }
    }
}

// ---- lora_down_grad_weight: partial[split, j, k] = keep_scale * sum over the split's rows m of g[m, j] mask x ---
// MMA roles: rows = ranks j (A operand g^T), k = rows m of x (8 per step), columns = columns of x (B operand).
// Warp: 64 columns x 16 MT ranks over the split's rows. Lane (g, t) loads columns c0 .. c0 + 7 (c0 = warp start
// + 8 g) of x rows t and t + 4 of the step; n-tile i (i < 8) gives n slot g the column c0 + i, so D's slot
// (2 t, i) is column warp start + 16 t + i and (2 t + 1, i) is + 8: a lane's sums are 16 contiguous columns.
// Block: 4 warps = 256 consecutive columns; grid (column blocks, splits, rank groups).
constexpr int kGwMmaCols = 64 * kMmaWarps;
constexpr int kGwMmaUnroll = 4;  // row steps whose loads are in flight together

template <typename T, int MT>
__global__ void __launch_bounds__(kMmaThreads)
    lora_down_grad_weight_mma_kernel(const float* __restrict__ g_in, const T* __restrict__ x,
                                     float* __restrict__ partial, int64_t M, int64_t K, int64_t r,
                                     int64_t rows_per_split, DropoutSpec dropout) {
  const Dropout mask{dropout.seed.get(), dropout.threshold, 1.0f};
  const float keep_scale = dropout.keep_scale;
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t k_warp = static_cast<int64_t>(blockIdx.x) * kGwMmaCols + (threadIdx.x / 32) * 64;
  const int64_t k = k_warp + 8 * g;  // this lane's 8 columns of x
  const int64_t split = blockIdx.y, j_base = static_cast<int64_t>(blockIdx.z) * 16 * MT;
  const int64_t m_begin = split * rows_per_split;
  const int64_t m_end = m_begin + rows_per_split < M ? m_begin + rows_per_split : M;
  float acc[MT][8][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[mt][i][c] = 0.0f;

  for (int64_t m_outer = m_begin; m_outer < m_end; m_outer += 8 * kGwMmaUnroll) {
    // Loads of kGwMmaUnroll steps first: x rows t, t + 4 of each step; g[m][j] for the A fragments
    // (a0 = g[t][j], a1 = g[t][j + 8], a2 = g[t + 4][j], a3 = g[t + 4][j + 8], j = rank group + 16 mt + g).
    uint4 xr[kGwMmaUnroll][2];
    float gv[kGwMmaUnroll][MT][4];
#pragma unroll
    for (int s = 0; s < kGwMmaUnroll; ++s) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t m = m_outer + 8 * s + 4 * h + t;
        xr[s][h] = ldg_or_zero(reinterpret_cast<const uint4*>(x + m * K + k), m < m_end && k < K);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          const int64_t j = j_base + 16 * mt + g;
          gv[s][mt][2 * h] = (m < m_end && j < r) ? __ldg(g_in + m * r + j) : 0.0f;
          gv[s][mt][2 * h + 1] = (m < m_end && j + 8 < r) ? __ldg(g_in + m * r + j + 8) : 0.0f;
        }
      }
    }
#pragma unroll
    for (int s = 0; s < kGwMmaUnroll; ++s) {
      float xv[2][8];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        widen8<T>(xr[s][h], xv[h]);
        const int64_t m = m_outer + 8 * s + 4 * h + t;
        if (m < m_end && k < K) mask.apply_aligned(xv[h], m * K + k);
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        // gv[s][mt] = {g[t][j], g[t][j + 8], g[t + 4][j], g[t + 4][j + 8]} = a0, a1, a2, a3
        const Tf32Pair a0 = split_tf32(gv[s][mt][0]), a1 = split_tf32(gv[s][mt][1]);
        const Tf32Pair a2 = split_tf32(gv[s][mt][2]), a3 = split_tf32(gv[s][mt][3]);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const uint32_t b0 = exact_tf32(xv[0][i]), b1 = exact_tf32(xv[1][i]);
          mma_tf32(acc[mt][i], a0.hi, a1.hi, a2.hi, a3.hi, b0, b1);
          mma_tf32(acc[mt][i], a0.lo, a1.lo, a2.lo, a3.lo, b0, b1);
        }
      }
    }
  }
  // Rank j = group + 16 mt + g (d0, d1) and j + 8 (d2, d3); columns k_warp + 16 t + i (d0 / d2) and + 8 (d1 / d3).
  const int64_t k_out = k_warp + 16 * t;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t j = j_base + 16 * mt + 8 * h + g;
      if (j >= r) continue;
      float* out = partial + (split * r + j) * K;
#pragma unroll
      for (int half = 0; half < 2; ++half) {  // columns k_out + 8 half .. + 7 = d[2 h + half] of n-tiles 0..7
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          const int64_t kq = k_out + 8 * half + 4 * q;
          if (kq >= K) continue;  // K % 8 == 0: four columns are all inside or all outside
          const int c = 2 * h + half;
          *reinterpret_cast<float4*>(out + kq) =
              make_float4(acc[mt][4 * q][c] * keep_scale, acc[mt][4 * q + 1][c] * keep_scale,
                          acc[mt][4 * q + 2][c] * keep_scale, acc[mt][4 * q + 3][c] * keep_scale);
        }
      }
    }
}

// ---- lora_down_grad_input: dx[m, k] (+)= mask(m, k) ? keep_scale * sum_j g[m, j] A[j, k] : 0 -----------------
// MMA roles: rows = rows m (A operand g), k = ranks (8 per step), columns = columns of dx (B operand A).
// Warp: 32 rows (two m-tiles) x the block's 256 columns in chunks of 32. In a chunk n-tile i (i < 4) gives n slot
// n the column chunk + 8 (n / 2) + 2 i + n % 2, so D's slots (2 t, i), (2 t + 1, i) are columns chunk + 8 t + 2 i,
// + 1: lane (g, t) ends with 8 contiguous columns (chunk + 8 t ..) of rows g, g + 8 of each m-tile, one 16-byte
// store each. For its B slots lane (g, t) reads 8 contiguous floats of A rows t and t + 4 (columns chunk +
// 8 (g / 2) ..) and uses every other one. Both operands are fp32: three MMAs per product (hi hi, hi lo, lo hi).
// Block: 4 warps = 128 rows x 256 columns; grid (row blocks, column blocks).
constexpr int kGiMmaRows = 32 * kMmaWarps, kGiMmaCols = 256;

template <typename T>
__global__ void __launch_bounds__(kMmaThreads)
    lora_down_grad_input_mma_kernel(T* __restrict__ dx, const float* __restrict__ g_in, const float* __restrict__ A,
                                    int64_t M, int64_t K, int64_t r, DropoutSpec dropout, bool accumulate) {
  const Dropout drop = resolve(dropout);
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t m_base = static_cast<int64_t>(blockIdx.x) * kGiMmaRows + (threadIdx.x / 32) * 32;
  const int64_t k_block = static_cast<int64_t>(blockIdx.y) * kGiMmaCols;
  const int odd = g % 2;
  for (int64_t kc = k_block; kc < k_block + kGiMmaCols && kc < K; kc += 32) {
    const int64_t k_out = kc + 8 * t;      // this lane's output columns
    const int64_t k_b = kc + 8 * (g / 2);  // the 8 columns of A this lane reads for its B slots
    uint4 old[2][2];                       // dx before the update (accumulate)
    if (accumulate) {
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int64_t m = m_base + 16 * mt + 8 * h + g;
          old[mt][h] =
              (m < M && k_out < K) ? *reinterpret_cast<const uint4*>(dx + m * K + k_out) : make_uint4(0, 0, 0, 0);
        }
    }
    float acc[2][4][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[mt][i][c] = 0.0f;
    for (int64_t j0 = 0; j0 < r; j0 += 8) {
      // B slots: A[j0 + t][k_b + 2 i + odd] (b0) and A[j0 + t + 4][...] (b1) for n-tile i.
      float bv[2][8];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t j = j0 + t + 4 * h;
        const bool in = j < r && k_b < K;
        const float4 lo = ldg_or_zero(reinterpret_cast<const float4*>(A + j * K + k_b), in);
        const float4 hi = ldg_or_zero(reinterpret_cast<const float4*>(A + j * K + k_b + 4), in);
        bv[h][0] = lo.x, bv[h][1] = lo.y, bv[h][2] = lo.z, bv[h][3] = lo.w;
        bv[h][4] = hi.x, bv[h][5] = hi.y, bv[h][6] = hi.z, bv[h][7] = hi.w;
      }
      // A slots: a0 = g[g][j0 + t], a1 = g[g + 8][j0 + t], a2 = g[g][j0 + t + 4], a3 = g[g + 8][j0 + t + 4].
      Tf32Pair a[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int s = 0; s < 4; ++s) {
          const int64_t m = m_base + 16 * mt + 8 * (s % 2) + g, j = j0 + t + 4 * (s / 2);
          a[mt][s] = split_tf32((m < M && j < r) ? __ldg(g_in + m * r + j) : 0.0f);
        }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const Tf32Pair b0 = split_tf32(odd ? bv[0][2 * i + 1] : bv[0][2 * i]);
        const Tf32Pair b1 = split_tf32(odd ? bv[1][2 * i + 1] : bv[1][2 * i]);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          const Tf32Pair* am = a[mt];
          mma_tf32(acc[mt][i], am[0].hi, am[1].hi, am[2].hi, am[3].hi, b0.hi, b1.hi);
          mma_tf32(acc[mt][i], am[0].hi, am[1].hi, am[2].hi, am[3].hi, b0.lo, b1.lo);
          mma_tf32(acc[mt][i], am[0].lo, am[1].lo, am[2].lo, am[3].lo, b0.hi, b1.hi);
        }
      }
    }
    // Row g (d0, d1) and g + 8 (d2, d3) of each m-tile: columns k_out + 2 i (+ 1) = acc[mt][i][2 h (+ 1)].
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t m = m_base + 16 * mt + 8 * h + g;
        if (m >= M || k_out >= K) continue;  // K % 8 == 0: the lane's 8 columns are all inside or all outside
        float v[8];
#pragma unroll
        for (int i = 0; i < 4; ++i) v[2 * i] = acc[mt][i][2 * h], v[2 * i + 1] = acc[mt][i][2 * h + 1];
        drop.apply_aligned(v, m * K + k_out);
        if (accumulate) {
          float prev[8];
          widen8<T>(old[mt][h], prev);
#pragma unroll
          for (int e = 0; e < 8; ++e) v[e] = __fadd_rn(prev[e], v[e]);
        }
        uint4 packed;
        T* out = reinterpret_cast<T*>(&packed);
#pragma unroll
        for (int e = 0; e < 8; ++e) out[e] = from_float<T>(v[e]);
        *reinterpret_cast<uint4*>(dx + m * K + k_out) = packed;
      }
  }
}

template <typename Launch>
cudaError_t by_half_format(FloatFormat fmt, Launch&& launch) {
  if (fmt == FloatFormat::BF16) {
    launch(__nv_bfloat16{});
  } else if (fmt == FloatFormat::F16) {
    launch(__half{});
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

}  // namespace

bool lora_tensor_cores_ok(FloatFormat fmt, int64_t K, std::initializer_list<const void*> pointers) {
  if (fmt != FloatFormat::BF16 && fmt != FloatFormat::F16) return false;
  if (K % 8 != 0) return false;
  for (const void* p : pointers) {
    if (!aligned16(p)) return false;
  }
  return true;
}

int lora_down_mma_splits(int64_t M, int64_t K, int64_t r) {
  // ~512 blocks of 4 warps; a split covers at least 64 columns (two steps) and there are at most 64 splits.
  const int64_t row_blocks = (M + kDownMmaRows - 1) / kDownMmaRows;
  const int64_t rank_groups = r <= 16 ? 1 : (r + 31) / 32;
  const int64_t blocks = row_blocks * rank_groups < 1 ? 1 : row_blocks * rank_groups;
  return static_cast<int>(clamp64((512 + blocks - 1) / blocks, 1, clamp64((K + 63) / 64, 1, 64)));
}

int lora_down_grad_weight_mma_splits(int64_t M, int64_t K, int64_t r) {
  // ~256 blocks of 4 warps; each split at least 256 rows (the fp32 partials stay a few MB), at most 64 splits.
  const int64_t col_blocks = (K + kGwMmaCols - 1) / kGwMmaCols;
  const int64_t rank_groups = r <= 16 ? 1 : (r + 31) / 32;
  const int64_t blocks = col_blocks * rank_groups < 1 ? 1 : col_blocks * rank_groups;
  return static_cast<int>(clamp64((256 + blocks - 1) / blocks, 1, clamp64((M + 255) / 256, 1, 64)));
}

cudaError_t lora_down_mma(const void* x, FloatFormat fmt, const float* A, float* partial, int64_t M, int64_t K,
                          int64_t r, int splits, DropoutSpec dropout, cudaStream_t stream) {
  if (M == 0 || r == 0) return cudaSuccess;
  if (!lora_tensor_cores_ok(fmt, K, {x, A})) return cudaErrorInvalidValue;
  if (splits < 1) splits = 1;
  const int64_t steps = (K + 31) / 32;
  const int64_t cols_per_split = ((steps + splits - 1) / splits) * 32;
  const bool narrow = r <= 16;  // one 16-rank group (NT = 2) or groups of 32 ranks (NT = 4)
  const dim3 grid(ceil_div(M, kDownMmaRows), static_cast<unsigned int>(splits), narrow ? 1u : ceil_div(r, 32));
  return by_half_format(fmt, [&](auto tag) {
    using T = decltype(tag);
    if (narrow) {
      QPEFT_LAUNCH(grid, kMmaThreads, stream, lora_down_mma_kernel<T, 2>)(static_cast<const T*>(x), A, partial, M, K, r,
                                                                          cols_per_split, dropout);
    } else {
      QPEFT_LAUNCH(grid, kMmaThreads, stream, lora_down_mma_kernel<T, 4>)(static_cast<const T*>(x), A, partial, M, K, r,
                                                                          cols_per_split, dropout);
    }
  });
}

cudaError_t lora_down_grad_weight_mma(const float* g, const void* x, FloatFormat fmt, float* partial, int64_t M,
                                      int64_t K, int64_t r, int splits, DropoutSpec dropout, cudaStream_t stream) {
  if (K == 0 || r == 0) return cudaSuccess;
  if (!lora_tensor_cores_ok(fmt, K, {x})) return cudaErrorInvalidValue;
  if (splits < 1) splits = 1;
  const int64_t unroll_rows = 8 * kGwMmaUnroll;
  int64_t rows_per_split = (M + splits - 1) / splits;
  rows_per_split = (rows_per_split + unroll_rows - 1) / unroll_rows * unroll_rows;
  if (rows_per_split == 0) rows_per_split = unroll_rows;
  const bool narrow = r <= 16;
  const dim3 grid(ceil_div(K, kGwMmaCols), static_cast<unsigned int>(splits), narrow ? 1u : ceil_div(r, 32));
  return by_half_format(fmt, [&](auto tag) {
    using T = decltype(tag);
    if (narrow) {
      QPEFT_LAUNCH(grid, kMmaThreads, stream, lora_down_grad_weight_mma_kernel<T, 1>)(
          g, static_cast<const T*>(x), partial, M, K, r, rows_per_split, dropout);
    } else {
      QPEFT_LAUNCH(grid, kMmaThreads, stream, lora_down_grad_weight_mma_kernel<T, 2>)(
          g, static_cast<const T*>(x), partial, M, K, r, rows_per_split, dropout);
    }
  });
}

cudaError_t lora_down_grad_input_mma(void* dx, FloatFormat fmt, const float* g, const float* A, int64_t M, int64_t K,
                                     int64_t r, DropoutSpec dropout, bool accumulate, cudaStream_t stream) {
  if (M == 0 || K == 0) return cudaSuccess;
  if (!lora_tensor_cores_ok(fmt, K, {dx, A})) return cudaErrorInvalidValue;
  if (K > int64_t{65535} * kGiMmaCols) return cudaErrorInvalidValue;
  const dim3 grid(ceil_div(M, kGiMmaRows), ceil_div(K, kGiMmaCols));
  return by_half_format(fmt, [&](auto tag) {
    using T = decltype(tag);
    QPEFT_LAUNCH(grid, kMmaThreads, stream, lora_down_grad_input_mma_kernel<T>)(static_cast<T*>(dx), g, A, M, K, r,
                                                                                dropout, accumulate);
  });
}

}  // namespace qpeft::cuda
