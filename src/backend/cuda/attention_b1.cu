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
 * the wait): NF4 2.56 / 2.60 against 2.62 / 2.60, bf16 5.97 against 5.70. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cuda/attention_b1.cuh"
#include "backend/cuda/pdl.cuh"

#define B1_CS 8 /* blocks per cluster: the splits of one (kv head, head group) */
#define B1_NS 3 /* stages per warp: NS - 1 groups in flight ahead of the one computed */

/* KT bf16 or f16; DT 64 or 128; GM query heads per block (power of two >= the group, at most 8).
 * q, out: token 0's [H][DT] rows, float32 / bf16 / f16 by io. qscale = scale * log2(e). The body
 * is b1_attend (attention_b1.cuh). */
template <typename KT, int DT, int GM>
__global__ void __launch_bounds__(32 * B1_NW, 1)
    k_attn_b1(void *out, const void *q, const KT *kc, const KT *vc, att_meta md, int H, int Hkv, int n_hg,
              float qscale, int io, const struct tuna_l2pf pf)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    extern __shared__ float4 b1_smem_all[];
    const int rank = blockIdx.x, hy = blockIdx.y; /* rank: the block's place in its cluster */
    const struct b1_rope none = {NULL, NULL, NULL, NULL, 0.0f};
    auto wait = [&] {
        if (threadIdx.x == 0) tuna_l2pf_issue(pf, (long long)hy * B1_CS + rank, (long long)gridDim.x * gridDim.y);
        tuna_pdl_wait();
    };
    b1_attend<KT, DT, GM, B1_NS, false>((char *)b1_smem_all, B1_CS, rank, hy, out, q, (KT *)kc, (KT *)vc, md, H, Hkv,
                                        n_hg, qscale, io, none, wait);
#else
    (void)out, (void)q, (void)kc, (void)vc, (void)md, (void)H, (void)Hkv, (void)n_hg, (void)qscale, (void)io, (void)pf;
#endif
}

template <typename KT, int DT, int GM>
static bool b1_launch_one(tuna_backend *be, void *out, const void *q, const void *kc, const void *vc,
                          const att_meta &md, int H, int Hkv, int n_hg, float qscale, int io, bool pdl,
                          const struct tuna_l2pf &pf, bool probe)
{
    void (*fn)(void *, const void *, const KT *, const KT *, att_meta, int, int, int, float, int,
               const struct tuna_l2pf) = k_attn_b1<KT, DT, GM>;
    const size_t smem = (size_t)b1_smem(DT, (int)sizeof(KT), GM, B1_NS);
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(B1_CS, (unsigned)(Hkv * n_hg));
    cfg.blockDim = dim3(32 * B1_NW);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = be->stream;
    cudaLaunchAttribute attr[2];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = B1_CS, attr[0].val.clusterDim.y = 1, attr[0].val.clusterDim.z = 1;
    attr[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[1].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = pdl && tuna_cuda_pdl_on(be) ? 2 : 1;
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
                           cudaLaunchKernelEx(&cfg, fn, out, q, (const KT *)kc, (const KT *)vc, md, H, Hkv, n_hg,
                                              qscale, io, pf),
                           "k_attn_b1");
}

template <typename KT, int DT>
static bool b1_launch_d(tuna_backend *be, int GM, void *out, const void *q, const void *kc, const void *vc,
                        const att_meta &md, int H, int Hkv, int n_hg, float qscale, int io, bool pdl,
                        const struct tuna_l2pf &pf, bool probe)
{
    switch (GM) {
    case 1: return b1_launch_one<KT, DT, 1>(be, out, q, kc, vc, md, H, Hkv, n_hg, qscale, io, pdl, pf, probe);
    case 2: return b1_launch_one<KT, DT, 2>(be, out, q, kc, vc, md, H, Hkv, n_hg, qscale, io, pdl, pf, probe);
    case 4: return b1_launch_one<KT, DT, 4>(be, out, q, kc, vc, md, H, Hkv, n_hg, qscale, io, pdl, pf, probe);
    default: return b1_launch_one<KT, DT, 8>(be, out, q, kc, vc, md, H, Hkv, n_hg, qscale, io, pdl, pf, probe);
    }
}

static bool b1_launch(tuna_backend *be, int code, int D, int GM, void *out, const void *q, const void *kc,
                      const void *vc, const att_meta &md, int H, int Hkv, int n_hg, float qscale, int io, bool pdl,
                      const struct tuna_l2pf &pf, bool probe)
{
    if (code == 1)
        return D == 64 ? b1_launch_d<__nv_bfloat16, 64>(be, GM, out, q, kc, vc, md, H, Hkv, n_hg, qscale, io, pdl, pf, probe)
                       : b1_launch_d<__nv_bfloat16, 128>(be, GM, out, q, kc, vc, md, H, Hkv, n_hg, qscale, io, pdl, pf,
                                                          probe);
    return D == 64 ? b1_launch_d<__half, 64>(be, GM, out, q, kc, vc, md, H, Hkv, n_hg, qscale, io, pdl, pf, probe)
                   : b1_launch_d<__half, 128>(be, GM, out, q, kc, vc, md, H, Hkv, n_hg, qscale, io, pdl, pf, probe);
}

bool tuna_cuda_attn_b1_usable(tuna_backend *be, int code, int D, int G)
{
    static const char *env = getenv("TUNA_ATTN_B1");
    if (env && !strcmp(env, "0")) return false;
    if (be->cc_major < 9 || (code != 1 && code != 2) || (D != 64 && D != 128) || G < 1) return false;
    const int GM = G <= 1 ? 1 : G <= 2 ? 2 : G <= 4 ? 4 : 8;
    /* whether a cluster of these blocks fits, once per (device, dtype, D, GM) */
    static struct {
        int dev, code, D, GM, ok;
    } seen[16];
    static int n_seen;
    for (int i = 0; i < n_seen; i++)
        if (seen[i].dev == be->device && seen[i].code == code && seen[i].D == D && seen[i].GM == GM) return seen[i].ok;
    att_meta md;
    memset(&md, 0, sizeof md);
    const struct tuna_l2pf pf = {};
    const int ok = b1_launch(be, code, D, GM, NULL, NULL, NULL, NULL, md, GM, 1, 1, 1.0f, 0, false, pf, true);
    if (n_seen < 16) seen[n_seen].dev = be->device, seen[n_seen].code = code, seen[n_seen].D = D,
                     seen[n_seen].GM = GM, seen[n_seen++].ok = ok;
    return ok;
}

void tuna_cuda_attn_b1_launch(tuna_backend *be, int code, void *out, const void *q, const void *kcache,
                              const void *vcache, const att_meta &md, int H, int Hkv, int D, float scale, int io,
                              bool pdl, const struct tuna_l2pf &pf)
{
    const int G = H / Hkv, GM = G <= 1 ? 1 : G <= 2 ? 2 : G <= 4 ? 4 : 8, n_hg = (G + GM - 1) / GM;
    b1_launch(be, code, D, GM, out, q, kcache, vcache, md, H, Hkv, n_hg, scale * 1.4426950408889634f, io, pdl, pf,
              false);
}
