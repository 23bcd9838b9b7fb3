/* attention_prefill.cu — flash attention for prefill runs over the paged KV cache (see
 * attention.cu for the whole op and the split of a batch between its two kernels).
 *
 * k_attn_prefill_mma (below): bf16/f16 caches on sm_80+, head dims 64/80/96/128/256 — the
 * FlashAttention-2-style kernel on mma.sync with everything per row in registers. An FP8 E4M3
 * cache runs it too, on f16 operands: K/V tiles arrive as bytes (cp.async) in a staging buffer
 * and are widened to f16 (exact) in shared memory; FP8 has no other prefill kernel (the tokens
 * decode where this one does not apply).
 *
 * k_attn_prefill (every other case: float32 cache, older GPUs, other head dims, unaligned K/V
 * rows): a block takes a tile of BQ queries of one head; tiles of PF_BK keys go to
 * shared memory, S = Q K^T and O += P V run on tensor cores (WMMA 16x16x16, bf16 or f16 inputs,
 * float32 accumulation) for 16-bit caches, as float32 loops for a float32 cache; the online
 * softmax (per-row max and sum, O rescaled in shared memory) is float32.
 *
 * q and out are float32 (io 0) or 16-bit (io 1 bf16, 2 f16: backend.h's attention16; the same
 * math, q read and out written in 16 bits). */
#include <math.h>
#include <mma.h>
#include <stdlib.h>

#include "backend/cuda/act16.cuh"
#include "backend/cuda/attention_internal.cuh"
#include "backend/cuda/kv_types.cuh"
#include "backend/cuda/mma.cuh"

#define PF_THREADS 128
#define PF_BK 64 /* keys per tile of the prefill kernel */

/* ------------------------------------------------------------------------------------------
 * Prefill: grid (tiles, H), PF_THREADS threads, dynamic shared memory laid out by pf_layout.
 * tiles[2k] = first batch row of tile k, tiles[2k+1] = its rows (<= BQ), consecutive positions of
 * one sequence. Shared element type: KT for Q and K/V tiles (16-bit: the WMMA inputs), float32
 * for scores, P (float32 path) and O. */
struct pf_layout {
    int Dp;             /* D rounded up to 16 (zero padded) */
    int ldh, lds, ldp, ldo; /* leading dimensions (elements) of Q and K/V, S, P, O */
    size_t q, kv, s, p, o, m, l, c, rpos, rstart, slots, total; /* byte offsets */
};

static __host__ __device__ pf_layout pf_make_layout(int D, int BQ, int esz)
{
    pf_layout L;
    L.Dp = (D + 15) / 16 * 16;
    const bool h16 = esz == 2;
    L.ldh = h16 ? L.Dp + 8 : L.Dp + 4; /* against bank conflicts; rows stay 16-byte aligned (WMMA: 32) */
    L.lds = PF_BK + 4;
    L.ldp = PF_BK + 8;
    L.ldo = L.Dp + 4;
    size_t off = 0;
#define PF_TAKE(field, bytes) (L.field = off, off = (off + (size_t)(bytes) + 127) & ~(size_t)127)
    PF_TAKE(q, (size_t)BQ * L.ldh * esz);
    PF_TAKE(kv, (size_t)PF_BK * L.ldh * esz);
    PF_TAKE(s, (size_t)BQ * L.lds * 4);
    PF_TAKE(p, h16 ? (size_t)BQ * L.ldp * 2 : 0);
    PF_TAKE(o, (size_t)BQ * L.ldo * 4);
    PF_TAKE(m, (size_t)BQ * 4);
    PF_TAKE(l, (size_t)BQ * 4);
    PF_TAKE(c, (size_t)BQ * 4);
    PF_TAKE(rpos, (size_t)BQ * 8);
    PF_TAKE(rstart, (size_t)BQ * 8);
    PF_TAKE(slots, (size_t)PF_BK * 8);
#undef PF_TAKE
    L.total = off;
    return L;
}

/* WMMA on bf16 needs compute capability 8.0; the host never picks it below (f16 works from 7.0). */
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define ATT_HAVE_BF16_MMA 1
#else
#define ATT_HAVE_BF16_MMA 0
#endif

/* Loads PF_BK rows of K or V (n valid, the rest zero) into shared rows of ldh elements. */
template <typename KT>
static __device__ __forceinline__ void pf_load_kv(KT *dst, const KT *base, const int64_t *slots, int n, int D,
                                                  int ldh, int64_t HkvD, bool vec)
{
    constexpr int VE = kv_traits<KT>::VEC;
    if (vec) {
        const int nu = D / VE;
        for (int x = threadIdx.x; x < PF_BK * nu; x += PF_THREADS) {
            int j = x / nu, u = x % nu;
            uint4 v = make_uint4(0, 0, 0, 0);
            if (j < n) v = __ldg((const uint4 *)(base + slots[j] * HkvD + u * VE));
            *(uint4 *)(dst + (size_t)j * ldh + u * VE) = v;
        }
    } else {
        for (int x = threadIdx.x; x < PF_BK * D; x += PF_THREADS) {
            int j = x / D, d = x % D;
            dst[(size_t)j * ldh + d] = j < n ? base[slots[j] * HkvD + d] : kv_traits<KT>::from_f32(0.0f);
        }
    }
}

template <typename KT>
__global__ void __launch_bounds__(PF_THREADS)
    k_attn_prefill(float *out, const float *q, const KT *kc, const KT *vc, att_meta md, const int32_t *tiles, int H,
                   int Hkv, int D, int BQ, bool vec, float scale, int io)
{
    using namespace nvcuda;
    constexpr bool H16 = !std::is_same<KT, float>::value;
    extern __shared__ __align__(128) unsigned char smem[];
    const pf_layout L = pf_make_layout(D, BQ, (int)sizeof(KT));
    KT *Qs = (KT *)(smem + L.q), *KVs = (KT *)(smem + L.kv);
    float *S = (float *)(smem + L.s), *O = (float *)(smem + L.o);
    float *rm = (float *)(smem + L.m), *rl = (float *)(smem + L.l), *rc = (float *)(smem + L.c);
    int64_t *rpos = (int64_t *)(smem + L.rpos), *rstart = (int64_t *)(smem + L.rstart);
    int64_t *slots = (int64_t *)(smem + L.slots);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = PF_THREADS / 32;
    const int h = blockIdx.y, kvh = h / (H / Hkv);
    const int row0 = tiles[2 * blockIdx.x], nq = tiles[2 * blockIdx.x + 1];
    const int64_t t_last = row0 + nq - 1;
    const int32_t *table = att_table(md, t_last); /* the last row's table covers every key of the tile */
    const int64_t p_first = md.pos[row0], p_last = md.pos[t_last];
    const int64_t HkvD = (int64_t)Hkv * D;
    const int Dp = L.Dp;

    for (int r = tid; r < BQ; r += PF_THREADS) {
        rpos[r] = r < nq ? p_first + r : -1; /* rows past the tile attend to nothing */
        rstart[r] = r < nq ? att_start(md, p_first + r) : 0;
        rm[r] = -INFINITY;
        rl[r] = 0.0f;
    }
    for (int x = tid; x < BQ * Dp; x += PF_THREADS) {
        int r = x / Dp, d = x % Dp;
        float v = r < nq && d < D ? a16_ld(q, io, ((int64_t)(row0 + r) * H + h) * D + d) : 0.0f;
        Qs[(size_t)r * L.ldh + d] = kv_traits<KT>::from_f32(v);
    }
    for (int x = tid; x < BQ * L.ldo; x += PF_THREADS) O[x] = 0.0f;
    if (Dp > D) /* zero pad columns of the K/V tile: the loads below write [0, D) only */
        for (int x = tid; x < PF_BK * (Dp - D); x += PF_THREADS)
            KVs[(size_t)(x / (Dp - D)) * L.ldh + D + x % (Dp - D)] = kv_traits<KT>::from_f32(0.0f);
    const int64_t kstart = att_start(md, p_first);
    __syncthreads();

    for (int64_t k0 = kstart; k0 <= p_last; k0 += PF_BK) {
        const int n = (int)min((int64_t)PF_BK, p_last - k0 + 1);
        for (int j = tid; j < n; j += PF_THREADS) {
            int64_t pp = k0 + j;
            slots[j] = (int64_t)table[pp / md.bs] * md.bs + pp % md.bs;
        }
        __syncthreads();
        pf_load_kv<KT>(KVs, kc + (int64_t)kvh * D, slots, n, D, L.ldh, HkvD, vec);
        __syncthreads();
        /* S = Q K^T */
        if constexpr (H16) {
            if constexpr (std::is_same<KT, __nv_bfloat16>::value && !ATT_HAVE_BF16_MMA) {
                __trap();
            } else {
                const int ntiles = (BQ / 16) * (PF_BK / 16);
                for (int tt = warp; tt < ntiles; tt += nwarps) {
                    const int mi = tt / (PF_BK / 16), ni = tt % (PF_BK / 16);
                    wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
                    wmma::fill_fragment(fc, 0.0f);
                    for (int k = 0; k < Dp; k += 16) {
                        wmma::fragment<wmma::matrix_a, 16, 16, 16, KT, wmma::row_major> fa;
                        wmma::fragment<wmma::matrix_b, 16, 16, 16, KT, wmma::col_major> fb;
                        wmma::load_matrix_sync(fa, Qs + (size_t)mi * 16 * L.ldh + k, L.ldh);
                        wmma::load_matrix_sync(fb, KVs + (size_t)ni * 16 * L.ldh + k, L.ldh);
                        wmma::mma_sync(fc, fa, fb, fc);
                    }
                    wmma::store_matrix_sync(S + (size_t)mi * 16 * L.lds + ni * 16, fc, L.lds, wmma::mem_row_major);
                }
            }
        } else {
            for (int x = tid; x < BQ * PF_BK; x += PF_THREADS) {
                const int r = x / PF_BK, j = x % PF_BK;
                const float *qr = (const float *)Qs + (size_t)r * L.ldh, *kr = (const float *)KVs + (size_t)j * L.ldh;
                float s = 0.0f;
                for (int d = 0; d < D; d++) s += qr[d] * kr[d];
                S[(size_t)r * L.lds + j] = s;
            }
        }
        __syncthreads();
        /* online softmax, one warp per row: P into P (16-bit) or back into S (float32) */
        for (int r = warp; r < BQ; r += nwarps) {
            float sv[2];
            float mx = -INFINITY;
#pragma unroll
            for (int c = 0; c < 2; c++) {
                const int j = lane + 32 * c;
                const int64_t pp = k0 + j;
                const bool ok = j < n && pp <= rpos[r] && pp >= rstart[r];
                sv[c] = ok ? S[(size_t)r * L.lds + j] * scale : -INFINITY;
                mx = fmaxf(mx, sv[c]);
            }
            for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
            const float m_old = rm[r], m_new = fmaxf(m_old, mx);
            float sum = 0.0f;
#pragma unroll
            for (int c = 0; c < 2; c++) {
                const int j = lane + 32 * c;
                const float e = m_new == -INFINITY ? 0.0f : expf(sv[c] - m_new);
                sum += e;
                if constexpr (H16) ((KT *)(smem + L.p))[(size_t)r * L.ldp + j] = kv_traits<KT>::from_f32(e);
                else S[(size_t)r * L.lds + j] = e;
            }
            for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
            if (lane == 0) {
                const float c = m_new == -INFINITY ? 1.0f : expf(m_old - m_new);
                rc[r] = c;
                rm[r] = m_new;
                rl[r] = rl[r] * c + sum;
            }
        }
        pf_load_kv<KT>(KVs, vc + (int64_t)kvh * D, slots, n, D, L.ldh, HkvD, vec); /* K is done with */
        __syncthreads();
        /* O = O * c + P V */
        if constexpr (H16) {
            for (int x = tid; x < BQ * Dp; x += PF_THREADS) {
                const int r = x / Dp, d = x % Dp;
                O[(size_t)r * L.ldo + d] *= rc[r];
            }
            __syncthreads();
            if constexpr (std::is_same<KT, __nv_bfloat16>::value && !ATT_HAVE_BF16_MMA) {
                __trap();
            } else {
                const KT *P = (const KT *)(smem + L.p);
                const int ntiles = (BQ / 16) * (Dp / 16);
                for (int tt = warp; tt < ntiles; tt += nwarps) {
                    const int mi = tt / (Dp / 16), ni = tt % (Dp / 16);
                    wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
                    float *op = O + (size_t)mi * 16 * L.ldo + ni * 16;
                    wmma::load_matrix_sync(fc, op, L.ldo, wmma::mem_row_major);
                    for (int k = 0; k < PF_BK; k += 16) {
                        wmma::fragment<wmma::matrix_a, 16, 16, 16, KT, wmma::row_major> fa;
                        wmma::fragment<wmma::matrix_b, 16, 16, 16, KT, wmma::row_major> fb;
                        wmma::load_matrix_sync(fa, P + (size_t)mi * 16 * L.ldp + k, L.ldp);
                        wmma::load_matrix_sync(fb, KVs + (size_t)k * L.ldh + ni * 16, L.ldh);
                        wmma::mma_sync(fc, fa, fb, fc);
                    }
                    wmma::store_matrix_sync(op, fc, L.ldo, wmma::mem_row_major);
                }
            }
        } else {
            for (int x = tid; x < BQ * D; x += PF_THREADS) {
                const int r = x / D, d = x % D;
                const float *pr = S + (size_t)r * L.lds, *vk = (const float *)KVs + d;
                float a = O[(size_t)r * L.ldo + d] * rc[r];
                for (int j = 0; j < n; j++) a += pr[j] * vk[(size_t)j * L.ldh];
                O[(size_t)r * L.ldo + d] = a;
            }
        }
        __syncthreads(); /* before the next tile rewrites slots, K/V, S and P */
    }
    for (int x = tid; x < nq * D; x += PF_THREADS) {
        const int r = x / D, d = x % D;
        a16_st(out, io, ((int64_t)(row0 + r) * H + h) * D + d, O[(size_t)r * L.ldo + d] / rl[r]);
    }
}

/* ------------------------------------------------------------------------------------------
 * Prefill on sm_80+ with a 16-bit cache (FlashAttention-2 style): grid (H, tiles), NW warps; warp
 * w owns query rows 16w..16w+15 of the tile. Q is converted to 16-bit once (through shared
 * memory) and kept as mma A fragments in registers (D <= 128; larger heads reload them from
 * shared memory per tile); S = Q K^T, the online softmax and O live in registers; P is rounded
 * to 16 bits in registers and is the A operand of O += P V. K/V tiles of MP_BK keys are gathered
 * through the block table with cp.async into a double buffer (the next tile loads while this one
 * is computed; one barrier per tile). Masks (causal, window, rows past the tile) are applied only
 * where a warp's tile needs them; tiles wholly outside a warp's rows are skipped by that warp.
 * Shared memory: [K0][V0][K1][V1] (rows of D + 8 elements: ldmatrix without bank conflicts), Q
 * staged in [K1 V1] when it then lives in registers (else after V1), then the slots of two tiles. */
#define MP_BK 64

template <int D, int NW, int BK = MP_BK> struct mp_cfg {
    static constexpr int BQ = 16 * NW, DP = D + 8, NT = 32 * NW;
    static constexpr bool QREG = D <= 128;
    static constexpr size_t stage = (size_t)BK * DP * 2; /* bytes of one K or V tile */
    static constexpr size_t q_off = QREG ? 2 * stage : 4 * stage;
    static constexpr size_t kv_end = 4 * stage;
    static constexpr size_t q_end = q_off + (size_t)BQ * DP * 2;
    static constexpr size_t slot_off = (kv_end > q_end ? kv_end : q_end);
    static constexpr size_t smem = slot_off + 2 * BK * sizeof(int64_t);
};

/* KT: the mma operand type (bf16/f16); CT: the cache's element type, KT or FP8 E4M3 (then KT =
 * __half and tiles are staged as bytes after the slots, C::smem + 2 * BK * D bytes in all). */
template <typename KT, int D, int NW, int MINB, int BK, typename CT = KT>
__global__ void __launch_bounds__(32 * NW, MINB)
    k_attn_prefill_mma(float *out, const float *q, const CT *kc, const CT *vc, att_meta md, const int32_t *tiles,
                       int n_tiles, int H, int Hkv, bool qvec, float sl2, int io)
{
#if TUNA_MMA_SM80
    using C = mp_cfg<D, NW, BK>;
    constexpr bool F8 = sizeof(CT) == 1;
    constexpr int BQ = C::BQ, DP = C::DP, NT = C::NT, CH = D / 8, KD = D / 16, NO = D / 8;
    extern __shared__ __align__(128) unsigned char smem[];
    KT *Qs = (KT *)(smem + C::q_off);
    int64_t *sslot = (int64_t *)(smem + C::slot_off); /* [2][BK] */

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, c4 = lane & 3;
    const int h = blockIdx.x, tile = n_tiles - 1 - (int)blockIdx.y; /* the longest tiles first */
    const int kvh = h / (H / Hkv);
    const int row0 = tiles[2 * tile], nq = tiles[2 * tile + 1];
    const int32_t *table = att_table(md, row0 + nq - 1); /* the last row's table covers every key */
    const int64_t p_first = md.pos[row0], p_last = md.pos[row0 + nq - 1];
    const int64_t HkvD = (int64_t)Hkv * D;
    const int64_t bs = md.bs;
    const int64_t kstart = att_start(md, p_first);
    const int n_kt = (int)((p_last - kstart) / BK + 1);
    const CT *kbase = kc + (int64_t)kvh * D, *vbase = vc + (int64_t)kvh * D;

    /* slots of tile `it` (keys past p_last: -1, zero filled) */
    auto make_slots = [&](int it) {
        if (tid < BK) {
            const int64_t pp = kstart + (int64_t)it * BK + tid;
            int64_t sl = -1;
            if (pp <= p_last) {
                if (p_last < 0x7fffffff && bs < 0x7fffffff) {
                    const uint32_t p32 = (uint32_t)pp, b32 = (uint32_t)bs;
                    sl = (int64_t)table[p32 / b32] * bs + (int64_t)(p32 % b32);
                } else {
                    sl = (int64_t)table[pp / bs] * bs + pp % bs;
                }
            }
            sslot[(it & 1) * BK + tid] = sl;
        }
    };
    auto load_tile = [&](int it) {
        const int st = it & 1;
        const int64_t *sl = sslot + st * BK;
        if constexpr (F8) { /* the tile's K and V rows as bytes into the staging buffer [K | V][BK][D] */
            unsigned char *kd = smem + C::smem, *vd = kd + BK * D;
            constexpr int CB = D / 16; /* 16-byte chunks per row */
            for (int x = tid; x < BK * CB; x += NT) {
                const int j = x / CB, u = x % CB;
                const int64_t s = sl[j];
                const int64_t off = s >= 0 ? s * HkvD + u * 16 : 0;
                mma_cp_async16(kd + j * D + u * 16, kbase + off, s >= 0);
                mma_cp_async16(vd + j * D + u * 16, vbase + off, s >= 0);
            }
        } else {
            KT *kd = (KT *)(smem + st * 2 * C::stage), *vd = kd + BK * DP;
            for (int x = tid; x < BK * CH; x += NT) {
                const int j = x / CH, u = x % CH;
                const int64_t s = sl[j];
                const int64_t off = s >= 0 ? s * HkvD + u * 8 : 0;
                mma_cp_async16(kd + j * DP + u * 8, kbase + off, s >= 0);
                mma_cp_async16(vd + j * DP + u * 8, vbase + off, s >= 0);
            }
        }
        mma_cp_async_commit();
    };
    /* FP8: the staged tile (bytes) widened into the f16 tile buffers of stage st (8 at a time) */
    auto widen_tile = [&](int st) {
        if constexpr (F8) {
            const unsigned char *ks = smem + C::smem;
            KT *kd = (KT *)(smem + st * 2 * C::stage);
            for (int x = tid; x < 2 * BK * CH; x += NT) { /* rows 0..BK-1 K, BK..2BK-1 V */
                const int j = x / CH, u = x % CH;
                const uint2 w = *(const uint2 *)(ks + j * D + u * 8);
                *(uint4 *)(kd + j * DP + u * 8) = make_uint4(kv_f8x2_to_h2(w.x), kv_f8x2_to_h2(w.x >> 16),
                                                             kv_f8x2_to_h2(w.y), kv_f8x2_to_h2(w.y >> 16));
                /* V rows follow K's: vd = kd + BK * DP */
            }
        } else {
            (void)st;
        }
    };

    /* Q: float32 rows -> 16-bit shared rows (rows past the tile: zero) */
    if (qvec && io == 0) {
        for (int x = tid; x < BQ * (D / 4); x += NT) {
            const int r = x / (D / 4), u = x % (D / 4);
            float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
            if (r < nq) v = __ldg((const float4 *)(q + ((size_t)(row0 + r) * H + h) * D) + u);
            uint2 w = make_uint2(mma_pack<KT>(v.x, v.y), mma_pack<KT>(v.z, v.w));
            *(uint2 *)(Qs + r * DP + u * 4) = w;
        }
    } else {
        for (int x = tid; x < BQ * (D / 2); x += NT) {
            const int r = x / (D / 2), u = x % (D / 2);
            float a = 0.f, b = 0.f;
            if (r < nq) {
                const int64_t i0 = ((int64_t)(row0 + r) * H + h) * D + 2 * u;
                a = a16_ld(q, io, i0), b = a16_ld(q, io, i0 + 1);
            }
            *(uint32_t *)(Qs + r * DP + 2 * u) = mma_pack<KT>(a, b);
        }
    }
    make_slots(0);
    __syncthreads();

    /* this warp's rows */
    const int r0w = 16 * warp;
    const bool wlive = r0w < nq;
    const int wr_hi = min(r0w + 15, nq - 1);
    const int64_t wpos_lo = p_first + r0w, wpos_hi = p_first + wr_hi;
    const int64_t wst_lo = att_start(md, wpos_lo), wst_hi = att_start(md, wpos_hi);
    const bool wpart = r0w + 16 > nq;
    const int ra = r0w + g, rb = r0w + g + 8;
    const int64_t pa = ra < nq ? p_first + ra : -1, pb = rb < nq ? p_first + rb : -1;
    const int64_t sa = att_start(md, pa < 0 ? 0 : pa), sb = att_start(md, pb < 0 ? 0 : pb);

    uint32_t qf[C::QREG ? KD : 1][4];
    const uint32_t q_lane = mma_smem(Qs + (r0w + (lane & 15)) * DP + (lane >> 4) * 8);
    if constexpr (C::QREG) {
#pragma unroll
        for (int kk = 0; kk < KD; kk++) mma_ldsm_x4(qf[kk], q_lane + kk * 32);
    }
    load_tile(0);

    float o[NO][4];
#pragma unroll
    for (int n = 0; n < NO; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.f, l_b = 0.f;
    /* per-lane row offsets of the ldmatrix tiles of K (non-transposed) and V (transposed) */
    const int k_lane = ((lane & 7) + ((lane >> 4) << 3)) * DP + ((lane >> 3) & 1) * 8;
    const int v_lane = (lane & 15) * DP + (lane >> 4) * 8;

    for (int it = 0; it < n_kt; it++) {
        if (it + 1 < n_kt) make_slots(it + 1);
        mma_cp_async_wait<0>();
        __syncthreads(); /* tile it is in; everyone is done with tile it-1's buffers */
        if constexpr (F8) {
            widen_tile(it & 1);
            __syncthreads(); /* the f16 tile is written, the staging buffer free for tile it+1 */
        }
        if (it + 1 < n_kt) load_tile(it + 1);
        const int st = it & 1;
        const int64_t k0 = kstart + (int64_t)it * BK;
        if (!wlive || k0 > wpos_hi || k0 + BK - 1 < wst_lo) continue;
        const bool need_mask = wpart || k0 + BK - 1 > wpos_lo || k0 < wst_hi;

        /* S = Q K^T: 16 rows x BK keys, n-tiles of 8 keys */
        float s[BK / 8][4];
#pragma unroll
        for (int n = 0; n < BK / 8; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
        const uint32_t kb = mma_smem(smem + st * 2 * C::stage) + k_lane * 2;
#pragma unroll
        for (int kk = 0; kk < KD; kk++) {
            uint32_t a[4];
            if constexpr (C::QREG) {
                a[0] = qf[kk][0], a[1] = qf[kk][1], a[2] = qf[kk][2], a[3] = qf[kk][3];
            } else {
                mma_ldsm_x4(a, q_lane + kk * 32);
            }
#pragma unroll
            for (int np = 0; np < BK / 16; np++) {
                uint32_t b[4];
                mma_ldsm_x4(b, kb + (np * 16 * DP + kk * 16) * 2);
                mma_16816<KT>(s[2 * np], a, b[0], b[1]);
                mma_16816<KT>(s[2 * np + 1], a, b[2], b[3]);
            }
        }
        if (need_mask) { /* keys k0 + j, j in [0, BK): a row takes j in [lo, hi] */
            const int hi_a = (int)max((int64_t)-1, min((int64_t)BK, pa - k0));
            const int hi_b = (int)max((int64_t)-1, min((int64_t)BK, pb - k0));
            const int lo_a = (int)max((int64_t)0, min((int64_t)BK, sa - k0));
            const int lo_b = (int)max((int64_t)0, min((int64_t)BK, sb - k0));
#pragma unroll
            for (int n = 0; n < BK / 8; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int j = 8 * n + 2 * c4 + (e & 1);
                    if (e < 2 ? (j > hi_a || j < lo_a) : (j > hi_b || j < lo_b)) s[n][e] = -INFINITY;
                }
        }
        /* online softmax (rows g and g+8 of the warp; a quad of lanes shares a row) */
        float mx_a = -INFINITY, mx_b = -INFINITY;
#pragma unroll
        for (int n = 0; n < BK / 8; n++) {
            mx_a = fmaxf(mx_a, fmaxf(s[n][0], s[n][1]));
            mx_b = fmaxf(mx_b, fmaxf(s[n][2], s[n][3]));
        }
        mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 1));
        mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 2));
        mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 1));
        mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 2));
        const float mn_a = fmaxf(m_a, mx_a), mn_b = fmaxf(m_b, mx_b);
        const float ms_a = mn_a == -INFINITY ? 0.f : mn_a * sl2, ms_b = mn_b == -INFINITY ? 0.f : mn_b * sl2;
        const float corr_a = mma_exp2(m_a * sl2 - ms_a), corr_b = mma_exp2(m_b * sl2 - ms_b);
        const bool rescale = !__all_sync(0xffffffffu, mn_a == m_a && mn_b == m_b); /* else corr is 1 */
        m_a = mn_a, m_b = mn_b;
        float sum_a = 0.f, sum_b = 0.f;
#pragma unroll
        for (int n = 0; n < BK / 8; n++) {
            s[n][0] = mma_exp2(fmaf(s[n][0], sl2, -ms_a));
            s[n][1] = mma_exp2(fmaf(s[n][1], sl2, -ms_a));
            s[n][2] = mma_exp2(fmaf(s[n][2], sl2, -ms_b));
            s[n][3] = mma_exp2(fmaf(s[n][3], sl2, -ms_b));
            sum_a += s[n][0] + s[n][1];
            sum_b += s[n][2] + s[n][3];
        }
        l_a = l_a * corr_a + sum_a;
        l_b = l_b * corr_b + sum_b;
        if (rescale) { /* the running max moved for some row of the warp */
#pragma unroll
            for (int n = 0; n < NO; n++) {
                o[n][0] *= corr_a, o[n][1] *= corr_a;
                o[n][2] *= corr_b, o[n][3] *= corr_b;
            }
        }
        /* O += P V: P (16 x BK) as A fragments of 16 keys */
        const uint32_t vb = mma_smem(smem + (st * 2 + 1) * C::stage) + v_lane * 2;
#pragma unroll
        for (int kk = 0; kk < BK / 16; kk++) {
            uint32_t a[4];
            a[0] = mma_pack<KT>(s[2 * kk][0], s[2 * kk][1]);
            a[1] = mma_pack<KT>(s[2 * kk][2], s[2 * kk][3]);
            a[2] = mma_pack<KT>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            a[3] = mma_pack<KT>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
            for (int dp = 0; dp < D / 16; dp++) {
                uint32_t b[4];
                mma_ldsm_x4_t(b, vb + (kk * 16 * DP + dp * 16) * 2);
                mma_16816<KT>(o[2 * dp], a, b[0], b[1]);
                mma_16816<KT>(o[2 * dp + 1], a, b[2], b[3]);
            }
        }
    }
    /* O / l for the rows of the tile */
    l_a += __shfl_xor_sync(0xffffffffu, l_a, 1);
    l_a += __shfl_xor_sync(0xffffffffu, l_a, 2);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, 1);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, 2);
    if (ra < nq) {
        const float inv = 1.0f / l_a;
        const int64_t i0 = ((int64_t)(row0 + ra) * H + h) * D + 2 * c4;
#pragma unroll
        for (int n = 0; n < NO; n++) a16_st2(out, io, i0 + 8 * n, o[n][0] * inv, o[n][1] * inv);
    }
    if (rb < nq) {
        const float inv = 1.0f / l_b;
        const int64_t i0 = ((int64_t)(row0 + rb) * H + h) * D + 2 * c4;
#pragma unroll
        for (int n = 0; n < NO; n++) a16_st2(out, io, i0 + 8 * n, o[n][2] * inv, o[n][3] * inv);
    }
#else
    (void)out, (void)q, (void)kc, (void)vc, (void)md, (void)tiles, (void)n_tiles, (void)H, (void)Hkv, (void)qvec;
    (void)sl2, (void)io;
    __trap();
#endif
}

/* The head dims the mma kernel is built for, and its warps per block (4; TUNA_ATTN_PF_WARPS=8
 * picks 8 where built, for measurements). 0: not built for D. */
static int mp_warps(int D)
{
    switch (D) {
    case 64: case 80: case 96: case 256: return 4;
    case 128: {
        const char *e = getenv("TUNA_ATTN_PF_WARPS");
        return e && atoi(e) == 8 ? 8 : 4;
    }
    default: return 0;
    }
}

/* Blocks per SM the register allocation aims at for D = 128 with 4 warps (2: ~220 registers;
 * TUNA_ATTN_PF_MINB=3: 168, for measurements; with TUNA_ATTN_PF_BK=32 also tiles of 32 keys). */
static int mp_minb(void)
{
    const char *e = getenv("TUNA_ATTN_PF_MINB");
    return e && atoi(e) == 3 ? 3 : 1;
}
static int mp_bk32(void)
{
    const char *e = getenv("TUNA_ATTN_PF_BK");
    return e && atoi(e) == 32;
}

static size_t mp_smem(int D, int NW, int esz = 2)
{
    if (esz == 1) return mp_smem(D, NW, 2) + (size_t)2 * MP_BK * D; /* FP8: + the staging buffer */
    switch (D) {
    case 64: return mp_cfg<64, 4>::smem;
    case 80: return mp_cfg<80, 4>::smem;
    case 96: return mp_cfg<96, 4>::smem;
    case 128: return NW == 8 ? mp_cfg<128, 8>::smem : mp_cfg<128, 4>::smem;
    case 256: return mp_cfg<256, 4>::smem;
    default: return 0;
    }
}

/* Warps per block of the mma kernel for this head dim, element size (2, or 1: FP8) and the current
 * device; 0 when it does not apply (float32 cache, below sm_80, other head dims, shared memory
 * short). */
static int mp_use(int D, int esz, int max_smem, int cc_major)
{
    if ((esz != 2 && esz != 1) || cc_major < 8) return 0;
    const int nw = mp_warps(D);
    if (!nw || mp_smem(D, nw, esz) > (size_t)max_smem) return 0;
    return nw;
}

template <typename KT, int D, int NW, int MINB, int BK = MP_BK, typename CT = KT>
static void launch_mma(tuna_backend *be, float *out, const float *q, const void *kcache, const void *vcache,
                       const att_meta &md, const int32_t *tiles, int64_t n_tiles, int H, int Hkv, float scale,
                       int io)
{
    using C = mp_cfg<D, NW, BK>;
    const size_t smem = C::smem + (sizeof(CT) == 1 ? (size_t)2 * BK * D : 0); /* FP8: the staging buffer */
    static uint32_t attr_set; /* devices 0..31 whose shared-memory limit is raised */
    const uint32_t bit = be->device >= 0 && be->device < 32 ? 1u << be->device : 0u;
    if (!bit || !(__atomic_load_n(&attr_set, __ATOMIC_RELAXED) & bit)) {
        if (!tuna_cuda_check(be, cudaFuncSetAttribute(k_attn_prefill_mma<KT, D, NW, MINB, BK, CT>,
                                                      cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
                             "cudaFuncSetAttribute(k_attn_prefill_mma)"))
            return;
        __atomic_fetch_or(&attr_set, bit, __ATOMIC_RELAXED);
    }
    const bool qvec = ((uintptr_t)q % 16) == 0;
    const float sl2 = scale * 1.4426950408889634f; /* exp(x) = exp2(x log2 e) */
    k_attn_prefill_mma<KT, D, NW, MINB, BK, CT><<<dim3((unsigned)H, (unsigned)n_tiles), C::NT, smem, be->stream>>>(
        out, q, (const CT *)kcache, (const CT *)vcache, md, tiles, (int)n_tiles, H, Hkv, qvec, sl2, io);
    tuna_cuda_check_launch(be, "k_attn_prefill_mma");
}

/* FP8 cache: f16 operands, the default configuration of each head dim (4 warps, tiles of 64) */
static void launch_mma_f8(tuna_backend *be, float *out, const float *q, const void *kcache, const void *vcache,
                          const att_meta &md, const int32_t *tiles, int64_t n_tiles, int H, int Hkv, int D,
                          float scale, int io)
{
    typedef __nv_fp8_e4m3 F8;
    switch (D) {
    case 64: launch_mma<__half, 64, 4, 1, MP_BK, F8>(be, out, q, kcache, vcache, md, tiles, n_tiles, H, Hkv, scale, io); break;
    case 80: launch_mma<__half, 80, 4, 1, MP_BK, F8>(be, out, q, kcache, vcache, md, tiles, n_tiles, H, Hkv, scale, io); break;
    case 96: launch_mma<__half, 96, 4, 1, MP_BK, F8>(be, out, q, kcache, vcache, md, tiles, n_tiles, H, Hkv, scale, io); break;
    case 128:
        launch_mma<__half, 128, 4, 1, MP_BK, F8>(be, out, q, kcache, vcache, md, tiles, n_tiles, H, Hkv, scale, io);
        break;
    case 256:
        launch_mma<__half, 256, 4, 1, MP_BK, F8>(be, out, q, kcache, vcache, md, tiles, n_tiles, H, Hkv, scale, io);
        break;
    default: tuna_cuda_check(be, cudaErrorInvalidValue, "attention prefill (head dim without an mma kernel)");
    }
}

template <typename KT>
static void launch_mma_d(tuna_backend *be, float *out, const float *q, const void *kcache, const void *vcache,
                         const att_meta &md, const int32_t *tiles, int64_t n_tiles, int H, int Hkv, int D, int NW,
                         float scale, int io)
{
    switch (D) {
    case 64: launch_mma<KT, 64, 4, 1>(be, out, q, kcache, vcache, md, tiles, n_tiles, H, Hkv, scale, io); break;
    case 80: launch_mma<KT, 80, 4, 1>(be, out, q, kcache, vcache, md, tiles, n_tiles, H, Hkv, scale, io); break;
    case 96: launch_mma<KT, 96, 4, 1>(be, out, q, kcache, vcache, md, tiles, n_tiles, H, Hkv, scale, io); break;
    case 128:
        if (NW == 8) launch_mma<KT, 128, 8, 1>(be, out, q, kcache, vcache, md, tiles, n_tiles, H, Hkv, scale, io);
        else if (mp_minb() == 3 && mp_bk32())
            launch_mma<KT, 128, 4, 3, 32>(be, out, q, kcache, vcache, md, tiles, n_tiles, H, Hkv, scale, io);
        else if (mp_minb() == 3) launch_mma<KT, 128, 4, 3>(be, out, q, kcache, vcache, md, tiles, n_tiles, H, Hkv, scale, io);
        else launch_mma<KT, 128, 4, 1>(be, out, q, kcache, vcache, md, tiles, n_tiles, H, Hkv, scale, io);
        break;
    case 256: launch_mma<KT, 256, 4, 1>(be, out, q, kcache, vcache, md, tiles, n_tiles, H, Hkv, scale, io); break;
    default: tuna_cuda_check(be, cudaErrorInvalidValue, "attention prefill (head dim without an mma kernel)");
    }
}

/* The mma kernel's tile height (64 or 128) where it applies (16-bit cache, sm_80+, a head dim it
 * is built for); else the largest BQ in {64, 32, 16} whose shared memory fits the device for
 * today's kernel; 0 when none does. */
int tuna_cuda_attn_prefill_bq(int D, int esz, int max_smem, int cc_major)
{
    const int nw = mp_use(D, esz, max_smem, cc_major);
    if (esz == 1) return nw == 4 ? 64 : 0; /* FP8: the mma kernel with 4 warps, or none */
    if (nw) return 16 * nw;
    for (int bq = 64; bq >= 16; bq /= 2)
        if (pf_make_layout(D, bq, esz).total <= (size_t)max_smem) return bq;
    return 0;
}

template <typename KT>
static void launch_prefill(tuna_backend *be, float *out, const float *q, const void *kcache, const void *vcache,
                           const att_meta &md, const int32_t *tiles, int64_t n_tiles, int H, int Hkv, int D, int BQ,
                           bool vec, float scale, int io)
{
    const size_t smem = pf_make_layout(D, BQ, (int)sizeof(KT)).total;
    if (!tuna_cuda_check(be, cudaFuncSetAttribute(k_attn_prefill<KT>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                  (int)smem),
                         "cudaFuncSetAttribute(k_attn_prefill)"))
        return;
    k_attn_prefill<KT><<<dim3((unsigned)n_tiles, (unsigned)H), PF_THREADS, smem, be->stream>>>(
        out, q, (const KT *)kcache, (const KT *)vcache, md, tiles, H, Hkv, D, BQ, vec, scale, io);
    tuna_cuda_check_launch(be, "k_attn_prefill");
}

void tuna_cuda_attn_prefill_launch(tuna_backend *be, int code, float *out, const float *q, const void *kcache,
                                   const void *vcache, const att_meta &md, const int32_t *tiles, int64_t n_tiles,
                                   int H, int Hkv, int D, int BQ, bool vec, float scale, int io)
{
    if (n_tiles <= 0 || be->sticky) return;
    const int max_smem = be->max_smem_optin;
    if (code == KV_CODE_F8) {
        if (BQ == 64 && vec && ((uintptr_t)out % (io ? 4 : 8)) == 0 && n_tiles <= 65535 && mp_use(D, 1, max_smem, be->cc_major))
            launch_mma_f8(be, out, q, kcache, vcache, md, tiles, n_tiles, H, Hkv, D, scale, io);
        else
            tuna_cuda_check(be, cudaErrorInvalidValue,
                            "attention prefill (fp8 KV cache: only the tensor-core kernel reads it, and it does not "
                            "apply here)");
        return;
    }
    const int nw = code != 0 ? mp_use(D, 2, max_smem, be->cc_major) : 0;
    if (nw && BQ == 16 * nw && vec && ((uintptr_t)out % (io ? 4 : 8)) == 0 && n_tiles <= 65535) {
        if (code == 1)
            launch_mma_d<__nv_bfloat16>(be, out, q, kcache, vcache, md, tiles, n_tiles, H, Hkv, D, nw, scale, io);
        else
            launch_mma_d<__half>(be, out, q, kcache, vcache, md, tiles, n_tiles, H, Hkv, D, nw, scale, io);
        return;
    }
    /* today's kernel: float32, older GPUs, other head dims, K/V rows not 16-byte aligned */
    if (pf_make_layout(D, BQ, code == 0 ? 4 : 2).total > (size_t)max_smem) {
        tuna_cuda_check(be, cudaErrorInvalidValue,
                        "attention prefill (K/V or output rows not aligned for the tensor-core kernel, and this tile "
                        "height does not fit the other one)");
        return;
    }
    if (code == 0)
        launch_prefill<float>(be, out, q, kcache, vcache, md, tiles, n_tiles, H, Hkv, D, BQ, vec, scale, io);
    else if (code == 1)
        launch_prefill<__nv_bfloat16>(be, out, q, kcache, vcache, md, tiles, n_tiles, H, Hkv, D, BQ, vec, scale, io);
    else
        launch_prefill<__half>(be, out, q, kcache, vcache, md, tiles, n_tiles, H, Hkv, D, BQ, vec, scale, io);
}
