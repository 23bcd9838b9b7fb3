/* gemv.cuh — the job of the grouped decode GEMVs (fused.cu for 16-bit weights, q4.cu for 4-bit):
 * up to GEMV_MAX_SEG matrices of the same K in one launch, rows numbered across them. */
#ifndef TUNA_BACKEND_CUDA_GEMV_CUH
#define TUNA_BACKEND_CUDA_GEMV_CUH

#include <string.h>

#include "backend/cuda/cuda_internal.h"

#define GEMV_MAX_SEG 4

/* The block scales of a 4-bit weight as the kernels read them (q4_absmax below): absmax[b]
 * float32, or when absmax is NULL the double-quantized form of struct tuna_cuda_q4. */
struct q4_scales {
    const float *absmax;  /* [n_blocks] or NULL */
    const uint8_t *q;     /* [n_blocks] 8-bit codes of the nested quantization */
    const float *nabs;    /* [n_blocks >> nshift] nested absmax */
    const float *ncode;   /* [256] the nested code table */
    float noff;           /* nested offset */
    int nshift;           /* log2(nested blocksize) */
};

/* Scale of block b: the float32 absmax, or the nested form rebuilt with the CPU's operations in
 * its order (q4_nested, tuna_q4_undo_double_quant: code value c * nested absmax, then + offset,
 * each rounded to float32; __fmul_rn/__fadd_rn keep nvcc from contracting them into one FMA).
 * Every 4-bit kernel rebuilds nested scales through q4_nested. */
static __device__ __forceinline__ float q4_nested(float c, float nabs, float noff)
{
    return __fadd_rn(__fmul_rn(c, nabs), noff);
}
static __device__ __forceinline__ float q4_absmax(const struct q4_scales &s, int64_t b)
{
    if (s.absmax) return __ldg(s.absmax + b);
    const float c = __ldg(s.ncode + __ldg(s.q + b));
    return q4_nested(c, __ldg(s.nabs + (b >> s.nshift)), s.noff);
}

static __device__ __forceinline__ float q4_round(float v, int mode)
{
    if (mode == 1) return __bfloat162float(__float2bfloat16_rn(v));
    if (mode == 2) return __half2float(__float2half_rn(v));
    return v;
}

/* The scales of a 4-bit weight's GPU state q, in the form above. */
static inline struct q4_scales q4_scales_of(const struct tuna_cuda_q4 *q)
{
    struct q4_scales sc;
    sc.absmax = q->absmax;
    sc.q = q->absmax ? NULL : q->qabsmax;
    sc.nabs = q->absmax ? NULL : q->nested_absmax;
    sc.ncode = q->absmax ? NULL : q->nested_code;
    sc.noff = q->absmax ? 0.0f : q->nested_offset;
    sc.nshift = q->absmax ? 0 : q->nested_shift;
    return sc;
}

/* A 4-bit weight (NF4 or FP4) on the GPU with 16-byte aligned codes: what the persistent and fused
 * decode kernels read in 16-byte pieces. */
static inline bool q4_weight_aligned(const struct tuna_weight *w)
{
    return (w->dtype == TUNA_DTYPE_NF4 || w->dtype == TUNA_DTYPE_FP4) && w->q4 && ((uintptr_t)w->data % 16) == 0;
}

/* Whether 4-bit weight q takes the same code table, blocksize and scale form as q0 (a kernel that
 * runs several weights with one set of them), and is not dequantized to float32 for prefill. */
static inline bool q4_same_form(const struct tuna_cuda_q4 *q0, const struct tuna_cuda_q4 *q)
{
    return q->blocksize == q0->blocksize && memcmp(q->lut, q0->lut, sizeof q->lut) == 0 &&
           q->prefill != TUNA_DTYPE_F32 && (q->absmax == NULL) == (q0->absmax == NULL) &&
           (q->absmax || q->nested_shift == q0->nested_shift);
}

struct gemv_seg {
    const void *W;        /* [N, K] bf16 or f16; 4-bit: packed codes */
    struct q4_scales sc;  /* 4-bit only: the block scales */
    float *y;             /* [T, N] */
    const float *bias;
    int64_t N;
    int64_t row0; /* first row of this segment in the launch's numbering (a multiple of R) */
    int64_t ld;   /* 16-bit: elements from one row of W to the next (tuna_weight_ld) */
};

struct gemv_job {
    struct gemv_seg s[GEMV_MAX_SEG];
    int nseg;
    int64_t K;
    int dtype; /* 1 bf16, 2 f16 (16-bit kernel) */
    int mode;  /* GEMV_STORE, GEMV_ADD, GEMV_GLU (s[0] gate, s[1] up, out in s[0].y) */
    int act;   /* enum tuna_act for GEMV_GLU */
    int prefetch; /* before the PDL wait: 0 nothing, 1 the first loads in registers (k_q4_h4: one step of
                     its D), 2 also the rows into L2, 3 (k_q4_h4: all D steps, a measurement) */
    /* RMSNorm folded in (the NORM kernels): x is the raw residual stream, nw [K] the norm's
     * weight; y = r_t * (W (nw . x_t)) with r_t = 1/sqrt(mean(x_t^2) + eps), and block 0 writes
     * xn [T, K] = x * r * nw (the CPU's formula) for whoever reads the normalized rows next */
    const float *nw;
    float *xn;
    float eps;
    int bs_shift; /* 4-bit: log2(blocksize) */
    int64_t nwarp; /* 4-bit: warps of work (the kernel strides over them with fewer warps) */
    /* the residual's pending part (racc.cu; T = 1, k_q4_h4 only, NULL elsewhere): a NORM job's x
     * is x + racc_value(xacc) element by element; a GEMV_ADD job of one matrix (k_q4_h4's form G =
     * 3, q4h4_store) makes y (y + racc_value(yacc)) + the sum and zeroes yacc */
    const long long *xacc;
    long long *yacc;
};

/* The job no longer carries x's pending part (racc.cu): it is folded into x first (a kernel) */
static inline void gemv_job_settle(tuna_backend *be, struct gemv_job *j)
{
    tuna_cuda_racc_settle(be, NULL);
    j->xacc = NULL;
    j->yacc = NULL;
}

/* A pending residual element in float32: the fixed-point sum (2^-32 units) of racc.cu. */
static __device__ __forceinline__ float racc_value(long long v)
{
    return __ll2float_rn(v) * 2.3283064365386963e-10f; /* 2^-32: exact */
}

enum { GEMV_STORE = 0, GEMV_ADD = 1, GEMV_GLU = 2 };

/* A job over n weights (ys[i] = x W_i^T + b_i) in mode `mode`; nw != NULL folds the RMSNorm in. */
static inline void gemv_job_init(struct gemv_job *j, int n, float *const *ys, const struct tuna_weight *const *ws,
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
        j->s[i].ld = tuna_weight_ld(ws[i]);
        j->s[i].y = ys ? ys[i] : NULL;
        j->s[i].bias = biases ? biases[i] : NULL;
        j->s[i].N = ws[i]->rows;
    }
}

/* Numbers the rows of the segments: each starts on a multiple of R so a warp's rows stay in one
 * matrix. Returns the rows of the launch. */
static inline int64_t gemv_number_rows(struct gemv_job *j, int R)
{
    int64_t rows = 0;
    for (int i = 0; i < j->nseg; i++) {
        j->s[i].row0 = rows;
        rows += (j->s[i].N + R - 1) / R * R;
    }
    return rows;
}

/* The warp's rows: segment and first row n0 of it for warp number `wid` (false for padding rows
 * past a segment's end). GLU: row n0 of gate (s[0]) and of up (s[1]). */
static __device__ __forceinline__ bool gemv_rows(const struct gemv_job &j, int R, int64_t wid, int *seg, int64_t *n0)
{
    if (j.mode == GEMV_GLU) {
        *seg = 0;
        *n0 = wid;
        return wid < j.s[0].N;
    }
    const int64_t g = wid * R;
    int s = 0;
    while (s + 1 < j.nseg && g >= j.s[s + 1].row0) s++;
    *seg = s;
    *n0 = g - j.s[s].row0;
    return *n0 < j.s[s].N;
}

/* Lane 0's store of a job's sums (already reduced over the warp): y, y +=, or the GLU (s[0] gate
 * row acc[0], s[1] up row acc[R - 1], output in s[0].y); each token's sums scaled by rn[t] (the
 * NORM kernels' 1/rms, 1.0f elsewhere). */
template <int TT, int R>
static __device__ __forceinline__ void gemv_store(const struct gemv_job &j, const float (&acc)[R][TT],
                                                  const float (&rn)[TT], int seg, int64_t n0)
{
    if (j.mode == GEMV_GLU) {
        const int64_t N = j.s[0].N;
        const float bg = j.s[0].bias ? j.s[0].bias[n0] : 0.0f, bu = j.s[1].bias ? j.s[1].bias[n0] : 0.0f;
#pragma unroll
        for (int t = 0; t < TT; t++)
            j.s[0].y[t * N + n0] = tuna_cuda_act(acc[0][t] * rn[t] + bg, j.act) * (acc[R - 1][t] * rn[t] + bu);
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
            if (j.mode == GEMV_ADD) *yp += acc[r][t] * rn[t] + b;
            else *yp = acc[r][t] * rn[t] + b;
        }
    }
}

/* Sums acc (and the NORM kernels' sums of squares) over the warp, then lane 0 stores: y, y +=, or
 * the GLU; the NORM kernels scale by 1/rms and the warp of row 0 (xn_writer) writes xn. */
template <int TT, int R, bool NORM>
static __device__ __forceinline__ void gemv_epilogue(const struct gemv_job &j, float (&acc)[R][TT], float (&ss)[TT],
                                                     const float *x, int seg, int64_t n0, bool xn_writer)
{
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int t = 0; t < TT; t++)
            for (int o = 16; o > 0; o >>= 1) acc[r][t] += __shfl_xor_sync(0xffffffffu, acc[r][t], o);
    float rn[TT];
#pragma unroll
    for (int t = 0; t < TT; t++) rn[t] = 1.0f;
    if (NORM) {
        const int64_t K = j.K;
#pragma unroll
        for (int t = 0; t < TT; t++) {
            for (int o = 16; o > 0; o >>= 1) ss[t] += __shfl_xor_sync(0xffffffffu, ss[t], o);
            rn[t] = 1.0f / sqrtf(ss[t] / (float)K + j.eps);
        }
        if (j.xn && xn_writer) {
#pragma unroll
            for (int t = 0; t < TT; t++) {
                const float4 *xr = reinterpret_cast<const float4 *>(x + t * K);
                const float4 *wr = reinterpret_cast<const float4 *>(j.nw);
                float4 *o = reinterpret_cast<float4 *>(j.xn + t * K);
                for (int64_t i = lane; i < K / 4; i += 32) {
                    float4 a = xr[i], w = __ldg(wr + i);
                    o[i] = make_float4(a.x * rn[t] * w.x, a.y * rn[t] * w.y, a.z * rn[t] * w.z, a.w * rn[t] * w.w);
                }
            }
        }
    }
    if (lane == 0) gemv_store<TT, R>(j, acc, rn, seg, n0);
}

/* The NORM kernels' x loads: sums x^2 into ss and returns x * nw. */
static __device__ __forceinline__ void gemv_norm_x(float4 &a, float4 &b, const float4 &na, const float4 &nb, float &ss)
{
    ss += a.x * a.x + a.y * a.y + a.z * a.z + a.w * a.w + b.x * b.x + b.y * b.y + b.z * b.z + b.w * b.w;
    a.x *= na.x, a.y *= na.y, a.z *= na.z, a.w *= na.w;
    b.x *= nb.x, b.y *= nb.y, b.z *= nb.z, b.w *= nb.w;
}

/* The grouped kernels' blocks: 16 warps, about two blocks per SM, each warp striding over rows. */
#define GEMV_THREADS 512
#define GEMV_BLOCKS_PER_SM 2
/* Largest x staged in shared memory (T * K floats); larger jobs take the plain ops. */
#define GEMV_MAX_STAGE_BYTES (160 * 1024)

/* Position in shared memory of x's 16-byte piece f: SWZ swizzles the pieces within each 128-byte
 * run (piece p of run g at p ^ (g & 7)), for kernels whose lanes read 16 bytes at a stride. */
template <bool SWZ>
static __device__ __forceinline__ int64_t gemv_x_pos(int64_t f)
{
    return SWZ ? ((f & ~(int64_t)7) | ((f & 7) ^ ((f >> 3) & 7))) : f;
}

/* Stages x [TT, K] in shared memory xs4 (pieces at gemv_x_pos<SWZ>), once per block (the kernels
 * read it from there: x is 2-8x the bytes of the weights it meets and L1 could not serve it fast
 * enough). NORM: xs = x * r * nw with r = 1/sqrt(mean(x^2) + eps), the CPU rmsnorm's formula
 * (red: TT * 32 floats of shared scratch for the block's sums), and block 0 writes it to j.xn in
 * x's own order. Needs K % 4 == 0; ends with __syncthreads(). */
template <int TT, bool NORM, bool SWZ>
static __device__ __forceinline__ void gemv_stage_x_at(float4 *xs4, const float *x, const struct gemv_job &j,
                                                       float *red)
{
    const int64_t K4 = j.K / 4;
    const float4 *x4 = reinterpret_cast<const float4 *>(x);
    float ss[TT];
#pragma unroll
    for (int t = 0; t < TT; t++) ss[t] = 0.0f;
    for (int64_t f = threadIdx.x; f < K4; f += blockDim.x) {
        const int64_t pos = gemv_x_pos<SWZ>(f);
#pragma unroll
        for (int t = 0; t < TT; t++) {
            const float4 a = x4[t * K4 + f];
            xs4[t * K4 + pos] = a;
            if (NORM) ss[t] += a.x * a.x + a.y * a.y + a.z * a.z + a.w * a.w;
        }
    }
    if (NORM) {
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
        for (int t = 0; t < TT; t++) {
            for (int o = 16; o > 0; o >>= 1) ss[t] += __shfl_xor_sync(0xffffffffu, ss[t], o);
            if (lane == 0) red[t * 32 + warp] = ss[t];
        }
        __syncthreads();
        float r[TT];
#pragma unroll
        for (int t = 0; t < TT; t++) {
            float a = 0.0f;
            for (int w = 0; w < nw; w++) a += red[t * 32 + w];
            r[t] = 1.0f / sqrtf(a / (float)j.K + j.eps);
        }
        const float4 *n4 = reinterpret_cast<const float4 *>(j.nw);
        float4 *xn4 = reinterpret_cast<float4 *>(j.xn);
        const bool write = j.xn && blockIdx.x == 0;
        for (int64_t f = threadIdx.x; f < K4; f += blockDim.x) {
            const int64_t pos = gemv_x_pos<SWZ>(f);
            const float4 w = __ldg(n4 + f);
#pragma unroll
            for (int t = 0; t < TT; t++) {
                float4 a = xs4[t * K4 + pos];
                a = make_float4(a.x * r[t] * w.x, a.y * r[t] * w.y, a.z * r[t] * w.z, a.w * r[t] * w.w);
                xs4[t * K4 + pos] = a;
                if (write) xn4[t * K4 + f] = a;
            }
        }
    }
    __syncthreads();
}

/* gemv_stage_x_at in x's own order with the block's own scratch (the 16-bit kernels). */
template <int TT, bool NORM>
static __device__ __forceinline__ void gemv_stage_x(float *xs, const float *x, const struct gemv_job &j)
{
    __shared__ float red[TT * 32];
    gemv_stage_x_at<TT, NORM, false>(reinterpret_cast<float4 *>(xs), x, j, red);
}

/* x[8 c .. 8 c + 8) of token row xr in shared memory as two float4: lanes whose bit 2 is set
 * read the second half first, so a quarter-warp's 16-byte reads cover all 32 banks. */
static __device__ __forceinline__ void gemv_x8(const float *xr, int64_t c, int lane, float4 &a, float4 &b)
{
    const float4 *p = reinterpret_cast<const float4 *>(xr + c * 8);
    const int sw = (lane >> 2) & 1;
    const float4 p0 = p[sw], p1 = p[sw ^ 1];
    a = sw ? p1 : p0;
    b = sw ? p0 : p1;
}

/* TUNA_GEMV_PREFETCH (0, 1, 2; default 1): what a GEMV does before waiting for the previous kernel. */
int tuna_cuda_gemv_prefetch(void);

/* 4-bit grouped GEMV (q4.cu): false when the weights do not fit its fast path (the caller then
 * runs the plain ops). */
/* TUNA_Q4_OLD=1: 4-bit weights take the first session's single-matrix kernels (comparisons). */
bool tuna_cuda_q4_old(void);

bool tuna_cuda_q4_multi(tuna_backend *be, const float *x, struct gemv_job *j, const struct tuna_weight *const *ws,
                        int64_t T);

/* k_q4_v (q4_stream.cu; TUNA_Q4_K=6): the batch-1 4-bit GEMV as one balanced stream of units per
 * warp (16-bit compute); false when the job does not fit it. j's scales and bs_shift set by the caller. */
bool tuna_cuda_q4_lean(tuna_backend *be, const float *x, struct gemv_job *j, const struct tuna_weight *const *ws,
                       const struct q4_lut *lut, int blocksize, int64_t T);

/* Whether a 4-bit job fits the register-pipeline kernels that read one matrix's scales in one form
 * (k_q4_v, k_q4_h4): T = 1, K % 32 == 0, blocksize >= 32, 1..GEMV_MAX_SEG matrices (GLU: both),
 * 16-byte aligned codes, N * K < 2^31 per matrix, every matrix's scales float32 or every one
 * nested with the same nshift. *nested: which form. */
static inline bool q4h_job_fits(const struct gemv_job *j, const struct tuna_weight *const *ws, int blocksize, int64_t T,
                                bool *nested)
{
    const int64_t K = j->K;
    if (T != 1 || K <= 0 || K % 32 != 0 || blocksize < 32) return false;
    if (j->nseg < 1 || j->nseg > GEMV_MAX_SEG || (j->mode == GEMV_GLU && j->nseg < 2)) return false;
    *nested = j->s[0].sc.absmax == NULL;
    for (int i = 0; i < j->nseg; i++)
        if (((uintptr_t)ws[i]->data % 16) != 0 || j->s[i].N * K >= ((int64_t)1 << 31) ||
            (j->s[i].sc.absmax == NULL) != *nested || (*nested && j->s[i].sc.nshift != j->s[0].sc.nshift))
            return false;
    return true;
}

/* The largest |value| of a 4-bit code table (the f16-pair kernels scale x by it). */
static inline float q4_lut_absmax(const struct q4_lut *lut)
{
    float m = 0.0f;
    for (int c = 0; c < 16; c++) m = fmaxf(m, fabsf(lut->v[c]));
    return m;
}

/* k_q4_h4 (q4_h4.cu; TUNA_Q4_K=8): k_q4_h2 with items of 4 rows; false when the job does not fit
 * it. j's scales and bs_shift set by the caller. */
bool tuna_cuda_q4_h4(tuna_backend *be, const float *x, struct gemv_job *j, const struct tuna_weight *const *ws,
                     const struct q4_lut *lut, int blocksize, int64_t T);

/* k_q4_r (q4_ring.cu; q/k/v by default, tuna_cuda_q4_ring_on): k_q4_h4 fed by bulk copies into
 * shared-memory rings; false when the job does not fit it. j's scales and bs_shift set by the
 * caller. */
bool tuna_cuda_q4_r(tuna_backend *be, const float *x, struct gemv_job *j, const struct tuna_weight *const *ws,
                    const struct q4_lut *lut, int blocksize, int64_t T);
bool tuna_cuda_q4_ring_on(const struct gemv_job *j);

/* k_q4_tc (q4_tc.cu): the 4-bit decode GEMV on the tensor cores for 1 to tuna_cuda_q4_tc_max_t()
 * tokens (the default at T >= 2; at T = 1 with TUNA_Q4_K=9); false when the job does not fit it
 * (K % 128, K >= 2048, blocksize >= 64, sm_80+, and q4h_job_fits). j's scales and bs_shift set by
 * the caller. */
bool tuna_cuda_q4_tc(tuna_backend *be, const float *x, struct gemv_job *j, const struct tuna_weight *const *ws,
                     const struct q4_lut *lut, int blocksize, int64_t T);

/* k_q4_sk (q4_sk.cu; TUNA_Q4_K=7): the batch-1 4-bit GEMV on the tensor cores, the matrix's units
 * split evenly over the grid's warps; false when the job does not fit it (T = 1, K % 256, blocksize
 * 64, sm_80+, and q4h_job_fits). j's scales and bs_shift set by the caller. */
bool tuna_cuda_q4_sk(tuna_backend *be, const float *x, struct gemv_job *j, const struct tuna_weight *const *ws,
                     const struct q4_lut *lut, int blocksize, int64_t T);

/* k_q4_s (q4_stream.cu; TUNA_Q4_K=5): the batch-1 4-bit GEMV fed through shared memory by bulk
 * copies (sm_90+, 16-bit compute); false when the job does not fit it (the caller tries the next
 * kernel). j's scales (s[i].sc) and bs_shift set by the caller. */
bool tuna_cuda_q4_stream(tuna_backend *be, const float *x, struct gemv_job *j, const struct tuna_weight *const *ws,
                         const struct q4_lut *lut, int blocksize, int64_t T);

/* Where item `it`'s two rows are: segment and first row (stores), each row's segment and index. */
static __device__ __forceinline__ void q4_item_rows(const struct gemv_job &j, int64_t it, int *seg, int64_t *n0,
                                                    int (&sg)[2], int64_t (&row)[2])
{
    if (j.mode == GEMV_GLU) {
        *seg = 0;
        *n0 = it;
        sg[0] = 0, sg[1] = 1;
        row[0] = row[1] = it;
        return;
    }
    gemv_rows(j, 2, it, seg, n0);
    const int64_t N = j.s[*seg].N;
    sg[0] = sg[1] = *seg;
    row[0] = *n0;
    row[1] = *n0 + 1 < N ? *n0 + 1 : N - 1; /* computed, not stored */
}

/* The threads that run a q4h_ helper below: NT = 0 the whole block (__syncthreads), else threads
 * 0 .. NT - 1 (a multiple of 32), which meet at named barrier 15 (a block whose other warps do
 * something else: k_q4_r's producer warp). */
template <int NT>
static __device__ __forceinline__ int q4h_nthreads(void)
{
    return NT ? NT : (int)blockDim.x;
}

template <int NT>
static __device__ __forceinline__ void q4h_sync(void)
{
    if (NT) asm volatile("bar.sync 15, %0;" ::"n"(NT) : "memory");
    else __syncthreads();
}

/* The byte -> half2 table of the f16-pair kernels (k_q4_v, k_q4_h4): [256 bytes][256], the pair
 * (lut[byte >> 4], lut[byte & 15]) at lane * 4 of the byte's row (one copy per lane, 4 lanes' copies
 * per 16-byte store), and with nested scales each segment's 256 code values into ncode
 * [GEMV_MAX_SEG][256]. slut: 16 floats of shared scratch. The caller synchronizes the block before
 * the tables are read. */
template <int NT = 0>
static __device__ __forceinline__ void q4h_fill_tables(uint8_t *tab, float *ncode, float *slut, const struct q4_lut &lut,
                                                       const struct gemv_job &j, bool nested)
{
    if (threadIdx.x < 16) slut[threadIdx.x] = lut.v[threadIdx.x];
    q4h_sync<NT>();
    for (int e = threadIdx.x; e < 256 * 8; e += q4h_nthreads<NT>()) {
        const int byte = e >> 3, l4 = e & 7;
        const __half2 v = __floats2half2_rn(slut[byte >> 4], slut[byte & 15]);
        const uint32_t u = *reinterpret_cast<const uint32_t *>(&v);
        *reinterpret_cast<uint4 *>(tab + byte * 256 + l4 * 16) = make_uint4(u, u, u, u);
    }
    if (nested)
        for (int s = 0; s < j.nseg; s++)
            for (int e = threadIdx.x; e < 256; e += q4h_nthreads<NT>()) ncode[s * 256 + e] = __ldg(j.s[s].sc.ncode + e);
}

/* The nested scales' code tables (GEMV_MAX_SEG segments of 256 floats), spread over a block of NT
 * threads: q4h_ncode_load reads this thread's values into registers (issued early, before the PDL
 * wait, so they are not queued behind the code loads), q4h_ncode_store writes them to ncode once the
 * block may write shared memory (the caller synchronizes before they are read). */
template <int NT>
static __device__ __forceinline__ void q4h_ncode_load(float (&v)[GEMV_MAX_SEG * 256 / NT], const struct gemv_job &j)
{
#pragma unroll
    for (int i = 0; i < GEMV_MAX_SEG * 256 / NT; i++) {
        const int e = threadIdx.x + i * NT, sg = e >> 8;
        v[i] = sg < j.nseg ? __ldg(j.s[sg].sc.ncode + (e & 255)) : 0.0f;
    }
}

template <int NT>
static __device__ __forceinline__ void q4h_ncode_store(float *ncode, const float (&v)[GEMV_MAX_SEG * 256 / NT],
                                                       const struct gemv_job &j)
{
#pragma unroll
    for (int i = 0; i < GEMV_MAX_SEG * 256 / NT; i++) {
        const int e = threadIdx.x + i * NT;
        if ((e >> 8) < j.nseg) ncode[e] = v[i];
    }
}

/* One row's f16 sum over a lane's 32 weights (word p of the codes against x piece p), in float32:
 * tab[(byte << 8) | lane * 4] holds the half2 of the byte's two nibbles (the byte -> half2 table of
 * k_q4_h2 in q4.cu and k_q4_s in q4_stream.cu). */
static __device__ __forceinline__ float q4h_dot(const uint8_t *tab, uint4 c, const uint4 (&xv)[4], uint32_t lane_off)
{
    __half2 d0 = __float2half2_rn(0.0f), d1 = d0;
#pragma unroll
    for (int p = 0; p < 4; p++) {
        const uint32_t w = p == 0 ? c.x : p == 1 ? c.y : p == 2 ? c.z : c.w;
        const uint32_t xw[4] = {xv[p].x, xv[p].y, xv[p].z, xv[p].w};
#pragma unroll
        for (int b = 0; b < 4; b++) {
            const uint32_t off = __byte_perm(w, lane_off, 0x5504u | ((uint32_t)b << 4));
            const __half2 t = *reinterpret_cast<const __half2 *>(tab + off);
            const __half2 xh = *reinterpret_cast<const __half2 *>(&xw[b]);
            if (p < 2) d0 = __hfma2(t, xh, d0);
            else d1 = __hfma2(t, xh, d1);
        }
    }
    const __half2 d = __hadd2(d0, d1);
    return __low2float(d) + __high2float(d);
}

/* The 4 staged 16-byte pieces of x (q4h_stage_x's layout) for the 32 weights of chunk c, as the
 * lane whose swizzle is xsw (gemv_x_pos's: ((lane >> 1) & 7) * 16) reads them for q4h_dot. */
static __device__ __forceinline__ void q4h_x_pieces(const uint8_t *xs, uint32_t c, uint32_t xsw, uint4 (&xv)[4])
{
    const uint32_t xo = (c * 64u) ^ xsw; /* piece p at xo ^ 16 p */
#pragma unroll
    for (int p = 0; p < 4; p++) xv[p] = *reinterpret_cast<const uint4 *>(xs + (xo ^ ((uint32_t)p * 16u)));
}

/* Pieces f0, f0 + n, ... (N of them, at most 4; n the threads, q4h_nthreads) of x and (NORM) of the
 * norm weight, zero past K4: all loads issued before any is used. x through L2 (ld.global.cg): in
 * the decode-layer kernel (q4_layer.cu) other SMs wrote it in the same launch, and L1 is not
 * coherent between SMs. acc: x's pending part (racc.cu), added to each element. */
template <bool NORM, int NT = 0, int N = 4>
static __device__ __forceinline__ void q4h_load4(float4 (&a)[4], float4 (&w)[4], const float4 *x4, const float4 *n4,
                                                 int K4, int f0, const longlong2 *acc = NULL)
{
    longlong2 p[N][2];
#pragma unroll
    for (int i = 0; i < N; i++) {
        const int f = f0 + i * q4h_nthreads<NT>();
        a[i] = f < K4 ? __ldcg(x4 + f) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (NORM) w[i] = f < K4 ? __ldg(n4 + f) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (acc) {
            p[i][0] = f < K4 ? __ldcg(acc + 2 * f) : make_longlong2(0, 0);
            p[i][1] = f < K4 ? __ldcg(acc + 2 * f + 1) : make_longlong2(0, 0);
        }
    }
    if (acc) /* x + its pending part, each element rounded once (as gemv_store's GEMV_ADD folds it) */
#pragma unroll
        for (int i = 0; i < N; i++)
            a[i] = make_float4(a[i].x + racc_value(p[i][0].x), a[i].y + racc_value(p[i][0].y),
                               a[i].z + racc_value(p[i][1].x), a[i].w + racc_value(p[i][1].y));
}

/* q4h_stage_x's scale for values whose largest |v| * lmax is v: s with |v * s| in [1024, 2048), 1
 * when v is 0 or not finite; *inv = 1/s (both powers of two) */
static __device__ __forceinline__ float q4h_scale(float v, float *inv)
{
    int e = v > 0.0f && v <= 3.0e38f ? ilogbf(v) : 10;
    e = e < -100 ? -100 : e;
    const float sc = ldexpf(1.0f, 10 - e);
    *inv = ldexpf(1.0f, e - 10);
    return sc;
}

/* Piece f (4 values b, times s, as two f16 pairs) of q4h_stage_x's layout into xs */
static __device__ __forceinline__ void q4h_put4(uint8_t *xs, int f, float4 b, float s)
{
    const __half2 lo = __floats2half2_rn(b.x * s, b.y * s), hi = __floats2half2_rn(b.z * s, b.w * s);
    uint2 u;
    u.x = *reinterpret_cast<const uint32_t *>(&lo);
    u.y = *reinterpret_cast<const uint32_t *>(&hi);
    *reinterpret_cast<uint2 *>(xs + gemv_x_pos<true>(f >> 1) * 16 + (f & 1) * 8) = u;
}

/* One piece a of x (w: the norm weight's) into the thread's sum of squares (NORM) and largest
 * |x (* nw)| */
template <bool NORM>
static __device__ __forceinline__ void q4h_piece_sums(float &ss, float &m, const float4 &a, const float4 &w)
{
    if (NORM) {
        ss += a.x * a.x + a.y * a.y + a.z * a.z + a.w * a.w;
        m = fmaxf(m, fmaxf(fmaxf(fabsf(a.x * w.x), fabsf(a.y * w.y)), fmaxf(fabsf(a.z * w.z), fabsf(a.w * w.w))));
    } else {
        m = fmaxf(m, fmaxf(fmaxf(fabsf(a.x), fabsf(a.y)), fmaxf(fabsf(a.z), fabsf(a.w))));
    }
}

/* Piece f of x (a; w the norm weight's) into xs: times r * nw first (NORM; written to xn4 where
 * `write`), then q4h_put4 with scale s */
template <bool NORM>
static __device__ __forceinline__ void q4h_piece_put(uint8_t *xs, int f, float4 b, const float4 &w, float r, float s,
                                                     float4 *xn4, bool write)
{
    if (NORM) {
        b = make_float4(b.x * r * w.x, b.y * r * w.y, b.z * r * w.z, b.w * r * w.w);
        if (write) xn4[f] = b;
    }
    q4h_put4(xs, f, b, s);
}

/* q4h_stage_x's reduction of the threads' sums over the block (red: 64 floats of shared scratch):
 * r = 1/rms (NORM; 1 otherwise) and the scale s of q4h_scale (|x * s| * lmax in [1024, 2048); 1
 * when the max is 0, not finite, or the table is empty), *inv = 1/s */
template <bool NORM, int NT>
static __device__ __forceinline__ float q4h_stage_reduce(float ss, float m, const struct gemv_job &j, float lmax,
                                                         float *red, float *r, float *inv)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = q4h_nthreads<NT>() >> 5;
    for (int o = 16; o > 0; o >>= 1) {
        ss += __shfl_xor_sync(0xffffffffu, ss, o);
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    }
    if (lane == 0) red[warp] = ss, red[32 + warp] = m;
    q4h_sync<NT>();
    float a = 0.0f, mm = 0.0f;
    for (int w = 0; w < nw; w++) a += red[w], mm = fmaxf(mm, red[32 + w]);
    *r = NORM ? 1.0f / sqrtf(a / (float)j.K + j.eps) : 1.0f;
    return q4h_scale(mm * *r * lmax, inv);
}

/* q4h_stage_x's first pass over x: the thread's sum of squares (NORM) and largest |x (* nw)|, N
 * pieces in flight at a time (the sums in the same order whatever N) */
template <bool NORM, int NT, int N>
static __device__ __forceinline__ void q4h_stage_sums(float &ss, float &m, const float4 *x4, const float4 *n4, int K4,
                                                      const longlong2 *acc)
{
    for (int f0 = threadIdx.x; f0 < K4; f0 += N * q4h_nthreads<NT>()) {
        float4 a[4], w[4];
        q4h_load4<NORM, NT, N>(a, w, x4, n4, K4, f0, acc);
#pragma unroll
        for (int i = 0; i < N; i++) {
            if (f0 + i * (int)q4h_nthreads<NT>() >= K4) break;
            q4h_piece_sums<NORM>(ss, m, a[i], w[i]);
        }
    }
}

/* q4h_stage_x's second pass: x (* r * nw; xn4 written where `write`) * s as f16 pieces into xs */
template <bool NORM, int NT, int N>
static __device__ __forceinline__ void q4h_stage_put(uint8_t *xs, const float4 *x4, const float4 *n4, int K4,
                                                     const longlong2 *acc, float r, float s, float4 *xn4, bool write)
{
    for (int f0 = threadIdx.x; f0 < K4; f0 += N * q4h_nthreads<NT>()) {
        float4 a[4], w[4];
        q4h_load4<NORM, NT, N>(a, w, x4, n4, K4, f0, acc);
#pragma unroll
        for (int i = 0; i < N; i++) {
            const int f = f0 + i * (int)q4h_nthreads<NT>();
            if (f >= K4) break;
            q4h_piece_put<NORM>(xs, f, a[i], w[i], r, s, xn4, write);
        }
    }
}

/* x [K] into shared memory as f16 pairs scaled by s (see k_q4_h2 in q4.cu: |x * s| * lmax in
 * [1024, 2048), red: 64 floats of shared scratch), 16-byte pieces at gemv_x_pos<true>;
 * NORM: x * r * nw first (the CPU rmsnorm's formula; block 0 writes it to j.xn + xn_off in
 * float32: xn_off = t * K for token t of several). ACC: j.xacc, x's pending part (racc.cu), is
 * added where it is set (2 pieces in flight instead of 4: its 64-bit loads take the registers).
 * Returns 1/s. Ends with __syncthreads. */
template <bool NORM, int NT = 0, bool ACC = false>
static __device__ __forceinline__ float q4h_stage_x(uint8_t *xs, const float *x, const struct gemv_job &j, float lmax,
                                                    float *red, int64_t xn_off = 0)
{
    const int K4 = (int)(j.K / 4);
    const float4 *x4 = reinterpret_cast<const float4 *>(x);
    const float4 *n4 = reinterpret_cast<const float4 *>(j.nw);
    const longlong2 *xacc = ACC ? reinterpret_cast<const longlong2 *>(j.xacc) : NULL;
    float ss = 0.0f, m = 0.0f;
    /* 4 pieces per thread in flight at a time (loads first, then the sums in the same order as
     * one at a time): K = 14336 takes 2 round trips to L2 instead of 7 */
    if (ACC && xacc) q4h_stage_sums<NORM, NT, 2>(ss, m, x4, n4, K4, xacc);
    else q4h_stage_sums<NORM, NT, 4>(ss, m, x4, n4, K4, NULL);
    float r, inv;
    const float s = q4h_stage_reduce<NORM, NT>(ss, m, j, lmax, red, &r, &inv);
    float4 *xn4 = reinterpret_cast<float4 *>(j.xn ? j.xn + xn_off : NULL);
    const bool write = NORM && j.xn && blockIdx.x == 0;
    if (ACC && xacc) q4h_stage_put<NORM, NT, 2>(xs, x4, n4, K4, xacc, r, s, xn4, write);
    else q4h_stage_put<NORM, NT, 4>(xs, x4, n4, K4, NULL, r, s, xn4, write);
    q4h_sync<NT>();
    return inv;
}

/* q4h_stage_x with all of a thread's pieces of x (and of the norm weight) loaded at once and kept in
 * registers for the second pass: one round trip to L2 instead of two (k_q4_om, where the loads
 * queue behind the weight stream). The same bits as q4h_stage_x (the sums in the same order).
 * Needs K / 4 <= NP * q4h_nthreads<NT>(). */
template <bool NORM, int NT, int NP>
static __device__ __forceinline__ float q4h_stage_x_regs(uint8_t *xs, const float *x, const struct gemv_job &j,
                                                         float lmax, float *red)
{
    const int K4 = (int)(j.K / 4), n = q4h_nthreads<NT>();
    const float4 *x4 = reinterpret_cast<const float4 *>(x);
    const float4 *n4 = reinterpret_cast<const float4 *>(j.nw);
    float4 a[NP], w[NP];
#pragma unroll
    for (int i = 0; i < NP; i++) {
        const int f = (int)threadIdx.x + i * n;
        a[i] = f < K4 ? __ldcg(x4 + f) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (NORM) w[i] = f < K4 ? __ldg(n4 + f) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
    float ss = 0.0f, m = 0.0f;
#pragma unroll
    for (int i = 0; i < NP; i++) {
        if ((int)threadIdx.x + i * n >= K4) break;
        q4h_piece_sums<NORM>(ss, m, a[i], w[i]);
    }
    float r, inv;
    const float s = q4h_stage_reduce<NORM, NT>(ss, m, j, lmax, red, &r, &inv);
    float4 *xn4 = reinterpret_cast<float4 *>(j.xn);
    const bool write = NORM && j.xn && blockIdx.x == 0;
#pragma unroll
    for (int i = 0; i < NP; i++) {
        const int f = (int)threadIdx.x + i * n;
        if (f >= K4) break;
        q4h_piece_put<NORM>(xs, f, a[i], w[i], r, s, xn4, write);
    }
    q4h_sync<NT>();
    return inv;
}

#endif
