/* q4_ring.cuh — the pieces of a batch-1 4-bit GEMV fed through shared-memory rings by the bulk copy
 * engine: k_q4_r (q4_ring.cu: one GEMV) and k_q4_om (q4_om.cu: o and the MLP in one persistent
 * kernel). Producer warps copy each warp pair's steps (4 rows x 2,048 weights: 4 KB of codes and
 * the rows' scale bytes) into the pair's ring of stages; the pair's two consumer warps run
 * k_q4_h4's products on them (q4_h4.cuh), so the sums are k_q4_h4's bits. sm_90+ (bulk.cuh). */
#ifndef TUNA_BACKEND_CUDA_Q4_RING_CUH
#define TUNA_BACKEND_CUDA_Q4_RING_CUH

#include "backend/cuda/bulk.cuh"
#include "backend/cuda/gemv.cuh"
#include "backend/cuda/q4_h4.cuh"

#define Q4R_PW 4 /* producer warps: each issues its bulk copies lane after lane (UBLKCP takes uniform registers) */
#define Q4R_THREADS (Q4H4_THREADS + 32 * Q4R_PW) /* 16 consumer warps and the producers */
#define Q4R_ROW 1024u /* code bytes per row and step (2,048 weights): a stage is [4][Q4R_ROW] of them, */
#define Q4R_SMAX 128u /* then [4][sbytes] scale bytes, sbytes <= Q4R_SMAX */
#define Q4R_NSMAX 4

/* The items of warp pair P (of all the grid's pairs): k_q4_h4's contiguous ranges. */
static __device__ __forceinline__ void q4r_items(int nitems, int P, int *it0, int *nmy)
{
    const int npairs = (int)gridDim.x * Q4H4_PAIRS;
    const int ibase = nitems / npairs, iextra = nitems % npairs;
    *it0 = P * ibase + (P < iextra ? P : iextra);
    *nmy = ibase + (P < iextra ? 1 : 0);
}

/* Step m (2,048 weights of each of its 4 rows) of item `it` of job j into stage st: the 4 rows'
 * codes ([4][Q4R_ROW]), then their scale bytes ([4][sb]: 8-bit nested codes or float32 absmax),
 * counted in bytes on the stage's "full" mbarrier. One lane. */
template <bool NESTED, int G>
static __device__ __forceinline__ void q4r_issue(const struct gemv_job &j, int it, int m, uint8_t *st, uint64_t *bar,
                                                 uint32_t sb)
{
    const uint32_t K = (uint32_t)j.K;
    q4s_bar_expect(bar, 4u * (Q4R_ROW + sb));
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
}

/* The rings' mbarriers, set up by thread 0 for the block's Q4H4_PAIRS pairs of ns stages ("full": the
 * producer's one arrival and the stage's bytes; "empty": the pair's 64 consumer lanes), then the
 * block's barrier. */
static __device__ __forceinline__ void q4r_bars_init(uint64_t (*full)[Q4R_NSMAX], uint64_t (*empty)[Q4R_NSMAX], int ns)
{
    if (threadIdx.x == 0) {
        for (int p = 0; p < Q4H4_PAIRS; p++)
            for (int s = 0; s < ns; s++)
                q4s_bar_init(&full[p][s], 1), q4s_bar_init(&empty[p][s], 64);
        q4s_bar_fence_init();
    }
    __syncthreads();
}

/* A ring's geometry and the consumer side's place in it (stage s, phase parity ph): the same
 * sequence of steps as its producer lane issues. */
struct q4r_ring {
    const uint8_t *base; /* the pair's NS stages */
    uint64_t *full, *empty; /* the pair's mbarriers [Q4R_NSMAX] */
    uint32_t stage, sb;
    int ns, s;
    uint32_t ph;
};

/* The consumer side of one GEMV (job j, nitems items over the grid's pairs): warp h of this
 * block's pair `pair` reads each step from the ring (one 16-byte load per row, the scale bytes),
 * releases the stage, and runs k_q4_h4's products against x staged in xs; an item's sums go to
 * store(it, vme, tot) through q4h4_item_end (scaled by inv_s). dry: the stages are read and
 * released, no products (a measurement: wrong results). */
template <bool NESTED, int G, typename Store>
static __device__ __forceinline__ void q4r_consume(const struct gemv_job &j, int nitems, int nshift, struct q4r_ring &R,
                                                   const uint8_t *tab, const float *ncode, const uint8_t *xs,
                                                   float (*part)[2][4], float inv_s, bool dry, Store store)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, pair = warp >> 1, h = warp & 1;
    int it0, nmy;
    q4r_items(nitems, (int)blockIdx.x + (int)gridDim.x * pair, &it0, &nmy);
    const int upw = (int)(j.K / 2048), total = nmy * upw, itend = it0 + nmy;
    const uint32_t lane_off = (uint32_t)lane * 4u;
    const uint32_t xsw = (uint32_t)((lane >> 1) & 7) * 16u; /* gemv_x_pos's swizzle of the lane's pieces */
    const bool b4 = (lane & 16) != 0, b3 = (lane & 8) != 0;
    const int vme = (b4 ? 2 : 0) + (b3 ? 1 : 0); /* the row whose sum this lane holds after the reduction */
    const uint32_t K = (uint32_t)j.K, cw = (uint32_t)(h * 32 + lane);
    const uint32_t sidx = (cw * 32u) >> j.bs_shift; /* the lane's scale in a row's step */
    const int nsh = j.bs_shift + nshift;
    int c_it = it0, c_m = 0, c_k = 0;
    int c_nco[2] = {0, 0};
    float c_noff[2] = {0.0f, 0.0f};
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
            c_e[2 * p] = (uint32_t)row * K;
            c_e[2 * p + 1] = ((uint32_t)row + (uint32_t)d) * K;
        }
    };
    if (NESTED && nmy > 0) set_cmp(it0);
    /* the nested scales' second level of the step after the one computed, loaded a step ahead */
    float an[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    auto nabs_load = [&](int it, int m) {
#pragma unroll
        for (int p = 0; p < 2; p++) {
            int seg, d;
            int64_t row;
            q4h4_pair<false, G>(j, it, p, 0, &seg, &row, &d);
            const float *na = j.s[seg].sc.nabs;
            const uint32_t e = (uint32_t)row * K + (uint32_t)m * 2048u;
            an[2 * p] = __ldg(na + (e >> nsh));
            an[2 * p + 1] = __ldg(na + ((e + (uint32_t)d * K) >> nsh));
        }
    };
    if (NESTED && !dry && total > 0) nabs_load(it0, 0);
    const uint32_t sb = R.sb;
    for (int q = 0; q < total; q++) {
        q4s_bar_wait(&R.full[R.s], R.ph);
        const uint8_t *st = R.base + (size_t)R.s * R.stage, *ss = st + 4 * Q4R_ROW;
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
        q4s_bar_arrive(&R.empty[R.s]);
        if (++R.s == R.ns) R.s = 0, R.ph ^= 1u;
        if (dry) {
#pragma unroll
            for (int r = 0; r < 4; r++)
                acc[r] += (float)(c[r].x ^ c[r].y ^ c[r].z ^ c[r].w ^ (NESTED ? qc[r] : 0u));
            if (++c_m < upw) continue;
            c_m = 0;
        } else {
            if (NESTED) {
#pragma unroll
                for (int r = 0; r < 4; r++)
                    a[r] = an[r];
                if (q + 1 < total) c_m + 1 < upw ? nabs_load(c_it, c_m + 1) : nabs_load(c_it + 1, 0);
            }
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

#endif
