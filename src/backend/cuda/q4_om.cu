/* q4_om.cu — k_q4_om: the o projection and the MLP of one token with 4-bit weights, and the next
 * layer's q/k/v projections, as one persistent kernel whose weights stream ahead of its phases
 * (backend.h's decode_o_mlp; twenty-eighth session). OPT-IN (TUNA_Q4_OM=1): on the H100 it is
 * correct (the same bits as the ops) and slower (NF4 Llama-3-8B batch 1: 2.67-2.71 against
 * 2.54-2.58 ms/step); docs/PERFORMANCE.md, "NF4, twenty-eighth session", has the timeline.
 *
 * The layer's GEMVs each pay their edges: the blocks enter as the previous kernel's leave, wait
 * for it (PDL), stage x and drain unevenly, and the DRAM idles meanwhile (the fourteenth session's
 * timeline: 5.7-7 us per transition; the twenty-sixth session's ring without products still took
 * 24 us for gate/up's 20.3 us of bytes). Here one block per SM runs up to four phases with grid
 * barriers between them:
 *   1. o:       x += W_o att            (k_q4_h4's form G = 3, GEMV_ADD)
 *   2. gate/up: act = glu(W_g n, W_u n) with n = rmsnorm(x) folded in (G = 1, GEMV_GLU)
 *   3. down:    x += W_down act         (G = 3, GEMV_ADD)
 *   4. the next layer's q, k, v = W n' with n' = its rmsnorm(x) (G = 0, three matrices), where the
 *      caller passes that layer and its projections take the plain path (forward.c then skips them)
 * and its producer warps (q4_ring.cuh: bulk copies into one ring of stages per warp pair) do not
 * wait for any of it: they copy o's steps, then gate/up's, down's and q/k/v's, as fast as the
 * consumers free stages. So the copies of the next phase's first steps run while the consumers
 * wait at a barrier or stage x, and o's first steps while the attention kernel before this one ends
 * (PDL). The consumers are k_q4_r's (q4r_consume: k_q4_h4's products, the same bits); x is staged in
 * one round trip to L2 (q4h_stage_x_regs); x, att and act made inside the launch are read through L2
 * (ld.global.cg: L1 is not coherent between SMs).
 *
 * What the timeline (TUNA_Q4OM_TRACE) showed: the ring keeps DRAM busy across the barriers, but every
 * load on the critical path (the barrier's atomic and poll, the x staging, the ADD store's read)
 * then waits behind the weight stream: ~1 us per L2 round trip instead of ~0.2, so each barrier
 * took 0.8-2.3 us, each staging 0.8-2.3 us, and the short phases (o, q/k/v) ran at ~1.2-1.9 TB/s.
 * Shallower rings (TUNA_Q4OM_NS=2) and no cooperative attribute changed nothing measurable.
 * Twenty-ninth session: two round trips taken off the critical path (the barrier's arrival as a
 * reduction whose target is known, no atomic's return awaited; the nested scales' second level loaded
 * a step ahead in q4r_consume): the same bits, and no measurable change (2.72-2.73 ms/step).
 *
 * Needs: sm_90, the weights 4-bit with one table, blocksize and scale form, every K a multiple of
 * 2,048 (o: H*D, gate/up and q/k/v: C, down: I), the scale bytes of a row's step 16..128 (k_q4_r's),
 * 16-byte aligned vectors; the host side declines anything else (the caller runs the ops; without
 * the next layer's fit the kernel runs three phases). All blocks are resident at once (one per SM,
 * cooperative launch). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cuda/cuda_internal.h"
#include "backend/cuda/pdl.cuh"
#include "backend/cuda/q4_ring.cuh"
#include "backend/backend.h"

enum { Q4OM_PHASES = 4 };

struct q4om_param {
    /* o (+= into x), gate/up (norm, GLU into act), down (+= into x), and where nphase is 4 the next
     * layer's q/k/v (norm, three matrices) */
    struct gemv_job j[Q4OM_PHASES];
    int nitems[Q4OM_PHASES];      /* items of 4 rows (GLU: of 2 outputs) */
    const float *in[Q4OM_PHASES]; /* each phase's x: att, x, act, x */
    int nphase;
    unsigned long long *bar;        /* the grid barrier's count (only grows) */
    float lmax;
    int nshift;
    int ns;          /* stages per pair */
    uint32_t sbytes; /* scale bytes per row and step */
    uint32_t stage;  /* bytes per stage, a multiple of 128 */
    uint32_t ring;   /* byte offset of the rings in the dynamic shared memory */
    int dry;         /* TUNA_Q4OM_DRY=1: stages read and released, no products; 2, 3: q4om_issue_dry (wrong results) */
    bool regs;       /* x staged in one round trip (q4om_stage) */
    unsigned long long *tr; /* the timeline's row of this launch (TUNA_Q4OM_TRACE) or NULL */
};

/* The timeline (TUNA_Q4OM_TRACE=first:count, a measurement): for those launches, thread 0 of each
 * block (up to Q4OM_TB) stores %globaltimer at Q4OM_TS points: entry, the PDL wait passed, o's x
 * staged, the arrival at and the release from barrier 1, gate/up's x staged, the same for barrier
 * 2, down's x staged, warp 0's end; producer warp 0 when it has issued its last copy; with the
 * fourth phase barrier 3's arrival and release, q/k/v's x staged, warp 0's end. */
#define Q4OM_TB 132
#define Q4OM_TS 15

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900

static __device__ __forceinline__ void q4om_mark(unsigned long long *tr, int slot)
{
    if (tr && (threadIdx.x & 31) == 0) {
        unsigned long long t;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
        tr[(size_t)blockIdx.x * Q4OM_TS + slot] = t;
    }
}

static __device__ __forceinline__ unsigned long long q4om_ld_acquire(const unsigned long long *p)
{
    unsigned long long v;
    asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}

/* The consumers (threads 0 .. Q4H4_THREADS - 1) of every block reach this point before any goes
 * on: one 64-bit reduction per block on a count that only grows by the grid's size per barrier, so
 * thread 0 knows the value that releases barrier i of this launch (target: the count at the
 * launch's start, rounded down to a multiple of the grid, + i grids) and polls for it without
 * waiting for an atomic's return; the block's consumers meet at named barrier 14 (the producer
 * warps go on copying). */
static __device__ __forceinline__ void q4om_grid_sync(unsigned long long *cnt, unsigned long long target,
                                                      unsigned long long *tr, int slot)
{
    asm volatile("bar.sync 14, %0;" ::"n"(Q4H4_THREADS) : "memory");
    if (threadIdx.x == 0) q4om_mark(tr, slot);
    if (threadIdx.x == 0) {
        __threadfence();
        asm volatile("red.relaxed.gpu.global.add.u64 [%0], 1;" ::"l"(cnt) : "memory");
        while (q4om_ld_acquire(cnt) < target) {
        }
        q4om_mark(tr, slot + 1);
    }
    asm volatile("bar.sync 14, %0;" ::"n"(Q4H4_THREADS) : "memory");
}

/* A phase's x staged (q4h_stage_x's layout and bits) in one round trip where it fits the
 * registers (TUNA_Q4OM_STAGE=0: q4h_stage_x's two). */
template <bool NORM>
static __device__ __forceinline__ float q4om_stage(uint8_t *xs, const float *x, const struct gemv_job &j, float lmax,
                                                   float *red, bool regs)
{
    const int64_t K4 = j.K / 4;
    if (regs && K4 <= 2 * Q4H4_THREADS) return q4h_stage_x_regs<NORM, Q4H4_THREADS, 2>(xs, x, j, lmax, red);
    if (regs && !NORM && K4 <= 8 * Q4H4_THREADS) return q4h_stage_x_regs<NORM, Q4H4_THREADS, 8>(xs, x, j, lmax, red);
    return q4h_stage_x<NORM, Q4H4_THREADS>(xs, x, j, lmax, red);
}

/* The measurements' stand-ins for q4r_issue (TUNA_Q4OM_DRY=2: the 4 rows' codes only, 4 copies;
 * 3: the same 4 KB as one copy from the item's first row): the bytes without the scales' copies,
 * or in one copy, to see what the copies' count costs. Wrong results. */
template <int G>
static __device__ __forceinline__ void q4om_issue_dry(const struct gemv_job &j, int it, int m, uint8_t *st,
                                                      uint64_t *bar, int dry)
{
    const uint32_t K = (uint32_t)j.K;
    q4s_bar_expect(bar, 4u * Q4R_ROW);
#pragma unroll
    for (int p = 0; p < 2; p++) {
        int seg, d;
        int64_t row;
        q4h4_pair<false, G>(j, it, p, 0, &seg, &row, &d);
        const uint8_t *cs = (const uint8_t *)j.s[seg].W + ((uint32_t)row * K + (uint32_t)m * 2048u) / 2;
        if (dry == 3) {
            if (p == 0) q4s_copy(st, (const uint8_t *)j.s[seg].W + (uint32_t)row * K / 2, 4 * Q4R_ROW, bar, false, 0);
            continue;
        }
        const uint32_t dc = d ? K / 2 : 0u;
#pragma unroll
        for (int r = 0; r < 2; r++) q4s_copy(st + (2 * p + r) * Q4R_ROW, cs + (r ? dc : 0u), Q4R_ROW, bar, false, 0);
    }
}

/* A producer warp: lane l < Q4H4_PAIRS / Q4R_PW fills pair w + Q4R_PW l's ring with the pair's steps
 * of the launch's phases in order (its items of each, q4r_items), each stage as soon as the pair's
 * consumers have released it. The lanes move together (a free stage is tested, never waited
 * for) and sleep when none could issue. */
template <bool NESTED>
static __device__ __forceinline__ void q4om_produce(const struct q4om_param &P, uint8_t *ring,
                                                    uint64_t (*full)[Q4R_NSMAX], uint64_t (*empty)[Q4R_NSMAX])
{
    const int lane = threadIdx.x & 31, NS = P.ns;
    const bool owner = lane < Q4H4_PAIRS / Q4R_PW;
    const int pr = owner ? (int)(threadIdx.x / 32) - 2 * Q4H4_PAIRS + Q4R_PW * lane : 0;
    const int gp = (int)blockIdx.x + (int)gridDim.x * pr; /* the pair's number in the grid */
    const int np = P.nphase;
    int ph = np, it = 0, itend = 0, m = 0, upw = 1;
    auto enter = [&](int f) { /* the first phase from f on where the pair has items */
        for (ph = f; ph < np; ph++) {
            int it0, nmy;
            q4r_items(P.nitems[ph], gp, &it0, &nmy);
            if (nmy > 0) {
                it = it0, itend = it0 + nmy, m = 0, upw = (int)(P.j[ph].K / 2048);
                return;
            }
        }
    };
    if (owner) enter(0);
    uint8_t *mine = ring + (size_t)pr * NS * P.stage;
    int s = 0, lap = 0;
    while (__any_sync(0xffffffffu, ph < np)) {
        bool did = false;
        if (ph < np && (lap == 0 || q4s_bar_test(&empty[pr][s], (uint32_t)((lap - 1) & 1)))) {
            uint8_t *st = mine + (size_t)s * P.stage;
            if (P.dry >= 2) {
                if (ph == 1) q4om_issue_dry<1>(P.j[1], it, m, st, &full[pr][s], P.dry);
                else if (ph == 3) q4om_issue_dry<0>(P.j[3], it, m, st, &full[pr][s], P.dry);
                else q4om_issue_dry<3>(P.j[ph], it, m, st, &full[pr][s], P.dry);
            } else if (ph == 1) {
                q4r_issue<NESTED, 1>(P.j[1], it, m, st, &full[pr][s], P.sbytes);
            } else if (ph == 3) {
                q4r_issue<NESTED, 0>(P.j[3], it, m, st, &full[pr][s], P.sbytes);
            } else {
                q4r_issue<NESTED, 3>(P.j[ph], it, m, st, &full[pr][s], P.sbytes);
            }
            if (++m == upw) {
                m = 0;
                if (++it == itend) enter(ph + 1);
            }
            if (++s == NS) s = 0, lap++;
            did = true;
        }
        if (!__any_sync(0xffffffffu, did)) __nanosleep(128);
    }
}

/* An item's sums of a GEMV_ADD phase of one matrix (G = 3): y[n] += tot (+ bias), y read through
 * L2 (another SM may have written it earlier in this launch); gemv_store's arithmetic. */
static __device__ __forceinline__ void q4om_add(const struct gemv_job &j, int lane, int it, int vme, float tot)
{
    if ((lane & 7) != 0) return;
    const int64_t n = (int64_t)it * 4 + vme;
    if (n >= j.s[0].N) return;
    float *yp = j.s[0].y + n;
    const float b = j.s[0].bias ? j.s[0].bias[n] : 0.0f;
    *yp = __ldcg(yp) + (tot * 1.0f + b);
}

#endif

template <bool NESTED>
__global__ void __launch_bounds__(Q4R_THREADS, 1)
    k_q4_om(const __grid_constant__ struct q4om_param P, const __grid_constant__ struct q4_lut lut_in)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    extern __shared__ float4 q4om_smem4[];
    __shared__ float slut[16];
    __shared__ float red[64];
    __shared__ float part[Q4H4_PAIRS][2][4]; /* [pair][item parity][row]: warp 1's sums */
    __shared__ uint64_t full[Q4H4_PAIRS][Q4R_NSMAX], empty[Q4H4_PAIRS][Q4R_NSMAX];
    uint8_t *tab = reinterpret_cast<uint8_t *>(q4om_smem4);
    float *ncode = reinterpret_cast<float *>(tab + Q4H4_TAB);
    uint8_t *xs = tab + Q4H4_TAB + Q4H4_NCODE; /* [largest K] f16, swizzled pieces */
    uint8_t *ring = reinterpret_cast<uint8_t *>(q4om_smem4) + P.ring;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, NS = P.ns;
    unsigned long long *tr = P.tr && blockIdx.x < Q4OM_TB ? P.tr : NULL;
    if (threadIdx.x == 0) q4om_mark(tr, 0);
    q4r_bars_init(full, empty, NS);
    if (warp >= Q4H4_PAIRS * 2) { /* the producers: weights only, so no PDL wait */
        q4om_produce<NESTED>(P, ring, full, empty);
        if (warp == Q4H4_PAIRS * 2) q4om_mark(tr, 10);
        return;
    }
    const int pair = warp >> 1;
    /* the count before this launch's first barrier (every launch adds whole grids; no block of this
     * one can have passed barrier 1 before this block arrives there) */
    const unsigned long long nb = gridDim.x, gbase = threadIdx.x == 0 ? q4om_ld_acquire(P.bar) / nb * nb : 0ull;
    struct q4r_ring R = {ring + (size_t)pair * NS * P.stage, full[pair], empty[pair], P.stage, P.sbytes, NS, 0, 0u};
    const bool dry = P.dry != 0;

    float ncv[GEMV_MAX_SEG * 256 / Q4H4_THREADS];
    if (NESTED) q4h_ncode_load<Q4H4_THREADS>(ncv, P.j[0]);
    q4h_fill_tables<Q4H4_THREADS>(tab, ncode, slut, lut_in, P.j[0], false); /* the byte -> half2 table */
    tuna_pdl_wait(); /* att and x come from the kernels before */
    tuna_pdl_trigger();
    if (threadIdx.x == 0) q4om_mark(tr, 1);

    /* 1. o: x += W_o att */
    if (NESTED) q4h_ncode_store<Q4H4_THREADS>(ncode, ncv, P.j[0]);
    float inv_s = q4om_stage<false>(xs, P.in[0], P.j[0], P.lmax, red, P.regs); /* ends with a barrier */
    if (threadIdx.x == 0) q4om_mark(tr, 2);
    auto add0 = [&](int it, int vme, float tot) { q4om_add(P.j[0], lane, it, vme, tot); };
    q4r_consume<NESTED, 3>(P.j[0], P.nitems[0], P.nshift, R, tab, ncode, xs, part, inv_s, dry, add0);

    /* 2. gate/up with the norm: act = glu(.) (block 0 also writes xn) */
    if (NESTED) q4h_ncode_load<Q4H4_THREADS>(ncv, P.j[1]);
    q4om_grid_sync(P.bar, gbase + nb, tr, 3);
    if (NESTED) q4h_ncode_store<Q4H4_THREADS>(ncode, ncv, P.j[1]);
    inv_s = q4om_stage<true>(xs, P.in[1], P.j[1], P.lmax, red, P.regs);
    if (threadIdx.x == 0) q4om_mark(tr, 5);
    auto glu = [&](int it, int vme, float tot) { q4h4_store<1>(P.j[1], true, lane, it, vme, tot); };
    q4r_consume<NESTED, 1>(P.j[1], P.nitems[1], P.nshift, R, tab, ncode, xs, part, inv_s, dry, glu);

    /* 3. down: x += W_down act */
    if (NESTED) q4h_ncode_load<Q4H4_THREADS>(ncv, P.j[2]);
    q4om_grid_sync(P.bar, gbase + 2 * nb, tr, 6);
    if (NESTED) q4h_ncode_store<Q4H4_THREADS>(ncode, ncv, P.j[2]);
    inv_s = q4om_stage<false>(xs, P.in[2], P.j[2], P.lmax, red, P.regs);
    if (threadIdx.x == 0) q4om_mark(tr, 8);
    auto add2 = [&](int it, int vme, float tot) { q4om_add(P.j[2], lane, it, vme, tot); };
    q4r_consume<NESTED, 3>(P.j[2], P.nitems[2], P.nshift, R, tab, ncode, xs, part, inv_s, dry, add2);
    if (threadIdx.x == 0) q4om_mark(tr, 9);
    if (P.nphase < 4) return;

    /* 4. the next layer's q/k/v with its norm (block 0 also writes xn) */
    if (NESTED) q4h_ncode_load<Q4H4_THREADS>(ncv, P.j[3]);
    q4om_grid_sync(P.bar, gbase + 3 * nb, tr, 11);
    if (NESTED) q4h_ncode_store<Q4H4_THREADS>(ncode, ncv, P.j[3]);
    inv_s = q4om_stage<true>(xs, P.in[3], P.j[3], P.lmax, red, P.regs);
    if (threadIdx.x == 0) q4om_mark(tr, 13);
    auto st3 = [&](int it, int vme, float tot) { q4h4_store<0>(P.j[3], false, lane, it, vme, tot); };
    q4r_consume<NESTED, 0>(P.j[3], P.nitems[3], P.nshift, R, tab, ncode, xs, part, inv_s, dry, st3);
    if (threadIdx.x == 0) q4om_mark(tr, 14);
#else
    (void)P, (void)lut_in;
#endif
}

static long g_q4om_launches;

/* The timeline's buffer: launches first .. first + count - 1 of the process, printed at exit as
 * medians over those launches of the earliest / median / latest block at each point, in us from
 * the launch's earliest entry. */
static unsigned long long *q4om_tr_dev;
static long q4om_tr_first, q4om_tr_n;

static int q4om_cmp(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static void q4om_tr_dump(void)
{
    const size_t per = (size_t)Q4OM_TB * Q4OM_TS, n = (size_t)q4om_tr_n * per;
    unsigned long long *h = (unsigned long long *)malloc(n * 8);
    double *v = (double *)malloc(sizeof(double) * (size_t)(Q4OM_TB > q4om_tr_n ? Q4OM_TB : q4om_tr_n));
    double *st = (double *)malloc(sizeof(double) * (size_t)q4om_tr_n * 3 * Q4OM_TS);
    if (!h || !v || !st || cudaDeviceSynchronize() != cudaSuccess ||
        cudaMemcpy(h, q4om_tr_dev, n * 8, cudaMemcpyDeviceToHost) != cudaSuccess) {
        free(h), free(v), free(st);
        return;
    }
    static const char *names[Q4OM_TS] = {"entry", "PDL wait passed", "o: x staged", "barrier 1: arrival",
                                         "barrier 1: release", "gate/up: x staged", "barrier 2: arrival",
                                         "barrier 2: release", "down: x staged", "down: end (warp 0)", "producers done",
                                         "barrier 3: arrival", "barrier 3: release", "q/k/v: x staged",
                                         "q/k/v: end (warp 0)"};
    long used = 0;
    for (long l = 0; l < q4om_tr_n; l++) {
        const unsigned long long *r = h + (size_t)l * per;
        unsigned long long t0 = ~0ull;
        int nb = 0;
        for (int b = 0; b < Q4OM_TB; b++)
            if (r[(size_t)b * Q4OM_TS]) t0 = r[(size_t)b * Q4OM_TS] < t0 ? r[(size_t)b * Q4OM_TS] : t0, nb++;
        if (!nb) continue;
        for (int sl = 0; sl < Q4OM_TS; sl++) {
            int k = 0;
            for (int b = 0; b < Q4OM_TB; b++)
                if (r[(size_t)b * Q4OM_TS + sl]) v[k++] = ((double)r[(size_t)b * Q4OM_TS + sl] - (double)t0) / 1000.0;
            qsort(v, (size_t)k, sizeof *v, q4om_cmp);
            double *o = st + ((size_t)used * Q4OM_TS + sl) * 3;
            o[0] = k ? v[0] : 0, o[1] = k ? v[k / 2] : 0, o[2] = k ? v[k - 1] : 0;
        }
        used++;
    }
    fprintf(stderr, "k_q4_om timeline: %ld launches, medians of (first / median / last block), us from the first entry\n",
            used);
    for (int sl = 0; sl < Q4OM_TS && used; sl++) {
        double m[3];
        for (int q = 0; q < 3; q++) {
            for (long l = 0; l < used; l++) v[l] = st[((size_t)l * Q4OM_TS + sl) * 3 + q];
            qsort(v, (size_t)used, sizeof *v, q4om_cmp);
            m[q] = v[used / 2];
        }
        fprintf(stderr, "  %-20s %7.2f %7.2f %7.2f\n", names[sl], m[0], m[1], m[2]);
    }
    free(h), free(v), free(st);
}

static unsigned long long *q4om_tr_row(long id)
{
    static int setup;
    if (!setup) {
        setup = 1;
        const char *e = getenv("TUNA_Q4OM_TRACE");
        long first = 0, n = 0;
        if (e && sscanf(e, "%ld:%ld", &first, &n) == 2 && n > 0 && n <= 4096 &&
            cudaMalloc((void **)&q4om_tr_dev, (size_t)n * Q4OM_TB * Q4OM_TS * 8) == cudaSuccess) {
            cudaMemset(q4om_tr_dev, 0, (size_t)n * Q4OM_TB * Q4OM_TS * 8);
            q4om_tr_first = first, q4om_tr_n = n;
            atexit(q4om_tr_dump);
        }
    }
    if (!q4om_tr_dev || id < q4om_tr_first || id >= q4om_tr_first + q4om_tr_n) return NULL;
    return q4om_tr_dev + (size_t)(id - q4om_tr_first) * Q4OM_TB * Q4OM_TS;
}

extern "C" long tuna_cuda_q4_om_launches(void)
{
    return g_q4om_launches;
}

/* TUNA_Q4_OM: "1" on, anything else off; read at every call so tests can compare */
static bool q4om_env_on(void)
{
    const char *e = getenv("TUNA_Q4_OM");
    return e && e[0] == '1';
}

/* The next layer's q/k/v as the kernel's fourth phase: its weights in the same form, K = C. */
static bool q4om_next_fits(const struct tuna_decode_layer *a, const struct tuna_decode_layer *n,
                           const struct tuna_cuda_q4 *q0, int64_t C)
{
    const char *e = getenv("TUNA_Q4OM_QKV"); /* a measurement: 0 leaves q/k/v to their own kernel */
    if (!n || (e && e[0] == '0') || n->x != a->x) return false;
    const float *vec[] = {n->q, n->k, n->v, n->xn_attn, n->attn_norm};
    for (int i = 0; i < 5; i++)
        if (!vec[i] || (uintptr_t)vec[i] % 16 != 0) return false;
    for (int i = 0; i < 3; i++) {
        const struct tuna_weight *w = n->w[i];
        if (!q4_weight_aligned(w) || w->cols != C || !q4_same_form(q0, (const struct tuna_cuda_q4 *)w->q4)) return false;
    }
    return true;
}

bool tuna_cuda_decode_o_mlp(tuna_backend *be, const struct tuna_decode_layer *a, const struct tuna_decode_layer *next,
                            bool *next_qkv)
{
    *next_qkv = false;
    if (be->sticky) return true; /* the step fails anyway */
    if (!q4om_env_on() || tuna_cuda_q4_old() || be->cc_major < 9 || be->sm_count <= 0 || be->max_smem_optin <= 0)
        return false;
    if (!a->ab || a->ab->T != 1) return false;
    const struct tuna_weight *const *w = a->w + 3; /* o, gate, up, down */
    const int64_t C = w[0]->rows, HD = w[0]->cols, I = w[1]->rows;
    if (w[1]->cols != C || w[2]->rows != I || w[2]->cols != C || w[3]->rows != C || w[3]->cols != I) return false;
    if (HD % 2048 != 0 || C % 2048 != 0 || I % 2048 != 0) return false;
    const float *vec[] = {a->x, a->att, a->act, a->xn_mlp, a->mlp_norm};
    for (int i = 0; i < 5; i++) /* read or written in 16-byte pieces */
        if (!vec[i] || (uintptr_t)vec[i] % 16 != 0) return false;
    /* one table, blocksize and scale form for all four */
    for (int i = 0; i < 4; i++)
        if (!q4_weight_aligned(w[i])) return false;
    const struct tuna_cuda_q4 *q0 = (const struct tuna_cuda_q4 *)w[0]->q4;
    for (int i = 0; i < 4; i++)
        if (!q4_same_form(q0, (const struct tuna_cuda_q4 *)w[i]->q4)) return false;
    int shift = 0;
    while ((1 << shift) < q0->blocksize) shift++;
    if ((1 << shift) != q0->blocksize || q0->blocksize < 32) return false;
    const bool nested = q0->absmax == NULL;
    /* k_q4_r's step: a row's 2,048 weights under one nested absmax, 16..128 scale bytes */
    if (nested && ((int64_t)1 << (shift + q0->nested_shift)) < 2048) return false;
    const uint32_t per = (uint32_t)(2048 >> shift) * (nested ? 1u : 4u);
    if (per < 16 || per > Q4R_SMAX || per % 16 != 0) return false;

    struct q4om_param P;
    memset(&P, 0, sizeof P);
    float *yx[1] = {a->x}, *yg[2] = {a->act, NULL};
    gemv_job_init(&P.j[0], 1, yx, w, a->bias + 3, GEMV_ADD, NULL, NULL, 0.0f);
    gemv_job_init(&P.j[1], 2, yg, w + 1, a->bias + 4, GEMV_GLU, a->mlp_norm, a->xn_mlp, a->eps);
    P.j[1].act = a->act_kind;
    gemv_job_init(&P.j[2], 1, yx, w + 3, a->bias + 6, GEMV_ADD, NULL, NULL, 0.0f);
    P.nphase = 3;
    if (q4om_next_fits(a, next, q0, C)) {
        float *yq[3] = {next->q, next->k, next->v};
        gemv_job_init(&P.j[3], 3, yq, next->w, next->bias, GEMV_STORE, next->attn_norm, next->xn_attn, next->eps);
        P.nphase = 4;
    }
    const struct tuna_weight *const *pw[Q4OM_PHASES] = {w, w + 1, w + 3, next ? next->w : NULL};
    for (int p = 0; p < P.nphase; p++) {
        struct gemv_job *j = &P.j[p];
        j->bs_shift = shift;
        for (int i = 0; i < j->nseg; i++) {
            j->s[i].sc = q4_scales_of((const struct tuna_cuda_q4 *)pw[p][i]->q4);
            const void *sc = nested ? (const void *)j->s[i].sc.q : (const void *)j->s[i].sc.absmax;
            if (((uintptr_t)sc % 16) != 0) return false;
        }
        bool n2;
        if (!q4h_job_fits(j, pw[p], q0->blocksize, 1, &n2) || n2 != nested) return false;
        if (((j->K >> shift) * (nested ? 1 : 4)) % 16 != 0) return false; /* every row's scales 16-byte aligned */
    }
    P.nitems[0] = (int)(gemv_number_rows(&P.j[0], 4) / 4);
    P.nitems[1] = (int)((I + 1) / 2);
    P.nitems[2] = (int)(gemv_number_rows(&P.j[2], 4) / 4);
    if (P.nphase == 4) P.nitems[3] = (int)(gemv_number_rows(&P.j[3], 4) / 4);
    P.in[0] = a->att, P.in[1] = a->x, P.in[2] = a->act, P.in[3] = a->x;
    struct q4_lut lut;
    memcpy(lut.v, q0->lut, sizeof lut.v);
    P.lmax = q4_lut_absmax(&lut);
    P.nshift = nested ? q0->nested_shift : 0;
    P.sbytes = per;
    P.stage = (4 * (Q4R_ROW + per) + 127) / 128 * 128;
    const int64_t kmax = I > C ? (I > HD ? I : HD) : (C > HD ? C : HD);
    P.ring = (uint32_t)(Q4H4_TAB + Q4H4_NCODE + ((size_t)kmax * 2 + 127) / 128 * 128);
    const size_t room = (size_t)be->max_smem_optin - 2048 - 512; /* static scratch and the mbarriers */
    if (room < (size_t)P.ring + (size_t)Q4H4_PAIRS * 2 * P.stage) return false;
    int ns = (int)((room - P.ring) / ((size_t)Q4H4_PAIRS * P.stage));
    ns = ns > Q4R_NSMAX ? Q4R_NSMAX : ns;
    const char *ens = getenv("TUNA_Q4OM_NS"), *edry = getenv("TUNA_Q4OM_DRY"); /* measurements */
    if (ens && atoi(ens) >= 2 && atoi(ens) < ns) ns = atoi(ens);
    P.ns = ns;
    P.dry = edry ? atoi(edry) : 0;
    const char *estg = getenv("TUNA_Q4OM_STAGE");
    P.regs = !(estg && estg[0] == '0');
    const size_t smem = (size_t)P.ring + (size_t)Q4H4_PAIRS * ns * P.stage;
    const void *fn = nested ? (const void *)k_q4_om<true> : (const void *)k_q4_om<false>;
    /* one block per SM, all resident */
    if (!tuna_cuda_one_per_sm(be, fn, Q4R_THREADS, smem)) return false;

    /* from here on the kernel runs: x without a pending part (racc.cu) */
    tuna_cuda_racc_settle(be, a->x);
    /* the barrier's count: 8 bytes at offset 128 of the decode-layer scratch (q4_layer.cu uses
     * offsets 0 and 256 on), zeroed when the buffer is made */
    char *scratch = (char *)tuna_cuda_layer_scratch(be, 512);
    if (!scratch) return true; /* sticky */
    P.bar = (unsigned long long *)(scratch + 128);

    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3((unsigned)be->sm_count);
    cfg.blockDim = dim3(Q4R_THREADS);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = be->stream;
    cudaLaunchAttribute attr[2];
    const char *ecoop = getenv("TUNA_Q4OM_COOP"); /* a measurement: 0 launches without the attribute */
    tuna_cuda_grid_attrs(be, &cfg, attr, !(ecoop && ecoop[0] == '0'));
    P.tr = q4om_tr_row(g_q4om_launches);
    g_q4om_launches++;
    *next_qkv = P.nphase == 4;
    if (nested) tuna_cuda_check(be, cudaLaunchKernelEx(&cfg, k_q4_om<true>, P, lut), "k_q4_om");
    else tuna_cuda_check(be, cudaLaunchKernelEx(&cfg, k_q4_om<false>, P, lut), "k_q4_om");
    return true;
}
