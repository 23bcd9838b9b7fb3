/* bench_lora_shrink.c — issue #8: does one launch of the clustered shrink+mask kernel
 * (lora_shrink.cu, tuna_cuda_shrink2) beat the dense LoRA form's cuBLAS shrink (float32 out,
 * with cuBLAS's split-K reduce) + k_lora_mask that lora.cu's dense_call runs per projection group?
 *
 * Groups (Llama-3-8B, 8 adapters in slots of 16 ranks, bf16): qkv K 4096, 3 linears (M 384);
 * o K 4096 (M 128); gu K 4096, 2 linears (M 256); down K 14336 (M 128). Adapters' ranks 16 or 8
 * (slot % 3 == 2: the mask must zero ranks 8..15), scales per slot; tokens' adapters random in
 * -1..7 (-1: no adapter). For each group and T: the reference (cublasGemmEx as dense_call calls
 * it + the mask) and the kernel at its own pick and at fixed (bn, cs), each replayed from a CUDA
 * graph of 30 calls (µs per call; A rotates among copies worth > 128 MB so it comes from DRAM as
 * in a serving step, x stays the same), kernels per call in the graph, and the 16-bit outputs
 * against the reference (elements that differ, the largest difference in units of the last place)
 * and against a second eager run (must be identical).
 * Usage: bench_lora_shrink [T ...]  (default 64 128 256 512 2048) */
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "backend/cuda/lora_shrink.h"
#include "bench_cuda_check.h"

#define REPS 30
#define MAXCOPY 64

struct group {
    const char *name;
    int K, nl;
};

struct ctx {
    cublasHandle_t h;
    cudaStream_t st;
    int T, K, M, nA;
    void *A[MAXCOPY], *x, *hm;
    float *h32;
    int32_t *ad;
    struct tuna_shrink_lin lins[3];
    int nl;
};

/* variant: -1 the reference; else the kernel with (bn, cs) = cfg[variant] */
static int cfg[][2] = {{0, 0}, {-1, -1}, {64, 4}, {64, 8}, {64, 16}, {128, 4}, {128, 8}, {128, 16}}; /* -1: pick + PDL */
#define NCFG ((int)(sizeof cfg / sizeof cfg[0]))

static int one_call(struct ctx *c, int copy, int variant)
{
    if (variant < 0) {
        const float one = 1.0f, zero = 0.0f;
        int s = (int)cublasGemmEx(c->h, CUBLAS_OP_T, CUBLAS_OP_N, c->M, c->T, c->K, &one, c->A[copy], CUDA_R_16BF, c->K,
                                  c->x, CUDA_R_16BF, c->K, &zero, c->h32, CUDA_R_32F, c->M, CUBLAS_COMPUTE_32F,
                                  CUBLAS_GEMM_DEFAULT);
        if (s) return s;
        return -(int)tuna_cuda_shrink2_mask_ref(c->st, 1, c->hm, c->h32, c->M, 0, c->M, c->T, c->ad, c->lins, c->nl);
    }
    const bool pdl = cfg[variant][0] < 0;
    return -(int)tuna_cuda_shrink2(c->st, pdl, 1, c->hm, c->M, c->x, c->K, c->A[copy], 0, c->M, c->T, c->ad, c->lins,
                                   c->nl, pdl ? 0 : cfg[variant][0], pdl ? 0 : cfg[variant][1]);
}

static cudaGraphExec_t capture(struct ctx *c, int variant, int *kernels, int *status)
{
    cudaGraph_t g = NULL;
    *status = 0;
    if (cudaStreamBeginCapture(c->st, cudaStreamCaptureModeThreadLocal) != cudaSuccess) return NULL;
    for (int r = 0; r < REPS && !*status; r++) *status = one_call(c, r % c->nA, variant);
    cudaError_t e = cudaStreamEndCapture(c->st, &g);
    if (e != cudaSuccess || *status || !g) {
        (void)cudaGetLastError();
        if (g) cudaGraphDestroy(g);
        if (!*status) *status = -(int)e;
        return NULL;
    }
    size_t nn = 0;
    CK(cudaGraphGetNodes(g, NULL, &nn));
    cudaGraphNode_t *nodes = calloc(nn ? nn : 1, sizeof *nodes);
    if (!nodes) exit(1);
    CK(cudaGraphGetNodes(g, nodes, &nn));
    int nk = 0;
    for (size_t i = 0; i < nn; i++) {
        enum cudaGraphNodeType t;
        CK(cudaGraphNodeGetType(nodes[i], &t));
        nk += t == cudaGraphNodeTypeKernel;
    }
    free(nodes);
    *kernels = nk / REPS;
    cudaGraphExec_t x = NULL;
    CK(cudaGraphInstantiate(&x, g, 0));
    cudaGraphDestroy(g);
    return x;
}

static double time_graph(struct ctx *c, cudaGraphExec_t x)
{
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    CK(cudaGraphLaunch(x, c->st));
    CK(cudaEventRecord(e0, c->st));
    for (int i = 0; i < 5; i++) CK(cudaGraphLaunch(x, c->st));
    CK(cudaEventRecord(e1, c->st));
    CK(cudaEventSynchronize(e1));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    return ms * 1e3 / (5.0 * REPS);
}

/* hm of one eager call on copy 0 into out (host, T x M) */
static int run_once(struct ctx *c, int variant, uint16_t *out)
{
    const size_t n = (size_t)c->T * (size_t)c->M;
    CK(cudaMemsetAsync(c->hm, 0xff, n * 2, c->st));
    const int s = one_call(c, 0, variant);
    CK(cudaMemcpyAsync(out, c->hm, n * 2, cudaMemcpyDeviceToHost, c->st));
    CK(cudaStreamSynchronize(c->st));
    return s;
}

/* bf16 bits as a monotonic integer (for the distance in ulps) */
static long ord16(uint16_t v) { return v & 0x8000 ? -(long)(v & 0x7fff) : (long)v; }

int main(int argc, char **argv)
{
    static const int def[] = {64, 128, 256, 512, 2048};
    int Ts[32], nT = 0;
    const int maxT = bench_token_counts(argc, argv, "bench_lora_shrink", def, (int)(sizeof def / sizeof def[0]), Ts, &nT);
    if (maxT < 0) return 2;
    int ndev = 0;
    if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) {
        printf("SKIP: no CUDA device\n");
        return 0;
    }
    struct cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    if (prop.major < 9) {
        printf("SKIP: the kernel needs compute capability 9.0 (found %d.%d)\n", prop.major, prop.minor);
        return 0;
    }
    const struct group groups[] = {{"qkv", 4096, 3}, {"o", 4096, 1}, {"gu", 4096, 2}, {"down", 14336, 1}};
    struct ctx c;
    memset(&c, 0, sizeof c);
    int ver = 0;
    if (cublasCreate(&c.h) != CUBLAS_STATUS_SUCCESS) return 1;
    (void)cublasGetVersion(c.h, &ver);
    printf("device %s, %d SMs, cuBLAS %d\n", prop.name, prop.multiProcessorCount, ver);
    const size_t ws_bytes = (size_t)32 << 20;
    void *ws = NULL;
    CK(cudaMalloc(&ws, ws_bytes));
    if (cublasSetWorkspace(c.h, ws, ws_bytes)) return 1;
    CK(cudaStreamCreate(&c.st));
    if (cublasSetStream(c.h, c.st)) return 1;
    /* descriptors: 8 slots per linear, ranks 16 or 8, scales 0.5 .. 2.25 */
    struct tuna_lora_w hw[3][8];
    memset(hw, 0, sizeof hw);
    struct tuna_lora_w *dw = NULL;
    CK(cudaMalloc((void **)&dw, sizeof hw));
    for (int i = 0; i < 3; i++)
        for (int s = 0; s < 8; s++) hw[i][s].r = s % 3 == 2 ? 8 : 16, hw[i][s].scale = 0.5f + 0.25f * (float)s + 0.125f * i;
    CK(cudaMemcpy(dw, hw, sizeof hw, cudaMemcpyHostToDevice));
    int32_t *had = malloc((size_t)maxT * sizeof *had);
    if (!had) return 1;
    uint32_t rs = 12345u;
    for (int t = 0; t < maxT; t++) rs = rs * 1664525u + 1013904223u, had[t] = (int32_t)((rs >> 16) % 9) - 1;
    CK(cudaMalloc((void **)&c.ad, (size_t)maxT * sizeof *had));
    CK(cudaMemcpy(c.ad, had, (size_t)maxT * sizeof *had, cudaMemcpyHostToDevice));
    c.x = bench_dev_fill_bf16((size_t)maxT * 14336 * 2, 7u);
    CK(cudaMalloc((void **)&c.h32, (size_t)maxT * 384 * 4));
    CK(cudaMalloc(&c.hm, (size_t)maxT * 384 * 2));
    uint16_t *ref = malloc((size_t)maxT * 384 * 2), *got = malloc((size_t)maxT * 384 * 2),
             *again = malloc((size_t)maxT * 384 * 2);
    if (!ref || !got || !again) return 1;
    printf("%-5s %5s | %8s %4s |", "group", "T", "ref_us", "kern");
    for (int v = 0; v < NCFG; v++) {
        if (cfg[v][0] > 0) printf(" %5dx%-2d", cfg[v][0], cfg[v][1]);
        else printf(cfg[v][0] ? "  pick+pdl" : "  pick(..)");
    }
    printf(" | best vs ref | bits vs ref (all configs), repeat\n");
    for (int gi = 0; gi < 4; gi++) {
        const struct group *g = &groups[gi];
        c.K = g->K;
        c.nl = g->nl;
        c.M = 128 * g->nl;
        for (int i = 0; i < 3; i++) {
            c.lins[i].w = i < g->nl ? dw + i * 8 : NULL;
            c.lins[i].off = 128 * i;
            c.lins[i].n = i < g->nl ? 8 : 0;
            c.lins[i].rs = 16;
        }
        const size_t abytes = (size_t)c.M * (size_t)c.K * 2;
        c.nA = (int)((((size_t)128 << 20) + abytes - 1) / abytes);
        if (c.nA > MAXCOPY) c.nA = MAXCOPY;
        if (c.nA < 2) c.nA = 2;
        for (int cp = 0; cp < c.nA; cp++) c.A[cp] = bench_dev_fill_bf16(abytes, 100u + (uint32_t)cp);
        for (int ti = 0; ti < nT; ti++) {
            c.T = Ts[ti];
            int kr = 0, sr = 0;
            cudaGraphExec_t xr = capture(&c, -1, &kr, &sr);
            const double tr = xr ? time_graph(&c, xr) : -1.0;
            if (xr) cudaGraphExecDestroy(xr);
            printf("%-5s %5d | %8.2f %4d |", g->name, c.T, tr, kr);
            double best = 0;
            int pb = 0, pc = 0;
            tuna_cuda_shrink2_pick(c.T, c.M, c.K, &pb, &pc);
            for (int v = 0; v < NCFG; v++) {
                int k = 0, s = 0;
                cudaGraphExec_t xv = capture(&c, v, &k, &s);
                const double tv = xv ? time_graph(&c, xv) : -1.0;
                if (xv) cudaGraphExecDestroy(xv);
                if (tv > 0 && (best == 0 || tv < best)) best = tv;
                printf(" %8.2f", xv ? tv : -(double)s);
            }
            printf(" | %+6.1f%% |", tr > 0 && best > 0 ? 100.0 * (best / tr - 1.0) : 0.0);
            const size_t n = (size_t)c.T * (size_t)c.M;
            if (run_once(&c, -1, ref)) {
                printf(" reference failed\n");
                continue;
            }
            long d = 0, mu = 0, unrep = 0;
            for (int v = 0; v < NCFG; v++) {
                if (run_once(&c, v, got) || run_once(&c, v, again)) {
                    printf(" [%d] failed", v);
                    continue;
                }
                for (size_t j = 0; j < n; j++) {
                    if (got[j] == ref[j]) continue;
                    d++;
                    const long u = labs(ord16(got[j]) - ord16(ref[j]));
                    if (u > mu) mu = u;
                }
                unrep += memcmp(got, again, n * 2) != 0;
            }
            printf(" %ld/%zu x %d differ, max %ld ulp, %s (pick %dx%d)\n", d, n, NCFG, mu,
                   unrep ? "NOT REPEATED" : "repeat ok", pb, pc);
            fflush(stdout);
        }
        for (int cp = 0; cp < c.nA; cp++) cudaFree(c.A[cp]);
    }
    free(ref), free(got), free(again), free(had);
    cudaFree(c.x), cudaFree(c.h32), cudaFree(c.hm), cudaFree(c.ad), cudaFree(dw), cudaFree(ws);
    cublasDestroy(c.h);
    return 0;
}
