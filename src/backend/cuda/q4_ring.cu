/* q4_ring.cu — k_q4_r: k_q4_h4 (q4_h4.cu) with its weights brought into shared memory by the bulk
 * copy engine, one ring of stages per warp pair (twenty-sixth session). OPT-IN (TUNA_Q4_RING=1,
 * sm_90+): on the H100 it is correct (the same bits as k_q4_h4), as fast in the NF4 layer chain
 * (60.5-61.1 against 61.3-61.8 us/layer: q/k/v faster, gate/up and o slower) and slower end to end
 * (8B batch-1 step 2.57-2.61 against 2.54-2.58 ms); docs/PERFORMANCE.md, "NF4, twenty-sixth
 * session", says what was measured.
 *
 * k_q4_h4 keeps each lane's next D = 2 steps of codes and scales in registers: the loads of step
 * s + 2 are issued when step s is done, and a block can have only those 64 KB in flight before
 * the PDL wait (weights do not depend on the previous kernel, but registers hold no more). Here
 * the arithmetic is k_q4_h4's, operation for operation (the same bits), and the loads are separate:
 * - Q4R_PW producer warps (lane l of warp w owns pair w + Q4R_PW l) copy each of their pairs'
 *   steps, 4 rows x 1 KB of codes and the rows' 8-bit nested codes (or float32 absmax) of those
 *   2,048 weights, into a ring of NS stages (3-4, what shared memory holds beside the table and x)
 *   with cp.async.bulk, counted in bytes on the stage's "full" mbarrier, and refill a stage once
 *   both warps of the pair have read it (its "empty" mbarrier, one arrival per lane). A bulk copy
 *   takes uniform registers, so ptxas issues a warp's copies lane after lane: one producer warp for
 *   all 8 pairs made the kernel ~45% slower than k_q4_h4 (gate/up 37.5 against 25.6 us per layer),
 *   4 of them as fast;
 * - the first NS stages of every pair are issued at the block's entry, before the table fill and
 *   the PDL wait: up to 147 KB per block, ~19 MB over 132 SMs (all of o's or q/k/v's 4-bit codes);
 * - the consumer warps (16, 8 pairs as in k_q4_h4) read a step's codes and scales from the stage
 *   (one 16-byte load per row), release it, and run k_q4_h4's products on them; the nested absmax
 *   (one per row and step: 2,048 weights lie in one nested block) is read with __ldg as in
 *   k_q4_h4 (it is shared by the 4 rows of an item: an L1 hit after the first).
 * The numerics, the item layout and the pair's sums are k_q4_h4's (see q4_h4.cu and q4.cu), so
 * test_cuda_fused compares the two kernels bit for bit. Knobs for measurements: TUNA_Q4R_NS (fewer
 * stages), TUNA_Q4R_DRY=1 (the stages read and released, no products: wrong results).
 * Needs what k_q4_h4 needs, and sm_90, K % 2048 == 0, scale bytes per row and step 16..128 (a
 * blocksize of 32-128 with nested scales, 64-512 with float32 absmax), a nested block of at least
 * 2,048 weights and 16-byte aligned scales; the host side declines anything else (the caller runs
 * k_q4_h4). */
#include <stdlib.h>

#include "backend/cuda/bulk.cuh"
#include "backend/cuda/cuda_internal.h"
#include "backend/cuda/gemv.cuh"
#include "backend/cuda/pdl.cuh"
#include "backend/cuda/q4_h4.cuh"

#define Q4R_PW 4 /* producer warps: each issues its bulk copies lane after lane (UBLKCP takes uniform registers) */
#define Q4R_THREADS (Q4H4_THREADS + 32 * Q4R_PW) /* 16 consumer warps and the producers */
#define Q4R_ROW 1024u /* code bytes per row and step (2,048 weights): a stage is [4][Q4R_ROW] of them, */
#define Q4R_SMAX 128u /* then [4][sbytes] scale bytes, sbytes <= Q4R_SMAX */
#define Q4R_NSMAX 4

struct q4r_param {
    int nitems; /* items of 4 rows (GLU: 2 outputs) */
    int ns;     /* stages per pair */
    float lmax;
    int nshift;      /* nested: log2 of the nested blocksize */
    uint32_t sbytes; /* scale bytes per row and step */
    uint32_t stage;  /* bytes per stage (one step), a multiple of 128 */
    uint32_t ring;   /* byte offset of the rings in the dynamic shared memory */
    int dry;         /* diagnostics (TUNA_Q4R_DRY=1): the stages are read and released, no products */
};

/* The items of warp pair P (of all the grid's pairs): k_q4_h4's contiguous ranges. */
static __device__ __forceinline__ void q4r_items(int nitems, int P, int *it0, int *nmy)
{
    const int npairs = (int)gridDim.x * Q4H4_PAIRS;
    const int ibase = nitems / npairs, iextra = nitems % npairs;
    *it0 = P * ibase + (P < iextra ? P : iextra);
    *nmy = ibase + (P < iextra ? 1 : 0);
}

/* A producer warp: its lanes l < 8 / Q4R_PW fill pair w + Q4R_PW l's ring, step after step (step i = item i / upw,
 * 2,048 weights m = i % upw of each of its 4 rows), each stage as soon as it is free. The lanes
 * move together (a free stage is tested, never waited for) and sleep when none could issue. */
template <bool NESTED, int G>
static __device__ __forceinline__ void q4r_produce(const struct gemv_job &j, const struct q4r_param &P, uint8_t *ring,
                                                   uint64_t (*full)[Q4R_NSMAX], uint64_t (*empty)[Q4R_NSMAX])
{
    const int lane = threadIdx.x & 31, NS = P.ns;
    const int upw = (int)(j.K / 2048);
    /* lane l of producer warp w fills pair w + Q4R_PW l */
    const bool owner = lane < Q4H4_PAIRS / Q4R_PW;
    const int pr = owner ? (int)(threadIdx.x / 32) - 2 * Q4H4_PAIRS + Q4R_PW * lane : 0;
    int it0 = 0, nmy = 0;
    if (owner) q4r_items(P.nitems, (int)blockIdx.x + (int)gridDim.x * pr, &it0, &nmy);
    const int total = nmy * upw; /* the pair's steps */
    const uint32_t K = (uint32_t)j.K, sb = P.sbytes, bytes = 4u * (Q4R_ROW + sb);
    uint8_t *mine = ring + (size_t)pr * NS * P.stage;
    int i = 0, s = 0, lap = 0, it = it0, m = 0;
    while (__any_sync(0xffffffffu, i < total)) {
        bool did = false;
        if (i < total && (lap == 0 || q4s_bar_test(&empty[pr][s], (uint32_t)((lap - 1) & 1)))) {
            uint8_t *st = mine + (size_t)s * P.stage;
            uint64_t *bar = &full[pr][s];
            q4s_bar_expect(bar, bytes);
#pragma unroll
            for (int p = 0; p < 2; p++) {
                int seg, d;
                int64_t row;
                q4h4_pair<false, G>(j, it, p, 0, &seg, &row, &d);
                const struct gemv_seg &sg = j.s[seg];
                const uint32_t e = (uint32_t)row * K + (uint32_t)m * 2048u, b = e >> j.bs_shift;
                const uint8_t *cs = (const uint8_t *)sg.W + e / 2;
                const uint8_t *ss = NESTED ? sg.sc.q + b : (const uint8_t *)(sg.sc.absmax + b);
                const uint32_t dc = d ? K / 2 : 0u, ds = d ? (K >> j.bs_shift) * (NESTED ? 1u : 4u) : 0u;
#pragma unroll
                for (int r = 0; r < 2; r++) {
                    q4s_copy(st + (2 * p + r) * Q4R_ROW, cs + (r ? dc : 0u), Q4R_ROW, bar, false, 0);
                    q4s_copy(st + 4 * Q4R_ROW + (2 * p + r) * sb, ss + (r ? ds : 0u), sb, bar, false, 0);
                }
            }
            i++;
            if (++m == upw) m = 0, it++;
            if (++s == NS) s = 0, lap++;
            did = true;
        }
        if (!__any_sync(0xffffffffu, did)) __nanosleep(128);
    }
}

template <bool NORM, bool NESTED, int G>
__global__ void __launch_bounds__(Q4R_THREADS, 1)
    k_q4_r(const float *__restrict__ x, const __grid_constant__ struct gemv_job j,
           const __grid_constant__ struct q4_lut lut_in, const struct q4r_param P)
{
    extern __shared__ float4 q4r_smem4[];
    __shared__ float slut[16];
    __shared__ float red[64];
    __shared__ float part[Q4H4_PAIRS][2][4]; /* [pair][item parity][row]: warp 1's sums */
    __shared__ uint64_t full[Q4H4_PAIRS][Q4R_NSMAX], empty[Q4H4_PAIRS][Q4R_NSMAX];
    uint8_t *tab = reinterpret_cast<uint8_t *>(q4r_smem4);
    float *ncode = reinterpret_cast<float *>(tab + Q4H4_TAB);
    uint8_t *xs = tab + Q4H4_TAB + Q4H4_NCODE; /* [K] f16, swizzled pieces */
    uint8_t *ring = reinterpret_cast<uint8_t *>(q4r_smem4) + P.ring;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, NS = P.ns;
    if (threadIdx.x == 0) {
        for (int p = 0; p < Q4H4_PAIRS; p++)
            for (int s = 0; s < NS; s++)
                q4s_bar_init(&full[p][s], 1), q4s_bar_init(&empty[p][s], 64);
        q4s_bar_fence_init();
    }
    __syncthreads();
    if (warp >= Q4H4_PAIRS * 2) { /* the producers: weights only, so no PDL wait */
        q4r_produce<NESTED, G>(j, P, ring, full, empty);
        return;
    }

    const int pair = warp >> 1, h = warp & 1;
    int it0, nmy;
    q4r_items(P.nitems, (int)blockIdx.x + (int)gridDim.x * pair, &it0, &nmy);
    const int upw = (int)(j.K / 2048), total = nmy * upw, itend = it0 + nmy;
    const bool glu = q4h4_glu<G>(j);

    float ncv[GEMV_MAX_SEG * 256 / Q4H4_THREADS];
    if (NESTED) q4h_ncode_load<Q4H4_THREADS>(ncv, j);
    q4h_fill_tables<Q4H4_THREADS>(tab, ncode, slut, lut_in, j, false); /* the byte -> half2 table */
    tuna_pdl_wait();
    tuna_pdl_trigger();
    if (NESTED) q4h_ncode_store<Q4H4_THREADS>(ncode, ncv, j);
    const float inv_s = q4h_stage_x<NORM, Q4H4_THREADS>(xs, x, j, P.lmax, red); /* ends with a barrier */

    auto store = [&](int it, int vme, float tot) { q4h4_store<G>(j, glu, lane, it, vme, tot); };

    /* the compute side: q4h4_run's, the step's codes and scales read from the stage */
    const uint32_t lane_off = (uint32_t)lane * 4u;
    const uint32_t xsw = (uint32_t)((lane >> 1) & 7) * 16u; /* gemv_x_pos's swizzle of the lane's pieces */
    const bool b4 = (lane & 16) != 0, b3 = (lane & 8) != 0;
    const int vme = (b4 ? 2 : 0) + (b3 ? 1 : 0); /* the row whose sum this lane holds after the reduction */
    const uint32_t K = (uint32_t)j.K, cw = (uint32_t)(h * 32 + lane);
    const uint32_t sidx = (cw * 32u) >> j.bs_shift; /* the lane's scale in a row's step */
    const int nsh = j.bs_shift + P.nshift;
    int c_it = it0, c_m = 0, c_k = 0, s = 0;
    uint32_t ph = 0;
    int c_nco[2] = {0, 0};
    float c_noff[2] = {0.0f, 0.0f};
    const float *c_nabs[2] = {NULL, NULL};
    uint32_t c_e[4] = {0u, 0u, 0u, 0u}; /* the item's rows' first elements */
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    auto set_cmp = [&](int it) {
#pragma unroll
        for (int p = 0; p < 2; p++) {
            int seg, d;
            int64_t row;
            q4h4_pair<false, G>(j, it, p, 0, &seg, &row, &d);
            c_nco[p] = seg * 256;
            c_noff[p] = j.s[seg].sc.noff;
            c_nabs[p] = j.s[seg].sc.nabs;
            c_e[2 * p] = (uint32_t)row * K;
            c_e[2 * p + 1] = ((uint32_t)row + (uint32_t)d) * K;
        }
    };
    if (NESTED && nmy > 0) set_cmp(it0);
    const uint8_t *myring = ring + (size_t)pair * NS * P.stage;
    const uint32_t sb = P.sbytes;
    for (int q = 0; q < total; q++) {
        q4s_bar_wait(&full[pair][s], ph);
        const uint8_t *st = myring + (size_t)s * P.stage, *ss = st + 4 * Q4R_ROW;
        uint4 c[4];
        float a[4];
        uint32_t qc[4];
#pragma unroll
        for (int r = 0; r < 4; r++) {
            c[r] = *reinterpret_cast<const uint4 *>(st + r * Q4R_ROW + cw * 16u);
            if (NESTED)
                qc[r] = ss[r * sb + sidx];
            else
                a[r] = *reinterpret_cast<const float *>(ss + r * sb + sidx * 4u);
        }
        q4s_bar_arrive(&empty[pair][s]);
        if (++s == NS) s = 0, ph ^= 1u;
        if (P.dry) {
#pragma unroll
            for (int r = 0; r < 4; r++)
                acc[r] += (float)(c[r].x ^ c[r].y ^ c[r].z ^ c[r].w ^ (NESTED ? qc[r] : 0u));
            if (++c_m < upw) continue;
            c_m = 0;
        } else {
            if (NESTED)
#pragma unroll
                for (int r = 0; r < 4; r++)
                    a[r] = __ldg(c_nabs[r >> 1] + ((c_e[r] + (uint32_t)c_m * 2048u) >> nsh));
            uint4 xv[4];
            q4h_x_pieces(xs, (uint32_t)c_m * 64u + cw, xsw, xv);
#pragma unroll
            for (int r = 0; r < 4; r++) {
                const float d = q4h_dot(tab, c[r], xv, lane_off);
                const float am = NESTED ? q4_nested(ncode[c_nco[r >> 1] + qc[r]], a[r], c_noff[r >> 1]) : a[r];
                acc[r] += am * d;
            }
            if (++c_m < upw) continue;
            c_m = 0;
        }
        /* the item's last step: q4h4_run's sums over the warp, then over the pair */
        q4h4_item_end(acc, part, pair, h, lane, b4, b3, vme, c_k, c_it, inv_s, store);
        c_k++;
        if (++c_it < itend && NESTED) set_cmp(c_it);
    }
}

static long g_q4r_launches;

extern "C" long tuna_cuda_q4_r_launches(tuna_backend *be)
{
    return be && be->cc_major >= 9 ? g_q4r_launches : -1;
}

/* TUNA_Q4_RING: 1 runs k_q4_r where it fits (opt-in); read at every call so tests can compare */
bool tuna_cuda_q4_ring_on(void)
{
    const char *e = getenv("TUNA_Q4_RING");
    return e && e[0] == '1';
}

bool tuna_cuda_q4_r(tuna_backend *be, const float *x, struct gemv_job *j, const struct tuna_weight *const *ws,
                    const struct q4_lut *lut, int blocksize, int64_t T)
{
    const int64_t K = j->K;
    bool nested;
    if (be->cc_major < 9 || !q4h_job_fits(j, ws, blocksize, T, &nested) || K % 2048 != 0) return false;
    if ((1 << j->bs_shift) != blocksize) return false;
    /* nested: a step's 2,048 weights of a row under one nested absmax */
    if (nested && ((int64_t)1 << (j->bs_shift + j->s[0].sc.nshift)) < 2048) return false;
    const uint32_t per = (uint32_t)(2048 >> j->bs_shift) * (nested ? 1u : 4u); /* scale bytes per row-step */
    if (per < 16 || per > Q4R_SMAX || per % 16 != 0 || ((K >> j->bs_shift) * (nested ? 1 : 4)) % 16 != 0) return false;
    for (int i = 0; i < j->nseg; i++) {
        const void *sc = nested ? (const void *)j->s[i].sc.q : (const void *)j->s[i].sc.absmax;
        if (((uintptr_t)sc % 16) != 0) return false;
    }
    const size_t ring = (size_t)Q4H4_TAB + Q4H4_NCODE + ((size_t)K * 2 + 127) / 128 * 128;
    if (be->max_smem_optin <= 0) return false;
    const size_t room = (size_t)be->max_smem_optin - 2048 - 512; /* static scratch and the mbarriers */
    /* stages of one step: stages of whole items (2 steps at K = 4096, 2 stages per pair) measured
     * slower on the H100 (gate/up 27.6 against 25.8 us per layer, q/k/v 13.3 against 11.8) */
    const uint32_t stage = (4 * (Q4R_ROW + per) + 127) / 128 * 128;
    if (room < ring + (size_t)Q4H4_PAIRS * 2 * stage) return false;
    int ns = (int)((room - ring) / ((size_t)Q4H4_PAIRS * stage));
    ns = ns > Q4R_NSMAX ? Q4R_NSMAX : ns;
    const char *ens = getenv("TUNA_Q4R_NS"), *edry = getenv("TUNA_Q4R_DRY"); /* measurements */
    if (ens && atoi(ens) >= 2 && atoi(ens) < ns) ns = atoi(ens);
    const size_t smem = ring + (size_t)Q4H4_PAIRS * ns * stage;
    const bool glu = j->mode == GEMV_GLU;
    int64_t n4, b4;
    const bool fits = q4h4_grid(be, j, &n4, &b4);
    if (b4 < 1) return true; /* nothing to do */
    if (!fits) return false;
    struct q4r_param P;
    P.nitems = (int)n4;
    P.ns = ns;
    P.lmax = q4_lut_absmax(lut);
    P.nshift = nested ? j->s[0].sc.nshift : 0;
    P.sbytes = per;
    P.stage = stage;
    P.ring = (uint32_t)ring;
    P.dry = edry && edry[0] == '1';
    const dim3 grid((unsigned)b4), block(Q4R_THREADS);
    g_q4r_launches++;
    /* the job's form as in k_q4_h4: GLU, one matrix, or read at run time (q/k/v) */
    const int G = glu ? 1 : j->nseg == 1 ? 3 : 0;
#define Q4R_GO(NORM, NESTED, GG)                                                                                       \
    tuna_cuda_launch(be, "k_q4_r", k_q4_r<NORM, NESTED, GG>, grid, block, smem, x, *j, *lut, P)
#define Q4R_G(NORM, NESTED)                                                                                            \
    (G == 0 ? Q4R_GO(NORM, NESTED, 0) : G == 1 ? Q4R_GO(NORM, NESTED, 1) : Q4R_GO(NORM, NESTED, 3))
    if (j->nw) return nested ? Q4R_G(true, true) : Q4R_G(true, false);
    return nested ? Q4R_G(false, true) : Q4R_G(false, false);
#undef Q4R_G
#undef Q4R_GO
}
