#include "cpu_isa.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace qpeft::cpu {
namespace {

constexpr const char* kNames[kCpuIsaCount] = {"baseline", "avx2", "avx512", "avx512_bf16"};

CpuIsa detect() {
#if defined(QPEFT_X86_SIMD)
  // libgcc's __builtin_cpu_supports also checks that the OS saves the AVX / AVX-512 register state (XCR0).
  __builtin_cpu_init();
  if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")))
    return CpuIsa::Baseline;
  if (!(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq")))
    return CpuIsa::Avx2;
  if (!__builtin_cpu_supports("avx512bf16")) return CpuIsa::Avx512;
  return CpuIsa::Avx512Bf16;
#else
  return CpuIsa::Baseline;
#endif
}

CpuIsa initial_cap() {
  const char* env = std::getenv("QPEFT_CPU_ISA");
  CpuIsa cap = CpuIsa::Avx512Bf16;
  if (env != nullptr && *env != '\0' && !parse_cpu_isa(env, &cap)) cap = CpuIsa::Baseline;  // unknown: safest
  return cap;
}

std::atomic<int>& cap_level() {
  static std::atomic<int> cap{static_cast<int>(initial_cap())};
  return cap;
}

}  // namespace

const char* cpu_isa_name(CpuIsa isa) { return kNames[static_cast<int>(isa)]; }

bool parse_cpu_isa(const char* name, CpuIsa* out) {
  for (int i = 0; i < kCpuIsaCount; ++i) {
    if (std::strcmp(name, kNames[i]) == 0) {
      *out = static_cast<CpuIsa>(i);
      return true;
    }
  }
  return false;
}

CpuIsa detected_cpu_isa() {
  static const CpuIsa detected = detect();
  return detected;
}

CpuIsa cpu_isa() {
  const int cap = cap_level().load(std::memory_order_relaxed);
  const int detected = static_cast<int>(detected_cpu_isa());
  return static_cast<CpuIsa>(cap < detected ? cap : detected);
}

CpuIsa set_cpu_isa_cap(CpuIsa cap) { return static_cast<CpuIsa>(cap_level().exchange(static_cast<int>(cap))); }

}  // namespace qpeft::cpu
