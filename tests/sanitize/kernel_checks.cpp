// The torch-free CPU kernels under AddressSanitizer + UndefinedBehaviorSanitizer (built and run by
// tests/test_sanitized_kernels.py). Every buffer is allocated at exactly the size the kernel's contract gives, so a
// read or write past it is reported; every level the machine has is run and compared with the baseline level (the
// same bits for quantize / dequantize / dropout) or with a double reference (the linear kernels).
//   kernel_checks <reciprocal table file (2^21 bytes)>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <vector>

#include "cpu/cpu_isa.h"
#include "cpu/dropout_cpu.h"
#include "cpu/linear_4bit_cpu.h"
#include "cpu/quant_cpu.h"
#include "float_convert.h"

using namespace qpeft;
using namespace qpeft::cpu;

namespace {

std::mt19937_64 rng(1234);
int failures = 0;

void fail(const char* what, const char* level, long a, long b) {
  std::fprintf(stderr, "FAIL %s at level %s (%ld, %ld)\n", what, level, a, b);
  ++failures;
}

std::vector<float> random_floats(int64_t n, float scale) {
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& x : v) x = d(rng);
  return v;
}

int64_t pick(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); }

struct Weight {
  int64_t N, K, blocksize;
  QuantType type;
  std::vector<uint8_t> packed;
  std::vector<float> absmax;
  BlockScales scales() const {
    BlockScales s;
    s.absmax = absmax.data();
    return s;
  }
};

Weight quantized(int64_t N, int64_t K, int64_t blocksize, QuantType type) {
  const int64_t n = N * K, blocks = (n + blocksize - 1) / blocksize;
  Weight w{N,
           K,
           blocksize,
           type,
           std::vector<uint8_t>(static_cast<size_t>((n + 1) / 2)),
           std::vector<float>(static_cast<size_t>(blocks))};
  const std::vector<float> A = random_floats(n, 2.0f);
  quantize_4bit(A.data(), FloatFormat::F32, n, blocksize, type, w.packed.data(), w.absmax.data(), 0, blocks);
  return w;
}

// Dequantized bits of the whole weight and of a random tile, at the current level, in format fmt.
std::vector<uint8_t> dequantized(const Weight& w, FloatFormat fmt, int64_t r0, int64_t r1, int64_t c0, int64_t c1,
                                 int64_t ld) {
  const int64_t n = w.N * w.K, size = fmt == FloatFormat::F32 ? 4 : 2;
  std::vector<uint8_t> all(static_cast<size_t>(n * size));
  dequantize_4bit(w.packed.data(), w.scales(), n, w.blocksize, w.type, all.data(), fmt, 0,
                  (n + w.blocksize - 1) / w.blocksize);
  const bool empty = r1 == r0 || c1 == c0;
  std::vector<uint8_t> tile(empty ? 0 : static_cast<size_t>(((r1 - r0 - 1) * ld + (c1 - c0)) * size));
  if (!empty)
    dequantize_4bit_tile(w.packed.data(), w.scales(), w.K, w.blocksize, w.type, r0, r1, c0, c1, tile.data(), ld, fmt);
  all.insert(all.end(), tile.begin(), tile.end());
  return all;
}

double dequantized_value(const Weight& w, int64_t e) {
  const uint8_t byte = w.packed[static_cast<size_t>(e / 2)];
  const int code = e % 2 ? byte & 0xF : byte >> 4;
  static const float nf4[16] = {QPEFT_NF4_CODE_VALUES}, fp4[16] = {QPEFT_FP4_CODE_VALUES};
  return static_cast<double>((w.type == QuantType::NF4 ? nf4 : fp4)[code] *
                             w.absmax[static_cast<size_t>(e / w.blocksize)]);
}

void check_linear(const Weight& w, int64_t M, const char* level) {
  const std::vector<float> x = random_floats(M * w.K, 1.0f);
  std::vector<float> y(static_cast<size_t>(M * w.N));
  linear_4bit(x.data(), M, w.K, w.packed.data(), w.scales(), w.blocksize, w.type, y.data(), w.N, 0, w.N);
  std::vector<uint16_t> xb(x.size());
  for (size_t i = 0; i < x.size(); ++i) xb[i] = float_to_bf16_bits(x[i]);
  std::vector<float> yb(y.size());
  const bool bf16 = linear_4bit_kernel(w.K, true) == CodesKernel::Avx512Bf16;
  if (bf16)
    linear_4bit_bf16(xb.data(), M, w.K, w.packed.data(), w.scales(), w.blocksize, w.type, yb.data(), w.N, 0, w.N);
  const std::vector<float> dy = random_floats(M * w.N, 1.0f);
  std::vector<float> dx(static_cast<size_t>(M * w.K));
  const int64_t split = w.K % 16 == 0 ? w.K / 32 * 16 : w.K / 2;  // two column ranges, as threads split them
  linear_4bit_grad_input(dy.data(), M, w.N, w.packed.data(), w.scales(), w.blocksize, w.type, dx.data(), w.K, 0, split);
  linear_4bit_grad_input(dy.data(), M, w.N, w.packed.data(), w.scales(), w.blocksize, w.type, dx.data(), w.K, split,
                         w.K);
  double err = 0, norm = 0, err_b = 0, norm_b = 0, err_g = 0, norm_g = 0;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < w.N; ++n) {
      double ref = 0, ref_b = 0;
      for (int64_t k = 0; k < w.K; ++k) {
        const double wv = dequantized_value(w, n * w.K + k);
        ref += wv * x[static_cast<size_t>(m * w.K + k)];
        ref_b += static_cast<double>(bf16_bits_to_float(float_to_bf16_bits(static_cast<float>(wv)))) *
                 bf16_bits_to_float(xb[static_cast<size_t>(m * w.K + k)]);
      }
      err += std::pow(y[static_cast<size_t>(m * w.N + n)] - ref, 2), norm += ref * ref;
      if (bf16) err_b += std::pow(yb[static_cast<size_t>(m * w.N + n)] - ref_b, 2), norm_b += ref_b * ref_b;
    }
    for (int64_t k = 0; k < w.K; ++k) {
      double ref = 0;
      for (int64_t n = 0; n < w.N; ++n) ref += dequantized_value(w, n * w.K + k) * dy[static_cast<size_t>(m * w.N + n)];
      err_g += std::pow(dx[static_cast<size_t>(m * w.K + k)] - ref, 2), norm_g += ref * ref;
    }
  }
  if (!(std::sqrt(err / norm) < 1e-5)) fail("linear_4bit", level, M, w.K);
  if (bf16 && !(std::sqrt(err_b / norm_b) < 1e-5)) fail("linear_4bit_bf16", level, M, w.K);
  if (!(std::sqrt(err_g / norm_g) < 1e-5)) fail("linear_4bit_grad_input", level, M, w.K);
}

// Random inputs of a dropout check: n values of format `in` (finite 16-bit values) and fp32 addends.
struct DropoutInput {
  int64_t n;
  FloatFormat in;
  std::vector<uint8_t> x;
};

DropoutInput dropout_input(int64_t n, FloatFormat in) {
  const int64_t in_size = in == FloatFormat::F32 ? 4 : 2;
  DropoutInput d{n, in, std::vector<uint8_t>(static_cast<size_t>(n * in_size))};
  for (auto& b : d.x) b = static_cast<uint8_t>(rng());
  if (in != FloatFormat::F32)  // finite 16-bit values: clear the top exponent bit
    for (int64_t i = 0; i < n; ++i) d.x[static_cast<size_t>(2 * i + 1)] &= 0xBF;
  return d;
}

std::vector<uint8_t> dropped(const DropoutInput& d, FloatFormat out_fmt, uint64_t seed) {
  const int64_t out_size = out_fmt == FloatFormat::F32 ? 4 : 2, n = d.n, mid = n / 3;
  std::vector<uint8_t> out(static_cast<size_t>(n * out_size));
  dropout_convert(d.x.data(), d.in, out.data(), out_fmt, seed, 17, 9000, 1.25f, 0, mid);
  dropout_convert(d.x.data(), d.in, out.data(), out_fmt, seed, 17, 9000, 1.25f, mid, n);
  std::vector<float> v(static_cast<size_t>(n), 0.5f);
  add_dropped(v.data(), out.data(), out_fmt, seed, 17, 9000, 1.25f, 0, n);
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) return std::fprintf(stderr, "usage: kernel_checks <reciprocal table>\n"), 2;
  std::ifstream file(argv[1], std::ios::binary);
  std::vector<uint8_t> table((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  set_reciprocal_table(table.data(), static_cast<int64_t>(table.size()));
  const int top = static_cast<int>(detected_cpu_isa());
  const FloatFormat formats[3] = {FloatFormat::F32, FloatFormat::F16, FloatFormat::BF16};
  for (int round = 0; round < 12; ++round) {
    const int64_t blocksize = int64_t{32} << pick(0, 3);
    const int64_t K = round % 3 == 0 ? pick(1, 200) : 16 * pick(1, 12) * (round % 2 ? 2 : 1);
    const int64_t N = pick(1, 40), M = pick(1, 16);
    const Weight w = quantized(N, K, blocksize, round % 2 ? QuantType::FP4 : QuantType::NF4);
    const int64_t r0 = pick(0, N - 1), r1 = pick(r0, N), c0 = pick(0, K - 1), c1 = pick(c0, K);
    const int64_t ld = c1 - c0 + pick(0, 3);
    std::vector<DropoutInput> inputs;
    for (int f = 0; f < 3; ++f) inputs.push_back(dropout_input(N * K + 5, formats[f]));
    std::vector<std::vector<uint8_t>> base;
    for (int level = 0; level <= top; ++level) {
      set_cpu_isa_cap(static_cast<CpuIsa>(level));
      const char* name = cpu_isa_name(cpu_isa());
      for (int f = 0; f < 3; ++f) {
        const std::vector<uint8_t> d = dequantized(w, formats[f], r0, r1, c0, c1, ld);
        const std::vector<uint8_t> drop = dropped(inputs[static_cast<size_t>(f)], formats[(f + round) % 3], 99 + round);
        if (level == 0) {
          base.push_back(d), base.push_back(drop);
        } else {
          if (d != base[static_cast<size_t>(2 * f)]) fail("dequantize", name, N, K);
          if (drop != base[static_cast<size_t>(2 * f + 1)]) fail("dropout", name, N, K);
        }
      }
      check_linear(w, M, name);
    }
  }
  std::printf("%s: %d failures, levels baseline..%s\n", failures ? "FAILED" : "ok", failures,
              cpu_isa_name(static_cast<CpuIsa>(top)));
  return failures ? 1 : 0;
}
