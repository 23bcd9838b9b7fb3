/* bench_lora_expand.c — issue #8 (8 adapters at <= 10% cost): the dense LoRA form's expands of a
 * projection group by one k_lora_expand_group launch (src/backend/cuda/lora_expand.cu) against
 * the cuBLAS expand per linear that lora.cu's dense_call runs by default.
 *
 * Shapes (Llama-3-8B, 8 adapters in slots of 16 ranks: M = 128 per linear; slots 1, 3, 5, 7 of
 * rank 8, their ranks 8..15 zero in hm; a token in 9 is without an adapter):
 *   qkv   N 4096/1024/1024, bf16 y, beta 0 (write first)
 *   o     N 4096, float32 y (the residual stream), added onto it
 *   gu    N 14336 x 2, bf16 y, beta 0
 *   down  N 4096, float32 y, added onto it
 * For each shape and T: µs per call replayed from a CUDA graph of REPS calls (B_all rotating among
 * COPIES copies, so the L2 does not hold them) for cuBLAS, the kernel writing (order a; o/down:
 * adding onto the residual, as cuBLAS with beta 1) and the kernel adding onto a 16-bit y (order b);
 * the kernel nodes of one cuBLAS call; the outputs that differ from cuBLAS by more than one
 * rounding of y's type (bf16: one ulp of the larger; float32: 1e-5 relative).
 * Usage: bench_lora_expand [T ...]  (default 64 128 256 512 2048); BENCH_CHUNKS=n fixes the
 * kernel's token chunks (default: its own choice). */
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cuda/lora_expand.h"
#include "bench_cuda_check.h"

#define COPIES 6
#define REPS 30
#define SLOTS 8
#define RS 16

struct shape {
    const char *name;
    int nl, N[3], f32;
};

struct ctx {
    cublasHandle_t h;
    cudaStream_t st;
    const struct shape *sh;
    int T, RU, sms, chunks;
    void *B[COPIES][3], *Y[3], *hm;
    int32_t *ad;
};

static float bf(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* mode 0: cuBLAS; 1: the kernel (add only for float32 y); 2: the kernel adding onto y */
static int one_call(struct ctx *c, int copy, int mode)
{
    const struct shape *sh = c->sh;
    const float one = 1.0f, zero = 0.0f;
    if (mode == 0) {
        for (int i = 0; i < sh->nl; i++) {
            int s = (int)cublasGemmEx(c->h, CUBLAS_OP_T, CUBLAS_OP_N, sh->N[i], c->T, SLOTS * RS, &one,
                                      c->B[copy][i], CUDA_R_16BF, SLOTS * RS, (const char *)c->hm + (size_t)i * SLOTS * RS * 2,
                                      CUDA_R_16BF, c->RU, sh->f32 ? &one : &zero, c->Y[i],
                                      sh->f32 ? CUDA_R_32F : CUDA_R_16BF, sh->N[i], CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
            if (s) return s;
        }
        return 0;
    }
    struct tuna_lora_expand_lin lin[3];
    memset(lin, 0, sizeof lin);
    for (int i = 0; i < sh->nl; i++) {
        lin[i].y = c->Y[i];
        lin[i].B = c->B[copy][i];
        lin[i].N = sh->N[i];
        lin[i].off = i * SLOTS * RS;
        lin[i].n = SLOTS;
        lin[i].rs = RS;
    }
    return tuna_cuda_lora_expand(c->st, c->sms, sh->nl, lin, c->hm, c->RU, c->ad, c->T, 1, sh->f32,
                                 sh->f32 || mode == 2, c->chunks);
}

static cudaGraphExec_t capture(struct ctx *c, int mode, int reps, int *kernels)
{
    cudaGraph_t g = NULL;
    int status = 0;
    CK(cudaStreamBeginCapture(c->st, cudaStreamCaptureModeThreadLocal));
    for (int r = 0; r < reps && !status; r++) status = one_call(c, r % COPIES, mode);
    cudaError_t e = cudaStreamEndCapture(c->st, &g);
    if (e != cudaSuccess || status || !g) {
        (void)cudaGetLastError();
        if (g) cudaGraphDestroy(g);
        printf("capture of mode %d failed (status %d, %s)\n", mode, status, cudaGetErrorString(e));
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
    *kernels = reps ? nk / reps : 0;
    cudaGraphExec_t x = NULL;
    CK(cudaGraphInstantiate(&x, g, 0));
    cudaGraphDestroy(g);
    return x;
}

static double time_graph(struct ctx *c, cudaGraphExec_t x, int reps)
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
    return ms * 1e3 / (5.0 * reps);
}

/* y of every linear set to a fixed pattern (seed) */
static void y_init(struct ctx *c, uint32_t seed)
{
    for (int i = 0; i < c->sh->nl; i++) {
        const size_t n = (size_t)c->sh->N[i] * (size_t)c->T, bytes = n * (c->sh->f32 ? 4 : 2);
        void *h = malloc(bytes);
        if (!h) exit(1);
        uint32_t s = seed * 2654435761u + (uint32_t)i;
        for (size_t j = 0; j < n; j++) {
            s = s * 1664525u + 1013904223u;
            const float v = ((float)((s >> 8) & 0xffff) / 65536.0f - 0.5f) * 0.25f;
            if (c->sh->f32) ((float *)h)[j] = v;
            else {
                uint32_t u;
                memcpy(&u, &v, 4);
                ((uint16_t *)h)[j] = (uint16_t)(u >> 16);
            }
        }
        CK(cudaMemcpy(c->Y[i], h, bytes, cudaMemcpyHostToDevice));
        free(h);
    }
}

/* outputs of the kernel (mode) that differ from cuBLAS's (beta 0 for 16-bit mode 1, else beta 1
 * onto the same y) by more than one rounding; *total: outputs compared; *maxd: the largest
 * difference */
static long compare(struct ctx *c, int mode, size_t *total, double *maxd)
{
    const struct shape *sh = c->sh;
    long bad = 0;
    *total = 0;
    *maxd = 0;
    const float one = 1.0f, zero = 0.0f;
    for (int i = 0; i < sh->nl; i++) {
        const size_t n = (size_t)sh->N[i] * (size_t)c->T, es = sh->f32 ? 4 : 2;
        char *a = malloc(n * es), *b = malloc(n * es);
        if (!a || !b) exit(1);
        const int add = sh->f32 || mode == 2;
        y_init(c, 11u);
        /* reference: cuBLAS (beta 1 when the kernel adds) */
        if (cublasGemmEx(c->h, CUBLAS_OP_T, CUBLAS_OP_N, sh->N[i], c->T, SLOTS * RS, &one, c->B[0][i], CUDA_R_16BF,
                         SLOTS * RS, (const char *)c->hm + (size_t)i * SLOTS * RS * 2, CUDA_R_16BF, c->RU,
                         add ? &one : &zero, c->Y[i], sh->f32 ? CUDA_R_32F : CUDA_R_16BF, sh->N[i], CUBLAS_COMPUTE_32F,
                         CUBLAS_GEMM_DEFAULT))
            return -1;
        CK(cudaMemcpyAsync(a, c->Y[i], n * es, cudaMemcpyDeviceToHost, c->st));
        CK(cudaStreamSynchronize(c->st));
        y_init(c, 11u);
        if (!add) CK(cudaMemset(c->Y[i], 0x7f, n * es)); /* garbage: beta 0 must overwrite */
        if (one_call(c, 0, mode)) return -1;
        CK(cudaMemcpyAsync(b, c->Y[i], n * es, cudaMemcpyDeviceToHost, c->st));
        CK(cudaStreamSynchronize(c->st));
        for (size_t j = 0; j < n; j++) {
            double x, y, tol;
            if (sh->f32) {
                x = ((float *)a)[j], y = ((float *)b)[j];
                tol = 1e-5 * fmax(fabs(x), fabs(y)) + 1e-7;
            } else {
                x = bf(((uint16_t *)a)[j]), y = bf(((uint16_t *)b)[j]);
                const double m = fmax(fabs(x), fabs(y));
                tol = m > 0 ? ldexp(1.0, ilogb(m) - 7) : 0; /* one bf16 ulp of the larger */
            }
            const double d = fabs(x - y);
            if (!(d <= tol)) bad++;
            if (d > *maxd || d != d) *maxd = d;
        }
        *total += n;
        free(a);
        free(b);
    }
    return bad;
}

int main(int argc, char **argv)
{
    static const int def[] = {64, 128, 256, 512, 2048};
    int Ts[32], nT = 0;
    const int maxT = bench_token_counts(argc, argv, "bench_lora_expand", def, (int)(sizeof def / sizeof def[0]), Ts, &nT);
    if (maxT < 0) return 2;
    int ndev = 0;
    if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) {
        printf("SKIP: no CUDA device\n");
        return 0;
    }
    const struct shape shapes[] = {
        {"qkv", 3, {4096, 1024, 1024}, 0},
        {"o", 1, {4096, 0, 0}, 1},
        {"gu", 2, {14336, 14336, 0}, 0},
        {"down", 1, {4096, 0, 0}, 1},
    };
    const int nshape = (int)(sizeof shapes / sizeof shapes[0]);
    struct cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    struct ctx c;
    memset(&c, 0, sizeof c);
    c.sms = prop.multiProcessorCount;
    const char *ch = getenv("BENCH_CHUNKS");
    c.chunks = ch ? atoi(ch) : 0;
    if (cublasCreate(&c.h) != CUBLAS_STATUS_SUCCESS) return 1;
    int ver = 0;
    (void)cublasGetVersion(c.h, &ver);
    printf("device %s, %d SMs, cuBLAS %d, chunks %s\n", prop.name, prop.multiProcessorCount, ver, ch ? ch : "auto");
    const size_t ws_bytes = (size_t)32 << 20;
    void *ws = NULL;
    CK(cudaMalloc(&ws, ws_bytes));
    if (cublasSetWorkspace(c.h, ws, ws_bytes)) return 1;
    CK(cudaStreamCreate(&c.st));
    if (cublasSetStream(c.h, c.st)) return 1;
    /* hm [maxT, 3 * 128]: token t's slot a = (5t + 3) % 9 - 1 (-1: none); its columns hold random
     * bf16 values (ranks 8..15 zero for odd slots), every other column zero */
    const int RUmax = 3 * SLOTS * RS;
    uint16_t *h = calloc((size_t)maxT * RUmax, 2);
    int32_t *ad = malloc((size_t)maxT * 4);
    if (!h || !ad) return 1;
    uint32_t s = 12345u;
    for (int t = 0; t < maxT; t++) {
        ad[t] = (5 * t + 3) % 9 - 1;
        if (ad[t] < 0) continue;
        for (int l = 0; l < 3; l++)
            for (int j = 0; j < ((ad[t] & 1) ? 8 : RS); j++) {
                s = s * 1664525u + 1013904223u;
                h[(size_t)t * RUmax + l * SLOTS * RS + ad[t] * RS + j] = (uint16_t)(((s >> 31) << 15) | (0x3e00u + ((s >> 16) & 0x7fu)));
            }
    }
    CK(cudaMalloc(&c.hm, (size_t)maxT * RUmax * 2));
    CK(cudaMalloc((void **)&c.ad, (size_t)maxT * 4));
    CK(cudaMemcpy(c.ad, ad, (size_t)maxT * 4, cudaMemcpyHostToDevice));
    free(ad);
    for (int i = 0; i < 3; i++) CK(cudaMalloc(&c.Y[i], (size_t)maxT * 14336 * 4));
    printf("%-5s %5s | %8s %4s | %8s %8s | %6s %6s | %s\n", "shape", "T", "cublas", "kern", "k_a_us", "k_b_us", "gain_a",
           "gain_b", "check (a; b)");
    for (int si = 0; si < nshape; si++) {
        const struct shape *sh = &shapes[si];
        c.sh = sh;
        c.RU = sh->nl * SLOTS * RS;
        /* hm with this shape's row width RU: the first RU columns of each row of h */
        uint16_t *hh = malloc((size_t)maxT * c.RU * 2);
        if (!hh) return 1;
        for (int t = 0; t < maxT; t++) memcpy(hh + (size_t)t * c.RU, h + (size_t)t * RUmax, (size_t)c.RU * 2);
        CK(cudaMemcpy(c.hm, hh, (size_t)maxT * c.RU * 2, cudaMemcpyHostToDevice));
        free(hh);
        for (int cp = 0; cp < COPIES; cp++)
            for (int i = 0; i < sh->nl; i++)
                c.B[cp][i] = bench_dev_fill_bf16((size_t)sh->N[i] * SLOTS * RS * 2, 200u + (uint32_t)(cp * 3 + i));
        for (int ti = 0; ti < nT; ti++) {
            c.T = Ts[ti];
            y_init(&c, 3u);
            int k0 = 0, k1 = 0, k2 = 0;
            cudaGraphExec_t x0 = capture(&c, 0, REPS, &k0), x1 = capture(&c, 1, REPS, &k1);
            cudaGraphExec_t x2 = sh->f32 ? NULL : capture(&c, 2, REPS, &k2);
            const double t0 = x0 ? time_graph(&c, x0, REPS) : -1, t1 = x1 ? time_graph(&c, x1, REPS) : -1;
            const double t2 = x2 ? time_graph(&c, x2, REPS) : -1;
            size_t tot1 = 0, tot2 = 0;
            double m1 = 0, m2 = 0;
            const long b1 = compare(&c, 1, &tot1, &m1), b2 = sh->f32 ? 0 : compare(&c, 2, &tot2, &m2);
            printf("%-5s %5d | %8.2f %4d | %8.2f %8.2f | %+5.1f%% %+5.1f%% | %ld of %zu off (max %.3g); %ld of %zu (max %.3g)\n",
                   sh->name, c.T, t0, k0, t1, t2, t0 > 0 && t1 > 0 ? 100.0 * (t0 / t1 - 1.0) : 0.0,
                   t0 > 0 && t2 > 0 ? 100.0 * (t0 / t2 - 1.0) : 0.0, b1, tot1, m1, b2, tot2, m2);
            fflush(stdout);
            if (x0) cudaGraphExecDestroy(x0);
            if (x1) cudaGraphExecDestroy(x1);
            if (x2) cudaGraphExecDestroy(x2);
        }
        for (int cp = 0; cp < COPIES; cp++)
            for (int i = 0; i < sh->nl; i++) cudaFree(c.B[cp][i]);
    }
    free(h);
    cudaFree(c.hm);
    cudaFree(c.ad);
    for (int i = 0; i < 3; i++) cudaFree(c.Y[i]);
    cudaFree(ws);
    cublasDestroy(c.h);
    return 0;
}
