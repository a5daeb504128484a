// YAQA_VECTOR_CLONES: compile a function for AVX2 and for baseline x86-64, the version chosen when the library
// loads (GCC function multi-versioning); nothing elsewhere.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define YAQA_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define YAQA_VECTOR_CLONES
#endif
