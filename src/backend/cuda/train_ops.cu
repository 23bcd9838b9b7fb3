/* train_ops.cu — the CUDA training op table (backend/train_ops.h) and its element-wise and
 * per-row ops: zero, row gather/scatter, dropout (the CPU's hash, bit for bit), the RMSNorm, RoPE
 * and GLU backwards, the fused cross-entropy (one block per row over V), the gradient norm
 * (per-block partial sums in double, added on the host in block order: deterministic) and AdamW.
 * The GEMM ops are in train_gemm.cu, attention in train_attention.cu. Host metadata (rows,
 * positions, targets, inv_freq) goes through the backend's metadata arena, as the inference ops. */
#include <math.h>
#include <string.h>

#include "backend/cuda/train_cuda.h"
#include "backend/cuda/rope.cuh"
#include "core/status.h"

#define META(be, off, type) ((type *)((char *)(be)->meta.p + (size_t)(off)))

/* Stages one host array; returns its device address or NULL (sticky error set). */
static const void *stage1(tuna_backend *be, const void *src, size_t bytes)
{
    struct cuda_meta m = {0};
    if (!tuna_cuda_meta_begin(be, &m, bytes)) return NULL;
    size_t off = (size_t)tuna_cuda_meta_stage(be, &m, src, bytes);
    if (be->sticky || !tuna_cuda_meta_flush(be, &m)) return NULL;
    return META(be, off, const void);
}

static void cu_zero(tuna_backend *be, float *p, int64_t n)
{
    if (be->sticky || n <= 0) return;
    tuna_cuda_check(be, cudaMemsetAsync(p, 0, (size_t)n * sizeof(float), be->stream), "cudaMemsetAsync(zero)");
}

__global__ void k_train_gather(float *out, const float *x, const int32_t *rows, int64_t n, int64_t C)
{
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n * C) return;
    out[i] = x[(int64_t)rows[i / C] * C + i % C];
}

__global__ void k_train_scatter_add(float *dx, const float *d, const int32_t *rows, int64_t n, int64_t C)
{
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n * C) return;
    dx[(int64_t)rows[i / C] * C + i % C] += d[i]; /* rows are distinct: no two threads share a target */
}

static void cu_gather_rows(tuna_backend *be, float *out, const float *x, const int32_t *rows, int64_t n, int64_t C)
{
    if (be->sticky || n <= 0) return;
    const int32_t *dr = (const int32_t *)stage1(be, rows, (size_t)n * sizeof(int32_t));
    if (!dr) return;
    k_train_gather<<<tuna_cuda_blocks(n * C, 256), 256, 0, be->stream>>>(out, x, dr, n, C);
    tuna_cuda_check_launch(be, "k_train_gather");
}

static void cu_scatter_add_rows(tuna_backend *be, float *dx, const float *d, const int32_t *rows, int64_t n, int64_t C)
{
    if (be->sticky || n <= 0) return;
    const int32_t *dr = (const int32_t *)stage1(be, rows, (size_t)n * sizeof(int32_t));
    if (!dr) return;
    k_train_scatter_add<<<tuna_cuda_blocks(n * C, 256), 256, 0, be->stream>>>(dx, d, dr, n, C);
    tuna_cuda_check_launch(be, "k_train_scatter_add");
}

__global__ void k_train_dropout(float *out, const float *in, int64_t n, uint64_t thresh, float keep_scale, uint64_t key)
{
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    bool keep = tuna_train_mix64(key + 0x9E3779B97F4A7C15ULL * (uint64_t)i) >= thresh;
    out[i] = keep ? in[i] * keep_scale : 0.0f;
}

static void cu_dropout(tuna_backend *be, float *out, const float *in, int64_t n, double p, uint64_t key)
{
    if (be->sticky || n <= 0) return;
    k_train_dropout<<<tuna_cuda_blocks(n, 256), 256, 0, be->stream>>>(out, in, n, tuna_train_dropout_threshold(p),
                                                                      (float)(1.0 / (1.0 - p)), key);
    tuna_cuda_check_launch(be, "k_train_dropout");
}

/* dx_i += r w_i dy_i - x_i r^3 / C * sum_j w_j dy_j x_j, r = (mean(x^2) + eps)^-1/2; one block per row */
__global__ void k_train_rmsnorm_backward(float *dx, const float *dy, const float *x, const float *w, int64_t C,
                                         float eps)
{
    __shared__ float red[64];
    const float *xr = x + (int64_t)blockIdx.x * C, *g = dy + (int64_t)blockIdx.x * C;
    float *o = dx + (int64_t)blockIdx.x * C;
    float ss = 0.0f, dot = 0.0f;
    for (int64_t i = threadIdx.x; i < C; i += blockDim.x) {
        ss += xr[i] * xr[i];
        dot += w[i] * g[i] * xr[i];
    }
    ss = tuna_block_sum(ss, red);
    dot = tuna_block_sum(dot, red);
    const float r = 1.0f / sqrtf(ss / (float)C + eps); /* as the forward (norm.cu) */
    const float c = dot * r * r * r / (float)C;
    for (int64_t i = threadIdx.x; i < C; i += blockDim.x)
        o[i] += r * w[i] * g[i] - c * xr[i];
}

static void cu_rmsnorm_backward(tuna_backend *be, float *dx, const float *dy, const float *x, const float *w, int64_t T,
                                int64_t C, float eps)
{
    if (be->sticky || T <= 0) return;
    k_train_rmsnorm_backward<<<(unsigned)T, 256, 0, be->stream>>>(dx, dy, x, w, C, eps);
    tuna_cuda_check_launch(be, "k_train_rmsnorm_backward");
}

/* the transpose of rope.cu's rotation: (g1, g2) -> (g1 c + g2 s, g2 c - g1 s) */
__global__ void k_train_rope_backward(float *d, const int64_t *pos, int64_t T, int64_t H, int64_t D, int64_t half,
                                      const float *inv_freq, float attn_factor)
{
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= T * H * half) return;
    int64_t j = i % half, th = i / half, t = th / H;
    float s, c;
    rope_cos_sin(inv_freq, j, (float)pos[t], attn_factor, &c, &s);
    float *v = d + th * D;
    float g1 = v[j], g2 = v[j + half];
    v[j] = g1 * c + g2 * s;
    v[j + half] = g2 * c - g1 * s;
}

static void cu_rope_backward(tuna_backend *be, float *d, const int64_t *pos, int64_t T, int64_t H, int64_t D,
                             int64_t rot_dim, const float *inv_freq, float attn_factor)
{
    const int64_t half = rot_dim / 2;
    if (be->sticky || T <= 0 || half <= 0) return;
    struct cuda_meta m = {0};
    if (!tuna_cuda_meta_begin(be, &m, (size_t)T * sizeof(int64_t) + (size_t)half * sizeof(float))) return;
    size_t op = (size_t)tuna_cuda_meta_stage(be, &m, pos, (size_t)T * sizeof(int64_t));
    size_t of = (size_t)tuna_cuda_meta_stage(be, &m, inv_freq, (size_t)half * sizeof(float));
    if (be->sticky || !tuna_cuda_meta_flush(be, &m)) return;
    const int64_t n = T * H * half;
    k_train_rope_backward<<<tuna_cuda_blocks(n, 256), 256, 0, be->stream>>>(
        d, META(be, op, const int64_t), T, H, D, half, META(be, of, const float), attn_factor);
    tuna_cuda_check_launch(be, "k_train_rope_backward");
}

/* act: 0 SiLU, 1 GELU tanh, 2 GELU erf (enum tuna_act), double as the CPU reference */
__global__ void k_train_glu_backward(float *dgate, float *dup, const float *dout, const float *gate, const float *up,
                                     int64_t n, int act)
{
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const double kBeta = 0.7978845608028654, kKappa = 0.044715;
    double x = gate[i], g, dg;
    if (act == 1) {
        double inner = kBeta * (x + kKappa * x * x * x), th = tanh(inner);
        g = 0.5 * x * (1 + th);
        dg = 0.5 * (1 + th) + 0.5 * x * (1 - th * th) * kBeta * (1 + 3 * kKappa * x * x);
    } else if (act == 2) {
        g = 0.5 * x * (1 + erf(x * 0.7071067811865476));
        dg = 0.5 * (1 + erf(x * 0.7071067811865476)) + x * exp(-0.5 * x * x) * 0.3989422804014327;
    } else {
        double sg = 1 / (1 + exp(-x));
        g = x * sg;
        dg = sg * (1 + x * (1 - sg));
    }
    dgate[i] += (float)(dout[i] * up[i] * dg);
    dup[i] += (float)(dout[i] * g);
}

static void cu_glu_backward(tuna_backend *be, float *dgate, float *dup, const float *dout, const float *gate,
                            const float *up, int64_t n, int act)
{
    if (be->sticky || n <= 0) return;
    k_train_glu_backward<<<tuna_cuda_blocks(n, 256), 256, 0, be->stream>>>(dgate, dup, dout, gate, up, n, act);
    tuna_cuda_check_launch(be, "k_train_glu_backward");
}

/* One block per row: max, sum of exp in double, loss, then the gradient in place. */
__global__ void k_train_cross_entropy(float *dlogits, double *loss, const float *logits, const int32_t *target,
                                      int64_t V, double inv_denom)
{
    __shared__ double red[64];
    __shared__ float redf[64];
    const int64_t t = blockIdx.x;
    const float *l = logits + t * V;
    float *d = dlogits + t * V;
    const int32_t y = target[t];
    if (y < 0 || y >= V) {
        for (int64_t i = threadIdx.x; i < V; i += blockDim.x)
            d[i] = 0.0f;
        if (threadIdx.x == 0) loss[t] = 0.0;
        return;
    }
    float mx = -INFINITY;
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x)
        mx = fmaxf(mx, l[i]);
    mx = tuna_block_max(mx, redf);
    double s = 0.0;
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x)
        s += exp((double)l[i] - (double)mx);
    s = tuna_block_sum(s, red);
    const double lse = (double)mx + log(s);
    const float ly = l[y];
    __syncthreads(); /* every thread has read l[y] before it may be overwritten (dlogits == logits) */
    if (threadIdx.x == 0) loss[t] = lse - (double)ly;
    const float fd = (float)inv_denom;
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
        float p = (float)(exp((double)l[i] - lse) * inv_denom);
        d[i] = i == y ? p - fd : p;
    }
}

static void cu_cross_entropy(tuna_backend *be, float *dlogits, double *loss, const float *logits, const int32_t *target,
                             int64_t T, int64_t V, double denom)
{
    if (be->sticky || T <= 0) return;
    const int32_t *dt = (const int32_t *)stage1(be, target, (size_t)T * sizeof(int32_t));
    if (!dt) return;
    k_train_cross_entropy<<<(unsigned)T, 512, 0, be->stream>>>(dlogits, loss, logits, dt, V, 1.0 / denom);
    tuna_cuda_check_launch(be, "k_train_cross_entropy");
}

#define NORM_BLOCKS (TUNA_TRAIN_NORM_WORK / (int)sizeof(double))

__global__ void k_train_sq_sum(double *partial, const float *g, int64_t n)
{
    __shared__ double red[64];
    double s = 0.0;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        s += (double)g[i] * g[i];
    s = tuna_block_sum(s, red);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

static double cu_grad_sq_sum(tuna_backend *be, const float *g, int64_t n, void *work)
{
    if (be->sticky) return NAN;
    if (n <= 0) return 0.0;
    double part[NORM_BLOCKS];
    k_train_sq_sum<<<NORM_BLOCKS, 256, 0, be->stream>>>((double *)work, g, n);
    if (!tuna_cuda_check_launch(be, "k_train_sq_sum")) return NAN;
    if (tuna_cuda_download(be, part, work, sizeof part)) return NAN;
    double s = 0.0;
    for (int i = 0; i < NORM_BLOCKS; i++)
        s += part[i];
    return s;
}

__global__ void k_train_adamw(float *p, float *g, float *m, float *v, int64_t n, float b1, float b2, float eps,
                              float step_size, float bc2_sqrt, float decay, double gscale)
{
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float gi = g[i];
    if (gscale != 1.0) g[i] = gi = (float)(gi * gscale);
    float pi = p[i] * decay;
    float mi = m[i] + (gi - m[i]) * (1.0f - b1); /* lerp, as torch */
    float vi = v[i] * b2 + (1.0f - b2) * gi * gi;
    float denom = sqrtf(vi) / bc2_sqrt + eps;
    p[i] = pi - step_size * (mi / denom);
    m[i] = mi;
    v[i] = vi;
}

static void cu_adamw(tuna_backend *be, float *p, float *g, float *m, float *v, int64_t n, double lr, double beta1,
                     double beta2, double eps, double weight_decay, int64_t t, double gscale)
{
    if (be->sticky || n <= 0) return;
    const double bc1 = 1.0 - pow(beta1, (double)t), bc2 = 1.0 - pow(beta2, (double)t);
    k_train_adamw<<<tuna_cuda_blocks(n, 256), 256, 0, be->stream>>>(p, g, m, v, n, (float)beta1, (float)beta2,
                                                                    (float)eps, (float)(lr / bc1), (float)sqrt(bc2),
                                                                    (float)(1.0 - lr * weight_decay), gscale);
    tuna_cuda_check_launch(be, "k_train_adamw");
}

static tuna_status cu_host_alloc(tuna_backend *be, size_t bytes, void **out)
{
    (void)be;
    *out = NULL;
    cudaError_t e = cudaMallocHost(out, bytes ? bytes : 1);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        *out = NULL;
        return tuna_fail(TUNA_E_OOM, "cudaMallocHost of %zu MiB (page-locked host memory for offloaded training "
                                     "state) failed: %s; free host memory or train without --offload",
                         bytes >> 20, cudaGetErrorString(e));
    }
    return TUNA_OK;
}

static void cu_host_free(tuna_backend *be, void *p)
{
    (void)be;
    if (p) cudaFreeHost(p);
}

static void cu_to_host(tuna_backend *be, void *dst_host, const void *src, size_t bytes)
{
    if (be->sticky || !bytes) return;
    tuna_cuda_check(be, cudaMemcpyAsync(dst_host, src, bytes, cudaMemcpyDeviceToHost, be->stream),
                    "cudaMemcpyAsync(offload to host)");
}

static void cu_from_host(tuna_backend *be, void *dst, const void *src_host, size_t bytes)
{
    if (be->sticky || !bytes) return;
    tuna_cuda_check(be, cudaMemcpyAsync(dst, src_host, bytes, cudaMemcpyHostToDevice, be->stream),
                    "cudaMemcpyAsync(offloaded state back)");
}

/* Grows buf to exactly `bytes` (rounded to cudaMalloc's 2 MiB pages) instead of
 * tuna_cuda_grow's doubling; a larger buffer is kept. */
static void reserve_exact(tuna_backend *be, struct cuda_grow_buf *buf, size_t bytes, const char *what)
{
    const size_t page = (size_t)2 << 20;
    bytes = (bytes + page - 1) / page * page;
    if (be->sticky || bytes <= buf->cap) return;
    if (buf->p) {
        if (!tuna_cuda_check(be, cudaStreamSynchronize(be->stream), "cudaStreamSynchronize")) return;
        cudaFree(buf->p);
        buf->p = NULL;
        buf->cap = 0;
    }
    if (!tuna_cuda_check(be, cudaMalloc(&buf->p, bytes), what)) return;
    buf->cap = bytes;
    be->meta_gen++; /* captured graphs may refer to the old buffer */
}

static void cu_reserve_scratch(tuna_backend *be, size_t weight_bytes, size_t half_bytes)
{
    if (weight_bytes) reserve_exact(be, &be->wdeq, weight_bytes, "cudaMalloc(4-bit weight dequantized)");
    if (half_bytes) reserve_exact(be, &be->half, half_bytes, "cudaMalloc(activations in 16-bit)");
}

/* positional: C++ has no designated initializers before C++20; the order is train_ops.h's */
static const struct tuna_train_ops k_cuda_train_ops = {
    "cuda",
    cu_zero,
    cu_gather_rows,
    cu_scatter_add_rows,
    cu_dropout,
    tuna_cuda_train_lora_forward,
    tuna_cuda_train_lora_backward,
    tuna_cuda_train_matmul_backward,
    cu_rmsnorm_backward,
    cu_rope_backward,
    tuna_cuda_train_attention_forward,
    tuna_cuda_train_attention_backward,
    cu_glu_backward,
    cu_cross_entropy,
    cu_grad_sq_sum,
    cu_adamw,
    cu_host_alloc,
    cu_host_free,
    cu_to_host,
    cu_from_host,
    cu_reserve_scratch,
    tuna_cuda_train_half_dtype,
    tuna_cuda_train_matmul16,
    tuna_cuda_train_matmul_backward16,
    tuna_cuda_train_to_half,
    tuna_cuda_train_add_rmsnorm16,
    tuna_cuda_train_glu16,
    tuna_cuda_train_rmsnorm_backward16,
    tuna_cuda_train_glu_backward16,
    tuna_cuda_train_rope_backward16,
    tuna_cuda_train_lora_backward_h,
    tuna_cuda_train_matmul16_lora,
    tuna_cuda_train_matmul_backward16_lora,
    tuna_cuda_train_matmul_backward16_lora3,
};

extern "C" const struct tuna_train_ops *tuna_cuda_train_ops(void)
{
    return &k_cuda_train_ops;
}
