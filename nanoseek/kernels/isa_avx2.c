/* The decode step for AVX2 + FMA: forward.h compiled for that target (called only when the CPU has them). */
#if defined(__x86_64__) || defined(_M_X64)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC target("avx2,fma,f16c")
#endif
#define NS_AVX2 1
#include "forward.h"
#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif
