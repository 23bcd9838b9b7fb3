/* l2_warm.cu — backend.h's warm_l2 hint on the GPU (sm_90+, 4-bit o, gate and up).
 *
 * While the batch-1 attention runs (a chain of dependent round trips on 64 SMs, memory bandwidth
 * idle), a small kernel on a second stream brings the weights read right after it into L2: the o
 * projection's codes and scales, then the first items of every warp pair of the gate/up GEMV
 * (k_q4_h4's partition, q4h4_grid / q4h4_run), so that o and the start of gate/up read L2 instead
 * of DRAM. A hint: nothing a result depends on is read or written.
 *
 * k_l2_warm: B = 32 blocks; one thread of each issues cp.async.bulk.prefetch.L2 of units in order —
 * o's codes and scales in 16 KB pieces, then item k of every (pair, matrix) of gate/up for k = 0, 1
 * (every pair's first item before any pair's second, so a cut leaves no pair behind the others) —
 * unit u by block u % B, each once the block's clock has passed the pace's time for the bytes
 * before it (3,500 GB/s over the blocks: bench_queue_latency found ~32 KB per SM in flight
 * saturate DRAM and more puts every dependent round trip, the attention's included, in a queue),
 * and stops after 4 us. The cap matters: the o GEMV's 512-thread blocks fill an SM each, so a warm
 * block still running when the attention ends holds back one o block, and o with it (8 us: the
 * step 55-95 us slower). The second stream forks from the main one after the q/k/v GEMV and joins it
 * at the end of a captured step (graph.cu) or at the next layer's call.
 *
 * H100, NF4 Llama-3-8B batch 1, 128-token prompt (thirty-second session; docs/PERFORMANCE.md): the
 * step's graph 2,414-2,419 against 2,445-2,449 us. At a 2,048-token prompt the attention streams
 * 8 MB of K/V per layer itself and the warm measured 2,716-2,717 against 2,694 us (another machine:
 * 2,675 against 2,682), so it runs below 768 tokens only (the RoPE form's switch; between 128 and
 * 2,048 not measured), and forward.c's key of a captured step records the answer. TUNA_WARM=0
 * turns it off; TUNA_WARM_US and TUNA_WARM_GBS set the cap and the pace (measurements).
 * Measured and not kept (thirty-third session, commit 771a5d3): stopping at the attention's end
 * instead of the cap (k_attn_b1's blocks counted with red.add, the warm's blocks polling the count)
 * warms o and more of gate/up for the whole attention, and was no faster: 2,399-2,403 against
 * 2,391-2,398 us at 128 tokens, 2,471 against 2,476 at 512. */
#include <stdlib.h>

#include "backend/cuda/cuda_internal.h"
#include "backend/cuda/gemv.cuh"
#include "backend/cuda/pdl.cuh"
#include "backend/cuda/q4_h4.cuh"
#include "backend/backend.h"

#define L2W_UNIT 16384

struct l2w_job {
    const char *flat[2];    /* o's codes, o's scales (8-bit codes or float32); NULL: none */
    long long flat_n[2];    /* their bytes (multiples of 16) */
    const char *g[2], *gq[2]; /* gate and up codes, and their scales */
    long long row_b, qrow_b;  /* bytes per row of codes, of scales (0: no scales) */
    long long N;              /* rows per matrix */
    int nitems, npairs, w;    /* gate/up's items (2 outputs each), warp pairs, items warmed per pair */
    long long cyc_per_mb;     /* the block's pace: clock cycles per MiB issued */
    long long max_ns;         /* the cap, from the block's start */
};

static __device__ __forceinline__ long long l2w_ns(void)
{
    long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

__global__ void __launch_bounds__(32) k_l2_warm(const __grid_constant__ struct l2w_job j)
{
    if (threadIdx.x != 0) return;
    const long long u0 = (j.flat_n[0] + L2W_UNIT - 1) / L2W_UNIT, u1 = (j.flat_n[1] + L2W_UNIT - 1) / L2W_UNIT;
    const long long U = u0 + u1 + 2LL * j.npairs * j.w;
    const long long ns0 = l2w_ns();
    long long t = clock64();
    for (long long u = blockIdx.x; u < U; u += gridDim.x) {
        const char *p = NULL, *p2 = NULL;
        long long n = 0, n2 = 0;
        if (u < u0 + u1) {
            const int f = u < u0 ? 0 : 1;
            const long long lo = (u - (f ? u0 : 0)) * L2W_UNIT;
            p = j.flat[f] + lo;
            n = j.flat_n[f] - lo < L2W_UNIT ? j.flat_n[f] - lo : L2W_UNIT;
        } else {
            /* item it0 + k of pair P, matrix m (q4h4_run's partition): every pair's first item, then
             * every pair's second, ..., so that a cut budget leaves no pair behind the others */
            const long long v = u - u0 - u1, per = 2LL * j.npairs;
            const int k = (int)(v / per), P = (int)((v % per) >> 1), m = (int)(v & 1);
            int it0, nmy;
            q4h4_range(j.nitems, j.npairs, P, &it0, &nmy);
            if (k >= nmy) continue;
            long long r0 = 2LL * (it0 + k), r1 = r0 + 2;
            if (r1 > j.N) r1 = j.N;
            if (r0 >= r1) continue;
            p = j.g[m] + r0 * j.row_b;
            n = (r1 - r0) * j.row_b;
            if (j.gq[m]) p2 = j.gq[m] + r0 * j.qrow_b, n2 = (r1 - r0) * j.qrow_b;
        }
        while (clock64() < t) {
        }
        if (l2w_ns() - ns0 > j.max_ns) break;
        for (long long o = 0; o < n; o += 65536)
            tuna_prefetch_l2_bulk(p + o, (unsigned)(n - o < 65536 ? n - o : 65536));
        if (p2 && n2 >= 16) tuna_prefetch_l2_bulk(p2, (unsigned)(n2 & ~15LL));
        t += ((n + n2) * j.cyc_per_mb) >> 20;
    }
}

static long g_warm_launches;

extern "C" long tuna_cuda_warm_launches(void)
{
    return g_warm_launches;
}

/* TUNA_WARM=0: off; TUNA_WARM_US (default 4), TUNA_WARM_GBS (default 3,500): the cap and the pace.
 * TUNA_WARM is read at every call (the tests switch it); the others once. */
static bool warm_on(void)
{
    const char *e = getenv("TUNA_WARM");
    return !(e && e[0] == '0');
}

static double env_num(const char *name, double dflt, double lo, double hi)
{
    const char *e = getenv(name);
    const double v = e && *e ? atof(e) : dflt;
    return v >= lo && v <= hi ? v : dflt;
}

/* The scales of a 4-bit weight as one byte range per row: 8-bit codes (nested) or float32. */
static const char *q4_scale_rows(const struct tuna_weight *w, long long *row_b)
{
    const struct tuna_cuda_q4 *q = (const struct tuna_cuda_q4 *)w->q4;
    *row_b = 0;
    if (q->blocksize <= 0 || w->cols % q->blocksize) return NULL;
    const long long per_row = (long long)w->cols / q->blocksize;
    const char *p = q->absmax ? (const char *)q->absmax : (const char *)q->qabsmax;
    *row_b = per_row * (q->absmax ? 4 : 1);
    return p && (uintptr_t)p % 16 == 0 && *row_b % 16 == 0 ? p : NULL;
}

static bool q4w(const struct tuna_weight *w)
{
    return w && w->data && q4_weight_aligned(w) && w->cols % 32 == 0; /* rows of whole 16-byte pieces */
}

bool tuna_cuda_warm_l2(tuna_backend *be, const struct tuna_decode_layer *l, bool query)
{
    enum { B = 32, W = 2 }; /* blocks; items per pair of gate/up (past what the cap lets through) */
    static double us = -1, gbs = -1;
    if (us < 0) us = env_num("TUNA_WARM_US", 4, 0, 1000), gbs = env_num("TUNA_WARM_GBS", 3500, 1, 100000);
    auto &s = be->warm;
    if (!query && s.pending && !be->capturing) tuna_cuda_warm_join(be); /* the last layer's, long done */
    if (!warm_on() || be->sticky || be->cc_major < 9) return false;
    /* below TUNA_CUDA_B1_SHORT tokens of context: at longer ones the attention streams its K/V rows (4 KB
     * per token and layer at Llama-3-8B's shapes) and the bandwidth is not idle */
    if (!l->ab || !l->ab->pos || l->ab->pos[0] >= TUNA_CUDA_B1_SHORT) return false;
    const struct tuna_weight *wo = l->w[3], *wg = l->w[4], *wu = l->w[5];
    if (!q4w(wo) || !q4w(wg) || !q4w(wu) || wg->rows != wu->rows || wg->cols != wu->cols) return false;
    /* gate/up's launch (k_q4_h4 in GLU form): its items and blocks */
    struct gemv_job jg = {};
    jg.mode = GEMV_GLU;
    jg.s[0].N = wg->rows;
    int64_t n4, blocks;
    if (!q4h4_grid(be, &jg, &n4, &blocks) || blocks < 1) return false;
    if (query) return true;
    if (!tuna_cuda_side_make(be, &s.side)) return false;
    if (!s.khz) {
        int khz = 0;
        if (cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, be->device) != cudaSuccess) cudaGetLastError();
        s.khz = khz > 0 ? khz : 1980000;
    }
    struct l2w_job j = {};
    j.flat[0] = (const char *)wo->data;
    j.flat_n[0] = ((long long)wo->rows * wo->cols / 2) & ~15LL;
    long long qb = 0;
    j.flat[1] = q4_scale_rows(wo, &qb);
    j.flat_n[1] = j.flat[1] ? qb * wo->rows : 0;
    j.g[0] = (const char *)wg->data, j.g[1] = (const char *)wu->data;
    j.row_b = (long long)wg->cols / 2;
    long long qg = 0, qu = 0;
    j.gq[0] = q4_scale_rows(wg, &qg);
    j.gq[1] = q4_scale_rows(wu, &qu);
    if (qg != qu || !j.gq[0] || !j.gq[1]) j.gq[0] = j.gq[1] = NULL;
    j.qrow_b = j.gq[0] ? qg : 0;
    j.N = wg->rows;
    j.nitems = (int)n4;
    j.npairs = (int)(blocks * Q4H4_PAIRS);
    j.w = W;
    j.cyc_per_mb = (long long)((double)s.khz * 1e3 * 1048576.0 * B / (gbs * 1e9));
    j.max_ns = (long long)(us * 1e3);
    if (!tuna_cuda_side_fork(be, &s.side, "warm")) return false;
    s.pending = true; /* joined even if the launch fails: the capture must end whole */
    g_warm_launches++;
    k_l2_warm<<<B, 32, 0, s.side.stream>>>(j);
    return tuna_cuda_check_launch(be, "k_l2_warm");
}

/* Joins the second stream into the main one: before a capture begins (work forked by eager steps;
 * joining it inside the capture would taint it) and before it ends (graph.cu), and at the next call
 * outside a capture. */
void tuna_cuda_warm_join(tuna_backend *be)
{
    auto &s = be->warm;
    if (!s.side.made || !s.pending) return;
    s.pending = false;
    if (tuna_cuda_check(be, cudaEventRecord(s.side.join, s.side.stream), "cudaEventRecord(warm join)"))
        tuna_cuda_check(be, cudaStreamWaitEvent(be->stream, s.side.join, 0), "cudaStreamWaitEvent(warm join)");
}

void tuna_cuda_warm_free(tuna_backend *be)
{
    tuna_cuda_side_free(&be->warm.side);
    be->warm.pending = false;
}
