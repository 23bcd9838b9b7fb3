/* bench_queue_latency.cu — how long a dependent load waits while every SM streams weights through
 * the bulk copy engine: the question behind each persistent batch-1 kernel of issue #6 (the
 * twenty-eighth session's k_q4_om found ~1 us per L2 round trip on its critical path instead of
 * ~0.2 while its rings kept ~13 MB in flight; docs/PERFORMANCE.md, "NF4, thirty-first session").
 *
 * Every block (one per SM) has one streamer lane that keeps D copies of 16 KB in flight from a
 * 2 GB buffer into a shared-memory ring (cp.async.bulk, the copies k_q4_r issues), for a fixed
 * number of copies that outlasts the measurement. One lane of block 0 waits 20 us, then walks a
 * chain of dependent loads (each index read by the previous load, ld.global.cg): through L2 (32
 * lines read just before, the stream marked evict_first so it does not push them out) or from
 * DRAM (lines 1 MB + 128 B apart in a region flushed out of L2). Printed per D: the bytes in
 * flight, the streamers' rate, and the time per hop with block 0's own streamer on and off
 * ("quiet": is the wait caused by this SM's copies or by everyone's?).
 *
 * sm_90 only (bulk copies); prints a message and exits 0 elsewhere or without a GPU. */
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "backend/cuda/bulk.cuh" /* the mbarriers and bulk copies k_q4_r uses */

#define QL_CH 16384u /* bytes per copy */
#define QL_DMAX 12
#define QL_L2LINES 32

struct ql_param {
    const uint8_t *big; /* the streamed buffer */
    unsigned long long nch; /* its chunks of QL_CH */
    unsigned long long per_block; /* copies per streamer */
    const uint32_t *chain; /* the chased array (indices in uint32 units) */
    int hops, depth, quiet0, warm;
    unsigned long long *out; /* [0] chase ns, [1] the last index (kept live), [2], [3] chase start/end */
    unsigned long long *span; /* [blocks][2] the streamer's first issue and last completion */
};

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
static __device__ __forceinline__ unsigned long long ql_now(void)
{
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

static __device__ __forceinline__ uint32_t ql_ld(const uint32_t *p)
{
    uint32_t v;
    asm volatile("ld.global.cg.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}
#endif

__global__ void __launch_bounds__(64, 1) k_ql(const __grid_constant__ struct ql_param P)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    extern __shared__ __align__(128) uint8_t ring[];
    __shared__ uint64_t bar[QL_DMAX];
    const int tid = threadIdx.x;
    if (tid == 0) {
        for (int s = 0; s < P.depth; s++) q4s_bar_init(&bar[s], 1);
        q4s_bar_fence_init();
    }
    __syncthreads();
    if (tid == 0 && P.depth > 0 && !(blockIdx.x == 0 && P.quiet0)) {
        uint64_t pol;
        asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
        unsigned long long c = blockIdx.x, issued = 0, done = 0;
        const unsigned long long n = P.per_block;
        auto issue = [&](int s) {
            q4s_bar_expect(&bar[s], QL_CH);
            q4s_copy(ring + (size_t)s * QL_CH, P.big + (c % P.nch) * QL_CH, QL_CH, &bar[s], true, pol);
            c += gridDim.x;
            issued++;
        };
        P.span[blockIdx.x * 2] = ql_now();
        for (int s = 0; s < P.depth && issued < n; s++) issue(s);
        int s = 0;
        uint32_t ph = 0;
        while (done < issued) {
            q4s_bar_wait(&bar[s], ph);
            done++;
            if (issued < n) issue(s);
            if (++s == P.depth) s = 0, ph ^= 1u;
        }
        P.span[blockIdx.x * 2 + 1] = ql_now();
    }
    if (blockIdx.x == 0 && tid == 32) {
        uint32_t idx = 0;
        for (int h = 0; h < P.warm; h++) idx = ql_ld(P.chain + idx); /* brings the L2 chain's lines in */
        const unsigned long long t0 = ql_now();
        while (ql_now() - t0 < 20000ull) {
        }
        const unsigned long long a = ql_now();
        for (int h = 0; h < P.hops; h++) idx = ql_ld(P.chain + idx);
        const unsigned long long e = ql_now();
        P.out[0] = e - a, P.out[1] = idx, P.out[2] = a, P.out[3] = e;
    }
#else
    (void)P;
#endif
}

/* reads n bytes (pushes the DRAM chain's lines out of L2) */
__global__ void k_ql_flush(const uint4 *p, size_t n16, unsigned long long *sink)
{
    uint4 acc = {0, 0, 0, 0};
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n16; i += (size_t)gridDim.x * blockDim.x) {
        const uint4 v = p[i];
        acc.x ^= v.x, acc.y ^= v.y, acc.z ^= v.z, acc.w ^= v.w;
    }
    if ((acc.x ^ acc.y ^ acc.z ^ acc.w) == 0x9e3779b9u) *sink = 1; /* keeps the loads */
}

#define QL_CHECK(x)                                                                                                    \
    do {                                                                                                               \
        cudaError_t e_ = (x);                                                                                          \
        if (e_ != cudaSuccess) {                                                                                       \
            fprintf(stderr, "bench_queue_latency: %s: %s\n", #x, cudaGetErrorString(e_));                             \
            return 1;                                                                                                  \
        }                                                                                                              \
    } while (0)

int main(void)
{
    int ndev = 0;
    if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) {
        printf("bench_queue_latency: no CUDA device; nothing measured\n");
        return 0;
    }
    cudaDeviceProp prop;
    QL_CHECK(cudaGetDeviceProperties(&prop, 0));
    if (prop.major < 9) {
        printf("bench_queue_latency: %s is compute capability %d.%d; the bulk copies need 9.0\n", prop.name, prop.major,
               prop.minor);
        return 0;
    }
    const int nsm = prop.multiProcessorCount;
    const size_t big_bytes = (size_t)2 << 30, dram_bytes = (size_t)512 << 20, flush_bytes = (size_t)256 << 20;
    uint8_t *big, *flush;
    uint32_t *l2c, *drc;
    unsigned long long *out, *span, *sink;
    QL_CHECK(cudaMalloc((void **)&big, big_bytes));
    QL_CHECK(cudaMalloc((void **)&flush, flush_bytes));
    QL_CHECK(cudaMalloc((void **)&drc, dram_bytes));
    QL_CHECK(cudaMalloc((void **)&l2c, QL_L2LINES * 128));
    QL_CHECK(cudaMalloc((void **)&out, 4 * sizeof *out));
    QL_CHECK(cudaMalloc((void **)&span, (size_t)nsm * 2 * sizeof *span));
    QL_CHECK(cudaMalloc((void **)&sink, sizeof *sink));
    QL_CHECK(cudaMemset(big, 0x5a, big_bytes));
    QL_CHECK(cudaMemset(flush, 0x33, flush_bytes));
    /* the L2 chain: line i -> line (i * 13 + 7) % 32 (one cycle over the 32 lines), 32 uint32 per line */
    uint32_t h_l2[QL_L2LINES * 32] = {0};
    for (uint32_t i = 0; i < QL_L2LINES; i++) h_l2[i * 32] = ((i * 13u + 7u) % QL_L2LINES) * 32u;
    QL_CHECK(cudaMemcpy(l2c, h_l2, sizeof h_l2, cudaMemcpyHostToDevice));
    /* the DRAM chain: hop h at byte h * (1 MB + 128) of the region, 480 hops */
    const int dhops = 480;
    const size_t dstride = ((size_t)1 << 20) + 128;
    uint32_t *h_dr = (uint32_t *)calloc(dram_bytes / 4, 4);
    unsigned long long *sp = (unsigned long long *)malloc((size_t)nsm * 2 * sizeof *sp);
    if (!h_dr || !sp) {
        fprintf(stderr, "bench_queue_latency: out of host memory for the chain (%zu MB)\n", dram_bytes >> 20);
        return 1;
    }
    for (int h = 0; h < dhops; h++) h_dr[(size_t)h * dstride / 4] = (uint32_t)((size_t)(h + 1) * dstride / 4);
    QL_CHECK(cudaMemcpy(drc, h_dr, dram_bytes, cudaMemcpyHostToDevice));
    free(h_dr);
    QL_CHECK(cudaFuncSetAttribute(k_ql, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)(QL_DMAX * QL_CH)));

    printf("bench_queue_latency: %s, %d SMs; every SM streams D copies of %u KB in flight (cp.async.bulk, evict_first)"
           "\n",
           prop.name, nsm, QL_CH / 1024);
    printf("| D | in flight | stream rate | L2 hop (block 0 streams / quiet) | DRAM hop (streams / quiet) |\n");
    printf("|---|---|---|---|---|\n");
    const int depths[] = {0, 1, 2, 3, 4, 6, 8, 12};
    for (size_t di = 0; di < sizeof depths / sizeof *depths; di++) {
        const int D = depths[di];
        double hop[2][2] = {{0, 0}, {0, 0}}, rate = 0;
        for (int kind = 0; kind < 2; kind++)    /* 0: L2 chain, 1: DRAM chain */
            for (int quiet = 0; quiet < 2; quiet++) {
                if (D == 0 && quiet) {
                    hop[kind][1] = hop[kind][0];
                    continue;
                }
                k_ql_flush<<<nsm * 4, 512>>>((const uint4 *)flush, flush_bytes / 16, sink);
                struct ql_param P;
                P.big = big, P.nch = big_bytes / QL_CH;
                P.chain = kind ? drc : l2c;
                P.hops = kind ? dhops : 512;
                P.warm = kind ? 0 : 64;
                P.depth = D, P.quiet0 = quiet;
                /* enough copies to outlast the chase: ~1.5 ms at 3 TB/s */
                P.per_block = (unsigned long long)(4.5e9 / QL_CH / nsm);
                P.out = out, P.span = span;
                QL_CHECK(cudaMemset(span, 0, (size_t)nsm * 2 * sizeof *span));
                k_ql<<<nsm, 64, (size_t)(D > 0 ? D : 1) * QL_CH>>>(P);
                QL_CHECK(cudaGetLastError());
                QL_CHECK(cudaDeviceSynchronize());
                unsigned long long o[4];
                QL_CHECK(cudaMemcpy(o, out, sizeof o, cudaMemcpyDeviceToHost));
                QL_CHECK(cudaMemcpy(sp, span, (size_t)nsm * 2 * sizeof *sp, cudaMemcpyDeviceToHost));
                hop[kind][quiet] = (double)o[0] / P.hops;
                if (D > 0) {
                    unsigned long long t0 = ~0ull, t1 = 0, endmin = ~0ull;
                    int ns = 0;
                    for (int b = 0; b < nsm; b++) {
                        if (!sp[2 * b]) continue;
                        ns++;
                        t0 = sp[2 * b] < t0 ? sp[2 * b] : t0;
                        t1 = sp[2 * b + 1] > t1 ? sp[2 * b + 1] : t1;
                        endmin = sp[2 * b + 1] < endmin ? sp[2 * b + 1] : endmin;
                    }
                    if (kind == 0 && quiet == 0) rate = (double)ns * P.per_block * QL_CH / (double)(t1 - t0); /* GB/s */
                    if (endmin < o[3])
                        fprintf(stderr, "D %d: a streamer ended %.1f us before the chase did: hop time too low\n", D,
                                (double)(o[3] - endmin) / 1000.0);
                }
            }
        printf("| %d | %.1f MB | %.0f GB/s | %.0f / %.0f ns | %.0f / %.0f ns |\n", D,
               (double)D * QL_CH * nsm / 1e6, rate, hop[0][0], hop[0][1], hop[1][0], hop[1][1]);
        fflush(stdout);
    }
    free(sp);
    return 0;
}
