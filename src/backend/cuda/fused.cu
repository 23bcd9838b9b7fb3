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
 *
 * The NORM variants fold the RMSNorm in front of the projections into the GEMV (rmsnorm_matmul_multi,
 * rmsnorm_matmul_glu): every warp reads all of x anyway, so it also sums x^2 and multiplies x by
 * the norm's weight as it loads it; y = (W (nw . x)) / rms(x) is scaled once per row at the end,
 * and block 0 writes the normalized rows for LoRA or anyone else who reads them. Launches go
 * through pdl.cuh: on sm_90 a GEMV starts while the kernel before it finishes, loading its first
 * weights (and with TUNA_GEMV_PREFETCH=2 its rows into L2) before it waits for that kernel.
 */
#include <stdlib.h>

#include "backend/cuda/gemv.cuh"
#include "backend/cuda/pdl.cuh"

int tuna_cuda_gemv_prefetch(void)
{
    static int v = -1;
    if (v < 0) {
        const char *e = getenv("TUNA_GEMV_PREFETCH");
        v = e && e[0] >= '0' && e[0] <= '2' ? e[0] - '0' : 1;
    }
    return v;
}

/* One step of the loop: 8 weights of R rows (raw) against xs[t, 8ii .. 8ii+8) of TT tokens. */
template <int TT, int R>
static __device__ __forceinline__ void gemv_step(float (&acc)[R][TT], const uint4 (&raw)[R], int dtype,
                                                 const float *xs, int64_t K, int64_t ii, int lane)
{
    float wf[R][8];
#pragma unroll
    for (int r = 0; r < R; r++) tuna_cuda_unpack8(raw[r], dtype, wf[r]);
#pragma unroll
    for (int t = 0; t < TT; t++) {
        float4 a, b;
        gemv_x8(xs + t * K, ii, lane, a, b);
#pragma unroll
        for (int r = 0; r < R; r++)
            acc[r][t] += wf[r][0] * a.x + wf[r][1] * a.y + wf[r][2] * a.z + wf[r][3] * a.w + wf[r][4] * b.x +
                         wf[r][5] * b.y + wf[r][6] * b.z + wf[r][7] * b.w;
    }
}

/* The weight rows of warp-job wid (R rows; GLU: the gate row and the up row). */
template <int R>
static __device__ __forceinline__ void gemv_wrows(const struct gemv_job &j, int seg, int64_t n0, const uint4 *(&wr)[R])
{
    const int64_t K = j.K;
    if (j.mode == GEMV_GLU) {
        wr[0] = reinterpret_cast<const uint4 *>((const uint16_t *)j.s[0].W + n0 * K);
        wr[R - 1] = reinterpret_cast<const uint4 *>((const uint16_t *)j.s[1].W + n0 * K);
        return;
    }
#pragma unroll
    for (int r = 0; r < R; r++) {
        int64_t n = n0 + r < j.s[seg].N ? n0 + r : j.s[seg].N - 1; /* rows past N are not stored */
        wr[r] = reinterpret_cast<const uint4 *>((const uint16_t *)j.s[seg].W + n * K);
    }
}

/* R rows per warp (GLU: R = 2, the gate row and the up row of one output), TT tokens; about one
 * wave of blocks whose warps stride over the rows, x staged once per block (NORM: normalized). */
template <int TT, int R, bool NORM>
__global__ void __launch_bounds__(GEMV_THREADS, GEMV_BLOCKS_PER_SM) k_gemv_multi(const float *__restrict__ x,
                                                                                const struct gemv_job j)
{
    extern __shared__ float4 gemv_xs4[];
    float *xs = reinterpret_cast<float *>(gemv_xs4);
    const int lane = threadIdx.x & 31;
    const int64_t w0 = (int64_t)blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5);
    const int64_t stride = (int64_t)gridDim.x * (blockDim.x / 32);
    const int RW = j.mode == GEMV_GLU ? 1 : R;
    const int64_t K = j.K, K8 = K / 8;
    /* before the previous kernel is done: only the first row's weights, which it does not write */
    uint4 raw0[R], raw1[R];
    bool have = false;
    {
        int seg;
        int64_t n0;
        if (w0 < j.nwarp && gemv_rows(j, RW, w0, &seg, &n0)) {
            const uint4 *wr[R];
            gemv_wrows<R>(j, seg, n0, wr);
            if (j.prefetch >= 2)
#pragma unroll
                for (int r = 0; r < R; r++)
                    for (int64_t l = (int64_t)lane * 8; l < K8; l += 256) tuna_prefetch_l2(wr[r] + l);
            if (j.prefetch >= 1 && lane + 32 < K8) {
#pragma unroll
                for (int r = 0; r < R; r++) {
                    raw0[r] = __ldg(wr[r] + lane);
                    raw1[r] = __ldg(wr[r] + lane + 32);
                }
                have = true;
            }
        }
    }
    tuna_pdl_wait();
    tuna_pdl_trigger();
    gemv_stage_x<TT, NORM>(xs, x, j);
    for (int64_t wid = w0; wid < j.nwarp; wid += stride) {
        int seg;
        int64_t n0;
        if (!gemv_rows(j, RW, wid, &seg, &n0)) { /* padding rows */
            have = false;
            continue;
        }
        const uint4 *wr[R];
        gemv_wrows<R>(j, seg, n0, wr);
        float acc[R][TT], ss[TT];
#pragma unroll
        for (int t = 0; t < TT; t++) {
            ss[t] = 0.0f;
#pragma unroll
            for (int r = 0; r < R; r++) acc[r][t] = 0.0f;
        }
        int64_t i = lane;
        for (; i + 32 < K8; i += 64) {
            if (!have) {
#pragma unroll
                for (int r = 0; r < R; r++) {
                    raw0[r] = __ldg(wr[r] + i);
                    raw1[r] = __ldg(wr[r] + i + 32);
                }
            }
            have = false;
            gemv_step<TT, R>(acc, raw0, j.dtype, xs, K, i, lane);
            gemv_step<TT, R>(acc, raw1, j.dtype, xs, K, i + 32, lane);
        }
        for (; i < K8; i += 32) {
            uint4 raw[R];
#pragma unroll
            for (int r = 0; r < R; r++) raw[r] = __ldg(wr[r] + i);
            gemv_step<TT, R>(acc, raw, j.dtype, xs, K, i, lane);
        }
        have = false;
        gemv_epilogue<TT, R, false>(j, acc, ss, x, seg, n0, false);
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

static bool is_q4(const struct tuna_weight *w)
{
    return (w->dtype == TUNA_DTYPE_NF4 || w->dtype == TUNA_DTYPE_FP4) && w->q4;
}

template <int TT, int R, bool NORM>
static void launch_one(tuna_backend *be, const float *x, const struct gemv_job *j, unsigned blocks, size_t smem)
{
    tuna_cuda_launch(be, "k_gemv_multi", k_gemv_multi<TT, R, NORM>, dim3(blocks), dim3(GEMV_THREADS), smem, x, *j);
}

template <int R, bool NORM>
static void launch_tt(tuna_backend *be, const float *x, const struct gemv_job *j, unsigned blocks, size_t smem,
                      int64_t T)
{
    switch (T) {
    case 1: launch_one<1, R, NORM>(be, x, j, blocks, smem); break;
    case 2: launch_one<2, R, NORM>(be, x, j, blocks, smem); break;
    case 3: launch_one<3, R, NORM>(be, x, j, blocks, smem); break;
    case 4: launch_one<4, R, NORM>(be, x, j, blocks, smem); break;
    case 5: launch_one<5, R, NORM>(be, x, j, blocks, smem); break;
    case 6: launch_one<6, R, NORM>(be, x, j, blocks, smem); break;
    case 7: launch_one<7, R, NORM>(be, x, j, blocks, smem); break;
    case 8: launch_one<8, R, NORM>(be, x, j, blocks, smem); break;
    }
}

/* Numbers the rows, then launches the 16-bit kernel (R = 1 at T = 1, else 2; GLU always 2):
 * about GEMV_BLOCKS_PER_SM blocks per SM, fewer when there are fewer rows. False when x does not
 * fit in shared memory. */
static bool launch_multi(tuna_backend *be, const float *x, struct gemv_job *j, int64_t T)
{
    const size_t smem = (size_t)T * (size_t)j->K * sizeof(float);
    if (smem > GEMV_MAX_STAGE_BYTES) return false;
    const int R = j->mode == GEMV_GLU || T > 1 ? 2 : 1;
    const bool norm = j->nw != NULL;
    int64_t rows = j->mode == GEMV_GLU ? j->s[0].N : gemv_number_rows(j, R);
    const int64_t per_warp = j->mode == GEMV_GLU ? 1 : R;
    j->nwarp = (rows + per_warp - 1) / per_warp;
    const int64_t wpb = GEMV_THREADS / 32;
    int64_t blocks = (j->nwarp + wpb - 1) / wpb, cap = (int64_t)be->sm_count * GEMV_BLOCKS_PER_SM;
    if (cap > 0 && blocks > cap) blocks = cap;
    j->prefetch = tuna_cuda_gemv_prefetch();
    if (R == 1) {
        if (norm) launch_tt<1, true>(be, x, j, (unsigned)blocks, smem, T);
        else launch_tt<1, false>(be, x, j, (unsigned)blocks, smem, T);
    } else {
        if (norm) launch_tt<2, true>(be, x, j, (unsigned)blocks, smem, T);
        else launch_tt<2, false>(be, x, j, (unsigned)blocks, smem, T);
    }
    return true;
}

/* A job over n weights (ys[i] = x W_i^T + b_i) in mode `mode`; nw != NULL folds the RMSNorm in. */
static void job_init(struct gemv_job *j, int n, float *const *ys, const struct tuna_weight *const *ws,
                     const float *const *biases, int mode, const float *nw, float *xn, float eps)
{
    memset(j, 0, sizeof *j);
    j->nseg = n;
    j->K = ws[0]->cols;
    j->mode = mode;
    j->nw = nw;
    j->xn = xn;
    j->eps = eps;
    for (int i = 0; i < n; i++) {
        j->s[i].W = ws[i]->data;
        j->s[i].y = ys ? ys[i] : NULL;
        j->s[i].bias = biases ? biases[i] : NULL;
        j->s[i].N = ws[i]->rows;
    }
}

/* Runs the job on the 16-bit or the 4-bit grouped kernel; false when neither takes it. */
static bool run_job(tuna_backend *be, const float *x, struct gemv_job *j, const struct tuna_weight *const *ws,
                    int64_t T)
{
    if (T <= 0 || T > TUNA_CUDA_GEMV_MAX_T || ((uintptr_t)x % 16) != 0 || j->nseg > GEMV_MAX_SEG) return false;
    if (j->xn && ((uintptr_t)j->xn % 16) != 0) return false;
    if (j->nw && ((uintptr_t)j->nw % 16) != 0) return false;
    if (j->K % 8 != 0) return false;
    if (is_q4(ws[0])) {
        if (tuna_cuda_q4_old()) return false;
        for (int i = 0; i < j->nseg; i++)
            if (!is_q4(ws[i]) || ws[i]->cols != j->K) return false;
        return tuna_cuda_q4_multi(be, x, j, ws, T);
    }
    if (T > tuna_cuda_gemv_max_t16()) return false;
    int dtype = 0;
    for (int i = 0; i < j->nseg; i++)
        if (!gemv_ok(ws[i], j->K, &dtype)) return false;
    j->dtype = dtype;
    return launch_multi(be, x, j, T);
}

void tuna_cuda_matmul_multi(tuna_backend *be, int n, float *const *ys, const float *x,
                            const struct tuna_weight *const *ws, const float *const *biases, int64_t T)
{
    if (be->sticky || T <= 0 || n <= 0) return;
    struct gemv_job j;
    if (n <= GEMV_MAX_SEG) {
        job_init(&j, n, ys, ws, biases, GEMV_STORE, NULL, NULL, 0.0f);
        if (run_job(be, x, &j, ws, T)) return;
    }
    for (int i = 0; i < n; i++) tuna_cuda_matmul(be, ys[i], x, ws[i], biases ? biases[i] : NULL, T);
}

/* Scratch for the unfused fallbacks: [2, T, N] floats in be->fuse. */
static float *fuse_scratch(tuna_backend *be, size_t floats)
{
    if (!tuna_cuda_grow(be, &be->fuse, floats * sizeof(float), "cudaMalloc(fused-op scratch)")) return NULL;
    return (float *)be->fuse.p;
}

static bool glu_job(tuna_backend *be, float *out, const float *x, const struct tuna_weight *wg, const float *bg,
                    const struct tuna_weight *wu, const float *bu, int64_t T, int act, const float *nw, float *xn,
                    float eps)
{
    if (wg->rows != wu->rows || wg->cols != wu->cols) return false;
    const struct tuna_weight *ws[2] = {wg, wu};
    const float *bs[2] = {bg, bu};
    float *ys[2] = {out, NULL};
    struct gemv_job j;
    job_init(&j, 2, ys, ws, bs, GEMV_GLU, nw, xn, eps);
    j.act = act;
    return run_job(be, x, &j, ws, T);
}

void tuna_cuda_matmul_glu(tuna_backend *be, float *out, const float *x, const struct tuna_weight *wg,
                          const float *bg, const struct tuna_weight *wu, const float *bu, int64_t T, int act)
{
    if (be->sticky || T <= 0) return;
    if (glu_job(be, out, x, wg, bg, wu, bu, T, act, NULL, NULL, 0.0f)) return;
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
    struct gemv_job j;
    float *ys[1] = {y};
    job_init(&j, 1, ys, &w, &bias, GEMV_ADD, NULL, NULL, 0.0f);
    if (run_job(be, x, &j, &w, T)) return;
    float *tmp = fuse_scratch(be, (size_t)(T * w->rows));
    if (!tmp) return;
    tuna_cuda_matmul(be, tmp, x, w, bias, T);
    tuna_cuda_add(be, y, tmp, T * w->rows);
}

void tuna_cuda_rmsnorm_matmul_multi(tuna_backend *be, int n, float *const *ys, float *xn, const float *x,
                                    const float *nw, float eps, const struct tuna_weight *const *ws,
                                    const float *const *biases, int64_t T)
{
    if (be->sticky || T <= 0 || n <= 0) return;
    if (n <= GEMV_MAX_SEG) {
        struct gemv_job j;
        job_init(&j, n, ys, ws, biases, GEMV_STORE, nw, xn, eps);
        if (run_job(be, x, &j, ws, T)) return;
    }
    tuna_cuda_rmsnorm(be, xn, x, nw, T, ws[0]->cols, eps);
    tuna_cuda_matmul_multi(be, n, ys, xn, ws, biases, T);
}

void tuna_cuda_rmsnorm_matmul_glu(tuna_backend *be, float *out, float *xn, const float *x, const float *nw, float eps,
                                  const struct tuna_weight *wg, const float *bg, const struct tuna_weight *wu,
                                  const float *bu, int64_t T, int act)
{
    if (be->sticky || T <= 0) return;
    if (glu_job(be, out, x, wg, bg, wu, bu, T, act, nw, xn, eps)) return;
    tuna_cuda_rmsnorm(be, xn, x, nw, T, wg->cols, eps);
    tuna_cuda_matmul_glu(be, out, xn, wg, bg, wu, bu, T, act);
}
