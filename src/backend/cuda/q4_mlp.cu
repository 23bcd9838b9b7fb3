/* q4_mlp.cu — k_q4_mlp: the MLP block of one token with 4-bit weights in one kernel (backend.h's
 * rmsnorm_glu_down; twenty-seventh session). x += W_down (act(W_gate n) * (W_up n)), n = RMSNorm(x).
 * EXPERIMENTAL, OFF BY DEFAULT (TUNA_Q4_MLP=1 turns it on): correct (test_cuda_layer: the ops' logits
 * to 2e-4, graph replays bit for bit), but on the H100 slower than the two k_q4_h4 launches it
 * replaces (Llama-3-8B shapes: 52-54 against 41 us per layer in the chain, NF4 batch 1 2.76-2.77
 * against 2.55-2.57 ms/step); docs/PERFORMANCE.md, "NF4, twenty-seventh session", says what was
 * measured: the gate/up part alone takes 31-32 us here against 25.5 in k_q4_h4, down's part ~20.
 *
 * Why: at batch 1 the MLP ran as two k_q4_h4 launches, and down's (~10 us of bytes at the copy
 * rate, 16 us in the layer chain on the H100) paid a launch, the table fill, its x staging and a
 * tail again. Here the GLU output never leaves the cluster that made it:
 * - the grid is clusters of CS = 2 or 4 blocks (one block per SM, 512 threads; as many clusters as
 *   can be resident, whichever size keeps more SMs busy: 66 of 2 on the H100, 30 of 4); cluster c
 *   owns the GLU outputs [h0, h0 + nh), a contiguous range in units of 32 (down's K is cut the
 *   same way);
 * - its blocks run k_q4_h4's body (q4_h4.cuh: the norm folded in, items of 2 outputs over the
 *   cluster's warp pairs) and store each output into all CS blocks' shared memory (distributed
 *   shared memory, st.shared::cluster);
 * - after a cluster barrier each block stages the nh outputs as scaled f16 pieces (q4h_stage_x's
 *   form) and multiplies its 1/CS of down's rows, restricted to the columns [h0, h0 + nh): LPR =
 *   8 or 16 lanes per row, lane l its l-th 32 weights (one 16-byte load, k_q4_h4's products, the
 *   same block scales), the row's sum over those lanes;
 * - down's partial sums (one per row and cluster) are added into x's pending part in 64-bit fixed
 *   point (racc.cu: integer atomics, so the total does not depend on the order the clusters
 *   finish: the same bits every run and in CUDA graph replays). x itself is not written: its next
 *   reader adds the pending part (k_q4_h4's staging, o's GEMV) or folds it first.
 * Down's first rows are loaded before the cluster barrier (they do not depend on the GLU).
 *
 * Needs: sm_90 (clusters), T = 1, gate/up/down 4-bit with one table, blocksize and scale form, no
 * biases, what k_q4_h4 needs for gate/up, I % 32 == 0 and at most 16 units of 32 per cluster, C * I
 * < 2^31. The host side declines anything else (the caller runs the ops). Measurement knobs:
 * TUNA_Q4_MLP_CS=2|4 (the cluster size), TUNA_Q4M_DBG=1 (no atomics) / 2 (no down phase): wrong
 * results. */
#include <stdio.h>
#include <stdlib.h>

#include "backend/cuda/cuda_internal.h"
#include "backend/cuda/gemv.cuh"
#include "backend/cuda/pdl.cuh"
#include "backend/cuda/q4_h4.cuh"

#define Q4M_MAXCH 16 /* down's chunks of 32 columns per cluster at most: one per lane of a half-warp */
#define Q4M_DN 8     /* down's rows in flight per lane group (registers) */

#ifdef TUNA_Q4_TRACE
#define Q4M_TR , (unsigned long long *)NULL
#else
#define Q4M_TR
#endif

struct q4m_param {
    struct gemv_job jg;    /* gate (s[0]) and up (s[1]): GLU, the norm (nw, xn, eps), act, scales, bs_shift */
    const uint4 *wd;       /* down's codes [nd][kd / 32] (16 bytes per 32 weights) */
    struct q4_scales sd;   /* down's block scales (the same blocksize and form as gate/up's) */
    int nd, kd;            /* down's rows (C) and columns (I) */
    long long *acc;        /* x's pending part, added into (racc.cu) */
    struct q4_lut lut;
    float lmax;
    int nshift;
    int nclus, units;        /* clusters; down's K in units of 32 */
    uint32_t hs_off, hx_off; /* byte offsets in the dynamic shared memory: hs float [hmax], hx f16 pieces */
    int dbg; /* measurements only (TUNA_Q4M_DBG; wrong results): 1 no atomics, 2 no down phase */
};

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
/* v into the float at p's offset in the shared memory of the cluster's block `rank` */
static __device__ __forceinline__ void q4m_st_cluster(float *p, int rank, float v)
{
    const uint32_t a = (uint32_t)__cvta_generic_to_shared(p);
    uint32_t r;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(rank));
    asm volatile("st.shared::cluster.f32 [%0], %1;" ::"r"(r), "f"(v) : "memory");
}
#endif

/* CS: blocks per cluster (2 or 4); LPR: lanes per row of down (8 or 16, at least the chunks) */
template <bool NESTED, int CS, int LPR>
__global__ void __launch_bounds__(Q4H4_THREADS, 1)
    k_q4_mlp(const float *__restrict__ x, const __grid_constant__ struct q4m_param P)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 /* clusters; the host launches it on sm_90+ only */
    extern __shared__ float4 q4m_smem4[];
    __shared__ float slut[16];
    __shared__ float red[64];
    __shared__ float part[Q4H4_PAIRS][2][4];
    uint8_t *base = reinterpret_cast<uint8_t *>(q4m_smem4);
    struct q4h4_smem sm;
    sm.tab = base;
    sm.ncode = reinterpret_cast<float *>(base + Q4H4_TAB);
    sm.xs = base + Q4H4_TAB + Q4H4_NCODE;
    sm.slut = slut, sm.red = red, sm.part = part;
    float *hs = reinterpret_cast<float *>(base + P.hs_off); /* [nh] the cluster's GLU outputs */
    uint8_t *hx = base + P.hx_off;                          /* the same as scaled f16 pieces */
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int rank = (int)(blockIdx.x % CS), c = (int)(blockIdx.x / CS);
    const int u0 = (int)((int64_t)c * P.units / P.nclus), u1 = (int)((int64_t)(c + 1) * P.units / P.nclus);
    const int h0 = 32 * u0, nh = 32 * (u1 - u0);
    /* every block of the cluster must have started before another writes its shared memory */
    asm volatile("barrier.cluster.arrive.relaxed;" ::: "memory");

    auto wait = [&] {
        tuna_pdl_wait();
        tuna_pdl_trigger();
        asm volatile("barrier.cluster.wait;" ::: "memory");
    };
    /* the GLU output 2 it + vme (lanes 0 and 8 of the pair's first warp; up's sums 16 lanes on, as
     * q4h4_store reads them) into hs of every block of the cluster */
    auto store = [&](int it, int vme, float tot) {
        const float up = __shfl_down_sync(0xffffffffu, tot, 16);
        const int n = 2 * it + vme;
        if (lane < 16 && (lane & 7) == 0) {
            const float v = tuna_cuda_act(tot, P.jg.act) * up;
#pragma unroll
            for (int r = 0; r < CS; r++)
                q4m_st_cluster(hs + (n - h0), r, v);
        }
    };
    q4h4_run<true, NESTED, 2, false, 1, decltype(wait), decltype(store), CS>(
        sm, x, P.jg, P.lut, true, nh / 2, P.lmax, P.nshift, 0, wait, store Q4M_TR, h0 / 2);

    /* down: this block's rows [r0, r1), columns [h0, h0 + nh); lane group g (LPR lanes) takes rows
     * r0 + g + RPI i, its lane l the row's chunk l (32 weights, 16 bytes) */
    constexpr int RPI = Q4H4_THREADS / LPR; /* rows per iteration of the block */
    const int rpb = (P.nd + CS - 1) / CS, r0 = rank * rpb, r1 = min(P.nd, r0 + rpb);
    const int l16 = lane % LPR, g = (int)threadIdx.x / LPR;
    const bool on = l16 < nh / 32;
    const uint32_t kd = (uint32_t)P.kd, col = (uint32_t)(h0 + 32 * l16);
    const int bs = P.jg.bs_shift, ni = r1 > r0 ? (r1 - r0 + RPI - 1) / RPI : 0;
    uint4 dc[Q4M_DN];
    float da[Q4M_DN];
    uint32_t dq[Q4M_DN];
    auto dload = [&](int i, uint4 &cc, float &aa, uint32_t &qq) {
        const int r = r0 + g + RPI * i;
        if (on && r < r1) {
            const uint32_t e = (uint32_t)r * kd + col, b = e >> bs;
            cc = __ldg(P.wd + e / 32u);
            if (NESTED) {
                qq = __ldg(P.sd.q + b);
                aa = __ldg(P.sd.nabs + (b >> P.nshift));
            } else {
                aa = __ldg(P.sd.absmax + b);
            }
        }
    };
#pragma unroll
    for (int s = 0; s < Q4M_DN; s++) {
        dc[s] = make_uint4(0u, 0u, 0u, 0u), da[s] = 0.0f, dq[s] = 0u;
        dload(s, dc[s], da[s], dq[s]);
    }
    /* down's nested code table beside gate's and up's (segments 0, 1) */
    if (NESTED)
        for (int e = threadIdx.x; e < 256; e += blockDim.x) sm.ncode[512 + e] = __ldg(P.sd.ncode + e);

    /* the GLU outputs of the whole cluster are in hs */
    asm volatile("barrier.cluster.arrive.release;\n\tbarrier.cluster.wait.acquire;" ::: "memory");
    if (P.dbg == 2) return;
    float m = 0.0f;
    for (int t = threadIdx.x; t < nh; t += blockDim.x) m = fmaxf(m, fabsf(hs[t]));
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    if (lane == 0) red[warp] = m;
    __syncthreads();
    float mm = 0.0f;
    for (int w = 0; w < (int)(blockDim.x >> 5); w++) mm = fmaxf(mm, red[w]);
    /* q4h_stage_x's scale and pieces: |h * s| * lmax in [1024, 2048) */
    float inv;
    const float s = q4h_scale(mm * P.lmax, &inv);
    for (int f = threadIdx.x; f < nh / 4; f += blockDim.x) q4h_put4(hx, f, *reinterpret_cast<const float4 *>(hs + 4 * f), s);
    __syncthreads();
    uint4 xv[4];
    const uint32_t ch = on ? (uint32_t)l16 : 0u;
    q4h_x_pieces(hx, ch, ((ch >> 1) & 7u) * 16u, xv);
    const uint32_t lane_off = (uint32_t)lane * 4u;
    const float noff = P.sd.noff, fix = inv * 4294967296.0f; /* to units of 2^-32 (exact: powers of two) */
    for (int i0 = 0; i0 < ni; i0 += Q4M_DN) {
#pragma unroll
        for (int k = 0; k < Q4M_DN; k++) {
            const int i = i0 + k;
            if (i >= ni) break;
            const int r = r0 + g + RPI * i;
            float dv = 0.0f;
            if (on && r < r1) {
                const float d = q4h_dot(sm.tab, dc[k], xv, lane_off);
                const float am = NESTED ? q4_nested(sm.ncode[512 + dq[k]], da[k], noff) : da[k];
                dv = am * d;
            }
#pragma unroll
            for (int o = LPR / 2; o > 0; o >>= 1) dv += __shfl_xor_sync(0xffffffffu, dv, o);
            if (P.dbg == 1) {
                if (dv == 1.2345e-30f && r < r1) P.acc[r] = 1; /* keeps the sums alive */
            } else if (l16 == 0 && r < r1)
                atomicAdd(reinterpret_cast<unsigned long long *>(P.acc + r), (unsigned long long)__float2ll_rn(dv * fix));
            dload(i + Q4M_DN, dc[k], da[k], dq[k]);
        }
    }
#endif
}

static long g_q4m_launches;

extern "C" long tuna_cuda_q4_mlp_launches(void)
{
    return g_q4m_launches;
}

/* TUNA_Q4_MLP=1 (or 2: also a line on stderr per launch with its shape) turns the kernel on; off by
 * default (slower on the H100: see the file's head); read at every call so tests can compare */
static bool q4m_env_on(void)
{
    const char *e = getenv("TUNA_Q4_MLP");
    return e && (e[0] == '1' || e[0] == '2');
}

/* The most clusters of cs blocks (smem bytes each) resident at once: a cluster lies in one GPC, so
 * the SMs a GPC has beyond a multiple of cs stay out (the H100's 132 SMs hold 30 clusters of 4);
 * asked once per kernel, size and device. 0 when the runtime cannot tell. */
static int q4m_max_clusters(tuna_backend *be, const void *fn, size_t smem, int cs)
{
    static struct {
        const void *fn;
        size_t smem;
        int dev, n;
    } seen[16];
    static int n_seen;
    for (int i = 0; i < n_seen; i++)
        if (seen[i].fn == fn && seen[i].smem == smem && seen[i].dev == be->device) return seen[i].n;
    const int nc = tuna_cuda_max_clusters(fn, dim3((unsigned)(be->sm_count / cs * cs)), Q4H4_THREADS, smem, cs);
    if (n_seen < 16) {
        seen[n_seen].fn = fn, seen[n_seen].smem = smem, seen[n_seen].dev = be->device;
        seen[n_seen++].n = nc;
    }
    return nc;
}

typedef void (*q4m_kernel)(const float *, const struct q4m_param);
static q4m_kernel q4m_pick(bool nested, int cs, int lpr)
{
#define Q4M_K(N, C, L) (nested == (N) && cs == (C) && lpr == (L)) return k_q4_mlp<N, C, L>
    if Q4M_K(true, 4, 16);
    if Q4M_K(true, 4, 8);
    if Q4M_K(true, 2, 16);
    if Q4M_K(true, 2, 8);
    if Q4M_K(false, 4, 16);
    if Q4M_K(false, 4, 8);
    if Q4M_K(false, 2, 16);
    if Q4M_K(false, 2, 8);
#undef Q4M_K
    return NULL;
}

bool tuna_cuda_rmsnorm_glu_down(tuna_backend *be, float *x, float *xn, const float *nw, float eps,
                                const struct tuna_weight *wg, const struct tuna_weight *wu,
                                const struct tuna_weight *wd, int64_t T, int act)
{
    if (be->sticky) return true; /* the step fails anyway */
    if (T != 1 || !q4m_env_on() || tuna_cuda_q4_old() || be->cc_major < 9 || be->sm_count < 2 ||
        be->max_smem_optin <= 0)
        return false;
    if (!q4_weight_aligned(wg) || !q4_weight_aligned(wu) || !q4_weight_aligned(wd)) return false;
    const int64_t C = wg->cols, I = wg->rows;
    if (wu->rows != I || wu->cols != C || wd->rows != C || wd->cols != I || I % 32 != 0 || C * I >= ((int64_t)1 << 31))
        return false;
    const struct tuna_cuda_q4 *q[3] = {(const struct tuna_cuda_q4 *)wg->q4, (const struct tuna_cuda_q4 *)wu->q4,
                                       (const struct tuna_cuda_q4 *)wd->q4};
    const bool nested = q[0]->absmax == NULL;
    for (int i = 0; i < 3; i++)
        if (!q4_same_form(q[0], q[i])) return false;
    int shift = 0;
    while ((1 << shift) < q[0]->blocksize) shift++;
    if ((1 << shift) != q[0]->blocksize || q[0]->blocksize < 32) return false;
    /* clusters: as many as can be resident at once (all of them run at the same time), at most
     * one per unit of 32 outputs, at most Q4M_MAXCH units each; of 4 or 2 blocks, whichever keeps
     * more SMs busy (4 on a tie: half the atomics). TUNA_Q4_MLP_CS=2 or 4 forces one. The shared
     * memory's size depends on the units per cluster: asked for the largest. */
    const int units = (int)(I / 32);
    const size_t xs = ((size_t)C * 2 + 127) / 128 * 128, fixed = (size_t)Q4H4_TAB + Q4H4_NCODE + xs;
    const size_t smax = fixed + (size_t)32 * Q4M_MAXCH * 6 + 128;
    if (smax + 2048 > (size_t)be->max_smem_optin) return false;
    const char *ecs = getenv("TUNA_Q4_MLP_CS");
    const int force = ecs ? atoi(ecs) : 0;
    int cs = 0, nclus = 0;
    for (int c = 4; c >= 2; c -= 2) {
        const void *f = (const void *)q4m_pick(nested, c, 16);
        if ((force && force != c) || !tuna_cuda_smem_allow(be, f, smax)) continue;
        int n = q4m_max_clusters(be, f, smax, c);
        n = n < units ? n : units;
        if (n < 1 || (units + n - 1) / n > Q4M_MAXCH) continue;
        if (n * c > nclus * cs) cs = c, nclus = n;
    }
    if (!cs) return false;
    const int chunks = (units + nclus - 1) / nclus, lpr = chunks <= 8 ? 8 : 16, hmax = 32 * chunks;
    const q4m_kernel fn = q4m_pick(nested, cs, lpr);
    if (!tuna_cuda_smem_allow(be, (const void *)fn, smax)) return false;

    struct q4m_param P;
    memset(&P, 0, sizeof P);
    const struct tuna_weight *ws[2] = {wg, wu};
    float *ys[2] = {NULL, NULL};
    gemv_job_init(&P.jg, 2, ys, ws, NULL, GEMV_GLU, nw, xn, eps);
    P.jg.act = act;
    P.jg.bs_shift = shift;
    P.jg.prefetch = tuna_cuda_gemv_prefetch();
    for (int i = 0; i < 2; i++) P.jg.s[i].sc = q4_scales_of(q[i]);
    bool nest2;
    if (!q4h_job_fits(&P.jg, ws, q[0]->blocksize, T, &nest2) || nest2 != nested) return false;
    if (((uintptr_t)x % 16) != 0 || (xn && ((uintptr_t)xn % 16) != 0) || ((uintptr_t)nw % 16) != 0) return false;
    /* hx: whole groups of 8 pieces (gemv_x_pos swizzles within a group) */
    P.hs_off = (uint32_t)fixed;
    P.hx_off = P.hs_off + (uint32_t)hmax * 4u;
    const size_t smem = (size_t)P.hx_off + ((size_t)hmax * 2 + 127) / 128 * 128;
    if (smem > smax) return false;
    const char *dbg = getenv("TUNA_Q4_MLP");
    if (dbg && dbg[0] == '2')
        fprintf(stderr, "k_q4_mlp: C %lld I %lld, %d clusters of %d, %d outputs each at most, %d lanes per row of down, "
                        "%zu bytes of shared memory\n",
                (long long)C, (long long)I, nclus, cs, hmax, lpr, smem);

    P.wd = (const uint4 *)wd->data;
    P.sd = q4_scales_of(q[2]);
    P.nd = (int)C, P.kd = (int)I;
    memcpy(P.lut.v, q[0]->lut, sizeof P.lut.v);
    P.lmax = q4_lut_absmax(&P.lut);
    P.nshift = nested ? q[0]->nested_shift : 0;
    P.nclus = nclus, P.units = units;
    const char *edbg = getenv("TUNA_Q4M_DBG");
    P.dbg = edbg ? atoi(edbg) : 0;
    /* from here on the kernel runs: x's pending part is taken over (folded first if any) */
    P.acc = tuna_cuda_racc_take(be, x, C);
    if (!P.acc) return true; /* sticky */

    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3((unsigned)(nclus * cs));
    cfg.blockDim = dim3(Q4H4_THREADS);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = be->stream;
    cudaLaunchAttribute attr[2];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = (unsigned)cs, attr[0].val.clusterDim.y = 1, attr[0].val.clusterDim.z = 1;
    attr[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[1].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = tuna_cuda_pdl_on(be) ? 2 : 1;
    g_q4m_launches++;
    tuna_cuda_check(be, cudaLaunchKernelEx(&cfg, fn, (const float *)x, P), "k_q4_mlp");
    return true;
}
