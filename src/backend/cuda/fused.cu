/* fused.cu — the optional fused ops of the op table (backend.h): several projections of the
 * same input in one launch (q/k/v), gate/up with the GLU in the epilogue, and a projection
 * added straight into the residual stream. They exist for decode, where a step is a chain of
 * small GEMVs whose launches, tails and extra passes over activations cost as much as the
 * weights: one grouped GEMV keeps 132 SMs busy on 6144 rows where k or v alone (1024 rows)
 * cannot. Measured per kernel on an H200 (docs/PERFORMANCE.md).
 *
 * The GEMV: one warp per output row (or per gate/up pair), 16-byte loads of W (8 bf16/f16
 * values), two loads in flight per lane, float32 accumulation for all TT tokens at once, so
 * every weight byte is read once per step. Rows are numbered across the segments; each
 * segment starts on a multiple of R so a warp's rows stay in one matrix. Anything the kernel
 * does not cover (float32 or 4-bit weights, T above tuna_cuda_gemv_max_t16(), unaligned data) runs as
 * the plain ops, with the same results.
 *
 * The NORM variants fold the RMSNorm in front of the projections into the GEMV (rmsnorm_matmul_multi,
 * rmsnorm_matmul_glu): every warp reads all of x anyway, so it also sums x^2 and multiplies x by
 * the norm's weight as it loads it; y = (W (nw . x)) / rms(x) is scaled once per row at the end,
 * and block 0 writes the normalized rows for LoRA or anyone else who reads them. Launches go
 * through pdl.cuh: on sm_90 a GEMV starts while the kernel before it finishes, loading its first
 * weights (and with TUNA_GEMV_PREFETCH=2 its rows into L2) before it waits for that kernel.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cuda/gemv.cuh"
#include "backend/cuda/kv_types.cuh"
#include "backend/cuda/pdl.cuh"
#include "backend/cuda/rope.cuh"

int tuna_cuda_gemv_prefetch(void)
{
    static int v = -1;
    if (v < 0) {
        const char *e = getenv("TUNA_GEMV_PREFETCH");
        v = e && e[0] >= '0' && e[0] <= '3' ? e[0] - '0' : 1;
    }
    return v;
}

/* One step of the loop: 8 weights of R rows (raw) against xs[t, 8ii .. 8ii+8) of TT tokens. */
template <int TT, int R>
static __device__ __forceinline__ void gemv_step(float (&acc)[R][TT], const uint4 (&raw)[R], int dtype,
                                                 const float *xs, int64_t K, int64_t ii, int lane)
{
    float wf[R][8];
#pragma unroll
    for (int r = 0; r < R; r++) tuna_cuda_unpack8(raw[r], dtype, wf[r]);
#pragma unroll
    for (int t = 0; t < TT; t++) {
        float4 a, b;
        gemv_x8(xs + t * K, ii, lane, a, b);
#pragma unroll
        for (int r = 0; r < R; r++)
            acc[r][t] += wf[r][0] * a.x + wf[r][1] * a.y + wf[r][2] * a.z + wf[r][3] * a.w + wf[r][4] * b.x +
                         wf[r][5] * b.y + wf[r][6] * b.z + wf[r][7] * b.w;
    }
}

/* The weight rows of warp-job wid (R rows; GLU: the gate row and the up row). */
template <int R>
static __device__ __forceinline__ void gemv_wrows(const struct gemv_job &j, int seg, int64_t n0, const uint4 *(&wr)[R])
{
    if (j.mode == GEMV_GLU) {
        wr[0] = reinterpret_cast<const uint4 *>((const uint16_t *)j.s[0].W + n0 * j.s[0].ld);
        wr[R - 1] = reinterpret_cast<const uint4 *>((const uint16_t *)j.s[1].W + n0 * j.s[1].ld);
        return;
    }
#pragma unroll
    for (int r = 0; r < R; r++) {
        int64_t n = n0 + r < j.s[seg].N ? n0 + r : j.s[seg].N - 1; /* rows past N are not stored */
        wr[r] = reinterpret_cast<const uint4 *>((const uint16_t *)j.s[seg].W + n * j.s[seg].ld);
    }
}

/* RoPE and the KV store in the q/k/v GEMV's epilogue (rmsnorm_qkv_rope_kv, ROPE kernels):
 * segments 0 q, 1 k, 2 v, every head of D = 2 half rows rotated whole; a job is the row pair
 * (h D + i, h D + i + half) of one head, so the warp that ends a job holds both halves of the
 * rotation. rope_kv.cu's arithmetic (rope.cuh): bit-identical to the GEMV then rope_kv_store. */
struct gemv_rope {
    const int64_t *pos, *slot;
    const float *inv_freq;
    float attn_factor;
    void *kc, *vc;
    int kv;   /* the cache's element type: 0 float32, 1 bf16, 2 f16 */
    int half; /* D / 2 */
    int64_t HkvD;
};

/* ROPE: the pair job wid (rows numbered in pairs, gemv_number_rows(j, 2)) */
template <bool ROPE>
static __device__ __forceinline__ bool split_rows(const struct gemv_job &j, const struct gemv_rope &rp, int RW,
                                                  int64_t wid, int *seg, int64_t *n0)
{
    if (!ROPE) return gemv_rows(j, RW, wid, seg, n0);
    if (!gemv_rows(j, 2, wid, seg, n0)) return false;
    const int64_t pi = *n0 / 2;
    *n0 = pi / rp.half * (2 * rp.half) + pi % rp.half;
    return true;
}

template <bool ROPE, int R>
static __device__ __forceinline__ void split_wrows(const struct gemv_job &j, const struct gemv_rope &rp, int seg,
                                                   int64_t n0, const uint4 *(&wr)[R])
{
    if (!ROPE) {
        gemv_wrows<R>(j, seg, n0, wr);
        return;
    }
    const uint16_t *W = (const uint16_t *)j.s[seg].W;
    wr[0] = reinterpret_cast<const uint4 *>(W + n0 * j.s[seg].ld);
    wr[R - 1] = reinterpret_cast<const uint4 *>(W + (n0 + rp.half) * j.s[seg].ld);
}

static __device__ __forceinline__ void rope_put(void *cache, int kv, int64_t i, float v)
{
    if (kv == 1) ((__nv_bfloat16 *)cache)[i] = __float2bfloat16_rn(v);
    else if (kv == 2) ((__half *)cache)[i] = __float2half_rn(v);
    else ((float *)cache)[i] = v;
}

/* Lane 0's store of a ROPE job: rows n0 and n0 + half of segment seg, rotated (q, k), and k, v
 * into the cache at each token's slot. */
template <int TT, int R>
static __device__ __forceinline__ void rope_store(const struct gemv_job &j, const struct gemv_rope &rp,
                                                  const float (&acc)[R][TT], int seg, int64_t n0)
{
    const struct gemv_seg *s = &j.s[seg];
    const int64_t n1 = n0 + rp.half, i = n0 % (2 * rp.half);
    const float b0 = s->bias ? s->bias[n0] : 0.0f, b1 = s->bias ? s->bias[n1] : 0.0f;
#pragma unroll
    for (int t = 0; t < TT; t++) {
        const float x1 = acc[0][t] + b0, x2 = acc[R - 1][t] + b1;
        float o1 = x1, o2 = x2;
        if (seg < 2) {
            float c, sn;
            rope_cos_sin(rp.inv_freq, i, (float)rp.pos[t], rp.attn_factor, &c, &sn);
            o1 = rope_first(x1, x2, c, sn);
            o2 = rope_second(x1, x2, c, sn);
        }
        s->y[t * s->N + n0] = o1;
        s->y[t * s->N + n1] = o2;
        if (seg > 0) {
            void *cache = seg == 1 ? rp.kc : rp.vc;
            const int64_t base = rp.slot[t] * rp.HkvD;
            rope_put(cache, rp.kv, base + n0, o1);
            rope_put(cache, rp.kv, base + n1, o2);
        }
    }
}

/* R rows per warp (GLU: R = 2, the gate row and the up row of one output), TT tokens; about one
 * wave of blocks whose warps stride over the rows, x staged once per block (NORM: normalized).
 * U 16-byte chunks of each row in flight per lane (all of them loaded before the PDL wait when
 * j.prefetch >= 1). ROPE (q/k/v with RoPE and the KV store, R = 2): a job is the row pair
 * (h D + i, h D + i + half) of one head (split_rows), stored by rope_store. */
template <int TT, int R, bool NORM, int U = 2, bool ROPE = false>
__global__ void __launch_bounds__(GEMV_THREADS, GEMV_BLOCKS_PER_SM) k_gemv_multi(const float *__restrict__ x,
                                                                                const struct gemv_job j,
                                                                                const struct gemv_rope rp)
{
    extern __shared__ float4 gemv_xs4[];
    float *xs = reinterpret_cast<float *>(gemv_xs4);
    const int lane = threadIdx.x & 31;
    const int64_t w0 = (int64_t)blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5);
    const int64_t stride = (int64_t)gridDim.x * (blockDim.x / 32);
    const int RW = j.mode == GEMV_GLU ? 1 : R;
    const int64_t K = j.K, K8 = K / 8;
    /* before the previous kernel is done: only the first row's weights, which it does not write */
    uint4 raw[U][R];
    bool have = false;
    {
        int seg;
        int64_t n0;
        if (w0 < j.nwarp && split_rows<ROPE>(j, rp, RW, w0, &seg, &n0)) {
            const uint4 *wr[R];
            split_wrows<ROPE, R>(j, rp, seg, n0, wr);
            if (j.prefetch == 2)
#pragma unroll
                for (int r = 0; r < R; r++)
                    for (int64_t l = (int64_t)lane * 8; l < K8; l += 256) tuna_prefetch_l2(wr[r] + l);
            if (j.prefetch >= 1 && lane + 32 * (U - 1) < K8) {
#pragma unroll
                for (int u = 0; u < U; u++)
#pragma unroll
                    for (int r = 0; r < R; r++) raw[u][r] = __ldg(wr[r] + lane + 32 * u);
                have = true;
            }
        }
    }
    tuna_pdl_wait();
    tuna_pdl_trigger();
    gemv_stage_x<TT, NORM>(xs, x, j);
    for (int64_t wid = w0; wid < j.nwarp; wid += stride) {
        int seg;
        int64_t n0;
        if (!split_rows<ROPE>(j, rp, RW, wid, &seg, &n0)) { /* padding rows */
            have = false;
            continue;
        }
        const uint4 *wr[R];
        split_wrows<ROPE, R>(j, rp, seg, n0, wr);
        float acc[R][TT], ss[TT];
#pragma unroll
        for (int t = 0; t < TT; t++) {
            ss[t] = 0.0f;
#pragma unroll
            for (int r = 0; r < R; r++) acc[r][t] = 0.0f;
        }
        int64_t i = lane;
        for (; i + 32 * (U - 1) < K8; i += 32 * U) {
            if (!have) {
#pragma unroll
                for (int u = 0; u < U; u++)
#pragma unroll
                    for (int r = 0; r < R; r++) raw[u][r] = __ldg(wr[r] + i + 32 * u);
            }
            have = false;
#pragma unroll
            for (int u = 0; u < U; u++) {
                const uint4(&one)[R] = raw[u];
                gemv_step<TT, R>(acc, one, j.dtype, xs, K, i + 32 * u, lane);
            }
        }
        for (; i < K8; i += 32) {
            uint4 one[R];
#pragma unroll
            for (int r = 0; r < R; r++) one[r] = __ldg(wr[r] + i);
            gemv_step<TT, R>(acc, one, j.dtype, xs, K, i, lane);
        }
        have = false;
        if constexpr (ROPE) {
#pragma unroll
            for (int r = 0; r < R; r++)
#pragma unroll
                for (int t = 0; t < TT; t++)
                    for (int o = 16; o > 0; o >>= 1) acc[r][t] += __shfl_xor_sync(0xffffffffu, acc[r][t], o);
            if (lane == 0) rope_store<TT, R>(j, rp, acc, seg, n0);
        } else {
            gemv_epilogue<TT, R, false>(j, acc, ss, x, seg, n0, false);
        }
    }
}

/* ---- The split kernel (k_gemv_split, the default for T <= 2): S warps per job and U loads in flight.
 * A job (R rows, or a gate/up pair) is taken by a group of S consecutive warps of a block, warp s
 * of the group reading the 16-byte chunks s * 32 + lane, + 32 S, ... of the rows (split-K), U
 * chunks per row in flight per lane before any is used. S is chosen so that the jobs fill the
 * grid's warps evenly (q/k/v: 6144 rows on 4224 warps were 1.45 rows per warp, so half the warps
 * idled through the second round; S = 2 makes it 2.9 rounds of 3). The group's partial sums meet
 * in shared memory behind a named barrier of its S warps and warp 0 of the group stores: the
 * order of the additions is fixed (deterministic, CUDA graphs stay bit-identical). The next job's
 * first loads are issued before the sums of the current one are reduced. TUNA_GEMV_S (1, 2, 4)
 * and TUNA_GEMV_U (2, 4, 8) override the choice. Opt-in (TUNA_GEMV_OLD=0, or =2 for the
 * RoPE-fused q/k/v job alone): on the H100 the 32-layer chain of bench_cuda_ops ran as fast as
 * with k_gemv_multi (165.5 against 165.3 us per layer, RoPE fused). A whole bf16 decode step was
 * slower (6.93-7.10 ms against 6.42) while the attention kernel triggered the o GEMV early
 * (attention.cu: the GEMVs then ran on SMs left at attention's carveout); without that trigger
 * (the default since) it measured 6.08 against 6.06-6.09 ms: equal, so k_gemv_multi stays. */

/* U chunks (16 bytes each) of R rows at chunk c, c + step, ...; chunks past K8 are zeros. */
template <int R, int U>
static __device__ __forceinline__ void gemv_load(uint4 (&raw)[U][R], const uint4 *const (&wr)[R], int64_t c,
                                                 int64_t step, int64_t K8)
{
#pragma unroll
    for (int u = 0; u < U; u++)
#pragma unroll
        for (int r = 0; r < R; r++)
            raw[u][r] = c + u * step < K8 ? __ldg(wr[r] + c + u * step) : make_uint4(0, 0, 0, 0);
}

static __device__ __forceinline__ void gemv_bar(int id, int threads)
{
    asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

template <int TT, int R, int U, bool NORM, bool ROPE>
__global__ void __launch_bounds__(GEMV_THREADS, GEMV_BLOCKS_PER_SM) k_gemv_split(const float *__restrict__ x,
                                                                                const struct gemv_job j, int S,
                                                                                const struct gemv_rope rp)
{
    extern __shared__ float4 gemv_xs4[];
    __shared__ float red[2][GEMV_THREADS / 32][R * TT];
    float *xs = reinterpret_cast<float *>(gemv_xs4);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int sub = warp % S, grp = warp / S, gpb = (GEMV_THREADS / 32) / S;
    const int64_t g0 = (int64_t)blockIdx.x * gpb + grp, gstride = (int64_t)gridDim.x * gpb;
    const int RW = j.mode == GEMV_GLU ? 1 : R;
    const int64_t K = j.K, K8 = K / 8, step = 32 * (int64_t)S, c0 = (int64_t)sub * 32 + lane;
    uint4 raw[U][R];
    bool have = false;
    /* before the previous kernel is done: the first chunks of the first job, which it does not write */
    if (j.prefetch >= 1 && g0 < j.nwarp) {
        int seg;
        int64_t n0;
        if (split_rows<ROPE>(j, rp, RW, g0, &seg, &n0)) {
            const uint4 *wr[R];
            split_wrows<ROPE, R>(j, rp, seg, n0, wr);
            gemv_load<R, U>(raw, wr, c0, step, K8);
            have = true;
        }
    }
    tuna_pdl_wait();
    tuna_pdl_trigger();
    gemv_stage_x<TT, NORM>(xs, x, j);
    int par = 0;
    for (int64_t job = g0; job < j.nwarp; job += gstride) {
        int seg;
        int64_t n0;
        if (!split_rows<ROPE>(j, rp, RW, job, &seg, &n0)) { /* padding rows: the whole group skips them */
            have = false;
            continue;
        }
        const uint4 *wr[R];
        split_wrows<ROPE, R>(j, rp, seg, n0, wr);
        if (!have) gemv_load<R, U>(raw, wr, c0, step, K8);
        float acc[R][TT];
#pragma unroll
        for (int r = 0; r < R; r++)
#pragma unroll
            for (int t = 0; t < TT; t++) acc[r][t] = 0.0f;
        for (int64_t c = c0;;) {
#pragma unroll
            for (int u = 0; u < U; u++) {
                const uint4(&one)[R] = raw[u];
                if (c + u * step < K8) gemv_step<TT, R>(acc, one, j.dtype, xs, K, c + u * step, lane);
            }
            c += U * step;
            if (c >= K8) break;
            gemv_load<R, U>(raw, wr, c, step, K8);
        }
        /* the next job's first loads, then the sums of this one */
        have = false;
        {
            const int64_t nx = job + gstride;
            int sg2;
            int64_t m0;
            if (nx < j.nwarp && split_rows<ROPE>(j, rp, RW, nx, &sg2, &m0)) {
                const uint4 *wn[R];
                split_wrows<ROPE, R>(j, rp, sg2, m0, wn);
                gemv_load<R, U>(raw, wn, c0, step, K8);
                have = true;
            }
        }
#pragma unroll
        for (int r = 0; r < R; r++)
#pragma unroll
            for (int t = 0; t < TT; t++)
                for (int o = 16; o > 0; o >>= 1) acc[r][t] += __shfl_xor_sync(0xffffffffu, acc[r][t], o);
        if (S > 1) {
            if (lane == 0)
#pragma unroll
                for (int r = 0; r < R; r++)
#pragma unroll
                    for (int t = 0; t < TT; t++) red[par][warp][r * TT + t] = acc[r][t];
            gemv_bar(1 + grp, 32 * S);
            if (sub == 0 && lane == 0) {
#pragma unroll
                for (int r = 0; r < R; r++)
#pragma unroll
                    for (int t = 0; t < TT; t++) {
                        float a = red[par][warp][r * TT + t];
                        for (int w = 1; w < S; w++) a += red[par][warp + w][r * TT + t];
                        acc[r][t] = a;
                    }
            }
            par ^= 1;
        }
        if (sub == 0 && lane == 0) {
            if constexpr (ROPE) rope_store<TT, R>(j, rp, acc, seg, n0);
            else {
                float one[TT];
#pragma unroll
                for (int t = 0; t < TT; t++) one[t] = 1.0f;
                gemv_store<TT, R>(j, acc, one, seg, n0);
            }
        }
    }
}

/* TUNA_GEMV_OLD=1: the k_gemv_multi kernel; TUNA_GEMV_S / TUNA_GEMV_U: forced split and depth
 * (0 = chosen per job). */
static int env_pick(const char *name, int def, const int *allowed, int n)
{
    const char *e = getenv(name);
    if (!e || !*e) return def;
    const int v = atoi(e);
    for (int i = 0; i < n; i++)
        if (allowed[i] == v) return v;
    return def;
}

/* The split for J jobs of K8 chunks on W warps: the S in {1, 2, 4} whose rounds are filled best
 * (2% better than a smaller S to be taken); each warp keeps at least 2 chunks per lane. */
static int gemv_pick_split(int64_t J, int64_t W, int64_t K8)
{
    static int forced = -1;
    if (forced < 0) {
        const int ok[] = {1, 2, 4};
        forced = env_pick("TUNA_GEMV_S", 0, ok, 3);
    }
    int best_s = 1;
    double best = 0.0;
    for (int s = 1; s <= 4; s *= 2) {
        if (s > 1 && K8 < 64 * s) break;
        if (forced && s == forced) return s;
        const double jobs = (double)(J * s), rounds = ceil(jobs / (double)W), eff = jobs / ((double)W * rounds);
        if (eff > best + 0.02) {
            best = eff;
            best_s = s;
        }
    }
    return best_s;
}

static int gemv_depth(void)
{
    static int u = -1;
    if (u < 0) {
        const int ok[] = {2, 4, 8};
        u = env_pick("TUNA_GEMV_U", 4, ok, 3);
    }
    return u;
}

/* The batch-1 knobs of k_gemv_multi (ninth session; read once; the knobs measured no faster on
 * the H100 were taken out again, see docs/PERFORMANCE.md "Batch 1 bf16, ninth session"):
 * TUNA_GEMV_U1 = 2 (default), 4, 8: 16-byte chunks in flight per lane (all loaded before the PDL
 *   wait) for the T = 1 one-row-per-warp jobs (q/k/v, o, down, lm_head);
 * TUNA_ROPE_MULTI=1 (the default; 0: the GEMV then k_rope_kv; 2: also at T = 2, not measured):
 *   rmsnorm_qkv_rope_kv at T = 1 as one k_gemv_multi with RoPE and the KV store in its epilogue
 *   (pairs of rows, 2 or TUNA_GEMV_UR = 4 chunks in flight per row); H100, bf16 8B batch 1:
 *   5.87 / 5.91 against 5.95 / 5.99 ms per step, bench_cuda_ops' chain 162.5 against 165.6 us
 *   per layer. */
enum { KNOB_U1, KNOB_ROPE_MULTI, KNOB_UR, KNOB_N };
static int gemv_knob(int k)
{
    static int v[KNOB_N];
    static bool done;
    if (!done) {
        const int u[] = {2, 4, 8}, rm[] = {0, 1, 2}, ur[] = {2, 4};
        v[KNOB_U1] = env_pick("TUNA_GEMV_U1", 2, u, 3);
        v[KNOB_ROPE_MULTI] = env_pick("TUNA_ROPE_MULTI", 1, rm, 3);
        v[KNOB_UR] = env_pick("TUNA_GEMV_UR", 2, ur, 2);
        done = true;
    }
    return v[k];
}

/* TUNA_GEMV_OLD: 1 (default: measured faster end to end) k_gemv_multi for every job (the q/k/v
 * job with RoPE fused unless TUNA_ROPE_MULTI=0); 0 k_gemv_split for T <= 2 (RoPE fused in it);
 * 2 k_gemv_multi except the RoPE-fused q/k/v job (k_gemv_split). */
static int gemv_old_level(void)
{
    static int v = -1;
    if (v < 0) {
        const char *e = getenv("TUNA_GEMV_OLD");
        v = e && (e[0] == '0' || e[0] == '2') && !e[1] ? e[0] - '0' : 1;
    }
    return v;
}
static bool gemv_old(void) { return gemv_old_level() != 0; }

/* TUNA_GEMV_L2SMALL=1: a 16-bit job whose weights total at most 40 MB (the o projection of an
 * 8B model; under the H100's 50 MB L2) also prefetches its rows into L2 before the PDL wait
 * (prefetch level 2), meant for the o GEMV started early during attention (TUNA_ATTN_TRIGGER=1),
 * whose DRAM traffic is small. Measured slower (H100, trigger on: 6.55 against 6.46 ms per
 * step); larger jobs (gate/up) overflowed L2 that way (TUNA_GEMV_PREFETCH=2 for every job: 8.20
 * against 6.61 ms). */
static bool gemv_l2small(const struct gemv_job *j)
{
    static int v = -1;
    if (v < 0) {
        const char *e = getenv("TUNA_GEMV_L2SMALL");
        v = e && strcmp(e, "1") == 0;
    }
    if (!v) return false;
    double bytes = 0;
    for (int i = 0; i < j->nseg; i++) bytes += (double)j->s[i].N * (double)j->K * 2.0;
    return bytes <= 40.0 * 1024 * 1024;
}

/* The weight can go through the grouped kernel: 16-bit, K % 8 == 0, 16-byte aligned rows. */
static bool gemv_ok(const struct tuna_weight *w, int64_t K, int *dtype)
{
    int dt = w->dtype == TUNA_DTYPE_BF16 ? 1 : w->dtype == TUNA_DTYPE_F16 ? 2 : 0;
    if (!dt || w->cols != K || K % 8 != 0 || tuna_weight_ld(w) % 8 != 0 || ((uintptr_t)w->data % 16) != 0) return false;
    if (*dtype && *dtype != dt) return false;
    *dtype = dt;
    return true;
}

static bool is_q4(const struct tuna_weight *w)
{
    return (w->dtype == TUNA_DTYPE_NF4 || w->dtype == TUNA_DTYPE_FP4) && w->q4;
}

template <int TT, int R, bool NORM>
static void launch_one(tuna_backend *be, const float *x, const struct gemv_job *j, unsigned blocks, size_t smem)
{
    const struct gemv_rope rp = {};
    tuna_cuda_launch(be, "k_gemv_multi", k_gemv_multi<TT, R, NORM>, dim3(blocks), dim3(GEMV_THREADS), smem, x, *j, rp);
}

/* T = 1, one row per warp, U chunks in flight per lane (TUNA_GEMV_U1) */
template <bool NORM>
static void launch_deep(tuna_backend *be, const float *x, const struct gemv_job *j, unsigned blocks, size_t smem,
                        int U)
{
    const struct gemv_rope rp = {};
    const dim3 g(blocks), b(GEMV_THREADS);
    if (U == 8) tuna_cuda_launch(be, "k_gemv_multi", k_gemv_multi<1, 1, NORM, 8>, g, b, smem, x, *j, rp);
    else if (U == 4) tuna_cuda_launch(be, "k_gemv_multi", k_gemv_multi<1, 1, NORM, 4>, g, b, smem, x, *j, rp);
    else tuna_cuda_launch(be, "k_gemv_multi", k_gemv_multi<1, 1, NORM>, g, b, smem, x, *j, rp);
}

template <int R, bool NORM>
static void launch_tt(tuna_backend *be, const float *x, const struct gemv_job *j, unsigned blocks, size_t smem,
                      int64_t T)
{
    switch (T) {
    case 1: launch_one<1, R, NORM>(be, x, j, blocks, smem); break;
    case 2: launch_one<2, R, NORM>(be, x, j, blocks, smem); break;
    case 3: launch_one<3, R, NORM>(be, x, j, blocks, smem); break;
    case 4: launch_one<4, R, NORM>(be, x, j, blocks, smem); break;
    case 5: launch_one<5, R, NORM>(be, x, j, blocks, smem); break;
    case 6: launch_one<6, R, NORM>(be, x, j, blocks, smem); break;
    case 7: launch_one<7, R, NORM>(be, x, j, blocks, smem); break;
    case 8: launch_one<8, R, NORM>(be, x, j, blocks, smem); break;
    }
}

template <int TT, int R, bool NORM, bool ROPE>
static void launch_split_u(tuna_backend *be, const float *x, const struct gemv_job *j, unsigned blocks, size_t smem,
                           int S, int U, const struct gemv_rope *rp)
{
    const dim3 g(blocks), b(GEMV_THREADS);
    if (U == 2 || (TT > 1 && R > 1)) { /* two tokens of two rows: 4 chunks in flight spill registers */
        tuna_cuda_launch(be, "k_gemv_split", k_gemv_split<TT, R, 2, NORM, ROPE>, g, b, smem, x, *j, S, *rp);
    } else if constexpr (R == 1) {
        if (U == 8) tuna_cuda_launch(be, "k_gemv_split", k_gemv_split<TT, R, 8, NORM, ROPE>, g, b, smem, x, *j, S, *rp);
        else tuna_cuda_launch(be, "k_gemv_split", k_gemv_split<TT, R, 4, NORM, ROPE>, g, b, smem, x, *j, S, *rp);
    } else if constexpr (TT == 1) { /* two rows: at most 4 chunks in flight per row (registers) */
        tuna_cuda_launch(be, "k_gemv_split", k_gemv_split<TT, R, 4, NORM, ROPE>, g, b, smem, x, *j, S, *rp);
    }
}

template <int R>
static void launch_split(tuna_backend *be, const float *x, const struct gemv_job *j, unsigned blocks, size_t smem,
                         int64_t T, int S, int U)
{
    const bool norm = j->nw != NULL;
    const struct gemv_rope rp = {};
    if (T == 1) {
        if (norm) launch_split_u<1, R, true, false>(be, x, j, blocks, smem, S, U, &rp);
        else launch_split_u<1, R, false, false>(be, x, j, blocks, smem, S, U, &rp);
    } else {
        if (norm) launch_split_u<2, R, true, false>(be, x, j, blocks, smem, S, U, &rp);
        else launch_split_u<2, R, false, false>(be, x, j, blocks, smem, S, U, &rp);
    }
}

/* Numbers the rows, then launches the 16-bit kernel (R = 1 at T = 1, else 2; GLU always 2):
 * about GEMV_BLOCKS_PER_SM blocks per SM, fewer when there are fewer rows. T <= 2 takes
 * k_gemv_split (unless TUNA_GEMV_OLD=1), larger T k_gemv_multi. False when x does not fit in
 * shared memory. */
static bool launch_multi(tuna_backend *be, const float *x, struct gemv_job *j, int64_t T)
{
    const size_t smem = (size_t)T * (size_t)j->K * sizeof(float);
    if (smem > GEMV_MAX_STAGE_BYTES) return false;
    const int R = j->mode == GEMV_GLU || T > 1 ? 2 : 1;
    const bool norm = j->nw != NULL;
    int64_t rows = j->mode == GEMV_GLU ? j->s[0].N : gemv_number_rows(j, R);
    const int64_t per_warp = j->mode == GEMV_GLU ? 1 : R;
    j->nwarp = (rows + per_warp - 1) / per_warp;
    const int64_t wpb = GEMV_THREADS / 32;
    const int64_t cap = (int64_t)(be->sm_count > 0 ? be->sm_count : 1) * GEMV_BLOCKS_PER_SM;
    j->prefetch = tuna_cuda_gemv_prefetch();
    if (j->prefetch == 1 && gemv_l2small(j)) j->prefetch = 2;
    if (T <= 2 && !gemv_old()) {
        const int S = gemv_pick_split(j->nwarp, cap * wpb, j->K / 8), U = gemv_depth();
        int64_t blocks = (j->nwarp * S + wpb - 1) / wpb;
        if (blocks > cap) blocks = cap;
        if (R == 1) launch_split<1>(be, x, j, (unsigned)blocks, smem, T, S, U);
        else launch_split<2>(be, x, j, (unsigned)blocks, smem, T, S, U);
        return true;
    }
    int64_t blocks = (j->nwarp + wpb - 1) / wpb;
    if (blocks > cap) blocks = cap;
    const int U = gemv_knob(KNOB_U1);
    if (T == 1 && R == 1 && U != 2) {
        if (norm) launch_deep<true>(be, x, j, (unsigned)blocks, smem, U);
        else launch_deep<false>(be, x, j, (unsigned)blocks, smem, U);
        return true;
    }
    if (R == 1) {
        if (norm) launch_tt<1, true>(be, x, j, (unsigned)blocks, smem, T);
        else launch_tt<1, false>(be, x, j, (unsigned)blocks, smem, T);
    } else {
        if (norm) launch_tt<2, true>(be, x, j, (unsigned)blocks, smem, T);
        else launch_tt<2, false>(be, x, j, (unsigned)blocks, smem, T);
    }
    return true;
}

static bool run_job_on(tuna_backend *be, const float *x, struct gemv_job *j, const struct tuna_weight *const *ws,
                       int64_t T);

/* Runs the job on the 16-bit or the 4-bit grouped kernel; false when neither takes it. Where x (a
 * NORM job's input) or y (a GEMV_ADD job's output) has a pending part (racc.cu), a batch-1 4-bit
 * job hands it to k_q4_h4 (xacc, yacc; tuna_cuda_q4_multi folds it first where another kernel
 * runs), anything else folds it first. */
static bool run_job(tuna_backend *be, const float *x, struct gemv_job *j, const struct tuna_weight *const *ws,
                    int64_t T)
{
    /* only a NORM job's staging adds x's pending part: any other job that reads x folds it first */
    const long long *rx = tuna_cuda_racc_of(be, x);
    long long *ry = j->mode == GEMV_ADD ? tuna_cuda_racc_of(be, j->s[0].y) : NULL;
    if ((rx || ry) && T == 1 && is_q4(ws[0]) && (!rx || j->nw)) {
        j->xacc = rx;
        j->yacc = ry;
    } else if (rx || ry) {
        tuna_cuda_racc_settle(be, NULL);
    }
    const bool ok = run_job_on(be, x, j, ws, T);
    if (ok && j->yacc) tuna_cuda_racc_done(be); /* the kernel folded it into y */
    if (!ok && (rx || ry)) tuna_cuda_racc_settle(be, NULL); /* the caller's fallback reads plain x */
    return ok;
}

static bool run_job_on(tuna_backend *be, const float *x, struct gemv_job *j, const struct tuna_weight *const *ws,
                       int64_t T)
{
    const int64_t tmax = is_q4(ws[0]) ? tuna_cuda_q4_gemv_max_t() : TUNA_CUDA_GEMV_MAX_T;
    if (T <= 0 || T > tmax || ((uintptr_t)x % 16) != 0 || j->nseg > GEMV_MAX_SEG) return false;
    if (j->xn && ((uintptr_t)j->xn % 16) != 0) return false;
    if (j->nw && ((uintptr_t)j->nw % 16) != 0) return false;
    if (j->K % 8 != 0) return false;
    if (is_q4(ws[0])) {
        if (tuna_cuda_q4_old()) return false;
        for (int i = 0; i < j->nseg; i++)
            if (!is_q4(ws[i]) || ws[i]->cols != j->K) return false;
        return tuna_cuda_q4_multi(be, x, j, ws, T);
    }
    if (T > tuna_cuda_gemv_max_t16()) return false;
    int dtype = 0;
    for (int i = 0; i < j->nseg; i++)
        if (!gemv_ok(ws[i], j->K, &dtype)) return false;
    j->dtype = dtype;
    return launch_multi(be, x, j, T);
}

/* Whether the n weights all take x rounded to the same 16-bit type in their GEMMs (bf16 or f16). */
static bool half_once(const struct tuna_weight *const *ws, int n)
{
    if (ws[0]->dtype != TUNA_DTYPE_BF16 && ws[0]->dtype != TUNA_DTYPE_F16) return false;
    for (int i = 1; i < n; i++)
        if (ws[i]->dtype != ws[0]->dtype || ws[i]->cols != ws[0]->cols) return false;
    return true;
}

void tuna_cuda_matmul_multi(tuna_backend *be, int n, float *const *ys, const float *x,
                            const struct tuna_weight *const *ws, const float *const *biases, int64_t T)
{
    if (be->sticky || T <= 0 || n <= 0) return;
    struct gemv_job j;
    if (n <= GEMV_MAX_SEG) {
        gemv_job_init(&j, n, ys, ws, biases, GEMV_STORE, NULL, NULL, 0.0f);
        if (run_job(be, x, &j, ws, T)) return;
    }
    /* the GEMMs: x rounded to 16 bits once for all of them (kept for this loop only) */
    const bool own = !be->half_of && n > 1 && T > tuna_cuda_gemv_max_t16() && half_once(ws, n) && tuna_cuda_half_once();
    if (own && !tuna_cuda_to_half(be, x, T * ws[0]->cols, ws[0]->dtype == TUNA_DTYPE_BF16 ? 1 : 2, true)) return;
    for (int i = 0; i < n; i++) tuna_cuda_matmul(be, ys[i], x, ws[i], biases ? biases[i] : NULL, T);
    if (own) be->half_of = NULL;
}

/* Scratch for the unfused fallbacks: [2, T, N] floats in be->fuse. */
static float *fuse_scratch(tuna_backend *be, size_t floats)
{
    if (!tuna_cuda_grow(be, &be->fuse, floats * sizeof(float), "cudaMalloc(fused-op scratch)")) return NULL;
    return (float *)be->fuse.p;
}

static bool glu_job(tuna_backend *be, float *out, const float *x, const struct tuna_weight *wg, const float *bg,
                    const struct tuna_weight *wu, const float *bu, int64_t T, int act, const float *nw, float *xn,
                    float eps)
{
    if (wg->rows != wu->rows || wg->cols != wu->cols) return false;
    const struct tuna_weight *ws[2] = {wg, wu};
    const float *bs[2] = {bg, bu};
    float *ys[2] = {out, NULL};
    struct gemv_job j;
    gemv_job_init(&j, 2, ys, ws, bs, GEMV_GLU, nw, xn, eps);
    j.act = act;
    return run_job(be, x, &j, ws, T);
}

void tuna_cuda_matmul_glu(tuna_backend *be, float *out, const float *x, const struct tuna_weight *wg,
                          const float *bg, const struct tuna_weight *wu, const float *bu, int64_t T, int act)
{
    if (be->sticky || T <= 0) return;
    if (glu_job(be, out, x, wg, bg, wu, bu, T, act, NULL, NULL, 0.0f)) return;
    const int64_t NI = T * wg->rows;
    float *g = fuse_scratch(be, (size_t)(2 * NI));
    if (!g) return;
    tuna_cuda_matmul(be, g, x, wg, bg, T);
    tuna_cuda_matmul(be, g + NI, x, wu, bu, T);
    tuna_cuda_glu(be, out, g, g + NI, NI, act);
}

void tuna_cuda_matmul_add(tuna_backend *be, float *y, const float *x, const struct tuna_weight *w, const float *bias,
                          int64_t T)
{
    if (be->sticky || T <= 0) return;
    struct gemv_job j;
    float *ys[1] = {y};
    gemv_job_init(&j, 1, ys, &w, &bias, GEMV_ADD, NULL, NULL, 0.0f);
    if (run_job(be, x, &j, &w, T)) return;
    if (tuna_cuda_matmul_acc(be, y, x, w, bias, T)) return; /* cuBLAS with beta = 1: no add pass */
    float *tmp = fuse_scratch(be, (size_t)(T * w->rows));
    if (!tmp) return;
    tuna_cuda_matmul(be, tmp, x, w, bias, T);
    tuna_cuda_add(be, y, tmp, T * w->rows);
}

void tuna_cuda_rmsnorm_matmul_multi(tuna_backend *be, int n, float *const *ys, float *xn, const float *x,
                                    const float *nw, float eps, const struct tuna_weight *const *ws,
                                    const float *const *biases, int64_t T)
{
    if (be->sticky || T <= 0 || n <= 0) return;
    if (n <= GEMV_MAX_SEG) {
        struct gemv_job j;
        gemv_job_init(&j, n, ys, ws, biases, GEMV_STORE, nw, xn, eps);
        if (run_job(be, x, &j, ws, T)) return;
    }
    tuna_cuda_rmsnorm(be, xn, x, nw, T, ws[0]->cols, eps);
    tuna_cuda_matmul_multi(be, n, ys, xn, ws, biases, T);
}

void tuna_cuda_rmsnorm_matmul_glu(tuna_backend *be, float *out, float *xn, const float *x, const float *nw, float eps,
                                  const struct tuna_weight *wg, const float *bg, const struct tuna_weight *wu,
                                  const float *bu, int64_t T, int act)
{
    if (be->sticky || T <= 0) return;
    if (glu_job(be, out, x, wg, bg, wu, bu, T, act, nw, xn, eps)) return;
    tuna_cuda_rmsnorm(be, xn, x, nw, T, wg->cols, eps);
    tuna_cuda_matmul_glu(be, out, xn, wg, bg, wu, bu, T, act);
}

/* TUNA_ROPE_FUSE=0: rmsnorm_qkv_rope_kv runs as rmsnorm_matmul_multi + rope_kv_store (comparisons). */
static bool rope_fuse_on(void)
{
    static int v = -1;
    if (v < 0) {
        const char *e = getenv("TUNA_ROPE_FUSE");
        v = !(e && strcmp(e, "0") == 0);
    }
    return v == 1;
}

/* The q/k/v GEMV with RoPE and the KV store in its epilogue (k_gemv_split, ROPE); false when the
 * shapes or the weights do not fit it. */
static bool qkv_rope_fused(tuna_backend *be, float *const *ys, float *xn, const float *x, const float *nw, float eps,
                           const struct tuna_weight *const *ws, const float *const *biases, void *kc, void *vc,
                           int code, const int64_t *pos, const int64_t *slot, int64_t T, int64_t H, int64_t Hkv,
                           int64_t D, int64_t rot_dim, const float *inv_freq, float attn_factor)
{
    const bool multi = gemv_knob(KNOB_ROPE_MULTI) > (int)T - 1 && gemv_old_level() == 1;
    if (!rope_fuse_on() || (gemv_old_level() == 1 && !multi) || T > 2 || T > tuna_cuda_gemv_max_t16() || code < 0) return false;
    if (rot_dim != D || D <= 0 || D % 2 != 0 || ws[0]->rows != H * D || ws[1]->rows != Hkv * D ||
        ws[2]->rows != Hkv * D)
        return false;
    const int64_t K = ws[0]->cols;
    if (K % 8 != 0 || ((uintptr_t)x % 16) != 0 || ((uintptr_t)xn % 16) != 0 || ((uintptr_t)nw % 16) != 0) return false;
    int dtype = 0;
    for (int i = 0; i < 3; i++)
        if (!gemv_ok(ws[i], K, &dtype)) return false;
    const size_t smem = (size_t)T * (size_t)K * sizeof(float);
    if (smem > GEMV_MAX_STAGE_BYTES) return false;
    const int64_t half = D / 2;
    struct cuda_meta m = {0};
    if (!tuna_cuda_meta_begin(be, &m, (size_t)T * 16 + (size_t)half * sizeof(float))) return true; /* sticky */
    size_t off_pos = (size_t)tuna_cuda_meta_stage(be, &m, pos, (size_t)T * sizeof(int64_t));
    size_t off_slot = (size_t)tuna_cuda_meta_stage(be, &m, slot, (size_t)T * sizeof(int64_t));
    size_t off_f = (size_t)tuna_cuda_meta_stage(be, &m, inv_freq, (size_t)half * sizeof(float));
    if (be->sticky || !tuna_cuda_meta_flush(be, &m)) return true;
    struct gemv_rope rp;
    rp.pos = (const int64_t *)((char *)be->meta.p + off_pos);
    rp.slot = (const int64_t *)((char *)be->meta.p + off_slot);
    rp.inv_freq = (const float *)((char *)be->meta.p + off_f);
    rp.attn_factor = attn_factor;
    rp.kc = kc;
    rp.vc = vc;
    rp.kv = code;
    rp.half = (int)half;
    rp.HkvD = Hkv * D;
    struct gemv_job j;
    gemv_job_init(&j, 3, ys, ws, biases, GEMV_STORE, nw, xn, eps);
    j.dtype = dtype;
    j.nwarp = gemv_number_rows(&j, 2) / 2;
    j.prefetch = tuna_cuda_gemv_prefetch();
    const int64_t wpb = GEMV_THREADS / 32;
    const int64_t cap = (int64_t)(be->sm_count > 0 ? be->sm_count : 1) * GEMV_BLOCKS_PER_SM;
    if (multi) {
        int64_t blocks = (j.nwarp + wpb - 1) / wpb;
        if (blocks > cap) blocks = cap;
        const dim3 g((unsigned)blocks), b(GEMV_THREADS);
        if (T == 1 && gemv_knob(KNOB_UR) == 4)
            tuna_cuda_launch(be, "k_gemv_multi", k_gemv_multi<1, 2, true, 4, true>, g, b, smem, x, j, rp);
        else if (T == 1)
            tuna_cuda_launch(be, "k_gemv_multi", k_gemv_multi<1, 2, true, 2, true>, g, b, smem, x, j, rp);
        else
            tuna_cuda_launch(be, "k_gemv_multi", k_gemv_multi<2, 2, true, 2, true>, g, b, smem, x, j, rp);
        return true;
    }
    const int S = gemv_pick_split(j.nwarp, cap * wpb, K / 8), U = gemv_depth();
    int64_t blocks = (j.nwarp * S + wpb - 1) / wpb;
    if (blocks > cap) blocks = cap;
    if (T == 1) launch_split_u<1, 2, true, true>(be, x, &j, (unsigned)blocks, smem, S, U, &rp);
    else launch_split_u<2, 2, true, true>(be, x, &j, (unsigned)blocks, smem, S, U, &rp);
    return true;
}

void tuna_cuda_rmsnorm_qkv_rope_kv(tuna_backend *be, float *const *ys, float *xn, const float *x, const float *nw,
                                   float eps, const struct tuna_weight *const *ws, const float *const *biases,
                                   void *kcache, void *vcache, enum tuna_dtype kv_dtype, const int64_t *pos,
                                   const int64_t *slot, int64_t T, int64_t H, int64_t Hkv, int64_t D, int64_t rot_dim,
                                   const float *inv_freq, float attn_factor)
{
    if (be->sticky || T <= 0) return;
    if (qkv_rope_fused(be, ys, xn, x, nw, eps, ws, biases, kcache, vcache, kv_code(kv_dtype), pos, slot, T, H, Hkv, D,
                       rot_dim, inv_freq, attn_factor))
        return;
    tuna_cuda_rmsnorm_matmul_multi(be, 3, ys, xn, x, nw, eps, ws, biases, T);
    tuna_cuda_rope_kv_store(be, ys[0], ys[1], ys[2], NULL, NULL, eps, kcache, vcache, kv_dtype, pos, slot, T, H, Hkv, D,
                            rot_dim, inv_freq, attn_factor);
}
