/* act16.c — CPU twins of the 16-bit activation ops (act16.h): widen, the float32 op, round.
 * Scratch is malloc'd per call (test reference only); out of memory leaves the output alone. */
#include <stdlib.h>
#include <string.h>

#include "backend/cpu/act16.h"
#include "backend/cpu/cpu_internal.h"
#include "core/dtype.h"

static bool is16(enum tuna_dtype t) { return t == TUNA_DTYPE_BF16 || t == TUNA_DTYPE_F16; }

static float *widen(enum tuna_dtype adt, const void *src, size_t n)
{
    float *f = malloc((n ? n : 1) * sizeof(float));
    if (f) tuna_convert_to_f32(adt, src, f, n);
    return f;
}

void tuna_cpu_rmsnorm16(tuna_backend *be, void *y, int64_t ldy, const float *x, const float *w, int64_t T, int64_t C,
                        float eps, enum tuna_dtype adt)
{
    const size_t n = (size_t)(T * C);
    float *f = malloc((n ? n : 1) * sizeof(float));
    if (!f || !is16(adt)) {
        free(f);
        return;
    }
    if (ldy <= 0) ldy = C;
    tuna_cpu_rmsnorm(be, f, x, w, T, C, eps);
    for (int64_t t = 0; t < T; t++) /* 16-bit rows ldy elements apart */
        tuna_convert_from_f32(adt, f + t * C, (char *)y + (size_t)(t * ldy) * 2, (size_t)C);
    free(f);
}

bool tuna_cpu_matmul16(tuna_backend *be, void *y, enum tuna_dtype ydt, const void *x, enum tuna_dtype adt,
                       const struct tuna_weight *w, const float *bias, int64_t T, bool acc)
{
    if (!is16(adt) || w->dtype != adt || (ydt != TUNA_DTYPE_F32 && ydt != adt) || (acc && ydt != TUNA_DTYPE_F32))
        return false;
    if (T <= 0) return true;
    const int64_t N = w->rows, K = w->cols;
    float *xf = widen(adt, x, (size_t)(T * K)), *yf = malloc((size_t)(T * N) * sizeof(float));
    if (xf && yf) {
        tuna_cpu_matmul(be, yf, xf, w, NULL, T); /* float32 sums of the 16-bit values */
        if (ydt == TUNA_DTYPE_F32) {
            float *yo = y;
            for (int64_t i = 0; i < T * N; i++) yo[i] = (acc ? yo[i] + yf[i] : yf[i]) + (bias ? bias[i % N] : 0.0f);
        } else {
            tuna_convert_from_f32(adt, yf, y, (size_t)(T * N)); /* rounded once, as the GEMM's output */
            if (bias) {
                tuna_convert_to_f32(adt, y, yf, (size_t)(T * N));
                for (int64_t i = 0; i < T * N; i++) yf[i] += bias[i % N];
                tuna_convert_from_f32(adt, yf, y, (size_t)(T * N));
            }
        }
    }
    free(xf);
    free(yf);
    return true;
}

void tuna_cpu_rope_kv_store16(tuna_backend *be, void *q, void *k, const void *v, enum tuna_dtype adt,
                              const float *q_norm, const float *k_norm, float eps, void *kcache, void *vcache,
                              enum tuna_dtype kv_dtype, const int64_t *pos, const int64_t *slot, int64_t T, int64_t H,
                              int64_t Hkv, int64_t D, int64_t rot_dim, const float *inv_freq, float attn_factor)
{
    if (!is16(adt)) return;
    const size_t nq = (size_t)(T * H * D), nk = (size_t)(T * Hkv * D);
    float *qf = widen(adt, q, nq), *kf = widen(adt, k, nk), *vf = widen(adt, v, nk);
    if (qf && kf && vf) {
        if (q_norm) tuna_cpu_rmsnorm(be, qf, qf, q_norm, T * H, D, eps);
        if (k_norm) tuna_cpu_rmsnorm(be, kf, kf, k_norm, T * Hkv, D, eps);
        tuna_cpu_rope(be, qf, pos, T, H, D, rot_dim, inv_freq, attn_factor);
        tuna_cpu_rope(be, kf, pos, T, Hkv, D, rot_dim, inv_freq, attn_factor);
        if (kv_dtype == TUNA_DTYPE_F8_E4M3) { /* the CPU op has no fp8 store: the host twin of the GPU's */
            const int64_t HkvD = Hkv * D;
            for (int64_t t = 0; t < T; t++)
                for (int64_t i = 0; i < HkvD; i++) {
                    ((uint8_t *)kcache)[slot[t] * HkvD + i] = tuna_f32_to_f8e4m3(kf[t * HkvD + i]);
                    ((uint8_t *)vcache)[slot[t] * HkvD + i] = tuna_f32_to_f8e4m3(vf[t * HkvD + i]);
                }
        } else {
            tuna_cpu_kv_store(be, kcache, vcache, kv_dtype, kf, vf, slot, T, Hkv * D); /* from the float32 values */
        }
        tuna_convert_from_f32(adt, qf, q, nq);
        tuna_convert_from_f32(adt, kf, k, nk);
    }
    free(qf);
    free(kf);
    free(vf);
}

void tuna_cpu_attention16(tuna_backend *be, void *out, const void *q, enum tuna_dtype adt, const void *kcache,
                          const void *vcache, enum tuna_dtype kv_dtype, const struct tuna_attn_batch *b, int64_t H,
                          int64_t Hkv, int64_t D, float scale)
{
    if (!is16(adt)) return;
    const size_t n = (size_t)(b->T * H * D);
    float *qf = widen(adt, q, n), *of = malloc((n ? n : 1) * sizeof(float));
    if (qf && of) {
        tuna_cpu_attention(be, of, qf, kcache, vcache, kv_dtype, b, H, Hkv, D, scale);
        tuna_convert_from_f32(adt, of, out, n);
    }
    free(qf);
    free(of);
}

void tuna_cpu_glu16(tuna_backend *be, void *out, const void *gate, const void *up, int64_t n, int act,
                    enum tuna_dtype adt)
{
    if (!is16(adt)) return;
    float *g = widen(adt, gate, (size_t)n), *u = widen(adt, up, (size_t)n);
    if (g && u) {
        tuna_cpu_glu(be, g, g, u, n, act);
        tuna_convert_from_f32(adt, g, out, (size_t)n);
    }
    free(g);
    free(u);
}
