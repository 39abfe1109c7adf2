// One binary for every x86-64: hot loops are compiled twice and the loader picks the AVX2+FMA clone
// when the CPU has it (GCC function multiversioning), so no -march flag ties the wheel to one machine.
#pragma once
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ZFK_VECTORIZED __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define ZFK_VECTORIZED
#endif
