/* q4_h4.cuh — the body of the batch-1 4-bit GEMV k_q4_h4 (q4_h4.cu) as a device function, so that
 * the decode-layer kernel (q4_layer.cu) runs the same loop for each of its four projections.
 * The numerics, the item layout and the measurements are described in q4_h4.cu. */
#ifndef TUNA_BACKEND_CUDA_Q4_H4_CUH
#define TUNA_BACKEND_CUDA_Q4_H4_CUH

#include "backend/cuda/gemv.cuh"

#define Q4H4_THREADS 512
#define Q4H4_PAIRS 8
#define Q4H4_TAB 65536                      /* [256 bytes][256]: half2 at lane * 4 */
#define Q4H4_NCODE (GEMV_MAX_SEG * 256 * 4) /* [GEMV_MAX_SEG][256] nested code tables */

/* The diagnostic timeline (q4_h4.cu, -DTUNA_Q4_TRACE): tr is the block's row or NULL. */
#ifdef TUNA_Q4_TRACE
#define Q4TR_SLOTS 24
static __device__ __forceinline__ unsigned long long q4tr_now()
{
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
#define Q4TR(slot)                                                                                                     \
    do {                                                                                                               \
        if (tr && threadIdx.x == 0) tr[slot] = q4tr_now();                                                             \
    } while (0)
#define Q4TR_PARAM , unsigned long long *tr
#else
#define Q4TR(slot)                                                                                                     \
    do {                                                                                                               \
    } while (0)
#define Q4TR_PARAM
#endif

struct q4h4_stage {
    uint4 c[4];    /* the lane's 16 bytes of codes of each row */
    float a[4];    /* float32 absmax, or the nested absmax */
    uint32_t q[4]; /* nested: the 8-bit code of the absmax */
};

/* The block's shared memory as the body uses it: tab [Q4H4_TAB] bytes, ncode [Q4H4_NCODE] bytes,
 * xs [K] f16 (swizzled pieces), and small scratch: slut [16], red [64], part [Q4H4_PAIRS][2][4]. */
struct q4h4_smem {
    uint8_t *tab;
    float *ncode;
    uint8_t *xs;
    float *slut, *red;
    float (*part)[2][4];
};

/* ROPE: the rows of segments 0 and 1 (q and k, head size hd) are taken in RoPE pairs: item li of
 * a head (li = 0 .. hd/4 - 1) is rows 2 li, 2 li + 1 (pair 0) and 2 li + hd/2, 2 li + hd/2 + 1
 * (pair 1), so one item holds both halves of two rotations (q4_layer.cu rotates in the store). */
template <bool ROPE> static __device__ __forceinline__ int64_t q4h4_rope_row(int seg, int64_t n0, int p, int hd)
{
    if (ROPE && seg < 2) {
        const int64_t li = n0 >> 2, qh = hd >> 2, head = li / qh;
        return head * hd + 2 * (li - head * qh) + p * (hd >> 1);
    }
    return n0 + 2 * p;
}

/* G: the job's form known when compiled: 1 GEMV_GLU, 2 another mode, 3 another mode with one
 * matrix, 0 read from the job at run time. Known, the segment of a row pair is a constant (GLU:
 * pair p's is p; one matrix: 0), so its pointers can stay in the constant bank instead of
 * registers, which leaves ptxas registers to load more table entries ahead of their products. */
template <int G> static __device__ __forceinline__ bool q4h4_glu(const struct gemv_job &j)
{
    return G == 0 ? j.mode == GEMV_GLU : G == 1;
}

/* Row pair p of item `it`: segment, first row (clamped to the matrix) and the second row's
 * distance in rows (1, or 0 past the end: the last row read twice, not stored). */
template <bool ROPE, int G>
static __device__ __forceinline__ void q4h4_pair(const struct gemv_job &j, int64_t it, int p, int hd, int *seg,
                                                 int64_t *row, int *d)
{
    int64_t n0;
    if (q4h4_glu<G>(j)) {
        *seg = p;
        n0 = 2 * it;
    } else if (G == 3) {
        *seg = 0;
        n0 = q4h4_rope_row<ROPE>(0, it * 4, p, hd);
    } else {
        gemv_rows(j, 4, it, seg, &n0);
        n0 = q4h4_rope_row<ROPE>(*seg, n0, p, hd);
    }
    const int64_t N = j.s[*seg].N;
    *row = n0 < N ? n0 : N - 1;
    *d = n0 + 1 < N ? 1 : 0;
}

/* Pair P's items of nitems spread over npairs warp pairs (q4h4_run): a contiguous range [*it0, *it0 +
 * *nmy), the first nitems % npairs pairs one item more. */
static __device__ __forceinline__ void q4h4_range(int nitems, int npairs, int P, int *it0, int *nmy)
{
    const int ibase = nitems / npairs, iextra = nitems % npairs;
    *it0 = P * ibase + (P < iextra ? P : iextra);
    *nmy = ibase + (P < iextra ? 1 : 0);
}

/* Host side: the items of 4 rows (GLU: 2 outputs) of job j and the blocks k_q4_h4 (and k_q4_r) run
 * them on (one per SM at most, Q4H4_PAIRS items each at least); *blocks 0 when there is nothing to
 * do. False when the items do not fit an int. */
static inline bool q4h4_grid(const tuna_backend *be, struct gemv_job *j, int64_t *items, int64_t *blocks)
{
    const int64_t n4 = j->mode == GEMV_GLU ? (j->s[0].N + 1) / 2 : gemv_number_rows(j, 4) / 4;
    const int64_t sms = be->sm_count > 0 ? be->sm_count : 132, need = (n4 + Q4H4_PAIRS - 1) / Q4H4_PAIRS;
    *items = n4;
    *blocks = need < sms ? need : sms;
    return n4 < ((int64_t)1 << 30);
}

/* The store of an item's sums that k_q4_h4 and k_q4_r pass to their loops (q4h4_run's store):
 * GLU (glu = q4h4_glu<G>(j), computed once by the caller), act(gate) * up of outputs 2 it + vme
 * (lanes 0 and 8); otherwise row vme of the item's 4 (lanes 0, 8, 16, 24), through gemv_store (the
 * job's mode: store or add, bias). */
template <int G>
static __device__ __forceinline__ void q4h4_store(const struct gemv_job &j, bool glu, int lane, int it, int vme,
                                                  float tot)
{
    if (glu) {
        const float up = __shfl_down_sync(0xffffffffu, tot, 16); /* lanes 0, 8: rows 2, 3 */
        const int64_t n = (int64_t)it * 2 + vme;
        if (lane < 16 && (lane & 7) == 0 && n < j.s[0].N) {
            const float a2[2][1] = {{tot}, {up}}, one[1] = {1.0f};
            gemv_store<1, 2>(j, a2, one, 0, n);
        }
    } else if ((lane & 7) == 0) {
        int seg = 0;
        int64_t n0 = (int64_t)it * 4;
        if (G != 3) gemv_rows(j, 4, it, &seg, &n0);
        const float a1[1][1] = {{tot}}, one[1] = {1.0f};
        const int64_t n = n0 + vme;
        if (n < j.s[seg].N) {
            if (G == 3 && j.yacc) { /* x += o with x's pending part (racc.cu) folded first */
                float *yp = j.s[0].y + n;
                const float b = j.s[0].bias ? j.s[0].bias[n] : 0.0f;
                *yp = (*yp + racc_value(j.yacc[n])) + (tot * 1.0f + b);
                j.yacc[n] = 0;
            } else {
                gemv_store<1, 1>(j, a1, one, seg, n);
            }
        }
    }
}

/* An item's end in q4h4_run and k_q4_r: the warp's 4 sums acc over its lanes (lanes with bits 4, 3
 * = v end with row v: k_q4_h2's butterfly order, xor 16 first), then over the pair (warp h = 1
 * leaves its sums in part[pair][k & 1], warp 0 adds them after the pair's barrier and stores row
 * vme of item `it`, scaled by inv_s); acc is zeroed. */
template <typename Store>
static __device__ __forceinline__ void q4h4_item_end(float (&acc)[4], float (*part)[2][4], int pair, int h, int lane,
                                                     bool b4, bool b3, int vme, int k, int it, float inv_s, Store store)
{
    float k0 = b4 ? acc[2] : acc[0], k1 = b4 ? acc[3] : acc[1];
    const float s0 = b4 ? acc[0] : acc[2], s1 = b4 ? acc[1] : acc[3];
    k0 += __shfl_xor_sync(0xffffffffu, s0, 16);
    k1 += __shfl_xor_sync(0xffffffffu, s1, 16);
    float v = b3 ? k1 : k0;
    v += __shfl_xor_sync(0xffffffffu, b3 ? k0 : k1, 8);
    for (int o = 4; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    float *pp = part[pair][k & 1];
    if (h == 1 && (lane & 7) == 0) pp[vme] = v;
    asm volatile("bar.sync %0, 64;" ::"r"(1 + pair) : "memory");
    if (h == 0) store(it, vme, (v + pp[vme]) * inv_s);
#pragma unroll
    for (int r = 0; r < 4; r++)
        acc[r] = 0.0f;
}

/* One 4-bit GEMV of job j over x [K] (see q4_h4.cu), by the whole block (Q4H4_THREADS threads):
 * items of 4 rows spread over the grid's warp pairs. fill: build the byte -> half2 table first
 * (a kernel that runs several GEMVs builds it once). wait(): called by every thread once the
 * first weights are in flight and before x is read (the PDL wait, or a grid barrier); in a kernel
 * that runs several GEMVs it must synchronize the block (ncode and xs are rewritten after it).
 * store(it, v, tot): called by every lane of each pair's first warp per
 * item; lanes 0, 8, 16, 24 hold row v = 0..3's sum (GLU: v 0, 1 gate rows, 2, 3 up rows of
 * outputs 2 it, 2 it + 1) in tot, already scaled. ROPE, hd: q4h4_rope_row's row order. */
template <bool NORM, bool NESTED, int D, bool ROPE, int G, typename Wait, typename Store, int CL = 0, bool ACC = false>
static __device__ __forceinline__ void q4h4_run(const struct q4h4_smem &sm, const float *x, const struct gemv_job &j,
                                                const struct q4_lut &lut_in, bool fill, int nitems, float lmax,
                                                int nshift, int hd, Wait wait, Store store Q4TR_PARAM, int ioff = 0)
{
    uint8_t *tab = sm.tab, *xs = sm.xs;
    float *ncode = sm.ncode;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, pair = warp >> 1, h = warp & 1;

    const int K32 = (int)(j.K / 32);
    const int KU = (K32 + 31) / 32, upw = (KU + 1) / 2; /* steps per item and warp: units h, h + 2, ... */
    /* pair P (spread over the blocks first) takes a contiguous range of items; CL > 0: the items
     * ioff .. ioff + nitems - 1 of the block's cluster of CL blocks (q4_mlp.cu), over its pairs */
    const int P = CL ? (int)(blockIdx.x % CL) + CL * pair : blockIdx.x + gridDim.x * pair;
    const int npairs = CL ? CL * Q4H4_PAIRS : gridDim.x * Q4H4_PAIRS;
    int it0, nmy;
    q4h4_range(nitems, npairs, P, &it0, &nmy);
    if (CL) it0 += ioff;
    const int itend = it0 + nmy, total = nmy * upw;
    const int bs_shift = j.bs_shift;
    const int chunk0 = h * 32 + lane; /* the lane's chunk (16 bytes, 32 weights) in the item's first step */
    const bool glu = q4h4_glu<G>(j);
    const int rstep = glu ? 2 : 4; /* rows from one item to the next (per matrix) */

    /* the load side: per row pair, the lane's codes and element index in the first row, the
     * second row's distance (K or 0) */
    struct {
        const uint4 *c;
        const float *a;
        const uint8_t *q;
        uint32_t e, dk;
    } src[2];
    const uint32_t K = (uint32_t)j.K;
    /* the next item in the same matrix, all its rows inside: pointers move by a constant */
    const int dc = rstep * K32 - 64 * (upw - 1);
    const uint32_t de = (uint32_t)rstep * K - 64u * 32u * (uint32_t)(upw - 1);
    int l_it = it0, l_m = 0, l_chunk = chunk0;
    int64_t l_n = 0, l_N = 0; /* the item's first row (non-GLU: of pair 0) and its matrix's rows */
    auto set_src = [&](int it) {
#pragma unroll
        for (int p = 0; p < 2; p++) {
            int seg, d;
            int64_t row;
            q4h4_pair<ROPE, G>(j, it, p, hd, &seg, &row, &d);
            const struct gemv_seg &s = j.s[seg];
            if (p == 0) l_n = row, l_N = s.N;
            const uint32_t e0 = (uint32_t)row * K;
            src[p].c = reinterpret_cast<const uint4 *>(s.W) + e0 / 32 + chunk0;
            src[p].e = e0 + (uint32_t)chunk0 * 32u;
            src[p].dk = d ? K : 0u;
            src[p].a = NESTED ? s.sc.nabs : s.sc.absmax;
            src[p].q = NESTED ? s.sc.q : NULL;
        }
    };
    auto load_next = [&](struct q4h4_stage &st) {
        if (l_it >= itend) return;
        if (l_chunk < K32) {
#pragma unroll
            for (int r = 0; r < 4; r++) {
                const int p = r >> 1;
                const uint32_t e = src[p].e + ((r & 1) ? src[p].dk : 0u);
                st.c[r] = __ldg(src[p].c + ((r & 1) ? src[p].dk / 32u : 0u));
                const uint32_t b = e >> bs_shift;
                if (NESTED) {
                    st.q[r] = __ldg(src[p].q + b);
                    st.a[r] = __ldg(src[p].a + (b >> nshift));
                } else {
                    st.a[r] = __ldg(src[p].a + b);
                }
            }
        }
        if (++l_m == upw) {
            l_m = 0;
            l_chunk = chunk0;
            if (++l_it < itend) {
                l_n += rstep;
                if (!ROPE && l_n + (glu ? 1 : 3) < l_N) {
#pragma unroll
                    for (int p = 0; p < 2; p++)
                        src[p].c += dc, src[p].e += de;
                } else {
                    set_src(l_it);
                }
            }
        } else {
            l_chunk += 64;
#pragma unroll
            for (int p = 0; p < 2; p++)
                src[p].c += 64, src[p].e += 64u * 32u;
        }
    };

    struct q4h4_stage st[D];
#pragma unroll
    for (int u = 0; u < D; u++)
#pragma unroll
        for (int r = 0; r < 4; r++)
            st[u].q[r] = 0u, st[u].a[r] = 0.0f;
    if (nmy > 0) set_src(it0);
    /* nested scales: the code tables' loads go first (2 floats per thread, kept in registers until
     * the fill), so they are not queued behind the code loads below; the tables are filled after
     * the code loads are issued, under their latency (H100, fourteenth session: NF4 batch-1 step
     * 2.77 / 2.77 against 2.81 / 2.84 ms with the table loads issued after the code loads, whose
     * arrival they then waited for: the blocks' prologues had taken 3-4.5 us) */
    float ncv[GEMV_MAX_SEG * 256 / Q4H4_THREADS];
    if (NESTED) q4h_ncode_load<Q4H4_THREADS>(ncv, j);
    /* before the PDL wait, one step of codes (32 KB per SM with 16 warps), not all D: the x staging
     * after the wait is an L2 round trip that waits behind every load in flight on the GPU
     * (bench_queue_latency on the H100: 137 ns with ~4 MB in flight, which already saturate DRAM;
     * 0.6-0.7 us with ~8.7 MB). Thirty-first session: with the ring's cap (q4_ring.cu), NF4 Llama-3-8B
     * batch-1 graph 2,448-2,450 against 2,530-2,532 us (TUNA_GEMV_PREFETCH=3: all D steps first, the
     * old way). */
    const int pre = j.prefetch <= 0 ? 0 : j.prefetch == 3 ? D : 1;
#pragma unroll
    for (int u = 0; u < D; u++)
        if (u < pre) load_next(st[u]);
    if (fill) q4h_fill_tables(tab, ncode, sm.slut, lut_in, j, false); /* the byte -> half2 table */
    Q4TR(1);
    wait();
    Q4TR(2);
    if (NESTED) q4h_ncode_store<Q4H4_THREADS>(ncode, ncv, j);
    const float inv_s = q4h_stage_x<NORM, 0, ACC>(xs, x, j, lmax, sm.red); /* ends with __syncthreads: tables ready */
    Q4TR(3);
#pragma unroll
    for (int u = 0; u < D; u++)
        if (u >= pre) load_next(st[u]);

    /* the compute side: item c_it, step c_m */
    const uint32_t lane_off = (uint32_t)lane * 4u;
    const uint32_t xsw = (uint32_t)((lane >> 1) & 7) * 16u; /* gemv_x_pos's swizzle of the lane's pieces */
    const bool b4 = (lane & 16) != 0, b3 = (lane & 8) != 0;
    const int vme = (b4 ? 2 : 0) + (b3 ? 1 : 0); /* the row whose sum this lane holds after the reduction */
    int c_it = it0, c_m = 0, c_chunk = chunk0, c_k = 0;
    int c_nco[2] = {0, 0};
    float c_noff[2] = {0.0f, 0.0f};
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    auto set_cmp = [&](int it) {
#pragma unroll
        for (int p = 0; p < 2; p++) {
            int seg, d;
            int64_t row;
            q4h4_pair<ROPE, G>(j, it, p, hd, &seg, &row, &d);
            c_nco[p] = seg * 256;
            c_noff[p] = j.s[seg].sc.noff;
        }
    };
    if (NESTED && nmy > 0) set_cmp(it0);
    for (int q0 = 0; q0 < total; q0 += D) {
#pragma unroll
        for (int u = 0; u < D; u++) {
            if (q0 + u >= total) break;
            if (c_chunk < K32) {
                uint4 xv[4];
                q4h_x_pieces(xs, (uint32_t)c_chunk, xsw, xv);
#pragma unroll
                for (int r = 0; r < 4; r++) {
                    const float d = q4h_dot(tab, st[u].c[r], xv, lane_off);
                    const float am =
                        NESTED ? q4_nested(ncode[c_nco[r >> 1] + st[u].q[r]], st[u].a[r], c_noff[r >> 1]) : st[u].a[r];
                    acc[r] += am * d;
                }
            }
            load_next(st[u]);
            if (++c_m < upw) {
                c_chunk += 64;
                continue;
            }
            /* the item's last step: its 4 sums over the warp, then over the pair */
            c_m = 0;
            c_chunk = chunk0;
            q4h4_item_end(acc, sm.part, pair, h, lane, b4, b3, vme, c_k, c_it, inv_s, store);
            c_k++;
            if (++c_it < itend && NESTED) set_cmp(c_it);
        }
    }
#ifdef TUNA_Q4_TRACE
    if (tr && lane == 0) tr[4 + warp] = q4tr_now();
#endif
}

#endif
