// Run-time choice of SIMD code for the portable CPU kernels (no -march flags at build time).
//
// QPEFT_CPU_MULTIVERSION(ret, name, (params), (args)) defines `ret name(params)`, which runs `name##_impl(args)`
// (a QPEFT_CPU_INLINE function written in plain C++) compiled once per level: AVX-512 (F/BW/VL/DQ), AVX2 + FMA,
// baseline, picked by cpu_isa() (cpu_isa.h) on each call, so the auto-vectorizer produces each level's code from
// one loop and a cap (QPEFT_CPU_ISA, set_cpu_isa) selects a lower one. Where the SIMD levels are not built
// (QPEFT_X86_SIMD unset: other architectures or compilers) only the baseline is.
#pragma once

#include "cpu_isa.h"

#if defined(QPEFT_X86_SIMD)
#define QPEFT_CPU_MULTIVERSION(ret, name, params, args)                                           \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) static ret name##_avx512 params { \
    return name##_impl args;                                                                      \
  }                                                                                               \
  __attribute__((target("avx2,fma"))) static ret name##_avx2 params { return name##_impl args; }  \
  static ret name##_baseline params { return name##_impl args; }                                  \
  ret name params {                                                                               \
    if (::qpeft::cpu::cpu_has(::qpeft::cpu::CpuIsa::Avx512)) return name##_avx512 args;           \
    if (::qpeft::cpu::cpu_has(::qpeft::cpu::CpuIsa::Avx2)) return name##_avx2 args;               \
    return name##_baseline args;                                                                  \
  }
#else
#define QPEFT_CPU_MULTIVERSION(ret, name, params, args) \
  ret name params { return name##_impl args; }
#endif

// For the _impl functions of QPEFT_CPU_MULTIVERSION and their helpers: inlined into each level's version, so each
// is vectorized for it.
#if defined(__GNUC__) || defined(__clang__)
#define QPEFT_CPU_INLINE inline __attribute__((always_inline))
#else
#define QPEFT_CPU_INLINE inline
#endif

// Keeps GCC from "vectorizing" a table-lookup loop: with no gather instruction in the baseline ISA it would build
// the vectors lane by lane through the stack, slower than the scalar loop (dequantize_4bit_tile).
#if defined(__GNUC__) && !defined(__clang__)
#define QPEFT_NO_AUTOVEC __attribute__((optimize("no-tree-vectorize")))
#else
#define QPEFT_NO_AUTOVEC
#endif
