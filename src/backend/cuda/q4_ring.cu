/* q4_ring.cu — k_q4_r: k_q4_h4 (q4_h4.cu) with its weights brought into shared memory by the bulk
 * copy engine, one ring of stages per warp pair (twenty-sixth session). THE DEFAULT FOR Q/K/V ONLY
 * (sm_90+, batch 1; TUNA_Q4_RING=qkv, the default; =1 for every 4-bit GEMV it fits, =0 for none): on
 * the H100 it is correct (the same bits as k_q4_h4), as fast in the NF4 layer chain (60.5-61.1 against
 * 61.3-61.8 us/layer: q/k/v faster, gate/up and o slower) and slower end to end everywhere (8B
 * batch-1 step 2.57-2.61 against 2.54-2.58 ms); for q/k/v alone (thirtieth session) the step's graph
 * took 2,457 against 2,477 us and its period 2,476 against 2,508 (alternating, same call), so q/k/v
 * (three matrices, 12.6 MB at Llama-3-8B shapes: all of it asked for at the blocks' entry) takes it.
 * docs/PERFORMANCE.md, "NF4, twenty-sixth session" and "thirtieth session", says what was measured.
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
 * - each pair's first stage is issued at the block's entry, before the table fill and the PDL wait,
 *   and a pair has at most P.cap = 1 stage in flight (issued, not landed; TUNA_Q4R_CAP=0 lets every
 *   free stage go at once, as until the thirty-first session: up to 147 KB per block, ~19 MB over
 *   132 SMs): ~34 KB per SM already saturate DRAM, and the x staging's L2 round trips wait behind
 *   whatever is in flight (bench_queue_latency). H100, NF4 Llama-3-8B batch 1, with k_q4_h4's one
 *   step before the wait: graph 2,448-2,450 against 2,530-2,532 us with neither;
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
#include <string.h>

#include "backend/cuda/cuda_internal.h"
#include "backend/cuda/pdl.cuh"
#include "backend/cuda/q4_ring.cuh"

struct q4r_param {
    int nitems; /* items of 4 rows (GLU: 2 outputs) */
    int ns;     /* stages per pair */
    float lmax;
    int nshift;      /* nested: log2 of the nested blocksize */
    uint32_t sbytes; /* scale bytes per row and step */
    uint32_t stage;  /* bytes per stage (one step), a multiple of 128 */
    uint32_t ring;   /* byte offset of the rings in the dynamic shared memory */
    int dry;         /* diagnostics (TUNA_Q4R_DRY=1): the stages are read and released, no products */
    int cap;         /* stages in flight per pair at most, 1..ns - 1 (TUNA_Q4R_CAP, default 1; 0: no cap) */
};

/* A producer lane's copies in flight are capped (P.cap) so that the consumers' critical-path loads do
 * not queue behind them (bench_queue_latency: every SM's bulk copies saturate DRAM with ~32 KB in
 * flight per SM, and an L2 round trip then takes 137 ns; with ~64 KB 0.6-0.7 us, ~100 KB 1.2 us).
 * The lane issues its steps in ring order, step q into stage q % ns as phase (q / ns) & 1 of that
 * stage's "full" mbarrier; this returns how many of its `issued` steps have landed, counting on from
 * `landed` (a phase is tested only while the next one on its stage is not issued: the cap is < ns). */
static __device__ __forceinline__ int q4r_landed(uint64_t *full, int ns, int landed, int issued)
{
    while (landed < issued && q4s_bar_test(&full[landed % ns], (uint32_t)((landed / ns) & 1))) landed++;
    return landed;
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
    uint8_t *mine = ring + (size_t)pr * NS * P.stage;
    int i = 0, s = 0, lap = 0, it = it0, m = 0, landed = 0;
    while (__any_sync(0xffffffffu, i < total)) {
        bool did = false;
        if (P.cap > 0 && i < total) landed = q4r_landed(full[pr], NS, landed, i);
        if (i < total && (P.cap <= 0 || i - landed < P.cap) &&
            (lap == 0 || q4s_bar_test(&empty[pr][s], (uint32_t)((lap - 1) & 1)))) {
            q4r_issue<NESTED, G>(j, it, m, mine + (size_t)s * P.stage, &full[pr][s], P.sbytes);
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
    q4r_bars_init(full, empty, NS);
    if (warp >= Q4H4_PAIRS * 2) { /* the producers: weights only, so no PDL wait */
        q4r_produce<NESTED, G>(j, P, ring, full, empty);
        return;
    }

    const int pair = warp >> 1;
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
    struct q4r_ring R = {ring + (size_t)pair * NS * P.stage, full[pair], empty[pair], P.stage, P.sbytes, NS, 0, 0u};
    q4r_consume<NESTED, G>(j, P.nitems, P.nshift, R, tab, ncode, xs, part, inv_s, P.dry != 0, store);
}

static long g_q4r_launches;

extern "C" long tuna_cuda_q4_r_launches(tuna_backend *be)
{
    return be && be->cc_major >= 9 ? g_q4r_launches : -1;
}

/* Whether job j takes k_q4_r where it fits: TUNA_Q4_RING unset or qkv, the jobs of several matrices
 * that are not a GLU (q/k/v); 1 every job; 0 none. Read at every call so tests can compare. */
bool tuna_cuda_q4_ring_on(const struct gemv_job *j)
{
    const char *e = getenv("TUNA_Q4_RING");
    if (e && e[0] == '0') return false;
    if (e && e[0] == '1') return true;
    return j->nseg > 1 && j->mode != GEMV_GLU;
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
    /* a measurement: 0 lets every free stage be copied at once; a cap of ns or more would not bind (the
     * ring holds ns) and would break q4r_landed's phase test, so it means no cap too */
    const char *ecap = getenv("TUNA_Q4R_CAP");
    P.cap = ecap ? atoi(ecap) : 1;
    if (P.cap < 0 || P.cap >= ns) P.cap = 0;
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
