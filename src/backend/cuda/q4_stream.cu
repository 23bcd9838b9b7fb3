/* q4_stream.cu — k_q4_s: the batch-1 4-bit decode GEMV fed through shared memory by the bulk
 * copy engine (seventh session; TUNA_Q4_K=5, sm_90+; opt-in: measured SLOWER than k_q4_h2 on the
 * H100, 150 against 77 us per layer of GEMVs, 5.65 against 3.35 ms per 8B step; docs/PERFORMANCE.md
 * says what was measured and what to try next).
 *
 * What bounded k_q4_h2 (sixth session's ncu): the warps waited for their own loads (long
 * scoreboard the top stall, DRAM 26-48% busy): each warp could keep only D steps of 16 bytes per
 * lane in registers, 16-32 KB in flight per SM where ~40 KB are needed to stream at 3 TB/s, and
 * ~4.45 instructions per weight went to the register pipeline's bookkeeping. Here the loads and
 * the arithmetic are separate warps:
 * - one producer thread per block (warp W, lane 0) copies tiles of the weight into a ring of S
 *   stages in shared memory with cp.async.bulk (one instruction per contiguous range; completion
 *   counted in bytes on the stage's "full" mbarrier) and refills a stage as soon as the compute
 *   warps have released it (its "empty" mbarrier): S - 1 stages of 8-20 KB in flight whatever the
 *   compute does. A tile is up to 2 IT consecutive rows of one matrix over the whole K (GLU: IT
 *   rows of gate and the same IT rows of up): in the bitsandbytes layout (row-major codes, the
 *   block scales in row order) its codes are ONE contiguous range, and so are its scales (8-bit
 *   nested codes or float32 absmax): the weights keep their upload layout, nothing is converted;
 * - the first S tiles are issued before the PDL wait (weights do not depend on the previous
 *   kernel), so the next matrix streams in while the block builds its tables and stages x;
 * - W compute warps (7 or 8): x (normalized when the norm is folded in) is staged as f16 pairs
 *   scaled by a power of two, as k_q4_h2 does, but in REGISTERS: each lane owns NCH fixed 32-weight
 *   chunks of K for the whole kernel (chunk c = j + LG k, j its index in its row group of LG
 *   lanes), so only the codes (one 16-byte shared-memory load per row and chunk), the scales and the
 *   byte -> half2 table are read from shared memory; the products are k_q4_h2's (q4h_dot: prmt +
 *   table load + HFMA2 per two weights, f16 sums of 16 products, float32 acc += absmax * sum):
 *   ~2 instructions per weight, no address bookkeeping per step;
 * - items (two rows, or gate and up of one output) go to NG row groups in turn across tiles. At
 *   K <= 4096 each warp is its own group ("solo": the whole K, 4 chunks per lane, lane 0 stores);
 *   above, groups of several warps split K, a warp's sums are reduced by shuffles and left in
 *   shared memory, and the last warp to finish a tile (a counter per stage) adds the groups'
 *   partial sums in warp order and stores: fixed order, deterministic;
 * - blocks are persistent (one per SM) and each takes a contiguous, balanced range of rows
 *   (outputs for the GLU), split into tiles at matrix boundaries: q/k/v and o (4096-6144 rows)
 *   fill all SMs as well as gate/up.
 * Numerics are k_q4_h2's (f16 table values, x to f16 scaled into [1024, 2048) of the table's max,
 * f16 sums of 16 products): 16-bit compute only; float32 compute keeps k_q4_tab's float2 table.
 * Needs T = 1, K % 64 == 0 and K a multiple of the blocksize (a power of two >= 32), K <= 32768,
 * 16-byte aligned codes, N * K < 2^31 per matrix, every matrix's scales in the same form. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cuda/cuda_internal.h"
#include "backend/cuda/gemv.cuh"
#include "backend/cuda/bulk.cuh"
#include "backend/cuda/pdl.cuh"

#define Q4S_SMAX 8     /* stages at most */
#define Q4S_ITMAX 16   /* items per tile at most */
#define Q4S_WMAX 10    /* compute warps at most */
#define Q4S_TAB 65536  /* [256 bytes][256]: half2 at lane * 4 (k_q4_h2's table) */
#define Q4S_NCODE (GEMV_MAX_SEG * 256 * 4)

struct q4s_param {
    int64_t rows;       /* rows of the launch (matrices numbered one after another), GLU: outputs */
    int IT, S, W, NG;   /* items per tile, stages, compute warps, row groups */
    int nested;         /* scales: 1 the 8-bit nested codes, 0 float32 absmax */
    int hint;           /* 1: the copies carry an L2 evict-first hint */
    uint32_t code_row;  /* K / 2 */
    uint32_t srow;      /* scale bytes per row */
    uint32_t scap;      /* scale bytes per stage and part */
    uint32_t stage;     /* bytes per stage */
    uint32_t off_part;  /* [S][IT][WMAX / 1][2] floats after the stages */
    float lmax;
};

/* The tile starting at row `cur` of the launch: its matrix (seg), first row (n0) and rows (nr,
 * at most cap, not past the block's end or the matrix's). GLU: outputs of gate and up. */
static __device__ __forceinline__ void q4s_tile(const struct gemv_job &j, int64_t cur, int64_t end, int cap,
                                                int *seg, int64_t *n0, int *nr)
{
    int s = 0;
    if (j.mode != GEMV_GLU)
        while (s + 1 < j.nseg && cur >= j.s[s + 1].row0) s++;
    *seg = s;
    *n0 = j.mode == GEMV_GLU ? cur : cur - j.s[s].row0;
    int64_t n = end - cur;
    if (n > cap) n = cap;
    if (n > j.s[s].N - *n0) n = j.s[s].N - *n0;
    *nr = (int)n;
}

/* The global values the store of item i of a tile needs (y when adding, the biases), loaded early
 * so that their latency hides behind the item's arithmetic; nothing when !on. */
static __device__ __forceinline__ void q4s_preload(const struct gemv_job &j, bool glu, int seg, int64_t n0, int nr,
                                                   int i, bool on, float &y0, float &y1, float &b0, float &b1)
{
    if (!on) return;
    if (glu) {
        const int64_t n = n0 + i;
        b0 = j.s[0].bias ? j.s[0].bias[n] : 0.0f;
        b1 = j.s[1].bias ? j.s[1].bias[n] : 0.0f;
        return;
    }
    const struct gemv_seg &sg = j.s[seg];
    const int64_t n = n0 + 2 * i;
    const bool two = 2 * i + 1 < nr;
    b0 = sg.bias ? sg.bias[n] : 0.0f;
    b1 = sg.bias && two ? sg.bias[n + 1] : 0.0f;
    if (j.mode == GEMV_ADD) {
        y0 = sg.y[n];
        y1 = two ? sg.y[n + 1] : 0.0f;
    }
}

/* Stores item i's sums v0, v1 (already scaled): the GLU of gate and up, or one or two rows (y
 * stored, or added to the preloaded y0, y1), with the preloaded biases. */
static __device__ __forceinline__ void q4s_store(const struct gemv_job &j, bool glu, int seg, int64_t n0, int nr, int i,
                                                 float v0, float v1, float y0, float y1, float b0, float b1)
{
    if (glu) {
        j.s[0].y[n0 + i] = tuna_cuda_act(v0 + b0, j.act) * (v1 + b1);
        return;
    }
    const struct gemv_seg &sg = j.s[seg];
    const int64_t n = n0 + 2 * i;
    const bool add = j.mode == GEMV_ADD;
    sg.y[n] = add ? y0 + (v0 + b0) : v0 + b0;
    if (2 * i + 1 < nr) sg.y[n + 1] = add ? y1 + (v1 + b1) : v1 + b1;
}

template <bool NORM, int NCH>
__global__ void __launch_bounds__((Q4S_WMAX + 1) * 32, 1)
    k_q4_s(const float *__restrict__ x, const __grid_constant__ struct gemv_job j, const __grid_constant__ struct q4_lut lut_in,
           const struct q4s_param P)
{
    extern __shared__ __align__(128) uint8_t q4s_smem[];
    uint8_t *tab = q4s_smem;                                          /* [256][256 bytes] */
    float *ncode = reinterpret_cast<float *>(q4s_smem + Q4S_TAB);     /* [GEMV_MAX_SEG][256] */
    uint8_t *stages = q4s_smem + Q4S_TAB + Q4S_NCODE;                 /* [S][stage] */
    float *part = reinterpret_cast<float *>(stages + P.off_part);     /* [S][IT][WMAX][2] */
    __shared__ uint64_t full[Q4S_SMAX], empty[Q4S_SMAX];
    __shared__ int cnt[Q4S_SMAX];
    __shared__ float slut[16];
    __shared__ float red[64];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int W = P.W, S = P.S, IT = P.IT, NG = P.NG;
    const bool glu = j.mode == GEMV_GLU;
    const int cap = glu ? IT : 2 * IT; /* rows (GLU: outputs) per tile */

    /* the block's rows: balanced, in units of items (two rows; GLU one output) */
    const int64_t G = gridDim.x, bi = blockIdx.x;
    int64_t r0, r1;
    if (glu) {
        r0 = bi * P.rows / G;
        r1 = (bi + 1) * P.rows / G;
    } else {
        const int64_t units = (P.rows + 1) / 2;
        r0 = 2 * (bi * units / G);
        r1 = 2 * ((bi + 1) * units / G);
        if (r1 > P.rows) r1 = P.rows;
    }

    if (threadIdx.x < 16) slut[threadIdx.x] = lut_in.v[threadIdx.x];
    if (threadIdx.x < Q4S_SMAX) cnt[threadIdx.x] = 0;
    if (threadIdx.x == 0) {
        for (int s = 0; s < S; s++) {
            q4s_bar_init(&full[s], 1);
            q4s_bar_init(&empty[s], (unsigned)W);
        }
        q4s_bar_fence_init();
    }
    __syncthreads();

    if (warp == W) { /* ---- the producer ---- */
        if (lane != 0) return;
        if (j.prefetch < 1) tuna_pdl_wait();
        uint64_t pol = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
        if (P.hint) asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
#endif
        int t = 0;
        for (int64_t cur = r0; cur < r1; t++) {
            int seg, nr;
            int64_t n0;
            q4s_tile(j, cur, r1, cap, &seg, &n0, &nr);
            cur += nr;
            const int s = t % S;
            if (t >= S) q4s_bar_wait(&empty[s], (uint32_t)((t / S - 1) & 1));
            uint8_t *st = stages + (size_t)s * P.stage;
            const int nparts = glu ? 2 : 1;
            uint32_t total = 0, cb[2], sb[2];
            const uint8_t *cs[2], *ss[2];
#pragma unroll
            for (int p = 0; p < 2; p++) {
                cb[p] = sb[p] = 0u, cs[p] = ss[p] = NULL;
                if (p >= nparts) break;
                const struct gemv_seg &sg = j.s[glu ? p : seg];
                cs[p] = (const uint8_t *)sg.W + (size_t)n0 * P.code_row;
                cb[p] = (uint32_t)nr * P.code_row;
                const uint8_t *sbase = P.nested ? sg.sc.q : reinterpret_cast<const uint8_t *>(sg.sc.absmax);
                const uint8_t *src = sbase + (size_t)n0 * P.srow;
                const uint32_t pad = (uint32_t)((uintptr_t)src & 15u);
                ss[p] = src - pad;
                sb[p] = (pad + (uint32_t)nr * P.srow + 15u) & ~15u;
                total += cb[p] + sb[p];
            }
            q4s_bar_expect(&full[s], total);
            const uint32_t soff = 2u * (uint32_t)IT * P.code_row;
#pragma unroll
            for (int p = 0; p < 2; p++) {
                if (p >= nparts) break;
                q4s_copy(st + (size_t)p * IT * P.code_row, cs[p], cb[p], &full[s], P.hint, pol);
                q4s_copy(st + soff + (size_t)p * P.scap, ss[p], sb[p], &full[s], P.hint, pol);
            }
        }
        return;
    }

    /* ---- the compute warps ---- */
    const int nthr = W * 32;
    for (int e = threadIdx.x; e < 256 * 8; e += nthr) { /* the 32 lanes' copies: 8 16-byte stores per byte */
        const int byte = e >> 3;
        const __half2 h = __floats2half2_rn(slut[byte >> 4], slut[byte & 15]);
        const uint32_t u = *reinterpret_cast<const uint32_t *>(&h);
        *reinterpret_cast<uint4 *>(tab + byte * 256 + (e & 7) * 16) = make_uint4(u, u, u, u);
    }
    if (P.nested)
        for (int s = 0; s < j.nseg; s++)
            for (int e = threadIdx.x; e < 256; e += nthr) ncode[s * 256 + e] = __ldg(j.s[s].sc.ncode + e);
    tuna_pdl_wait();
    tuna_pdl_trigger();

    /* x: max |x| (normalized) and the sum of squares over the block, then each lane's own chunks
     * as f16 pairs scaled by s in registers (k_q4_h2's q4h_stage_x, in registers) */
    const int K4 = (int)(j.K / 4), K32 = (int)(j.K / 32);
    const float4 *x4 = reinterpret_cast<const float4 *>(x);
    const float4 *n4 = reinterpret_cast<const float4 *>(j.nw);
    float ssq = 0.0f, m = 0.0f;
    for (int f = threadIdx.x; f < K4; f += nthr) {
        const float4 a = x4[f];
        if (NORM) {
            ssq += a.x * a.x + a.y * a.y + a.z * a.z + a.w * a.w;
            const float4 w = __ldg(n4 + f);
            m = fmaxf(m, fmaxf(fmaxf(fabsf(a.x * w.x), fabsf(a.y * w.y)), fmaxf(fabsf(a.z * w.z), fabsf(a.w * w.w))));
        } else {
            m = fmaxf(m, fmaxf(fmaxf(fabsf(a.x), fabsf(a.y)), fmaxf(fabsf(a.z), fabsf(a.w))));
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        ssq += __shfl_xor_sync(0xffffffffu, ssq, o);
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    }
    if (lane == 0) red[warp] = ssq, red[32 + warp] = m;
    asm volatile("bar.sync 1, %0;" ::"r"(nthr) : "memory"); /* also: the tables are written */
    float asum = 0.0f, mm = 0.0f;
    for (int w = 0; w < W; w++) asum += red[w], mm = fmaxf(mm, red[32 + w]);
    const float r = NORM ? 1.0f / sqrtf(asum / (float)j.K + j.eps) : 1.0f;
    float inv_s;
    const float sc = q4h_scale(mm * r * P.lmax, &inv_s);

    const int g = warp % NG, wg = warp / NG, WG = W / NG, LG = 32 * WG;
    const int jl = wg * 32 + lane;
    uint4 xr[NCH][4];
#pragma unroll
    for (int k = 0; k < NCH; k++) {
        const int c = jl + LG * k;
#pragma unroll
        for (int p = 0; p < 4; p++) xr[k][p] = make_uint4(0u, 0u, 0u, 0u);
        if (c < K32) {
#pragma unroll
            for (int p = 0; p < 4; p++) {
                uint32_t h[4];
#pragma unroll
                for (int q = 0; q < 2; q++) {
                    const int f = c * 8 + p * 2 + q;
                    float4 a = x4[f];
                    if (NORM) {
                        const float4 w = __ldg(n4 + f);
                        a = make_float4(a.x * r * w.x, a.y * r * w.y, a.z * r * w.z, a.w * r * w.w);
                        if (j.xn && blockIdx.x == 0 && g == 0) reinterpret_cast<float4 *>(j.xn)[f] = a;
                    }
                    const __half2 lo = __floats2half2_rn(a.x * sc, a.y * sc), hi = __floats2half2_rn(a.z * sc, a.w * sc);
                    h[2 * q] = *reinterpret_cast<const uint32_t *>(&lo);
                    h[2 * q + 1] = *reinterpret_cast<const uint32_t *>(&hi);
                }
                xr[k][p] = make_uint4(h[0], h[1], h[2], h[3]);
            }
        }
    }

    const uint32_t lane_off = (uint32_t)lane * 4u;
    const int bs_shift = j.bs_shift;
    const uint32_t soff = 2u * (uint32_t)IT * P.code_row;
    const uint32_t kb = (uint32_t)(j.K >> bs_shift); /* scale blocks per row */
    const bool solo = WG == 1; /* one warp per item over the whole K: no sums across warps */
    int64_t ibase = 0;
    int t = 0;
    for (int64_t cur = r0; cur < r1; t++) {
        int seg, nr;
        int64_t n0;
        q4s_tile(j, cur, r1, cap, &seg, &n0, &nr);
        cur += nr;
        const int s = t % S;
        const int nitems = glu ? nr : (nr + 1) / 2;
        const uint8_t *st = stages + (size_t)s * P.stage;
        /* where each part's scales start in the stage (the copy began at a 16-byte boundary);
         * row q of an item lies in part q (GLU: gate, up) or both in part 0 */
        const int seg1 = glu ? 1 : seg;
        const uint8_t *sb0 = P.nested ? j.s[seg].sc.q : reinterpret_cast<const uint8_t *>(j.s[seg].sc.absmax);
        const uint8_t *sb1 = P.nested ? j.s[seg1].sc.q : reinterpret_cast<const uint8_t *>(j.s[seg1].sc.absmax);
        const uint32_t pad0 = (uint32_t)((uintptr_t)(sb0 + (size_t)n0 * P.srow) & 15u);
        const uint32_t pad1 = (uint32_t)((uintptr_t)(sb1 + (size_t)n0 * P.srow) & 15u);
        /* items go to the groups in turn across tiles (item ibase + i to group (ibase + i) % NG) */
        const int i0 = (int)(((int64_t)g - ibase % NG + NG) % NG);
        /* what the stores need from global memory, loaded before the wait: y (added) and the biases
         * of the first item this warp takes, lane 0 (solo) or lane i of the tile's items */
        float yv0 = 0.0f, yv1 = 0.0f, bv0 = 0.0f, bv1 = 0.0f;
        q4s_preload(j, glu, seg, n0, nr, solo ? i0 : lane, solo ? lane == 0 && i0 < nitems : lane < nitems, yv0, yv1,
                    bv0, bv1);
        q4s_bar_wait(&full[s], (uint32_t)((t / S) & 1));
        for (int i = i0; i < nitems; i += NG) {
            const int sl0 = glu ? i : 2 * i, sl1 = glu ? IT + i : (2 * i + 1 < nr ? 2 * i + 1 : 2 * i);
            const int rw1 = glu ? i : sl1; /* row of the second one in its matrix, from n0 */
            const uint8_t *cp[2], *sp[2];
            const float *nabs[2];
            float noff[2];
            int nco[2];
            uint32_t erow[2];
            cp[0] = st + (size_t)sl0 * P.code_row;
            cp[1] = st + (size_t)sl1 * P.code_row;
            sp[0] = st + soff + pad0 + (size_t)sl0 * P.srow;
            sp[1] = st + soff + (glu ? P.scap + pad1 : pad0) + (size_t)rw1 * P.srow;
            nabs[0] = j.s[seg].sc.nabs, nabs[1] = j.s[seg1].sc.nabs;
            noff[0] = j.s[seg].sc.noff, noff[1] = j.s[seg1].sc.noff;
            nco[0] = seg * 256, nco[1] = seg1 * 256;
            erow[0] = (uint32_t)(n0 + sl0) * kb; /* the row's first scale block in its matrix */
            erow[1] = (uint32_t)(n0 + rw1) * kb;
            float acc0 = 0.0f, acc1 = 0.0f;
#pragma unroll
            for (int k = 0; k < NCH; k++) {
                const int c = jl + LG * k;
                if (c < K32) {
                    const uint32_t blk = ((uint32_t)c * 32u) >> bs_shift;
                    float am[2], d[2];
#pragma unroll
                    for (int q = 0; q < 2; q++) {
                        const uint4 cw = *reinterpret_cast<const uint4 *>(cp[q] + (size_t)c * 16);
                        d[q] = q4h_dot(tab, cw, xr[k], lane_off);
                        if (P.nested) {
                            const uint32_t qc = sp[q][blk];
                            const float na = __ldg(nabs[q] + ((erow[q] + blk) >> j.s[0].sc.nshift));
                            am[q] = q4_nested(ncode[nco[q] + qc], na, noff[q]);
                        } else {
                            am[q] = reinterpret_cast<const float *>(sp[q])[blk];
                        }
                    }
                    acc0 += am[0] * d[0];
                    acc1 += am[1] * d[1];
                }
            }
            for (int o = 16; o > 0; o >>= 1) {
                acc0 += __shfl_xor_sync(0xffffffffu, acc0, o);
                acc1 += __shfl_xor_sync(0xffffffffu, acc1, o);
            }
            if (solo) { /* the warp has the item's sums: lane 0 stores */
                if (lane == 0) {
                    if (i != i0) q4s_preload(j, glu, seg, n0, nr, i, true, yv0, yv1, bv0, bv1);
                    q4s_store(j, glu, seg, n0, nr, i, acc0 * inv_s, acc1 * inv_s, yv0, yv1, bv0, bv1);
                }
            } else if (lane == 0) {
                float *pp = part + (((size_t)s * IT + i) * Q4S_WMAX + wg) * 2;
                pp[0] = acc0;
                pp[1] = acc1;
            }
        }
        ibase += nitems;
        if (solo) {
            __syncwarp();
            if (lane == 0) q4s_bar_arrive(&empty[s]);
            continue;
        }
        /* the last warp done with the tile adds the groups' sums in warp order and stores */
        __syncwarp();
        int old = 0;
        if (lane == 0) {
            __threadfence_block();
            old = atomicAdd(&cnt[s], 1);
        }
        old = __shfl_sync(0xffffffffu, old, 0);
        if (old == W - 1) {
            __threadfence_block();
            for (int i = lane; i < nitems; i += 32) {
                const volatile float *pp = part + ((size_t)s * IT + i) * Q4S_WMAX * 2;
                float v0 = 0.0f, v1 = 0.0f;
                for (int w = 0; w < WG; w++) v0 += pp[2 * w], v1 += pp[2 * w + 1];
                q4s_store(j, glu, seg, n0, nr, i, v0 * inv_s, v1 * inv_s, yv0, yv1, bv0, bv1);
            }
            if (lane == 0) cnt[s] = 0;
        }
        __syncwarp();
        if (lane == 0) q4s_bar_arrive(&empty[s]);
    }
}

static long g_q4s_launches;

extern "C" long tuna_cuda_q4_stream_launches(tuna_backend *be)
{
    return be && be->cc_major >= 9 ? g_q4s_launches : -1;
}

/* TUNA_Q4_ST="S,KB,H": stages (2..8, default 6), target stage size in KiB (default 20), L2
 * evict-first hint on the copies (0/1, default 0). Read at every call (cheap; graphs capture). */
static void q4s_env(int *S, int *kb, int *hint)
{
    *S = 6, *kb = 20, *hint = 0;
    const char *e = getenv("TUNA_Q4_ST");
    if (!e) return;
    int a = 0, b = 0, c = 0;
    const int n = sscanf(e, "%d,%d,%d", &a, &b, &c);
    if (n >= 1 && a >= 2 && a <= Q4S_SMAX) *S = a;
    if (n >= 2 && b >= 1 && b <= 64) *kb = b;
    if (n >= 3) *hint = c != 0;
}

template <bool NORM>
static bool q4s_launch(tuna_backend *be, const float *x, const struct gemv_job *j, const struct q4_lut *lut,
                       const struct q4s_param *P, int nch, unsigned blocks, size_t smem)
{
    const dim3 grid(blocks), block((unsigned)(P->W + 1) * 32);
    switch (nch) {
    case 1: return tuna_cuda_launch(be, "k_q4_s", k_q4_s<NORM, 1>, grid, block, smem, x, *j, *lut, *P);
    case 2: return tuna_cuda_launch(be, "k_q4_s", k_q4_s<NORM, 2>, grid, block, smem, x, *j, *lut, *P);
    default: return tuna_cuda_launch(be, "k_q4_s", k_q4_s<NORM, 4>, grid, block, smem, x, *j, *lut, *P);
    }
}

bool tuna_cuda_q4_stream(tuna_backend *be, const float *x, struct gemv_job *j, const struct tuna_weight *const *ws,
                         const struct q4_lut *lut, int blocksize, int64_t T)
{
    const int64_t K = j->K;
    if (be->cc_major < 9 || T != 1 || K <= 0 || K % 64 != 0 || blocksize < 32 || K % blocksize != 0) return false;
    if (j->nseg < 1 || j->nseg > GEMV_MAX_SEG) return false;
    const int K32 = (int)(K / 32);
    if (K32 > 4 * 32 * 8) return false;
    const bool nested = j->s[0].sc.absmax == NULL;
    for (int i = 0; i < j->nseg; i++)
        if (((uintptr_t)ws[i]->data % 16) != 0 || j->s[i].N * K >= ((int64_t)1 << 31) ||
            (j->s[i].sc.absmax == NULL) != nested || (nested && j->s[i].sc.nshift != j->s[0].sc.nshift))
            return false;
    /* warps and row groups. K <= 4096: "solo", one warp per item over the whole K (each lane 4
     * chunks at K = 4096, 16 registers of x each), no sums across warps; above: row groups of
     * several warps, the most lanes busy over K, then the most chunks per lane (independent dots
     * per item: round 1 found one chunk per lane latency-bound), then the most warps (K = 14336:
     * 8 warps in 2 groups, 4 chunks per lane; 11008: the same, 3). TUNA_Q4_W: compute warps at most
     * (4..10, default 8). */
    int wmax = 8;
    {
        const char *e = getenv("TUNA_Q4_W");
        if (e && atoi(e) >= 4 && atoi(e) <= Q4S_WMAX) wmax = atoi(e);
    }
    int bw = 0, bng = 0, bnch = 0;
    if (K32 <= 4 * 32) {
        bw = wmax, bng = wmax, bnch = (K32 + 31) / 32;
    } else {
        double best = -1.0;
        for (int W = wmax; W >= 4; W--)
            for (int NG = 1; NG < W; NG *= 2) {
                if (W % NG) continue;
                const int LG = 32 * (W / NG), nch = (K32 + LG - 1) / LG;
                if (nch > 4) continue;
                /* lanes busy: W warps times the share of their chunk steps that lie in K */
                const double score = (double)K32 * NG / (32.0 * (double)nch);
                if (score > best + 1e-9 || (score > best - 1e-9 && nch > bnch))
                    best = score, bw = W, bng = NG, bnch = nch;
            }
    }
    if (!bw) return false;
    int S, kbytes, hint;
    q4s_env(&S, &kbytes, &hint);
    struct q4s_param P;
    memset(&P, 0, sizeof P);
    P.W = bw, P.NG = bng, P.nested = nested, P.hint = hint;
    P.code_row = (uint32_t)(K / 2);
    P.srow = (uint32_t)((K / blocksize) * (nested ? 1 : 4));
    const int64_t item = 2 * ((int64_t)P.code_row + P.srow);
    int64_t it = (int64_t)kbytes * 1024 / item; /* items go to the groups in turn across tiles */
    if (it < 1) it = 1;
    if (it > Q4S_ITMAX) it = Q4S_ITMAX;
    P.IT = (int)it;
    P.scap = ((uint32_t)(2 * it) * P.srow + 15u) / 16u * 16u + 16u;
    P.stage = ((uint32_t)(2 * it) * P.code_row + 2u * P.scap + 127u) / 128u * 128u;
    const size_t part = (size_t)Q4S_ITMAX * Q4S_WMAX * 2 * sizeof(float);
    const size_t fixed = (size_t)Q4S_TAB + Q4S_NCODE + 1024; /* + static shared memory */
    if (be->max_smem_optin <= 0) return false;
    while (S > 2 && fixed + (size_t)S * (P.stage + part) > (size_t)be->max_smem_optin) S--;
    if (fixed + (size_t)S * (P.stage + part) > (size_t)be->max_smem_optin) return false;
    P.S = S;
    P.off_part = (uint32_t)S * P.stage;
    const size_t smem = (size_t)Q4S_TAB + Q4S_NCODE + (size_t)S * P.stage + (size_t)S * part;
    const float lmax = q4_lut_absmax(lut);
    P.lmax = lmax;
    if (j->mode == GEMV_GLU) {
        P.rows = j->s[0].N;
        if (j->nseg < 2) return false;
    } else {
        P.rows = gemv_number_rows(j, 1);
    }
    const int64_t units = j->mode == GEMV_GLU ? P.rows : (P.rows + 1) / 2;
    const int64_t sms = be->sm_count > 0 ? be->sm_count : 132;
    const int64_t blocks = units < sms ? units : sms;
    if (blocks < 1) return true; /* nothing to do */
    j->prefetch = tuna_cuda_gemv_prefetch();
    g_q4s_launches++;
    if (j->nw) return q4s_launch<true>(be, x, j, lut, &P, bnch, (unsigned)blocks, smem);
    return q4s_launch<false>(be, x, j, lut, &P, bnch, (unsigned)blocks, smem);
}

/* ---- k_q4_v: the batch-1 4-bit GEMV as one balanced stream per warp (eighth session; TUNA_Q4_K=6) ----
 *
 * Opt-in: on the H100 it measured within the noise of k_q4_h2 (layer chain 75.5 against 77.1 us
 * with TUNA_Q4_VR=64 TUNA_Q4_VB=2, 76.2 at the default cap; end to end 3.23 against 3.28 ms,
 * once); docs/PERFORMANCE.md (NF4, eighth session) has the numbers and what to try next.
 *
 * k_q4_h2 at 128 registers per thread (ptxas, sm_90a) fills the register file with its one block
 * per SM: the next kernel's blocks cannot start on an SM before this one's block ends, so the PDL
 * prologue (tables, first loads) never overlaps, and each warp's item/pair bookkeeping costs
 * instructions per step. Here the work is flattened: an item (two rows, or gate and up of one
 * output) is KU units of 1024 weights (one 16-byte load of codes per lane and row); block b takes
 * a contiguous balanced range of items and its W warps split the block's item-units evenly, so
 * every warp streams the same number of units (to within one) whatever N and K are, and a unit's
 * address is the item's row pointers plus a constant. Each warp keeps D units of codes and scales
 * in registers (the load of unit u + D issued right after unit u is computed), the first D before
 * the PDL wait. The products are k_q4_h2's (q4h_dot on x staged as f16 by q4h_stage_x). A warp's
 * sums per item (reduced by shuffles) go to shared memory, slot = warp - first warp of the item;
 * after the block's last unit, thread t adds item t's slots in warp order (fixed order:
 * deterministic) and stores. Needs T = 1, K % 32 == 0, blocksize >= 32, 16-byte aligned codes,
 * N * K < 2^31 per matrix, every matrix's scales in the same form (nested: the same nshift). */
#define Q4V_MAXT 512

struct q4v_param {
    int64_t nitems; /* items of the launch */
    int KU;         /* units (1024 weights) per row, the last one partial when K % 1024 != 0 */
    int K32;        /* 32-weight chunks per row */
    int nslot;      /* warps that can share an item, at most */
    int psz;        /* floats of partial sums in shared memory ([items per block][nslot][2]), a multiple of 4 */
    int nshift;     /* nested: log2(nested blocksize) */
    float lmax;
};

struct q4v_stage {
    uint4 c[2];
    float a[2];    /* float32 absmax, or the nested absmax */
    uint32_t q[2]; /* nested: the 8-bit code of the absmax */
};

/* q4h_dot for both rows of a unit, x read one 16-byte piece at a time (4 registers live, not 16) */
static __device__ __forceinline__ void q4v_dot2(const uint8_t *tab, const uint4 (&c)[2], const uint8_t *xs, uint32_t xo,
                                                uint32_t lane_off, float (&d)[2])
{
    __half2 s[2][2];
#pragma unroll
    for (int r = 0; r < 2; r++) s[r][0] = s[r][1] = __float2half2_rn(0.0f);
#pragma unroll
    for (int p = 0; p < 4; p++) {
        const uint4 xv = *reinterpret_cast<const uint4 *>(xs + (xo ^ ((uint32_t)p * 16u)));
        const uint32_t xw[4] = {xv.x, xv.y, xv.z, xv.w};
#pragma unroll
        for (int r = 0; r < 2; r++) {
            const uint32_t w = p == 0 ? c[r].x : p == 1 ? c[r].y : p == 2 ? c[r].z : c[r].w;
#pragma unroll
            for (int b = 0; b < 4; b++) {
                const uint32_t off = __byte_perm(w, lane_off, 0x5504u | ((uint32_t)b << 4));
                const __half2 t = *reinterpret_cast<const __half2 *>(tab + off);
                s[r][p >> 1] = __hfma2(t, *reinterpret_cast<const __half2 *>(&xw[b]), s[r][p >> 1]);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const __half2 v = __hadd2(s[r][0], s[r][1]);
        d[r] = __low2float(v) + __high2float(v);
    }
}

template <bool NORM, bool NESTED, int D, int MINB>
__global__ void __launch_bounds__(Q4V_MAXT, MINB)
    k_q4_v(const float *__restrict__ x, const __grid_constant__ struct gemv_job j, const struct q4_lut lut_in,
           const struct q4v_param P)
{
    extern __shared__ float4 q4v_smem4[];
    uint8_t *tab = reinterpret_cast<uint8_t *>(q4v_smem4);     /* [256][256 bytes], half2 at lane * 4 */
    float *ncode = reinterpret_cast<float *>(tab + Q4S_TAB);  /* [GEMV_MAX_SEG][256] */
    float *ps = ncode + GEMV_MAX_SEG * 256;                    /* [items][nslot][2] */
    uint8_t *xs = reinterpret_cast<uint8_t *>(ps + P.psz);     /* [K] f16, swizzled pieces */
    __shared__ float slut[16];
    __shared__ float red[64];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, W = blockDim.x >> 5;
    q4h_fill_tables(tab, ncode, slut, lut_in, j, NESTED);
    for (int e = threadIdx.x; e < P.psz; e += blockDim.x) ps[e] = 0.0f;

    const int64_t ib0 = (int64_t)blockIdx.x * P.nitems / gridDim.x;
    const int nib = (int)(((int64_t)blockIdx.x + 1) * P.nitems / gridDim.x - ib0);
    const int KU = P.KU, K32 = P.K32, Ub = nib * KU;
    const int us = (int)((int64_t)warp * Ub / W), ue = (int)((int64_t)(warp + 1) * Ub / W);
    const int bs_shift = j.bs_shift;
    const int64_t K = j.K;

    /* the load side: unit l_u (item l_li, unit l_k of it) */
    /* row r's weights: element offset le[r] of the lane's first weight in matrix l_sg(r); the
     * matrices' base pointers are read from the job (parameter space) at each load: 2 registers
     * of state per row instead of 7 */
    uint32_t le[2] = {0u, 0u};
    int l_seg = 0;
    const bool glu = j.mode == GEMV_GLU;
    int l_u = us, l_li = us / (KU > 0 ? KU : 1), l_k = us - l_li * KU;
    auto set_item = [&](int li) {
        int sg[2], seg;
        int64_t row[2], n0;
        q4_item_rows(j, ib0 + li, &seg, &n0, sg, row);
        l_seg = seg;
#pragma unroll
        for (int r = 0; r < 2; r++) le[r] = (uint32_t)(row[r] * K) + (uint32_t)lane * 32u;
    };
    auto load = [&](struct q4v_stage &st) {
        if (l_k * 32 + lane < K32) {
#pragma unroll
            for (int r = 0; r < 2; r++) {
                const struct gemv_seg &s = j.s[glu ? r : l_seg];
                const uint32_t e = le[r] + (uint32_t)l_k * 1024u, b = e >> bs_shift;
                st.c[r] = __ldg(reinterpret_cast<const uint4 *>(s.W) + (e >> 5));
                if (NESTED) {
                    st.q[r] = __ldg(s.sc.q + b);
                    st.a[r] = __ldg(s.sc.nabs + (b >> P.nshift));
                } else {
                    st.a[r] = __ldg(s.sc.absmax + b);
                }
            }
        }
        l_u++;
        if (++l_k == KU) {
            l_k = 0;
            l_li++;
            if (l_u < ue) set_item(l_li);
        }
    };

    struct q4v_stage st[D];
#pragma unroll
    for (int u = 0; u < D; u++) st[u].q[0] = st[u].q[1] = 0u, st[u].a[0] = st[u].a[1] = 0.0f;
    if (us < ue) set_item(l_li);
#pragma unroll
    for (int u = 0; u < D; u++)
        if (l_u < ue) load(st[u]);
    tuna_pdl_wait();
    tuna_pdl_trigger();
    const float inv_s = q4h_stage_x<NORM>(xs, x, j, P.lmax, red); /* ends with __syncthreads: tables ready */

    /* the compute side: unit c_k of item c_li */
    const uint32_t lane_off = (uint32_t)lane * 4u;
    const uint32_t xsw = (uint32_t)((lane >> 1) & 7) * 16u; /* gemv_x_pos's swizzle of the lane's pieces */
    int c_li = us / (KU > 0 ? KU : 1), c_k = us - c_li * KU;
    int c_nco[2] = {0, 0};
    float c_noff[2] = {0.0f, 0.0f};
    auto set_cmp = [&](int li) {
        int sg[2], seg;
        int64_t row[2], n0;
        q4_item_rows(j, ib0 + li, &seg, &n0, sg, row);
#pragma unroll
        for (int r = 0; r < 2; r++) c_nco[r] = sg[r] * 256, c_noff[r] = j.s[sg[r]].sc.noff;
    };
    if (NESTED && us < ue) set_cmp(c_li);
    float acc[2] = {0.0f, 0.0f};
    for (int u0 = us; u0 < ue; u0 += D) {
#pragma unroll
        for (int u = 0; u < D; u++) {
            if (u0 + u >= ue) break;
            const int chunk = c_k * 32 + lane;
            if (chunk < K32) {
                const uint32_t xo = ((uint32_t)chunk * 64u) ^ xsw; /* piece p at xo ^ 16 p */
                float d[2];
                q4v_dot2(tab, st[u].c, xs, xo, lane_off, d);
#pragma unroll
                for (int r = 0; r < 2; r++) {
                    const float am =
                        NESTED ? q4_nested(ncode[c_nco[r] + (int)st[u].q[r]], st[u].a[r], c_noff[r]) : st[u].a[r];
                    acc[r] += am * d[r];
                }
            }
            if (l_u < ue) load(st[u]);
            const bool last = u0 + u + 1 == ue;
            if (++c_k == KU || last) { /* the warp's share of the item: its slot */
#pragma unroll
                for (int r = 0; r < 2; r++)
                    for (int o = 16; o > 0; o >>= 1) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], o);
                if (lane == 0) {
                    const int wf = (int)(((int64_t)c_li * KU + 1) * W - 1) / Ub; /* first warp of the item */
                    float *pp = ps + ((int64_t)c_li * P.nslot + (warp - wf)) * 2;
                    pp[0] = acc[0], pp[1] = acc[1];
                }
                acc[0] = acc[1] = 0.0f;
                if (c_k == KU && !last) {
                    c_k = 0;
                    c_li++;
                    if (NESTED) set_cmp(c_li);
                }
            }
        }
    }
    __syncthreads();
    /* the items' sums over their warps in warp order, then the stores */
    for (int li = threadIdx.x; li < nib; li += blockDim.x) {
        const int wa = (int)(((int64_t)li * KU + 1) * W - 1) / Ub, wb = (int)(((int64_t)(li + 1) * KU) * W - 1) / Ub;
        float v0 = 0.0f, v1 = 0.0f;
        for (int w = wa; w <= wb; w++) v0 += ps[((int64_t)li * P.nslot + (w - wa)) * 2], v1 += ps[((int64_t)li * P.nslot + (w - wa)) * 2 + 1];
        v0 *= inv_s, v1 *= inv_s;
        int sg[2], seg;
        int64_t row[2], n0;
        q4_item_rows(j, ib0 + li, &seg, &n0, sg, row);
        const float a2[2][1] = {{v0}, {v1}}, one[1] = {1.0f};
        gemv_store<1, 2>(j, a2, one, seg, n0);
    }
}

/* TUNA_Q4_VT threads per block (64..512, default 512), TUNA_Q4_VB blocks per SM (1..4, default 1),
 * TUNA_Q4_VD units in flight per warp (2 default, 4), TUNA_Q4_VR=64: the build capped at 64
 * registers per thread (two 512-thread blocks per SM: the next kernel's blocks fit beside). */
static int q4v_env(const char *name, int def, int lo, int hi)
{
    const char *e = getenv(name);
    const int v = e ? atoi(e) : def;
    return v >= lo && v <= hi ? v : def;
}

bool tuna_cuda_q4_lean(tuna_backend *be, const float *x, struct gemv_job *j, const struct tuna_weight *const *ws,
                       const struct q4_lut *lut, int blocksize, int64_t T)
{
    const int64_t K = j->K;
    bool nested;
    if (!q4h_job_fits(j, ws, blocksize, T, &nested)) return false;
    const int threads = q4v_env("TUNA_Q4_VT", 512, 64, Q4V_MAXT) / 32 * 32, bps = q4v_env("TUNA_Q4_VB", 1, 1, 4);
    const int D = q4v_env("TUNA_Q4_VD", 2, 2, 4) >= 4 ? 4 : 2;
    const bool r64 = q4v_env("TUNA_Q4_VR", 0, 0, 64) == 64;
    struct q4v_param P;
    memset(&P, 0, sizeof P);
    P.nitems = j->mode == GEMV_GLU ? j->s[0].N : gemv_number_rows(j, 2) / 2;
    P.K32 = (int)(K / 32);
    P.KU = (P.K32 + 31) / 32;
    P.nshift = nested ? j->s[0].sc.nshift : 0;
    const int64_t sms = be->sm_count > 0 ? be->sm_count : 132;
    int64_t blocks = sms * bps;
    if (blocks > P.nitems) blocks = P.nitems;
    if (blocks < 1) return true; /* nothing to do */
    const int W = threads / 32;
    const int64_t ipb = (P.nitems + blocks - 1) / blocks, imin = P.nitems / blocks;
    const int64_t upw = imin * P.KU / W; /* units per warp, at least */
    int64_t nslot = upw > 0 ? (P.KU + upw - 1) / upw + 1 : W;
    if (nslot > W) nslot = W;
    P.nslot = (int)nslot;
    P.psz = (int)((ipb * nslot * 2 + 3) / 4 * 4);
    const size_t smem = (size_t)Q4S_TAB + Q4S_NCODE + (size_t)P.psz * 4 + ((size_t)K * 2 + 127) / 128 * 128;
    if (be->max_smem_optin <= 0 || smem + 1024 > (size_t)be->max_smem_optin) return false;
    if (ipb * P.KU >= ((int64_t)1 << 30) / W) return false;
    const float lmax = q4_lut_absmax(lut);
    P.lmax = lmax;
    j->prefetch = tuna_cuda_gemv_prefetch();
    const dim3 grid((unsigned)blocks), block((unsigned)threads);
#define Q4V_GO(N, S, DD)                                                                                         \
    return r64 ? tuna_cuda_launch(be, "k_q4_v", k_q4_v<N, S, DD, 2>, grid, block, smem, x, *j, *lut, P)           \
               : tuna_cuda_launch(be, "k_q4_v", k_q4_v<N, S, DD, 1>, grid, block, smem, x, *j, *lut, P)
    if (j->nw) {
        if (nested) {
            if (D == 4) Q4V_GO(true, true, 4);
            Q4V_GO(true, true, 2);
        }
        Q4V_GO(true, false, 2);
    }
    if (nested) {
        if (D == 4) Q4V_GO(false, true, 4);
        Q4V_GO(false, true, 2);
    }
    Q4V_GO(false, false, 2);
#undef Q4V_GO
}
