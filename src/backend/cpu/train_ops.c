/* train_ops.c — the CPU training op table (backend/train_ops.h), the reference the CUDA twins are
 * tested against: the backward ops of train_backward.c, plus the LoRA forward, dropout, row
 * gather/scatter, the cross-entropy per row, attention over the training layout (softmax in
 * double, train_backward.c), the gradient norm and AdamW in torch's operation order. Float32
 * with double accumulation where a sum runs long.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cpu/cpu.h"
#include "backend/cpu/train_cpu.h"
#include "backend/train_ops.h"
#include "core/status.h"
#include "train/backward.h"

static void cpu_zero(tuna_backend *be, float *p, int64_t n)
{
    (void)be;
    if (n > 0) memset(p, 0, (size_t)n * sizeof *p);
}

static void cpu_gather_rows(tuna_backend *be, float *out, const float *x, const int32_t *rows, int64_t n, int64_t C)
{
    (void)be;
    for (int64_t i = 0; i < n; i++)
        memcpy(out + i * C, x + (int64_t)rows[i] * C, (size_t)C * sizeof *out);
}

static void cpu_scatter_add_rows(tuna_backend *be, float *dx, const float *d, const int32_t *rows, int64_t n, int64_t C)
{
    (void)be;
    for (int64_t i = 0; i < n; i++) {
        float *o = dx + (int64_t)rows[i] * C;
        for (int64_t c = 0; c < C; c++)
            o[c] += d[i * C + c];
    }
}

void tuna_cpu_train_dropout(float *out, const float *in, int64_t n, double p, uint64_t key)
{
    const float keep_scale = (float)(1.0 / (1.0 - p));
    const uint64_t thresh = tuna_train_dropout_threshold(p);
    for (int64_t i = 0; i < n; i++) {
        bool keep = tuna_train_mix64(key + 0x9E3779B97F4A7C15ULL * (uint64_t)i) >= thresh;
        out[i] = keep ? in[i] * keep_scale : 0.0f;
    }
}

static void cpu_dropout(tuna_backend *be, float *out, const float *in, int64_t n, double p, uint64_t key)
{
    (void)be;
    tuna_cpu_train_dropout(out, in, n, p, key);
}

/* h = A x in double per element (as the inference LoRA op), then y += s B h */
static void cpu_lora_forward(tuna_backend *be, float *y, const float *x, const struct tuna_lora *l, int64_t T,
                             int64_t N, int64_t K, float *h, bool fast)
{
    (void)be, (void)fast;
    const int64_t R = l->r;
    for (int64_t i = 0; i < T; i++)
        for (int64_t j = 0; j < R; j++) {
            double s = 0;
            for (int64_t k = 0; k < K; k++)
                s += (double)l->A[j * K + k] * x[i * K + k];
            h[i * R + j] = (float)s;
        }
    for (int64_t i = 0; i < T; i++)
        for (int64_t n = 0; n < N; n++) {
            float s = 0;
            for (int64_t j = 0; j < R; j++)
                s += l->B[n * R + j] * h[i * R + j];
            y[i * N + n] += l->scale * s;
        }
}

static void cpu_lora_backward(tuna_backend *be, float *dx, float *dA, float *dB, const float *dy, const float *x,
                              const struct tuna_lora *l, int64_t T, int64_t N, int64_t K, float *work, bool fast)
{
    (void)be, (void)fast;
    (void)work; /* train_backward.c keeps its own */
    tuna_lora_backward(dx, dA, dB, dy, x, l, N, K, T);
}

static void cpu_matmul_backward(tuna_backend *be, float *dx, const float *dy, const struct tuna_weight *w, int64_t T)
{
    (void)be;
    tuna_matmul_backward(dx, dy, w, T);
}

static void cpu_rmsnorm_backward(tuna_backend *be, float *dx, const float *dy, const float *x, const float *w,
                                 int64_t T, int64_t C, float eps)
{
    (void)be;
    tuna_rmsnorm_backward(dx, dy, x, w, T, C, eps);
}

static void cpu_rope_backward(tuna_backend *be, float *d, const int64_t *pos, int64_t T, int64_t H, int64_t D,
                              int64_t rot_dim, const float *inv_freq, float attn_factor)
{
    (void)be;
    tuna_rope_backward(d, pos, T, H, D, rot_dim, inv_freq, attn_factor);
}

static void cpu_attention_forward(tuna_backend *be, float *out, float *lse, const float *q, const float *k, const float *v,
                                  const int64_t *pos, int64_t T, int64_t H, int64_t Hkv, int64_t D, float scale,
                                  int64_t window, bool fast, float *work, int64_t work_floats)
{
    (void)fast, (void)work, (void)work_floats;
    tuna_backward_set_threads(tuna_cpu_backend_threads(be));
    tuna_attention_forward_train(out, lse, q, k, v, pos, T, H, Hkv, D, scale, window);
}

static void cpu_attention_backward(tuna_backend *be, float *dq, float *dk, float *dv, const float *dout,
                                   const float *out, const float *lse, const float *q, const float *k, const float *v, const int64_t *pos, int64_t T, int64_t H,
                                   int64_t Hkv, int64_t D, float scale, int64_t window, bool fast, float *work,
                                   int64_t work_floats)
{
    (void)fast, (void)work, (void)work_floats, (void)out, (void)lse; /* the reference recomputes them */
    tuna_backward_set_threads(tuna_cpu_backend_threads(be));
    tuna_attention_backward(dq, dk, dv, dout, q, k, v, pos, T, H, Hkv, D, scale, window);
}

static void cpu_glu_backward(tuna_backend *be, float *dgate, float *dup, const float *dout, const float *gate,
                             const float *up, int64_t n, int act)
{
    (void)be;
    tuna_glu_backward(dgate, dup, dout, gate, up, n, act);
}

static void cpu_cross_entropy(tuna_backend *be, float *dlogits, double *loss, const float *logits,
                              const int32_t *target, int64_t T, int64_t V, double denom)
{
    (void)be;
    for (int64_t t = 0; t < T; t++)
        loss[t] = tuna_cross_entropy_backward(dlogits + t * V, logits + t * V, target + t, 1, V, denom);
}

double tuna_cpu_train_sq_sum(const float *g, int64_t n)
{
    double s = 0;
    for (int64_t i = 0; i < n; i++)
        s += (double)g[i] * g[i];
    return s;
}

static double cpu_grad_sq_sum(tuna_backend *be, const float *g, int64_t n, void *work)
{
    (void)be, (void)work;
    return tuna_cpu_train_sq_sum(g, n);
}

void tuna_cpu_train_adamw(float *p, float *g, float *m, float *v, int64_t n, double lr, double beta1, double beta2,
                          double eps_d, double weight_decay, int64_t t, double gscale)
{
    if (gscale != 1.0)
        for (int64_t i = 0; i < n; i++)
            g[i] = (float)(g[i] * gscale);
    const float b1 = (float)beta1, b2 = (float)beta2, eps = (float)eps_d;
    const double bc1 = 1.0 - pow(beta1, (double)t), bc2 = 1.0 - pow(beta2, (double)t);
    const float step_size = (float)(lr / bc1), bc2_sqrt = (float)sqrt(bc2);
    const float decay = (float)(1.0 - lr * weight_decay);
    for (int64_t i = 0; i < n; i++) {
        p[i] *= decay;
        m[i] += (g[i] - m[i]) * (1.0f - b1); /* lerp, as torch */
        v[i] = v[i] * b2 + (1.0f - b2) * g[i] * g[i];
        float denom = sqrtf(v[i]) / bc2_sqrt + eps;
        p[i] -= step_size * (m[i] / denom);
    }
}

static void cpu_adamw(tuna_backend *be, float *p, float *g, float *m, float *v, int64_t n, double lr, double beta1,
                      double beta2, double eps, double weight_decay, int64_t t, double gscale)
{
    (void)be;
    tuna_cpu_train_adamw(p, g, m, v, n, lr, beta1, beta2, eps, weight_decay, t, gscale);
}

static tuna_status cpu_host_alloc(tuna_backend *be, size_t bytes, void **out)
{
    (void)be;
    *out = malloc(bytes ? bytes : 1);
    return *out ? TUNA_OK : tuna_fail_oom("host memory for offloaded training state", bytes);
}

static void cpu_host_free(tuna_backend *be, void *p)
{
    (void)be;
    free(p);
}

static void cpu_copy_host(tuna_backend *be, void *dst, const void *src, size_t bytes)
{
    (void)be;
    if (bytes) memcpy(dst, src, bytes);
}

static void cpu_reserve_scratch(tuna_backend *be, size_t weight_bytes, size_t half_bytes)
{
    (void)be, (void)weight_bytes, (void)half_bytes; /* the CPU GEMMs need no scratch of the backend's */
}

static const struct tuna_train_ops k_cpu_train_ops = {
    .name = "cpu",
    .zero = cpu_zero,
    .gather_rows = cpu_gather_rows,
    .scatter_add_rows = cpu_scatter_add_rows,
    .dropout = cpu_dropout,
    .lora_forward = cpu_lora_forward,
    .lora_backward = cpu_lora_backward,
    .matmul_backward = cpu_matmul_backward,
    .rmsnorm_backward = cpu_rmsnorm_backward,
    .rope_backward = cpu_rope_backward,
    .attention_forward = cpu_attention_forward,
    .attention_backward = cpu_attention_backward,
    .glu_backward = cpu_glu_backward,
    .cross_entropy = cpu_cross_entropy,
    .grad_sq_sum = cpu_grad_sq_sum,
    .adamw = cpu_adamw,
    .host_alloc = cpu_host_alloc,
    .host_free = cpu_host_free,
    .to_host = cpu_copy_host,
    .reserve_scratch = cpu_reserve_scratch,
    .from_host = cpu_copy_host,
};

const struct tuna_train_ops *tuna_cpu_train_ops(void)
{
    return &k_cpu_train_ops;
}
