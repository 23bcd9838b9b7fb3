/* attention_b1.cuh — the body of the batch-1 decode attention (k_attn_b1, attention_b1.cu) as a
 * device function, so that the attention + o kernel (attn_o.cu) runs the same steps. What it does
 * and why is described in attention_b1.cu; b1_attend is that kernel from its first copies to the
 * cluster's merged output, with two additions for attn_o.cu:
 *   - ROPE: q, k and v are the projections as computed (no RoPE yet, the step's row not in the
 *     cache): q is rotated as it is loaded, and the warp whose group holds position p rotates k,
 *     writes the step's K and V rows into its stage and (head group 0) into the cache. The same
 *     float operations as k_rope_kv (rope.cuh), so the cache and the result are the same bits;
 *   - the block may have more warps than the NW that attend: the others pass the barriers only.
 * Needs sm_90 (clusters, distributed shared memory). */
#pragma once

#include "backend/cuda/act16.cuh"
#include "backend/cuda/attention_dec16.cuh"
#include "backend/cuda/rope.cuh"

#define B1_NW 4     /* warps per block that attend */
#define B1_CS_MAX 8 /* blocks per cluster at most: the splits of one (kv head, head group) */

/* bytes per warp region: the stage ring of NS stages, or the merge rows, whichever is larger */
static __host__ __device__ constexpr int b1_wr(int D, int ES, int GM, int NS)
{
    return ((NS * 2 * D16_KEYS * (ES * D + 16) >
                     (((32 / (D / 8)) < D16_KEYS ? 32 / (D / 8) : D16_KEYS) * GM * D + 2 * GM) * 4
                 ? NS * 2 * D16_KEYS * (ES * D + 16)
                 : (((32 / (D / 8)) < D16_KEYS ? 32 / (D / 8) : D16_KEYS) * GM * D + 2 * GM) * 4) +
            15) /
           16 * 16;
}
/* shared memory: q [GM][D] floats (the block's merged rows afterwards), p [NW][16][GP] (the block's
 * maxima and sums afterwards), the warps' regions */
static __host__ __device__ constexpr int b1_smem(int D, int ES, int GM, int NS)
{
    return GM * D * 4 + B1_NW * D16_KEYS * ((GM + 3) & ~3) * 4 + B1_NW * b1_wr(D, ES, GM, NS);
}

/* The step's own rows for ROPE: k, v [Hkv * D] as the projections wrote them (io as q), the cache
 * slot of position p, the rotation's frequencies [D / 2] and factor (rot_dim = D). */
struct b1_rope {
    const void *k, *v;
    const int64_t *slot;
    const float *inv_freq;
    float attn_factor;
};

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
/* v[i] = p[idx[i]] (float32, bf16 or f16 by io; 0 where idx[i] < 0), the N loads issued before any
 * value is used: one round trip to memory instead of N */
template <int N>
static __device__ __forceinline__ void b1_ld_n(const void *p, int io, const int64_t (&idx)[N], float (&v)[N])
{
    if (io == 1 || io == 2) {
        uint16_t r[N];
#pragma unroll
        for (int i = 0; i < N; i++)
            r[i] = idx[i] >= 0 ? ((const uint16_t *)p)[idx[i]] : (uint16_t)0;
#pragma unroll
        for (int i = 0; i < N; i++)
            v[i] = io == 1 ? __uint_as_float((uint32_t)r[i] << 16) : __half2float(__ushort_as_half(r[i]));
    } else {
#pragma unroll
        for (int i = 0; i < N; i++)
            v[i] = idx[i] >= 0 ? ((const float *)p)[idx[i]] : 0.0f;
    }
}

/* every thread of every block of the cluster: writes before it are seen by reads after it */
static __device__ __forceinline__ void b1_cluster_sync()
{
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}

/* Attention of query heads (hy: kv head hy / n_hg, head group hy % n_hg) over the cache, by the
 * CS blocks of one cluster (this one: rank), into out [H][DT] (io). smem: b1_smem(DT, ES, GM, NS)
 * bytes. wait(): the PDL wait, called by every thread after the first copies are issued. Every
 * thread of the CS blocks calls it; warps >= B1_NW only help with loads and merges. */
template <typename KT, int DT, int GM, int NS, bool ROPE, typename Wait>
static __device__ __forceinline__ void b1_attend(char *smem, int CS, int rank, int hy, void *out, const void *q, KT *kc,
                                                 KT *vc, const att_meta &md, int H, int Hkv, int n_hg, float qscale,
                                                 int io, const struct b1_rope &rp, Wait wait)
{
    constexpr int ES = (int)sizeof(KT), CH = DT / 8, CB = ES * DT / 16, RB = ES * DT + 16;
    constexpr int KQ = 32 / CH < D16_KEYS ? 32 / CH : D16_KEYS, GP = (GM + 3) & ~3;
    constexpr int NW = B1_NW, WR = b1_wr(DT, ES, GM, NS);
    float *qs = (float *)smem;    /* [GM][DT] */
    float *ps_all = qs + GM * DT; /* [NW][16][GP] */
    char *wreg_all = (char *)(ps_all + NW * D16_KEYS * GP);

    const int kvh = hy / n_hg, hg = hy % n_hg, G = H / Hkv, h0 = kvh * G + hg * GM, ng = min(GM, G - hg * GM);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const bool aw = warp < NW; /* this warp attends */
    const int p = (int)md.pos[0], start = (int)att_start(md, p), bs = md.bs;
    const int gb = start / D16_KEYS, n_groups = p / D16_KEYS - gb + 1;
    const int first = rank + CS * warp;                                                 /* this warp's first group */
    const int nk = aw && n_groups > first ? (n_groups - 1 - first) / (CS * NW) + 1 : 0; /* its groups */
    const int32_t *table = att_table(md, 0);
    const int64_t HkvD = (int64_t)Hkv * DT;
    const KT *kbase = kc + (int64_t)kvh * DT, *vbase = vc + (int64_t)kvh * DT;
    char *wreg = wreg_all + (size_t)(aw ? warp : 0) * WR;
    float *ps = ps_all + (aw ? warp : 0) * D16_KEYS * GP;

    /* lane j < 16: the cache slot of key j of this warp's group k, -1 outside the context */
    auto key0 = [&](int k) -> int { return (gb + first + CS * NW * k) * D16_KEYS; };
    auto slot_of = [&](int k) -> int {
        const int key = key0(k) + (lane & 15);
        return k < nk && lane < 16 && key >= start && key <= p ? table[key / bs] * bs + key % bs : -1;
    };
    /* copies group k (if any) into stage k % NS; row p is left out before the PDL wait (early: the
     * kernel before writes it, and it is stored after the wait) and always with ROPE (this kernel
     * makes it). Always commits. */
    auto issue = [&](int k, int slot, bool early) {
        if (k < nk) {
            char *buf = wreg + (k % NS) * (2 * D16_KEYS) * RB;
            const int kb = key0(k);
            for (int idx = lane; idx < 2 * D16_KEYS * CB; idx += 32) { /* rows 0..15 K, 16..31 V */
                const int row = idx / CB, c = idx - row * CB;
                const int sl = __shfl_sync(0xffffffffu, slot, row & 15);
                if ((early || ROPE) && kb + (row & 15) == p) continue;
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
    wait();
    /* after the wait every load of q (and of row p) is issued before any is used: one round trip.
     * QI: q's elements per thread at the fewest threads (NW warps; more threads leave some out) */
    constexpr int QI = (GM * DT + 32 * NW - 1) / (32 * NW), HALF = DT / 2, PR = DT / 32;
    const int gi = p / D16_KEYS - gb - first, kp = gi / (CS * NW); /* row p in this warp's group kp */
    const bool holds_p = aw && gi >= 0 && gi % (CS * NW) == 0;
    float pk1[PR], pk2[PR], pv[PR], pfq[PR]; /* ROPE: row p's k (the rotation's halves), v, frequencies */
    int64_t pslot = 0;              /* ROPE: row p's cache slot */
    const float pf = (float)p;      /* ROPE: the position (the int64 value's float) */
    if (ROPE) { /* q rotated as k_rope_kv does it, then scaled as below */
        int64_t i1[QI], i2[QI], ifr[QI];
#pragma unroll
        for (int i = 0; i < QI; i++) {
            const int x = tid + i * (int)blockDim.x, g = x / DT, d = x - g * DT, jj = d < HALF ? d : d - HALF;
            i1[i] = x < ng * DT ? (int64_t)(h0 + g) * DT + jj : -1;
            i2[i] = x < ng * DT ? i1[i] + HALF : -1;
            ifr[i] = x < ng * DT ? jj : -1;
        }
        float x1[QI], x2[QI], fq[QI];
        b1_ld_n<QI>(q, io, i1, x1);
        b1_ld_n<QI>(q, io, i2, x2);
        b1_ld_n<QI>(rp.inv_freq, 0, ifr, fq);
        if (holds_p) { /* the step's own k and v rows, used in the loop below */
            int64_t j1[PR], j2[PR], jv[PR], jf[PR];
#pragma unroll
            for (int i = 0; i < PR; i++) {
                const int d = lane + 32 * i, jj = d < HALF ? d : d - HALF;
                j1[i] = (int64_t)kvh * DT + jj, j2[i] = j1[i] + HALF, jv[i] = (int64_t)kvh * DT + d, jf[i] = jj;
            }
            b1_ld_n<PR>(rp.k, io, j1, pk1);
            b1_ld_n<PR>(rp.k, io, j2, pk2);
            b1_ld_n<PR>(rp.v, io, jv, pv);
            b1_ld_n<PR>(rp.inv_freq, 0, jf, pfq);
            pslot = rp.slot[0];
        }
#pragma unroll
        for (int i = 0; i < QI; i++) {
            const int x = tid + i * (int)blockDim.x;
            if (x >= GM * DT) continue;
            float v = 0.0f;
            if (x < ng * DT) {
                const int d = x % DT;
                float c, sn;
                rope_cos_sin_of(fq[i], pf, rp.attn_factor, &c, &sn);
                v = (d < HALF ? rope_first(x1[i], x2[i], c, sn) : rope_second(x1[i], x2[i], c, sn)) * qscale;
            }
            qs[x] = v;
        }
    } else {
        /* row p, if one of this warp's early groups holds it (at most one 16-byte piece per lane) */
        const bool early_p = holds_p && kp < NS - 1 && lane < 2 * CB;
        uint4 rowp = make_uint4(0u, 0u, 0u, 0u);
        if (early_p) {
            const int64_t sl = (int64_t)table[p / bs] * bs + p % bs;
            const int isv = lane / CB, c = lane - isv * CB;
            rowp = __ldcg((const uint4 *)((const char *)((isv ? vbase : kbase) + sl * HkvD) + c * 16));
        }
        int64_t iq[QI];
#pragma unroll
        for (int i = 0; i < QI; i++) {
            const int x = tid + i * (int)blockDim.x;
            iq[i] = x < ng * DT ? (int64_t)h0 * DT + x : -1;
        }
        float qv[QI];
        b1_ld_n<QI>(q, io, iq, qv);
#pragma unroll
        for (int i = 0; i < QI; i++) {
            const int x = tid + i * (int)blockDim.x;
            if (x < GM * DT) qs[x] = iq[i] >= 0 ? qv[i] * qscale : 0.0f;
        }
        if (early_p) {
            char *buf = wreg + (kp % NS) * (2 * D16_KEYS) * RB;
            const int isv = lane / CB, c = lane - isv * CB;
            *(uint4 *)(buf + (isv * D16_KEYS + p % D16_KEYS) * RB + c * 16) = rowp;
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
        char *buf = wreg + (k % NS) * (2 * D16_KEYS) * RB;
        if (ROPE && p >= key0(k) && p < key0(k) + D16_KEYS) {
            /* the step's own K and V rows (k_rope_kv's operations), into the stage and the cache */
            const int64_t cs0 = pslot * HkvD + (int64_t)kvh * DT;
#pragma unroll
            for (int i = 0; i < PR; i++) {
                const int d = lane + 32 * i;
                float c, sn;
                rope_cos_sin_of(pfq[i], pf, rp.attn_factor, &c, &sn);
                const KT kv = kv_traits<KT>::from_f32(d < HALF ? rope_first(pk1[i], pk2[i], c, sn)
                                                               : rope_second(pk1[i], pk2[i], c, sn));
                const KT vv = kv_traits<KT>::from_f32(pv[i]);
                *(KT *)(buf + (p % D16_KEYS) * RB + d * ES) = kv;
                *(KT *)(buf + (D16_KEYS + p % D16_KEYS) * RB + d * ES) = vv;
                if (hg == 0) kc[cs0 + d] = kv, vc[cs0 + d] = vv;
            }
            __syncwarp();
        }
        const int key = key0(k) + j;
        d16_group_ffma<KT, GM>(buf, RB, DT, qs, ps, j, half, kq, cc, pv_active, key >= start && key <= p, m, l, acc);
    }
    if (aw) cp_async_wait<0>(); /* (the other warps' copies are the caller's) */
    __syncwarp();
    if (aw) d16_warp_store<GM>((float *)wreg, DT, kq, cc, pv_active, lane, m, l, acc);
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
        float Mb[B1_CS_MAX], Lb[B1_CS_MAX], M = -INFINITY;
#pragma unroll
        for (int b = 0; b < B1_CS_MAX; b++) { /* (unrolled: Mb, Lb stay in registers) */
            Mb[b] = b < CS ? b1_dsmem_ld(ps_all + 2 * g, (unsigned)b) : -INFINITY;
            Lb[b] = b < CS ? b1_dsmem_ld(ps_all + 2 * g + 1, (unsigned)b) : 0.0f;
            M = fmaxf(M, Mb[b]);
        }
        float L = 0.0f, a = 0.0f;
#pragma unroll
        for (int b = 0; b < B1_CS_MAX; b++) {
            if (Lb[b] > 0.0f) { /* a block without keys adds nothing */
                const float w = d16_exp2(Mb[b] - M);
                L += w * Lb[b];
                a += w * b1_dsmem_ld(qs + x, (unsigned)b);
            }
        }
        a16_st(out, io, (int64_t)h0 * DT + x, a / L);
    }
    b1_cluster_sync(); /* no block leaves while another reads its shared memory */
}
#endif
