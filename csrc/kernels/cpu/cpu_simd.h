// Run-time choice of SIMD code for the portable CPU kernels (no -march flags at build time).
//
// QPEFT_CPU_CLONES on a function compiles it once per instruction set (AVX-512F, AVX2, baseline) and lets the
// loader pick the best one the CPU has (GCC/Clang target_clones through an ifunc: x86-64 Linux). Inline helpers
// called from such a function are compiled into every clone, so one loop written in plain C++ is vectorized for
// each. Elsewhere (other architectures, compilers without ifunc) it expands to nothing: the baseline build.
#pragma once

#if (defined(__x86_64__) || defined(__i386__)) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define QPEFT_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define QPEFT_CPU_CLONES
#endif

// For the inline helpers of a QPEFT_CPU_CLONES function: inlined into each clone, so each is vectorized for it.
#if defined(__GNUC__) || defined(__clang__)
#define QPEFT_CPU_INLINE inline __attribute__((always_inline))
#else
#define QPEFT_CPU_INLINE inline
#endif

// Keeps GCC from "vectorizing" a table-lookup loop: with no gather instruction in the baseline ISA it builds the
// vectors lane by lane through the stack, measured 2.5x slower than the scalar loop (dequantize_4bit_tile).
#if defined(__GNUC__) && !defined(__clang__)
#define QPEFT_NO_AUTOVEC __attribute__((optimize("no-tree-vectorize")))
#else
#define QPEFT_NO_AUTOVEC
#endif
