/* The decode step of the absorbed-MLA engine, compiled once per instruction set: isa_avx512.c and isa_avx2.c define
 * NS_AVX512 / NS_AVX2 and a target pragma before including this file, isa_generic.c neither (portable C).
 *
 * Per layer, for M tokens (s new tokens for each of n slots; token m is slot m / s at position lens[m / s] + m % s):
 *   h      = RMSNorm(x)                                     [M, D]
 *   a      = h W_qkv^T = [q_a ; c_kv ; k_pe]                [M, q_lora_rank + c + r]   (one projection)
 *   q      = RMSNorm(q_a) W_qb^T                            [M, H, nope + r]          (or q straight from a)
 *   cache[slot, pos] = [RMSNorm(c_kv) ; RoPE(k_pe)]         the engine's latent row, written in place (paged: row
 *                                                            pos % bs of block block_table[slot][pos / bs])
 *   q_lat  = q_nope W_UK[h]                                 [M, H, c]
 *   p      = softmax(([q_lat ; RoPE(q_pe)] . cache[slot, 0..pos]) * softmax_scale)   fp32, the slot's own length
 *   o      = (p . kv_cache) W_UV[h]^T                       [M, H, v]
 *   x     += o W_o^T
 *   x     += FFN(RMSNorm(x)): SwiGLU, or DeepSeekMoE (shared experts + the top-k routed experts, weighted)
 * then logits = RMSNorm(x) lm_head^T. W_UK and W_UV are projections per head over all M tokens (read once a step).
 * Every loop over tokens, heads or output rows is split into tasks for the thread pool (jobs under ns_par_min
 * multiply-adds stay on the calling thread).
 *
 * Projections y = x W^T read W [n, k] row-major in place (rows in blocks of NR, tokens in blocks of MR, so a block
 * of weight rows is read once per MR tokens). int8 / int4 weights take activations quantised once per input row,
 * in blocks of 32 like llama.cpp's q8_0 (x ~= q * d, q int8, one d per 32 inputs), and integer dot products:
 *   int8: y[n] = scale[n] * sum_b d_b * sum_{k in b} q_x[k] q_w[n, k]
 *   int4: y[n] = sum_b (s[n,b] d_b * sum_{k in b} q_x[k] code[n, k] + (z[n,b] - 8 s[n,b]) * d_b * sum_{k in b} q_x[k])
 * with AVX-512 VNNI (vpdpbusd), AVX2 (vpmaddubsw) or scalar C. See docs/kernels.md. */
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "native.h"

#if defined(NS_AVX512) || defined(NS_AVX2)
#include <immintrin.h>
#endif

#if defined(NS_AVX512)
#define NS_FN(name) name##_avx512
#define MR 4 /* tokens per register block */
#elif defined(NS_AVX2)
#define NS_FN(name) name##_avx2
#define MR 2
#else
#define NS_FN(name) name##_generic
#define MR 4
#endif
#define NR 4 /* weight rows per register block */
/* profiling (ns_profile): the time since the last mark goes to phase i */
#define PROF(md, i)                                                                                                \
    do {                                                                                                           \
        if ((md)->profile) {                                                                                       \
            double now_ = ns_now();                                                                                \
            (md)->prof[i] += now_ - (md)->prof_t, (md)->prof_t = now_;                                             \
        }                                                                                                          \
    } while (0)
#define INLINE static inline __attribute__((always_inline))

/* --- operands ----------------------------------------------------------------------------------------------------- */
typedef struct {
    int m, k;             /* rows (tokens), inputs */
    const float *x;       /* fp32 rows [.., ldx] */
    int ldx;
    const int8_t *q;      /* quantised rows [.., ldq] (ldq: k rounded up to 64, zero-padded) */
    const float *d, *xs;  /* [.., ldq / 4]: per block of 32, its scale d and d * sum(q) / 8, 8 copies each */
    int ldq;
    const int32_t *idx;   /* row i is buffer row idx[i] (NULL: row i) */
} act_t;

typedef struct {
    float *y;             /* y[row, col]: row idx[i] (or i), col = the weight row */
    int ldy;
    const int32_t *idx;
    const float *alpha;   /* y (+)= alpha[i] * (x W^T)[i] (NULL: 1) */
    int accumulate;
} out_t;

INLINE int row_of(const act_t *a, int i) { return a->idx ? a->idx[i] : i; }

INLINE void store(const out_t *o, int m0, int mr, int n0, int nr, float res[MR][NR]) {
    for (int j = 0; j < mr; j++) {
        float *y = o->y + (size_t)(o->idx ? o->idx[m0 + j] : m0 + j) * o->ldy + n0;
        float al = o->alpha ? o->alpha[m0 + j] : 1.0f;
        for (int i = 0; i < nr; i++) y[i] = o->accumulate ? y[i] + al * res[j][i] : al * res[j][i];
    }
}

INLINE float bf16(uint16_t b) {
    union { uint32_t u; float f; } v = {(uint32_t)b << 16};
    return v.f;
}

/* Sums of 4 accumulators (4 weight rows, one token) -> [sum a0, sum a1, sum a2, sum a3], written to out[0..3]: one
 * shuffle tree instead of 4 horizontal reductions (with short rows, e.g. 80-float cache rows, they cost as much
 * as the multiply-adds) */
#if defined(NS_AVX512)
INLINE void hsum4(__m512 a0, __m512 a1, __m512 a2, __m512 a3, float *out) {
    __m512 t01 = _mm512_add_ps(_mm512_shuffle_f32x4(a0, a1, 0x44), _mm512_shuffle_f32x4(a0, a1, 0xee));
    __m512 t23 = _mm512_add_ps(_mm512_shuffle_f32x4(a2, a3, 0x44), _mm512_shuffle_f32x4(a2, a3, 0xee));
    __m512 u = _mm512_add_ps(_mm512_shuffle_f32x4(t01, t23, 0x88), _mm512_shuffle_f32x4(t01, t23, 0xdd));
    u = _mm512_add_ps(u, _mm512_permute_ps(u, 0x4e)); /* 128-bit lane i now holds a_i's 4 partial sums: add them */
    u = _mm512_add_ps(u, _mm512_permute_ps(u, 0xb1));
    const __m512i first = _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0);
    _mm_storeu_ps(out, _mm512_castps512_ps128(_mm512_permutexvar_ps(first, u)));
}

INLINE float hsum(__m512 a) { return _mm512_reduce_add_ps(a); }
#elif defined(NS_AVX2)
INLINE void hsum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3, float *out) {
    __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)));
}

INLINE float hsum(__m256 a) {
    __m128 v = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    return _mm_cvtss_f32(_mm_add_ss(v, _mm_movehdup_ps(v)));
}

#endif

#if defined(NS_AVX512) || defined(NS_AVX2)
/* res[j][i] = the sum of acc[i][j] (hsum4: four rows' sums at once) */
#define REDUCE(acc, NRR, MRR, res)                                                                                 \
    do {                                                                                                           \
        for (int j = 0; j < (MRR); j++) {                                                                          \
            if ((NRR) == 4)                                                                                        \
                hsum4(acc[0][j], acc[1][j], acc[2][j], acc[3][j], res[j]);                                         \
            else                                                                                                   \
                for (int i = 0; i < (NRR); i++) res[j][i] = hsum(acc[i][j]);                                       \
        }                                                                                                          \
    } while (0)
#endif

/* --- fp32 --------------------------------------------------------------------------------------------------------- */
/* res[j][i] = W[row i] . x[token j] over k inputs, for NRR rows and MRR tokens (compile-time counts). */
/* Each kernel also prefetches pf bytes ahead of every row it reads: the same offset in the next block of rows. The
 * hardware prefetchers track streams within 4 KiB pages and lose them at every new block of short rows (int8 rows
 * of 1024 inputs: 1 KiB); measured on the 0.54B config: int8 batch-1 decode 17 -> 11 ms a step. */
#if defined(NS_AVX512) || defined(NS_AVX2)
#define PREFETCH(p) _mm_prefetch((const char *)(p), _MM_HINT_T0)
#endif

INLINE void kern_f32(const float *w, int k, const float *const *xr, int NRR, int MRR, float res[MR][NR], size_t pf) {
#if defined(NS_AVX512)
    __m512 acc[NR][MR];
    for (int i = 0; i < NRR; i++)
        for (int j = 0; j < MRR; j++) acc[i][j] = _mm512_setzero_ps();
    int kk = 0;
    for (; kk + 16 <= k; kk += 16) {
        __m512 xv[MR];
        for (int j = 0; j < MRR; j++) xv[j] = _mm512_loadu_ps(xr[j] + kk);
        for (int i = 0; i < NRR; i++) {
            PREFETCH((const char *)(w + (size_t)i * k + kk) + pf);
            __m512 wv = _mm512_loadu_ps(w + (size_t)i * k + kk);
            for (int j = 0; j < MRR; j++) acc[i][j] = _mm512_fmadd_ps(wv, xv[j], acc[i][j]);
        }
    }
    if (kk < k) {
        __mmask16 mk = (__mmask16)((1u << (k - kk)) - 1);
        __m512 xv[MR];
        for (int j = 0; j < MRR; j++) xv[j] = _mm512_maskz_loadu_ps(mk, xr[j] + kk);
        for (int i = 0; i < NRR; i++) {
            __m512 wv = _mm512_maskz_loadu_ps(mk, w + (size_t)i * k + kk);
            for (int j = 0; j < MRR; j++) acc[i][j] = _mm512_fmadd_ps(wv, xv[j], acc[i][j]);
        }
    }
    REDUCE(acc, NRR, MRR, res);
#elif defined(NS_AVX2)
    __m256 acc[NR][MR];
    for (int i = 0; i < NRR; i++)
        for (int j = 0; j < MRR; j++) acc[i][j] = _mm256_setzero_ps();
    int kk = 0;
    for (; kk + 8 <= k; kk += 8) {
        __m256 xv[MR];
        for (int j = 0; j < MRR; j++) xv[j] = _mm256_loadu_ps(xr[j] + kk);
        for (int i = 0; i < NRR; i++) {
            if (!(kk & 15)) PREFETCH((const char *)(w + (size_t)i * k + kk) + pf);
            __m256 wv = _mm256_loadu_ps(w + (size_t)i * k + kk);
            for (int j = 0; j < MRR; j++) acc[i][j] = _mm256_fmadd_ps(wv, xv[j], acc[i][j]);
        }
    }
    REDUCE(acc, NRR, MRR, res);
    for (int i = 0; i < NRR; i++) /* the last k % 8 inputs */
        for (int j = 0; j < MRR; j++)
            for (int t = kk; t < k; t++) res[j][i] += w[(size_t)i * k + t] * xr[j][t];
#else
    (void)pf;
    for (int i = 0; i < NRR; i++)
        for (int j = 0; j < MRR; j++) {
            float part[8] = {0};  /* eight partial sums: vectorisable without reassociating a single sum */
            const float *wi = w + (size_t)i * k, *x = xr[j];
            int kk = 0;
            for (; kk + 8 <= k; kk += 8)
                for (int u = 0; u < 8; u++) part[u] += wi[kk + u] * x[kk + u];
            float r = ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
            for (; kk < k; kk++) r += wi[kk] * x[kk];
            res[j][i] = r;
        }
#endif
}

/* --- int8 (per output channel) x q8 activations ------------------------------------------------------------------- */
INLINE void kern_q8(const int8_t *w, int k, const int8_t *const *xq, const float *const *xd, int NRR, int MRR,
                    float res[MR][NR], size_t pf) {
#if defined(NS_AVX512)
    /* 64 inputs = 2 blocks a step. vpdpbusd multiplies unsigned by signed bytes: |w| by x with w's sign moved onto
     * x (both within +-127, so no overflow); lanes 0-7 sum block b, lanes 8-15 block b + 1 */
    __m512 acc[NR][MR];
    for (int i = 0; i < NRR; i++)
        for (int j = 0; j < MRR; j++) acc[i][j] = _mm512_setzero_ps();
    const __m512i zero = _mm512_setzero_si512();
    for (int kk = 0; kk < k; kk += 64) {
        __mmask64 mk = k - kk >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (k - kk)) - 1);
        __m512i xv[MR];
        __m512 dv[MR];
        for (int j = 0; j < MRR; j++) {
            xv[j] = _mm512_loadu_si512(xq[j] + kk);
            dv[j] = _mm512_loadu_ps(xd[j] + kk / 4);
        }
        for (int i = 0; i < NRR; i++) {
            PREFETCH(w + (size_t)i * k + kk + pf);
            __m512i wv = _mm512_maskz_loadu_epi8(mk, w + (size_t)i * k + kk);
            __m512i aw = _mm512_abs_epi8(wv);
            __mmask64 neg = _mm512_movepi8_mask(wv);
            for (int j = 0; j < MRR; j++) {
                __m512i xs = _mm512_mask_sub_epi8(xv[j], neg, zero, xv[j]);
                __m512i dot = _mm512_dpbusd_epi32(zero, aw, xs);
                acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), dv[j], acc[i][j]);
            }
        }
    }
    REDUCE(acc, NRR, MRR, res);
#elif defined(NS_AVX2)
    /* one block of 32 a step: vpmaddubsw (|w| unsigned x signed x, pairs summed to int16: <= 2*127*127, no
     * saturation) then vpmaddwd by ones to int32 */
    __m256 acc[NR][MR];
    for (int i = 0; i < NRR; i++)
        for (int j = 0; j < MRR; j++) acc[i][j] = _mm256_setzero_ps();
    const __m256i ones = _mm256_set1_epi16(1);
    for (int kk = 0; kk < k; kk += 32) {
        __m256i xv[MR];
        __m256 dv[MR];
        for (int j = 0; j < MRR; j++) {
            xv[j] = _mm256_loadu_si256((const __m256i *)(xq[j] + kk));
            dv[j] = _mm256_loadu_ps(xd[j] + kk / 4);
        }
        for (int i = 0; i < NRR; i++) {
            __m256i wv;
            if (!(kk & 63)) PREFETCH(w + (size_t)i * k + kk + pf);
            if (k - kk >= 32) {
                wv = _mm256_loadu_si256((const __m256i *)(w + (size_t)i * k + kk));
            } else { /* a short last block: never read past the row */
                int8_t tmp[32] = {0};
                memcpy(tmp, w + (size_t)i * k + kk, k - kk);
                wv = _mm256_loadu_si256((const __m256i *)tmp);
            }
            __m256i aw = _mm256_sign_epi8(wv, wv);
            for (int j = 0; j < MRR; j++) {
                __m256i p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv[j], wv));
                __m256i dot = _mm256_madd_epi16(p, ones);
                acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), dv[j], acc[i][j]);
            }
        }
    }
    REDUCE(acc, NRR, MRR, res);
#else
    (void)pf;
    for (int i = 0; i < NRR; i++)
        for (int j = 0; j < MRR; j++) {
            const int8_t *wi = w + (size_t)i * k;
            float r = 0;
            for (int kk = 0; kk < k; kk += 32) {
                int32_t dot = 0;
                int end = k - kk < 32 ? k - kk : 32;
                for (int t = 0; t < end; t++) dot += (int32_t)wi[kk + t] * xq[j][kk + t];
                r += (float)dot * xd[j][kk / 4];
            }
            res[j][i] = r;
        }
#endif
}

/* --- int4 (groups of 32, asymmetric) x q8 activations ------------------------------------------------------------- */
#if defined(NS_AVX512)
/* two bf16 values (consecutive blocks) -> [first x 8 lanes, second x 8 lanes] as fp32: one vpermw puts each into
 * the high half of its lanes and zeroes the low halves (the broadcast-shift-and it replaces took 3-4 ops) */
INLINE __m512 bf16_pair(const uint16_t *p, int two) {
    uint32_t u = p[0]; /* the second block's value only when it exists (the last block of an odd count has none) */
    if (two) memcpy(&u, p, 4);
    const __m512i idx = _mm512_set_epi16(1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
                                         0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
    __m512i v = _mm512_castsi128_si512(_mm_cvtsi32_si128((int)u));
    return _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(0xaaaaaaaau, idx, v));
}

/* four bf16 values (blocks b..b+3) -> [v0 x 4 lanes, v1 x 4, v2 x 4, v3 x 4] as fp32 */
INLINE __m512 bf16_quad(const uint16_t *p) {
    const __m512i idx = _mm512_set_epi16(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2,
                                         1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    __m512i v = _mm512_castsi128_si512(_mm_loadl_epi64((const __m128i *)p));
    return _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(0xaaaaaaaau, idx, v));
}
#endif

INLINE void kern_q4(const uint8_t *w, const uint16_t *s4, const uint16_t *z4, int k, const int8_t *const *xq,
                    const float *const *xd, const float *const *xs, int NRR, int MRR, float res[MR][NR], size_t pf) {
    const int nb = k / 32; /* blocks per row */
#if defined(NS_AVX512)
    __m512 acc[NR][MR];
    for (int i = 0; i < NRR; i++)
        for (int j = 0; j < MRR; j++) acc[i][j] = _mm512_setzero_ps();
    const __m512i zero = _mm512_setzero_si512();
    int b = 0;
    /* 4 blocks (128 inputs, 64 bytes of codes) a step: the low nibbles of the 64 bytes are the first 16 codes of each
     * block, the high nibbles the last 16, so that one dpbusd of each against the activation's matching 16-byte
     * lanes (shuffled once per token, shared by every row) sums each block into 4 int32 lanes: half the vector ops
     * per weight of the 2-block step below, which only takes the last 1-3 blocks of a row */
    const __m512i low4 = _mm512_set1_epi8(0x0f);
    const __m512i idx4 = _mm512_set_epi32(24, 24, 24, 24, 16, 16, 16, 16, 8, 8, 8, 8, 0, 0, 0, 0);
    for (; b + 4 <= nb; b += 4) {
        __m512i xlo[MR], xhi[MR];
        __m512 dv[MR], sv[MR];
        for (int j = 0; j < MRR; j++) {
            __m512i x0 = _mm512_loadu_si512(xq[j] + b * 32), x1 = _mm512_loadu_si512(xq[j] + b * 32 + 64);
            xlo[j] = _mm512_shuffle_i64x2(x0, x1, _MM_SHUFFLE(2, 0, 2, 0));
            xhi[j] = _mm512_shuffle_i64x2(x0, x1, _MM_SHUFFLE(3, 1, 3, 1));
            dv[j] = _mm512_permutex2var_ps(_mm512_loadu_ps(xd[j] + b * 8), idx4, _mm512_loadu_ps(xd[j] + b * 8 + 16));
            sv[j] = _mm512_mul_ps(_mm512_set1_ps(2.0f), /* each block's term now lands in 4 lanes, not 8 */
                                  _mm512_permutex2var_ps(_mm512_loadu_ps(xs[j] + b * 8), idx4,
                                                         _mm512_loadu_ps(xs[j] + b * 8 + 16)));
        }
        for (int i = 0; i < NRR; i++) {
            const uint8_t *wp = w + (size_t)i * nb * 16 + b * 16;
            PREFETCH(wp + pf);
            __m512i raw = _mm512_loadu_si512(wp);
            __m512i lo = _mm512_and_si512(raw, low4), hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4);
            __m512 scale = bf16_quad(s4 + (size_t)i * nb + b), zv = bf16_quad(z4 + (size_t)i * nb + b);
            __m512 mn = _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), scale, zv);
            for (int j = 0; j < MRR; j++) {
                __m512i dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, lo, xlo[j]), hi, xhi[j]);
                acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(scale, dv[j]), acc[i][j]);
                acc[i][j] = _mm512_fmadd_ps(mn, sv[j], acc[i][j]);
            }
        }
    }
    const __m256i low = _mm256_set1_epi8(0x0f);
    for (; b < nb; b += 2) {
        int two = b + 1 < nb;
        __m512i xv[MR];
        __m512 dv[MR], sv[MR];
        for (int j = 0; j < MRR; j++) {
            xv[j] = _mm512_loadu_si512(xq[j] + b * 32);
            dv[j] = _mm512_loadu_ps(xd[j] + b * 8);
            sv[j] = _mm512_loadu_ps(xs[j] + b * 8);
        }
        for (int i = 0; i < NRR; i++) {
            const uint8_t *wp = w + (size_t)i * nb * 16 + b * 16;
            if (!(b & 3)) PREFETCH(wp + pf);
            __m256i raw = two ? _mm256_loadu_si256((const __m256i *)wp)
                              : _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)wp));
            __m256i lo = _mm256_and_si256(raw, low), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
            /* [lo0 hi0 lo1 hi1] (128-bit lanes): block b's 32 codes in order, then block b + 1's */
            __m512i codes = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
            codes = _mm512_shuffle_i64x2(codes, codes, _MM_SHUFFLE(3, 1, 2, 0));
            if (!two) codes = _mm512_maskz_mov_epi8(0xffffffffull, codes);
            __m512 scale = bf16_pair(s4 + (size_t)i * nb + b, two), zv = bf16_pair(z4 + (size_t)i * nb + b, two);
            __m512 mn = _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), scale, zv); /* z - 8 s: the weight at code 0 */
            for (int j = 0; j < MRR; j++) {
                __m512i dot = _mm512_dpbusd_epi32(zero, codes, xv[j]);
                acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(scale, dv[j]), acc[i][j]);
                acc[i][j] = _mm512_fmadd_ps(mn, sv[j], acc[i][j]);
            }
        }
    }
    REDUCE(acc, NRR, MRR, res);
#elif defined(NS_AVX2)
    __m256 acc[NR][MR];
    for (int i = 0; i < NRR; i++)
        for (int j = 0; j < MRR; j++) acc[i][j] = _mm256_setzero_ps();
    const __m256i ones = _mm256_set1_epi16(1);
    const __m128i low = _mm_set1_epi8(0x0f);
    for (int b = 0; b < nb; b++) {
        __m256i xv[MR];
        __m256 dv[MR], sv[MR];
        for (int j = 0; j < MRR; j++) {
            xv[j] = _mm256_loadu_si256((const __m256i *)(xq[j] + b * 32));
            dv[j] = _mm256_loadu_ps(xd[j] + b * 8);
            sv[j] = _mm256_loadu_ps(xs[j] + b * 8);
        }
        for (int i = 0; i < NRR; i++) {
            if (!(b & 3)) PREFETCH(w + (size_t)i * nb * 16 + b * 16 + pf);
            __m128i raw = _mm_loadu_si128((const __m128i *)(w + (size_t)i * nb * 16 + b * 16));
            __m256i codes = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), low), _mm_and_si128(raw, low));
            float s = bf16(s4[(size_t)i * nb + b]), z = bf16(z4[(size_t)i * nb + b]);
            __m256 scale = _mm256_set1_ps(s), mn = _mm256_set1_ps(z - 8.0f * s);
            for (int j = 0; j < MRR; j++) {
                __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(codes, xv[j]), ones); /* codes <= 15: exact */
                acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(scale, dv[j]), acc[i][j]);
                acc[i][j] = _mm256_fmadd_ps(mn, sv[j], acc[i][j]);
            }
        }
    }
    REDUCE(acc, NRR, MRR, res);
#else
    (void)pf;
    for (int i = 0; i < NRR; i++)
        for (int j = 0; j < MRR; j++) {
            float r = 0;
            for (int b = 0; b < nb; b++) {
                const uint8_t *wp = w + (size_t)i * nb * 16 + b * 16;
                const int8_t *x = xq[j] + b * 32;
                int32_t dot = 0;
                for (int t = 0; t < 16; t++) dot += (wp[t] & 15) * x[t] + (wp[t] >> 4) * x[t + 16];
                float s = bf16(s4[(size_t)i * nb + b]), z = bf16(z4[(size_t)i * nb + b]);
                r += (float)dot * (s * xd[j][b * 8]) + (z - 8.0f * s) * (8.0f * xs[j][b * 8]);
            }
            res[j][i] = r;
        }
#endif
}

/* --- one projection over output rows [n0, n1) -------------------------------------------------------------------- */
#define DISPATCH_NR_MR(call)                                                                                       \
    do {                                                                                                           \
        if (nr == NR) {                                                                                            \
            switch (mr) {                                                                                          \
            case 1: call(NR, 1); break;                                                                            \
            case 2: call(NR, 2); break;                                                                            \
            MR_CASES(NR)                                                                                           \
            }                                                                                                      \
        } else {                                                                                                   \
            switch (mr) {                                                                                          \
            case 1: call(1, 1); break;                                                                             \
            case 2: call(1, 2); break;                                                                             \
            MR_CASES(1)                                                                                            \
            }                                                                                                      \
        }                                                                                                          \
    } while (0)
#if MR == 4
#define MR_CASES(R) case 3: CALL(R, 3); break; case 4: CALL(R, 4); break;
#else
#define MR_CASES(R)
#endif

/* Prefetch distance: at least PF_MIN bytes ahead, so that a DRAM miss (~100 ns) is covered even when a block of
 * rows is short and quick (int4 rows of 1024 inputs: 2 KiB a block of 4); any distance touches every line once. */
static inline size_t pf_bytes(size_t block) { return block > (size_t)ns_prefetch_min ? block : (size_t)ns_prefetch_min; }

/* pf_to: 0, or (fp32 weights) the prefetch distance in bytes to use instead of pf_bytes: the attention's scores
 * read the cache one block of rows at a time and prefetch the same rows of the slot's next block. */
static void mm_rows_pf(const act_t *a, const ns_weight *w, int n0, int n1, const out_t *o, ptrdiff_t pf_to) {
    const int k = w->k;
    for (int n = n0; n < n1;) {
        int nr = n1 - n >= NR ? NR : 1; /* blocks of NR rows, then single rows */
        for (int m = 0; m < a->m; m += MR) {
            int mr = a->m - m < MR ? a->m - m : MR;
            float res[MR][NR] = {{0}};
            if (w->type == NS_F32) {
                const float *xr[MR];
                for (int j = 0; j < mr; j++) xr[j] = a->x + (size_t)row_of(a, m + j) * a->ldx;
                const float *wp = (const float *)w->w + (size_t)n * k;
#define CALL(R, C) kern_f32(wp, k, xr, R, C, res, pf_to ? (size_t)pf_to : pf_bytes((size_t)nr * k * 4))
                DISPATCH_NR_MR(CALL);
#undef CALL
            } else {
                const int8_t *xq[MR];
                const float *xd[MR], *xs[MR];
                for (int j = 0; j < mr; j++) {
                    size_t r = (size_t)row_of(a, m + j);
                    xq[j] = a->q + r * a->ldq, xd[j] = a->d + r * (a->ldq / 4), xs[j] = a->xs + r * (a->ldq / 4);
                }
                if (w->type == NS_INT8) {
                    const int8_t *wp = (const int8_t *)w->w + (size_t)n * k;
#define CALL(R, C) kern_q8(wp, k, xq, xd, R, C, res, pf_bytes((size_t)nr * k))
                    DISPATCH_NR_MR(CALL);
#undef CALL
                    for (int i = 0; i < nr; i++)
                        for (int j = 0; j < mr; j++) res[j][i] *= w->scale[n + i];
                } else {
                    const uint8_t *wp = (const uint8_t *)w->w + (size_t)n * (k / 2);
                    const uint16_t *sp = w->s4 + (size_t)n * (k / 32), *zp = w->z4 + (size_t)n * (k / 32);
#define CALL(R, C) kern_q4(wp, sp, zp, k, xq, xd, xs, R, C, res, pf_bytes((size_t)nr * k / 2))
                    DISPATCH_NR_MR(CALL);
#undef CALL
                }
            }
            store(o, m, mr, n, nr, res);
        }
        n += nr;
    }
}

static void mm_rows(const act_t *a, const ns_weight *w, int n0, int n1, const out_t *o) {
    mm_rows_pf(a, w, n0, n1, o, 0);
}

/* --- activations -------------------------------------------------------------------------------------------------- */
/* Quantise rows [r0, r1) of x [.., ldx] (k inputs) into the q8 buffers at the same row index, in blocks of 32:
 * d = max|x| / 127, q = round-half-even(x * (1 / d)) (as torch.round), zero-padded to ldq = k rounded up to 64;
 * and d * sum(q) per block, for int4's zero term: with it an int4 projection equals dequant(q) W_deq^T exactly (the
 * exact sum of x would be further from x W_deq^T, its codes 0..15 weighting the rounding errors unevenly). */
static void quantize_rows(const float *x, int ldx, int k, int r0, int r1, int8_t *q, float *d, float *xs, int ldq) {
    for (int r = r0; r < r1; r++) {
        const float *xr = x + (size_t)r * ldx;
        int8_t *qr = q + (size_t)r * ldq;
        float *dr = d + (size_t)r * (ldq / 4), *sr = xs + (size_t)r * (ldq / 4);
        for (int b = 0; b < ldq / 32; b++) {
            int lo = b * 32, hi = lo + 32 < k ? lo + 32 : k;
            float amax = 0;
            for (int t = lo; t < hi; t++) amax = fabsf(xr[t]) > amax ? fabsf(xr[t]) : amax;
            float dd = amax / 127.0f, id = dd > 0 ? 1.0f / dd : 0.0f;
            int32_t sum = 0;
            for (int t = lo; t < lo + 32; t++) sum += qr[t] = t < hi ? (int8_t)nearbyintf(xr[t] * id) : 0;
            for (int u = 0; u < 8; u++) dr[b * 8 + u] = dd, sr[b * 8 + u] = dd * (float)sum * 0.125f;
        }
    }
}

/* exp, vectorised: n = round(x log2 e), r = x - n ln2 (in two parts), exp(r) by Cephes' expf polynomial, times 2^n.
 * Within ~1 ulp of expf; the softmax over every cached row and SwiGLU's sigmoid spent most of their time in scalar
 * expf calls (on the cpu preset ~1/5 of a quantised batch-1 step was attention, mostly that). */
#if defined(NS_AVX512) || defined(NS_AVX2)
#if defined(NS_AVX512)
typedef __m512 vf;
#define VF_W 16
#define vf_set1 _mm512_set1_ps
#define vf_add _mm512_add_ps
#define vf_mul _mm512_mul_ps
#define vf_div _mm512_div_ps
#define vf_fma _mm512_fmadd_ps
#define vf_fnma _mm512_fnmadd_ps
#define vf_min _mm512_min_ps
#define vf_max _mm512_max_ps
#define vf_load _mm512_loadu_ps
#define vf_store _mm512_storeu_ps
INLINE vf vf_round(vf x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
INLINE vf vf_pow2(vf p, vf n) { return _mm512_scalef_ps(p, n); }
INLINE float vf_sum(vf x) { return _mm512_reduce_add_ps(x); }
#else
typedef __m256 vf;
#define VF_W 8
#define vf_set1 _mm256_set1_ps
#define vf_add _mm256_add_ps
#define vf_mul _mm256_mul_ps
#define vf_div _mm256_div_ps
#define vf_fma _mm256_fmadd_ps
#define vf_fnma _mm256_fnmadd_ps
#define vf_min _mm256_min_ps
#define vf_max _mm256_max_ps
#define vf_load _mm256_loadu_ps
#define vf_store _mm256_storeu_ps
INLINE vf vf_round(vf x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
INLINE vf vf_pow2(vf p, vf n) { /* n in [-126, 127] after the clamp below */
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
INLINE float vf_sum(vf x) {
    __m128 v = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    return _mm_cvtss_f32(_mm_add_ss(v, _mm_movehdup_ps(v)));
}
#endif
INLINE vf vf_exp(vf x) {
    x = vf_max(vf_min(x, vf_set1(88.0f)), vf_set1(-87.0f));
    vf n = vf_round(vf_mul(x, vf_set1(1.44269504088896341f)));
    vf r = vf_fnma(n, vf_set1(0.693359375f), x);
    r = vf_fnma(n, vf_set1(-2.12194440e-4f), r);
    vf p = vf_set1(1.9875691500e-4f);
    p = vf_fma(p, r, vf_set1(1.3981999507e-3f));
    p = vf_fma(p, r, vf_set1(8.3334519073e-3f));
    p = vf_fma(p, r, vf_set1(4.1665795894e-2f));
    p = vf_fma(p, r, vf_set1(1.6666665459e-1f));
    p = vf_fma(p, r, vf_set1(5.0000001201e-1f));
    p = vf_fma(p, vf_mul(r, r), vf_add(r, vf_set1(1.0f)));
    return vf_pow2(p, n);
}
#endif

/* p[t] = exp((p[t] - max) * scale) / sum over t < T, in place (softmax of scale * scores, fp32) */
static void softmax(float *p, int T, float scale) {
    float mx = -INFINITY, sum = 0;
    for (int t = 0; t < T; t++) mx = p[t] > mx ? p[t] : mx;
    int t = 0;
#if defined(NS_AVX512) || defined(NS_AVX2)
    vf acc = vf_set1(0.0f), vmx = vf_set1(mx), vs = vf_set1(scale);
    for (; t + VF_W <= T; t += VF_W) {
        vf e = vf_exp(vf_mul(vf_add(vf_load(p + t), vf_mul(vmx, vf_set1(-1.0f))), vs));
        vf_store(p + t, e);
        acc = vf_add(acc, e);
    }
    sum = vf_sum(acc);
#endif
    for (; t < T; t++) sum += (p[t] = expf((p[t] - mx) * scale));
    float inv = 1.0f / sum;
    for (t = 0; t < T; t++) p[t] *= inv;
}

/* y[i] = silu(g[i]) * u[i] = g / (1 + exp(-g)) * u, n values */
static void swiglu(float *y, const float *g, const float *u, int n) {
    int i = 0;
#if defined(NS_AVX512) || defined(NS_AVX2)
    for (; i + VF_W <= n; i += VF_W) {
        vf gv = vf_load(g + i);
        vf den = vf_add(vf_set1(1.0f), vf_exp(vf_mul(gv, vf_set1(-1.0f))));
        vf_store(y + i, vf_mul(vf_div(gv, den), vf_load(u + i)));
    }
#endif
    for (; i < n; i++) y[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

INLINE float rms_scale(const float *x, int n, float eps) {
    float part[8] = {0};
    int t = 0;
    for (; t + 8 <= n; t += 8)
        for (int u = 0; u < 8; u++) part[u] += x[t + u] * x[t + u];
    float ss = ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
    for (; t < n; t++) ss += x[t] * x[t];
    return 1.0f / sqrtf(ss / (float)n + eps);
}

/* y = RMSNorm(x) * weight, n values */
static void rmsnorm(float *y, const float *x, const float *weight, int n, float eps) {
    float s = rms_scale(x, n, eps);
    for (int t = 0; t < n; t++) y[t] = x[t] * s * weight[t];
}

INLINE float dot(const float *a, const float *b, int n) {
#if defined(NS_AVX512)
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int t = 0;
    for (; t + 32 <= n; t += 32) {
        acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + t), _mm512_loadu_ps(b + t), acc0);
        acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + t + 16), _mm512_loadu_ps(b + t + 16), acc1);
    }
    for (; t < n; t += 16) {
        __mmask16 mk = n - t >= 16 ? 0xffff : (__mmask16)((1u << (n - t)) - 1);
        acc0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, a + t), _mm512_maskz_loadu_ps(mk, b + t), acc0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#else
    float part[8] = {0};
    int t = 0;
    for (; t + 8 <= n; t += 8)
        for (int u = 0; u < 8; u++) part[u] += a[t + u] * b[t + u];
    float r = ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
    for (; t < n; t++) r += a[t] * b[t];
    return r;
#endif
}

/* y += alpha * x, n values */
INLINE void axpy(float *y, float alpha, const float *x, int n) {
    for (int t = 0; t < n; t++) y[t] += alpha * x[t];
}

/* RoPE on one r-dim vector at table row pos: in-place, output half-split [x1 cos - x2 sin ; x2 cos + x1 sin] where
 * (x1, x2) are the interleaved pairs (x0,x1),(x2,x3).. or the halves, as model.apply_rope */
static void rope(float *x, int r, const float *cos, const float *sin, int interleave) {
    float tmp[512];
    int half = r / 2;
    for (int i = 0; i < half; i++) {
        float x1 = interleave ? x[2 * i] : x[i], x2 = interleave ? x[2 * i + 1] : x[i + half];
        tmp[i] = x1 * cos[i] - x2 * sin[i];
        tmp[i + half] = x2 * cos[i] + x1 * sin[i];
    }
    memcpy(x, tmp, sizeof(float) * r);
}

/* --- parallel projections ----------------------------------------------------------------------------------------- */
typedef struct {
    const act_t *a;
    const ns_weight *w;
    const out_t *o;
    int chunk;
} mm_job;

static void mm_task(void *ctx, int t) {
    const mm_job *j = ctx;
    int n0 = t * j->chunk, n1 = n0 + j->chunk < j->w->n ? n0 + j->chunk : j->w->n;
    mm_rows(j->a, j->w, n0, n1, j->o);
}

/* Rows per task: about four tasks per thread (uneven machines balance), multiples of NR, at least 16. */
static int chunk_rows(int n, int nthreads) {
    if (nthreads <= 1) return n;
    int c = (n + nthreads * 4 - 1) / (nthreads * 4);
    c = (c + NR - 1) / NR * NR;
    return c < 16 ? 16 : c;
}

typedef struct {
    ns_model *md;
    int nthreads;
} ctx_t;

/* Threads for a job of `macs` multiply-adds: one below ns_par_min (~50 us of work on one core would not pay for
 * waking and joining another thread; on the cpu preset that leaves ~8 of a step's ~55 jobs threaded). */
static int par(const ctx_t *c, double macs) { return macs < (double)ns_par_min ? 1 : c->nthreads; }

static void project(const ctx_t *c, const act_t *a, const ns_weight *w, const out_t *o) {
    int nt = par(c, (double)a->m * w->n * w->k);
    mm_job j = {a, w, o, chunk_rows(w->n, nt)};
    ns_pool_run(c->md->pool, nt, (w->n + j.chunk - 1) / j.chunk, mm_task, &j);
}

/* An operand over rows of x [m, ldx] with k inputs, quantised into the scratch q8 buffers when w needs it. */
static act_t operand(const ctx_t *c, const float *x, int ldx, int m, int k, int quantise) {
    ns_scratch *s = &c->md->s;
    act_t a = {m, k, x, ldx, s->aq, s->ad, s->axs, (k + 63) & ~63, NULL};
    if (quantise) quantize_rows(x, ldx, k, 0, m, s->aq, s->ad, s->axs, a.ldq);
    return a;
}

/* --- attention ---------------------------------------------------------------------------------------------------- */
static act_t f32_rows(const float *x, int ldx, int m, int k) {
    act_t a = {m, k, x, ldx, NULL, NULL, NULL, 0, NULL};
    return a;
}

typedef struct {
    const ctx_t *c;
    const ns_layer *L;
    int M, s, groups, hg; /* tokens; tokens per slot; head groups per token, heads per group */
    const int64_t *lens;
    const act_t *in;      /* absorb / uv: the per-(token, head) input rows */
} attn_job;

/* q_lat[:, h] = q_nope[:, h] W_UK[h] for all M tokens at once: [M, nope] x [c, nope]^T (W_UK read once a step).
 * j->in holds the rows (m, h) of q_nope (quantised when W_UK is): head h's rows are every H-th. */
static act_t head_rows(const act_t *all, int h, int H) {
    act_t a = *all;
    a.m = all->m / H, a.x += (size_t)h * all->ldx, a.ldx *= H;
    if (a.q) a.q += (size_t)h * all->ldq, a.d += (size_t)h * (all->ldq / 4), a.xs += (size_t)h * (all->ldq / 4), a.ldq *= H;
    return a;
}

static void absorb_task(void *ctx, int h) {
    const attn_job *j = ctx;
    const ns_config *cf = &j->c->md->cfg;
    ns_scratch *s = &j->c->md->s;
    int H = cf->n_heads, lat = cf->kv_lora_rank + cf->rope;
    act_t a = head_rows(j->in, h, H);
    out_t o = {s->qf + (size_t)h * lat, H * lat, NULL, NULL, 0};
    mm_rows(&a, &j->L->w_uk[h], 0, j->L->w_uk[h].n, &o);
}

/* o[:, h] = o_lat[:, h] W_UV[h]^T for all M tokens: [M, c] x [v, c]^T */
static void uv_task(void *ctx, int h) {
    const attn_job *j = ctx;
    const ns_config *cf = &j->c->md->cfg;
    ns_scratch *s = &j->c->md->s;
    int H = cf->n_heads, v = cf->v_head;
    act_t a = head_rows(j->in, h, H);
    out_t o = {s->o + (size_t)h * v, H * v, NULL, NULL, 0};
    mm_rows(&a, &j->L->w_uv[h], 0, v, &o);
}

/* The cached row of position t of a slot (its block table row tab): row t % bs of block tab[t / bs]. */
INLINE const float *cache_row(const float *cache, const int32_t *tab, int bs, int lat, int t) {
    return cache + ((size_t)tab[t / bs] * bs + t % bs) * lat;
}

/* olat[g] = sum_t p[g][t] kv[t][:c] for G <= 4 heads sharing each cached row, over positions 0..T-1 of a slot's
 * paged cache (block table row tab, blocks of bs rows of lat floats); rows in order, as one contiguous pass would */
static void weighted_sum(float *olat, int ldo, const float *p, int ldp, int G, const float *cache,
                         const int32_t *tab, int bs, int lat, int T, int c) {
#if defined(NS_AVX512) || defined(NS_AVX2)
#if defined(NS_AVX512)
#define VW 16
#define VEC __m512
#define VZERO _mm512_setzero_ps()
#define VFMA(a, b, acc) _mm512_fmadd_ps(a, b, acc)
#define VSET1 _mm512_set1_ps
#define VLOAD(p) _mm512_loadu_ps(p)
#define VSTORE(p, v) _mm512_storeu_ps(p, v)
#else
#define VW 8
#define VEC __m256
#define VZERO _mm256_setzero_ps()
#define VFMA(a, b, acc) _mm256_fmadd_ps(a, b, acc)
#define VSET1 _mm256_set1_ps
#define VLOAD(p) _mm256_loadu_ps(p)
#define VSTORE(p, v) _mm256_storeu_ps(p, v)
#endif
    int j0 = 0;
    for (; j0 + VW <= c; j0 += VW) { /* one register-wide column of the latent at a time, over every row */
        VEC acc[4] = {VZERO, VZERO, VZERO, VZERO};
        for (int t0 = 0; t0 < T; t0 += bs) { /* block by block */
            const float *kv = cache_row(cache, tab, bs, lat, t0);
            for (int t = t0; t < T && t < t0 + bs; t++) {
                VEC r = VLOAD(kv + (size_t)(t - t0) * lat + j0);
                for (int g = 0; g < G; g++) acc[g] = VFMA(VSET1(p[(size_t)g * ldp + t]), r, acc[g]);
            }
        }
        for (int g = 0; g < G; g++) VSTORE(olat + (size_t)g * ldo + j0, acc[g]);
    }
    if (j0 < c) {
        for (int g = 0; g < G; g++) memset(olat + (size_t)g * ldo + j0, 0, sizeof(float) * (c - j0));
        for (int t = 0; t < T; t++)
            for (int g = 0; g < G; g++)
                axpy(olat + (size_t)g * ldo + j0, p[(size_t)g * ldp + t], cache_row(cache, tab, bs, lat, t) + j0,
                     c - j0);
    }
#undef VW
#undef VEC
#undef VZERO
#undef VFMA
#undef VSET1
#undef VLOAD
#undef VSTORE
#else
    for (int g = 0; g < G; g++) {
        memset(olat + (size_t)g * ldo, 0, sizeof(float) * c);
        for (int t = 0; t < T; t++)
            axpy(olat + (size_t)g * ldo, p[(size_t)g * ldp + t], cache_row(cache, tab, bs, lat, t), c);
    }
#endif
}

/* One (token, group of <= 4 heads): scores over the slot's cached rows 0..pos (a projection with the cache rows as
 * the weight, one block of rows at a time: each row read once for the group), softmax in fp32, the weighted sum of
 * the latents. */
static void attn_task(void *ctx, int task) {
    const attn_job *j = ctx;
    const ns_model *md = j->c->md;
    const ns_config *cf = &md->cfg;
    ns_scratch *s = &((ns_model *)md)->s;
    int H = cf->n_heads, c = cf->kv_lora_rank, lat = c + cf->rope;
    int m = task / j->groups, h0 = (task % j->groups) * j->hg, G = h0 + j->hg < H ? j->hg : H - h0;
    int slot = m / j->s, T = (int)j->lens[slot] + m % j->s + 1, bs = cf->block_size;
    const int32_t *tab = j->L->block_table + (size_t)slot * cf->max_blocks;
    float *p = s->scores + ((size_t)m * H + h0) * s->t_cap;
    act_t a = f32_rows(s->qf + ((size_t)m * H + h0) * lat, lat, G, lat);
    for (int t0 = 0; t0 < T; t0 += bs) {
        int rows = T - t0 < bs ? T - t0 : bs;
        const float *blk = cache_row(j->L->cache, tab, bs, lat, t0);
        /* the blocks lie anywhere: prefetch the next one's rows, not the memory after this one */
        const float *next = t0 + bs < T ? cache_row(j->L->cache, tab, bs, lat, t0 + bs) : blk;
        ns_weight keys = {NS_F32, rows, lat, 0, blk, NULL, NULL, NULL};
        out_t o = {p + t0, s->t_cap, NULL, NULL, 0};
        mm_rows_pf(&a, &keys, 0, rows, &o, next != blk ? (const char *)next - (const char *)blk : 1);
    }
    for (int g = 0; g < G; g++) softmax(p + (size_t)g * s->t_cap, T, cf->softmax_scale);
    weighted_sum(s->olat + ((size_t)m * H + h0) * c, c, p, s->t_cap, G, j->L->cache, tab, bs, lat, T, c);
}

/* --- feed-forward: dense SwiGLU, or shared + routed experts ------------------------------------------------------- */
typedef struct {
    const ns_weight *gu, *down;
    int start, count;     /* rows start.. of the pair buffers (gu, act) */
    const int32_t *tok;   /* the token of each row (NULL: rows are tokens 0..count-1) */
    const float *weight;  /* routing weight of each row (NULL: 1) */
} expert_t;

typedef struct {
    const ctx_t *c;
    const expert_t *ex;
    int n_ex;
    const int32_t *task_ex, *task_row;  /* task -> (expert, first row of its chunk) */
    int chunk, ldgu;      /* rows per task; the row stride of the gate/up buffer (the widest expert's 2I) */
    const act_t *in;      /* RMSNorm(x) [M, D] (fp32 and, when quantised weights read it, q8) */
    act_t *mid;           /* act [pairs, I] */
} ffn_job;

/* gate and up rows [i0, i0 + chunk) of one expert for its tokens, then act = silu(gate) * up */
static void ffn_up_task(void *ctx, int t) {
    const ffn_job *j = ctx;
    const expert_t *e = &j->ex[j->task_ex[t]];
    ns_scratch *s = &j->c->md->s;
    int inter = e->gu->n / 2, i0 = j->task_row[t], i1 = i0 + j->chunk < inter ? i0 + j->chunk : inter;
    act_t a = *j->in;
    a.m = e->count, a.idx = e->tok;
    out_t o = {s->gu + (size_t)e->start * j->ldgu, j->ldgu, NULL, NULL, 0};
    mm_rows(&a, e->gu, i0, i1, &o);
    mm_rows(&a, e->gu, inter + i0, inter + i1, &o);
    for (int p = 0; p < e->count; p++) {
        const float *g = s->gu + (size_t)(e->start + p) * j->ldgu;
        float *y = s->act + (size_t)(e->start + p) * j->mid->ldx;
        swiglu(y + i0, g + i0, g + inter + i0, i1 - i0);
    }
}

/* output columns [d0, d0 + chunk) of x += sum over experts of weight * (act W_down^T), all tokens */
static void ffn_down_task(void *ctx, int t) {
    const ffn_job *j = ctx;
    int d = j->ex[0].down->n, d0 = t * j->chunk, d1 = d0 + j->chunk < d ? d0 + j->chunk : d;
    ns_scratch *s = &j->c->md->s;
    for (int e = 0; e < j->n_ex; e++) {
        const expert_t *ex = &j->ex[e];
        act_t a = *j->mid;
        a.m = ex->count, a.k = ex->down->k;
        a.x += (size_t)ex->start * a.ldx;
        if (a.q) a.q += (size_t)ex->start * a.ldq, a.d += (size_t)ex->start * (a.ldq / 4),
                 a.xs += (size_t)ex->start * (a.ldq / 4);
        out_t o = {s->x, d, ex->tok, ex->weight, 1};
        mm_rows(&a, ex->down, d0, d1, &o);
    }
}

static void quant_task(void *ctx, int e) { /* quantise one expert's rows of act with its width */
    const ffn_job *j = ctx;
    ns_scratch *s = &j->c->md->s;
    const expert_t *ex = &j->ex[e];
    quantize_rows(s->act, j->mid->ldx, ex->down->k, ex->start, ex->start + ex->count, s->aq, s->ad, s->axs,
                  j->mid->ldq);
}

static void ffn(const ctx_t *c, const act_t *in, const expert_t *ex, int n_ex) {
    ns_scratch *s = &c->md->s;
    enum { MAX_TASKS = 4096 };
    int tasks, inter_max = 0, quant = 0, total = 0;
    double macs = 0;
    for (int e = 0; e < n_ex; e++) {
        int inter = ex[e].gu->n / 2;
        inter_max = inter > inter_max ? inter : inter_max;
        total += inter;
        quant |= ex[e].down->type != NS_F32;
        macs += (double)ex[e].count * inter * ex[e].down->n; /* per projection: gate, up and down alike */
    }
    int nt = par(c, 2 * macs);
    /* chunks of gate/up rows: about four tasks per thread over all experts, at least 16 rows */
    int chunk = nt <= 1 ? inter_max : chunk_rows(total, nt);
    for (;; chunk *= 2) {
        tasks = 0;
        for (int e = 0; e < n_ex; e++) tasks += (ex[e].gu->n / 2 + chunk - 1) / chunk;
        if (tasks <= MAX_TASKS) break;
    }
    int32_t task_ex[MAX_TASKS], task_row[MAX_TASKS];
    tasks = 0;
    for (int e = 0; e < n_ex; e++)
        for (int i = 0; i < ex[e].gu->n / 2; i += chunk) task_ex[tasks] = e, task_row[tasks++] = i;
    act_t mid = {0, 0, s->act, (inter_max + 63) & ~63, s->aq, s->ad, s->axs, (inter_max + 63) & ~63, NULL};
    ffn_job j = {c, ex, n_ex, task_ex, task_row, chunk, 2 * inter_max, in, &mid};
    ns_pool_run(c->md->pool, nt, tasks, ffn_up_task, &j);
    if (quant) ns_pool_run(c->md->pool, 1, n_ex, quant_task, &j);
    PROF(c->md, NS_PROF_FFN_UP);
    nt = par(c, macs);
    int d = ex[0].down->n, dchunk = chunk_rows(d, nt);
    j.chunk = dchunk;
    ns_pool_run(c->md->pool, nt, (d + dchunk - 1) / dchunk, ffn_down_task, &j);
    PROF(c->md, NS_PROF_FFN_DOWN);
}

/* model.select_experts for one token: scores [E] sigmoid affinities -> top_k experts and routing weights. The bias
 * only picks; groups are ranked by the sum of their two best biased scores, topk_group groups kept. */
static void select_experts(const ns_config *cf, const float *scores, const float *bias, int32_t *idx, float *wt) {
    int E = cf->n_routed, G = cf->n_group, per = E / G, K = cf->top_k;
    float sel[1024];
    for (int e = 0; e < E; e++) sel[e] = scores[e] + bias[e];
    if (G > 1) {
        float gs[1024];
        int keep[1024];
        for (int g = 0; g < G; g++) {
            float b1 = -INFINITY, b2 = -INFINITY;
            for (int e = g * per; e < (g + 1) * per; e++) {
                if (sel[e] > b1) b2 = b1, b1 = sel[e];
                else if (sel[e] > b2) b2 = sel[e];
            }
            gs[g] = b1 + b2, keep[g] = 0;
        }
        for (int t = 0; t < cf->topk_group; t++) { /* the best remaining group; ties go to the lower index */
            int best = -1;
            for (int g = 0; g < G; g++)
                if (!keep[g] && (best < 0 || gs[g] > gs[best])) best = g;
            keep[best] = 1;
        }
        for (int g = 0; g < G; g++)
            if (!keep[g])
                for (int e = g * per; e < (g + 1) * per; e++) sel[e] = -INFINITY;
    }
    float sum = 0;
    for (int t = 0; t < K; t++) {
        int best = -1;
        for (int e = 0; e < E; e++) {
            int taken = 0;
            for (int u = 0; u < t; u++) taken |= idx[u] == e;
            if (!taken && (best < 0 || sel[e] > sel[best])) best = e;
        }
        idx[t] = best, wt[t] = scores[best], sum += scores[best];
    }
    for (int t = 0; t < K; t++)
        wt[t] = (cf->norm_topk_prob ? wt[t] / (sum + 1e-20f) : wt[t]) * cf->routed_scaling_factor;
}

static void moe(const ctx_t *c, const ns_layer *L, const act_t *in, int M) {
    const ns_config *cf = &c->md->cfg;
    ns_scratch *s = &c->md->s;
    int E = cf->n_routed, K = cf->top_k;
    /* the router in fp32: sigmoid(h W_gate^T) [M, E] */
    ns_weight gw = {NS_F32, E, cf->hidden, 0, L->gate_w, NULL, NULL, NULL};
    act_t a = *in;
    out_t o = {s->route, E, NULL, NULL, 0};
    mm_rows(&a, &gw, 0, E, &o);
    float *wsel = (float *)(s->sel + (size_t)M * K);
    for (int m = 0; m < M; m++) {
        float *sc = s->route + (size_t)m * E;
        for (int e = 0; e < E; e++) sc[e] = 1.0f / (1.0f + expf(-sc[e]));
        select_experts(cf, sc, L->gate_bias, s->sel + (size_t)m * K, wsel + (size_t)m * K);
    }
    PROF(c->md, NS_PROF_ROUTER);
    /* (token, expert) pairs grouped by expert, after the shared experts' M rows */
    expert_t ex[1025];
    int n_ex = 0, base = 0;
    if (L->ffn_gate_up.n) {
        ex[n_ex++] = (expert_t){&L->ffn_gate_up, &L->ffn_down, 0, M, NULL, NULL};
        base = M;
    }
    memset(s->expert_count, 0, sizeof(int32_t) * E);
    for (int i = 0; i < M * K; i++) s->expert_count[s->sel[i]]++;
    for (int e = 0, start = base; e < E; e++) s->expert_start[e] = start, start += s->expert_count[e];
    memset(s->expert_count, 0, sizeof(int32_t) * E);
    for (int i = 0; i < M * K; i++) {
        int e = s->sel[i], p = s->expert_start[e] + s->expert_count[e]++;
        s->pair_tok[p] = i / K, s->pair_w[p] = wsel[i];
    }
    for (int e = 0; e < E; e++)
        if (s->expert_count[e])
            ex[n_ex++] = (expert_t){&L->experts_gate_up[e], &L->experts_down[e], s->expert_start[e],
                                    s->expert_count[e], s->pair_tok + s->expert_start[e],
                                    s->pair_w + s->expert_start[e]};
    ffn(c, in, ex, n_ex);
}

/* --- the step ----------------------------------------------------------------------------------------------------- */
static int is_quantised(const ns_weight *w) { return w->n && w->type != NS_F32; }

int NS_FN(ns_forward)(ns_model *md, const ns_step *st, int nthreads) {
    const int n = st->n, s_tok = st->s;
    const int64_t *tokens = st->tokens, *lens = st->lens;
    const ns_config *cf = &md->cfg;
    ns_scratch *s = &md->s;
    ctx_t c = {md, nthreads};
    int M = n * s_tok, D = cf->hidden, H = cf->n_heads, cr = cf->kv_lora_rank, r = cf->rope;
    int qk = cf->nope + r, lat = cr + r, qa = cf->q_lora_rank ? cf->q_lora_rank : H * qk, na = qa + lat;
    float eps = cf->eps;
    if (md->profile) md->prof_t = ns_now();
    if (st->h_in) { /* the MTP module: x = eh_proj [enorm(embed(token)) ; hnorm(h_in)] */
        for (int m = 0; m < M; m++) {
            rmsnorm(s->cat + (size_t)m * 2 * D, md->embed + (size_t)tokens[m] * D, md->enorm, D, eps);
            rmsnorm(s->cat + (size_t)m * 2 * D + D, st->h_in + (size_t)m * D, md->hnorm, D, eps);
        }
        act_t a = operand(&c, s->cat, 2 * D, M, 2 * D, is_quantised(&md->eh_proj));
        out_t o = {s->x, D, NULL, NULL, 0};
        project(&c, &a, &md->eh_proj, &o);
    } else {
        for (int m = 0; m < M; m++) memcpy(s->x + (size_t)m * D, md->embed + (size_t)tokens[m] * D, sizeof(float) * D);
    }
    for (int l = 0; l < cf->n_layers; l++) {
        const ns_layer *L = &md->layers[l];
        /* attention: [q_a ; c_kv ; k_pe] = RMSNorm(x) W^T */
        for (int m = 0; m < M; m++) rmsnorm(s->h + (size_t)m * D, s->x + (size_t)m * D, L->attn_norm, D, eps);
        act_t a = operand(&c, s->h, D, M, D, is_quantised(&L->wq_a_kv_a));
        PROF(md, NS_PROF_OTHER);
        out_t o = {s->a, na, NULL, NULL, 0};
        project(&c, &a, &L->wq_a_kv_a, &o);
        const float *q = s->a;
        int ldq = na;
        if (cf->q_lora_rank) {
            for (int m = 0; m < M; m++) rmsnorm(s->qn + (size_t)m * qa, s->a + (size_t)m * na, L->q_norm, qa, eps);
            act_t aq = operand(&c, s->qn, qa, M, qa, is_quantised(&L->wq_b));
            out_t oq = {s->q, H * qk, NULL, NULL, 0};
            project(&c, &aq, &L->wq_b, &oq);
            q = s->q, ldq = H * qk;
        }
        PROF(md, NS_PROF_QKV);
        for (int m = 0; m < M; m++) {
            int slot = m / s_tok, pos = (int)lens[slot] + m % s_tok;
            const float *cs = md->cos + (size_t)pos * (r / 2), *sn = md->sin + (size_t)pos * (r / 2);
            /* the new latent, in place: row pos % bs of the slot's block pos / bs */
            float *row = (float *)cache_row(L->cache, L->block_table + (size_t)slot * cf->max_blocks, cf->block_size,
                                            lat, pos);
            const float *am = s->a + (size_t)m * na;
            rmsnorm(row, am + qa, L->kv_norm, cr, eps);
            memcpy(row + cr, am + qa + cr, sizeof(float) * r);
            rope(row + cr, r, cs, sn, cf->rope_interleave);
            if (q != s->q) memcpy(s->q + (size_t)m * H * qk, q + (size_t)m * ldq, sizeof(float) * H * qk);
            for (int h = 0; h < H; h++) { /* q_pe, roped, goes next to q_lat in qf */
                float *qf = s->qf + ((size_t)m * H + h) * lat + cr;
                memcpy(qf, s->q + (size_t)m * H * qk + h * qk + cf->nope, sizeof(float) * r);
                rope(qf, r, cs, sn, cf->rope_interleave);
            }
        }
        PROF(md, NS_PROF_OTHER);
        double t_avg = 1; /* attended rows per token, for the thread decision */
        for (int i = 0; i < n; i++) t_avg += (double)lens[i] / n;
        int nt_attn = par(&c, 2.0 * M * H * t_avg * lat), nt_kvb = par(&c, (double)M * H * cr * (cf->nope + cf->v_head));
        int hg = H < 4 ? H : 4, groups; /* heads per task (<= 4): a group shares each pass over the cache */
        while (hg > 1 && M * ((H + hg - 1) / hg) < 2 * nt_attn) hg--; /* ... but enough tasks for the threads */
        groups = (H + hg - 1) / hg;
        act_t qn = operand(&c, s->q, qk, M * H, cf->nope, is_quantised(&L->w_uk[0])); /* rows (m, h) */
        attn_job aj = {&c, L, M, s_tok, groups, hg, lens, &qn};
        ns_pool_run(md->pool, nt_kvb, H, absorb_task, &aj);
        ns_pool_run(md->pool, nt_attn, M * groups, attn_task, &aj);
        act_t ol = operand(&c, s->olat, cr, M * H, cr, is_quantised(&L->w_uv[0]));
        aj.in = &ol;
        ns_pool_run(md->pool, nt_kvb, H, uv_task, &aj);
        PROF(md, NS_PROF_ATTN);
        act_t ao = operand(&c, s->o, H * cf->v_head, M, H * cf->v_head, is_quantised(&L->wo));
        out_t ox = {s->x, D, NULL, NULL, 1}; /* x += o W_o^T */
        project(&c, &ao, &L->wo, &ox);
        PROF(md, NS_PROF_O);
        /* feed-forward on RMSNorm(x), accumulated into x */
        for (int m = 0; m < M; m++) rmsnorm(s->h + (size_t)m * D, s->x + (size_t)m * D, L->ffn_norm, D, eps);
        int quant = is_quantised(&L->ffn_gate_up) || (L->moe && L->experts_gate_up[0].type != NS_F32);
        act_t hin = operand(&c, s->h, D, M, D, quant);
        PROF(md, NS_PROF_OTHER);
        if (L->moe) {
            moe(&c, L, &hin, M);
        } else {
            expert_t dense = {&L->ffn_gate_up, &L->ffn_down, 0, M, NULL, NULL};
            ffn(&c, &hin, &dense, 1);
        }
    }
    if (st->hidden) memcpy(st->hidden, s->x, sizeof(float) * M * D);
    if (st->logits) { /* all M rows, or row pick[i] of each slot */
        int rows = st->pick ? n : M;
        for (int i = 0; i < rows; i++) {
            int m = st->pick ? i * s_tok + (int)st->pick[i] : i;
            rmsnorm(s->logit_h + (size_t)i * D, s->x + (size_t)m * D, md->norm, D, eps);
        }
        act_t a = operand(&c, s->logit_h, D, rows, D, md->lm_head.type != NS_F32);
        PROF(md, NS_PROF_OTHER);
        out_t o = {st->logits, cf->vocab, NULL, NULL, 0};
        project(&c, &a, &md->lm_head, &o);
        PROF(md, NS_PROF_HEAD);
    }
    return 0;
}

int NS_FN(ns_linear)(ns_model *md, const ns_weight *w, const float *x, int m, float *y, int nthreads) {
    ctx_t c = {md, nthreads};
    ns_scratch *s = &md->s, saved = *s;
    size_t need = (size_t)m * ((w->k + 63) & ~63);
    int8_t *q = NULL;
    float *d = NULL, *xs = NULL;
    if (w->type != NS_F32 && need > s->q_cap) { /* wider than any of the model's inputs: buffers for this call */
        q = malloc(need), d = malloc(sizeof(float) * need / 4), xs = malloc(sizeof(float) * need / 4);
        if (!q || !d || !xs) {
            free(q), free(d), free(xs);
            return -4;
        }
        s->aq = q, s->ad = d, s->axs = xs;
    }
    act_t a = operand(&c, x, w->k, m, w->k, w->type != NS_F32);
    out_t o = {y, w->n, NULL, NULL, 0};
    project(&c, &a, w, &o);
    if (q) {
        s->aq = saved.aq, s->ad = saved.ad, s->axs = saved.axs;
        free(q), free(d), free(xs);
    }
    return 0;
}
