/* The decode step for AVX-512 (F, BW, DQ, VL) with VNNI: forward.h compiled for that target. Only called when
 * native.c's CPU check passes; the rest of the library stays baseline x86-64. */
#if defined(__x86_64__) || defined(_M_X64)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c"))), \
                             apply_to = function)
#else
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")
#endif
#define NS_AVX512 1
#include "forward.h"
#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif
