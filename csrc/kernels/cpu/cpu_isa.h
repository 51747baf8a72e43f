// The instruction-set level the CPU kernels run at, chosen once at run time from what the CPU and OS report
// (portable build: no -march flags). A cap lowers it: QPEFT_CPU_ISA=<name> at start-up, or set_cpu_isa_cap
// (tests run every level the machine has). Levels are ordered; each implies the ones below it.
#pragma once

// The x86 SIMD kernels are built where their target regions compile: x86 with GCC (`#pragma GCC target`).
// Elsewhere every level above baseline is reported unsupported.
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__clang__)
#define QPEFT_X86_SIMD 1
#endif

namespace qpeft::cpu {

enum class CpuIsa : int {
  Baseline = 0,    // x86-64 baseline (SSE2) or any other architecture: portable C++
  Avx2 = 1,        // AVX2 + FMA + F16C
  Avx512 = 2,      // AVX-512 F, BW, VL, DQ
  Avx512Bf16 = 3,  // + AVX512_BF16 (vdpbf16ps, vcvtneps2bf16)
};
constexpr int kCpuIsaCount = 4;

const char* cpu_isa_name(CpuIsa isa);
// The level's name parsed ("baseline", "avx2", "avx512", "avx512_bf16"); false for an unknown name.
bool parse_cpu_isa(const char* name, CpuIsa* out);

// The best level this CPU and OS support.
CpuIsa detected_cpu_isa();
// The level the kernels use: min(detected, cap).
CpuIsa cpu_isa();
inline bool cpu_has(CpuIsa level) { return static_cast<int>(cpu_isa()) >= static_cast<int>(level); }
// Caps the level (a level above the detected one leaves the detected one); returns the previous cap.
CpuIsa set_cpu_isa_cap(CpuIsa cap);

}  // namespace qpeft::cpu
