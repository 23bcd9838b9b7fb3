/* fused.cu — the optional fused ops of the op table (backend.h): several projections of the
 * same input in one launch (q/k/v), gate/up with the GLU in the epilogue, and a projection
 * added straight into the residual stream. They exist for decode, where a step is a chain of
 * small GEMVs whose launches, tails and extra passes over activations cost as much as the
 * weights: one grouped GEMV keeps 132 SMs busy on 6144 rows where k or v alone (1024 rows)
 * cannot. Measured per kernel on an H200 (docs/PERFORMANCE.md).
 *
 * The GEMV: one warp per output row (or per gate/up pair), 16-byte loads of W (8 bf16/f16
 * values), two loads in flight per lane, float32 accumulation for all TT tokens at once, so
 * every weight byte is read once per step. Rows are numbered across the segments; each
 * segment starts on a multiple of R so a warp's rows stay in one matrix. Anything the kernel
 * does not cover (float32 or 4-bit weights, T above tuna_cuda_gemv_max_t16(), unaligned data) runs as
 * the plain ops, with the same results.
 */
#include "backend/cuda/cuda_internal.h"

#define GEMV_MAX_SEG 4

struct gemv_seg {
    const void *W; /* [N, K] bf16 or f16 */
    float *y;      /* [T, N] */
    const float *bias;
    int64_t N;
    int64_t row0; /* first row of this segment in the launch's numbering (a multiple of R) */
};

struct gemv_job {
    struct gemv_seg s[GEMV_MAX_SEG];
    int nseg;
    int64_t K;
    int dtype; /* 1 bf16, 2 f16 */
    int mode;  /* GEMV_STORE, GEMV_ADD, GEMV_GLU (s[0] gate, s[1] up, out in s[0].y) */
    int act;   /* enum tuna_act for GEMV_GLU */
};

enum { GEMV_STORE = 0, GEMV_ADD = 1, GEMV_GLU = 2 };

/* R rows per warp (GLU: R = 2, the gate row and the up row of one output), TT tokens. */
template <int TT, int R>
__global__ void k_gemv_multi(const float *__restrict__ x, const struct gemv_job j)
{
    const int lane = threadIdx.x & 31;
    const int64_t g = ((int64_t)blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5)) * (j.mode == GEMV_GLU ? 1 : R);
    const int64_t K = j.K;
    const uint4 *wr[R];
    int64_t n0;
    int seg = 0;
    if (j.mode == GEMV_GLU) {
        n0 = g;
        if (n0 >= j.s[0].N) return;
        wr[0] = reinterpret_cast<const uint4 *>((const uint16_t *)j.s[0].W + n0 * K);
        wr[R - 1] = reinterpret_cast<const uint4 *>((const uint16_t *)j.s[1].W + n0 * K);
    } else {
        while (seg + 1 < j.nseg && g >= j.s[seg + 1].row0) seg++;
        n0 = g - j.s[seg].row0;
        if (n0 >= j.s[seg].N) return; /* padding rows between segments */
#pragma unroll
        for (int r = 0; r < R; r++) {
            int64_t n = n0 + r < j.s[seg].N ? n0 + r : j.s[seg].N - 1; /* rows past N are not stored */
            wr[r] = reinterpret_cast<const uint4 *>((const uint16_t *)j.s[seg].W + n * K);
        }
    }
    float acc[R][TT];
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int t = 0; t < TT; t++) acc[r][t] = 0.0f;
    const int64_t K8 = K / 8;
    int64_t i = lane;
    for (; i + 32 < K8; i += 64) {
        uint4 raw0[R], raw1[R];
#pragma unroll
        for (int r = 0; r < R; r++) {
            raw0[r] = __ldg(wr[r] + i);
            raw1[r] = __ldg(wr[r] + i + 32);
        }
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int64_t ii = i + h * 32;
            float wf[R][8];
#pragma unroll
            for (int r = 0; r < R; r++) tuna_cuda_unpack8(h ? raw1[r] : raw0[r], j.dtype, wf[r]);
#pragma unroll
            for (int t = 0; t < TT; t++) {
                const float4 *xp = reinterpret_cast<const float4 *>(x + t * K + ii * 8);
                float4 a = __ldg(xp), b = __ldg(xp + 1);
#pragma unroll
                for (int r = 0; r < R; r++)
                    acc[r][t] += wf[r][0] * a.x + wf[r][1] * a.y + wf[r][2] * a.z + wf[r][3] * a.w + wf[r][4] * b.x +
                                 wf[r][5] * b.y + wf[r][6] * b.z + wf[r][7] * b.w;
            }
        }
    }
    for (; i < K8; i += 32) {
        float wf[R][8];
#pragma unroll
        for (int r = 0; r < R; r++) tuna_cuda_unpack8(__ldg(wr[r] + i), j.dtype, wf[r]);
#pragma unroll
        for (int t = 0; t < TT; t++) {
            const float4 *xp = reinterpret_cast<const float4 *>(x + t * K + i * 8);
            float4 a = __ldg(xp), b = __ldg(xp + 1);
#pragma unroll
            for (int r = 0; r < R; r++)
                acc[r][t] += wf[r][0] * a.x + wf[r][1] * a.y + wf[r][2] * a.z + wf[r][3] * a.w + wf[r][4] * b.x +
                             wf[r][5] * b.y + wf[r][6] * b.z + wf[r][7] * b.w;
        }
    }
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int t = 0; t < TT; t++)
            for (int o = 16; o > 0; o >>= 1) acc[r][t] += __shfl_xor_sync(0xffffffffu, acc[r][t], o);
    if (lane != 0) return;
    if (j.mode == GEMV_GLU) {
        const int64_t N = j.s[0].N;
        const float bg = j.s[0].bias ? j.s[0].bias[n0] : 0.0f, bu = j.s[1].bias ? j.s[1].bias[n0] : 0.0f;
#pragma unroll
        for (int t = 0; t < TT; t++) j.s[0].y[t * N + n0] = tuna_cuda_act(acc[0][t] + bg, j.act) * (acc[R - 1][t] + bu);
        return;
    }
    const struct gemv_seg *s = &j.s[seg];
#pragma unroll
    for (int r = 0; r < R; r++) {
        if (n0 + r >= s->N) break;
        const float b = s->bias ? s->bias[n0 + r] : 0.0f;
#pragma unroll
        for (int t = 0; t < TT; t++) {
            float *yp = s->y + t * s->N + n0 + r;
            if (j.mode == GEMV_ADD) *yp += acc[r][t] + b;
            else *yp = acc[r][t] + b;
        }
    }
}

/* The weight can go through the grouped kernel: 16-bit, K % 8 == 0, 16-byte aligned rows. */
static bool gemv_ok(const struct tuna_weight *w, int64_t K, int *dtype)
{
    int dt = w->dtype == TUNA_DTYPE_BF16 ? 1 : w->dtype == TUNA_DTYPE_F16 ? 2 : 0;
    if (!dt || w->cols != K || K % 8 != 0 || ((uintptr_t)w->data % 16) != 0) return false;
    if (*dtype && *dtype != dt) return false;
    *dtype = dt;
    return true;
}

template <int R>
static void launch_multi(tuna_backend *be, const float *x, const struct gemv_job *j, int64_t rows, int64_t T)
{
    const int warps = 4;
    const int64_t per_warp = j->mode == GEMV_GLU ? 1 : R;
    unsigned blocks = (unsigned)((rows + warps * per_warp - 1) / (warps * per_warp));
    switch (T) {
#define MULTI_CASE(TT)                                                                                       \
    case TT:                                                                                                 \
        k_gemv_multi<TT, R><<<blocks, warps * 32, 0, be->stream>>>(x, *j);                                 \
        break
        MULTI_CASE(1);
        MULTI_CASE(2);
        MULTI_CASE(3);
        MULTI_CASE(4);
        MULTI_CASE(5);
        MULTI_CASE(6);
        MULTI_CASE(7);
        MULTI_CASE(8);
#undef MULTI_CASE
    }
    tuna_cuda_check_launch(be, "k_gemv_multi");
}

void tuna_cuda_matmul_multi(tuna_backend *be, int n, float *const *ys, const float *x,
                            const struct tuna_weight *const *ws, const float *const *biases, int64_t T)
{
    if (be->sticky || T <= 0 || n <= 0) return;
    int dtype = 0;
    bool fused = T <= tuna_cuda_gemv_max_t16() && n <= GEMV_MAX_SEG && ((uintptr_t)x % 16) == 0;
    for (int i = 0; fused && i < n; i++) fused = gemv_ok(ws[i], ws[0]->cols, &dtype);
    if (!fused) {
        for (int i = 0; i < n; i++) tuna_cuda_matmul(be, ys[i], x, ws[i], biases ? biases[i] : NULL, T);
        return;
    }
    const int R = T == 1 ? 1 : 2;
    struct gemv_job j;
    memset(&j, 0, sizeof j);
    j.nseg = n;
    j.K = ws[0]->cols;
    j.dtype = dtype;
    j.mode = GEMV_STORE;
    int64_t rows = 0;
    for (int i = 0; i < n; i++) {
        j.s[i].W = ws[i]->data;
        j.s[i].y = ys[i];
        j.s[i].bias = biases ? biases[i] : NULL;
        j.s[i].N = ws[i]->rows;
        j.s[i].row0 = rows;
        rows += (ws[i]->rows + R - 1) / R * R;
    }
    if (R == 1) launch_multi<1>(be, x, &j, rows, T);
    else launch_multi<2>(be, x, &j, rows, T);
}

/* Scratch for the unfused fallbacks: [2, T, N] floats in be->fuse. */
static float *fuse_scratch(tuna_backend *be, size_t floats)
{
    if (!tuna_cuda_grow(be, &be->fuse, floats * sizeof(float), "cudaMalloc(fused-op scratch)")) return NULL;
    return (float *)be->fuse.p;
}

void tuna_cuda_matmul_glu(tuna_backend *be, float *out, const float *x, const struct tuna_weight *wg,
                          const float *bg, const struct tuna_weight *wu, const float *bu, int64_t T, int act)
{
    if (be->sticky || T <= 0) return;
    int dtype = 0;
    if (T <= tuna_cuda_gemv_max_t16() && ((uintptr_t)x % 16) == 0 && wg->rows == wu->rows && gemv_ok(wg, wg->cols, &dtype) &&
        gemv_ok(wu, wg->cols, &dtype)) {
        struct gemv_job j;
        memset(&j, 0, sizeof j);
        j.nseg = 2;
        j.K = wg->cols;
        j.dtype = dtype;
        j.mode = GEMV_GLU;
        j.act = act;
        j.s[0].W = wg->data;
        j.s[0].y = out;
        j.s[0].bias = bg;
        j.s[0].N = wg->rows;
        j.s[1].W = wu->data;
        j.s[1].bias = bu;
        j.s[1].N = wu->rows;
        launch_multi<2>(be, x, &j, wg->rows, T);
        return;
    }
    const int64_t NI = T * wg->rows;
    float *g = fuse_scratch(be, (size_t)(2 * NI));
    if (!g) return;
    tuna_cuda_matmul(be, g, x, wg, bg, T);
    tuna_cuda_matmul(be, g + NI, x, wu, bu, T);
    tuna_cuda_glu(be, out, g, g + NI, NI, act);
}

void tuna_cuda_matmul_add(tuna_backend *be, float *y, const float *x, const struct tuna_weight *w, const float *bias,
                          int64_t T)
{
    if (be->sticky || T <= 0) return;
    int dtype = 0;
    if (T <= tuna_cuda_gemv_max_t16() && ((uintptr_t)x % 16) == 0 && gemv_ok(w, w->cols, &dtype)) {
        struct gemv_job j;
        memset(&j, 0, sizeof j);
        j.nseg = 1;
        j.K = w->cols;
        j.dtype = dtype;
        j.mode = GEMV_ADD;
        j.s[0].W = w->data;
        j.s[0].y = y;
        j.s[0].bias = bias;
        j.s[0].N = w->rows;
        if (T == 1) launch_multi<1>(be, x, &j, w->rows, T);
        else launch_multi<2>(be, x, &j, (w->rows + 1) / 2 * 2, T);
        return;
    }
    float *tmp = fuse_scratch(be, (size_t)(T * w->rows));
    if (!tmp) return;
    tuna_cuda_matmul(be, tmp, x, w, bias, T);
    tuna_cuda_add(be, y, tmp, T * w->rows);
}
