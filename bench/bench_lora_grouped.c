/* bench_lora_grouped.c — issue #8 (8 adapters at <= 10% cost): does cuBLAS's grouped GEMM
 * (cublasGemmGroupedBatchedEx) run the dense LoRA form's per-group GEMMs in fewer launches and no
 * slower than the separate cublasGemmEx calls lora.cu makes today?
 *
 * Shapes (Llama-3-8B, 8 adapters of rank 16 in slots of 16 ranks: M = 128 per linear; bf16 in and
 * out, float32 compute, y^T[N,T] = W[N,K] x^T[K,T] as matmul16's column-major view):
 *   qkv_exp   the q/k/v LoRA expands: N 4096/1024/1024, K 128, hm's rows 384 wide, beta 0
 *   qkv_prj1  the q/k/v projections onto their LoRA terms: K 4096, beta 1
 *   qkv_prj0  the same with beta 0 (the no-adapter path's three GEMMs)
 *   gu_exp    gate/up expands: N 14336 x 2, K 128, hm 256 wide, beta 0
 *   gu_prj1   gate/up projections, beta 1;  gu_prj0: beta 0
 * For each shape and T: the per-call time of the separate GEMMs and of one grouped call (one group
 * per linear, group size 1), both replayed from a CUDA graph of `reps` calls (what a serving
 * decode step does) and issued eagerly; the kernels one call leaves in a captured graph; whether
 * the two give the same bits. Weights rotate among 3 copies (the 50 MB L2 does not hold them).
 * Usage: bench_lora_grouped [T ...]  (default 64 128 256 512 2048) */
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench_cuda_check.h"

#define COPIES 3
#define REPS 30

struct shape {
    const char *name;
    int n, N[3], K, ldb; /* ldb: the width of the B operand's rows (hm: RU; x: K) */
    int beta1, lora;     /* lora: B is hm at column offsets sum(K) */
};

struct ctx {
    cublasHandle_t h;
    cudaStream_t st;
    const struct shape *sh;
    int T;
    void *A[COPIES][3], *B[3], *C[3];
    void **dA[COPIES], **dB, **dC; /* device pointer arrays (fixed: graph replay reads them) */
};

static int one_call(struct ctx *c, int copy, int grouped)
{
    const struct shape *sh = c->sh;
    const float one = 1.0f, zero = 0.0f;
    const float *beta = sh->beta1 ? &one : &zero;
    if (!grouped) {
        for (int i = 0; i < sh->n; i++) {
            int s = (int)cublasGemmEx(c->h, CUBLAS_OP_T, CUBLAS_OP_N, sh->N[i], c->T, sh->K, &one, c->A[copy][i],
                                      CUDA_R_16BF, sh->K, c->B[i], CUDA_R_16BF, sh->ldb, beta, c->C[i], CUDA_R_16BF,
                                      sh->N[i], CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
            if (s) return s;
        }
        return 0;
    }
    cublasOperation_t ta[3], tb[3];
    int m[3], n[3], k[3], lda[3], ldb[3], ldc[3], gs[3];
    float al[3], be[3];
    for (int i = 0; i < sh->n; i++) {
        ta[i] = CUBLAS_OP_T, tb[i] = CUBLAS_OP_N;
        m[i] = sh->N[i], n[i] = c->T, k[i] = sh->K;
        lda[i] = sh->K, ldb[i] = sh->ldb, ldc[i] = sh->N[i];
        gs[i] = 1;
        al[i] = one, be[i] = *beta;
    }
    return (int)cublasGemmGroupedBatchedEx(c->h, ta, tb, m, n, k, al, (const void *const *)c->dA[copy], CUDA_R_16BF,
                                           lda, (const void *const *)c->dB, CUDA_R_16BF, ldb, be, c->dC, CUDA_R_16BF,
                                           ldc, sh->n, gs, CUBLAS_COMPUTE_32F);
}

/* a graph of `reps` calls (copies rotating); NULL when capture fails. kernels: kernel nodes per call */
static cudaGraphExec_t capture(struct ctx *c, int grouped, int reps, int *kernels, int *status)
{
    cudaGraph_t g = NULL;
    *status = 0;
    if (cudaStreamBeginCapture(c->st, cudaStreamCaptureModeThreadLocal) != cudaSuccess) return NULL;
    for (int r = 0; r < reps && !*status; r++) *status = one_call(c, r % COPIES, grouped);
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
    *kernels = reps ? nk / reps : 0;
    cudaGraphExec_t x = NULL;
    CK(cudaGraphInstantiate(&x, g, 0));
    cudaGraphDestroy(g);
    return x;
}

/* A timed span of stream st: span_begin records its start, span_end_ms waits for its end and gives
 * the milliseconds between the two. */
struct span {
    cudaEvent_t e0, e1;
};

static void span_begin(struct span *t, cudaStream_t st)
{
    CK(cudaEventCreate(&t->e0));
    CK(cudaEventCreate(&t->e1));
    CK(cudaEventRecord(t->e0, st));
}

static double span_end_ms(struct span *t, cudaStream_t st)
{
    CK(cudaEventRecord(t->e1, st));
    CK(cudaEventSynchronize(t->e1));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, t->e0, t->e1));
    cudaEventDestroy(t->e0);
    cudaEventDestroy(t->e1);
    return ms;
}

static double time_graph(struct ctx *c, cudaGraphExec_t x, int reps)
{
    struct span t;
    CK(cudaGraphLaunch(x, c->st));
    span_begin(&t, c->st);
    for (int i = 0; i < 5; i++) CK(cudaGraphLaunch(x, c->st));
    return span_end_ms(&t, c->st) * 1e3 / (5.0 * reps);
}

static double time_eager(struct ctx *c, int grouped, int reps)
{
    struct span t;
    for (int r = 0; r < 3; r++) (void)one_call(c, r % COPIES, grouped);
    span_begin(&t, c->st);
    for (int r = 0; r < reps; r++) (void)one_call(c, r % COPIES, grouped);
    return span_end_ms(&t, c->st) * 1e3 / reps;
}

/* bf16 elements of the outputs that differ between one separate and one grouped call */
static long compare(struct ctx *c, size_t *total)
{
    const struct shape *sh = c->sh;
    long diff = 0;
    *total = 0;
    for (int i = 0; i < sh->n; i++) {
        size_t n = (size_t)sh->N[i] * (size_t)c->T;
        uint16_t *a = malloc(n * 2), *b = malloc(n * 2);
        if (!a || !b) exit(1);
        CK(cudaMemsetAsync(c->C[i], 0, n * 2, c->st));
        if (one_call(c, 0, 0)) return -1;
        CK(cudaMemcpyAsync(a, c->C[i], n * 2, cudaMemcpyDeviceToHost, c->st));
        CK(cudaMemsetAsync(c->C[i], 0, n * 2, c->st));
        if (one_call(c, 0, 1)) return -1;
        CK(cudaMemcpyAsync(b, c->C[i], n * 2, cudaMemcpyDeviceToHost, c->st));
        CK(cudaStreamSynchronize(c->st));
        for (size_t j = 0; j < n; j++) diff += a[j] != b[j];
        *total += n;
        free(a);
        free(b);
    }
    return diff;
}

int main(int argc, char **argv)
{
    static const int def[] = {64, 128, 256, 512, 2048};
    int Ts[32], nT = 0;
    const int maxT = bench_token_counts(argc, argv, "bench_lora_grouped", def, (int)(sizeof def / sizeof def[0]), Ts, &nT);
    if (maxT < 0) return 2;
    if (bench_no_device()) return 0;
    const struct shape shapes[] = {
        {"qkv_exp", 3, {4096, 1024, 1024}, 128, 384, 0, 1},   {"qkv_prj1", 3, {4096, 1024, 1024}, 4096, 4096, 1, 0},
        {"qkv_prj0", 3, {4096, 1024, 1024}, 4096, 4096, 0, 0}, {"gu_exp", 2, {14336, 14336, 0}, 128, 256, 0, 1},
        {"gu_prj1", 2, {14336, 14336, 0}, 4096, 4096, 1, 0},   {"gu_prj0", 2, {14336, 14336, 0}, 4096, 4096, 0, 0},
    };
    const int nshape = (int)(sizeof shapes / sizeof shapes[0]);
    struct cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    int ver = 0;
    struct ctx c;
    memset(&c, 0, sizeof c);
    CB(cublasCreate(&c.h));
    (void)cublasGetVersion(c.h, &ver);
    printf("device %s, %d SMs, cuBLAS %d\n", prop.name, prop.multiProcessorCount, ver);
    const size_t ws_bytes = (size_t)32 << 20;
    void *ws = NULL;
    CK(cudaMalloc(&ws, ws_bytes));
    CB(cublasSetWorkspace(c.h, ws, ws_bytes));
    CK(cudaStreamCreate(&c.st));
    CB(cublasSetStream(c.h, c.st));
    void *X = bench_dev_fill_bf16((size_t)maxT * 4096 * 2, 7u); /* x16 [T, 4096]; hm uses its first T x 384 */
    void *Y[3];
    for (int i = 0; i < 3; i++) {
        CK(cudaMalloc(&Y[i], (size_t)maxT * 14336 * 2));
        CK(cudaMemset(Y[i], 0, (size_t)maxT * 14336 * 2));
    }
    for (int cp = 0; cp < COPIES; cp++) CK(cudaMalloc((void **)&c.dA[cp], 3 * sizeof(void *)));
    CK(cudaMalloc((void **)&c.dB, 3 * sizeof(void *)));
    CK(cudaMalloc((void **)&c.dC, 3 * sizeof(void *)));
    printf("%-9s %5s | %8s %8s %5s | %8s %8s %5s | %6s | %s\n", "shape", "T", "sep_g_us", "sep_e_us", "kern",
           "grp_g_us", "grp_e_us", "kern", "gain", "bits");
    for (int s = 0; s < nshape; s++) {
        const struct shape *sh = &shapes[s];
        c.sh = sh;
        for (int cp = 0; cp < COPIES; cp++)
            for (int i = 0; i < sh->n; i++) c.A[cp][i] = bench_dev_fill_bf16((size_t)sh->N[i] * sh->K * 2, 100u + (uint32_t)(cp * 3 + i));
        int off = 0;
        for (int i = 0; i < sh->n; i++) {
            c.B[i] = (char *)X + (sh->lora ? (size_t)off * 2 : 0);
            off += sh->K;
            c.C[i] = Y[i];
        }
        for (int cp = 0; cp < COPIES; cp++) CK(cudaMemcpy(c.dA[cp], c.A[cp], 3 * sizeof(void *), cudaMemcpyHostToDevice));
        CK(cudaMemcpy(c.dB, c.B, 3 * sizeof(void *), cudaMemcpyHostToDevice));
        CK(cudaMemcpy(c.dC, c.C, 3 * sizeof(void *), cudaMemcpyHostToDevice));
        for (int ti = 0; ti < nT; ti++) {
            c.T = Ts[ti];
            int ks = 0, kg = 0, ss = 0, sg = 0;
            double gs_us = -1, gg_us = -1;
            int st0 = one_call(&c, 0, 1);
            CK(cudaStreamSynchronize(c.st));
            if (st0) {
                printf("%-9s %5d | grouped call: cuBLAS status %d\n", sh->name, c.T, st0);
                continue;
            }
            cudaGraphExec_t xs = capture(&c, 0, REPS, &ks, &ss), xg = capture(&c, 1, REPS, &kg, &sg);
            if (xs) gs_us = time_graph(&c, xs, REPS);
            if (xg) gg_us = time_graph(&c, xg, REPS);
            const double es = time_eager(&c, 0, REPS), eg = time_eager(&c, 1, REPS);
            size_t tot = 0;
            const long d = compare(&c, &tot);
            printf("%-9s %5d | %8.2f %8.2f %5d | %8.2f %8.2f %5d | %+5.1f%% | %ld of %zu differ%s%s\n", sh->name, c.T,
                   gs_us, es, ks, gg_us, eg, kg, gs_us > 0 && gg_us > 0 ? 100.0 * (gs_us / gg_us - 1.0) : 0.0, d, tot,
                   xs ? "" : " (separate: capture failed)", xg ? "" : " (grouped: capture failed)");
            if (!xg && sg) printf("          grouped capture status %d\n", sg);
            fflush(stdout);
            if (xs) cudaGraphExecDestroy(xs);
            if (xg) cudaGraphExecDestroy(xg);
        }
        for (int cp = 0; cp < COPIES; cp++)
            for (int i = 0; i < sh->n; i++) cudaFree(c.A[cp][i]);
    }
    cudaFree(X);
    for (int i = 0; i < 3; i++) cudaFree(Y[i]);
    cublasDestroy(c.h);
    return 0;
}
