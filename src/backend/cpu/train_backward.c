/* train_backward.c — the backward of each forward op (declared in src/train/backward.h), the CPU
 * reference, float32 with double accumulation where a sum runs over a whole row. GEMMs go to
 * OpenBLAS when the build has it. Frozen weights are converted to float32 in row tiles (16-bit
 * and NF4 alike), never whole. train_ops.c wraps these as the CPU training op table
 * (backend/train_ops.h); they live in the CPU backend so that table has no module cycle.
 */
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/dtype.h"
#include "io/hf_config.h"
#include "quant/nf4.h"
#include "train/backward.h"

#ifndef TUNA_NO_BLAS /* -DTUNA_BLAS=OFF builds define it (src/backend/cpu/CMakeLists.txt) */
#include <cblas.h>
#define TUNA_TRAIN_BLAS 1
#endif

/* C[M,N] += alpha * op(A) op(B), row-major; ta/tb: A is stored [K,M] / B is stored [N,K]. */
static void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float *A, int64_t lda,
                 const float *B, int64_t ldb, float *C, int64_t ldc)
{
#ifdef TUNA_TRAIN_BLAS
    cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, (int)M, (int)N, (int)K,
                alpha, A, (int)lda, B, (int)ldb, 1.0f, C, (int)ldc);
#else
    for (int64_t i = 0; i < M; i++)
        for (int64_t k = 0; k < K; k++) {
            float a = alpha * (ta ? A[k * lda + i] : A[i * lda + k]);
            if (a == 0) continue;
            for (int64_t j = 0; j < N; j++)
                C[i * ldc + j] += a * (tb ? B[j * ldb + k] : B[k * ldb + j]);
        }
#endif
}

void tuna_rmsnorm_backward(float *dx, const float *dy, const float *x, const float *w, int64_t T, int64_t C, float eps)
{
    /* y_i = w_i x_i r, r = (mean(x^2) + eps)^-1/2:
     * dx_i = r (w_i dy_i) - x_i r^3 / C * sum_j (w_j dy_j x_j) */
    for (int64_t t = 0; t < T; t++) {
        const float *xr = x + t * C, *g = dy + t * C;
        double ss = 0, dot = 0;
        for (int64_t i = 0; i < C; i++) {
            ss += (double)xr[i] * xr[i];
            dot += (double)w[i] * g[i] * xr[i];
        }
        double r = 1.0 / sqrt((double)(float)(ss / (double)C) + (double)eps);
        double c = dot * r * r * r / (double)C;
        float *o = dx + t * C;
        for (int64_t i = 0; i < C; i++)
            o[i] += (float)(r * w[i] * g[i] - c * xr[i]);
    }
}

void tuna_rope_backward(float *d, const int64_t *pos, int64_t T, int64_t H, int64_t D, int64_t rot_dim,
                        const float *inv_freq, float attn_factor)
{
    const int64_t half = rot_dim / 2;
    for (int64_t t = 0; t < T; t++) {
        float p = (float)pos[t];
        for (int64_t i = 0; i < half; i++) {
            float ang = inv_freq[i] * p; /* float32, as the forward */
            float c = cosf(ang) * attn_factor, s = sinf(ang) * attn_factor;
            for (int64_t h = 0; h < H; h++) {
                float *v = d + (t * H + h) * D;
                float g1 = v[i], g2 = v[i + half];
                /* forward: y1 = x1 c - x2 s, y2 = x2 c + x1 s; transpose: */
                v[i] = g1 * c + g2 * s;
                v[i + half] = g2 * c - g1 * s;
            }
        }
    }
}

struct attn_bwd {
    float *out; /* forward: out[T, H*D] (then dq, dk, dv, dout are unused) */
    float *lse; /* forward, may be NULL: [T, H] log of the softmax denominators */
    float *dq, *dk, *dv;
    const float *dout, *q, *k, *v;
    const int64_t *pos;
    int64_t T, H, Hkv, D, window, maxlen;
    float scale;
    const int64_t *seq_start; /* [n_seq + 1] first row of each sequence, then T */
    int64_t n_seq;
    int64_t next; /* next task (atomic) */
};

/* One task = one (sequence, kv head): it writes dk, dv of that kv head's rows of the sequence
 * and dq of the query heads that read it, so tasks never write the same floats. */
static void attn_bwd_task(const struct attn_bwd *a, int64_t task, double *p)
{
    double *dp = p + a->maxlen, *acc = dp + a->maxlen;
    const int64_t s = task / a->Hkv, kvh = task % a->Hkv, group = a->H / a->Hkv;
    const int64_t D = a->D, HD = a->H * D, KD = a->Hkv * D;
    for (int64_t t = a->seq_start[s]; t < a->seq_start[s + 1]; t++) {
        int64_t lo = t - a->pos[t];
        if (a->window > 0 && a->pos[t] - a->window + 1 > 0) lo = t - (a->window - 1);
        const int64_t n = t - lo + 1;
        for (int64_t h = kvh * group; h < (kvh + 1) * group; h++) {
            const float *qt = a->q + t * HD + h * D, *go = a->dout + t * HD + h * D;
            double m = -INFINITY, sum = 0;
            for (int64_t j = 0; j < n; j++) {
                const float *kj = a->k + (lo + j) * KD + kvh * D;
                double sc = 0;
                for (int64_t e = 0; e < D; e++)
                    sc += (double)qt[e] * kj[e];
                p[j] = sc * a->scale;
                if (p[j] > m) m = p[j];
            }
            for (int64_t j = 0; j < n; j++) {
                p[j] = exp(p[j] - m);
                sum += p[j];
            }
            if (a->out) { /* forward: out = softmax v, accumulated in double */
                if (a->lse) a->lse[t * a->H + h] = (float)(m + log(sum));
                for (int64_t e = 0; e < D; e++)
                    acc[e] = 0;
                for (int64_t j = 0; j < n; j++) {
                    const float *vj = a->v + (lo + j) * KD + kvh * D;
                    const double pj = p[j] / sum;
                    for (int64_t e = 0; e < D; e++)
                        acc[e] += pj * vj[e];
                }
                float *ot = a->out + t * HD + h * D;
                for (int64_t e = 0; e < D; e++)
                    ot[e] = (float)acc[e];
                continue;
            }
            double pd = 0;
            for (int64_t j = 0; j < n; j++) {
                p[j] /= sum;
                const float *vj = a->v + (lo + j) * KD + kvh * D;
                float *dvj = a->dv + (lo + j) * KD + kvh * D;
                const float pj = (float)p[j];
                float sc = 0;
                for (int64_t e = 0; e < D; e++) {
                    sc += go[e] * vj[e];
                    dvj[e] += pj * go[e];
                }
                dp[j] = sc;
                pd += p[j] * sc;
            }
            float *dqt = a->dq + t * HD + h * D;
            for (int64_t j = 0; j < n; j++) {
                const float ds = (float)(p[j] * (dp[j] - pd) * a->scale);
                const float *kj = a->k + (lo + j) * KD + kvh * D;
                float *dkj = a->dk + (lo + j) * KD + kvh * D;
                for (int64_t e = 0; e < D; e++) {
                    dqt[e] += ds * kj[e];
                    dkj[e] += ds * qt[e];
                }
            }
        }
    }
}

static void *attn_bwd_worker(void *arg)
{
    struct attn_bwd *a = arg;
    double *p = malloc((size_t)(a->maxlen * 2 + a->D) * sizeof *p);
    if (!p) abort(); /* 16 bytes per position */
    for (;;) {
        int64_t task = __atomic_fetch_add(&a->next, 1, __ATOMIC_RELAXED);
        if (task >= a->n_seq * a->Hkv) break;
        attn_bwd_task(a, task, p);
    }
    free(p);
    return NULL;
}

static int bwd_threads = 0;
void tuna_backward_set_threads(int n)
{
    bwd_threads = n;
}

/* One pass of the forward (out != NULL) or the backward over every (sequence, kv head). */
static void attn_run(float *out, float *lse, float *dq, float *dk, float *dv, const float *dout, const float *q, const float *k,
                     const float *v, const int64_t *pos, int64_t T, int64_t H, int64_t Hkv, int64_t D, float scale,
                     int64_t window)
{
    int64_t maxlen = 1, n_seq = 0;
    for (int64_t t = 0; t < T; t++) {
        if (pos[t] + 1 > maxlen) maxlen = pos[t] + 1;
        if (pos[t] == 0) n_seq++;
    }
    int64_t *starts = malloc((size_t)(n_seq + 1) * sizeof *starts);
    if (!starts) abort();
    for (int64_t t = 0, s = 0; t < T; t++)
        if (pos[t] == 0) starts[s++] = t;
    starts[n_seq] = T;
    struct attn_bwd a = {out, lse, dq, dk, dv, dout, q, k, v, pos, T, H, Hkv, D, window, maxlen, scale, starts, n_seq, 0};
    int nt = bwd_threads > 0 ? bwd_threads : (int)sysconf(_SC_NPROCESSORS_ONLN);
    if (nt > 64) nt = 64;
    if ((int64_t)nt > n_seq * Hkv) nt = (int)(n_seq * Hkv);
    if (T * maxlen * H * D < (1 << 16)) nt = 1; /* too small to wake threads for */
    pthread_t th[64];
    int started = 0;
    for (int i = 1; i < nt; i++)
        if (pthread_create(&th[started], NULL, attn_bwd_worker, &a) == 0) started++;
    attn_bwd_worker(&a);
    for (int i = 0; i < started; i++)
        pthread_join(th[i], NULL);
    free(starts);
}

void tuna_attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *q, const float *k,
                             const float *v, const int64_t *pos, int64_t T, int64_t H, int64_t Hkv, int64_t D,
                             float scale, int64_t window)
{
    attn_run(NULL, NULL, dq, dk, dv, dout, q, k, v, pos, T, H, Hkv, D, scale, window);
}

void tuna_attention_forward_train(float *out, float *lse, const float *q, const float *k, const float *v, const int64_t *pos,
                                  int64_t T, int64_t H, int64_t Hkv, int64_t D, float scale, int64_t window)
{
    attn_run(out, lse, NULL, NULL, NULL, NULL, q, k, v, pos, T, H, Hkv, D, scale, window);
}

void tuna_glu_backward(float *dgate, float *dup, const float *dout, const float *gate, const float *up, int64_t n,
                       int act)
{
    const double kBeta = M_SQRT2 * M_2_SQRTPI * 0.5, kKappa = 0.044715;
    for (int64_t i = 0; i < n; i++) {
        double x = gate[i], g, dg;
        switch (act) {
        case TUNA_ACT_GELU_TANH: {
            double inner = kBeta * (x + kKappa * x * x * x), th = tanh(inner);
            g = 0.5 * x * (1 + th);
            dg = 0.5 * (1 + th) + 0.5 * x * (1 - th * th) * kBeta * (1 + 3 * kKappa * x * x);
            break;
        }
        case TUNA_ACT_GELU:
            g = 0.5 * x * (1 + erf(x * M_SQRT1_2));
            dg = 0.5 * (1 + erf(x * M_SQRT1_2)) + x * exp(-0.5 * x * x) * 0.5 * M_2_SQRTPI * M_SQRT1_2;
            break;
        default: {
            double sg = 1 / (1 + exp(-x));
            g = x * sg;
            dg = sg * (1 + x * (1 - sg));
            break;
        }
        }
        dgate[i] += (float)(dout[i] * up[i] * dg);
        dup[i] += (float)(dout[i] * g);
    }
}

/* rows [n0, n0+nb) of w as float32 into out [nb, K]. */
static void weight_rows_f32(const struct tuna_weight *w, int64_t n0, int64_t nb, float *out)
{
    if (w->q4) {
        tuna_q4_dequantize_rows(w->q4, n0, nb, out);
        return;
    }
    size_t esz = (size_t)tuna_dtype_bits(w->dtype) / 8;
    const char *src = (const char *)w->data + (size_t)(n0 * w->cols) * esz;
    tuna_convert_to_f32(w->dtype, src, out, (size_t)(nb * w->cols));
}

void tuna_matmul_backward(float *dx, const float *dy, const struct tuna_weight *w, int64_t T)
{
    const int64_t N = w->rows, K = w->cols;
    int64_t tile = (int64_t)(1 << 20) / (K > 0 ? K : 1); /* 4 MiB of float32 per tile */
    if (tile < 16) tile = 16;
    if (tile > N) tile = N;
    float *wt = malloc((size_t)(tile * K) * sizeof *wt);
    if (!wt) abort();
    for (int64_t n0 = 0; n0 < N; n0 += tile) {
        int64_t nb = N - n0 < tile ? N - n0 : tile;
        weight_rows_f32(w, n0, nb, wt);
        gemm(false, false, T, K, nb, 1.0f, dy + n0, N, wt, K, dx, K); /* dx += dy[:, n0:n0+nb] Wt */
    }
    free(wt);
}

void tuna_lora_backward(float *dx, float *dA, float *dB, const float *dy, const float *x, const struct tuna_lora *lora,
                        int64_t N, int64_t K, int64_t T)
{
    const int64_t R = lora->r;
    if (R == 0 || T == 0) return;
    float *u = calloc((size_t)(2 * T * R), sizeof *u);
    if (!u) abort();
    float *hx = u + T * R;
    gemm(false, false, T, R, N, 1.0f, dy, N, lora->B, R, u, R);                /* u[T,R] = dy B */
    gemm(false, true, T, R, K, 1.0f, x, K, lora->A, K, hx, R);                 /* hx[T,R] = x A^T */
    if (dx) gemm(false, false, T, K, R, lora->scale, u, R, lora->A, K, dx, K); /* dx += s u A */
    gemm(true, false, R, K, T, lora->scale, u, R, x, K, dA, K);                /* dA += s u^T x */
    gemm(true, false, N, R, T, lora->scale, dy, N, hx, R, dB, R);              /* dB += s dy^T hx */
    free(u);
}

double tuna_cross_entropy_backward(float *dlogits, const float *logits, const int32_t *target, int64_t T, int64_t V,
                                   double denom)
{
    double total = 0;
    for (int64_t t = 0; t < T; t++) {
        const float *l = logits + t * V;
        float *d = dlogits + t * V;
        int32_t y = target[t];
        if (y < 0 || y >= V) {
            memset(d, 0, (size_t)V * sizeof *d);
            continue;
        }
        double m = -INFINITY, s = 0;
        for (int64_t i = 0; i < V; i++)
            if (l[i] > m) m = l[i];
        for (int64_t i = 0; i < V; i++)
            s += exp((double)l[i] - m);
        double lse = m + log(s), ly = l[y];
        total += lse - ly;
        for (int64_t i = 0; i < V; i++)
            d[i] = (float)(exp((double)l[i] - lse) / denom);
        d[y] -= (float)(1.0 / denom);
    }
    return total;
}
