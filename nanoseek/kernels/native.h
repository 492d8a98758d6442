/* nanoseek native decode kernels: the C ABI shared by native.c (dispatch, thread pool) and forward.h (the decode
 * step, compiled once per instruction set by isa_avx512.c, isa_avx2.c and isa_generic.c).
 *
 * Python (nanoseek/kernels/__init__.py) fills these structs through ctypes with pointers into the engine's own
 * tensors (weights, RoPE tables, latent caches): nothing is copied except what a format needs (fp32 scales, int4
 * codes in this layout). The structs' field order is mirrored there; change both together.
 *
 * Shapes: D hidden_size, H heads, c kv_lora_rank, r qk_rope_head_dim, nope qk_nope_head_dim, v v_head_dim,
 * E routed experts, I an FFN's intermediate width, V vocab, M tokens in a step (slots x tokens per slot).
 */
#ifndef NANOSEEK_NATIVE_H
#define NANOSEEK_NATIVE_H

#include <stddef.h>
#include <stdint.h>

/* what Python calls (the library is built with -fvisibility=hidden) */
#define NS_API __attribute__((visibility("default")))

enum { NS_F32 = 0, NS_INT8 = 1, NS_INT4 = 2 };
enum { NS_ISA_GENERIC = 0, NS_ISA_AVX2 = 1, NS_ISA_AVX512 = 2, NS_ISA_COUNT = 3 };

/* One projection y = x W^T with W [n, k]:
 *   NS_F32:  w = float [n, k] row-major (the engine's tensor, no copy)
 *   NS_INT8: w = int8 [n, k] row-major (quant.Int8Weight.q, no copy), scale = float [n]: W ~= q * scale[n]
 *   NS_INT4: w = uint8 [n, k/2]: each block of 32 inputs is 16 bytes, byte j holding code j (low nibble) and code
 *            j+16 (high nibble); scale, zero = bf16 bits [n, k/32]: W ~= (code - 8) * scale + zero, as
 *            quant.Int4Weight (its groups of 64/128 repeat their scale over 2/4 blocks). k % 32 == 0. */
typedef struct {
    int32_t type, n, k, pad;
    const void *w;
    const float *scale;
    const uint16_t *s4, *z4;
} ns_weight;

typedef struct {
    const float *attn_norm, *q_norm, *kv_norm, *ffn_norm; /* [D], [q_lora_rank] or NULL, [c], [D] */
    ns_weight wq_a_kv_a; /* [q_lora_rank (or H*(nope+r)) + c + r, D]: q_a (or q) ; c_kv ; k_pe */
    ns_weight wq_b;      /* [H*(nope+r), q_lora_rank]; n = 0 when q_lora_rank is None */
    ns_weight wo;        /* [D, H*v] */
    const ns_weight *w_uk, *w_uv; /* H each: kv_b_proj's key rows per head transposed, [c, nope] (q_lat = q_nope
                                   * W_UK is then a projection), and its value rows [v, c]. fp32 as the engine's,
                                   * or quantised like the other weights when the engine is */
    ns_weight ffn_gate_up, ffn_down; /* dense FFN, or the fused shared experts: [2I, D], [D, I]; n = 0: none */
    int32_t moe, pad;
    const float *gate_w, *gate_bias;                 /* router [E, D] and e_score_correction_bias [E], fp32 */
    const ns_weight *experts_gate_up, *experts_down; /* E of each: [2I, D], [D, I] */
    float *cache;               /* paged latent cache [num_blocks, block_size, c + r] fp32 */
    const int32_t *block_table; /* [max_batch, max_blocks]: slot i's position p is in block [i][p / block_size] */
} ns_layer;

typedef struct {
    int32_t n_layers, hidden, vocab, n_heads;
    int32_t q_lora_rank; /* 0 = a plain q_proj */
    int32_t kv_lora_rank, nope, rope, v_head;
    int32_t n_routed, n_group, topk_group, top_k, norm_topk_prob;
    int32_t rope_interleave, max_batch, rows; /* rows: cache positions per slot */
    float eps, softmax_scale, routed_scaling_factor;
    int32_t block_size, max_blocks, num_blocks; /* the paged cache: positions per block, table columns, blocks */
} ns_config;

typedef struct ns_model ns_model;
typedef struct ns_pool ns_pool;

/* A parallel loop: fn(ctx, task) for task in [0, ntasks), spread over up to nthreads threads (the caller included). */
typedef void (*ns_task_fn)(void *ctx, int task);
void ns_pool_run(ns_pool *pool, int nthreads, int ntasks, ns_task_fn fn, void *ctx);

/* Scratch buffers, sized by ns_scratch_reserve for M tokens (grown on demand, freed with the model). */
typedef struct {
    int m_cap, t_cap;
    size_t q_cap; /* bytes of aq */
    float *x, *h, *a, *qn, *q, *qf, *o, *scores, *olat, *gu, *act, *route, *logit_h, *cat;
    int8_t *aq;  /* quantised activations [rows, kq] */
    float *ad;   /* [rows, kq/4]: each block of 32's scale d, 8 copies (one per int32 lane of its dot product) */
    float *axs;  /* [rows, kq/4]: d * sum(q) / 8 per block, 8 copies (int4's zero term) */
    int32_t *pair_tok; float *pair_w; int32_t *expert_start, *expert_count;
    int32_t *sel;  /* [M, top_k] selected experts */
} ns_scratch;

/* Seconds spent per phase of the step, summed over calls while profiling is on (ns_profile). */
enum { NS_PROF_QKV, NS_PROF_ATTN, NS_PROF_O, NS_PROF_ROUTER, NS_PROF_FFN_UP, NS_PROF_FFN_DOWN, NS_PROF_HEAD,
       NS_PROF_OTHER, NS_PROF_COUNT };

struct ns_model {
    ns_config cfg;
    ns_layer *layers;
    const float *embed, *norm; /* [V, D], [D] */
    ns_weight lm_head;         /* [V, D] */
    const float *cos, *sin;    /* [rows, r/2]: the engine's RoPE tables (YaRN attention factor folded in) */
    int isa;
    ns_pool *pool;
    ns_scratch s;
    int profile;
    double prof[NS_PROF_COUNT], prof_t;
    const float *enorm, *hnorm; /* the MTP module's input norms [D] (ns_model_set_mtp), else NULL */
    ns_weight eh_proj;          /* [D, 2D] */
};
double ns_now(void); /* seconds, monotonic */
extern int ns_prefetch_min; /* the kernels' minimum prefetch distance in bytes (ns_tune 0) */
extern int ns_par_min;      /* multiply-adds below which a job runs on the calling thread alone (ns_tune 1) */

/* One step (forward.h): M = n * s tokens, s consecutive new tokens for each of the slots 0..n-1 at positions
 * lens[i] + 0..s-1. Writes the latents into every layer's cache, the hidden states before the final norm into
 * hidden [M, D] (when not NULL) and the logits into logits [M, V] (when not NULL; with pick, only row i * s + pick[i]
 * of each slot: logits [n, V]). For the MTP module's model (ns_model_set_mtp), h_in [M, D] is the main model's hidden
 * state paired with each token: x = eh_proj [enorm(embed(token)) ; hnorm(h_in)]. */
typedef struct {
    int32_t n, s;
    const int64_t *tokens, *lens, *pick;
    const float *h_in;
    float *hidden, *logits;
} ns_step;

typedef int (*ns_forward_fn)(ns_model *md, const ns_step *st, int nthreads);
int ns_forward_generic(ns_model *, const ns_step *, int);
int ns_forward_avx2(ns_model *, const ns_step *, int);
int ns_forward_avx512(ns_model *, const ns_step *, int);

/* One projection, for tests: y [m, n] = x [m, k] W^T with the ISA's kernels (int8/int4 quantise x as forward does). */
typedef int (*ns_linear_fn)(ns_model *md, const ns_weight *w, const float *x, int m, float *y, int nthreads);
int ns_linear_generic(ns_model *, const ns_weight *, const float *, int, float *, int);
int ns_linear_avx2(ns_model *, const ns_weight *, const float *, int, float *, int);
int ns_linear_avx512(ns_model *, const ns_weight *, const float *, int, float *, int);

int ns_scratch_reserve(ns_model *md, int m); /* 0 on success, -1 when out of memory */

#endif
