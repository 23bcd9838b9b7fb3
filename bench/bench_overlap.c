/* bench_overlap.c — can the FP8 decode attention run beside the GEMMs? (issue #8, offline load)
 *
 * A decode step of Llama-3-8B at batch 2M is, per layer, the layer's GEMMs at T = 2M (q, k, v, o,
 * gate, up, down: cuBLAS bf16 as the engine's matmul16 calls them on its 16-bit activation path:
 * bf16 out, o and down float32 out with beta 1) and the FP8 decode attention of 2M sequences
 * (tuna's attention16 op, bf16 q and output, H 32, Hkv 8, D 128,
 * blocks of 16 scattered over the cache, contexts spread over 1,000..2,000 as a serving batch's).
 * This program splits the batch into two micro-batches A and B of M sequences and times, for 32
 * layers:
 *   unsplit   one stream: per layer GEMMs(2M) then attention(2M) (today's step);
 *   serial    one stream: GEMMs(A) att(A) GEMMs(B) att(B) per layer (the split, not overlapped);
 *   att only  the 64 attention calls alone; gemm only (n): the 64 GEMM sets alone, the cuBLAS
 *             handle limited to n SMs (cublasSetSmCountTarget; 0 = all); "unsplit": the same
 *             for the 32 calls of the whole batch;
 *   overlap (n) two streams: the attention on the backend's stream, the GEMMs on a second one
 *             with its own cuBLAS handle limited to n SMs; events make att(X, l) wait for
 *             GEMMs(X, l) and GEMMs(X, l + 1) wait for att(X, l), so that from the second phase
 *             on the attention of one micro-batch can run beside the GEMMs of the other;
 *             "gemm-hi": the GEMM stream at the highest stream priority; "att-hi": the
 *             attention stream raised to it instead.
 * Each line: median ms per 32 layers over repeats (CUDA events), us per layer, the attention
 * hidden = (serial - overlap) / att only, and the line's wall-clock window [t0 t1] (seconds since
 * the epoch) to match with `nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw -lms 100`.
 * Weights rotate over 4 copies of a layer and the caches over 2 copies of every micro-batch's
 * sequences, so the 50 MB L2 cache serves neither. Not timed: the step's other kernels (norms,
 * rope and KV store, GLU: ~8% of the offline load), CUDA graphs (every call is queued eagerly; the
 * host keeps ahead of the GPU).
 *
 * Per overlap line, one more traced run gives each op's mean span in layers 1..31 (from the later
 * of its stream's previous op and its dependency to its end: what it took beside the other).
 * "mixed": a step of the offline load with a prefill chunk: 424 decode sequences (micro-batch A:
 * their GEMM rows and attention) beside 1,624 prompt rows (B: GEMMs only; the chunk's prefill
 * attention is not run); unsplit: the GEMMs of all 2,048 rows, then the decode attention.
 *
 * Usage: bench_overlap [M ...] (decode micro-batch sizes, default 256 212; then the mixed
 * case), bench_overlap mixed (the mixed case only). Prints SKIP without a GPU. */
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cuda/cuda.h"

#include "bench_cuda_check.h"

#define NL 32      /* layers */
#define WCOPY 4    /* copies of a layer's weights */
#define ACOPY 2    /* copies of each micro-batch's KV sequences */
#define REPS 25    /* at most this many timed repeats of 32 layers per line (after 2 warm-ups) */
#define CTX_LO 1000
#define CTX_HI 2000
#define BS 16
#define MB_TAB ((CTX_HI + BS - 1) / BS) /* block-table row length */

/* The layer's linears: N x K weights, the input they read and whether they add into y. */
enum { IN_X, IN_O, IN_H };
static const struct {
    const char *name;
    int N, K, in, beta1;
} g_lin[7] = {{"q", 4096, 4096, IN_X, 0},     {"k", 1024, 4096, IN_X, 0},    {"v", 1024, 4096, IN_X, 0},
              {"o", 4096, 4096, IN_O, 1},     {"gate", 14336, 4096, IN_X, 0}, {"up", 14336, 4096, IN_X, 0},
              {"down", 4096, 14336, IN_H, 1}};

struct mbatch {           /* one micro-batch (or the unsplit batch): activations and attention batch */
    void *x16, *o16, *h16; /* bf16 GEMM inputs [Tmax, 4096], [Tmax, 4096], [Tmax, 14336] */
    void *y[7];            /* GEMM outputs [Tmax, N]: bf16, float32 for o and down (added into the residual) */
    void *q, *out;         /* attention q and output [B, 4096], bf16 */
    int64_t *pos;          /* [B] */
    int32_t *flat[ACOPY];  /* [B, MB_TAB] block tables of each copy */
    const int32_t **bt[ACOPY];
    struct tuna_attn_batch b[ACOPY];
    int64_t n;             /* sequences of its decode attention */
    int64_t T;             /* GEMM tokens (n, or a prefill chunk's rows) */
    bool att;              /* runs a decode attention (a prefill chunk: none here) */
    double kv_bytes;       /* K and V bytes one attention call reads */
};

struct bench {
    tuna_backend *be;
    cudaStream_t sa, sg, sghi; /* attention (the backend's), GEMM, GEMM at high priority */
    cublasHandle_t hs, hg, hghi; /* on sa (serial), sg, sghi */
    void *w[WCOPY][7];
    void *kc, *vc;
    cudaEvent_t e0, e1, ev[8];
    double layer_flop_per_tok;
    int prio_hi;
    bool trace;                           /* overlap: record tg/ta (one extra run after the timed ones) */
    cudaEvent_t tg[2 * NL], ta[2 * NL];   /* end of GEMMs(X, l) / att(X, l), X = A, B: [2 l + X] */
    double span_g[2], span_a[2];          /* the traced run's mean us per GEMM set / attention of A, B */
};

/* The 7 GEMMs of layer l for the mb->T tokens of mb on handle h. */
static void gemms(struct bench *bn, cublasHandle_t h, struct mbatch *mb, int l)
{
    const int64_t T = mb->T;
    const float one = 1.0f, zero = 0.0f;
    for (int i = 0; i < 7; i++) {
        const void *x = g_lin[i].in == IN_X ? mb->x16 : g_lin[i].in == IN_O ? mb->o16 : mb->h16;
        CB(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, g_lin[i].N, (int)T, g_lin[i].K, &one, bn->w[l % WCOPY][i],
                        CUDA_R_16BF, g_lin[i].K, x, CUDA_R_16BF, g_lin[i].K, g_lin[i].beta1 ? &one : &zero, mb->y[i],
                        g_lin[i].beta1 ? CUDA_R_32F : CUDA_R_16BF, g_lin[i].N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    }
}

static void attention(struct bench *bn, struct mbatch *mb, int l)
{
    if (!mb->att) return;
    tuna_cuda_backend_ops()->attention16(bn->be, mb->out, mb->q, TUNA_DTYPE_BF16, bn->kc, bn->vc, TUNA_DTYPE_F8_E4M3,
                                         &mb->b[l % ACOPY], 32, 8, 128, 0.08838834764831845f);
}

enum mode { M_UNSPLIT, M_SERIAL, M_ATT, M_GEMM, M_OVERLAP, M_ATT_U, M_GEMM_U };

/* Queues one 32-layer run of the mode between e0 and e1 (both on the attention stream); with
 * bn->trace, the overlap also records a timing event after every GEMM set and attention. */
static void queue_run(struct bench *bn, enum mode md, struct mbatch *A, struct mbatch *B, struct mbatch *U,
                      cublasHandle_t hg, cudaStream_t sg)
{
    CK(cudaEventRecord(bn->e0, bn->sa));
    const bool two = md == M_GEMM || md == M_GEMM_U || md == M_OVERLAP;
    if (two) CK(cudaStreamWaitEvent(sg, bn->e0, 0));
    for (int l = 0; l < NL; l++) {
        switch (md) {
        case M_UNSPLIT:
            gemms(bn, bn->hs, U, l);
            attention(bn, U, l);
            break;
        case M_SERIAL:
            gemms(bn, bn->hs, A, l);
            attention(bn, A, l);
            gemms(bn, bn->hs, B, l);
            attention(bn, B, l);
            break;
        case M_ATT:
            attention(bn, A, l);
            attention(bn, B, l);
            break;
        case M_GEMM:
            gemms(bn, hg, A, l);
            gemms(bn, hg, B, l);
            break;
        case M_ATT_U:
            attention(bn, U, l);
            break;
        case M_GEMM_U:
            gemms(bn, hg, U, l);
            break;
        case M_OVERLAP: {
            /* ev[0]: GEMMs(A) done, ev[1]: att(A) done, ev[2]: GEMMs(B) done, ev[3]: att(B) done */
            struct mbatch *X[2] = {A, B};
            for (int m = 0; m < 2; m++) {
                if (l > 0 && X[m]->att) CK(cudaStreamWaitEvent(sg, bn->ev[2 * m + 1], 0));
                gemms(bn, hg, X[m], l);
                if (bn->trace) CK(cudaEventRecord(bn->tg[2 * l + m], sg));
                if (!X[m]->att) continue;
                CK(cudaEventRecord(bn->ev[2 * m], sg));
                CK(cudaStreamWaitEvent(bn->sa, bn->ev[2 * m], 0));
                attention(bn, X[m], l);
                CK(cudaEventRecord(bn->ev[2 * m + 1], bn->sa));
                if (bn->trace) CK(cudaEventRecord(bn->ta[2 * l + m], bn->sa));
            }
            break;
        }
        }
    }
    if (two) {
        CK(cudaEventRecord(bn->ev[4], sg));
        CK(cudaStreamWaitEvent(bn->sa, bn->ev[4], 0));
    }
    CK(cudaEventRecord(bn->e1, bn->sa));
}

/* Median ms of a 32-layer run of the mode; *t0, *t1: the wall-clock window of the timed repeats. */
/* prio: PR_NONE; PR_GEMM, the GEMMs on the high-priority stream; PR_ATT, the attention stream (the
 * backend's) raised to the highest priority for the run (cudaStreamSetAttribute), then put back. */
enum prio { PR_NONE, PR_GEMM, PR_ATT };

static double time_run(struct bench *bn, enum mode md, struct mbatch *A, struct mbatch *B, struct mbatch *U,
                       int sms, enum prio pr, double *t0, double *t1)
{
    cublasHandle_t hg = pr == PR_GEMM ? bn->hghi : bn->hg;
    cudaStream_t sg = pr == PR_GEMM ? bn->sghi : bn->sg;
    CB(cublasSetSmCountTarget(hg, sms));
    cudaStreamAttrValue pv;
    memset(&pv, 0, sizeof pv);
    if (pr == PR_ATT) {
        pv.priority = bn->prio_hi;
        const cudaError_t e = cudaStreamSetAttribute(bn->sa, cudaStreamAttributePriority, &pv);
        if (e != cudaSuccess) {
            printf("  (the stream priority attribute: %s)\n", cudaGetErrorString(e));
            cudaGetLastError();
            return -1.0;
        }
    }
    float ms[REPS + 2];
    int reps = REPS;
    for (int r = 0; r < reps + 2; r++) {
        if (r == 2) { /* repeats for ~0.6 s per line (8 at least) */
            *t0 = bench_wall_s();
            reps = ms[1] > 0.0f ? (int)(600.0f / ms[1]) : REPS;
            reps = reps < 8 ? 8 : reps > REPS ? REPS : reps;
        }
        queue_run(bn, md, A, B, U, hg, sg);
        CK(cudaEventSynchronize(bn->e1));
        CK(cudaEventElapsedTime(&ms[r], bn->e0, bn->e1));
    }
    *t1 = bench_wall_s();
    if (md == M_OVERLAP) { /* one traced run: the mean span of each op in layers 1..NL-1 */
        bn->trace = true;
        queue_run(bn, md, A, B, U, hg, sg);
        bn->trace = false;
        CK(cudaEventSynchronize(bn->e1));
        double sg_[2] = {0, 0}, sa_[2] = {0, 0};
        float prev_g = 0, prev_a = 0;
        for (int l = 0; l < NL; l++)
            for (int m = 0; m < 2; m++) {
                struct mbatch *X = m ? B : A;
                float tg = 0, ta = 0, dep = 0;
                CK(cudaEventElapsedTime(&tg, bn->e0, bn->tg[2 * l + m]));
                /* GEMMs(X, l) start after the previous GEMMs and after att(X, l - 1) */
                if (l > 0 && X->att) CK(cudaEventElapsedTime(&dep, bn->e0, bn->ta[2 * (l - 1) + m]));
                const float g0 = prev_g > dep ? prev_g : dep;
                if (l > 0) sg_[m] += tg - g0;
                prev_g = tg;
                if (!X->att) continue;
                CK(cudaEventElapsedTime(&ta, bn->e0, bn->ta[2 * l + m]));
                const float a0 = prev_a > tg ? prev_a : tg;
                if (l > 0) sa_[m] += ta - a0;
                prev_a = ta;
            }
        bn->span_g[0] = sg_[0] * 1e3 / (NL - 1), bn->span_g[1] = sg_[1] * 1e3 / (NL - 1);
        bn->span_a[0] = sa_[0] * 1e3 / (NL - 1), bn->span_a[1] = sa_[1] * 1e3 / (NL - 1);
    }
    if (pr == PR_ATT) {
        pv.priority = 0;
        CK(cudaStreamSetAttribute(bn->sa, cudaStreamAttributePriority, &pv));
    }
    if (tuna_cuda_status(bn->be)) {
        fprintf(stderr, "bench_overlap: %s\n", tuna_last_error());
        exit(1);
    }
    qsort(ms + 2, (size_t)reps, sizeof(float), bench_cmp_float);
    return ms[2 + reps / 2];
}

static void mb_alloc(struct mbatch *mb, int64_t Tmax)
{
    memset(mb, 0, sizeof *mb);
    mb->x16 = bench_dev_fill_bf16((size_t)Tmax * 4096 * 2, 11u);
    mb->o16 = bench_dev_fill_bf16((size_t)Tmax * 4096 * 2, 12u);
    mb->h16 = bench_dev_fill_bf16((size_t)Tmax * 14336 * 2, 13u);
    for (int i = 0; i < 7; i++) {
        const size_t bytes = (size_t)Tmax * (size_t)g_lin[i].N * (g_lin[i].beta1 ? 4 : 2);
        CK(cudaMalloc(&mb->y[i], bytes));
        CK(cudaMemset(mb->y[i], 0, bytes));
    }
    mb->q = bench_dev_fill_bf16((size_t)Tmax * 4096 * 2, 14u);
    CK(cudaMalloc(&mb->out, (size_t)Tmax * 4096 * 2));
}

static void mb_free(struct mbatch *mb)
{
    cudaFree(mb->x16), cudaFree(mb->o16), cudaFree(mb->h16), cudaFree(mb->q), cudaFree(mb->out);
    for (int i = 0; i < 7; i++) cudaFree(mb->y[i]);
    free(mb->pos);
    for (int c = 0; c < ACOPY; c++) free(mb->flat[c]), free(mb->bt[c]);
}

/* Sequences [s0, s0 + n) of the pool: n sequences with contexts CTX_LO..CTX_HI; copy c of sequence
 * s owns pool blocks from (c * nseq_all + s) * MB_TAB, mapped through a scatter of the pool. */
static void mb_seqs(struct mbatch *mb, int64_t s0, int64_t n, int64_t nseq_all, int64_t nblocks)
{
    mb->n = mb->T = n;
    mb->att = true;
    mb->pos = malloc((size_t)n * sizeof(int64_t));
    if (!mb->pos) exit(1);
    double keys = 0.0;
    for (int64_t i = 0; i < n; i++) {
        const int64_t s = s0 + i;
        mb->pos[i] = CTX_LO + (s * 7919) % (CTX_HI - CTX_LO + 1) - 1;
        keys += (double)(mb->pos[i] + 1);
    }
    mb->kv_bytes = keys * 8.0 * 128.0 * 2.0; /* Hkv D, K and V, one byte each */
    for (int c = 0; c < ACOPY; c++) {
        mb->flat[c] = malloc((size_t)n * MB_TAB * sizeof(int32_t));
        mb->bt[c] = malloc((size_t)n * sizeof(*mb->bt[c]));
        if (!mb->flat[c] || !mb->bt[c]) exit(1);
        for (int64_t i = 0; i < n; i++) {
            const int64_t base = ((int64_t)c * nseq_all + s0 + i) * MB_TAB;
            for (int j = 0; j < MB_TAB; j++) mb->flat[c][i * MB_TAB + j] = (int32_t)(((base + j) * 7919) % nblocks);
            mb->bt[c][i] = mb->flat[c] + i * MB_TAB;
        }
        mb->b[c] = (struct tuna_attn_batch){n, mb->pos, mb->bt[c], BS, 0, MB_TAB, mb->flat[c]};
    }
}

static void line(const char *label, double ms, const char *extra, double t0, double t1)
{
    printf("  %-26s %8.3f ms %7.1f us/layer  %-32s [%.3f %.3f]\n", label, ms, ms * 1e3 / NL, extra, t0, t1);
    fflush(stdout);
}

/* The lines of one case: micro-batches A and B (B may have no attention: a prefill chunk's rows),
 * U the same work unsplit (GEMMs of A and B's rows at once, the attention of every sequence). */
static void run_case(struct bench *bn, struct mbatch *A, struct mbatch *B, struct mbatch *U)
{
    const double fA = bn->layer_flop_per_tok * (double)A->T, fB = bn->layer_flop_per_tok * (double)B->T;
    const double kv = (A->att ? A->kv_bytes : 0.0) + (B->att ? B->kv_bytes : 0.0);
    double t0, t1;
    char ex[160];
    const double un = time_run(bn, M_UNSPLIT, A, B, U, 0, PR_NONE, &t0, &t1);
    line("unsplit (one stream)", un, "", t0, t1);
    const double se = time_run(bn, M_SERIAL, A, B, U, 0, PR_NONE, &t0, &t1);
    snprintf(ex, sizeof ex, "%+.1f%% vs unsplit", 100.0 * (se / un - 1.0));
    line("serial split (one stream)", se, ex, t0, t1);
    const double at = time_run(bn, M_ATT, A, B, U, 0, PR_NONE, &t0, &t1);
    snprintf(ex, sizeof ex, "%.0f GB/s", NL * kv / (at * 1e-3) / 1e9);
    line("att only (A and B)", at, ex, t0, t1);
    const double au = time_run(bn, M_ATT_U, A, B, U, 0, PR_NONE, &t0, &t1);
    snprintf(ex, sizeof ex, "%.0f GB/s, %.1f us/call", NL * U->kv_bytes / (au * 1e-3) / 1e9, au * 1e3 / NL);
    line("att only unsplit", au, ex, t0, t1);
    const double gu = time_run(bn, M_GEMM_U, A, B, U, 0, PR_NONE, &t0, &t1);
    snprintf(ex, sizeof ex, "%.0f TFLOP/s", NL * (fA + fB) / (gu * 1e-3) / 1e12);
    line("gemm only unsplit n=0", gu, ex, t0, t1);
    /* each micro-batch alone (U := A, B): the references of the overlap's spans */
    double ga = time_run(bn, M_GEMM_U, A, B, A, 0, PR_NONE, &t0, &t1) * 1e3 / NL;
    double gb = time_run(bn, M_GEMM_U, A, B, B, 0, PR_NONE, &t0, &t1) * 1e3 / NL;
    double aa = A->att ? time_run(bn, M_ATT_U, A, B, A, 0, PR_NONE, &t0, &t1) * 1e3 / NL : 0.0;
    double ab = B->att ? time_run(bn, M_ATT_U, A, B, B, 0, PR_NONE, &t0, &t1) * 1e3 / NL : 0.0;
    printf("  alone per layer: gemm A %.1f us (%.0f TFLOP/s), gemm B %.1f us (%.0f TFLOP/s), att A %.1f us, att B "
           "%.1f us\n",
           ga, fA / (ga * 1e-6) / 1e12, gb, fB / (gb * 1e-6) / 1e12, aa, ab);
    static const int sms[] = {0, 116, 100, 84, 66};
    for (int k = 0; k < 5; k++) {
        char lab[64];
        const double gm = time_run(bn, M_GEMM, A, B, U, sms[k], PR_NONE, &t0, &t1);
        snprintf(lab, sizeof lab, "gemm only n=%d", sms[k]);
        snprintf(ex, sizeof ex, "%.0f TFLOP/s", NL * (fA + fB) / (gm * 1e-3) / 1e12);
        line(lab, gm, ex, t0, t1);
    }
    for (int k = 0; k < 7; k++) {
        char lab[64];
        const int n = k < 5 ? sms[k] : 0;
        const enum prio pr = k < 5 ? PR_NONE : k == 5 ? PR_GEMM : PR_ATT;
        const double ov = time_run(bn, M_OVERLAP, A, B, U, n, pr, &t0, &t1);
        if (ov < 0) continue;
        snprintf(lab, sizeof lab, "overlap%s n=%d", pr == PR_GEMM ? " gemm-hi" : pr == PR_ATT ? " att-hi" : "", n);
        snprintf(ex, sizeof ex, "hidden %5.1f%%, %+.1f%% vs unsplit", 100.0 * (se - ov) / at, 100.0 * (ov / un - 1.0));
        line(lab, ov, ex, t0, t1);
        printf("    spans per layer: gemm A %.0f us, gemm B %.0f us, att A %.0f us, att B %.0f us\n", bn->span_g[0],
               bn->span_g[1], bn->span_a[0], bn->span_a[1]);
    }
    const double un2 = time_run(bn, M_UNSPLIT, A, B, U, 0, PR_NONE, &t0, &t1);
    snprintf(ex, sizeof ex, "%+.1f%% vs the first", 100.0 * (un2 / un - 1.0));
    line("unsplit again", un2, ex, t0, t1);
    CK(cudaDeviceSynchronize());
}

/* Decode only: 2M sequences split into two micro-batches of M. */
static void run_m(struct bench *bn, int64_t M)
{
    const int64_t nseq_all = 2 * M, nblocks = (int64_t)ACOPY * nseq_all * MB_TAB;
    struct mbatch A, B, U;
    mb_alloc(&A, M), mb_alloc(&B, M), mb_alloc(&U, 2 * M);
    const size_t cache_bytes = (size_t)nblocks * BS * 8 * 128;
    bn->kc = bench_dev_fill_f8(cache_bytes);
    bn->vc = bench_dev_fill_f8(cache_bytes);
    mb_seqs(&A, 0, M, nseq_all, nblocks);
    mb_seqs(&B, M, M, nseq_all, nblocks);
    mb_seqs(&U, 0, 2 * M, nseq_all, nblocks);
    printf("M=%lld: decode, 2 micro-batches of %lld sequences (unsplit: %lld), contexts %d..%d, FP8 KV %.0f MB per "
           "micro-batch per layer, GEMMs %.1f GFLOP per micro-batch per layer\n",
           (long long)M, (long long)M, (long long)(2 * M), CTX_LO, CTX_HI, A.kv_bytes / 1e6,
           bn->layer_flop_per_tok * (double)M * 1e-9);
    run_case(bn, &A, &B, &U);
    mb_free(&A), mb_free(&B), mb_free(&U);
    cudaFree(bn->kc), cudaFree(bn->vc);
}

/* A mixed step: D decode sequences (micro-batch A: their GEMM rows and attention) and a prefill
 * chunk of P rows (micro-batch B: GEMMs only; its prefill attention is not run); unsplit: the
 * GEMMs of D + P rows at once, then the decode attention. */
static void run_mixed(struct bench *bn, int64_t D, int64_t P)
{
    const int64_t nblocks = (int64_t)ACOPY * D * MB_TAB;
    struct mbatch A, B, U;
    mb_alloc(&A, D), mb_alloc(&B, P), mb_alloc(&U, D + P);
    const size_t cache_bytes = (size_t)nblocks * BS * 8 * 128;
    bn->kc = bench_dev_fill_f8(cache_bytes);
    bn->vc = bench_dev_fill_f8(cache_bytes);
    mb_seqs(&A, 0, D, D, nblocks);
    mb_seqs(&U, 0, D, D, nblocks);
    U.T = D + P;
    B.T = P, B.att = false;
    printf("mixed: %lld decode sequences (A: GEMMs + attention, contexts %d..%d, FP8 KV %.0f MB per layer) beside a "
           "prefill chunk of %lld rows (B: GEMMs only); unsplit: GEMMs of %lld rows + the decode attention\n",
           (long long)D, CTX_LO, CTX_HI, A.kv_bytes / 1e6, (long long)P, (long long)(D + P));
    run_case(bn, &A, &B, &U);
    mb_free(&A), mb_free(&B), mb_free(&U);
    cudaFree(bn->kc), cudaFree(bn->vc);
}

int main(int argc, char **argv)
{
    if (bench_no_device()) return 0;
    static const int def[] = {256, 212};
    int Ms[32], nM = 0;
    const bool mixed_only = argc > 1 && strcmp(argv[1], "mixed") == 0;
    if (!mixed_only && bench_token_counts(argc, argv, "bench_overlap", def, 2, Ms, &nM) < 0) return 2;
    struct bench bn;
    memset(&bn, 0, sizeof bn);
    if (tuna_cuda_backend_new(0, &bn.be)) {
        fprintf(stderr, "bench_overlap: %s\n", tuna_last_error());
        return 1;
    }
    tuna_cuda_set_graphs(bn.be, false);
    struct cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    bn.sa = (cudaStream_t)tuna_cuda_backend_stream(bn.be);
    int prio_lo = 0, prio_hi = 0;
    CK(cudaDeviceGetStreamPriorityRange(&prio_lo, &prio_hi));
    bn.prio_hi = prio_hi;
    CK(cudaStreamCreateWithFlags(&bn.sg, cudaStreamNonBlocking));
    CK(cudaStreamCreateWithPriority(&bn.sghi, cudaStreamNonBlocking, prio_hi));
    const size_t ws_bytes = (size_t)32 << 20;
    cublasHandle_t *hs[3] = {&bn.hs, &bn.hg, &bn.hghi};
    cudaStream_t st[3] = {bn.sa, bn.sg, bn.sghi};
    for (int i = 0; i < 3; i++) {
        void *ws = NULL;
        CB(cublasCreate(hs[i]));
        CK(cudaMalloc(&ws, ws_bytes));
        CB(cublasSetWorkspace(*hs[i], ws, ws_bytes));
        CB(cublasSetStream(*hs[i], st[i]));
    }
    CK(cudaEventCreate(&bn.e0));
    CK(cudaEventCreate(&bn.e1));
    for (int i = 0; i < 8; i++) CK(cudaEventCreateWithFlags(&bn.ev[i], cudaEventDisableTiming));
    for (int i = 0; i < 2 * NL; i++) {
        CK(cudaEventCreate(&bn.tg[i]));
        CK(cudaEventCreate(&bn.ta[i]));
    }
    double params = 0.0;
    for (int i = 0; i < 7; i++) {
        const size_t bytes = (size_t)g_lin[i].N * (size_t)g_lin[i].K * 2;
        bn.w[0][i] = bench_dev_fill_bf16(bytes, 100u + (uint32_t)i);
        for (int c = 1; c < WCOPY; c++) {
            CK(cudaMalloc(&bn.w[c][i], bytes));
            CK(cudaMemcpy(bn.w[c][i], bn.w[0][i], bytes, cudaMemcpyDeviceToDevice));
        }
        params += (double)g_lin[i].N * (double)g_lin[i].K;
    }
    bn.layer_flop_per_tok = 2.0 * params;
    int ver = 0;
    (void)cublasGetVersion(bn.hs, &ver);
    printf("device: %s (cc %d.%d, %d SMs), cuBLAS %d, stream priorities %d..%d; %d layers, up to %d repeats per line "
           "(median)\n",
           prop.name, prop.major, prop.minor, prop.multiProcessorCount, ver, prio_lo, prio_hi, NL, REPS);
    for (int i = 0; i < nM; i++) run_m(&bn, Ms[i]);
    run_mixed(&bn, 424, 1624);
    for (int c = 0; c < WCOPY; c++)
        for (int i = 0; i < 7; i++) cudaFree(bn.w[c][i]);
    for (int i = 0; i < 3; i++) cublasDestroy(*hs[i]);
    tuna_cuda_backend_free(bn.be);
    return 0;
}
