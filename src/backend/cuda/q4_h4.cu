/* q4_h4.cu — k_q4_h4: k_q4_h2 (q4.cu) with items of 4 rows (twelfth session; TUNA_Q4_K=8, the default;
 * TUNA_Q4_K=4 for k_q4_h2).
 *
 * k_q4_h2 runs items of 2 rows (GLU: the gate and up rows of one output) split over a pair of
 * warps; at K = 4096 each warp takes only 2 steps of 1024 weights per item, so the per-item work
 * (20 shuffles, the pair barrier, the store, the next item's pointers) and the per-step work that
 * does not depend on the rows (4 x loads, the loop and load bookkeeping) are paid per 2 KB of
 * codes. Here an item is 4 rows: two row pairs (GLU: gate rows n, n + 1 and up rows n, n + 1;
 * otherwise 4 consecutive rows of one matrix), so each 16-byte piece of x read from shared memory
 * serves 4 rows, a step has 4 independent code loads in flight per lane (D = 2 steps: 2 KB per
 * warp and step, twice k_q4_h2's), and the item's 4 sums are reduced with 5 shuffles instead of 20
 * (a transposing butterfly: the same additions in the same order as k_q4_h2's, so the two kernels
 * give the same bits). The scales' form (float32 or nested) is a template parameter: no per-row
 * branch. Everything else (the byte -> half2 table, x staged as scaled f16, the f16 pair products
 * of q4h_dot, the pair's barrier and fixed-order sum) is k_q4_h2's; see q4.cu for the numerics.
 * Needs T = 1, K % 32 == 0, blocksize >= 32, 16-byte aligned codes, N * K < 2^31 per matrix and
 * every matrix's scales in the same form (nested: the same nshift). On the H100 (docs/PERFORMANCE.md,
 * "NF4, twelfth session"): layer chain 67.4 against 73.8 us/layer, 8B decode 2.95 against 3.14 ms. */
#include <stdlib.h>

#include "backend/cuda/cuda_internal.h"
#include "backend/cuda/gemv.cuh"
#include "backend/cuda/pdl.cuh"

#ifdef TUNA_Q4_TRACE
#include <stdio.h>
/* A diagnostic timeline, built only with -DTUNA_Q4_TRACE (fourteenth session): for launches
 * first..first+count-1 of the process (TUNA_Q4_TRACE=first:count) and each block (up to 132),
 * %globaltimer at entry [0], before the PDL wait [1], after it [2], after the x staging [3] and at
 * each warp's end [4..19], the SM [20], K [21], N * 4 + mode [22], the grid [23]; written at exit
 * to TUNA_Q4_TRACE_OUT (default q4trace.bin) as uint64 [count][132][24]; bench/q4_trace.py reads
 * it. The stores cost time themselves (the NF4 chain 71 against 62 us per layer). */
#define Q4TR_SLOTS 24
__device__ unsigned long long *g_q4tr;
__device__ int g_q4tr_first, g_q4tr_n;
static __device__ __forceinline__ unsigned long long q4tr_now()
{
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
static __device__ __forceinline__ unsigned long long *q4tr_row(int id)
{
    if (!g_q4tr || id < g_q4tr_first || id >= g_q4tr_first + g_q4tr_n) return NULL;
    return g_q4tr + ((size_t)(id - g_q4tr_first) * 132 + blockIdx.x) * Q4TR_SLOTS;
}
#define Q4TR(slot) do { if (tr && threadIdx.x == 0) tr[slot] = q4tr_now(); } while (0)
#else
#define Q4TR(slot) do { } while (0)
#endif

#define Q4H4_THREADS 512
#define Q4H4_PAIRS 8
#define Q4H4_TAB 65536                       /* [256 bytes][256]: half2 at lane * 4 */
#define Q4H4_NCODE (GEMV_MAX_SEG * 256 * 4)  /* [GEMV_MAX_SEG][256] nested code tables */

struct q4h4_stage {
    uint4 c[4];    /* the lane's 16 bytes of codes of each row */
    float a[4];    /* float32 absmax, or the nested absmax */
    uint32_t q[4]; /* nested: the 8-bit code of the absmax */
};

/* Row pair p of item `it`: segment, first row (clamped to the matrix) and the second row's
 * distance in rows (1, or 0 past the end: the last row read twice, not stored). */
static __device__ __forceinline__ void q4h4_pair(const struct gemv_job &j, int64_t it, int p, int *seg, int64_t *row,
                                                 int *d)
{
    int64_t n0;
    if (j.mode == GEMV_GLU) {
        *seg = p;
        n0 = 2 * it;
    } else {
        gemv_rows(j, 4, it, seg, &n0);
        n0 += 2 * p;
    }
    const int64_t N = j.s[*seg].N;
    *row = n0 < N ? n0 : N - 1;
    *d = n0 + 1 < N ? 1 : 0;
}

template <bool NORM, bool NESTED, int D>
__global__ void __launch_bounds__(Q4H4_THREADS, 1)
    k_q4_h4(const float *__restrict__ x, const __grid_constant__ struct gemv_job j, const struct q4_lut lut_in,
            int nitems, float lmax, int nshift
#ifdef TUNA_Q4_TRACE
            , int trace_id
#endif
            )
{
#ifdef TUNA_Q4_TRACE
    unsigned long long *tr = blockIdx.x < 132 ? q4tr_row(trace_id) : NULL;
    Q4TR(0);
    if (tr && threadIdx.x == 0) {
        unsigned sm;
        asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
        tr[20] = sm;
        tr[21] = (unsigned long long)j.K;
        tr[22] = (unsigned long long)j.s[0].N * 4 + (unsigned long long)j.mode;
        tr[23] = (unsigned long long)gridDim.x;
    }
#endif
    extern __shared__ float4 q4h4_smem4[];
    uint8_t *tab = reinterpret_cast<uint8_t *>(q4h4_smem4);
    float *ncode = reinterpret_cast<float *>(tab + Q4H4_TAB);
    uint8_t *xs = tab + Q4H4_TAB + Q4H4_NCODE; /* [K] f16, swizzled pieces */
    __shared__ float slut[16];
    __shared__ float red[64];
    __shared__ float part[Q4H4_PAIRS][2][4]; /* [pair][item parity][row]: warp 1's sums */
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, pair = warp >> 1, h = warp & 1;

    const int K32 = (int)(j.K / 32);
    const int KU = (K32 + 31) / 32, upw = (KU + 1) / 2; /* steps per item and warp: units h, h + 2, ... */
    /* pair P (spread over the blocks first) takes a contiguous range of items */
    const int P = blockIdx.x + gridDim.x * pair, npairs = gridDim.x * Q4H4_PAIRS;
    const int ibase = nitems / npairs, iextra = nitems % npairs;
    const int it0 = P * ibase + (P < iextra ? P : iextra), nmy = ibase + (P < iextra ? 1 : 0);
    const int itend = it0 + nmy, total = nmy * upw;
    const int bs_shift = j.bs_shift;
    const int chunk0 = h * 32 + lane; /* the lane's chunk (16 bytes, 32 weights) in the item's first step */
    const bool glu = j.mode == GEMV_GLU;
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
            q4h4_pair(j, it, p, &seg, &row, &d);
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
                if (l_n + (glu ? 1 : 3) < l_N) {
#pragma unroll
                    for (int p = 0; p < 2; p++) src[p].c += dc, src[p].e += de;
                } else {
                    set_src(l_it);
                }
            }
        } else {
            l_chunk += 64;
#pragma unroll
            for (int p = 0; p < 2; p++) src[p].c += 64, src[p].e += 64u * 32u;
        }
    };

    struct q4h4_stage st[D];
#pragma unroll
    for (int u = 0; u < D; u++)
#pragma unroll
        for (int r = 0; r < 4; r++) st[u].q[r] = 0u, st[u].a[r] = 0.0f;
    if (nmy > 0) set_src(it0);
    /* nested scales: the code tables' loads go first (2 floats per thread, kept in registers until
     * the fill), so they are not queued behind the code loads below; the tables are filled after
     * the code loads are issued, under their latency (H100, fourteenth session: NF4 batch-1 step
     * 2.77 / 2.77 against 2.81 / 2.84 ms with the table loads issued after the code loads, whose
     * arrival they then waited for: the blocks' prologues had taken 3-4.5 us) */
    constexpr int NCV = GEMV_MAX_SEG * 256 / Q4H4_THREADS;
    float ncv[NCV];
    if (NESTED)
#pragma unroll
        for (int i = 0; i < NCV; i++) {
            const int e = threadIdx.x + i * Q4H4_THREADS, sg = e >> 8;
            ncv[i] = sg < j.nseg ? __ldg(j.s[sg].sc.ncode + (e & 255)) : 0.0f;
        }
    if (j.prefetch >= 1)
#pragma unroll
        for (int u = 0; u < D; u++) load_next(st[u]);
    q4h_fill_tables(tab, ncode, slut, lut_in, j, false); /* the byte -> half2 table */
    if (NESTED)
#pragma unroll
        for (int i = 0; i < NCV; i++) {
            const int e = threadIdx.x + i * Q4H4_THREADS;
            if ((e >> 8) < j.nseg) ncode[e] = ncv[i];
        }
    Q4TR(1);
    tuna_pdl_wait();
    Q4TR(2);
    tuna_pdl_trigger();
    const float inv_s = q4h_stage_x<NORM>(xs, x, j, lmax, red); /* ends with __syncthreads: tables ready */
    Q4TR(3);
    if (j.prefetch < 1)
#pragma unroll
        for (int u = 0; u < D; u++) load_next(st[u]);

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
            q4h4_pair(j, it, p, &seg, &row, &d);
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
                const uint32_t xo = ((uint32_t)c_chunk * 64u) ^ xsw; /* piece p at xo ^ 16 p */
                uint4 xv[4];
#pragma unroll
                for (int p = 0; p < 4; p++) xv[p] = *reinterpret_cast<const uint4 *>(xs + (xo ^ ((uint32_t)p * 16u)));
#pragma unroll
                for (int r = 0; r < 4; r++) {
                    const float d = q4h_dot(tab, st[u].c[r], xv, lane_off);
                    const float am = NESTED ? __fadd_rn(__fmul_rn(ncode[c_nco[r >> 1] + st[u].q[r]], st[u].a[r]),
                                                        c_noff[r >> 1])
                                            : st[u].a[r];
                    acc[r] += am * d;
                }
            }
            load_next(st[u]);
            if (++c_m < upw) {
                c_chunk += 64;
                continue;
            }
            /* the item's last step: its 4 sums over the warp (lanes with bits 4, 3 = v hold row v:
             * k_q4_h2's butterfly order, xor 16 first), then over the pair */
            c_m = 0;
            c_chunk = chunk0;
            float k0 = b4 ? acc[2] : acc[0], k1 = b4 ? acc[3] : acc[1];
            const float s0 = b4 ? acc[0] : acc[2], s1 = b4 ? acc[1] : acc[3];
            k0 += __shfl_xor_sync(0xffffffffu, s0, 16);
            k1 += __shfl_xor_sync(0xffffffffu, s1, 16);
            float v = b3 ? k1 : k0;
            v += __shfl_xor_sync(0xffffffffu, b3 ? k0 : k1, 8);
            for (int o = 4; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
            float *pp = part[pair][c_k & 1];
            if (h == 1 && (lane & 7) == 0) pp[vme] = v;
            asm volatile("bar.sync %0, 64;" ::"r"(1 + pair) : "memory");
            if (h == 0) {
                const float tot = (v + pp[vme]) * inv_s;
                if (glu) {
                    const float up = __shfl_down_sync(0xffffffffu, tot, 16); /* lanes 0, 8: rows 2, 3 */
                    const int64_t n = (int64_t)c_it * 2 + vme;
                    if (lane < 16 && (lane & 7) == 0 && n < j.s[0].N) {
                        const float a2[2][1] = {{tot}, {up}}, one[1] = {1.0f};
                        gemv_store<1, 2>(j, a2, one, 0, n);
                    }
                } else if ((lane & 7) == 0) {
                    int seg;
                    int64_t n0;
                    gemv_rows(j, 4, c_it, &seg, &n0);
                    const float a1[1][1] = {{tot}}, one[1] = {1.0f};
                    if (n0 + vme < j.s[seg].N) gemv_store<1, 1>(j, a1, one, seg, n0 + vme);
                }
            }
#pragma unroll
            for (int r = 0; r < 4; r++) acc[r] = 0.0f;
            c_k++;
            if (++c_it < itend && NESTED) set_cmp(c_it);
        }
    }
#ifdef TUNA_Q4_TRACE
    if (tr && lane == 0) tr[4 + warp] = q4tr_now();
#endif
}

static long g_q4h4_launches;
#ifdef TUNA_Q4_TRACE
static unsigned long long *q4tr_host;
static int q4tr_hn;
static void q4tr_dump(void)
{
    const size_t n = (size_t)q4tr_hn * 132 * Q4TR_SLOTS;
    unsigned long long *h = (unsigned long long *)malloc(n * 8);
    if (!h || cudaDeviceSynchronize() != cudaSuccess ||
        cudaMemcpy(h, q4tr_host, n * 8, cudaMemcpyDeviceToHost) != cudaSuccess) {
        fprintf(stderr, "q4 trace: copy failed\n");
        free(h);
        return;
    }
    const char *o = getenv("TUNA_Q4_TRACE_OUT");
    char path[4096], tmp[4112];
    snprintf(path, sizeof path, "%s", o && *o ? o : "q4trace.bin");
    snprintf(tmp, sizeof tmp, "%s.tmp", path); /* written whole, then renamed */
    FILE *f = fopen(tmp, "wb");
    const bool ok = f && fwrite(h, 8, n, f) == n;
    if ((f && fclose(f) != 0) || !ok || rename(tmp, path) != 0) {
        fprintf(stderr, "q4 trace: could not write %s (check the folder and free space)\n", path);
        remove(tmp);
    } else {
        fprintf(stderr, "q4 trace: %d launches written to %s\n", q4tr_hn, path);
    }
    free(h);
}
/* The trace's buffer at the first launch (TUNA_Q4_TRACE=first:count); the launch's number. */
static int q4tr_setup(void)
{
    static bool done = false;
    const char *e = done ? NULL : getenv("TUNA_Q4_TRACE");
    done = true;
    int first = 0, n = 0;
    unsigned long long *d = NULL;
    if (e && (sscanf(e, "%d:%d", &first, &n) != 2 || first < 0 || n <= 0 || n > 100000)) {
        fprintf(stderr, "q4 trace: TUNA_Q4_TRACE=%s: want first:count (count 1-100000); not tracing\n", e);
    } else if (e && cudaMalloc(&d, (size_t)n * 132 * Q4TR_SLOTS * 8) != cudaSuccess) {
        fprintf(stderr, "q4 trace: no device memory for %d launches; not tracing\n", n);
    } else if (e) {
        cudaMemset(d, 0, (size_t)n * 132 * Q4TR_SLOTS * 8);
        cudaMemcpyToSymbol(g_q4tr, &d, sizeof d);
        cudaMemcpyToSymbol(g_q4tr_first, &first, sizeof first);
        cudaMemcpyToSymbol(g_q4tr_n, &n, sizeof n);
        q4tr_host = d, q4tr_hn = n;
        atexit(q4tr_dump);
    }
    return (int)g_q4h4_launches;
}
#endif

extern "C" long tuna_cuda_q4_h4_launches(void)
{
    return g_q4h4_launches;
}

bool tuna_cuda_q4_h4(tuna_backend *be, const float *x, struct gemv_job *j, const struct tuna_weight *const *ws,
                     const struct q4_lut *lut, int blocksize, int64_t T)
{
    const int64_t K = j->K;
    bool nested;
    if (!q4h_job_fits(j, ws, blocksize, T, &nested)) return false;
    const size_t smem = (size_t)Q4H4_TAB + Q4H4_NCODE + ((size_t)K * 2 + 127) / 128 * 128;
    if (be->max_smem_optin <= 0 || smem + 2048 > (size_t)be->max_smem_optin) return false; /* + static */
    const bool glu = j->mode == GEMV_GLU;
    const int64_t n4 = glu ? (j->s[0].N + 1) / 2 : gemv_number_rows(j, 4) / 4;
    /* everywhere it fits: q/k/v at 8B shapes gives some pairs 2 items of 4 rows where k_q4_h2 gives
     * them at most 3 of 2, and still measured faster in the layer chain (67.4 against 68.9 us/layer
     * with q/k/v left on k_q4_h2, H100) */
    const int64_t sms = be->sm_count > 0 ? be->sm_count : 132;
    const int64_t b4 = (n4 + Q4H4_PAIRS - 1) / Q4H4_PAIRS < sms ? (n4 + Q4H4_PAIRS - 1) / Q4H4_PAIRS : sms;
    if (b4 < 1) return true; /* nothing to do */
    if (n4 >= ((int64_t)1 << 30)) return false;
    const float lmax = q4_lut_absmax(lut);
    j->prefetch = tuna_cuda_gemv_prefetch();
    const int nshift = nested ? j->s[0].sc.nshift : 0;
    const dim3 grid((unsigned)b4), block(Q4H4_THREADS);
#ifdef TUNA_Q4_TRACE
    const int trace_id = q4tr_setup();
#define Q4TR_ARG , trace_id
#else
#define Q4TR_ARG
#endif
    g_q4h4_launches++;
    if (j->nw) {
        if (nested)
            return tuna_cuda_launch(be, "k_q4_h4", k_q4_h4<true, true, 2>, grid, block, smem, x, *j, *lut, (int)n4,
                                    lmax, nshift Q4TR_ARG);
        return tuna_cuda_launch(be, "k_q4_h4", k_q4_h4<true, false, 2>, grid, block, smem, x, *j, *lut, (int)n4, lmax,
                                nshift Q4TR_ARG);
    }
    if (nested)
        return tuna_cuda_launch(be, "k_q4_h4", k_q4_h4<false, true, 2>, grid, block, smem, x, *j, *lut, (int)n4, lmax,
                                nshift Q4TR_ARG);
    return tuna_cuda_launch(be, "k_q4_h4", k_q4_h4<false, false, 2>, grid, block, smem, x, *j, *lut, (int)n4, lmax,
                            nshift Q4TR_ARG);
}
