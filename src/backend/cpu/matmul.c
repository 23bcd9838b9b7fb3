/* matmul.c — y[T,N] = x[T,K] W[N,K]^T + bias, W in its stored dtype.
 *
 * Two paths, both split over output rows n by the thread pool:
 * - few tokens (decode, T <= TUNA_MM_SMALL_T): each task streams its weight rows once and takes
 *   the dot products with every token, converting bf16 in registers. This is the memory-bound
 *   path; it reads every weight byte exactly once per step.
 * - more tokens (prefill): each task converts a tile of TUNA_CPU_TILE_ROWS weight rows to float32
 *   in its thread's scratch and multiplies with OpenBLAS sgemm. There is never a full float32
 *   copy of a weight.
 * NF4/FP4 weights (w->q4 is a struct tuna_q4_weight) dequantize with src/quant's row
 * dequantizer: a tile for the sgemm path, one row at a time into the thread's scratch for the
 * few-token path. Both need the scratch from tuna_cpu_backend_reserve().
 */
#include <assert.h>
#ifndef TUNA_NO_BLAS
#include <cblas.h>
#else
#include <stddef.h>
/* GPU-only bundles (-DTUNA_BLAS=OFF) leave OpenBLAS out: this plain loop computes the same
 * row-major y[T,N] = x[T,K] w[N,K]^T, slowly; the CPU backend is then only a test reference. */
static void sgemm_nt(int T, int N, int K, const float *x, const float *w, float *y, int ldy)
{
    for (int t = 0; t < T; t++)
        for (int n = 0; n < N; n++) {
            double s = 0;
            for (int k = 0; k < K; k++) s += (double)x[(size_t)t * K + k] * w[(size_t)n * K + k];
            y[(size_t)t * ldy + n] = (float)s;
        }
}
#endif
#include <string.h>

#include "backend/cpu/cpu_internal.h"
#include "core/dtype.h"
#include "quant/nf4.h"

#define TUNA_MM_SMALL_T 4
#define TUNA_MM_ROWS_PER_TASK 16

struct mm_args {
    tuna_backend *be;
    float *y;
    const float *x;
    const struct tuna_weight *w;
    const float *bias;
    int64_t T, N, K;
    int64_t rows_per_task;
};

/* Dots of weight row wr (bf16) with up to TUNA_MM_SMALL_T token rows of x. */
static inline __attribute__((always_inline)) void rowdot_bf16(const uint16_t *wr, const float *x,
                                                               int64_t K, int64_t T, float *out)
{
    tuna_v8f acc[TUNA_MM_SMALL_T][2];
    memset(acc, 0, sizeof acc);
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        tuna_v8f w0 = tuna_ld8_bf16(wr + k), w1 = tuna_ld8_bf16(wr + k + 8);
        for (int64_t t = 0; t < T; t++) {
            acc[t][0] += w0 * tuna_ld8(x + t * K + k);
            acc[t][1] += w1 * tuna_ld8(x + t * K + k + 8);
        }
    }
    for (int64_t t = 0; t < T; t++) {
        float s = tuna_hsum8(acc[t][0] + acc[t][1]);
        for (int64_t kk = k; kk < K; kk++) s += tuna_bf16f(wr[kk]) * x[t * K + kk];
        out[t] = s;
    }
}

/* One token, four bf16 weight rows at a time: four independent accumulator chains and one load
 * of x per four rows (decode's hot loop). Returns the first row not done. */
static inline __attribute__((always_inline)) int64_t rows4_bf16_t1(const struct mm_args *a, int64_t n0, int64_t n1)
{
    const int64_t K = a->K;
    const float *x = a->x;
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) {
        const uint16_t *w0 = (const uint16_t *)a->w->data + n * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
        tuna_v8f c0 = {0}, c1 = {0}, c2 = {0}, c3 = {0};
        int64_t k = 0;
        for (; k + 8 <= K; k += 8) {
            tuna_v8f xv = tuna_ld8(x + k);
            c0 += tuna_ld8_bf16(w0 + k) * xv;
            c1 += tuna_ld8_bf16(w1 + k) * xv;
            c2 += tuna_ld8_bf16(w2 + k) * xv;
            c3 += tuna_ld8_bf16(w3 + k) * xv;
        }
        float s0 = tuna_hsum8(c0), s1 = tuna_hsum8(c1), s2 = tuna_hsum8(c2), s3 = tuna_hsum8(c3);
        for (; k < K; k++) {
            s0 += tuna_bf16f(w0[k]) * x[k];
            s1 += tuna_bf16f(w1[k]) * x[k];
            s2 += tuna_bf16f(w2[k]) * x[k];
            s3 += tuna_bf16f(w3[k]) * x[k];
        }
        const float *b = a->bias;
        a->y[n] = s0 + (b ? b[n] : 0.0f);
        a->y[n + 1] = s1 + (b ? b[n + 1] : 0.0f);
        a->y[n + 2] = s2 + (b ? b[n + 2] : 0.0f);
        a->y[n + 3] = s3 + (b ? b[n + 3] : 0.0f);
    }
    return n;
}

TUNA_HOT static void mm_small_task(void *arg, int64_t task, int thread)
{
    const struct mm_args *a = arg;
    int64_t n0 = task * a->rows_per_task, n1 = n0 + a->rows_per_task;
    if (n1 > a->N) n1 = a->N;
    const int64_t K = a->K;
    float out[TUNA_MM_SMALL_T];
    float conv[256];
    if (a->T == 1 && a->w->dtype == TUNA_DTYPE_BF16) n0 = rows4_bf16_t1(a, n0, n1);
    for (int64_t n = n0; n < n1; n++) {
        switch (a->w->dtype) {
        case TUNA_DTYPE_BF16: {
            /* a constant T per call: the accumulators stay in registers */
            const uint16_t *wr = (const uint16_t *)a->w->data + n * K;
            switch (a->T) {
            case 1: rowdot_bf16(wr, a->x, K, 1, out); break;
            case 2: rowdot_bf16(wr, a->x, K, 2, out); break;
            case 3: rowdot_bf16(wr, a->x, K, 3, out); break;
            default: rowdot_bf16(wr, a->x, K, 4, out); break;
            }
            break;
        }
        case TUNA_DTYPE_F32: {
            const float *wr = (const float *)a->w->data + n * K;
            for (int64_t t = 0; t < a->T; t++) out[t] = tuna_dot_f32(wr, a->x + t * K, K);
            break;
        }
        case TUNA_DTYPE_F16: {
            const uint16_t *wr = (const uint16_t *)a->w->data + n * K;
            for (int64_t t = 0; t < a->T; t++) out[t] = 0;
            for (int64_t k0 = 0; k0 < K; k0 += 256) {
                int64_t nk = K - k0 < 256 ? K - k0 : 256;
                for (int64_t k = 0; k < nk; k++) conv[k] = tuna_f16_to_f32(wr[k0 + k]);
                for (int64_t t = 0; t < a->T; t++) out[t] += tuna_dot_f32(conv, a->x + t * K + k0, nk);
            }
            break;
        }
        case TUNA_DTYPE_NF4:
        case TUNA_DTYPE_FP4: {
            float *row = a->be->scratch[thread];
            tuna_q4_dequantize_rows(a->w->q4, n, 1, row);
            for (int64_t t = 0; t < a->T; t++) out[t] = tuna_dot_f32(row, a->x + t * K, K);
            break;
        }
        default:
            assert(!"matmul: weight dtype not validated at load");
            return;
        }
        for (int64_t t = 0; t < a->T; t++) a->y[t * a->N + n] = out[t] + (a->bias ? a->bias[n] : 0.0f);
    }
}

TUNA_HOT static void convert_rows(const struct tuna_weight *w, int64_t n0, int64_t nb, float *dst)
{
    size_t count = (size_t)(nb * w->cols);
    size_t off = (size_t)(n0 * w->cols);
    switch (w->dtype) {
    case TUNA_DTYPE_BF16: {
        const uint16_t *src = (const uint16_t *)w->data + off;
        size_t i = 0;
        for (; i + 8 <= count; i += 8) {
            tuna_v8f v = tuna_ld8_bf16(src + i);
            memcpy(dst + i, &v, sizeof v);
        }
        for (; i < count; i++) dst[i] = tuna_bf16f(src[i]);
        break;
    }
    case TUNA_DTYPE_F16:
        tuna_convert_to_f32(TUNA_DTYPE_F16, (const uint16_t *)w->data + off, dst, count);
        break;
    case TUNA_DTYPE_NF4:
    case TUNA_DTYPE_FP4:
        tuna_q4_dequantize_rows(w->q4, n0, nb, dst);
        break;
    default:
        assert(!"matmul: weight dtype not validated at load");
    }
}

static void mm_tile_task(void *arg, int64_t task, int thread)
{
    const struct mm_args *a = arg;
    int64_t n0 = task * a->rows_per_task, nb = a->rows_per_task;
    if (n0 + nb > a->N) nb = a->N - n0;
    const float *wt;
    if (a->w->dtype == TUNA_DTYPE_F32) {
        wt = (const float *)a->w->data + n0 * a->K;
    } else {
        float *tile = a->be->scratch[thread];
        convert_rows(a->w, n0, nb, tile);
        wt = tile;
    }
#ifndef TUNA_NO_BLAS
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)a->T, (int)nb, (int)a->K, 1.0f, a->x,
                (int)a->K, wt, (int)a->K, 0.0f, a->y + n0, (int)a->N);
#else
    sgemm_nt((int)a->T, (int)nb, (int)a->K, a->x, wt, a->y + n0, (int)a->N);
#endif
    if (a->bias)
        for (int64_t t = 0; t < a->T; t++)
            for (int64_t n = n0; n < n0 + nb; n++) a->y[t * a->N + n] += a->bias[n];
}

void tuna_cpu_matmul(tuna_backend *be, float *y, const float *x, const struct tuna_weight *w,
                     const float *bias, int64_t T)
{
    struct mm_args a = {be, y, x, w, bias, T, w->rows, w->cols, 0};
    if (T <= 0) return;
    assert(w->q4 == NULL || be->scratch_k >= w->cols); /* 4-bit needs the scratch */
    bool tiles = w->dtype == TUNA_DTYPE_F32 || (be->scratch_k >= w->cols);
    if (T > TUNA_MM_SMALL_T && tiles) {
        a.rows_per_task = TUNA_CPU_TILE_ROWS;
        tuna_cpu_run(be, (a.N + a.rows_per_task - 1) / a.rows_per_task, mm_tile_task, &a, T * a.N * a.K);
        return;
    }
    /* the small path handles any T by chunks of TUNA_MM_SMALL_T tokens */
    for (int64_t t0 = 0; t0 < T; t0 += TUNA_MM_SMALL_T) {
        a.T = T - t0 < TUNA_MM_SMALL_T ? T - t0 : TUNA_MM_SMALL_T;
        a.x = x + t0 * a.K;
        a.y = y + t0 * a.N;
        a.rows_per_task = TUNA_MM_ROWS_PER_TASK;
        tuna_cpu_run(be, (a.N + a.rows_per_task - 1) / a.rows_per_task, mm_small_task, &a, a.T * a.N * a.K);
    }
}
