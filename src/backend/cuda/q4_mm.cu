/* q4_mm.cu — k_q4_mm: the 4-bit GEMM for decode batches past the GEMVs (twenty-first session): y =
 * x W^T (+ bias) for 9 to TUNA_Q4_MM_MAXT (default 128) tokens, reading each 4-bit weight once per
 * launch of up to 128 tokens, where the path before dequantized the whole matrix to 16 bits every
 * step for cuBLAS (the issue's "never a dequantize-every-step of the whole matrix"; H100, twentieth session: NF4
 * decode at batch 32 19.5 ms/step against bf16's 8.3; thirty-fourth session, 65-128 tokens in one
 * launch of 16 token groups: batch 128 17.3 against 23.3 ms/step, batch 96 15.7 against 21.9).
 *
 * Layout. A block is 4 warps; warp w takes the 16 rows 16 (4 b + w) .. + 15 of W (the A rows of
 * mma.m16n8k16, f16 or bf16 in, float32 accumulate) and all the launch's tokens (B columns, 8 per
 * MMA). K goes in steps of 128 weights: lane (g = lane / 4, t = lane % 4) loads 16 bytes of codes
 * of rows g and g + 8 (weights 32 t .. 32 t + 31 of the step; k_q4_tc's mapping: MMA m's k slots
 * (2t, 2t + 1, 2t + 8, 2t + 9) are the lane's weights 4m .. 4m + 3) and turns each byte into the
 * dequantized pair the prefill path writes (q4_round(lut[c] * absmax), rounded to the compute
 * type: the same 16-bit weights as k_dequant_q4_vec): a nibble is a byte offset into the 4-bit
 * table (one prmt), its value one table load and one multiply, and the pair one pack that rounds
 * both (the weights' own rounding first only where it is not the compute type's; twenty-second
 * session: that took the batch-32 step from 10.9 to 8.9 ms). x, already in the compute type (the
 * activations cuBLAS would read, be->half), goes through a ring of 3-6 steps in shared memory by
 * cp.async: a step is [tokens][128] 16-bit values, 16-byte pieces swizzled so that the 8 lanes of
 * a quarter-warp (two tokens, four pieces each) hit different banks. One barrier per step.
 * Where the row blocks alone would not fill the GPU, K is split over S blocks and k_q4_mm_sum adds
 * their sums.
 *
 * The numerics are those of the dequantize + cuBLAS path (the same 16-bit operands, float32 sums),
 * in another order of addition. Needs 16-bit compute (prefill dtype bf16 or f16), K % 128 == 0,
 * blocksize >= 32, 16-byte aligned codes, N * K < 2^31, compute capability 8.0+; otherwise the
 * caller dequantizes as before. */
#include <stdlib.h>

#include "backend/cuda/cuda_internal.h"
#include "backend/cuda/gemv.cuh"
#include "backend/cuda/mma.cuh"
#include "backend/cuda/pdl.cuh"

#define Q4MM_WARPS 4
#define Q4MM_ROWS (16 * Q4MM_WARPS)
#define Q4MM_MAXTOK 128 /* tokens per launch (16 B column groups) */
#define Q4MM_DEFAULT_MAXT 128

/* The 16-byte piece c (0..15) of token row n of a step, swizzled: lanes (g, t) and (g + 1, t) read
 * pieces 4 t + p of rows 8 j + g, 8 j + g + 1; these 8 land in 8 different bank groups. */
static __device__ __forceinline__ uint32_t q4mm_piece(uint32_t n, uint32_t c)
{
    return n * 256u + ((c ^ ((c >> 3) & 1u) ^ ((n & 1u) << 1)) << 4);
}

/* The 4-bit table (floats), static: its shared-memory address is known when the kernel is
 * compiled, so a table load needs only the byte offset from q4mm_pair in a register. */
__shared__ float q4mm_slut[16];

/* The dequantized pair of byte b of a code word (first weight in the high nibble), in the compute
 * type, from the word's nibbles as table byte offsets: hi4 = (w >> 2) & 0x3c3c3c3c (byte b: its high
 * nibble * 4), lo4 = (w << 2) & 0x3c3c3c3c. A byte offset is one prmt, the value one table load and
 * one multiply. RND: the weights' own rounding (mode) first, where it is not the compute type's. */
template <typename T16, bool RND>
static __device__ __forceinline__ uint32_t q4mm_pair(uint32_t hi4, uint32_t lo4, int b, float am, int mode)
{
    const uint32_t oh = __byte_perm(hi4, 0u, 0x4440u | (uint32_t)b), ol = __byte_perm(lo4, 0u, 0x4440u | (uint32_t)b);
    const float vh = *reinterpret_cast<const float *>(reinterpret_cast<const uint8_t *>(q4mm_slut) + oh) * am;
    const float vl = *reinterpret_cast<const float *>(reinterpret_cast<const uint8_t *>(q4mm_slut) + ol) * am;
    if (RND) return mma_pack<T16>(q4_round(vh, mode), q4_round(vl, mode));
    return mma_pack<T16>(vh, vl); /* round to nearest even once: what q4_round then the pack give */
}

struct q4mm_stage {
    uint4 c[2];    /* the lane's codes of rows g, g + 8 */
    float a[2];    /* their block's float32 absmax, or its nested absmax */
    uint32_t q[2]; /* nested: the block's 8-bit code (looked up at use: no load waits on another) */
};

/* Dynamic shared memory of a launch: the x ring [RING][8 TG][256 bytes], the nested code table [256]
 * (floats); the 4-bit table is q4mm_slut. */
static __host__ __device__ constexpr size_t q4mm_smem(int ring, int tg)
{
    return (size_t)ring * 8 * tg * 256 + 256 * sizeof(float);
}

/* A warp's rows r0 and r0 + 8 of W (clamped: rows past N are read again, not stored) over the block's
 * split of K (gridDim.y > 1: steps ks0 .. ks0 + nsteps - 1 of 128 weights, its sums into part
 * [split][nt][N]); per row the lane's 16 bytes of step s at uint4 index (row K + 128 s) / 32 + t, and
 * their scales. Shared by k_q4_mm and k_q4_wg. */
struct q4mm_rows {
    const uint4 *wp[2];
    uint32_t e0[2];
    int ks0, nsteps;
};

static __device__ __forceinline__ struct q4mm_rows q4mm_rows_at(const uint8_t *W, int r0, int N, int K, int t)
{
    struct q4mm_rows w;
    w.ks0 = (int)(blockIdx.y * (K / 128) / gridDim.y);
    w.nsteps = (int)((blockIdx.y + 1) * (K / 128) / gridDim.y) - w.ks0;
    const int row[2] = {r0 < N ? r0 : N - 1, r0 + 8 < N ? r0 + 8 : N - 1};
#pragma unroll
    for (int r = 0; r < 2; r++) {
        w.e0[r] = (uint32_t)row[r] * (uint32_t)K + 32u * (uint32_t)t;
        w.wp[r] = reinterpret_cast<const uint4 *>(W) + w.e0[r] / 32u;
    }
    return w;
}

/* Step s of the rows' codes and scales into st (nothing past the split's last step). */
template <bool NESTED>
static __device__ __forceinline__ void q4mm_load(const struct q4mm_rows &w, const struct q4_scales &sc, int bs_shift,
                                                 struct q4mm_stage &st, int s)
{
    if (s >= w.nsteps) return;
#pragma unroll
    for (int r = 0; r < 2; r++) {
        st.c[r] = __ldg(w.wp[r] + 4 * (w.ks0 + s));
        const uint32_t b = (w.e0[r] + 128u * (uint32_t)(w.ks0 + s)) >> bs_shift;
        if (NESTED) {
            st.q[r] = __ldg(sc.q + b);
            st.a[r] = __ldg(sc.nabs + (b >> sc.nshift));
        } else {
            st.a[r] = __ldg(sc.absmax + b);
        }
    }
}

/* The block's 4-bit table and, nested, its code table [256], by its NT threads. */
template <bool NESTED, int NT>
static __device__ __forceinline__ void q4mm_tables(const struct q4_lut &lut, const struct q4_scales &sc, float *ncode)
{
    if (threadIdx.x < 16) q4mm_slut[threadIdx.x] = lut.v[threadIdx.x];
    if (NESTED)
        for (int i = threadIdx.x; i < 256; i += NT)
            ncode[i] = __ldg(sc.ncode + i);
}

/* A step's two absmax (rows g, g + 8), the nested ones decoded. */
template <bool NESTED>
static __device__ __forceinline__ void q4mm_absmax(const struct q4mm_stage &cur, const float *ncode,
                                                   const struct q4_scales &sc, float (&am)[2])
{
#pragma unroll
    for (int r = 0; r < 2; r++)
        am[r] = NESTED ? q4_nested(ncode[cur.q[r]], cur.a[r], sc.noff) : cur.a[r];
}

/* The A fragments of MMAs 2p (a0: bytes 0, 1 of word p of the codes) and 2p + 1 (a1: bytes 2, 3), rows g
 * and g + 8, each weight scaled by its row's absmax. */
template <typename T16, bool RND>
static __device__ __forceinline__ void q4mm_frags(const struct q4mm_stage &cur, const float (&am)[2], int p, int mode,
                                                  uint32_t (&a0)[4], uint32_t (&a1)[4])
{
    const uint32_t wg = p == 0 ? cur.c[0].x : p == 1 ? cur.c[0].y : p == 2 ? cur.c[0].z : cur.c[0].w;
    const uint32_t wh = p == 0 ? cur.c[1].x : p == 1 ? cur.c[1].y : p == 2 ? cur.c[1].z : cur.c[1].w;
    const uint32_t gh = (wg >> 2) & 0x3c3c3c3cu, gl = (wg << 2) & 0x3c3c3c3cu;
    const uint32_t hh = (wh >> 2) & 0x3c3c3c3cu, hl = (wh << 2) & 0x3c3c3c3cu;
    a0[0] = q4mm_pair<T16, RND>(gh, gl, 0, am[0], mode);
    a0[1] = q4mm_pair<T16, RND>(hh, hl, 0, am[1], mode);
    a0[2] = q4mm_pair<T16, RND>(gh, gl, 1, am[0], mode);
    a0[3] = q4mm_pair<T16, RND>(hh, hl, 1, am[1], mode);
    a1[0] = q4mm_pair<T16, RND>(gh, gl, 2, am[0], mode);
    a1[1] = q4mm_pair<T16, RND>(hh, hl, 2, am[1], mode);
    a1[2] = q4mm_pair<T16, RND>(gh, gl, 3, am[0], mode);
    a1[3] = q4mm_pair<T16, RND>(hh, hl, 3, am[1], mode);
}

/* RING: x steps in shared memory (RING - 1 in flight); D: weight steps in registers; RND: see
 * q4mm_pair. */
template <typename T16, int TG, int RING, int D, bool NESTED, bool RND>
__global__ void __launch_bounds__(Q4MM_WARPS * 32, TG <= 4   ? 4
                                                   : TG <= 8 ? 3
                                                             : 2) /* the blocks per SM shared memory allows */
    k_q4_mm(float *y, const T16 *__restrict__ xh, const uint8_t *__restrict__ W, const struct q4_scales sc,
            const float *__restrict__ bias, const struct q4_lut lut, int mode, int bs_shift, int N, int K, int tok0,
            int nt, int accumulate, float *part)
{
    extern __shared__ __align__(128) uint8_t q4mm_xs[]; /* see q4mm_smem */
    float *ncode = reinterpret_cast<float *>(q4mm_xs + (size_t)RING * 8 * TG * 256);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int r0 = (blockIdx.x * Q4MM_WARPS + warp) * 16 + g;
    const struct q4mm_rows wr = q4mm_rows_at(W, r0, N, K, t);
    const int ks0 = wr.ks0, nsteps = wr.nsteps;
    q4mm_tables<NESTED, Q4MM_WARPS * 32>(lut, sc, ncode);
    auto load = [&](struct q4mm_stage &st, int s) { q4mm_load<NESTED>(wr, sc, bs_shift, st, s); };
    struct q4mm_stage st[D];
#pragma unroll
    for (int u = 0; u < D; u++)
        load(st[u], u);
    tuna_pdl_wait(); /* x is the previous kernel's output, y may be read by it */
    tuna_pdl_trigger();

    /* x: step s's [nt][128] values into ring slot s % RING (pieces of rows past nt are not written:
     * their B columns give outputs that are not stored) */
    const int npieces = nt * 16;
    int wslot = 0; /* the ring slot of the next step staged: (step) % RING */
    auto stage_x = [&](int s) {
        if (s < nsteps) {
            uint8_t *dst = q4mm_xs + wslot * (8 * TG * 256);
            for (int i = threadIdx.x; i < npieces; i += Q4MM_WARPS * 32) {
                const int n = i >> 4, c = i & 15;
                const T16 *src = xh + (int64_t)(tok0 + n) * K + 128 * (ks0 + s) + 8 * c;
                mma_cp_async16(dst + q4mm_piece((uint32_t)n, (uint32_t)c), src, true);
            }
        }
        mma_cp_async_commit(); /* one group per step, empty or not */
        wslot = wslot == RING - 1 ? 0 : wslot + 1;
    };
#pragma unroll
    for (int s = 0; s < RING - 1; s++)
        stage_x(s);

    float acc[TG][4];
#pragma unroll
    for (int j = 0; j < TG; j++)
        acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
    /* the lane's x pieces in a slot: piece 4 t + p of token 8 j + g at xoff[p] + 2048 j (q4mm_piece:
     * token 8 j + g has g's parity) */
    uint32_t xoff[4];
#pragma unroll
    for (int p = 0; p < 4; p++)
        xoff[p] = q4mm_piece((uint32_t)g, 4u * (uint32_t)t + (uint32_t)p);
    int rslot = 0; /* the slot of step s */
    for (int s0 = 0; s0 < nsteps; s0 += D) {
#pragma unroll
        for (int u = 0; u < D; u++) {
            const int s = s0 + u;
            if (s >= nsteps) break;
            mma_cp_async_wait<RING - 2>(); /* step s is in (the RING - 2 after it may still be on their way) */
            __syncthreads();               /* ... for every thread; and step s - 1's slot is free */
            stage_x(s + RING - 1);
            const uint8_t *xs = q4mm_xs + rslot * (8 * TG * 256);
            rslot = rslot == RING - 1 ? 0 : rslot + 1;
            const struct q4mm_stage cur = st[u];
            load(st[u], s + D);
            float am[2];
            q4mm_absmax<NESTED>(cur, ncode, sc, am);
            /* word p of the codes: MMAs 2p (bytes 0, 1) and 2p + 1 (bytes 2, 3), against x piece
             * 4t + p of every token group (its halves .x .y and .z .w) */
#pragma unroll
            for (int p = 0; p < 4; p++) {
                uint32_t a[2][4];
                q4mm_frags<T16, RND>(cur, am, p, mode, a[0], a[1]);
#pragma unroll
                for (int j = 0; j < TG; j++) {
                    const uint4 xv = *reinterpret_cast<const uint4 *>(xs + xoff[p] + 2048u * (uint32_t)j);
                    mma_16816<T16>(acc[j], a[0], xv.x, xv.y);
                    mma_16816<T16>(acc[j], a[1], xv.z, xv.w);
                }
            }
        }
    }
    /* D fragment: acc[j][0, 1] row g, tokens 8 j + 2 t, + 1; acc[j][2, 3] row g + 8 */
#pragma unroll
    for (int j = 0; j < TG; j++)
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int tok = 8 * j + 2 * t + (i & 1), n = r0 + 8 * (i >> 1);
            if (tok >= nt || n >= N) continue;
            if (gridDim.y > 1) {
                part[((int64_t)blockIdx.y * nt + tok) * N + n] = acc[j][i];
                continue;
            }
            float *yp = y + (int64_t)(tok0 + tok) * N + n;
            const float v = acc[j][i] + (bias ? bias[n] : 0.0f);
            *yp = accumulate ? *yp + v : v;
        }
}

/* The split-K launches' sums in split order, + bias, into y (or onto it): part [S][nt][N]. */
__global__ void k_q4_mm_sum(float *y, const float *__restrict__ part, const float *__restrict__ bias, int S, int N,
                            int tok0, int nt, int accumulate)
{
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x, n = i % N;
    tuna_pdl_wait();
    tuna_pdl_trigger();
    if (i >= (int64_t)nt * N) return;
    float v = 0.0f;
    for (int sp = 0; sp < S; sp++)
        v += part[(int64_t)sp * nt * N + i];
    v += bias ? bias[n] : 0.0f;
    float *yp = y + (int64_t)tok0 * N + i;
    *yp = accumulate ? *yp + v : v;
}

/* ---- k_q4_wg: 65-128 tokens on Hopper's warpgroup MMA (sm_90a; thirty-fourth session) ----
 * k_q4_mm's mma.sync reads each token group's 16-bit x from shared memory once per warp and 16 rows:
 * at 128 tokens that is 16 bytes of shared memory per weight, and with 64 rows per block the x
 * steps staged from L2 weigh 8 times the weights. wgmma m64n128k16 takes the same dequantized A
 * fragments from registers (warp w of a warpgroup: rows 16 w .. 16 w + 15, mma.m16n8k16's A layout)
 * and all 128 tokens of B from shared memory once per warpgroup, and the block's Q4WG_NWG warpgroups
 * share one x ring. The lane's weights sit in k_q4_mm's k slots (MMA m, slots 2t, 2t+1, 2t+8, 2t+9 = the
 * lane's weights 32 t + 4 m + 0..3), so x is staged in that order: q4wg_perm writes be->half with
 * each 128-weight block of every token permuted (position 16 m + kappa holds weight 32 t + 4 m + j,
 * kappa = 2 t + (j & 1) + 8 (j >> 1)), and a step of x is [16 chunks of 8][128 tokens][16 bytes]
 * in shared memory: core matrices of 8 tokens x 16 bytes, no swizzle, the next chunk (K) 2,048 bytes
 * on (LBO), the next 8 tokens (N) 128 bytes on (SBO; the pair swapped fails test_cuda_fused). Ring:
 * Q4WG_RING slots, x staged Q4WG_RING - 2 steps ahead. A step's 8 MMAs are issued together once all their inputs (A,
 * the descriptors) are final and waited for (wgmma.wait_group 0) at the next step's start, before its A is dequantized:
 * with a second A buffer dequantized while they run (wait_group 1), ptxas serialized every wgmma (its C7513: other
 * instructions define a wgmma's inputs inside the pipeline stage).
 * The numerics are k_q4_mm's: the same 16-bit operands, float32 sums (test_cuda_fused: against the
 * dequantize + cuBLAS path within 1e-5, as k_q4_mm).
 * Measured (H100, thirty-fourth session, NF4 Llama-3-8B decode at a 512-token context, TUNA_Q4_WG=1):
 * batch 128 20.1 ms/step with 2 warpgroups per block (24.6 with 1 and 3 slots, two blocks per SM) against
 * k_q4_mm's 17.3; the MMAs
 * are not the limit (serialized, 19.8), the dequantization between the barriers is: each step's A is
 * made while no MMA runs. So it is off by default: a tested base (descriptors, the permuted x) for a
 * form whose dequantizing warps feed the MMAs through shared memory. */
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define TUNA_WGMMA 1
#else
#define TUNA_WGMMA 0
#endif

#define Q4WG_TOK 128               /* tokens per launch: B's N */
#define Q4WG_SLOT (Q4WG_TOK * 256) /* bytes of one step of x in shared memory */
#define Q4WG_NWG 2                 /* warpgroups per block, 64 rows each (one block per SM) */
#define Q4WG_RING 6                /* x steps in shared memory */
#define Q4WG_LBO (Q4WG_TOK * 16)   /* bytes from a core matrix to the next 8 weights (K) of its tokens */
#define Q4WG_SBO 128               /* bytes from a core matrix to the next 8 tokens (N) */
#define Q4WG_SMEM ((size_t)Q4WG_RING * Q4WG_SLOT + 256 * sizeof(float))

/* The wgmma helpers, in the sm_90a device pass only (k_q4_wg's body is empty elsewhere). */
#if TUNA_WGMMA
/* The shared-memory matrix descriptor of the x tile at addr: Q4WG_LBO, Q4WG_SBO, no swizzle. */
static __device__ __forceinline__ uint64_t q4wg_desc(uint32_t addr)
{
    return (uint64_t)((addr >> 4) & 0x3FFFu) | ((uint64_t)((Q4WG_LBO >> 4) & 0x3FFFu) << 16) |
           ((uint64_t)((Q4WG_SBO >> 4) & 0x3FFFu) << 32);
}

static __device__ __forceinline__ void q4wg_fence()
{
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}

static __device__ __forceinline__ void q4wg_commit()
{
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}

template <int N> static __device__ __forceinline__ void q4wg_wait()
{
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

/* Keeps the compiler from moving the computation of r past this point (and from touching r with its
 * own moves while a wgmma may read it): every A register is final before the wgmma.fence. */
static __device__ __forceinline__ void q4wg_pin(uint32_t &r)
{
    asm volatile("" : "+r"(r)::"memory");
}

/* d (64 rows x 128 tokens over the warpgroup, mma.m16n8k16's D layout per 8 tokens: d[4 j + i]) +=
 * A (registers) x B (the descriptor's 128 tokens x 16 k); TY the PTX type of A and B. */
#define Q4WG_MMA(TY, d, a, desc)                                                                                       \
    asm volatile("{\n"                                                                                                 \
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " " Q4WG_DREGS                               \
                 "{%64, %65, %66, %67}, %68, 1, 1, 1, 0;\n}\n"                                                         \
                 : Q4WG_DOPS(d)                                                                                        \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc))
#define Q4WG_DREGS                                                                                                     \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, "       \
    "%23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, "   \
    "%45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
#define Q4WG_DOPS(d)                                                                                                   \
    "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),        \
        "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),         \
        "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),        \
        "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]),        \
        "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]),        \
        "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),        \
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]),        \
        "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])

template <typename T16>
static __device__ __forceinline__ void q4wg_mma(float (&d)[64], const uint32_t (&a)[4], uint64_t desc);

template <>
__device__ __forceinline__ void q4wg_mma<__nv_bfloat16>(float (&d)[64], const uint32_t (&a)[4], uint64_t desc)
{
    Q4WG_MMA("bf16", d, a, desc);
}

template <> __device__ __forceinline__ void q4wg_mma<__half>(float (&d)[64], const uint32_t (&a)[4], uint64_t desc)
{
    Q4WG_MMA("f16", d, a, desc);
}
#endif

/* tuna_cuda_to_half's rounding (k_to_bf16, k_to_f16). */
template <typename T16> static __device__ __forceinline__ T16 q4wg_round(float v);
template <> __device__ __forceinline__ __nv_bfloat16 q4wg_round<__nv_bfloat16>(float v)
{
    return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ __half q4wg_round<__half>(float v)
{
    return __float2half_rn(v);
}

/* be->half for k_q4_wg: x [n] (rows of K, K % 128 == 0) rounded to T16, each 128-weight block permuted
 * as the header says. */
template <typename T16> __global__ void k_q4wg_perm(T16 *out, const float *__restrict__ x, int64_t n)
{
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int q = (int)(i & 127), m = q >> 4, kap = q & 15, t = (kap & 7) >> 1, j = (kap & 1) | ((kap >> 3) << 1);
    const float v = x[(i - q) + 32 * t + 4 * m + j];
    out[i] = q4wg_round<T16>(v);
}

/* 1 when this binary's code for the device has the wgmma path (an sm_90a build on a 9.0 GPU). */
__global__ void k_q4wg_probe(int *out)
{
    *out = TUNA_WGMMA;
}

template <typename T16, bool NESTED, bool RND>
__global__ void __launch_bounds__(Q4WG_NWG * 128, 1)
    k_q4_wg(float *y, const T16 *__restrict__ xp, const uint8_t *__restrict__ W, const struct q4_scales sc,
            const float *__restrict__ bias, const struct q4_lut lut, int mode, int bs_shift, int N, int K, int tok0,
            int nt, int accumulate, float *part)
{
#if TUNA_WGMMA
    constexpr int RING = Q4WG_RING, NWG = Q4WG_NWG, D = 2; /* D: weight steps in registers */
    extern __shared__ __align__(128) uint8_t q4wg_xs[];    /* [RING][Q4WG_SLOT], then the nested code table */
    float *ncode = reinterpret_cast<float *>(q4wg_xs + (size_t)RING * Q4WG_SLOT);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int r0 = (blockIdx.x * NWG * 4 + warp) * 16 + g;
    const struct q4mm_rows wr = q4mm_rows_at(W, r0, N, K, t);
    const int ks0 = wr.ks0, nsteps = wr.nsteps;
    q4mm_tables<NESTED, NWG * 128>(lut, sc, ncode);
    auto load = [&](struct q4mm_stage &st, int s) { q4mm_load<NESTED>(wr, sc, bs_shift, st, s); };
    struct q4mm_stage st[D];
#pragma unroll
    for (int u = 0; u < D; u++) {
        st[u].q[0] = st[u].q[1] = 0u;
        st[u].a[0] = st[u].a[1] = 0.0f;
        load(st[u], u);
    }
    tuna_pdl_wait(); /* x is the previous kernel's output, y may be read by it */
    tuna_pdl_trigger();

    const uint32_t xs0 = mma_smem(q4wg_xs);
    /* step s of x into slot s % RING: piece i = (chunk high bits, token, chunk low bit), so a warp reads
     * 32 contiguous bytes per token and writes whole core matrices; tokens past nt are not written
     * (their columns give outputs that are not stored) */
    auto stage_x = [&](int s) {
        if (s < nsteps) {
            uint8_t *dst = q4wg_xs + (s % RING) * Q4WG_SLOT;
            const T16 *src = xp + (int64_t)tok0 * K + 128 * (ks0 + s);
            for (int i = threadIdx.x; i < 16 * Q4WG_TOK; i += NWG * 128) {
                const int n = (i >> 1) & (Q4WG_TOK - 1), c = ((i >> 8) << 1) | (i & 1);
                if (n < nt) mma_cp_async16(dst + c * (Q4WG_TOK * 16) + n * 16, src + (int64_t)n * K + 8 * c, true);
            }
        }
        mma_cp_async_commit(); /* one group per step, empty or not */
    };
#pragma unroll
    for (int s = 0; s < RING - 2; s++)
        stage_x(s);

    float acc[64];
#pragma unroll
    for (int i = 0; i < 64; i++)
        acc[i] = 0.0f;
    uint32_t a[8][4]; /* the step's A fragments, MMA m = 0..7 */
    for (int s0 = 0; s0 < nsteps; s0 += D) {
#pragma unroll
        for (int u = 0; u < D; u++) {
            const int s = s0 + u;
            if (s >= nsteps) break;
            q4wg_wait<0>();                /* the step before's MMAs are done (a and slot (s - 2) % RING free) */
            mma_cp_async_wait<RING - 3>(); /* step s's x is in (this thread's copies) */
            asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); /* ... and visible to the wgmmas */
            __syncthreads();
            stage_x(s + RING - 2);
            const struct q4mm_stage cur = st[u];
            load(st[u], s + D);
            float am[2];
            q4mm_absmax<NESTED>(cur, ncode, sc, am);
#pragma unroll
            for (int p = 0; p < 4; p++)
                q4mm_frags<T16, RND>(cur, am, p, mode, a[2 * p], a[2 * p + 1]);
            /* every input of the 8 MMAs (A, the descriptors) is final before the fence: ptxas serializes
             * wgmmas whose inputs other instructions define between them (its C7513) */
            const uint32_t sb = xs0 + (uint32_t)(s % RING) * Q4WG_SLOT;
            uint64_t dsc[8];
#pragma unroll
            for (int m = 0; m < 8; m++) {
                dsc[m] = q4wg_desc(sb + (uint32_t)m * 2u * Q4WG_LBO);
                asm volatile("" : "+l"(dsc[m])::"memory");
#pragma unroll
                for (int i = 0; i < 4; i++)
                    q4wg_pin(a[m][i]);
            }
            q4wg_fence();
#pragma unroll
            for (int m = 0; m < 8; m++)
                q4wg_mma<T16>(acc, a[m], dsc[m]);
            q4wg_commit();
        }
    }
    q4wg_wait<0>();
#pragma unroll
    for (int j = 0; j < 16; j++)
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int tok = 8 * j + 2 * t + (i & 1), n = r0 + 8 * (i >> 1);
            if (tok >= nt || n >= N) continue;
            if (gridDim.y > 1) {
                part[((int64_t)blockIdx.y * nt + tok) * N + n] = acc[4 * j + i];
                continue;
            }
            float *yp = y + (int64_t)(tok0 + tok) * N + n;
            const float v = acc[4 * j + i] + (bias ? bias[n] : 0.0f);
            *yp = accumulate ? *yp + v : v;
        }
#else
    (void)y, (void)xp, (void)W, (void)sc, (void)bias, (void)lut, (void)mode, (void)bs_shift, (void)N, (void)K;
    (void)tok0, (void)nt, (void)accumulate, (void)part;
#endif
}

static long g_q4mm_launches, g_q4wg_launches;

extern "C" long tuna_cuda_q4_mm_launches(void)
{
    return g_q4mm_launches;
}

extern "C" long tuna_cuda_q4_wg_launches(void)
{
    return g_q4wg_launches;
}

/* Read at every call (a getenv per 4-bit GEMM; graphs capture once) so tests can compare the paths. */
extern "C" int tuna_cuda_q4_mm_max_t(void)
{
    const char *e = getenv("TUNA_Q4_MM_MAXT");
    const int n = e && *e ? atoi(e) : -1;
    return n >= 0 && n <= 65536 ? n : Q4MM_DEFAULT_MAXT;
}

/* The round_mode whose rounding the compute type's pack performs (q4_round's 1 bf16, 2 f16). */
template <typename T16> static constexpr int q4mm_own_mode();
template <> constexpr int q4mm_own_mode<__nv_bfloat16>()
{
    return 1;
}
template <> constexpr int q4mm_own_mode<__half>()
{
    return 2;
}

/* Whether the kernels round the weights themselves (their RND form): not when the pack's own rounding
 * is the weights' (round_mode names the compute type) or there is none (0). */
template <typename T16> static bool q4mm_rnd(int mode)
{
    return !(mode == 0 || mode == q4mm_own_mode<T16>());
}

/* Up to 32 tokens: 6 x steps (of 4 or 8 KB) in shared memory, 4 weight steps in registers; 64: 4 of
 * 16 KB, 3; 128: 3 of 32 KB, 2 (two blocks per SM). */
template <typename T16, int TG>
static bool q4mm_launch(tuna_backend *be, float *y, const T16 *xh, const struct tuna_weight *w,
                        const struct tuna_cuda_q4 *q, const float *bias, int bs_shift, int tok0, int nt, bool acc,
                        int S, float *part)
{
    constexpr int RING = TG <= 4 ? 6 : TG <= 8 ? 4 : 3, D = TG <= 4 ? 4 : TG <= 8 ? 3 : 2;
    struct q4_lut lut;
    memcpy(lut.v, q->lut, sizeof lut.v);
    const int N = (int)w->rows, K = (int)w->cols;
    const dim3 grid((unsigned)((N + Q4MM_ROWS - 1) / Q4MM_ROWS), (unsigned)S), block(Q4MM_WARPS * 32);
    const size_t smem = q4mm_smem(RING, TG);
    const struct q4_scales sc = q4_scales_of(q);
    const int mode = q->round_mode;
    const bool rnd = q4mm_rnd<T16>(mode);
    void (*fn)(float *, const T16 *, const uint8_t *, const struct q4_scales, const float *, const struct q4_lut, int,
               int, int, int, int, int, int, float *);
    if (sc.absmax)
        fn = rnd ? k_q4_mm<T16, TG, RING, D, false, true> : k_q4_mm<T16, TG, RING, D, false, false>;
    else
        fn = rnd ? k_q4_mm<T16, TG, RING, D, true, true> : k_q4_mm<T16, TG, RING, D, true, false>;
    g_q4mm_launches++;
    return tuna_cuda_launch(be, "k_q4_mm", fn, grid, block, smem, y, xh, (const uint8_t *)w->data, sc, bias, lut, mode,
                            bs_shift, N, K, tok0, nt, acc ? 1 : 0, part);
}

/* Token groups of 8 for nt tokens: 2, 4, 8 or 16. */
static int q4mm_tg(int nt)
{
    return nt <= 16 ? 2 : nt <= 32 ? 4 : nt <= 64 ? 8 : 16;
}

template <typename T16>
static bool q4mm_launch_tg(tuna_backend *be, float *y, const T16 *xh, const struct tuna_weight *w,
                           const struct tuna_cuda_q4 *q, const float *bias, int bs_shift, int tok0, int nt, bool acc,
                           int S, float *part)
{
    const int tg = q4mm_tg(nt);
    if (tg == 2) return q4mm_launch<T16, 2>(be, y, xh, w, q, bias, bs_shift, tok0, nt, acc, S, part);
    if (tg == 4) return q4mm_launch<T16, 4>(be, y, xh, w, q, bias, bs_shift, tok0, nt, acc, S, part);
    if (tg == 8) return q4mm_launch<T16, 8>(be, y, xh, w, q, bias, bs_shift, tok0, nt, acc, S, part);
    return q4mm_launch<T16, 16>(be, y, xh, w, q, bias, bs_shift, tok0, nt, acc, S, part);
}

/* Whether k_q4_wg runs: asked for (TUNA_Q4_WG=1; off by default, slower than k_q4_mm: see the
 * kernel's header), on a 9.0 GPU whose code from this binary has the wgmma path (probed once, outside
 * a capture; the steps before a capture run eagerly first, graph.cu). */
static bool q4wg_usable(tuna_backend *be)
{
    const char *e = getenv("TUNA_Q4_WG");
    if (!e || atoi(e) != 1 || be->cc_major != 9) return false;
    if (be->q4wg == 0 && !be->capturing) {
        int *d = NULL, h = 0;
        be->q4wg = -1;
        if (!tuna_cuda_check(be, cudaMalloc(&d, sizeof(int)), "cudaMalloc(wgmma probe)")) return false;
        k_q4wg_probe<<<1, 1, 0, be->stream>>>(d);
        if (tuna_cuda_check_launch(be, "k_q4wg_probe") &&
            tuna_cuda_check(be, cudaMemcpyAsync(&h, d, sizeof h, cudaMemcpyDeviceToHost, be->stream),
                            "cudaMemcpyAsync(wgmma probe)") &&
            tuna_cuda_check(be, cudaStreamSynchronize(be->stream), "cudaStreamSynchronize(wgmma probe)") && h == 1)
            be->q4wg = 1;
        cudaFree(d);
    }
    return be->q4wg == 1;
}

template <typename T16>
static bool q4wg_launch(tuna_backend *be, float *y, const T16 *xp, const struct tuna_weight *w,
                        const struct tuna_cuda_q4 *q, const float *bias, int bs_shift, int tok0, int nt, bool acc,
                        int S, float *part)
{
    struct q4_lut lut;
    memcpy(lut.v, q->lut, sizeof lut.v);
    const int N = (int)w->rows, K = (int)w->cols;
    const dim3 grid((unsigned)((N + 64 * Q4WG_NWG - 1) / (64 * Q4WG_NWG)), (unsigned)S), block(Q4WG_NWG * 128);
    const struct q4_scales sc = q4_scales_of(q);
    const int mode = q->round_mode;
    const bool rnd = q4mm_rnd<T16>(mode);
    void (*fn)(float *, const T16 *, const uint8_t *, const struct q4_scales, const float *, const struct q4_lut, int,
               int, int, int, int, int, int, float *);
    if (sc.absmax)
        fn = rnd ? k_q4_wg<T16, false, true> : k_q4_wg<T16, false, false>;
    else
        fn = rnd ? k_q4_wg<T16, true, true> : k_q4_wg<T16, true, false>;
    g_q4mm_launches++, g_q4wg_launches++;
    return tuna_cuda_launch(be, "k_q4_wg", fn, grid, block, Q4WG_SMEM, y, xp, (const uint8_t *)w->data, sc, bias, lut,
                            mode, bs_shift, N, K, tok0, nt, acc ? 1 : 0, part);
}

bool tuna_cuda_q4_mm(tuna_backend *be, float *y, const float *x, const struct tuna_weight *w, const float *bias,
                     int64_t T, bool acc)
{
    const struct tuna_cuda_q4 *q = (const struct tuna_cuda_q4 *)w->q4;
    const int64_t N = w->rows, K = w->cols;
    const int dt = q->prefill == TUNA_DTYPE_BF16 ? 1 : q->prefill == TUNA_DTYPE_F16 ? 2 : 0;
    if (dt == 0 || be->cc_major < 8 || T < 1 || T > tuna_cuda_q4_mm_max_t() || K % 128 != 0 || q->blocksize < 32 ||
        ((uintptr_t)w->data % 16) != 0 || N < 1 || N * K >= ((int64_t)1 << 31))
        return false;
    int bs_shift = 0;
    while ((1 << bs_shift) < q->blocksize)
        bs_shift++;
    if ((1 << bs_shift) != q->blocksize) return false;
    /* above 64 tokens, asked for, on Hopper: k_q4_wg for every launch, x permuted for it */
    const bool wg = T > 64 && q4wg_usable(be);
    if (be->sticky) return true;
    if (wg) {
        if (!tuna_cuda_half_reserve(be, T * K)) return true; /* in the sticky status */
        if (dt == 1)
            k_q4wg_perm<__nv_bfloat16>
                <<<tuna_cuda_blocks(T * K, 256), 256, 0, be->stream>>>((__nv_bfloat16 *)be->half.p, x, T * K);
        else
            k_q4wg_perm<__half><<<tuna_cuda_blocks(T * K, 256), 256, 0, be->stream>>>((__half *)be->half.p, x, T * K);
        if (!tuna_cuda_check_launch(be, "k_q4wg_perm")) return true;
    } else if (!tuna_cuda_to_half(be, x, T * K, dt, false)) {
        return true; /* the failure is in the sticky status */
    }
    const int64_t sms = be->sm_count > 0 ? be->sm_count : 132;
    for (int64_t tok0 = 0; tok0 < T; tok0 += Q4MM_MAXTOK) {
        const int nt = (int)(T - tok0 < Q4MM_MAXTOK ? T - tok0 : Q4MM_MAXTOK), tg = wg ? 16 : q4mm_tg(nt);
        /* K split over gridDim.y blocks where the rows alone give fewer than 2 blocks per SM (each split
         * at least 16 steps of 128, 8 with 16 token groups): their sums in be->q4mm_part, added in split
         * order by k_q4_mm_sum. (Measured slower on the H100, twenty-second session: the last split of a
         * row block adding them, found through a counter, and the splits as a cluster adding them
         * through distributed shared memory: batch 32 10.9 and 10.0 against 8.9 ms/step.) */
        const int64_t rows = wg ? 64 * Q4WG_NWG : Q4MM_ROWS, rb = (N + rows - 1) / rows;
        const int64_t minsteps = tg == 16 ? 8 : 16;
        int S = 1;
        while (S < 8 && rb * S < 2 * sms && K / 128 >= minsteps * S)
            S *= 2;
        /* S * N < 4 * sms * rows by the loop: the buffer sized for that many sums of this form's tokens
         * (while a graph is being captured and it is smaller: no split; the steps before a capture ran
         * the same form eagerly, see graph.cu) */
        const size_t part_bytes = (size_t)4 * sms * rows * (size_t)(8 * tg) * sizeof(float);
        if (S > 1 && be->capturing && be->q4mm_part.cap < part_bytes) S = 1;
        if (S > 1 && !tuna_cuda_grow(be, &be->q4mm_part, part_bytes, "cudaMalloc(4-bit GEMM split-K sums)"))
            return true; /* in the sticky status */
        float *part = S > 1 ? (float *)be->q4mm_part.p : NULL;
        bool ok;
        if (wg && dt == 1)
            ok = q4wg_launch<__nv_bfloat16>(be, y, (const __nv_bfloat16 *)be->half.p, w, q, bias, bs_shift, (int)tok0,
                                            nt, acc, S, part);
        else if (wg)
            ok = q4wg_launch<__half>(be, y, (const __half *)be->half.p, w, q, bias, bs_shift, (int)tok0, nt, acc, S,
                                     part);
        else if (dt == 1)
            ok = q4mm_launch_tg<__nv_bfloat16>(be, y, (const __nv_bfloat16 *)be->half.p, w, q, bias, bs_shift,
                                               (int)tok0, nt, acc, S, part);
        else
            ok = q4mm_launch_tg<__half>(be, y, (const __half *)be->half.p, w, q, bias, bs_shift, (int)tok0, nt, acc, S,
                                        part);
        if (ok && S > 1)
            ok = tuna_cuda_launch(be, "k_q4_mm_sum", k_q4_mm_sum, dim3((unsigned)((nt * N + 255) / 256)), dim3(256), 0,
                                  y, (const float *)part, bias, S, (int)N, (int)tok0, nt, acc ? 1 : 0);
        if (!ok) return true; /* in the sticky status */
    }
    return true;
}
