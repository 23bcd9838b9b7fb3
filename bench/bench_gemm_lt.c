/* bench_gemm_lt.c — the serving step's bf16 GEMMs at the token counts the offline load runs,
 * cuBLAS's default choice (the call matmul16 makes: cublasGemmEx, CUBLAS_GEMM_DEFAULT) against
 * every algorithm cublasLt's heuristic offers for the same problem (issue #8: is a per-shape
 * choice or a padded T worth it?).
 *
 * Shapes: Llama-3-8B's q/k/v (N 6144, K 4096, bf16 out), o (4096 x 4096, float32 out, beta 1),
 * gate/up (28672 x 4096, bf16 out), down (4096 x 14336, float32 out, beta 1), lm_head (128256 x
 * 4096, float32 out); y^T[N,T] = W[N,K] x^T[K,T] as matmul16's column-major view. T from the
 * command line (default: the decode-only and the mixed step sizes of the offline load). Timings:
 * CUDA events over `reps` runs after warm-up, weights rotated among 3 copies (the 50 MB L2 does
 * not hold them). Prints one line per (shape, T): the default's TFLOP/s, the best heuristic
 * algorithm's TFLOP/s, its rank in the heuristic's order, tile / stages / split-K / cluster ids.
 * Usage: bench_gemm_lt [T ...] */
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench_cuda_check.h"

#define COPIES 3
#define MAX_ALGOS 24

struct shape {
    const char *name;
    int N, K, f32out;
};

int main(int argc, char **argv)
{
    static const int def[] = {256, 425, 448, 512, 640, 875, 1024, 1536, 2048, 2304};
    int Ts[32], nT = 0;
    const int maxT = bench_token_counts(argc, argv, "bench_gemm_lt", def, (int)(sizeof def / sizeof def[0]), Ts, &nT);
    if (maxT < 0) return 2;
    if (bench_no_device()) return 0;
    const struct shape shapes[] = {{"qkv", 6144, 4096, 0},
                                   {"o", 4096, 4096, 1},
                                   {"gate_up", 28672, 4096, 0},
                                   {"down", 4096, 14336, 1},
                                   {"lm_head", 128256, 4096, 1}};
    const int nshape = (int)(sizeof shapes / sizeof shapes[0]);
    struct cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    printf("device %s, %d SMs\n", prop.name, prop.multiProcessorCount);
    cublasHandle_t h;
    cublasLtHandle_t lt;
    CB(cublasCreate(&h));
    CB(cublasLtCreate(&lt));
    const size_t ws_bytes = (size_t)32 << 20;
    void *ws = NULL;
    CK(cudaMalloc(&ws, ws_bytes));
    CB(cublasSetWorkspace(h, ws, ws_bytes));
    cudaStream_t st;
    CK(cudaStreamCreate(&st));
    CB(cublasSetStream(h, st));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    size_t maxW = 0, maxX = 0, maxY = 0;
    for (int s = 0; s < nshape; s++) {
        size_t w = (size_t)shapes[s].N * shapes[s].K * 2, x = (size_t)maxT * shapes[s].K * 2,
               y = (size_t)maxT * shapes[s].N * 4;
        maxW = w > maxW ? w : maxW;
        maxX = x > maxX ? x : maxX;
        maxY = y > maxY ? y : maxY;
    }
    void *W[COPIES];
    for (int c = 0; c < COPIES; c++) W[c] = bench_dev_fill_bf16(maxW, 11u + (uint32_t)c);
    void *X = bench_dev_fill_bf16(maxX, 7u), *Y = NULL;
    CK(cudaMalloc(&Y, maxY));
    CK(cudaMemset(Y, 0, maxY));
    printf("%-8s %6s %5s | %9s | %9s %4s %5s %4s %3s %4s %5s | %6s\n", "shape", "T", "tiles", "default", "best_lt",
           "rank", "tile", "stg", "spk", "clu", "algo", "gain");
    for (int s = 0; s < nshape; s++) {
        const struct shape *sh = &shapes[s];
        for (int ti = 0; ti < nT; ti++) {
            const int T = Ts[ti], N = sh->N, K = sh->K;
            if (!strcmp(sh->name, "lm_head") && T > 512) continue;
            const double flop = 2.0 * N * (double)K * T;
            const int reps = flop > 2e11 ? 10 : flop > 2e10 ? 30 : 100;
            const float one = 1.0f, zero = 0.0f;
            const float *beta = sh->f32out ? &one : &zero;
            const cudaDataType_t yt = sh->f32out ? CUDA_R_32F : CUDA_R_16BF;
            float ms = 0;
            /* the default (matmul16's call) */
            for (int r = 0; r < 3; r++)
                CB(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, N, T, K, &one, W[r % COPIES], CUDA_R_16BF, K, X,
                                CUDA_R_16BF, K, beta, Y, yt, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
            CK(cudaEventRecord(e0, st));
            for (int r = 0; r < reps; r++)
                CB(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, N, T, K, &one, W[r % COPIES], CUDA_R_16BF, K, X,
                                CUDA_R_16BF, K, beta, Y, yt, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
            CK(cudaEventRecord(e1, st));
            CK(cudaEventSynchronize(e1));
            CK(cudaEventElapsedTime(&ms, e0, e1));
            const double t_def = ms * 1e-3 / reps;
            /* cublasLt: every algorithm of the heuristic */
            cublasLtMatmulDesc_t op;
            cublasLtMatrixLayout_t Ad, Bd, Cd;
            CB(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
            const cublasOperation_t tA = CUBLAS_OP_T, tB = CUBLAS_OP_N;
            CB(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &tA, sizeof tA));
            CB(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tB, sizeof tB));
            CB(cublasLtMatrixLayoutCreate(&Ad, CUDA_R_16BF, (uint64_t)K, (uint64_t)N, K));
            CB(cublasLtMatrixLayoutCreate(&Bd, CUDA_R_16BF, (uint64_t)K, (uint64_t)T, K));
            CB(cublasLtMatrixLayoutCreate(&Cd, yt, (uint64_t)N, (uint64_t)T, N));
            cublasLtMatmulPreference_t pref;
            CB(cublasLtMatmulPreferenceCreate(&pref));
            CB(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_bytes,
                                                    sizeof ws_bytes));
            cublasLtMatmulHeuristicResult_t res[MAX_ALGOS];
            int nres = 0;
            CB(cublasLtMatmulAlgoGetHeuristic(lt, op, Ad, Bd, Cd, Cd, pref, MAX_ALGOS, res, &nres));
            double best = 1e30;
            int best_i = -1;
            for (int a = 0; a < nres; a++) {
                if (res[a].state != CUBLAS_STATUS_SUCCESS) continue;
                int bad = 0;
                for (int r = 0; r < 2 && !bad; r++)
                    bad = cublasLtMatmul(lt, op, &one, W[r % COPIES], Ad, X, Bd, beta, Y, Cd, Y, Cd, &res[a].algo, ws,
                                         ws_bytes, st) != CUBLAS_STATUS_SUCCESS;
                if (bad) continue;
                CK(cudaEventRecord(e0, st));
                for (int r = 0; r < reps; r++)
                    cublasLtMatmul(lt, op, &one, W[r % COPIES], Ad, X, Bd, beta, Y, Cd, Y, Cd, &res[a].algo, ws,
                                   ws_bytes, st);
                CK(cudaEventRecord(e1, st));
                CK(cudaEventSynchronize(e1));
                CK(cudaEventElapsedTime(&ms, e0, e1));
                const double t = ms * 1e-3 / reps;
                if (t < best) best = t, best_i = a;
            }
            int tile = -1, stages = -1, splitk = -1, cluster = -1, algo = -1;
            if (best_i >= 0) {
                size_t wr;
                const cublasLtMatmulAlgo_t *al = &res[best_i].algo;
                cublasLtMatmulAlgoConfigGetAttribute(al, CUBLASLT_ALGO_CONFIG_TILE_ID, &tile, sizeof tile, &wr);
                cublasLtMatmulAlgoConfigGetAttribute(al, CUBLASLT_ALGO_CONFIG_STAGES_ID, &stages, sizeof stages, &wr);
                cublasLtMatmulAlgoConfigGetAttribute(al, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &splitk, sizeof splitk, &wr);
                cublasLtMatmulAlgoConfigGetAttribute(al, CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID, &cluster,
                                                     sizeof cluster, &wr);
                cublasLtMatmulAlgoConfigGetAttribute(al, CUBLASLT_ALGO_CONFIG_ID, &algo, sizeof algo, &wr);
            }
            const int tiles128x256 = ((N + 255) / 256) * ((T + 127) / 128);
            printf("%-8s %6d %5d | %9.1f | %9.1f %4d %5d %4d %3d %4d %5d | %+5.1f%%\n", sh->name, T, tiles128x256,
                   flop / t_def * 1e-12, best_i >= 0 ? flop / best * 1e-12 : 0.0, best_i, tile, stages, splitk,
                   cluster, algo, best_i >= 0 ? 100.0 * (t_def / best - 1.0) : 0.0);
            fflush(stdout);
            cublasLtMatmulPreferenceDestroy(pref);
            cublasLtMatrixLayoutDestroy(Ad);
            cublasLtMatrixLayoutDestroy(Bd);
            cublasLtMatrixLayoutDestroy(Cd);
            cublasLtMatmulDescDestroy(op);
        }
    }
    for (int c = 0; c < COPIES; c++) cudaFree(W[c]);
    cudaFree(X);
    cudaFree(Y);
    cudaFree(ws);
    cublasLtDestroy(lt);
    cublasDestroy(h);
    return 0;
}
