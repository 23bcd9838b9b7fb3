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
 * "NF4, twelfth session"): layer chain 67.4 against 73.8 us/layer, 8B decode 2.95 against 3.14 ms.
 * Twenty-fourth session: the job's form (GLU, or one matrix) is a template parameter G, so a row
 * pair's segment is a constant and its pointers need no registers; ptxas then loads the byte -> half2
 * table entries ~25-30 instructions ahead of their products instead of ~10-13 (fewer short-scoreboard
 * stalls): gate/up, o and down faster, q/k/v (three matrices) left on the run-time form. */
#include <stdlib.h>

#include "backend/cuda/cuda_internal.h"
#include "backend/cuda/gemv.cuh"
#include "backend/cuda/pdl.cuh"
#include "backend/cuda/q4_h4.cuh"

#ifdef TUNA_Q4_TRACE
#include <stdio.h>
/* A diagnostic timeline, built only with -DTUNA_Q4_TRACE (fourteenth session): for launches
 * first..first+count-1 of the process (TUNA_Q4_TRACE=first:count) and each block (up to 132),
 * %globaltimer at entry [0], before the PDL wait [1], after it [2], after the x staging [3] and at
 * each warp's end [4..19], the SM [20], K [21], N * 4 + mode [22], the grid [23]; written at exit
 * to TUNA_Q4_TRACE_OUT (default q4trace.bin) as uint64 [count][132][24]; bench/q4_trace.py reads
 * it. The stores cost time themselves (the NF4 chain 71 against 62 us per layer). */
__device__ unsigned long long *g_q4tr;
__device__ int g_q4tr_first, g_q4tr_n;
static __device__ __forceinline__ unsigned long long *q4tr_row(int id)
{
    if (!g_q4tr || id < g_q4tr_first || id >= g_q4tr_first + g_q4tr_n) return NULL;
    return g_q4tr + ((size_t)(id - g_q4tr_first) * 132 + blockIdx.x) * Q4TR_SLOTS;
}
#define Q4TR_ARGV , tr
#else
#define Q4TR_ARGV
#endif

template <bool NORM, bool NESTED, int D, int G, bool ACC = false>
__global__ void __launch_bounds__(Q4H4_THREADS, 1)
    k_q4_h4(const float *__restrict__ x, const __grid_constant__ struct gemv_job j, const struct q4_lut lut_in,
            int nitems, float lmax, int nshift
#ifdef TUNA_Q4_TRACE
            ,
            int trace_id
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
    __shared__ float slut[16];
    __shared__ float red[64];
    __shared__ float part[Q4H4_PAIRS][2][4]; /* [pair][item parity][row]: warp 1's sums */
    struct q4h4_smem sm;
    sm.tab = reinterpret_cast<uint8_t *>(q4h4_smem4);
    sm.ncode = reinterpret_cast<float *>(sm.tab + Q4H4_TAB);
    sm.xs = sm.tab + Q4H4_TAB + Q4H4_NCODE; /* [K] f16, swizzled pieces */
    sm.slut = slut, sm.red = red, sm.part = part;
    const int lane = threadIdx.x & 31;
    const bool glu = q4h4_glu<G>(j);
    auto wait = [] {
        tuna_pdl_wait();
        tuna_pdl_trigger();
    };
    auto store = [&](int it, int vme, float tot) { q4h4_store<G>(j, glu, lane, it, vme, tot); };
    q4h4_run<NORM, NESTED, D, false, G, decltype(wait), decltype(store), 0, ACC>(sm, x, j, lut_in, true, nitems, lmax,
                                                                                nshift, 0, wait, store Q4TR_ARGV);
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

/* TUNA_Q4_G=0: every job's form read at run time, as before the twenty-fourth session (comparisons);
 * read once, not at every launch */
static bool q4h4_form_at_run_time(void)
{
    static int v = -1;
    if (v < 0) {
        const char *e = getenv("TUNA_Q4_G");
        v = e && e[0] == '0';
    }
    return v == 1;
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
    /* everywhere it fits: q/k/v at 8B shapes gives some pairs 2 items of 4 rows where k_q4_h2 gives
     * them at most 3 of 2, and still measured faster in the layer chain (67.4 against 68.9 us/layer
     * with q/k/v left on k_q4_h2, H100) */
    int64_t n4, b4;
    const bool fits = q4h4_grid(be, j, &n4, &b4);
    if (b4 < 1) return true; /* nothing to do */
    if (!fits) return false;
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
    /* the job's form as a template parameter (q4h4_glu) where that measured faster: GLU (gate/up) and
     * one matrix (o, down); several matrices (q/k/v) read the mode at run time (G = 2 measured slower
     * there: 14.4 against 13.4 us/layer) */
    const int G = q4h4_form_at_run_time() ? 0 : glu ? 1 : j->nseg == 1 ? 3 : 0;
    if (j->yacc && (G != 3 || j->mode != GEMV_ADD)) gemv_job_settle(be, j); /* only the one-matrix form folds y's */
#define Q4H4_GO(NORM, NESTED, GG, ACC)                                                                                 \
    tuna_cuda_launch(be, "k_q4_h4", k_q4_h4<NORM, NESTED, 2, GG, ACC>, grid, block, smem, x, *j, *lut, (int)n4, lmax,  \
                     nshift Q4TR_ARG)
#define Q4H4_G(NORM, NESTED)                                                                                           \
    (G == 0 ? Q4H4_GO(NORM, NESTED, 0, false) : G == 1 ? Q4H4_GO(NORM, NESTED, 1, false) : Q4H4_GO(NORM, NESTED, 3, false))
    /* x's pending part (racc.cu) read in the staging: its own instantiation (the 64-bit loads take
     * registers the other forms keep for the loop); the q/k/v form, the one that meets it */
    if (j->nw && j->xacc) return nested ? Q4H4_GO(true, true, 0, true) : Q4H4_GO(true, false, 0, true);
    if (j->nw) return nested ? Q4H4_G(true, true) : Q4H4_G(true, false);
    return nested ? Q4H4_G(false, true) : Q4H4_G(false, false);
#undef Q4H4_G
#undef Q4H4_GO
}
