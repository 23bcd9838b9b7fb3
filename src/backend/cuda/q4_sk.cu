/* q4_sk.cu — k_q4_sk: the batch-1 4-bit decode GEMV on the tensor cores with its work split evenly
 * over the GPU's warps along the whole matrix ("stream-K"; twenty-first session, TUNA_Q4_K=7).
 *
 * Why: k_q4_h4 (q4_h4.cu) spends ~3.4 instructions per weight (ncu, thirteenth session), 1.5 of them
 * the f16 pair products. k_q4_tc (q4_tc.cu) put the products on the tensor cores (~1 instruction per
 * weight: a PRMT and a table load per two weights, an MMA per 8 weights of a lane) but split K over
 * the block's 16 warps, so at K = 4096 every warp met a tile's end (shuffles, a block barrier, a
 * reduction in shared memory) every 2 steps, and in all it issued as many instructions as k_q4_h4.
 * Here a warp owns its rows over a long run of K: the matrix is a sequence of units (16 rows x 256
 * weights: tile-major, tile = 16 rows, K / 256 units per tile) and warp w of the W in the grid takes
 * units [w U / W, (w + 1) U / W), so every warp streams the same bytes (to one unit) whatever N and K
 * are, and meets a tile's end once or twice per launch instead of every 2 steps.
 *
 * A unit's step s (0, 1: 128 weights of each row) is k_q4_tc's step for one token: lane (g, t) holds
 * 16 bytes of codes of rows g and g + 8 (weights 32 t .. 32 t + 31 of the step), the byte -> half2
 * table gives the A fragments as they are, 8 mma.m16n8k16 (f16 in, float32 accumulate) per step; the
 * B matrix is x in column 0 on the slots of scale block 0 (lanes t = 0, 1) and in column 4 on block
 * 1's (t = 2, 3), zeros elsewhere (read from a zero line), so lane t = 0 holds block 0's sums of rows
 * g, g + 8 and lane t = 2 block 1's; each multiplies them by its block's scale and adds them up.
 *
 * A tile cut between warps: each warp writes its 16 partial sums to its slot in a global buffer
 * (slot 0: the tile it started in, 1: the tile it ends in), fences, and counts itself in the tile's
 * counter (indexed by the tile's first warp: a tile that is cut has its own first warp). The last to
 * arrive adds the slots in warp order (the same bits on every run, whichever warp is last), stores
 * the rows and sets the counter back to 0 for the next launch. Everything that touches the buffer
 * comes after the PDL wait, so launches in a stream do not overlap on it.
 *
 * Numerics: those of k_q4_tc (x staged as f16 scaled by a power of two, products exact in float32,
 * float32 sums). Needs T = 1, K % 256 == 0, blocksize 64, nested blocksize >= 4 blocks, 4-byte
 * aligned nested codes, compute capability 8.0+, at least 16 units, and q4h_job_fits's conditions;
 * otherwise the caller runs k_q4_h4. */
#include <stdlib.h>

#include "backend/cuda/cuda_internal.h"
#include "backend/cuda/gemv.cuh"
#include "backend/cuda/mma.cuh"
#include "backend/cuda/pdl.cuh"
#include "backend/cuda/q4_h4.cuh"
#include "backend/cuda/q4_tc.cuh"

#define Q4SK_THREADS 512
#define Q4SK_WARPS 16
#define Q4SK_UNIT 256 /* weights of each of a tile's 16 rows per unit */

struct q4sk_stage {
    uint4 c[2][2]; /* [row g, g + 8][step]: the lane's 16 bytes of codes */
    float a[2][2]; /* float32: the absmax of the lane's block per row and step; nested: [r][0] the nested absmax */
    uint32_t q[2]; /* nested: the 8-bit codes of the unit's 4 blocks of each row */
};

/* Counts a warp into a cut tile's counter: release (the partial sums its lanes stored before a
 * __syncwarp) and acquire (the other warps' sums, for the last to arrive); the old count. */
static __device__ __forceinline__ unsigned q4sk_arrive(unsigned *p)
{
    unsigned old;
    asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;" : "=r"(old) : "l"(p) : "memory");
    return old;
}

/* The warp whose units include unit u (every warp has at least one: U >= W). */
static __device__ __forceinline__ int q4sk_warp_of(int64_t u, int64_t U, int64_t W)
{
    return (int)(((u + 1) * W - 1) / U);
}

template <bool NORM, bool NESTED, int D>
__global__ void __launch_bounds__(Q4SK_THREADS, 1)
    k_q4_sk(const float *__restrict__ x, const __grid_constant__ struct gemv_job j, const struct q4_lut lut_in,
            int ntiles, int KU, float lmax, int nshift, float *part, unsigned *cnt, int whole)
{
    extern __shared__ __align__(128) float4 q4sk_smem4[];
    __shared__ __align__(128) uint4 zline[8]; /* 128 zero bytes: the B columns' zeros */
    __shared__ float slut[16];
    __shared__ float red[64];
    uint8_t *tab = reinterpret_cast<uint8_t *>(q4sk_smem4);
    float *ncode = reinterpret_cast<float *>(tab + Q4H4_TAB);
    uint8_t *xs = tab + Q4H4_TAB + Q4H4_NCODE; /* [K] f16, 16-byte pieces at gemv_x_pos<true> */
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const bool glu = j.mode == GEMV_GLU;
    const uint32_t K = (uint32_t)j.K;
    const int64_t U = (int64_t)ntiles * KU, W = (int64_t)gridDim.x * Q4SK_WARPS;
    const int gw = (int)blockIdx.x * Q4SK_WARPS + warp;
    /* whole (TUNA_Q4_SKT=1, an experiment): whole tiles per warp, none cut (some warps idle) */
    const int u0 = whole ? (int)(gw * ntiles / W) * KU : (int)(gw * U / W);
    const int u1 = whole ? (int)((gw + 1) * ntiles / W) * KU : (int)((gw + 1) * U / W), nun = u1 - u0;
    const int tl0 = u0 / KU;

    /* the load side: per row, the codes (lane t's 16 bytes), the element index of the unit's first
     * weight, the scales */
    const uint4 *lw[2];
    uint32_t le[2];
    const float *la[2];
    const uint8_t *lq[2];
    int l_u = u0, l_ku = u0 - tl0 * KU;
    auto set_src = [&](int tl, int ku) {
#pragma unroll
        for (int r = 0; r < 2; r++) {
            int seg;
            int64_t row, n0, N;
            q4_tile_row(j, tl, g, r, &seg, &row, &n0, &N);
            const struct gemv_seg &s = j.s[seg];
            lw[r] = reinterpret_cast<const uint4 *>(s.W) + t;
            le[r] = (uint32_t)row * K + (uint32_t)ku * Q4SK_UNIT;
            la[r] = NESTED ? s.sc.nabs : s.sc.absmax;
            lq[r] = NESTED ? s.sc.q : NULL;
        }
    };
    auto load_next = [&](struct q4sk_stage &st) {
        if (l_u >= u1) return;
#pragma unroll
        for (int r = 0; r < 2; r++) {
            const uint32_t e = le[r] >> 5, b = le[r] >> 6; /* 16-byte piece, scale block */
            st.c[r][0] = __ldg(lw[r] + e);
            st.c[r][1] = __ldg(lw[r] + e + 4);
            if (NESTED) {
                st.q[r] = __ldg(reinterpret_cast<const uint32_t *>(lq[r] + b)); /* blocks b .. b + 3 */
                st.a[r][0] = __ldg(la[r] + (b >> nshift));
            } else {
                st.a[r][0] = __ldg(la[r] + b + (t >> 1));
                st.a[r][1] = __ldg(la[r] + b + 2 + (t >> 1));
            }
        }
        l_u++;
        if (++l_ku == KU) {
            l_ku = 0;
            if (l_u < u1) set_src(l_u / KU, 0);
        } else {
#pragma unroll
            for (int r = 0; r < 2; r++) le[r] += Q4SK_UNIT;
        }
    };

    struct q4sk_stage st[D];
#pragma unroll
    for (int u = 0; u < D; u++)
#pragma unroll
        for (int r = 0; r < 2; r++) st[u].q[r] = 0u, st[u].a[r][0] = st[u].a[r][1] = 0.0f;
    if (nun > 0) set_src(tl0, l_ku);
    q4tc_prologue<Q4SK_THREADS, NESTED>(tab, ncode, slut, zline, lut_in, j, [&] {
#pragma unroll
        for (int u = 0; u < D; u++) load_next(st[u]);
    });
    const float inv_s = q4h_stage_x<NORM>(xs, x, j, lmax, red); /* ends with __syncthreads: tables ready */
    if (j.prefetch < 1)
#pragma unroll
        for (int u = 0; u < D; u++) load_next(st[u]);

    /* the compute side */
    const uint32_t lane_off = (uint32_t)lane * 4u;
    /* B column 0 on block 0's slots (t < 2), column 4 on block 1's (t >= 2); other lanes read zeros */
    const bool xon = (g & 3) == 0 && (g >> 2) == (t >> 1);
    const uint8_t *xb = xon ? xs : reinterpret_cast<const uint8_t *>(zline);
    int seg_ku0 = u0 - tl0 * KU, c_ku = seg_ku0, c_tl = tl0, c_n = 0; /* seg_ku0: where the segment began */
    int c_nco[2] = {0, 0};
    float c_noff[2] = {0.0f, 0.0f};
    float acc[2] = {0.0f, 0.0f}; /* rows g, g + 8 over the lane's blocks (lanes t = 0, 2) */
    auto set_cmp = [&](int tl) { q4tc_nested(j, tl, g, c_nco, c_noff); };
    /* lane t == 0 of group g: rows g and g + 8 of tile tl, scaled back by inv_s */
    auto store = [&](int tl, float v0, float v1) {
        if (glu) {
            const int64_t n = (int64_t)tl * 8 + g;
            if (n < j.s[0].N) {
                const float bg = j.s[0].bias ? j.s[0].bias[n] : 0.0f, bu = j.s[1].bias ? j.s[1].bias[n] : 0.0f;
                j.s[0].y[n] = tuna_cuda_act(v0 * inv_s + bg, j.act) * (v1 * inv_s + bu);
            }
            return;
        }
        int seg;
        int64_t n0;
        gemv_rows(j, 16, tl, &seg, &n0);
        const struct gemv_seg &s = j.s[seg];
#pragma unroll
        for (int r = 0; r < 2; r++) {
            const int64_t n = n0 + g + 8 * r;
            if (n >= s.N) continue;
            const float v = (r ? v1 : v0) * inv_s + (s.bias ? s.bias[n] : 0.0f);
            if (j.mode == GEMV_ADD) s.y[n] += v;
            else s.y[n] = v;
        }
    };
    if (NESTED && nun > 0) set_cmp(tl0);
    for (int q0 = 0; q0 < nun; q0 += D) {
#pragma unroll
        for (int u = 0; u < D; u++) {
            if (q0 + u >= nun) break;
#pragma unroll
            for (int s = 0; s < 2; s++) {
                /* x of the lane's 32 weights of step 2 c_ku + s; zero lanes read the same place of the
                 * zero line */
                const uint32_t xo = q4tc_xoff(2u * (uint32_t)c_ku + (uint32_t)s, t);
                const uint32_t xoff = xon ? xo : (xo & 127u);
                uint4 xv[4];
#pragma unroll
                for (int p = 0; p < 4; p++) xv[p] = *reinterpret_cast<const uint4 *>(xb + (xoff ^ ((uint32_t)p * 16u)));
                float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
                for (int m = 0; m < 8; m++) {
                    uint32_t a[4];
                    q4tc_afrag(tab, st[u].c[0][s], st[u].c[1][s], m, lane_off, a);
                    const uint4 &xp = xv[m >> 1];
                    mma_16816<__half>(c, a, (m & 1) ? xp.z : xp.x, (m & 1) ? xp.w : xp.y);
                }
#pragma unroll
                for (int r = 0; r < 2; r++) {
                    float am;
                    if (NESTED) {
                        const uint32_t qc = __byte_perm(st[u].q[r], 0u, 0x4440u | (uint32_t)(2 * s + (t >> 1)));
                        am = q4_nested(ncode[c_nco[r] + (int)qc], st[u].a[r][0], c_noff[r]);
                    } else {
                        am = st[u].a[r][s];
                    }
                    acc[r] += am * c[2 * r];
                }
            }
            load_next(st[u]);
            c_n++;
            const bool tend = ++c_ku == KU;
            if (!tend && c_n < nun) continue;
            /* a segment ends (the tile's last unit or the warp's last): block 1's sums onto block 0's */
            float v0 = acc[0] + __shfl_xor_sync(0xffffffffu, acc[0], 2);
            float v1 = acc[1] + __shfl_xor_sync(0xffffffffu, acc[1], 2);
            acc[0] = acc[1] = 0.0f;
            bool mine = true;
            if (seg_ku0 != 0 || !tend) { /* the tile is cut between warps */
                const int which = c_tl == tl0 ? 0 : 1;
                float *pp = part + ((size_t)gw * 2 + (size_t)which) * 16;
                if (t == 0) pp[g] = v0, pp[8 + g] = v1;
                __syncwarp();
                const int64_t ub = (int64_t)c_tl * KU;
                const int wf = q4sk_warp_of(ub, U, W), wl = q4sk_warp_of(ub + KU - 1, U, W);
                unsigned old = 0;
                if (lane == 0) old = q4sk_arrive(cnt + wf);
                old = __shfl_sync(0xffffffffu, old, 0);
                mine = old == (unsigned)(wl - wf);
                if (mine) {
                    __syncwarp(); /* lane 0's acquire before every lane's loads */
                    v0 = v1 = 0.0f;
                    for (int w = wf; w <= wl; w++) {
                        const int wu0 = (int)((int64_t)w * U / W);
                        const float *qp = part + ((size_t)w * 2 + (wu0 / KU == c_tl ? 0u : 1u)) * 16;
                        v0 += __ldcg(qp + g);
                        v1 += __ldcg(qp + 8 + g);
                    }
                    if (lane == 0) cnt[wf] = 0u; /* every other warp of the tile has counted */
                }
            }
            if (mine && t == 0) store(c_tl, v0, v1);
            if (tend) {
                c_ku = 0;
                seg_ku0 = 0;
                c_tl++;
                if (NESTED && c_n < nun) set_cmp(c_tl);
            }
        }
    }
}

static long g_q4sk_launches;

extern "C" long tuna_cuda_q4_sk_launches(void)
{
    return g_q4sk_launches;
}

/* 2 units in flight per warp (ptxas, sm_90a: 118-124 registers, no spills; 3 spilled 20 bytes with
 * the norm and nested scales and measured slower on the H100, gate/up alone 51.4 against 46.0 us;
 * 4 spilled 100-240 bytes). */
template <bool NORM, bool NESTED>
static bool q4sk_launch(tuna_backend *be, const float *x, const struct gemv_job *j, const struct q4_lut *lut,
                        unsigned blocks, size_t smem, int ntiles, int KU, float lmax, int nshift, float *part,
                        unsigned *cnt, int whole)
{
    return tuna_cuda_launch(be, "k_q4_sk", k_q4_sk<NORM, NESTED, 2>, dim3(blocks), dim3(Q4SK_THREADS), smem, x, *j,
                            *lut, ntiles, KU, lmax, nshift, part, cnt, whole);
}

bool tuna_cuda_q4_sk(tuna_backend *be, const float *x, struct gemv_job *j, const struct tuna_weight *const *ws,
                     const struct q4_lut *lut, int blocksize, int64_t T)
{
    const int64_t K = j->K;
    bool nested;
    if (be->cc_major < 8 || blocksize != 64 || K % Q4SK_UNIT != 0 || !q4h_job_fits(j, ws, blocksize, T, &nested))
        return false;
    if (nested && j->s[0].sc.nshift < 2) return false; /* a unit's 4 blocks share one nested absmax */
    for (int i = 0; i < j->nseg; i++)
        if (nested && ((uintptr_t)j->s[i].sc.q % 4) != 0) return false;
    const size_t smem = (size_t)Q4H4_TAB + Q4H4_NCODE + ((size_t)K * 2 + 127) / 128 * 128;
    if (be->max_smem_optin <= 0 || smem + 1024 > (size_t)be->max_smem_optin) return false; /* + static */
    const bool glu = j->mode == GEMV_GLU;
    const int64_t ntiles = glu ? (j->s[0].N + 7) / 8 : gemv_number_rows(j, 16) / 16;
    const int64_t KU = K / Q4SK_UNIT, U = ntiles * KU;
    if (U < Q4SK_WARPS || U >= ((int64_t)1 << 30)) return false;
    const int64_t sms = be->sm_count > 0 ? be->sm_count : 132;
    const int64_t blocks = U / Q4SK_WARPS < sms ? U / Q4SK_WARPS : sms; /* every warp has a unit */
    /* the cut tiles' partial sums [warps][2][16] and counters [warps], sized once for a full grid;
     * a new buffer starts with its counters at 0 (never while capturing: the grow fails then) */
    const size_t nw = (size_t)sms * Q4SK_WARPS, bytes = nw * 2 * 16 * sizeof(float) + nw * sizeof(unsigned);
    void *before = be->q4sk.p;
    if (!tuna_cuda_grow(be, &be->q4sk, bytes, "cudaMalloc(4-bit GEMV partial sums)")) return false;
    float *part = (float *)be->q4sk.p;
    unsigned *cnt = (unsigned *)(part + nw * 2 * 16);
    if (be->q4sk.p != before &&
        !tuna_cuda_check(be, cudaMemsetAsync(cnt, 0, nw * sizeof(unsigned), be->stream), "cudaMemsetAsync(q4 counters)"))
        return false;
    const float lmax = q4_lut_absmax(lut);
    j->prefetch = tuna_cuda_gemv_prefetch();
    const int nshift = nested ? j->s[0].sc.nshift : 0;
    const char *we = getenv("TUNA_Q4_SKT");
    const int whole = we && we[0] == '1';
    g_q4sk_launches++;
    if (j->nw)
        return nested ? q4sk_launch<true, true>(be, x, j, lut, (unsigned)blocks, smem, (int)ntiles, (int)KU, lmax, nshift,
                                                part, cnt, whole)
                      : q4sk_launch<true, false>(be, x, j, lut, (unsigned)blocks, smem, (int)ntiles, (int)KU, lmax,
                                                 nshift, part, cnt, whole);
    return nested ? q4sk_launch<false, true>(be, x, j, lut, (unsigned)blocks, smem, (int)ntiles, (int)KU, lmax, nshift,
                                             part, cnt, whole)
                  : q4sk_launch<false, false>(be, x, j, lut, (unsigned)blocks, smem, (int)ntiles, (int)KU, lmax, nshift,
                                              part, cnt, whole);
}
