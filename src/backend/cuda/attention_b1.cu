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

#include "backend/cuda/act16.cuh"
#include "backend/cuda/attention_dec16.cuh"
#include "backend/cuda/pdl.cuh"

#define B1_CS 8 /* blocks per cluster: the splits of one (kv head, head group) */
#define B1_NW 4 /* warps per block */
#define B1_NS 3 /* stages per warp: NS - 1 groups in flight ahead of the one computed */

/* bytes per warp region: the stage ring, or the merge rows, whichever is larger */
static __host__ __device__ constexpr int b1_wr(int D, int ES, int GM)
{
    return ((B1_NS * 2 * D16_KEYS * (ES * D + 16) > (((32 / (D / 8)) < D16_KEYS ? 32 / (D / 8) : D16_KEYS) * GM * D + 2 * GM) * 4
                 ? B1_NS * 2 * D16_KEYS * (ES * D + 16)
                 : (((32 / (D / 8)) < D16_KEYS ? 32 / (D / 8) : D16_KEYS) * GM * D + 2 * GM) * 4) +
            15) / 16 * 16;
}
/* shared memory: q [GM][D] floats (the block's merged rows afterwards), p [NW][16][GP] (the block's
 * maxima and sums afterwards), the warps' regions */
static __host__ __device__ constexpr int b1_smem(int D, int ES, int GM)
{
    return GM * D * 4 + B1_NW * D16_KEYS * ((GM + 3) & ~3) * 4 + B1_NW * b1_wr(D, ES, GM);
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
/* a float of block `rank` of the cluster at the same shared-memory offset as p */
static __device__ __forceinline__ float b1_dsmem_ld(const float *p, unsigned rank)
{
    const unsigned a = (unsigned)__cvta_generic_to_shared(p);
    unsigned r;
    float v;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(rank));
    asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(r) : "memory");
    return v;
}
/* every thread of every block of the cluster: writes before it are seen by reads after it */
static __device__ __forceinline__ void b1_cluster_sync()
{
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}
#endif

/* KT bf16 or f16; DT 64 or 128; GM query heads per block (power of two >= the group, at most 8).
 * q, out: token 0's [H][DT] rows, float32 / bf16 / f16 by io. qscale = scale * log2(e). */
template <typename KT, int DT, int GM>
__global__ void __launch_bounds__(32 * B1_NW, 1)
    k_attn_b1(void *out, const void *q, const KT *kc, const KT *vc, att_meta md, int H, int Hkv, int n_hg,
              float qscale, int io, const struct tuna_l2pf pf)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    constexpr int ES = (int)sizeof(KT), CH = DT / 8, CB = ES * DT / 16, RB = ES * DT + 16;
    constexpr int KQ = 32 / CH < D16_KEYS ? 32 / CH : D16_KEYS, GP = (GM + 3) & ~3;
    constexpr int NW = B1_NW, NS = B1_NS, CS = B1_CS, WR = b1_wr(DT, ES, GM);
    extern __shared__ float4 b1_smem_all[];
    float *qs = (float *)b1_smem_all;                 /* [GM][DT] */
    float *ps_all = qs + GM * DT;                     /* [NW][16][GP] */
    char *wreg_all = (char *)(ps_all + NW * D16_KEYS * GP);

    const int rank = blockIdx.x, hy = blockIdx.y; /* rank: the block's place in its cluster */
    const int kvh = hy / n_hg, hg = hy % n_hg, G = H / Hkv, h0 = kvh * G + hg * GM, ng = min(GM, G - hg * GM);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int p = (int)md.pos[0], start = (int)att_start(md, p), bs = md.bs;
    const int gb = start / D16_KEYS, n_groups = p / D16_KEYS - gb + 1;
    const int first = rank + CS * warp;                                     /* this warp's first group */
    const int nk = n_groups > first ? (n_groups - 1 - first) / (CS * NW) + 1 : 0; /* its groups */
    const int32_t *table = att_table(md, 0);
    const int64_t HkvD = (int64_t)Hkv * DT;
    const KT *kbase = kc + (int64_t)kvh * DT, *vbase = vc + (int64_t)kvh * DT;
    char *wreg = wreg_all + (size_t)warp * WR;
    float *ps = ps_all + warp * D16_KEYS * GP;

    /* lane j < 16: the cache slot of key j of this warp's group k, -1 outside the context */
    auto key0 = [&](int k) -> int { return (gb + first + CS * NW * k) * D16_KEYS; };
    auto slot_of = [&](int k) -> int {
        const int key = key0(k) + (lane & 15);
        return k < nk && lane < 16 && key >= start && key <= p ? table[key / bs] * bs + key % bs : -1;
    };
    /* copies group k (if any) into stage k % NS; before the PDL wait (early) row p is left out:
     * the kernel before writes it, and it is stored after the wait. Always commits. */
    auto issue = [&](int k, int slot, bool early) {
        if (k < nk) {
            char *buf = wreg + (k % NS) * (2 * D16_KEYS) * RB;
            const int kb = key0(k);
            for (int idx = lane; idx < 2 * D16_KEYS * CB; idx += 32) { /* rows 0..15 K, 16..31 V */
                const int row = idx / CB, c = idx - row * CB;
                const int sl = __shfl_sync(0xffffffffu, slot, row & 15);
                if (early && kb + (row & 15) == p) continue;
                const char *src =
                    (const char *)((row < 16 ? kbase : vbase) + (int64_t)(sl < 0 ? 0 : sl) * HkvD) + c * 16;
                cp_async16(buf + row * RB + c * 16, src, sl < 0 ? 0 : 16);
            }
        }
        cp_async_commit();
    };

    int nslot = slot_of(0);
    for (int k = 0; k < NS - 1; k++) {
        const int sl = nslot;
        nslot = slot_of(k + 1);
        issue(k, sl, true);
    }
    if (tid == 0) tuna_l2pf_issue(pf, (long long)hy * CS + rank, (long long)gridDim.x * gridDim.y);
    tuna_pdl_wait();
    for (int x = tid; x < GM * DT; x += blockDim.x)
        qs[x] = x < ng * DT ? a16_ld(q, io, (int64_t)h0 * DT + x) * qscale : 0.0f;
    /* row p, if one of this warp's early groups holds it */
    {
        const int gi = p / D16_KEYS - gb - first, kp = gi / (CS * NW);
        if (gi >= 0 && gi % (CS * NW) == 0 && kp < NS - 1) {
            char *buf = wreg + (kp % NS) * (2 * D16_KEYS) * RB;
            const int64_t sl = (int64_t)table[p / bs] * bs + p % bs;
            for (int idx = lane; idx < 2 * CB; idx += 32) {
                const int isv = idx / CB, c = idx - isv * CB;
                const uint4 v = __ldcg((const uint4 *)((const char *)((isv ? vbase : kbase) + sl * HkvD) + c * 16));
                *(uint4 *)(buf + (isv * D16_KEYS + p % D16_KEYS) * RB + c * 16) = v;
            }
        }
    }
    __syncthreads(); /* qs, and row p for its warp */

    float m[GM], l[GM], acc[GM][8];
    d16_state_init<GM>(m, l, acc);
    const int j = lane & 15, half = lane >> 4, kq = lane / CH, cc = lane - kq * CH;
    const bool pv_active = kq < KQ;
    for (int k = 0; k < nk; k++) {
        __syncwarp(); /* every lane is done with the stage about to be refilled */
        {
            const int sl = nslot;
            nslot = slot_of(k + NS);
            issue(k + NS - 1, sl, false);
        }
        cp_async_wait<NS - 1>();
        __syncwarp();
        const int key = key0(k) + j;
        d16_group_ffma<KT, GM>(wreg + (k % NS) * (2 * D16_KEYS) * RB, RB, DT, qs, ps, j, half, kq, cc, pv_active,
                               key >= start && key <= p, m, l, acc);
    }
    cp_async_wait<0>();
    __syncwarp();
    d16_warp_store<GM>((float *)wreg, DT, kq, cc, pv_active, lane, m, l, acc);
    __syncthreads();
    /* the block's rows: qs [g][d] = unnormalized output, ps_all [2 g] = max, [2 g + 1] = sum */
    for (int x = tid; x < ng * DT; x += blockDim.x) {
        const int g = x / DT, d = x - g * DT;
        float M, L;
        qs[x] = d16_block_merge(wreg_all, WR, NW, KQ * GM * DT, GM, KQ, DT, g, d, M, L);
        if (d == 0) ps_all[2 * g] = M, ps_all[2 * g + 1] = L;
    }
    b1_cluster_sync();
    /* the cluster's CS blocks merged, each block writing every CS-th element */
    for (int x = rank * blockDim.x + tid; x < ng * DT; x += CS * blockDim.x) {
        const int g = x / DT;
        float Mb[CS], Lb[CS], M = -INFINITY;
#pragma unroll
        for (int b = 0; b < CS; b++) {
            Mb[b] = b1_dsmem_ld(ps_all + 2 * g, (unsigned)b);
            Lb[b] = b1_dsmem_ld(ps_all + 2 * g + 1, (unsigned)b);
            M = fmaxf(M, Mb[b]);
        }
        float L = 0.0f, a = 0.0f;
#pragma unroll
        for (int b = 0; b < CS; b++)
            if (Lb[b] > 0.0f) { /* a block without keys adds nothing */
                const float w = d16_exp2(Mb[b] - M);
                L += w * Lb[b];
                a += w * b1_dsmem_ld(qs + x, (unsigned)b);
            }
        a16_st(out, io, (int64_t)h0 * DT + x, a / L);
    }
    b1_cluster_sync(); /* no block leaves while another reads its shared memory */
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
    const size_t smem = (size_t)b1_smem(DT, (int)sizeof(KT), GM);
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
