/* bench_lora_fold.c — issue #8 (8 adapters at <= 10% cost): what would the K-fold of the LoRA
 * expand into the projection save? Today's dense form (lora.cu dense_call) runs, per linear, the
 * expand y = hm B_all^T (K = 128: 8 slots of rank 16; beta 0, or beta 1 onto the float32 residual)
 * and then the projection onto it (beta 1). The K-fold would run one GEMM per linear over
 * [x | hm] . [W | B_all]^T: the weights with a row stride of K + the slots, the 16-bit activations
 * with room for hm at the end (or start) of each token's row.
 *
 * Per group of linears that share x (Llama-3-8B: q/k/v, o, gate/up, down) and token count T, the
 * per-call time of three forms, each replayed from a CUDA graph of REPS calls (what a serving step
 * does) with the weights rotating among COPIES copies (the 50 MB L2 does not hold them):
 *   base   the projections alone (no adapters: beta 0 into 16-bit y, beta 1 onto float32 x)
 *   today  the expands + the projections onto them (the shrink and the mask, the same in both
 *          LoRA forms, are left out)
 *   fold   the projections over K + ext (ext: the hm columns the linear reads; q [hm_q|x],
 *          k [x|hm_k], v [x|hm_k|hm_v] with zero weights on hm_k, so ext 128/128/256)
 * Also `shrink`: the group's shrink GEMM h = x A_all^T (float32 out, M = the group's slots), which
 * both forms keep. Random bf16 values; bits are not compared (the fold changes the sum's order).
 * Since the seventeenth session the fold is what serving runs (lora.cu dense_call, docs/LORA.md;
 * its v is [W | 0 | B] with hm_q's columns between, k/up [B | W]); this bench stays as the
 * GEMM-level measurement of the shapes.
 * Usage: bench_lora_fold [T ...]  (default 64 128 256 512) */
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench_cuda_check.h"

#define COPIES 2
#define REPS 20
#define SLOT 128 /* 8 adapters x rank 16 */

struct group {
    const char *name;
    int n, N[3], K, ext[3], off[3]; /* off: the linear's first column in the x' row (fold) */
    int resid;                      /* 1: float32 y, beta 1 (o, down) */
    int ru;                         /* the shrink's M: the group's slots */
};

struct ctx {
    cublasHandle_t h;
    cudaStream_t st;
    const struct group *g;
    int T, form; /* form 0 base, 1 today, 2 fold, 3 shrink */
    void *W[COPIES][3], *Wf[COPIES][3], *B[3], *A;
    void *x, *xf, *hm, *hs, *y[3]; /* hs: the shrink's float32 h */
    int ldx; /* the x' row: K + the group's ext columns */
};

static int gemm(struct ctx *c, int m, int k, const void *a, int lda, const void *b, int ldb, void *y, int f32, int beta1)
{
    const float one = 1.0f, zero = 0.0f;
    return (int)cublasGemmEx(c->h, CUBLAS_OP_T, CUBLAS_OP_N, m, c->T, k, &one, a, CUDA_R_16BF, lda, b, CUDA_R_16BF, ldb,
                             beta1 ? &one : &zero, y, f32 ? CUDA_R_32F : CUDA_R_16BF, m, CUBLAS_COMPUTE_32F,
                             CUBLAS_GEMM_DEFAULT);
}

static int one_call(struct ctx *c, int cp)
{
    const struct group *g = c->g;
    int s = 0;
    if (c->form == 3)
        return gemm(c, g->ru, g->K, c->A, g->K, c->x, g->K, c->hs, 1, 0) ? -1 : 0;
    for (int i = 0; i < g->n && !s; i++) {
        if (c->form == 0) {
            s = gemm(c, g->N[i], g->K, c->W[cp][i], g->K, c->x, g->K, c->y[i], g->resid, g->resid);
        } else if (c->form == 1) {
            s = gemm(c, g->N[i], SLOT, c->B[i], SLOT, (char *)c->hm + (size_t)i * SLOT * 2, g->ru, c->y[i], g->resid,
                     g->resid);
            if (!s) s = gemm(c, g->N[i], g->K, c->W[cp][i], g->K, c->x, g->K, c->y[i], g->resid, 1);
        } else {
            const int kf = g->K + g->ext[i];
            s = gemm(c, g->N[i], kf, c->Wf[cp][i], kf, (char *)c->xf + (size_t)g->off[i] * 2, c->ldx, c->y[i], g->resid,
                     g->resid);
        }
    }
    return s;
}

static cudaGraphExec_t capture(struct ctx *c)
{
    cudaGraph_t gr = NULL;
    int st = 0;
    if (cudaStreamBeginCapture(c->st, cudaStreamCaptureModeThreadLocal) != cudaSuccess) return NULL;
    for (int r = 0; r < REPS && !st; r++) st = one_call(c, r % COPIES);
    const cudaError_t e = cudaStreamEndCapture(c->st, &gr);
    if (e != cudaSuccess || st || !gr) {
        (void)cudaGetLastError();
        if (gr) cudaGraphDestroy(gr);
        return NULL;
    }
    cudaGraphExec_t x = NULL;
    CK(cudaGraphInstantiate(&x, gr, 0));
    cudaGraphDestroy(gr);
    return x;
}

/* µs per call: the median of 5 timed launches of the graph (after one warm-up) */
static double time_form(struct ctx *c)
{
    cudaGraphExec_t x = capture(c);
    if (!x) return -1.0;
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    CK(cudaGraphLaunch(x, c->st));
    float t[5];
    for (int i = 0; i < 5; i++) {
        CK(cudaEventRecord(e0, c->st));
        CK(cudaGraphLaunch(x, c->st));
        CK(cudaEventRecord(e1, c->st));
        CK(cudaEventSynchronize(e1));
        CK(cudaEventElapsedTime(&t[i], e0, e1));
    }
    qsort(t, 5, sizeof t[0], bench_cmp_float);
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    cudaGraphExecDestroy(x);
    return t[2] * 1e3 / REPS;
}

int main(int argc, char **argv)
{
    static const int def[] = {64, 128, 256, 512};
    int Ts[32], nT = 0;
    const int maxT = bench_token_counts(argc, argv, "bench_lora_fold", def, (int)(sizeof def / sizeof def[0]), Ts, &nT);
    if (maxT < 0) return 2;
    if (bench_no_device()) return 0;
    const struct group groups[] = {
        {"qkv", 3, {4096, 1024, 1024}, 4096, {128, 128, 256}, {0, 128, 128}, 0, 384},
        {"o", 1, {4096, 0, 0}, 4096, {128, 0, 0}, {0, 0, 0}, 1, 128},
        {"gate/up", 2, {14336, 14336, 0}, 4096, {128, 128, 0}, {0, 128, 0}, 0, 256},
        {"down", 1, {4096, 0, 0}, 14336, {128, 0, 0}, {0, 0, 0}, 1, 128},
    };
    struct cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    struct ctx c;
    memset(&c, 0, sizeof c);
    CB(cublasCreate(&c.h));
    printf("device %s, %d SMs; µs per call (graph of %d calls), 8 adapters x rank 16\n", prop.name,
           prop.multiProcessorCount, REPS);
    void *ws = NULL;
    CK(cudaMalloc(&ws, (size_t)32 << 20));
    CB(cublasSetWorkspace(c.h, ws, (size_t)32 << 20));
    CK(cudaStreamCreate(&c.st));
    CB(cublasSetStream(c.h, c.st));
    c.x = bench_dev_fill_bf16((size_t)maxT * 14336 * 2, 7u);
    c.xf = bench_dev_fill_bf16((size_t)maxT * (14336 + 384) * 2, 8u);
    c.hm = bench_dev_fill_bf16((size_t)maxT * 384 * 2, 9u);
    CK(cudaMalloc(&c.hs, (size_t)maxT * 384 * 4));
    for (int i = 0; i < 3; i++) {
        CK(cudaMalloc(&c.y[i], (size_t)maxT * 14336 * 4));
        CK(cudaMemset(c.y[i], 0, (size_t)maxT * 14336 * 4));
    }
    printf("%-8s %5s | %8s %8s %8s | %8s %8s | %8s\n", "group", "T", "base", "today", "fold", "today-b", "fold-b",
           "shrink");
    for (size_t gi = 0; gi < sizeof groups / sizeof groups[0]; gi++) {
        const struct group *g = &groups[gi];
        c.g = g;
        c.ldx = g->K;
        for (int i = 0; i < g->n; i++)
            if (g->off[i] + g->K + g->ext[i] > c.ldx) c.ldx = g->off[i] + g->K + g->ext[i];
        for (int cp = 0; cp < COPIES; cp++)
            for (int i = 0; i < g->n; i++) {
                c.W[cp][i] = bench_dev_fill_bf16((size_t)g->N[i] * g->K * 2, 100u + (uint32_t)(cp * 3 + i));
                c.Wf[cp][i] = bench_dev_fill_bf16((size_t)g->N[i] * (g->K + g->ext[i]) * 2, 200u + (uint32_t)(cp * 3 + i));
            }
        for (int i = 0; i < g->n; i++) c.B[i] = bench_dev_fill_bf16((size_t)g->N[i] * SLOT * 2, 300u + (uint32_t)i);
        c.A = bench_dev_fill_bf16((size_t)g->ru * g->K * 2, 400u);
        for (int ti = 0; ti < nT; ti++) {
            c.T = Ts[ti];
            double us[4];
            for (int f = 0; f < 4; f++) {
                c.form = f;
                us[f] = time_form(&c);
            }
            printf("%-8s %5d | %8.2f %8.2f %8.2f | %+8.2f %+8.2f | %8.2f\n", g->name, c.T, us[0], us[1], us[2],
                   us[1] - us[0], us[2] - us[0], us[3]);
            fflush(stdout);
        }
        for (int cp = 0; cp < COPIES; cp++)
            for (int i = 0; i < g->n; i++) cudaFree(c.W[cp][i]), cudaFree(c.Wf[cp][i]);
        for (int i = 0; i < g->n; i++) cudaFree(c.B[i]);
        cudaFree(c.A);
    }
    cublasDestroy(c.h);
    return 0;
}
