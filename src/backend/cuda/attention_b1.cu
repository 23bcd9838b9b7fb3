/* attention_b1.cu — decode attention for a step of one token (batch 1) on sm_90+: k_attn_b1.
 *
 * At batch 1 the general decode kernel (k_attn_decode16, attention.cu) spends its time in a chain
 * of dependent round trips, not in bytes: on the H100 (NF4 Llama-3-8B, context ~130) it took 14 µs
 * to read 0.55 MB. After the PDL wait it loads q, the block-table entries, then the K/V rows (from
 * L2, prefetched), and its splits meet through partial rows in global memory and an atomic
 * counter that the last one to finish reads back. Here:
 *   - the splits of one kv head's context are the CS blocks of one thread-block cluster, and they
 *     merge through distributed shared memory (two cluster barriers, no global partials);
 *   - before the PDL wait, each warp already copies the K/V rows of its first NS - 1 groups into
 *     shared memory (the rows of earlier steps, which no kernel of this step writes), the
 *     block-table entries first: after the wait only q and the step's own row p (written by the
 *     RoPE/KV-store kernel just before) are loaded, in one round trip.
 * Groups of D16_KEYS keys (absolute positions 16 k) go round-robin over the cluster's blocks,
 * then over their warps: group i to block i % CS, warp (i / CS) % NW, so a short context still
 * spreads over CS SMs. Each group is computed by the FFMA step the general kernel uses
 * (attention_dec16.cuh), so the arithmetic is the same; only the merge order differs.
 * Launch configuration from the head shape only (CUDA graphs): grid (CS, Hkv * n_hg), cluster
 * (CS, 1, 1); the context is read on the device. 16-bit caches, D 64 or 128.
 * H100, Llama-3-8B shapes, batch 1 at context ~130: NF4 2.60-2.64 against 2.79-2.80 ms per step,
 * bf16 5.71-5.72 against 5.86; context ~2,100 (NF4) 2.86 against 3.01. Under ncu, alone, 9.2 µs.
 * Measured and not kept: letting the o GEMV start early (griddepcontrol.launch_dependents before
 * the wait): NF4 2.56 / 2.60 against 2.62 / 2.60, bf16 5.97 against 5.70.
 * Twenty-ninth session: after the wait, q and row p are loaded in one round trip (b1_ld_n: every load
 * issued before any value is used; the loop of dependent loads took one round trip per element per
 * thread): NF4 batch 1 2.52 against 2.54 ms/step (three times each, alternating). The same kernel with
 * RoPE and the KV store (ROPE, backend.h's rope_attention) replaces k_rope_kv at batch 1 for 4-bit
 * q/k/v: the same bits; then not faster at short contexts (2.50-2.54 against 2.52-2.53 ms/step) and
 * slower at long ones (2,048-token prompt: 2.90 against 2.77; under ncu, before the loads were
 * batched, 21.7 against 16.5 + 4.5 us for k_rope_kv). Since the GEMVs' shallower start (thirty-first
 * session) it is faster below ~770 tokens of context, and is used there (b1_rope_on). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cuda/attention_b1.cuh"
#include "backend/cuda/cuda_internal.h"
#include "backend/cuda/pdl.cuh"
#include "backend/backend.h"

#define B1_CS 8 /* blocks per cluster: the splits of one (kv head, head group) */
#define B1_NS 3 /* stages per warp: NS - 1 groups in flight ahead of the one computed */

/* KT bf16 or f16; DT 64 or 128; GM query heads per block (power of two >= the group, at most 8).
 * q, out: token 0's [H][DT] rows, float32 / bf16 / f16 by io. qscale = scale * log2(e). The body
 * is b1_attend (attention_b1.cuh). */
template <typename KT, int DT, int GM, bool ROPE>
__global__ void __launch_bounds__(32 * B1_NW, 1)
    k_attn_b1(void *out, const void *q, KT *kc, KT *vc, att_meta md, int H, int Hkv, int n_hg, float qscale, int io,
              const struct tuna_l2pf pf, const struct b1_rope rp)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    extern __shared__ float4 b1_smem_all[];
    const int rank = blockIdx.x, hy = blockIdx.y; /* rank: the block's place in its cluster */
    auto wait = [&] {
        if (threadIdx.x == 0) tuna_l2pf_issue(pf, (long long)hy * B1_CS + rank, (long long)gridDim.x * gridDim.y);
        tuna_pdl_wait();
    };
    b1_attend<KT, DT, GM, B1_NS, ROPE>((char *)b1_smem_all, B1_CS, rank, hy, out, q, kc, vc, md, H, Hkv, n_hg, qscale,
                                       io, rp, wait);
#else
    (void)out, (void)q, (void)kc, (void)vc, (void)md, (void)H, (void)Hkv, (void)n_hg, (void)qscale, (void)io, (void)pf,
        (void)rp;
#endif
}

/* One launch's arguments (rp.k NULL: q, k and v already roped and stored, else ROPE). */
struct b1_args {
    void *out;
    const void *q, *kc, *vc;
    att_meta md;
    int H, Hkv, n_hg, io;
    float qscale;
    bool pdl;
    struct tuna_l2pf pf;
    struct b1_rope rp;
};

template <typename KT, int DT, int GM, bool ROPE>
static bool b1_launch_one(tuna_backend *be, const struct b1_args &a, bool probe)
{
    void (*fn)(void *, const void *, KT *, KT *, att_meta, int, int, int, float, int, const struct tuna_l2pf,
               const struct b1_rope) = k_attn_b1<KT, DT, GM, ROPE>;
    const size_t smem = (size_t)b1_smem(DT, (int)sizeof(KT), GM, B1_NS);
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(B1_CS, (unsigned)(a.Hkv * a.n_hg));
    cfg.blockDim = dim3(32 * B1_NW);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = be->stream;
    cudaLaunchAttribute attr[2];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = B1_CS, attr[0].val.clusterDim.y = 1, attr[0].val.clusterDim.z = 1;
    attr[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[1].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = a.pdl && tuna_cuda_pdl_on(be) ? 2 : 1;
    if (probe) { /* can a cluster of CS such blocks be resident at all? */
        if (smem > 48 * 1024 &&
            cudaFuncSetAttribute((const void *)fn, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem) != cudaSuccess) {
            cudaGetLastError();
            return false;
        }
        int n = 0;
        const bool ok = cudaOccupancyMaxActiveClusters(&n, (const void *)fn, &cfg) == cudaSuccess && n > 0;
        cudaGetLastError();
        return ok;
    }
    if (!tuna_cuda_smem_allow(be, (const void *)fn, smem)) return false;
    return tuna_cuda_check(be,
                           cudaLaunchKernelEx(&cfg, fn, a.out, a.q, (KT *)a.kc, (KT *)a.vc, a.md, a.H, a.Hkv, a.n_hg,
                                              a.qscale, a.io, a.pf, a.rp),
                           ROPE ? "k_attn_b1 (RoPE)" : "k_attn_b1");
}

template <typename KT, int DT, bool ROPE>
static bool b1_launch_d(tuna_backend *be, int GM, const struct b1_args &a, bool probe)
{
    switch (GM) {
    case 1: return b1_launch_one<KT, DT, 1, ROPE>(be, a, probe);
    case 2: return b1_launch_one<KT, DT, 2, ROPE>(be, a, probe);
    case 4: return b1_launch_one<KT, DT, 4, ROPE>(be, a, probe);
    default: return b1_launch_one<KT, DT, 8, ROPE>(be, a, probe);
    }
}

template <bool ROPE>
static bool b1_launch_r(tuna_backend *be, int code, int D, int GM, const struct b1_args &a, bool probe)
{
    if (code == 1)
        return D == 64 ? b1_launch_d<__nv_bfloat16, 64, ROPE>(be, GM, a, probe)
                       : b1_launch_d<__nv_bfloat16, 128, ROPE>(be, GM, a, probe);
    return D == 64 ? b1_launch_d<__half, 64, ROPE>(be, GM, a, probe) : b1_launch_d<__half, 128, ROPE>(be, GM, a, probe);
}

static bool b1_launch(tuna_backend *be, int code, int D, int GM, const struct b1_args &a, bool probe)
{
    return a.rp.k ? b1_launch_r<true>(be, code, D, GM, a, probe) : b1_launch_r<false>(be, code, D, GM, a, probe);
}

/* query heads per block for G per kv head: a power of two >= G, at most 8 (more make head groups) */
static int b1_gm(int G)
{
    return G <= 1 ? 1 : G <= 2 ? 2 : G <= 4 ? 4 : 8;
}

bool tuna_cuda_attn_b1_usable(tuna_backend *be, int code, int D, int G)
{
    static const char *env = getenv("TUNA_ATTN_B1");
    if (env && !strcmp(env, "0")) return false;
    if (be->cc_major < 9 || (code != 1 && code != 2) || (D != 64 && D != 128) || G < 1) return false;
    const int GM = b1_gm(G);
    /* whether a cluster of these blocks fits, once per (device, dtype, D, GM) */
    static struct {
        int dev, code, D, GM, ok;
    } seen[16];
    static int n_seen;
    for (int i = 0; i < n_seen; i++)
        if (seen[i].dev == be->device && seen[i].code == code && seen[i].D == D && seen[i].GM == GM) return seen[i].ok;
    struct b1_args args;
    memset(&args, 0, sizeof args);
    args.H = GM, args.Hkv = 1, args.n_hg = 1, args.qscale = 1.0f;
    const int ok = b1_launch(be, code, D, GM, args, true);
    if (n_seen < 16) seen[n_seen].dev = be->device, seen[n_seen].code = code, seen[n_seen].D = D,
                     seen[n_seen].GM = GM, seen[n_seen++].ok = ok;
    return ok;
}

/* The launch for H query heads over Hkv kv heads; rp NULL: q, k, v already roped and stored. */
static void b1_go(tuna_backend *be, int code, void *out, const void *q, const void *kcache, const void *vcache,
                  const att_meta &md, int H, int Hkv, int D, float scale, int io, bool pdl, const struct tuna_l2pf &pf,
                  const struct b1_rope *rp)
{
    const int G = H / Hkv, GM = b1_gm(G);
    struct b1_args args;
    memset(&args, 0, sizeof args);
    args.out = out, args.q = q, args.kc = kcache, args.vc = vcache, args.md = md;
    args.H = H, args.Hkv = Hkv, args.n_hg = (G + GM - 1) / GM, args.io = io;
    args.qscale = scale * 1.4426950408889634f, args.pdl = pdl, args.pf = pf;
    if (rp) args.rp = *rp;
    b1_launch(be, code, D, GM, args, false);
}

void tuna_cuda_attn_b1_launch(tuna_backend *be, int code, void *out, const void *q, const void *kcache,
                              const void *vcache, const att_meta &md, int H, int Hkv, int D, float scale, int io,
                              bool pdl, const struct tuna_l2pf &pf)
{
    b1_go(be, code, out, q, kcache, vcache, md, H, Hkv, D, scale, io, pdl, pf, NULL);
}

static long g_b1_rope_launches;

extern "C" long tuna_cuda_attn_rope_launches(void)
{
    return g_b1_rope_launches;
}

/* TUNA_ATTN_ROPE=1: always, =0: never (read at every call, as attn_o.cu's switch: the tests turn it
 * off and on); unset: for a position below TUNA_CUDA_B1_SHORT (cuda_internal.h). The answer depends on the context length,
 * so forward.c's key of a captured step records it (a graph captured at a short context is not
 * replayed past the switch). H100, NF4 Llama-3-8B batch 1, the step's graph (thirty-second session,
 * docs/PERFORMANCE.md): RoPE form 2,411 / 2,463 us at a 128 / 512-token prompt against 2,445-2,448 /
 * 2,497 for k_rope_kv + k_attn_b1, but 2,593 / 2,777 at 1,024 / 2,048 against 2,556 / 2,718: the RoPE
 * form's loop is slower per key (not taken apart), its one launch fewer pays at short contexts. */
static bool b1_rope_on(const struct tuna_decode_layer *a)
{
    const char *e = getenv("TUNA_ATTN_ROPE");
    if (e && *e) return e[0] == '1';
    return a->ab && a->ab->pos && a->ab->pos[0] < TUNA_CUDA_B1_SHORT;
}

bool tuna_cuda_rope_attention(tuna_backend *be, const struct tuna_decode_layer *a, bool query)
{
    if (be->sticky) return !query; /* the step fails anyway */
    if (be->cc_major < 9 || !b1_rope_on(a)) return false;
    /* 4-bit q/k/v only: the 16-bit q/k/v GEMV rotates and stores in its own epilogue (fused.cu) */
    const enum tuna_dtype wd = a->w[0] ? a->w[0]->dtype : TUNA_DTYPE_INVALID;
    if (wd != TUNA_DTYPE_NF4 && wd != TUNA_DTYPE_FP4) return false;
    const int code = kv_code(a->kv_dtype);
    if (!tuna_cuda_b1_layer_fits(a) || !a->q || !a->k || !a->v || !a->att ||
        !tuna_cuda_attn_b1_usable(be, code, (int)a->D, (int)(a->H / a->Hkv)))
        return false;
    if (query) return true;
    att_meta md;
    struct b1_rope rp = {a->k, a->v, NULL, NULL, a->attn_factor};
    /* the position, the block table, the step's slot and the RoPE frequencies */
    if (!tuna_cuda_decode_meta(be, a, "attention (RoPE)", &md, &rp.slot, &rp.inv_freq)) return true;
    /* with PDL after the q/k/v GEMV: the blocks copy the context's K/V rows before they wait
     * (TUNA_ATTN_PDL=0: without) */
    static const char *pdl_env = getenv("TUNA_ATTN_PDL");
    const bool pdl = !(pdl_env && pdl_env[0] == '0');
    const struct tuna_l2pf pf = tuna_cuda_l2pf_take(be, TUNA_L2PF_ATTN, 1);
    be->attn_pdl_hint = false;
    g_b1_rope_launches++;
    b1_go(be, code, a->att, a->q, a->kcache, a->vcache, md, (int)a->H, (int)a->Hkv, (int)a->D, a->scale, 0, pdl, pf,
          &rp);
    return true;
}
