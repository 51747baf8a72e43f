// The input gradient's local accumulator, shared by every level's linear_4bit_grad_input: dx's columns
// [k_begin, k_end) for all M rows accumulate here, then are copied to dx once, W walked row by row (sequential
// reads). Accumulating straight into dx's rows, K floats apart, put every row's same columns in one L1 set, so
// beyond the L1's ways each step evicted the next row's line; the rows here are `ld` floats apart: the width
// rounded up to `quantum` floats, plus 16 (64 bytes), never a multiple of 4 KB.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace qpeft::cpu {

class GradBuffer {
 public:
  // Zeroed [M, width]; row 0 starts `quantum` floats aligned (the vector width of the level's stores).
  GradBuffer(int64_t M, int64_t width, int64_t quantum)
      : width_(width), ld_(stride(width, quantum)), storage_(static_cast<size_t>(M * ld_ + quantum), 0.0f) {
    const int64_t misaligned = static_cast<int64_t>(reinterpret_cast<uintptr_t>(storage_.data()) / 4 % quantum);
    acc_ = storage_.data() + (quantum - misaligned) % quantum;
  }

  // Element (m, j): acc() + m * ld() + j.
  float* acc() { return acc_; }
  int64_t ld() const { return ld_; }

  // dx[m, k_begin + j] = (m, j) for every row and column.
  void copy_to(float* dx, int64_t M, int64_t K, int64_t k_begin) const {
    for (int64_t m = 0; m < M; ++m) std::copy(acc_ + m * ld_, acc_ + m * ld_ + width_, dx + m * K + k_begin);
  }

 private:
  static int64_t stride(int64_t width, int64_t quantum) {
    const int64_t ld = (width + quantum - 1) / quantum * quantum + 16;
    return ld % 1024 == 0 ? ld + 16 : ld;
  }

  int64_t width_, ld_;
  std::vector<float> storage_;
  float* acc_;
};

}  // namespace qpeft::cpu
