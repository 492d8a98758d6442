/* nanoseek native decode kernels: the exported C ABI (called from Python through ctypes), CPU feature detection,
 * the instruction-set dispatch and a small persistent thread pool. The decode step itself is forward.h, compiled
 * once per instruction set (isa_*.c). See docs/kernels.md. */
#include "native.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#define NS_X86 1
static inline void cpu_relax(void) { __builtin_ia32_pause(); }
#else
#define NS_X86 0
static inline void cpu_relax(void) {}
#endif

/* --- instruction sets --------------------------------------------------------------------------------------------- */
#if NS_X86
static uint64_t xgetbv0(void) {
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}
#endif

/* Bit i set: the CPU (and the OS, which must save the wider registers) runs variant i (NS_ISA_*). */
NS_API int ns_cpu_isas(void) {
    int isas = 1 << NS_ISA_GENERIC;
#if NS_X86
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return isas;
    int fma = (c >> 12) & 1, osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, f16c = (c >> 29) & 1;
    if (!osxsave || !avx) return isas;
    uint64_t xcr0 = xgetbv0();
    if ((xcr0 & 0x6) != 0x6) return isas; /* the OS saves xmm and ymm state */
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return isas;
    int avx2 = (b >> 5) & 1, avx512f = (b >> 16) & 1, avx512dq = (b >> 17) & 1, avx512bw = (b >> 30) & 1;
    int avx512vl = (b >> 31) & 1, avx512vnni = (c >> 11) & 1;
    if (avx2 && fma && f16c) isas |= 1 << NS_ISA_AVX2;
    if (avx512f && avx512dq && avx512bw && avx512vl && avx512vnni && (xcr0 & 0xe6) == 0xe6)
        isas |= 1 << NS_ISA_AVX512; /* and the opmask and zmm state */
#endif
    return isas;
}

/* Bit i set: variant i was compiled into this library (the x86 ones only on x86-64). */
NS_API int ns_built_isas(void) { return NS_X86 ? 7 : 1; }

static const ns_forward_fn FORWARD[NS_ISA_COUNT] = {ns_forward_generic,
#if NS_X86
                                                    ns_forward_avx2, ns_forward_avx512
#else
                                                    0, 0
#endif
};
static const ns_linear_fn LINEAR[NS_ISA_COUNT] = {ns_linear_generic,
#if NS_X86
                                                  ns_linear_avx2, ns_linear_avx512
#else
                                                  0, 0
#endif
};

/* --- thread pool -----------------------------------------------------------------------------------------------------
 * The caller's thread and up to NS_MAX_THREADS - 1 workers. A job is published as one 64-bit word
 * [generation:32][ntasks:16][next task:16]; every thread claims tasks by compare-and-swap on it, so a thread the
 * OS has descheduled (a busy shared machine) never holds up tasks it has not claimed: the others take them. Idle
 * workers spin briefly (the next job of a decode step follows within microseconds), then sleep on a condition
 * variable. No OpenMP: PyTorch's wheel bundles its own libgomp, and two OpenMP runtimes in one process fight. */
#define NS_MAX_THREADS 64
#define NS_SPIN 20000 /* pause instructions before a worker sleeps: ~0.1-1 ms depending on the CPU */

struct ns_pool {
    _Atomic uint64_t job;
    _Atomic int done;     /* tasks of the current job finished */
    _Atomic int sleepers; /* workers waiting on cv */
    _Atomic int stop;
    _Atomic int limit;    /* workers that take part in the current job (nthreads - 1) */
    ns_task_fn fn;
    void *ctx;
    int nworkers;
    pthread_t tid[NS_MAX_THREADS];
    pthread_mutex_t mu;
    pthread_cond_t cv;
};

typedef struct {
    ns_pool *pool;
    int index;
} worker_arg;

static void work(ns_pool *p, uint32_t gen) {
    for (;;) {
        uint64_t j = atomic_load_explicit(&p->job, memory_order_acquire);
        uint32_t next = j & 0xffff, ntasks = (j >> 16) & 0xffff;
        if ((uint32_t)(j >> 32) != gen || next >= ntasks) return;
        if (atomic_compare_exchange_weak_explicit(&p->job, &j, j + 1, memory_order_acq_rel, memory_order_relaxed)) {
            p->fn(p->ctx, (int)next); /* fn/ctx are this job's: it cannot end before this task is counted done */
            atomic_fetch_add_explicit(&p->done, 1, memory_order_release);
        }
    }
}

static void *worker_main(void *arg) {
    ns_pool *p = ((worker_arg *)arg)->pool;
    int index = ((worker_arg *)arg)->index;
    free(arg);
    uint32_t seen = (uint32_t)(atomic_load(&p->job) >> 32);
    for (;;) {
        uint32_t gen = seen;
        for (int i = 0; i < NS_SPIN && gen == seen && !atomic_load_explicit(&p->stop, memory_order_relaxed); i++) {
            cpu_relax();
            gen = (uint32_t)(atomic_load_explicit(&p->job, memory_order_acquire) >> 32);
        }
        if (gen == seen) {
            pthread_mutex_lock(&p->mu);
            atomic_fetch_add(&p->sleepers, 1); /* seq_cst: pairs with the publisher's store, then load */
            while ((gen = (uint32_t)(atomic_load(&p->job) >> 32)) == seen && !atomic_load(&p->stop))
                pthread_cond_wait(&p->cv, &p->mu);
            atomic_fetch_sub(&p->sleepers, 1);
            pthread_mutex_unlock(&p->mu);
        }
        if (atomic_load(&p->stop)) return NULL;
        seen = gen;
        if (index < atomic_load_explicit(&p->limit, memory_order_relaxed)) work(p, gen);
    }
}

static ns_pool *pool_new(void) {
    ns_pool *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
    return p;
}

static void pool_free(ns_pool *p) {
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    atomic_store(&p->stop, 1);
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    for (int i = 0; i < p->nworkers; i++) pthread_join(p->tid[i], NULL);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv);
    free(p);
}

void ns_pool_run(ns_pool *p, int nthreads, int ntasks, ns_task_fn fn, void *ctx) {
    if (nthreads > NS_MAX_THREADS) nthreads = NS_MAX_THREADS;
    while (p && p->nworkers < nthreads - 1) { /* start workers on first use */
        worker_arg *a = malloc(sizeof *a);
        if (!a) break;
        a->pool = p, a->index = p->nworkers;
        if (pthread_create(&p->tid[p->nworkers], NULL, worker_main, a)) {
            free(a);
            break;
        }
        p->nworkers++;
    }
    if (!p || nthreads <= 1 || ntasks <= 1 || p->nworkers == 0 || ntasks > 0xffff) {
        for (int t = 0; t < ntasks; t++) fn(ctx, t);
        return;
    }
    uint32_t gen = (uint32_t)(atomic_load(&p->job) >> 32) + 1;
    p->fn = fn, p->ctx = ctx;
    atomic_store_explicit(&p->done, 0, memory_order_relaxed);
    atomic_store_explicit(&p->limit, nthreads - 1, memory_order_relaxed);
    atomic_store(&p->job, ((uint64_t)gen << 32) | ((uint64_t)ntasks << 16)); /* seq_cst publish */
    if (atomic_load(&p->sleepers) > 0) {
        pthread_mutex_lock(&p->mu);
        pthread_cond_broadcast(&p->cv);
        pthread_mutex_unlock(&p->mu);
    }
    work(p, gen);
    for (int i = 0; atomic_load_explicit(&p->done, memory_order_acquire) < ntasks; i++) {
        cpu_relax(); /* a task still running on another thread */
        if (i > 4096) sched_yield(); /* ... whose thread the OS has descheduled: give it the core */
    }
}

/* --- models ------------------------------------------------------------------------------------------------------- */
NS_API ns_model *ns_model_new(const ns_config *cfg, const ns_layer *layers, const float *embed, const float *norm,
                       const ns_weight *lm_head, const float *cos, const float *sin, int isa) {
    if (isa < 0 || isa >= NS_ISA_COUNT || !FORWARD[isa] || !((ns_cpu_isas() >> isa) & 1)) return NULL;
    ns_model *md = calloc(1, sizeof *md);
    if (!md) return NULL;
    md->cfg = *cfg;
    md->layers = malloc(sizeof(ns_layer) * cfg->n_layers);
    md->pool = pool_new();
    if (!md->layers || !md->pool) {
        free(md->layers);
        pool_free(md->pool);
        free(md);
        return NULL;
    }
    memcpy(md->layers, layers, sizeof(ns_layer) * cfg->n_layers);
    md->embed = embed, md->norm = norm, md->lm_head = *lm_head, md->cos = cos, md->sin = sin, md->isa = isa;
    return md;
}

static void scratch_free(ns_scratch *s) {
    void *bufs[] = {s->x,   s->h,      s->a,        s->qn,       s->q,          s->qf,          s->o,   s->scores,
                    s->olat, s->gu,    s->act,      s->route,    s->logit_h,    s->aq,          s->ad,  s->axs,
                    s->pair_tok, s->pair_w, s->expert_start, s->expert_count, s->sel, s->cat};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) free(bufs[i]);
    memset(s, 0, sizeof *s);
}

NS_API void ns_model_free(ns_model *md) {
    if (!md) return;
    pool_free(md->pool);
    scratch_free(&md->s);
    free(md->layers);
    free(md);
}

static void *alloc64(size_t bytes) {
    void *p = NULL;
    return posix_memalign(&p, 64, bytes ? (bytes + 63) & ~(size_t)63 : 64) ? NULL : p;
}

static int max3(int a, int b, int c) { return a > b ? (a > c ? a : c) : (b > c ? b : c); }
static int round64(int k) { return (k + 63) & ~63; }

/* Size every scratch buffer for M tokens (each attending at most cfg.rows positions). */
int ns_scratch_reserve(ns_model *md, int m) {
    ns_scratch *s = &md->s;
    if (m <= s->m_cap) return 0;
    const ns_config *c = &md->cfg;
    int d = c->hidden, h = c->n_heads, qk = c->nope + c->rope, lat = c->kv_lora_rank + c->rope;
    int qa = c->q_lora_rank ? c->q_lora_rank : h * qk, na = qa + lat;
    int ffn = 0, pairs = m * (1 + (c->n_routed ? c->top_k : 0)); /* the shared/dense FFN's rows + routed pairs */
    for (int l = 0; l < c->n_layers; l++) {
        const ns_layer *L = &md->layers[l];
        if (L->ffn_gate_up.n > ffn) ffn = L->ffn_gate_up.n;
        if (L->moe && L->experts_gate_up[0].n > ffn) ffn = L->experts_gate_up[0].n;
    }
    int inter = ffn / 2;
    int kq = max3(round64(d), round64(qa), round64(h * c->v_head));
    kq = max3(kq, h * round64(c->nope), h * round64(c->kv_lora_rank)); /* per-head q_nope and o_lat rows */
    kq = kq > round64(2 * d) ? kq : round64(2 * d);                      /* the MTP module's eh_proj input */
    size_t qrows = (size_t)m * kq > (size_t)pairs * round64(inter) ? (size_t)m * kq : (size_t)pairs * round64(inter);
    scratch_free(s);
    s->x = alloc64(sizeof(float) * m * d);
    s->h = alloc64(sizeof(float) * m * d);
    s->logit_h = alloc64(sizeof(float) * m * d);
    s->cat = alloc64(sizeof(float) * m * 2 * d);
    s->a = alloc64(sizeof(float) * m * na);
    s->qn = alloc64(sizeof(float) * m * qa);
    s->q = alloc64(sizeof(float) * m * h * qk);
    s->qf = alloc64(sizeof(float) * m * h * lat);
    s->o = alloc64(sizeof(float) * m * h * c->v_head);
    s->t_cap = c->rows;
    s->scores = alloc64(sizeof(float) * m * h * (size_t)c->rows);
    s->olat = alloc64(sizeof(float) * m * h * c->kv_lora_rank);
    s->gu = alloc64(sizeof(float) * pairs * (size_t)(ffn ? ffn : 1));
    s->act = alloc64(sizeof(float) * pairs * (size_t)round64(inter ? inter : 1));
    s->route = alloc64(sizeof(float) * m * (c->n_routed ? c->n_routed : 1));
    s->aq = alloc64(qrows);
    s->q_cap = qrows;
    s->ad = alloc64(sizeof(float) * 8 * (qrows / 32)); /* each block's scale, 8 copies (one per int32 lane) */
    s->axs = alloc64(sizeof(float) * 8 * (qrows / 32));
    s->pair_tok = alloc64(sizeof(int32_t) * pairs);
    s->pair_w = alloc64(sizeof(float) * pairs);
    s->expert_start = alloc64(sizeof(int32_t) * (c->n_routed + 1));
    s->expert_count = alloc64(sizeof(int32_t) * (c->n_routed + 1));
    s->sel = alloc64(sizeof(int32_t) * m * (c->top_k ? c->top_k : 1) * 2);
    if (!s->x || !s->h || !s->logit_h || !s->cat || !s->a || !s->qn || !s->q || !s->qf || !s->o || !s->scores || !s->olat ||
        !s->gu || !s->act || !s->route || !s->aq || !s->ad || !s->axs || !s->pair_tok || !s->pair_w ||
        !s->expert_start || !s->expert_count || !s->sel) {
        scratch_free(s);
        return -1;
    }
    s->m_cap = m;
    return 0;
}

/* The MTP module's extras: its input norms and eh_proj (a model made of its block, with its head norm as `norm`). */
NS_API void ns_model_set_mtp(ns_model *md, const float *enorm, const float *hnorm, const ns_weight *eh_proj) {
    md->enorm = enorm, md->hnorm = hnorm, md->eh_proj = *eh_proj;
}

/* Returns 0, or -1 (out of memory), -2 (a position past the cache), -3 (a token id out of range), -4 (an MTP input
 * missing or given to the main model), -5 (a pick outside the slot's tokens), -6 (a block table entry outside the
 * cache, for a position the step reads or writes). */
NS_API int ns_forward(ns_model *md, const ns_step *st, int nthreads) {
    const ns_config *cf = &md->cfg;
    for (int i = 0; i < st->n; i++)
        if (st->lens[i] < 0 || st->lens[i] + st->s > cf->rows || st->lens[i] + st->s > cf->max_blocks * cf->block_size)
            return -2;
    for (int i = 0; i < st->n; i++) /* every layer shares the engine's block table */
        for (int b = 0; b * cf->block_size < st->lens[i] + st->s; b++) {
            int32_t blk = md->layers[0].block_table[(size_t)i * cf->max_blocks + b];
            if (blk < 0 || blk >= cf->num_blocks) return -6;
        }
    for (int i = 0; i < st->n * st->s; i++)
        if (st->tokens[i] < 0 || st->tokens[i] >= md->cfg.vocab) return -3;
    if (!st->h_in != !md->enorm) return -4;
    for (int i = 0; st->pick && i < st->n; i++)
        if (st->pick[i] < 0 || st->pick[i] >= st->s) return -5;
    if (ns_scratch_reserve(md, st->n * st->s)) return -1;
    return FORWARD[md->isa](md, st, nthreads < 1 ? 1 : nthreads);
}

NS_API int ns_linear(ns_model *md, const ns_weight *w, const float *x, int m, float *y, int nthreads) {
    if (ns_scratch_reserve(md, m)) return -1;
    return LINEAR[md->isa](md, w, x, m, y, nthreads < 1 ? 1 : nthreads);
}

double ns_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Profiling: enable (1) or disable (0) the per-phase timers; copies the seconds summed so far into out[NS_PROF_COUNT]
 * (when not NULL) and resets them. Returns NS_PROF_COUNT. */
NS_API int ns_profile(ns_model *md, int enable, double *out) {
    if (out) memcpy(out, md->prof, sizeof md->prof);
    memset(md->prof, 0, sizeof md->prof);
    md->profile = enable;
    return NS_PROF_COUNT;
}

/* Tuning knobs for experiments (docs/kernels.md): 0 = the minimum prefetch distance in bytes, 1 = the multiply-adds
 * below which a job is not split over threads. Returns the old value (value < 0: only read it). */
int ns_prefetch_min = 8192;
int ns_par_min = 1 << 17;
NS_API int ns_tune(int what, int value) {
    int *knob = what == 0 ? &ns_prefetch_min : what == 1 ? &ns_par_min : NULL;
    if (!knob) return -1;
    int old = *knob;
    if (value >= 0) *knob = value;
    return old;
}

/* A no-op, to measure the cost of one call from Python (docs/kernels.md). */
NS_API int ns_noop(ns_model *md, int n, const int64_t *tokens, float *out) {
    (void)md, (void)tokens, (void)out;
    return n;
}
