/* bench_cuda_ops.c — the CUDA backend's ops at real model sizes, against the machine's ceilings.
 *
 * Measures, on GPU 0: device-to-device copy bandwidth (the memory roofline), the decode matmul
 * (fused GEMV, T = 1..8) on Llama-3-8B's weight shapes in bf16 as achieved GB/s of weights read,
 * the prefill matmul (cuBLAS bf16, T = 512 and 2048) as TFLOP/s, and attention over a paged bf16
 * KV cache with Llama-3-8B heads (H 32, Hkv 8, D 128, blocks of 16): decode at batch 1 / 4k
 * context and batch 32 / 128 at 1k as achieved GB/s of K and V read, prefill of 2048 tokens and a
 * chunked prefill (512 new tokens after 1536 cached) as TFLOP/s of the causal QK^T and PV products
 * actually done (`bench_cuda_ops prefill`: those two lines only; `bench_cuda_ops decode8`: the copy
 * and decode over an FP8 E4M3 cache at serving batch sizes, bytes counted at one per element).
 * Prints one table. Timings: CUDA
 * events, median of repeats after warm-up, weights and KV caches rotated among several copies so the 50 MB L2
 * cache does not serve them. */
#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cuda/cuda.h"
#include "core/dtype.h"

#include "bench_cuda_check.h"

static void *dev_random_bf16(size_t n);

static double g_copy_gbs; /* the copy rate measured first (decode attention lines print their share) */

/* One attention shape: 4 batches over 4 copies of the cache, used in turn. */
struct att_bench {
    tuna_backend *be;
    float *out, *q;
    void *kc, *vc;
    struct tuna_attn_batch b[4];
    enum tuna_dtype kvt; /* the cache's dtype: bf16, or FP8 E4M3 (`bench_cuda_ops decode8`) */
};

/* Median seconds of the attention op over reps runs after 3 warm-ups, rotating the copies. */
static double time_attention(struct att_bench *a, int reps, cudaEvent_t e0, cudaEvent_t e1)
{
    float ms[64];
    for (int r = 0; r < reps + 3; r++) {
        CK(cudaEventRecord(e0, 0));
        tuna_cuda_backend_ops()->attention(a->be, a->out, a->q, a->kc, a->vc, a->kvt, &a->b[r % 4], 32, 8, 128,
                                           0.08838834764831845f);
        CK(cudaEventRecord(e1, 0));
        CK(cudaEventSynchronize(e1));
        CK(cudaEventElapsedTime(&ms[r], e0, e1));
    }
    if (tuna_cuda_status(a->be)) {
        fprintf(stderr, "%s\n", tuna_last_error());
        exit(1);
    }
    qsort(ms + 3, (size_t)reps, sizeof(float), bench_cmp_float);
    return ms[3 + reps / 2] * 1e-3;
}

/* Mean seconds per call of reps calls queued back to back (rotating the copies): the GPU's time
 * per call when the host keeps ahead of it (no gap between kernels), as in a CUDA-graph step. */
static double time_attention_b2b(struct att_bench *a, int reps, cudaEvent_t e0, cudaEvent_t e1)
{
    float ms = 0.0f;
    CK(cudaEventRecord(e0, 0));
    for (int r = 0; r < reps; r++)
        tuna_cuda_backend_ops()->attention(a->be, a->out, a->q, a->kc, a->vc, a->kvt, &a->b[r % 4], 32, 8, 128,
                                           0.08838834764831845f);
    CK(cudaEventRecord(e1, 0));
    CK(cudaEventSynchronize(e1));
    CK(cudaEventElapsedTime(&ms, e0, e1));
    return ms * 1e-3 / reps;
}

/* Attention cases: nseq sequences of ctx tokens each, n_new query tokens per sequence at its
 * end (1 = decode, ctx = prefill from scratch); 4 copies of the cache, one per rotation (one when
 * a copy is over 256 MB: far past the L2 cache, and quicker to fill). */
/* ctx_lo > 0 (decode only): sequence s has a context of ctx_lo + (s * 7919) % (ctx - ctx_lo + 1) tokens
 * (a serving batch's spread of lengths; bytes counted over the actual contexts) */
static void bench_attention_kv(tuna_backend *be, const char *label, int64_t nseq, int64_t ctx, int64_t ctx_lo,
                               int64_t n_new, enum tuna_dtype kvt, cudaEvent_t e0, cudaEvent_t e1)
{
    const int64_t H = 32, Hkv = 8, D = 128, bs = 16, max_len = 8192, esz = kvt == TUNA_DTYPE_BF16 ? 2 : 1;
    const int64_t ncopy = nseq * ctx * Hkv * D * esz >= ((int64_t)256 << 20) ? 1 : 4;
    const int64_t blocks_per_seq = (ctx + bs - 1) / bs, nblocks = ncopy * nseq * blocks_per_seq;
    const int64_t T = nseq * n_new;
    struct att_bench a = {be, NULL, NULL, NULL, NULL, {{0}}, kvt};
    const size_t nel = (size_t)(nblocks * bs * Hkv * D);
    a.kc = esz == 2 ? dev_random_bf16(nel) : bench_dev_fill_f8(nel);
    a.vc = esz == 2 ? dev_random_bf16(nel) : bench_dev_fill_f8(nel);
    CK(cudaMalloc((void **)&a.out, (size_t)(T * H * D) * 4));
    CK(cudaMalloc((void **)&a.q, (size_t)(T * H * D) * 4));
    CK(cudaMemset(a.q, 0x3c, (size_t)(T * H * D) * 4));
    int32_t *tables = malloc((size_t)nblocks * sizeof(int32_t));
    for (int64_t i = 0; i < nblocks; i++) tables[i] = (int32_t)((i * 7919) % nblocks); /* scattered blocks */
    int64_t *pos = malloc((size_t)T * sizeof(int64_t));
    const int32_t **bt = malloc((size_t)(4 * T) * sizeof(*bt));
    for (int64_t s = 0, t = 0; s < nseq; s++)
        for (int64_t i = 0; i < n_new; i++, t++)
            pos[t] = (ctx_lo > 0 && n_new == 1 ? ctx_lo + (s * 7919) % (ctx - ctx_lo + 1) : ctx) - n_new + i;
    for (int c = 0; c < 4; c++) {
        for (int64_t t = 0; t < T; t++) bt[c * T + t] = tables + ((c % ncopy) * nseq + t / n_new) * blocks_per_seq;
        a.b[c] = (struct tuna_attn_batch){T, pos, bt + c * T, (int32_t)bs, 0, (int32_t)(max_len / bs), NULL};
    }
    double t = time_attention(&a, 20, e0, e1);
    if (n_new == 1) {
        double keys = 0.0;
        for (int64_t r = 0; r < T; r++) keys += (double)(pos[r] + 1);
        double bytes = keys * (double)(Hkv * D) * 2.0 * (double)esz; /* K and V */
        double tb = time_attention_b2b(&a, 40, e0, e1);
        printf("%-44s %10.1f GB/s  %5.1f%% of copy  %8.1f us  (back to back: %.1f us, %.1f GB/s)\n", label,
               bytes / t / 1e9, g_copy_gbs > 0 ? 100.0 * bytes / t / 1e9 / g_copy_gbs : 0.0, t * 1e6, tb * 1e6,
               bytes / tb / 1e9);
    } else {
        /* the causal products actually done: new token i (of n_new, after ctx - n_new cached) sees
         * ctx - n_new + i + 1 keys; 4 H D T (T + 1) / 2 for a prefill from scratch */
        double keys = (double)n_new * (double)(ctx - n_new) + (double)n_new * (double)(n_new + 1) / 2.0;
        double flops = 4.0 * (double)H * (double)D * (double)nseq * keys;
        double tb = time_attention_b2b(&a, 20, e0, e1);
        printf("%-44s %10.1f TFLOP/s %15.1f us  (back to back: %.1f us, %.1f TFLOP/s)\n", label, flops / t / 1e12,
               t * 1e6, tb * 1e6, flops / tb / 1e12);
    }
    CK(cudaFree(a.kc));
    CK(cudaFree(a.vc));
    CK(cudaFree(a.out));
    CK(cudaFree(a.q));
    free(tables), free(pos), free(bt);
}

static void bench_attention(tuna_backend *be, const char *label, int64_t nseq, int64_t ctx, int64_t n_new,
                            cudaEvent_t e0, cudaEvent_t e1)
{
    bench_attention_kv(be, label, nseq, ctx, 0, n_new, TUNA_DTYPE_BF16, e0, e1);
}

static void *dev_random_bf16(size_t n)
{
    uint16_t *h = malloc(n * 2);
    if (!h) {
        fprintf(stderr, "bench_cuda_ops: out of host memory (%zu bytes)\n", n * 2);
        exit(1);
    }
    uint64_t s = 0x9E3779B97F4A7C15ull;
    for (size_t i = 0; i < n; i++) {
        s ^= s << 13, s ^= s >> 7, s ^= s << 17;
        h[i] = tuna_f32_to_bf16(((float)(s >> 40) / 16777216.0f - 0.5f) * 0.05f);
    }
    void *d;
    CK(cudaMalloc(&d, n * 2));
    CK(cudaMemcpy(d, h, n * 2, cudaMemcpyHostToDevice));
    free(h);
    return d;
}

/* ---- decode fusions (fused.cu, q4.cu, rope_kv.cu) on one Llama-3-8B layer, T = 1 ----
 * Each op over 4 copies of the layer's weights in turn, then a chain of 32 layers without
 * attention (norm+q/k/v with rope+KV store (rmsnorm_qkv_rope_kv), o added into x,
 * norm+gate/up+GLU, down added) as the decode step runs it: µs per layer and GB/s of weights.
 * bf16 and NF4 (blocksize 64, random codes). TUNA_PDL / TUNA_GEMV_PREFETCH / TUNA_GEMV_OLD /
 * TUNA_ROPE_FUSE / TUNA_Q4_* change what runs. */
struct fz_layer {
    struct tuna_weight q, k, v, o, g, u, d;
};

static void fz_weight(struct tuna_weight *w, int64_t N, int64_t K, int q4, struct tuna_cuda_q4 *qd)
{
    w->rows = N;
    w->cols = K;
    if (!q4) {
        w->dtype = TUNA_DTYPE_BF16;
        w->data = dev_random_bf16((size_t)(N * K));
        w->q4 = NULL;
        return;
    }
    /* double-quantized scales, as --load-in-4bit makes them (BENCH_Q4_F32_ABSMAX=1: float32 ones):
     * one buffer [256 code floats | nested absmax | 8-bit codes] */
    const bool f32am = getenv("BENCH_Q4_F32_ABSMAX") && getenv("BENCH_Q4_F32_ABSMAX")[0] == '1';
    size_t nb = (size_t)(N * K) / 2, na = (size_t)(N * K) / 64, nn = (na + 255) / 256;
    size_t sb = f32am ? na * 4 : 1024 + nn * 4 + na;
    uint8_t *h = malloc(nb), *hs = malloc(sb);
    uint64_t s = 0xD1B54A32D192ED03ull ^ (uint64_t)N;
    for (size_t i = 0; i < nb; i++) {
        s ^= s << 13, s ^= s >> 7, s ^= s << 17;
        h[i] = (uint8_t)(s >> 32);
    }
    if (f32am) {
        for (size_t i = 0; i < na; i++) ((float *)hs)[i] = 0.01f + 0.001f * (float)(i % 7);
    } else {
        for (int i = 0; i < 256; i++) ((float *)hs)[i] = ((float)i - 127.5f) / 127.5f;
        for (size_t i = 0; i < nn; i++) ((float *)hs)[256 + i] = 0.004f;
        for (size_t i = 0; i < na; i++) hs[1024 + nn * 4 + i] = (uint8_t)(i * 37);
    }
    void *dc, *da;
    CK(cudaMalloc(&dc, nb));
    CK(cudaMalloc(&da, sb));
    CK(cudaMemcpy(dc, h, nb, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(da, hs, sb, cudaMemcpyHostToDevice));
    free(h);
    free(hs);
    memset(qd, 0, sizeof *qd);
    for (int c = 0; c < 16; c++) qd->lut[c] = ((float)c - 7.5f) / 7.5f;
    qd->blocksize = 64;
    qd->round_mode = 1;
    qd->prefill = TUNA_DTYPE_BF16;
    if (f32am) {
        qd->absmax = da;
    } else {
        qd->nested_code = da;
        qd->nested_absmax = (const float *)((const uint8_t *)da + 1024);
        qd->qabsmax = (const uint8_t *)da + 1024 + nn * 4;
        qd->nested_offset = 0.012f;
        qd->nested_shift = 8;
    }
    w->dtype = TUNA_DTYPE_NF4;
    w->data = dc;
    w->q4 = qd;
}

static double fz_bytes(const struct tuna_weight *w)
{
    double n = (double)w->rows * (double)w->cols;
    if (!w->q4) return n * 2;
    if (((const struct tuna_cuda_q4 *)w->q4)->absmax) return n / 2 + n / 64 * 4;
    return n / 2 + n / 64 + n / 64 / 256 * 4 + 1024;
}

static void bench_fused_decode(tuna_backend *be, cudaEvent_t e0, cudaEvent_t e1)
{
    const struct tuna_backend_ops *op = tuna_cuda_backend_ops();
    const int64_t C = 4096, I = 14336, Hkv = 8, H = 32, D = 128;
    static struct tuna_cuda_q4 qd[4][7];
    float *x, *xn, *q, *k, *v, *act, *nw, *inv;
    void *kc, *vc;
    CK(cudaMalloc((void **)&x, C * 4));
    CK(cudaMalloc((void **)&xn, C * 4));
    CK(cudaMalloc((void **)&q, C * 4));
    CK(cudaMalloc((void **)&k, 1024 * 4));
    CK(cudaMalloc((void **)&v, 1024 * 4));
    CK(cudaMalloc((void **)&act, I * 4));
    CK(cudaMalloc((void **)&nw, C * 4));
    CK(cudaMalloc(&kc, 4096 * 1024 * 2));
    CK(cudaMalloc(&vc, 4096 * 1024 * 2));
    CK(cudaMemset(x, 0x3c, C * 4));
    CK(cudaMemset(nw, 0x3c, C * 4));
    CK(cudaMemset(q, 0, C * 4));
    CK(cudaMemset(k, 0, 1024 * 4));
    CK(cudaMemset(v, 0, 1024 * 4));
    inv = malloc(64 * 4);
    for (int i = 0; i < 64; i++) inv[i] = powf(500000.0f, -(float)i / 64.0f);
    int64_t pos = 1000, slot = 77;
    /* BENCH_FUSED_ONLY=nf4: the NF4 lines alone; =bf16: the bf16 lines alone */
    const char *only = getenv("BENCH_FUSED_ONLY");
    const int q4_end = only && strcmp(only, "bf16") == 0 ? 1 : 2;
    for (int q4 = only && strcmp(only, "nf4") == 0 ? 1 : 0; q4 < q4_end; q4++) {
        struct fz_layer L[4];
        for (int c = 0; c < 4; c++) {
            fz_weight(&L[c].q, C, C, q4, &qd[c][0]);
            fz_weight(&L[c].k, 1024, C, q4, &qd[c][1]);
            fz_weight(&L[c].v, 1024, C, q4, &qd[c][2]);
            fz_weight(&L[c].o, C, C, q4, &qd[c][3]);
            fz_weight(&L[c].g, I, C, q4, &qd[c][4]);
            fz_weight(&L[c].u, I, C, q4, &qd[c][5]);
            fz_weight(&L[c].d, C, I, q4, &qd[c][6]);
        }
        const char *tag = q4 ? "NF4" : "bf16";
        float ms[64];
        for (int which = 0; which < 6; which++) {
            const int reps = 30;
            double bytes = 0;
            for (int r = 0; r < reps + 3; r++) {
                struct fz_layer *l = &L[r % 4];
                float *ys[3] = {q, k, v};
                const struct tuna_weight *ws[3] = {&l->q, &l->k, &l->v};
                CK(cudaEventRecord(e0, 0));
                if (which == 0) op->rmsnorm_matmul_multi(be, 3, ys, xn, x, nw, 1e-5f, ws, NULL, 1);
                else if (which == 1) op->rmsnorm_matmul_glu(be, act, xn, x, nw, 1e-5f, &l->g, NULL, &l->u, NULL, 1, 0);
                else if (which == 2) op->matmul_add(be, x, q, &l->o, NULL, 1);
                else if (which == 3) op->matmul_add(be, x, act, &l->d, NULL, 1);
                else if (which == 4)
                    op->rope_kv_store(be, q, k, v, NULL, NULL, 1e-5f, kc, vc, TUNA_DTYPE_BF16, &pos, &slot, 1, H, Hkv,
                                      D, D, inv, 1.0f);
                else
                    op->rmsnorm_qkv_rope_kv(be, ys, xn, x, nw, 1e-5f, ws, NULL, kc, vc, TUNA_DTYPE_BF16, &pos, &slot, 1,
                                            H, Hkv, D, D, inv, 1.0f);
                CK(cudaEventRecord(e1, 0));
                CK(cudaEventSynchronize(e1));
                CK(cudaEventElapsedTime(&ms[r], e0, e1));
            }
            if (tuna_cuda_status(be)) {
                fprintf(stderr, "%s\n", tuna_last_error());
                exit(1);
            }
            qsort(ms + 3, (size_t)reps, sizeof(float), bench_cmp_float);
            double t = ms[3 + reps / 2] * 1e-3;
            static const char *names[] = {"norm+q/k/v 6144x4096", "norm+gate/up+GLU 2x14336x4096",
                                          "o added 4096x4096", "down added 4096x14336", "rope+kv_store",
                                          "norm+q/k/v+rope+kv 6144x4096"};
            if (which == 0 || which == 5) bytes = fz_bytes(&L[0].q) + 2 * fz_bytes(&L[0].k);
            else if (which == 1) bytes = 2 * fz_bytes(&L[0].g);
            else if (which == 2) bytes = fz_bytes(&L[0].o);
            else if (which == 3) bytes = fz_bytes(&L[0].d);
            char label[96];
            snprintf(label, sizeof label, "fused %s %s T=1", tag, names[which]);
            if (bytes > 0)
                printf("%-44s %10.1f GB/s  %5.1f%% of copy  %8.1f us\n", label, bytes / t / 1e9,
                       100.0 * bytes / t / 1e9 / g_copy_gbs, t * 1e6);
            else
                printf("%-44s %29.1f us\n", label, t * 1e6);
        }
        /* 32 layers back to back (no attention): the step's GEMV chain with its launches and gaps.
         * BENCH_CHAIN_OPS=mask: the chain with only some of its ops (1 norm+q/k/v+rope+kv, 2 o,
         * 4 norm+gate/up+GLU, 8 down; default 15), so each op's time inside a back-to-back chain
         * (with PDL's overlap, unlike the isolated calls above) can be taken apart */
        const char *co = getenv("BENCH_CHAIN_OPS");
        char *end = NULL;
        const long cm = co ? strtol(co, &end, 10) : 15;
        int cmask = 15;
        if (co && (end == co || *end || cm < 1 || cm > 15))
            fprintf(stderr, "BENCH_CHAIN_OPS=%s: want a mask from 1 to 15 (1 q/k/v, 2 o, 4 gate/up, 8 down); "
                            "running the whole chain\n", co);
        else cmask = (int)cm;
        /* BENCH_CHAIN_MLP=1: gate/up and down (both in the mask) as the one MLP op where the backend
         * has it (rmsnorm_glu_down; its pending sums folded by the next q/k/v and o) */
        const char *cmlp = getenv("BENCH_CHAIN_MLP");
        const bool mlp = cmlp && cmlp[0] == '1' && op->rmsnorm_glu_down && (cmask & 12) == 12;
        double lbytes = 0;
        if (cmask & 1) lbytes += fz_bytes(&L[0].q) + 2 * fz_bytes(&L[0].k);
        if (cmask & 2) lbytes += fz_bytes(&L[0].o);
        if (cmask & 4) lbytes += 2 * fz_bytes(&L[0].g);
        if (cmask & 8) lbytes += fz_bytes(&L[0].d);
        for (int r = 0; r < 8; r++) {
            CK(cudaEventRecord(e0, 0));
            for (int l = 0; l < 32; l++) {
                struct fz_layer *y = &L[l % 4];
                float *ys[3] = {q, k, v};
                const struct tuna_weight *ws[3] = {&y->q, &y->k, &y->v};
                /* norm+q/k/v, rope and the KV store (one launch when fused.cu fuses them) */
                if (cmask & 1)
                    op->rmsnorm_qkv_rope_kv(be, ys, xn, x, nw, 1e-5f, ws, NULL, kc, vc, TUNA_DTYPE_BF16, &pos, &slot, 1,
                                            H, Hkv, D, D, inv, 1.0f);
                if (cmask & 2) op->matmul_add(be, x, q, &y->o, NULL, 1);
                if (mlp && op->rmsnorm_glu_down(be, x, xn, nw, 1e-5f, &y->g, &y->u, &y->d, 1, 0)) continue;
                if (cmask & 4) op->rmsnorm_matmul_glu(be, act, xn, x, nw, 1e-5f, &y->g, NULL, &y->u, NULL, 1, 0);
                if (cmask & 8) op->matmul_add(be, x, act, &y->d, NULL, 1);
            }
            CK(cudaEventRecord(e1, 0));
            CK(cudaEventSynchronize(e1));
            CK(cudaEventElapsedTime(&ms[r], e0, e1));
        }
        qsort(ms + 2, 6, sizeof(float), bench_cmp_float);
        double t = ms[5] * 1e-3 / 32;
        char label[96];
        if (cmask != 15) snprintf(label, sizeof label, "fused %s layer chain x32 ops %d%s", tag, cmask, mlp ? " mlp" : "");
        else snprintf(label, sizeof label, "fused %s layer chain x32 (no attention)%s", tag, mlp ? " mlp" : "");
        printf("%-44s %10.1f GB/s  %5.1f%% of copy  %8.1f us/layer\n", label, lbytes / t / 1e9,
               100.0 * lbytes / t / 1e9 / g_copy_gbs, t * 1e6);
        for (int c = 0; c < 4; c++) {
            struct tuna_weight *ws[7] = {&L[c].q, &L[c].k, &L[c].v, &L[c].o, &L[c].g, &L[c].u, &L[c].d};
            for (int i = 0; i < 7; i++) {
                CK(cudaFree((void *)ws[i]->data));
                if (q4) CK(cudaFree(qd[c][i].absmax ? (void *)qd[c][i].absmax : (void *)qd[c][i].nested_code));
            }
        }
    }
    free(inv);
    void *bufs[] = {x, xn, q, k, v, act, nw, kc, vc};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) CK(cudaFree(bufs[i]));
}

int main(int argc, char **argv)
{
    tuna_backend *be;
    if (tuna_cuda_backend_new(0, &be)) {
        fprintf(stderr, "bench_cuda_ops: %s\n", tuna_last_error());
        return 1;
    }
    struct cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    if (argc > 1 && strcmp(argv[1], "prefill") == 0) { /* only the prefill attention lines */
        bench_attention(be, "attention prefill T=2048 (causal)", 1, 2048, 2048, e0, e1);
        bench_attention(be, "attention chunked prefill 512 after 1536", 1, 2048, 512, e0, e1);
        tuna_cuda_backend_free(be);
        return 0;
    }
    float ms[64];
    const int reps = 30;

    /* memory roofline: a 2 GiB device-to-device copy counts read + write */
    size_t big = (size_t)1 << 30;
    void *a, *b;
    CK(cudaMalloc(&a, big));
    CK(cudaMalloc(&b, big));
    CK(cudaMemset(a, 1, big));
    for (int r = 0; r < 12; r++) {
        CK(cudaEventRecord(e0, 0));
        CK(cudaMemcpyAsync(b, a, big, cudaMemcpyDeviceToDevice, 0));
        CK(cudaEventRecord(e1, 0));
        CK(cudaEventSynchronize(e1));
        CK(cudaEventElapsedTime(&ms[r], e0, e1));
    }
    qsort(ms + 2, 10, sizeof(float), bench_cmp_float);
    double copy_gbs = 2.0 * (double)big / (ms[7] * 1e-3) / 1e9;
    g_copy_gbs = copy_gbs;
    CK(cudaFree(a));
    CK(cudaFree(b));
    printf("device: %s (cc %d.%d, %d SMs)\n", prop.name, prop.major, prop.minor, prop.multiProcessorCount);
    printf("%-44s %10.1f GB/s\n", "device-to-device copy (read+write)", copy_gbs);
    if (argc > 1 && strcmp(argv[1], "decode8") == 0) { /* the copy and decode attention over an FP8 cache */
        static const struct {
            int64_t nseq, ctx, lo;
        } c8[] = {{256, 1024, 0}, {256, 2048, 0}, {424, 1500, 0}, {424, 2000, 1000}, {512, 1024, 0}, {512, 2048, 0}, {32, 1024, 0}};
        for (size_t k = 0; k < sizeof c8 / sizeof c8[0]; k++) {
            char label[64];
            if (c8[k].lo)
                snprintf(label, sizeof label, "attention decode fp8 B=%d ctx=%d..%d", (int)c8[k].nseq, (int)c8[k].lo,
                         (int)c8[k].ctx);
            else
                snprintf(label, sizeof label, "attention decode fp8 B=%d ctx=%d", (int)c8[k].nseq, (int)c8[k].ctx);
            bench_attention_kv(be, label, c8[k].nseq, c8[k].ctx, c8[k].lo, 1, TUNA_DTYPE_F8_E4M3, e0, e1);
        }
        tuna_cuda_backend_free(be);
        return 0;
    }
    if (argc > 1 && strcmp(argv[1], "decode") == 0) { /* only the copy and the decode attention lines */
        bench_attention(be, "attention decode B=1 ctx=4096", 1, 4096, 1, e0, e1);
        bench_attention(be, "attention decode B=32 ctx=1024", 32, 1024, 1, e0, e1);
        bench_attention(be, "attention decode B=128 ctx=1024", 128, 1024, 1, e0, e1);
        bench_attention(be, "attention decode B=256 ctx=2048", 256, 2048, 1, e0, e1);
        bench_attention(be, "attention decode B=64 ctx=4096", 64, 4096, 1, e0, e1);
        tuna_cuda_backend_free(be);
        return 0;
    }

    if (getenv("BENCH_FUSED_ONLY")) { /* the decode-fusion lines alone (quick A/B runs) */
        bench_fused_decode(be, e0, e1);
        tuna_cuda_backend_free(be);
        return 0;
    }
    /* Llama-3-8B linear shapes: q, k/v, o, gate/up, down, lm_head */
    static const struct {
        const char *name;
        int64_t N, K;
    } shapes[] = {{"q_proj / o_proj 4096x4096", 4096, 4096},
                  {"k_proj / v_proj 1024x4096", 1024, 4096},
                  {"gate / up 14336x4096", 14336, 4096},
                  {"down 4096x14336", 4096, 14336},
                  {"lm_head 128256x4096", 128256, 4096}};
    const int copies = 4;
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int64_t N = shapes[s].N, K = shapes[s].K;
        size_t nw = (size_t)(N * K);
        struct tuna_weight w[4];
        for (int c = 0; c < copies; c++) {
            w[c].dtype = TUNA_DTYPE_BF16;
            w[c].rows = N;
            w[c].cols = K;
            w[c].data = dev_random_bf16(nw);
            w[c].q4 = NULL;
        }
        float *x, *y;
        CK(cudaMalloc((void **)&x, (size_t)2048 * (size_t)K * 4));
        CK(cudaMalloc((void **)&y, (size_t)2048 * (size_t)N * 4));
        CK(cudaMemset(x, 0x3c, (size_t)2048 * (size_t)K * 4)); /* 0x3c3c3c3c ≈ 0.0115 */
        const int64_t Ts[] = {1, 4, 8, 512, 2048};
        for (size_t ti = 0; ti < sizeof Ts / sizeof Ts[0]; ti++) {
            int64_t T = Ts[ti];
            int nrep = T >= 512 ? 10 : reps;
            for (int r = 0; r < nrep + 3; r++) {
                CK(cudaEventRecord(e0, 0));
                tuna_cuda_backend_ops()->matmul(be, y, x, &w[r % copies], NULL, T);
                CK(cudaEventRecord(e1, 0));
                CK(cudaEventSynchronize(e1));
                CK(cudaEventElapsedTime(&ms[r], e0, e1));
            }
            if (tuna_cuda_status(be)) {
                fprintf(stderr, "%s\n", tuna_last_error());
                return 1;
            }
            qsort(ms + 3, (size_t)nrep, sizeof(float), bench_cmp_float);
            double t = ms[3 + nrep / 2] * 1e-3;
            char label[96];
            snprintf(label, sizeof label, "matmul %s T=%lld", shapes[s].name, (long long)T);
            if (T <= TUNA_CUDA_GEMV_MAX_T) {
                double gbs = (double)nw * 2.0 / t / 1e9;
                printf("%-44s %10.1f GB/s  %5.1f%% of copy  %8.1f us\n", label, gbs, 100.0 * gbs / copy_gbs, t * 1e6);
            } else {
                double tf = 2.0 * (double)N * (double)K * (double)T / t / 1e12;
                printf("%-44s %10.1f TFLOP/s %18.1f us\n", label, tf, t * 1e6);
            }
        }
        for (int c = 0; c < copies; c++) CK(cudaFree((void *)w[c].data));
        CK(cudaFree(x));
        CK(cudaFree(y));
    }

    bench_fused_decode(be, e0, e1);

    /* attention, bf16 KV cache, Llama-3-8B heads */
    bench_attention(be, "attention decode B=1 ctx=4096", 1, 4096, 1, e0, e1);
    bench_attention(be, "attention decode B=32 ctx=1024", 32, 1024, 1, e0, e1);
    bench_attention(be, "attention decode B=128 ctx=1024", 128, 1024, 1, e0, e1);
    bench_attention(be, "attention decode B=256 ctx=2048", 256, 2048, 1, e0, e1);
    bench_attention(be, "attention decode B=64 ctx=4096", 64, 4096, 1, e0, e1);
    bench_attention(be, "attention prefill T=2048 (causal)", 1, 2048, 2048, e0, e1);
    bench_attention(be, "attention chunked prefill 512 after 1536", 1, 2048, 512, e0, e1);
    tuna_cuda_backend_free(be);
    return 0;
}
