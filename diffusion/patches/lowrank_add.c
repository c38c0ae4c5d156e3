/* Fused low-rank patch of CPU weights, compiled at run time by diffusion/patches/lowrank_kernel.py.
 *
 *   W[i, j] = cast(W0[i, j] + c * sum_k U[i, k] * D[k, j])        (fp32 accumulation)
 *
 * c is strength * alpha / rank (several LoRAs on one weight: U = [c_1 up_1, c_2 up_2, ...], c = 1), D [rank, cols] is the
 * down factor (conv weights are viewed as [out, in*kh*kw]); W0 and W are fp32, bf16 or fp16 with the
 * same shape, row-major and contiguous. One pass reads W0 and writes W; the rank-r product of a tile
 * stays in registers. torch's addmm(W0, U, D, out=W) instead copies W0 into W and then runs an
 * in-place gemm over W: two passes over memory, which is what a LoRA strength change cost before.
 *
 * Portable C (GCC/clang vector extensions), built with -O3 -march=native; streaming stores and
 * prefetches where the target has them. Threads: pthreads, each a contiguous share of every job's rows.
 */
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

/* VW floats per vector, the target's register width (wider generic vectors are split through memory
 * by GCC: 20x slower). A tile is RT rows x NV vectors: RT * NV accumulators + NV loaded vectors + one
 * broadcast fit the registers. */
#if defined(__AVX512F__)
#define VW 16
#define RT 5            /* 20 + 4 + 1 of 32 zmm */
#define NV 4
#elif defined(__AVX__)
#define VW 8
#define RT 6            /* 12 + 2 + 1 of 16 ymm */
#define NV 2
#else
#define VW 4
#define RT 6            /* 12 + 2 + 1 of 16 xmm */
#define NV 2
#endif
#define PD 2            /* prefetch W0 this many tiles ahead */

typedef float vf __attribute__((vector_size(VW * 4)));
typedef float vfu __attribute__((vector_size(VW * 4), aligned(4)));
typedef uint32_t vu __attribute__((vector_size(VW * 4)));
typedef uint16_t vh __attribute__((vector_size(VW * 2)));
typedef uint16_t vhu __attribute__((vector_size(VW * 2), aligned(2)));
#ifdef __FLT16_MANT_DIG__
#define HAVE_F16 1
typedef _Float16 vhf __attribute__((vector_size(VW * 2)));
typedef _Float16 vhfu __attribute__((vector_size(VW * 2), aligned(2)));
#else
#define HAVE_F16 0
#endif

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };

typedef struct {
    const void *w0;     /* [rows, cols] original weight */
    void *w;            /* [rows, cols] destination (not w0) */
    const float *up;    /* [rows, rank] scaled up factor */
    const float *down;  /* [rank, cols] */
    int64_t rows, cols, rank;
    int32_t dtype;
    int32_t stream;     /* 1: streaming stores allowed (W is already faulted in: a re-patch) */
    float scale;        /* c */
    int32_t pad;
} lr_job;

int lr_abi(void) { return (int)sizeof(lr_job); }
int lr_has_f16(void) { return HAVE_F16; }
int lr_vector_width(void) { return VW; }           /* floats per vector in this build */

/* ---- element conversions (scalar and VW-wide) ---- */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {   /* round to nearest even; NaN -> 0x7FC0 (as torch) */
    uint32_t u;
    memcpy(&u, &f, 4);
    if (f != f) return 0x7FC0;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

static inline __attribute__((always_inline)) vf vload(const void *base, int64_t idx, int dt) {
    if (dt == DT_F32) return *(const vfu *)((const float *)base + idx);
    if (dt == DT_BF16) {
        vh h = *(const vhu *)((const uint16_t *)base + idx);
        vu u = __builtin_convertvector(h, vu) << 16;
        return (vf)u;
    }
#if defined(__AVX512F__)                            /* GCC 12 converts _Float16 vectors one lane at a time */
    return (vf)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)base + idx)));
#elif defined(__F16C__) && defined(__AVX__)
    return (vf)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)base + idx)));
#elif HAVE_F16
    return __builtin_convertvector(*(const vhfu *)((const _Float16 *)base + idx), vf);
#else
    return (vf){0};
#endif
}

static inline __attribute__((always_inline)) void vstore(void *base, int64_t idx, vf v, int dt, int nt) {
    (void)nt;                                       /* no streaming stores without AVX */
    if (dt == DT_F32) {
        float *p = (float *)base + idx;
#if defined(__AVX512F__)
        if (nt) { _mm512_stream_ps(p, (__m512)v); return; }
#elif defined(__AVX__)
        if (nt) { _mm256_stream_ps(p, (__m256)v); return; }
#endif
        *(vfu *)p = v;
        return;
    }
    vh h;
    if (dt == DT_BF16) {
#if defined(__AVX512BF16__) && defined(__AVX512DQ__)
        /* the instruction rounds to nearest even like the integer form below, but flushes subnormal
         * inputs to zero and keeps NaN payloads: vectors holding either take the integer form */
        if (!_mm512_fpclass_ps_mask((__m512)v, 0x01 | 0x20 | 0x80)) {     /* QNaN | subnormal | SNaN */
            h = (vh)_mm512_cvtneps_pbh((__m512)v);
        } else
#endif
        {
            vu u = (vu)v;
            vu r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
            vu nan = (vu)(v != v);                   /* all ones where NaN */
            r = (r & ~nan) | (0x7FC0u & nan);
            h = __builtin_convertvector(r, vh);
        }
    } else {
#if defined(__AVX512F__)
        h = (vh)_mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#elif defined(__F16C__) && defined(__AVX__)
        h = (vh)_mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#elif HAVE_F16
        vhf x = __builtin_convertvector(v, vhf);
        memcpy(&h, &x, sizeof h);
#else
        memset(&h, 0, sizeof h);
#endif
    }
    uint16_t *p = (uint16_t *)base + idx;
#if VW == 16
    if (nt) { _mm256_stream_si256((__m256i *)p, (__m256i)h); return; }
#elif VW == 8
    if (nt) { _mm_stream_si128((__m128i *)p, (__m128i)h); return; }
#endif
    *(vhu *)p = h;
}

static inline float load1(const void *base, int64_t idx, int dt) {
    if (dt == DT_F32) return ((const float *)base)[idx];
    if (dt == DT_BF16) return bf16_to_f32(((const uint16_t *)base)[idx]);
#if HAVE_F16
    return (float)((const _Float16 *)base)[idx];
#else
    return 0.f;
#endif
}

static inline void store1(void *base, int64_t idx, float v, int dt) {
    if (dt == DT_F32) ((float *)base)[idx] = v;
    else if (dt == DT_BF16) ((uint16_t *)base)[idx] = f32_to_bf16(v);
#if HAVE_F16
    else ((_Float16 *)base)[idx] = (_Float16)v;
#endif
}

/* ---- one tile: rows [i, i+nr) x columns [j, j+VW*nv), nv <= NV ---- */

static inline __attribute__((always_inline)) void tile(const lr_job *J, int64_t i, int64_t nr, int64_t j,
                                                      int nv, int dt, int nt) {
    const int64_t C = J->cols, r = J->rank;
    const float c = J->scale;
    vf acc[RT][NV];
    for (int a = 0; a < RT; a++)
        for (int b = 0; b < NV; b++) acc[a][b] = (vf){0};
    for (int64_t k = 0; k < r; k++) {
        const float *d = J->down + k * C + j;
        vf dv[NV];
        for (int b = 0; b < nv; b++) dv[b] = *(const vfu *)(d + VW * b);
        for (int a = 0; a < RT; a++) {
            float s = J->up[(i + (a < nr ? a : 0)) * r + k];
            for (int b = 0; b < nv; b++) acc[a][b] += s * dv[b];
        }
    }
    for (int a = 0; a < nr; a++) {
        const int64_t row = (i + a) * C + j;
        for (int b = 0; b < nv; b++) vstore(J->w, row + VW * b, vload(J->w0, row + VW * b, dt) + c * acc[a][b], dt, nt);
    }
}

static inline __attribute__((always_inline)) void row_tile(const lr_job *J, int64_t i, int dt) {
    const int64_t R = J->rows, C = J->cols, r = J->rank;
    const int64_t nr = R - i < RT ? R - i : RT;
    const int esz = dt == DT_F32 ? 4 : 2;
    /* streaming stores need every row start aligned to the vector width */
    const int nt = J->stream && ((uintptr_t)J->w % 64 == 0) && ((C * esz) % 64 == 0);
    int64_t j = 0;
    for (; j + VW * NV <= C; j += VW * NV) {
        const int64_t ip = i + PD * RT;           /* pull later rows of W0 into L2 while computing */
        for (int a = 0; a < RT && ip + a < R; a++)
            for (int off = 0; off < VW * NV * esz; off += 64)   /* the tile's columns, line by line */
                __builtin_prefetch((const char *)J->w0 + ((ip + a) * C + j) * esz + off, 0, 2);
        tile(J, i, nr, j, NV, dt, nt);
    }
    for (; j + VW <= C; j += VW) tile(J, i, nr, j, 1, dt, nt);
    for (int64_t a = 0; a < nr; a++)
        for (int64_t jj = j; jj < C; jj++) {
            float acc = 0.f;
            for (int64_t k = 0; k < r; k++) acc += J->up[(i + a) * r + k] * J->down[k * C + jj];
            store1(J->w, (i + a) * C + jj, load1(J->w0, (i + a) * C + jj, dt) + J->scale * acc, dt);
        }
}

static void run_tile(const lr_job *J, int64_t i) {
    switch (J->dtype) {
    case DT_F32: row_tile(J, i, DT_F32); break;
    case DT_BF16: row_tile(J, i, DT_BF16); break;
    default: row_tile(J, i, DT_F16); break;
    }
}

/* ---- work sharing: every thread takes a contiguous share of every job's row tiles ---- */
/* (contiguous so that the prefetches above land in the prefetching thread's own rows) */

typedef struct {
    const lr_job *jobs;
    int64_t n_jobs;
    int index, count;
} lr_share;

static void *worker(void *arg) {
    const lr_share *S = (const lr_share *)arg;
    for (int64_t n = 0; n < S->n_jobs; n++) {
        const int64_t tiles = (S->jobs[n].rows + RT - 1) / RT;
        const int64_t lo = tiles * S->index / S->count, hi = tiles * (S->index + 1) / S->count;
        for (int64_t t = lo; t < hi; t++) run_tile(&S->jobs[n], t * RT);
    }
#if defined(__SSE2__)
    _mm_sfence();                                   /* streaming stores visible before we return */
#else
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
#endif
    return NULL;
}

/* Runs every job on n_threads threads (the caller's included). Returns 0, or -1 if a thread could not
 * be started (its share is then done by the caller). */
int lr_run(const lr_job *jobs, int64_t n_jobs, int n_threads) {
    if (n_threads < 1) n_threads = 1;
    if (n_threads > 64) n_threads = 64;
    lr_share shares[64];
    pthread_t th[64];
    int started[64] = {0}, rc = 0;
    for (int t = 0; t < n_threads; t++) shares[t] = (lr_share){jobs, n_jobs, t, n_threads};
    for (int t = 1; t < n_threads; t++)
        started[t] = pthread_create(&th[t], NULL, worker, &shares[t]) == 0;
    worker(&shares[0]);
    for (int t = 1; t < n_threads; t++) {
        if (started[t]) pthread_join(th[t], NULL);
        else { worker(&shares[t]); rc = -1; }
    }
    return rc;
}
