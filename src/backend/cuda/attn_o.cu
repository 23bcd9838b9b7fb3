/* attn_o.cu — the attention block of a batch-1 decode step after q/k/v, with a 4-bit o
 * projection, as one kernel (backend.h's attention_o): RoPE of q and k, the KV store, the
 * attention over the paged cache and x += W_o att. Twenty-fifth session.
 *
 * Why: at batch 1 the ops it replaces run as three kernels (k_rope_kv, k_attn_b1, k_q4_h4 for o)
 * and o's own GEMV spends most of its ~6.4 us per layer (H100, Llama-3-8B) on being a kernel of
 * its own: the launch, the byte -> half2 table, x staged, its first code loads, the tail. Its
 * weights (8.4 MB at 8B shapes) do not depend on anything before it, so here every block loads its
 * rows of W_o into shared memory before the PDL wait, while q/k/v finishes and the attention runs,
 * and multiplies them once the attention's output is there.
 *
 * Layout: grid (CS, NB / CS), clusters of CS blocks (CS = 8, 4 or 2: the largest whose clusters
 * can all be resident at once), 256 threads, one block per SM.
 *   1. Block L (= blockIdx.y * CS + blockIdx.x) copies rows R L .. R L + R - 1 of W_o (codes and
 *      scales) into shared memory with cp.async (the warps that do not attend) and fills the
 *      byte -> half2 table of k_q4_h4.
 *   2. Clusters y < Hkv * n_hg run b1_attend (attention_b1.cuh, k_attn_b1's body) with ROPE:
 *      the projections are rotated as they are loaded, the step's K and V rows written into the
 *      cache by the warp that owns their group, the splits merged through distributed shared
 *      memory; out = att [H * D] in global memory.
 *   3. A grid barrier (all NB blocks are resident: the host checks it), then the o GEMV: att
 *      staged as k_q4_h4 stages x (q4h_stage_x: f16 scaled by a power of two), each warp's rows
 *      from shared memory with k_q4_h4's products (q4h_dot) and scales, y += in float32.
 * The dependent kernel (the gate/up GEMV) is let start after the barrier, so it cannot take an SM
 * that a block of this grid still waits for.
 *
 * Numerics: RoPE, the KV rows and the attention are k_rope_kv's and k_attn_b1's operations (the
 * same bits); o's products are k_q4_h4's, summed per row in another order (float32 rounding).
 * Needs sm_90, a bf16/f16 cache, D 64 or 128 with RoPE over all of it, a group of at most 8 query
 * heads, o 4-bit where k_q4_h4 takes it and its rows fitting shared memory; the host declines
 * anything else and the caller runs the ops one by one.
 *
 * EXPERIMENTAL, OFF BY DEFAULT (TUNA_ATTN_O=1 turns it on): on the H100 it is correct (tests) but
 * slower than the three kernels it replaces (NF4 Llama-3-8B batch 1: 2.58-2.59 against 2.55-2.57
 * ms/step at a 128-token prompt, 2.91 against 2.82 at 2,048). Its timeline (TUNA_AO_TRACE=1, see
 * docs/PERFORMANCE.md, "NF4, twenty-fifth session"): the grid barrier releases ~1.5 us after the last
 * attending block, att is staged in ~1.2 us, and o's products from shared memory take 4.5-5 us for
 * 131 K weights per block where their instructions need ~1.2: why is not known yet. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cuda/attention_b1.cuh"
#include "backend/cuda/cuda_internal.h"
#include "backend/cuda/gemv.cuh"
#include "backend/cuda/kv_types.cuh"
#include "backend/cuda/pdl.cuh"
#include "backend/cuda/q4_h4.cuh"
#include "backend/backend.h"

#define AO_THREADS 256
#define AO_NS 2 /* attention stages per warp (k_attn_b1 has 3: here W_o's rows need the room) */

struct ao_params {
    /* attention */
    const float *q;    /* [H * D] q as projected (RoPE here) */
    struct b1_rope rp; /* k, v as projected, the slot, the frequencies */
    void *kc, *vc;     /* the layer's cache */
    att_meta md;
    int H, Hkv, n_hg, units; /* units = Hkv * n_hg clusters attend */
    float qscale;            /* scale * log2(e) */
    float *att;              /* [H * D] attention output, o's input */
    /* o */
    struct gemv_job jo; /* one segment: W_o, its scales, y = x (the residual stream), K = H * D */
    struct q4_lut lut;
    float lmax;
    int R;                   /* rows of W_o per block */
    int cs;                  /* blocks per cluster */
    unsigned long long *bar; /* the grid barrier's count */
    /* shared memory offsets (bytes): codes, scales, nested absmax, code table, attention/x */
    int o_codes, o_sc, o_nabs, o_ncode, o_misc, o_att;
    int late;               /* attending blocks copy W_o's rows after the attention (TUNA_AO_LATE=0: before) */
    unsigned long long *tr; /* TUNA_AO_TRACE=1: [blocks][8] %globaltimer at the phases, or NULL */
};

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
static __device__ __forceinline__ unsigned long long ao_ld_acquire(const unsigned long long *p)
{
    unsigned long long v;
    asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}

/* Every block of the grid (nb of them, all resident) reaches this point before any goes on. Each
 * launch adds exactly 2^32 to the count (block 0 adds 2^32 - (nb - 1), the others 1), so a block's
 * ticket t says which launch it is in whatever grid sizes came before: the barrier ends when the
 * count reaches the next multiple of 2^32 (compared as a signed difference, so it survives the
 * wrap after 2^32 launches). */
static __device__ __forceinline__ void ao_grid_sync(unsigned long long *bar, int L, int nb)
{
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        const unsigned long long add = L == 0 ? (1ull << 32) - (unsigned long long)(nb - 1) : 1ull;
        const unsigned long long t = atomicAdd(bar, add), target = ((t >> 32) + 1ull) << 32;
        while ((long long)(ao_ld_acquire(bar) - target) < 0) {
        }
        __threadfence();
    }
    __syncthreads();
}
#endif

template <typename KT, int DT, int GM, bool NESTED>
__global__ void __launch_bounds__(AO_THREADS, 1) k_attn_o(const __grid_constant__ struct ao_params P)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    extern __shared__ __align__(128) float4 ao_smem4[];
    char *smem = (char *)ao_smem4;
    uint8_t *tab = (uint8_t *)smem, *codes = (uint8_t *)(smem + P.o_codes);
    float *ncode = (float *)(smem + P.o_ncode), *slut = (float *)(smem + P.o_misc), *red = slut + 16;
    const int cs = P.cs, rank = blockIdx.x, hy = blockIdx.y, L = hy * cs + rank, nb = gridDim.x * gridDim.y;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const bool attends = hy < P.units;
    auto mark = [&](int slot) {
        if (P.tr && tid == 0) {
            unsigned long long t;
            asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
            P.tr[(size_t)L * 8 + slot] = t;
        }
    };
    mark(0);
    const struct gemv_seg &so = P.jo.s[0];
    const int K = (int)P.jo.K, N = (int)so.N, bshift = P.jo.bs_shift;
    const int r0 = L * P.R, nrows = max(0, min(P.R, N - r0));
    const int64_t blk0 = ((int64_t)r0 * K) >> bshift, nblk = ((int64_t)nrows * K) >> bshift;
    const int64_t sc0 = NESTED ? blk0 & ~(int64_t)15 : blk0 & ~(int64_t)3; /* 16-byte aligned */

    /* 1. W_o's rows into shared memory (weights: nothing this step writes them), by the warps that
     * do not attend; the nested scales' small tables with plain loads */
    auto copy_o = [&](bool all) {
        const int pt = attends && !all ? tid - 32 * B1_NW : tid,
                  np = attends && !all ? AO_THREADS - 32 * B1_NW : AO_THREADS;
        if (pt >= 0) {
            const char *src = (const char *)so.W + (int64_t)r0 * (K / 2);
            const int n16 = nrows * (K / 2) / 16;
            for (int i = pt; i < n16; i += np)
                cp_async16(codes + 16 * i, src + 16 * (int64_t)i, 16);
            /* the scales from blk0 rounded down to 16 bytes (sc0), the last piece cut at the end */
            if (NESTED) {
                const int q16 = (int)((blk0 + nblk - sc0 + 15) / 16);
                for (int i = pt; i < q16; i += np) {
                    const int64_t at = sc0 + 16 * (int64_t)i, left = blk0 + nblk - at;
                    cp_async16(smem + P.o_sc + 16 * i, so.sc.q + at, left < 16 ? (int)left : 16);
                }
                const int64_t n0 = blk0 >> so.sc.nshift, n1 = nrows ? ((blk0 + nblk - 1) >> so.sc.nshift) + 1 : n0;
                float *nabs = (float *)(smem + P.o_nabs);
                for (int64_t i = pt; i < n1 - n0; i += np)
                    nabs[i] = __ldg(so.sc.nabs + n0 + i);
                for (int i = pt; i < 256; i += np)
                    ncode[i] = __ldg(so.sc.ncode + i);
            } else {
                const int a16 = (int)((blk0 + nblk - sc0 + 3) / 4);
                for (int i = pt; i < a16; i += np) {
                    const int64_t at = sc0 + 4 * (int64_t)i, left = blk0 + nblk - at;
                    cp_async16(smem + P.o_sc + 16 * i, so.sc.absmax + at, left < 4 ? 4 * (int)left : 16);
                }
            }
            cp_async_commit();
        }
    };
    if (!(attends && P.late)) copy_o(false);
    q4h_fill_tables(tab, NULL, slut, P.lut, P.jo, false); /* the byte -> half2 table */
    mark(1);

    /* 2. the attention */
    if (attends) {
        b1_attend<KT, DT, GM, AO_NS, true>(smem + P.o_att, cs, rank, hy, P.att, P.q, (KT *)P.kc, (KT *)P.vc, P.md, P.H,
                                           P.Hkv, P.n_hg, P.qscale, 0, P.rp, [&] {
                                               tuna_pdl_wait();
                                               mark(2);
                                           });
        if (P.late) copy_o(true);
    } else {
        tuna_pdl_wait();
        mark(2);
    }
    mark(3);

    /* 3. every block's attention output is in P.att; then o */
    ao_grid_sync(P.bar, L, nb);
    mark(4);
    tuna_pdl_trigger();
    cp_async_wait<0>();
    __syncthreads();
    uint8_t *xs = (uint8_t *)(smem + P.o_att);                            /* over the attention's scratch */
    const float inv_s = q4h_stage_x<false>(xs, P.att, P.jo, P.lmax, red); /* ends with __syncthreads */
    mark(5);
    const int K32 = K / 32;
    const uint32_t lane_off = (uint32_t)lane * 4u, xsw = (uint32_t)((lane >> 1) & 7) * 16u;
    const int64_t n0 = NESTED ? blk0 >> so.sc.nshift : 0;
    const uint8_t *sq = (const uint8_t *)(smem + P.o_sc);
    const float *sabs = (const float *)(smem + P.o_sc), *snabs = (const float *)(smem + P.o_nabs);
    /* each warp takes quads of rows (4 q, .. 4 q + 3; past the block's rows the last one again, not
     * stored): the 4 rows' sums share each chunk's x pieces and are 4 independent chains */
    for (int q4 = warp; 4 * q4 < nrows; q4 += AO_THREADS / 32) {
        /* lane r < 4 adds row 4 q + r's sum to x, its old value loaded before the products (the
         * H100 measured the same time with the four read-modify-writes after them) */
        const int mine = 4 * q4 + lane;
        const bool st = lane < 4 && mine < nrows;
        const float yv = st ? __ldcg(so.y + r0 + mine) : 0.0f, bv = st && so.bias ? __ldg(so.bias + r0 + mine) : 0.0f;
        float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        int rw[4];
#pragma unroll
        for (int r = 0; r < 4; r++)
            rw[r] = min(4 * q4 + r, nrows - 1);
#pragma unroll 2
        for (int c = lane; c < K32; c += 32) { /* c = lane (mod 32): the swizzle of k_q4_h4's lanes */
            uint4 xv[4];
            q4h_x_pieces(xs, (uint32_t)c, xsw, xv);
#pragma unroll
            for (int r = 0; r < 4; r++) {
                const uint4 cw = *reinterpret_cast<const uint4 *>(codes + (size_t)rw[r] * (K / 2) + (size_t)c * 16);
                const float d = q4h_dot(tab, cw, xv, lane_off);
                const int64_t b = ((int64_t)(r0 + rw[r]) * K + (int64_t)c * 32) >> bshift;
                const float am =
                    NESTED ? q4_nested(ncode[sq[b - sc0]], snabs[(b >> so.sc.nshift) - n0], so.sc.noff)
                           : sabs[b - sc0];
                acc[r] += am * d;
            }
        }
#pragma unroll
        for (int r = 0; r < 4; r++)
            for (int o = 16; o > 0; o >>= 1)
                acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], o);
        const float v = lane == 0 ? acc[0] : lane == 1 ? acc[1] : lane == 2 ? acc[2] : acc[3];
        if (st) so.y[r0 + mine] = yv + (v * inv_s + bv);
    }
    __syncthreads();
    mark(6);
#else
    (void)P;
#endif
}

typedef void (*ao_kernel)(const struct ao_params);

template <typename KT, int DT> static ao_kernel ao_pick_gm(int GM, bool nested)
{
    if (GM <= 4) return nested ? k_attn_o<KT, DT, 4, true> : k_attn_o<KT, DT, 4, false>;
    return nested ? k_attn_o<KT, DT, 8, true> : k_attn_o<KT, DT, 8, false>;
}

static ao_kernel ao_pick(int code, int D, int GM, bool nested)
{
    if (code == 1)
        return D == 64 ? ao_pick_gm<__nv_bfloat16, 64>(GM, nested) : ao_pick_gm<__nv_bfloat16, 128>(GM, nested);
    return D == 64 ? ao_pick_gm<__half, 64>(GM, nested) : ao_pick_gm<__half, 128>(GM, nested);
}

/* Off unless TUNA_ATTN_O=1 (read at every call, as q4_layer.cu's switch: tests turn it off and on;
 * a decode step asks twice per layer, a replayed graph not at all): slower than the ops on the H100
 * (see the file's comment). */
static bool ao_env_on(void)
{
    const char *e = getenv("TUNA_ATTN_O");
    return e && e[0] == '1';
}

static long g_ao_launches;

/* TUNA_AO_TRACE=1 (diagnostics): every launch stores its blocks' phase times into one buffer (a
 * replayed graph too), and the last launch's timeline is printed at exit. */
static unsigned long long *g_ao_tr;
static int g_ao_tr_nb, g_ao_tr_units, g_ao_tr_cs;

static int ao_cmp(const void *a, const void *b)
{
    const long long x = *(const long long *)a, y = *(const long long *)b;
    return x < y ? -1 : x > y;
}

static void ao_trace_dump(void)
{
    const int nb = g_ao_tr_nb;
    unsigned long long *h = (unsigned long long *)malloc((size_t)nb * 8 * 8);
    if (!h || cudaMemcpy(h, g_ao_tr, (size_t)nb * 64, cudaMemcpyDeviceToHost) != cudaSuccess) {
        free(h);
        return;
    }
    unsigned long long t0 = ~0ull;
    for (int b = 0; b < nb; b++)
        t0 = h[b * 8] < t0 ? h[b * 8] : t0;
    static const char *names[7] = {"entry",    "table filled", "PDL wait passed", "attention done", "grid barrier",
                                   "o staged", "end"};
    fprintf(stderr, "attn_o trace (us from the first entry; attending blocks | the others): min / median / max\n");
    long long v[2][1024];
    for (int slot = 0; slot < 7; slot++) {
        int n[2] = {0, 0};
        for (int b = 0; b < nb && b < 1024; b++) {
            const int r = b / g_ao_tr_cs < g_ao_tr_units ? 0 : 1;
            v[r][n[r]++] = (long long)(h[b * 8 + slot] - t0);
        }
        fprintf(stderr, "  %-16s", names[slot]);
        for (int r = 0; r < 2; r++) {
            if (!n[r]) continue;
            qsort(v[r], (size_t)n[r], sizeof v[r][0], ao_cmp);
            fprintf(stderr, " %s %6.2f %6.2f %6.2f", r ? " |" : "", v[r][0] / 1e3, v[r][n[r] / 2] / 1e3,
                    v[r][n[r] - 1] / 1e3);
        }
        fprintf(stderr, "\n");
    }
    free(h);
}

extern "C" long tuna_cuda_attn_o_launches(void)
{
    return g_ao_launches;
}

/* The launch's shape: blocks per cluster, clusters, rows per block and shared memory. */
struct ao_shape {
    int cs, nb, R;
    size_t smem;
};

static size_t ao_align(size_t v)
{
    return (v + 127) / 128 * 128;
}

/* Offsets of P's shared memory for R rows; returns the bytes. */
static size_t ao_layout(struct ao_params *P, int R, int K, int bshift, bool nested, int nshift, size_t att_bytes)
{
    const size_t nblk = ((size_t)R * (size_t)K) >> bshift;
    size_t off = Q4H4_TAB;
    P->o_codes = (int)off;
    off = ao_align(off + (size_t)R * (size_t)K / 2);
    P->o_sc = (int)off;
    off = ao_align(off + (nested ? nblk + 32 : nblk * 4 + 32)); /* + the alignment of its start */
    P->o_nabs = (int)off;
    off = ao_align(off + (nested ? ((nblk >> nshift) + 2) * 4 : 0));
    P->o_ncode = (int)off;
    off = ao_align(off + (nested ? 256 * 4 : 0));
    P->o_misc = (int)off;
    off = ao_align(off + (16 + 64) * 4);
    P->o_att = (int)off;
    const size_t xs = (size_t)K * 2;
    return off + (att_bytes > xs ? att_bytes : xs);
}

bool tuna_cuda_attention_o(tuna_backend *be, const struct tuna_decode_layer *a, bool query)
{
    if (be->sticky) return !query; /* the step fails anyway */
    if (!query) tuna_cuda_racc_settle(be, a->x);
    if (!ao_env_on() || tuna_cuda_q4_old() || be->cc_major < 9 || be->sm_count <= 0 || be->max_smem_optin <= 0 ||
        !tuna_cuda_pdl_on(be))
        return false;
    const int64_t H = a->H, Hkv = a->Hkv, D = a->D;
    const int code = kv_code(a->kv_dtype);
    if (!tuna_cuda_b1_layer_fits(a) || H / Hkv > 8) return false;
    /* o: 4-bit where k_q4_h4 takes it (16-bit compute), rows of K = H * D into C */
    const struct tuna_weight *w = a->w[3];
    if ((w->dtype != TUNA_DTYPE_NF4 && w->dtype != TUNA_DTYPE_FP4) || !w->q4 || w->cols != H * D) return false;
    const struct tuna_cuda_q4 *q = (const struct tuna_cuda_q4 *)w->q4;
    const int64_t K = w->cols, N = w->rows;
    if (q->prefill == TUNA_DTYPE_F32 || q->blocksize < 32 || K % 32 != 0 || N * K >= ((int64_t)1 << 31)) return false;
    int bshift = 0;
    while ((1 << bshift) < q->blocksize)
        bshift++;
    if ((1 << bshift) != q->blocksize) return false;
    const bool nested = q->absmax == NULL;
    if ((uintptr_t)w->data % 16 != 0 ||
        (uintptr_t)(nested ? (const void *)q->qabsmax : (const void *)q->absmax) % 16 != 0)
        return false;
    const float *vec[] = {a->x, a->q, a->k, a->v, a->att};
    for (int i = 0; i < 5; i++)
        if (!vec[i] || (uintptr_t)vec[i] % 16 != 0) return false;

    const int G = (int)(H / Hkv), GM = G <= 4 ? 4 : 8, n_hg = 1, units = (int)Hkv * n_hg;
    const ao_kernel fn = ao_pick(code, (int)D, GM, nested);
    const size_t att_bytes = (size_t)b1_smem((int)D, 2, GM, AO_NS);
    struct ao_params P;
    memset(&P, 0, sizeof P);

    /* the shape: the largest cluster whose whole grid can be resident, about one block per SM */
    static struct {
        const void *fn;
        int64_t N, K;
        int sm;
        struct ao_shape s;
    } seen[8];
    static int n_seen;
    struct ao_shape sh = {0, 0, 0, 0};
    bool found = false;
    for (int i = 0; i < n_seen; i++)
        if (seen[i].fn == (const void *)fn && seen[i].N == N && seen[i].K == K && seen[i].sm == be->sm_count)
            sh = seen[i].s, found = true;
    if (!found) {
        static const int css[3] = {8, 4, 2};
        for (int ci = 0; ci < 3 && sh.cs == 0; ci++) {
            const int cs = css[ci];
            int nb = be->sm_count / cs * cs;
            while (nb >= units * cs && nb > 0) {
                const int R = (int)((N + nb - 1) / nb);
                const size_t smem = ao_layout(&P, R, (int)K, bshift, nested, nested ? q->nested_shift : 0, att_bytes);
                if (smem + 1024 > (size_t)be->max_smem_optin || !tuna_cuda_smem_allow(be, (const void *)fn, smem))
                    break;
                const int nc =
                    tuna_cuda_max_clusters((const void *)fn, dim3((unsigned)cs, (unsigned)(nb / cs)), AO_THREADS, smem, cs);
                if (nc <= 0) break;
                if (nc * cs >= nb) {
                    sh.cs = cs, sh.nb = nb, sh.R = R, sh.smem = smem;
                    break;
                }
                nb = nc * cs; /* fewer blocks: all resident */
            }
        }
        if (n_seen < 8) {
            seen[n_seen].fn = (const void *)fn, seen[n_seen].N = N, seen[n_seen].K = K, seen[n_seen].sm = be->sm_count;
            seen[n_seen++].s = sh;
        }
    }
    if (sh.cs == 0) return false;
    if (query) return true;

    /* metadata: position, block table, slot, RoPE frequencies */
    if (!tuna_cuda_decode_meta(be, a, "attention_o", &P.md, &P.rp.slot, &P.rp.inv_freq)) return true;
    /* the barrier's count: 8 bytes, made (zeroed) once */
    void *before = be->attn_o.p;
    if (!tuna_cuda_grow(be, &be->attn_o, 256, "cudaMalloc(attention_o barrier)")) return true;
    if (be->attn_o.p != before && !tuna_cuda_check(be, cudaMemsetAsync(be->attn_o.p, 0, be->attn_o.cap, be->stream),
                                                   "cudaMemsetAsync(attention_o)"))
        return true;

    P.q = a->q;
    P.rp.k = a->k, P.rp.v = a->v;
    P.rp.attn_factor = a->attn_factor;
    P.kc = a->kcache, P.vc = a->vcache;
    P.H = (int)H, P.Hkv = (int)Hkv, P.n_hg = n_hg, P.units = units;
    P.qscale = a->scale * 1.4426950408889634f;
    P.att = a->att;
    float *yx[1] = {a->x};
    gemv_job_init(&P.jo, 1, yx, &a->w[3], &a->bias[3], GEMV_ADD, NULL, NULL, 0.0f);
    P.jo.bs_shift = bshift;
    P.jo.s[0].sc = q4_scales_of(q);
    memcpy(P.lut.v, q->lut, sizeof P.lut.v);
    P.lmax = q4_lut_absmax(&P.lut);
    P.R = sh.R, P.cs = sh.cs;
    P.bar = (unsigned long long *)be->attn_o.p;
    ao_layout(&P, sh.R, (int)K, bshift, nested, nested ? q->nested_shift : 0, att_bytes);
    const char *late = getenv("TUNA_AO_LATE"), *tre = getenv("TUNA_AO_TRACE");
    P.late = !(late && late[0] == '0');
    if (tre && tre[0] == '1') {
        cudaStreamCaptureStatus cap = cudaStreamCaptureStatusNone;
        cudaStreamIsCapturing(be->stream, &cap);
        if (!g_ao_tr && cap == cudaStreamCaptureStatusNone && cudaMalloc((void **)&g_ao_tr, 1024 * 64) == cudaSuccess)
            atexit(ao_trace_dump);
        g_ao_tr_nb = sh.nb, g_ao_tr_units = units, g_ao_tr_cs = sh.cs;
        P.tr = g_ao_tr;
    }

    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3((unsigned)sh.cs, (unsigned)(sh.nb / sh.cs));
    cfg.blockDim = dim3(AO_THREADS);
    cfg.dynamicSmemBytes = sh.smem;
    cfg.stream = be->stream;
    cudaLaunchAttribute attr[2];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = (unsigned)sh.cs, attr[0].val.clusterDim.y = 1, attr[0].val.clusterDim.z = 1;
    attr[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[1].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 2;
    g_ao_launches++;
    tuna_cuda_check(be, cudaLaunchKernelEx(&cfg, fn, P), "k_attn_o");
    return true;
}
