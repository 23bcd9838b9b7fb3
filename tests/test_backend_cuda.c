/* test_backend_cuda.c — every op of the CUDA backend against the CPU backend (the reference) on
 * random inputs, with sizes that are multiples of no tile (ggml's test-backend-ops idea).
 * Tolerances: float32 paths 1e-5 relative; matmuls through cuBLAS with 16-bit weights round the
 * activations to 16 bits: 1e-2 (bf16) / 2e-3 (f16). Skips without a GPU. */
#include "cuda_testutil.h"

#include <cuda_runtime_api.h>

#include "backend/cpu/act16.h"
#include "core/dtype.h"
#include "quant/nf4.h"

/* n 16-bit values of type dt (host) as a new float32 array */
static float *wide16(enum tuna_dtype dt, const void *p, size_t n)
{
    float *f = malloc(n * 4 + 4);
    assert_non_null(f);
    assert_true(tuna_convert_to_f32(dt, p, f, n));
    return f;
}

/* Tolerance of the 16-bit activation ops against their CPU twins: outputs rounded once on both
 * sides from float32 values that differ in the order of their sums (one unit in the last place
 * here and there). */
static double tol16(enum tuna_dtype adt) { return adt == TUNA_DTYPE_BF16 ? 1e-2 : 2e-3; }

static void test_matmul(void **state)
{
    (void)state;
    NEED_GPU();
    const enum tuna_dtype types[] = {TUNA_DTYPE_F32, TUNA_DTYPE_BF16, TUNA_DTYPE_F16};
    const int64_t Ts[] = {1, 3, 8, 9, 33};
    const int64_t NK[][2] = {{1, 8}, {37, 40}, {64, 129}, {256, 1024}, {300, 72}};
    for (size_t ti = 0; ti < 3; ti++) {
        for (size_t s = 0; s < sizeof NK / sizeof NK[0]; s++) {
            int64_t N = NK[s][0], K = NK[s][1];
            float *wf = rnd((size_t)(N * K));
            size_t wbytes = tuna_dtype_nbytes(types[ti], (uint64_t)(N * K));
            void *wh = malloc(wbytes);
            tuna_convert_from_f32(types[ti], wf, wh, (size_t)(N * K));
            struct tuna_weight wc = {types[ti], N, K, wh, NULL, 0};
            struct tuna_weight wg = {types[ti], N, K, dev(wh, wbytes), NULL, 0};
            float *bias = rnd((size_t)N);
            float *dbias = dev(bias, (size_t)N * 4);
            for (size_t tt = 0; tt < sizeof Ts / sizeof Ts[0]; tt++) {
                int64_t T = Ts[tt];
                float *x = rnd((size_t)(T * K));
                float *yc = malloc((size_t)(T * N) * 4), *yg = malloc((size_t)(T * N) * 4);
                float *dx = dev(x, (size_t)(T * K) * 4), *dy = dev(NULL, (size_t)(T * N) * 4);
                g_cops->matmul(g_cpu, yc, x, &wc, (tt & 1) ? bias : NULL, T);
                g_gops->matmul(g_gpu, dy, dx, &wg, (tt & 1) ? dbias : NULL, T);
                back(yg, dy, (size_t)(T * N) * 4);
                char what[128];
                snprintf(what, sizeof what, "matmul %s T=%lld N=%lld K=%lld", tuna_dtype_name(types[ti]),
                         (long long)T, (long long)N, (long long)K);
                double tol = 1e-5;
                if (T > tuna_cuda_gemv_max_t16() && types[ti] == TUNA_DTYPE_BF16) tol = 1e-2;
                if (T > tuna_cuda_gemv_max_t16() && types[ti] == TUNA_DTYPE_F16) tol = 2e-3;
                check(what, yg, yc, (size_t)(T * N), tol);
                tuna_cuda_free(g_gpu, dx);
                tuna_cuda_free(g_gpu, dy);
                free(x);
                free(yc);
                free(yg);
            }
            tuna_cuda_free(g_gpu, (void *)wg.data);
            tuna_cuda_free(g_gpu, dbias);
            free(bias);
            free(wf);
            free(wh);
        }
    }
}

/* 4-bit weights: the CPU matmul on the bitsandbytes state vs the GPU's fused GEMV (T <= 8) and
 * dequantize + cuBLAS path, NF4 and FP4, with the checkpoint dtype float32 and bfloat16. */
static void test_matmul_q4(void **state)
{
    (void)state;
    NEED_GPU();
    const int64_t NK[][2] = {{37, 64}, {256, 1024}, {130, 96}, {64, 200}};
    const int64_t Ts[] = {1, 3, 8, 9, 33};
    for (int type = 0; type < 2; type++) {
        for (int od = 0; od < 2; od++) {
            for (size_t s = 0; s < sizeof NK / sizeof NK[0]; s++) {
                int64_t N = NK[s][0], K = NK[s][1];
                float *wf = rnd((size_t)(N * K));
                struct tuna_q4_weight q;
                enum tuna_dtype orig = od ? TUNA_DTYPE_BF16 : TUNA_DTYPE_F32;
                TT_OK(tuna_q4_quantize(wf, TUNA_DTYPE_F32, N, K, type ? TUNA_Q4_FP4 : TUNA_Q4_NF4, 64, true, orig, &q));
                struct tuna_weight wc = {type ? TUNA_DTYPE_FP4 : TUNA_DTYPE_NF4, N, K, q.codes, &q, 0};
                /* the GPU descriptor, with the CPU dequantizer's table (as src/model/device.c) */
                struct tuna_cuda_q4 d;
                memset(&d, 0, sizeof d);
                tuna_q4_dequant_table(q.type, d.lut);
                d.blocksize = q.blocksize;
                d.round_mode = od ? 1 : 0;
                /* the scales double-quantized (as a model loads them) for odd shapes, float32 for even */
                if (s % 2 == 0) {
                    d.absmax = dev(q.absmax, (size_t)q.n_blocks * 4);
                } else {
                    d.nested_shift = 8;
                    assert_int_equal(q.nested_blocksize, 256);
                    d.nested_code = dev(q.nested_code, sizeof q.nested_code);
                    d.nested_absmax = dev(q.nested_absmax, (size_t)q.n_nested * 4);
                    d.qabsmax = dev(q.qabsmax, (size_t)q.n_blocks);
                    d.nested_offset = q.nested_offset;
                }
                struct tuna_weight wg = {wc.dtype, N, K, dev(q.codes, (size_t)((N * K + 1) / 2)), &d, 0};
                /* float32 compute: exact kernels; bf16 compute: the fast kernel (absmax factored
                 * out) for T <= 8 and bf16 dequantization + cuBLAS above */
                for (size_t tt = 0; tt < 2 * sizeof Ts / sizeof Ts[0]; tt++) {
                    d.prefill = tt < sizeof Ts / sizeof Ts[0] ? TUNA_DTYPE_F32 : TUNA_DTYPE_BF16;
                    int64_t T = Ts[tt % (sizeof Ts / sizeof Ts[0])];
                    float *x = rnd((size_t)(T * K));
                    float *yc = malloc((size_t)(T * N) * 4), *yg = malloc((size_t)(T * N) * 4);
                    float *dx = dev(x, (size_t)(T * K) * 4), *dy = dev(NULL, (size_t)(T * N) * 4);
                    g_cops->matmul(g_cpu, yc, x, &wc, NULL, T);
                    g_gops->matmul(g_gpu, dy, dx, &wg, NULL, T);
                    back(yg, dy, (size_t)(T * N) * 4);
                    char what[160];
                    snprintf(what, sizeof what, "matmul %s (from %s, %s compute) T=%lld N=%lld K=%lld",
                             type ? "FP4" : "NF4", od ? "bf16" : "f32", tuna_dtype_name(d.prefill), (long long)T,
                             (long long)N, (long long)K);
                    double tol = 1e-5;
                    if (d.prefill == TUNA_DTYPE_BF16) tol = T > TUNA_CUDA_GEMV_MAX_T ? 1e-2 : 2e-3;
                    check(what, yg, yc, (size_t)(T * N), tol);
                    tuna_cuda_free(g_gpu, dx);
                    tuna_cuda_free(g_gpu, dy);
                    free(x), free(yc), free(yg);
                }
                tuna_cuda_free(g_gpu, (void *)wg.data);
                tuna_cuda_free(g_gpu, (void *)d.absmax);
                tuna_cuda_free(g_gpu, (void *)d.nested_code);
                tuna_cuda_free(g_gpu, (void *)d.nested_absmax);
                tuna_cuda_free(g_gpu, (void *)d.qabsmax);
                tuna_q4_weight_free(&q);
                free(wf);
            }
        }
    }
}

/* LoRA (the segmented shrink/expand kernels of lora.cu against the CPU twin): adapters of ranks
 * 1, 8, 16, 64 and 0 mixed per token with tokens without adapter (-1) and past the set (7);
 * float32 adapter weights (CUDA-core kernels, exact to 1e-5) and bf16 (tensor cores: x and the
 * rank-r activations rounded to bf16, 1e-2); odd N and K (scalar paths) and even ones (vector
 * paths); batches of one token tile and of many. Three forms: one linear (run once with the
 * op's own grouping and once with the caller's, as the step block gives it: the same bits;
 * tokens without an adapter untouched), three linears of different N sharing x (q/k/v, one of
 * them with other ranks), gate/up folded into the GLU and the residual form (o/down: every token,
 * adapter or not). */
static void test_lora(void **state)
{
    (void)state;
    NEED_GPU();
    enum { NA = 5, NL = 3 };
    const int64_t ranks[NL][NA] = {{1, 8, 16, 64, 0}, {16, 0, 8, 1, 64}, {8, 8, 0, 16, 2}};
    const int64_t shapes[][3] = {{11, 300, 136}, {37, 129, 77}, {300, 1030, 515}, {64, 4096, 512}, {200, 512, 4096}};
    const enum tuna_dtype dts[2] = {TUNA_DTYPE_F32, TUNA_DTYPE_BF16};
    double worst[2] = {0, 0}; /* printed: the largest relative error of each dtype */
#define LORA_CHECK(what, got, want, n)                                        \
    do {                                                                      \
        check(what, got, want, n, tol);                                       \
        const double e_ = tt_rel_err(got, want, n);                           \
        if (e_ > worst[di]) worst[di] = e_;                                   \
    } while (0)
    for (int di = 0; di < 2; di++) {
        const enum tuna_dtype dt = dts[di];
        const double tol = dt == TUNA_DTYPE_F32 ? 1e-5 : 1e-2;
        for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
            const int64_t T = shapes[si][0], N = shapes[si][1], K = shapes[si][2];
            const int64_t Ns[NL] = {N, N / 2 + 3, N}; /* linear 2 has N too: gate/up are 0 and 2 */
            struct tuna_lora_w wc[NL][NA], wg[NL][NA];
            void *keep[NL][2 * NA];
            struct tuna_lora_w *dw[NL];
            struct tuna_lora_bank sc[NL], sg[NL];
            for (int l = 0; l < NL; l++) {
                for (int a = 0; a < NA; a++) {
                    const int64_t r = ranks[l][a];
                    float *A = rnd((size_t)(r * K) + 1), *B = rnd((size_t)(Ns[l] * r) + 1);
                    size_t ba = tuna_dtype_nbytes(dt, (uint64_t)(r * K)), bb = tuna_dtype_nbytes(dt, (uint64_t)(Ns[l] * r));
                    void *hA = malloc(ba + 4), *hB = malloc(bb + 4);
                    tuna_convert_from_f32(dt, A, hA, (size_t)(r * K));
                    tuna_convert_from_f32(dt, B, hB, (size_t)(Ns[l] * r));
                    free(A), free(B);
                    const float scale = 0.5f + 0.75f * (float)a - 0.25f * (float)l;
                    wc[l][a] = (struct tuna_lora_w){hA, hB, r, scale, 0};
                    wg[l][a] = (struct tuna_lora_w){dev(hA, ba), dev(hB, bb), r, scale, 0};
                    keep[l][2 * a] = (void *)wg[l][a].A, keep[l][2 * a + 1] = (void *)wg[l][a].B;
                }
                dw[l] = dev(wg[l], sizeof wg[l]);
                sc[l] = (struct tuna_lora_bank){.n = NA, .max_r = 64, .dtype = dt, .w = wc[l]};
                sg[l] = (struct tuna_lora_bank){.n = NA, .max_r = 64, .dtype = dt, .w = dw[l]};
            }
            int32_t *idx = malloc((size_t)T * 4), *order = malloc((size_t)T * 4), start[65];
            for (int64_t t = 0; t < T; t++) idx[t] = (int32_t)((t * 7 + t / 3) % (NA + 2)) - 1; /* -1 .. 5 */
            idx[T - 1] = 7;
            tuna_lora_group(idx, T, 64, order, start);
            const struct tuna_lora_tokens own = {idx, NULL, NULL, 0}, grouped = {idx, order, start, 64};
            float *x = rnd((size_t)(T * K)), *dx = dev(x, (size_t)(T * K) * 4);
            float *y0[NL], *yc[NL], *yg[NL], *dy[NL];
            for (int l = 0; l < NL; l++) {
                const size_t n = (size_t)(T * Ns[l]);
                y0[l] = rnd(n), yc[l] = malloc(n * 4), yg[l] = malloc(n * 4);
                memcpy(yc[l], y0[l], n * 4);
                dy[l] = dev(y0[l], n * 4);
            }
            char what[160];
            /* one linear, own grouping and the caller's */
            {
                const struct tuna_lora_bank *c1[1] = {&sc[0]}, *g1[1] = {&sg[0]};
                float *yc1[1] = {yc[0]}, *dy1[1] = {dy[0]};
                float *dy2 = dev(y0[0], (size_t)(T * N) * 4), *dy21[1] = {dy2};
                float *yg2 = malloc((size_t)(T * N) * 4);
                g_cops->lora(g_cpu, 1, yc1, Ns, x, T, K, c1, &own, NULL, 0);
                g_gops->lora(g_gpu, 1, dy1, Ns, dx, T, K, g1, &own, NULL, 0);
                g_gops->lora(g_gpu, 1, dy21, Ns, dx, T, K, g1, &grouped, NULL, 0);
                back(yg[0], dy[0], (size_t)(T * N) * 4);
                back(yg2, dy2, (size_t)(T * N) * 4);
                snprintf(what, sizeof what, "lora %s T=%lld N=%lld K=%lld", tuna_dtype_name(dt), (long long)T,
                         (long long)N, (long long)K);
                LORA_CHECK(what, yg[0], yc[0], (size_t)(T * N));
                assert_memory_equal(yg[0], yg2, (size_t)(T * N) * 4);
                /* tokens without an adapter (none, rank 0, past the set) are untouched */
                size_t changed = 0;
                for (int64_t t = 0; t < T; t++) {
                    bool none = idx[t] < 0 || idx[t] >= NA || ranks[0][idx[t]] == 0;
                    if (none) assert_memory_equal(yg[0] + t * N, y0[0] + t * N, (size_t)N * 4);
                    else changed += memcmp(yg[0] + t * N, y0[0] + t * N, (size_t)N * 4) != 0;
                }
                assert_true(changed > 0);
                tuna_cuda_free(g_gpu, dy2);
                free(yg2);
            }
            /* three linears sharing x, linear 1 without adapters in the second run */
            for (int run = 0; run < 2; run++) {
                const struct tuna_lora_bank *c3[NL] = {&sc[0], run ? NULL : &sc[1], &sc[2]},
                                            *g3[NL] = {&sg[0], run ? NULL : &sg[1], &sg[2]};
                for (int l = 0; l < NL; l++) {
                    memcpy(yc[l], y0[l], (size_t)(T * Ns[l]) * 4);
                    TT_OK(tuna_cuda_upload(g_gpu, dy[l], y0[l], (size_t)(T * Ns[l]) * 4));
                }
                g_cops->lora(g_cpu, NL, yc, Ns, x, T, K, c3, &own, NULL, 0);
                g_gops->lora(g_gpu, NL, dy, Ns, dx, T, K, g3, &grouped, NULL, 0);
                for (int l = 0; l < NL; l++) {
                    back(yg[l], dy[l], (size_t)(T * Ns[l]) * 4);
                    snprintf(what, sizeof what, "lora x3 (%d) %s T=%lld N=%lld K=%lld", l, tuna_dtype_name(dt),
                             (long long)T, (long long)Ns[l], (long long)K);
                    if (run && l == 1) assert_memory_equal(yg[l], y0[l], (size_t)(T * Ns[l]) * 4);
                    else LORA_CHECK(what, yg[l], yc[l], (size_t)(T * Ns[l]));
                }
            }
            /* gate (0) and up (2) folded into the GLU, both act kinds */
            for (int act = 0; act < 2; act++) {
                const struct tuna_lora_bank *c2[2] = {&sc[0], &sc[2]}, *g2[2] = {&sg[0], &sg[2]};
                float *yc2[2] = {y0[0], y0[2]}, *dy2[2] = {dy[0], dy[2]};
                const int64_t N2[2] = {N, N};
                TT_OK(tuna_cuda_upload(g_gpu, dy[0], y0[0], (size_t)(T * N) * 4));
                TT_OK(tuna_cuda_upload(g_gpu, dy[2], y0[2], (size_t)(T * N) * 4));
                float *oc = malloc((size_t)(T * N) * 4), *og = malloc((size_t)(T * N) * 4);
                float *dout = dev(NULL, (size_t)(T * N) * 4);
                g_cops->lora(g_cpu, 2, yc2, N2, x, T, K, c2, &own, oc, act);
                g_gops->lora(g_gpu, 2, dy2, N2, dx, T, K, g2, &grouped, dout, act);
                back(og, dout, (size_t)(T * N) * 4);
                snprintf(what, sizeof what, "lora glu act %d %s T=%lld N=%lld K=%lld", act, tuna_dtype_name(dt),
                         (long long)T, (long long)N, (long long)K);
                LORA_CHECK(what, og, oc, (size_t)(T * N));
                tuna_cuda_free(g_gpu, dout);
                free(oc), free(og);
            }
            /* gate/up's GLU naming down's adapters (n == 3: the GPU folds down's shrink into the
             * GLU), then down's residual form over the GLU output; run 1 puts another lora call in
             * between (the kept shrink is dropped, down shrinks afresh); run 2 follows with down's
             * plain form (y += LoRA: forward.c's order when the projection accumulated into the
             * residual stream), which uses the kept shrink too. The CPU computes it afresh. */
            setenv("TUNA_LORA_FOLD", "1", 1); /* the fold (the default; explicit here) */
            for (int run = 0; run < 3; run++) {
                const int64_t Nd = K; /* down: N -> K */
                struct tuna_lora_w dc[NA], dg[NA];
                for (int a = 0; a < NA; a++) {
                    const int64_t r = ranks[1][a];
                    float *A = rnd((size_t)(r * N) + 1), *B = rnd((size_t)(Nd * r) + 1);
                    size_t ba = tuna_dtype_nbytes(dt, (uint64_t)(r * N)), bb = tuna_dtype_nbytes(dt, (uint64_t)(Nd * r));
                    void *hA = malloc(ba + 4), *hB = malloc(bb + 4);
                    tuna_convert_from_f32(dt, A, hA, (size_t)(r * N));
                    tuna_convert_from_f32(dt, B, hB, (size_t)(Nd * r));
                    free(A), free(B);
                    dc[a] = (struct tuna_lora_w){hA, hB, r, 0.75f - 0.125f * (float)a, 0};
                    dg[a] = (struct tuna_lora_w){dev(hA, ba), dev(hB, bb), r, dc[a].scale, 0};
                }
                struct tuna_lora_w *dwd = dev(dg, sizeof dg);
                const struct tuna_lora_bank scd = {.n = NA, .max_r = 64, .dtype = dt, .w = dc},
                                            sgd = {.n = NA, .max_r = 64, .dtype = dt, .w = dwd};
                const struct tuna_lora_bank *c3[3] = {&sc[0], &sc[2], &scd}, *g3[3] = {&sg[0], &sg[2], &sgd};
                const struct tuna_lora_bank *cd[1] = {&scd}, *gd[1] = {&sgd};
                float *yc3[3] = {y0[0], y0[2], NULL}, *dy3[3] = {dy[0], dy[2], NULL};
                const int64_t N3[3] = {N, N, Nd};
                TT_OK(tuna_cuda_upload(g_gpu, dy[0], y0[0], (size_t)(T * N) * 4));
                TT_OK(tuna_cuda_upload(g_gpu, dy[2], y0[2], (size_t)(T * N) * 4));
                float *oc = malloc((size_t)(T * N) * 4), *dout = dev(NULL, (size_t)(T * N) * 4);
                g_cops->lora(g_cpu, 3, yc3, N3, x, T, K, c3, &own, oc, 1);
                g_gops->lora(g_gpu, 3, dy3, N3, dx, T, K, g3, &grouped, dout, 1);
                if (run == 1) { /* any other call between them */
                    const struct tuna_lora_bank *g1[1] = {&sg[0]};
                    float *dy1[1] = {dy[0]};
                    g_gops->lora(g_gpu, 1, dy1, Ns, dx, T, K, g1, &grouped, NULL, 0);
                }
                const size_t nd = (size_t)(T * Nd);
                float *p0 = rnd(nd), *r0 = rnd(nd), *pc = malloc(nd * 4), *rc = malloc(nd * 4), *rg = malloc(nd * 4);
                float *dp = dev(p0, nd * 4), *dr = dev(r0, nd * 4);
                memcpy(pc, p0, nd * 4), memcpy(rc, r0, nd * 4);
                float *pc1[1] = {pc}, *dp1[1] = {dp};
                if (run < 2) {
                    g_cops->lora(g_cpu, 1, pc1, &Nd, oc, T, N, cd, &own, rc, TUNA_LORA_RESIDUAL);
                    g_gops->lora(g_gpu, 1, dp1, &Nd, dout, T, N, gd, &grouped, dr, TUNA_LORA_RESIDUAL);
                    back(rg, dr, nd * 4);
                } else { /* the plain form: compare the projection's rows, into which the term went */
                    g_cops->lora(g_cpu, 1, pc1, &Nd, oc, T, N, cd, &own, NULL, 0);
                    g_gops->lora(g_gpu, 1, dp1, &Nd, dout, T, N, gd, &grouped, NULL, 0);
                    back(rg, dp, nd * 4);
                    memcpy(rc, pc, nd * 4);
                }
                snprintf(what, sizeof what, "lora glu + down folded (run %d) %s T=%lld N=%lld K=%lld", run,
                         tuna_dtype_name(dt), (long long)T, (long long)N, (long long)K);
                LORA_CHECK(what, rg, rc, nd);
                for (int a = 0; a < NA; a++) {
                    free((void *)dc[a].A), free((void *)dc[a].B);
                    tuna_cuda_free(g_gpu, (void *)dg[a].A), tuna_cuda_free(g_gpu, (void *)dg[a].B);
                }
                tuna_cuda_free(g_gpu, dwd), tuna_cuda_free(g_gpu, dout), tuna_cuda_free(g_gpu, dp), tuna_cuda_free(g_gpu, dr);
                free(oc), free(p0), free(r0), free(pc), free(rc), free(rg);
            }
            unsetenv("TUNA_LORA_FOLD");
            /* the residual form of linear 1 (o/down): out += y + LoRA for every token */
            {
                const struct tuna_lora_bank *c1[1] = {&sc[1]}, *g1[1] = {&sg[1]};
                const size_t n1 = (size_t)(T * Ns[1]);
                memcpy(yc[1], y0[1], n1 * 4);
                TT_OK(tuna_cuda_upload(g_gpu, dy[1], y0[1], n1 * 4));
                float *r0 = rnd(n1), *rc = malloc(n1 * 4), *rg = malloc(n1 * 4), *dr = dev(r0, n1 * 4);
                memcpy(rc, r0, n1 * 4);
                float *yc1[1] = {yc[1]}, *dy1[1] = {dy[1]};
                g_cops->lora(g_cpu, 1, yc1, &Ns[1], x, T, K, c1, &own, rc, TUNA_LORA_RESIDUAL);
                g_gops->lora(g_gpu, 1, dy1, &Ns[1], dx, T, K, g1, &grouped, dr, TUNA_LORA_RESIDUAL);
                back(rg, dr, n1 * 4);
                snprintf(what, sizeof what, "lora residual %s T=%lld N=%lld K=%lld", tuna_dtype_name(dt),
                         (long long)T, (long long)Ns[1], (long long)K);
                LORA_CHECK(what, rg, rc, n1);
                tuna_cuda_free(g_gpu, dr);
                free(r0), free(rc), free(rg);
            }
            for (int l = 0; l < NL; l++) {
                for (int a = 0; a < NA; a++) {
                    free((void *)wc[l][a].A), free((void *)wc[l][a].B);
                    tuna_cuda_free(g_gpu, keep[l][2 * a]), tuna_cuda_free(g_gpu, keep[l][2 * a + 1]);
                }
                tuna_cuda_free(g_gpu, dw[l]);
                tuna_cuda_free(g_gpu, dy[l]);
                free(y0[l]), free(yc[l]), free(yg[l]);
            }
            free(idx), free(order), free(x);
            tuna_cuda_free(g_gpu, dx);
        }
    }
#undef LORA_CHECK
    printf("lora: largest relative error from the CPU: float32 %.3g, bf16 (tensor cores) %.3g\n", worst[0], worst[1]);
}

/* argmax: random rows of odd width (wider than one block's stride), crafted ties (the lowest
 * index must win across threads and warps), NaN first (0) and elsewhere (skipped), all -inf. */
static void test_argmax(void **state)
{
    (void)state;
    NEED_GPU();
    const int64_t T = 13, V = 128259;
    float *x = rnd((size_t)(T * V));
    for (int64_t i = 0; i < V; i++) x[1 * V + i] = 0.5f;           /* all equal: 0 */
    x[2 * V + 70001] = 3.0f, x[2 * V + 5] = 3.0f, x[2 * V + 99999] = 3.0f; /* ties in far apart threads */
    x[3 * V + 0] = NAN;                                               /* NaN first: 0 */
    x[4 * V + 7] = NAN, x[4 * V + 8] = 2.0f;                          /* NaN skipped */
    for (int64_t i = 0; i < V; i++) x[5 * V + i] = -INFINITY;        /* all -inf: 0 */
    x[5 * V + V - 1] = -1.0f;
    for (int64_t i = 0; i < V; i++) x[6 * V + i] = (float)(i % 1000); /* 128 tied maxima */
    int32_t want[13], got[13];
    TT_OK(g_cops->argmax(g_cpu, want, x, T, V));
    assert_int_equal(want[1], 0);
    assert_int_equal(want[2], 5);
    assert_int_equal(want[3], 0);
    assert_int_equal(want[4], 8);
    assert_int_equal(want[5], V - 1);
    assert_int_equal(want[6], 999);
    float *dx = dev(x, (size_t)(T * V) * 4);
    memset(got, 0xff, sizeof got);
    TT_OK(g_gops->argmax(g_gpu, got, dx, T, V));
    for (int64_t t = 0; t < T; t++) {
        if (got[t] != want[t]) {
            print_error("argmax row %lld: GPU %d, CPU %d\n", (long long)t, got[t], want[t]);
            fail();
        }
    }
    /* one row at a time: the decode path, each row cut into slices reduced by a second kernel */
    for (int64_t t = 0; t < T; t++) {
        int32_t one = -1;
        TT_OK(g_gops->argmax(g_gpu, &one, dx + t * V, 1, V));
        if (one != want[t]) {
            print_error("argmax row %lld alone: GPU %d, CPU %d\n", (long long)t, one, want[t]);
            fail();
        }
    }
    TT_OK(g_gops->argmax(g_gpu, got, dx, 1, 1)); /* V = 1 */
    assert_int_equal(got[0], 0);
    free(x);
    tuna_cuda_free(g_gpu, dx);
    /* many narrow rows: one block per row */
    const int64_t T2 = 300, V2 = 3001;
    float *y = rnd((size_t)(T2 * V2));
    for (int64_t t = 0; t < T2; t += 7) y[t * V2 + (t * 13) % V2] = 9.0f, y[t * V2 + (t * 31) % V2] = 9.0f;
    int32_t *w2 = malloc((size_t)T2 * sizeof *w2), *g2 = malloc((size_t)T2 * sizeof *g2);
    assert_non_null(w2);
    assert_non_null(g2);
    TT_OK(g_cops->argmax(g_cpu, w2, y, T2, V2));
    float *dy = dev(y, (size_t)(T2 * V2) * 4);
    TT_OK(g_gops->argmax(g_gpu, g2, dy, T2, V2));
    for (int64_t t = 0; t < T2; t++) {
        if (g2[t] != w2[t]) {
            print_error("argmax row %lld of %lld: GPU %d, CPU %d\n", (long long)t, (long long)T2, g2[t], w2[t]);
            fail();
        }
    }
    free(y);
    free(w2);
    free(g2);
    tuna_cuda_free(g_gpu, dy);
}

static void test_elementwise(void **state)
{
    (void)state;
    NEED_GPU();
    const int64_t T = 7, C = 333;
    size_t n = (size_t)(T * C);
    float *x = rnd(n), *w = rnd((size_t)C), *g = rnd(n), *u = rnd(n);
    float *yc = malloc(n * 4), *yg = malloc(n * 4);
    float *dx = dev(x, n * 4), *dw = dev(w, (size_t)C * 4), *dy = dev(NULL, n * 4);
    float *dg = dev(g, n * 4), *du = dev(u, n * 4);

    g_cops->rmsnorm(g_cpu, yc, x, w, T, C, 1e-5f);
    g_gops->rmsnorm(g_gpu, dy, dx, dw, T, C, 1e-5f);
    back(yg, dy, n * 4);
    check("rmsnorm", yg, yc, n, 1e-5);

    for (int act = 0; act < 3; act++) {
        g_cops->glu(g_cpu, yc, g, u, (int64_t)n, act);
        g_gops->glu(g_gpu, dy, dg, du, (int64_t)n, act);
        back(yg, dy, n * 4);
        check(act == 0 ? "glu silu" : act == 1 ? "glu gelu_tanh" : "glu gelu", yg, yc, n, 1e-5);
    }

    memcpy(yc, x, n * 4);
    g_cops->add(g_cpu, yc, g, (int64_t)n);
    TT_OK(tuna_cuda_upload(g_gpu, dy, x, n * 4));
    g_gops->add(g_gpu, dy, dg, (int64_t)n);
    back(yg, dy, n * 4);
    check("add", yg, yc, n, 1e-7);

    /* embedding from a bf16 table */
    const int64_t V = 50;
    float *ef = rnd((size_t)(V * C));
    uint16_t *eh = malloc((size_t)(V * C) * 2);
    tuna_convert_from_f32(TUNA_DTYPE_BF16, ef, eh, (size_t)(V * C));
    struct tuna_weight ec = {TUNA_DTYPE_BF16, V, C, eh, NULL, 0};
    struct tuna_weight eg = {TUNA_DTYPE_BF16, V, C, dev(eh, (size_t)(V * C) * 2), NULL, 0};
    int32_t ids[7] = {0, 49, 3, 3, 17, 25, 1};
    g_cops->embedding(g_cpu, yc, ids, T, &ec, 11.3137f);
    g_gops->embedding(g_gpu, dy, ids, T, &eg, 11.3137f);
    back(yg, dy, n * 4);
    check("embedding", yg, yc, n, 1e-7);

    /* rope: 5 heads of 48 dims, 32 rotated (partial), with an attention factor */
    const int64_t H = 5, D = 48, rot = 32;
    size_t nq = (size_t)(T * H * D);
    float *q = rnd(nq), *inv = malloc((size_t)rot / 2 * 4);
    for (int64_t i = 0; i < rot / 2; i++) inv[i] = powf(10000.0f, -2.0f * (float)i / (float)rot);
    int64_t pos[7] = {0, 1, 2, 100, 4095, 17, 9};
    float *qc = malloc(nq * 4), *qg = malloc(nq * 4);
    memcpy(qc, q, nq * 4);
    float *dq = dev(q, nq * 4);
    g_cops->rope(g_cpu, qc, pos, T, H, D, rot, inv, 1.1f);
    g_gops->rope(g_gpu, dq, pos, T, H, D, rot, inv, 1.1f);
    back(qg, dq, nq * 4);
    check("rope", qg, qc, nq, 1e-5);

    free(x), free(w), free(g), free(u), free(yc), free(yg), free(ef), free(eh), free(q), free(inv), free(qc), free(qg);
    tuna_cuda_free(g_gpu, dx), tuna_cuda_free(g_gpu, dw), tuna_cuda_free(g_gpu, dy), tuna_cuda_free(g_gpu, dg);
    tuna_cuda_free(g_gpu, du), tuna_cuda_free(g_gpu, (void *)eg.data), tuna_cuda_free(g_gpu, dq);
}

/* Paged attention against the CPU op. A case is a batch of sequences, each a run of n query
 * tokens at positions start..start+n-1 over a cache holding positions 0..start+n-1, with block
 * tables drawn from a scrambled permutation of the cache's blocks; one call computes every token.
 * Runs of at least ATT_PREFILL_RUN tokens may go through the GPU's tensor-core prefill kernel,
 * whose inputs are rounded to the cache's 16-bit type (tolerance 1e-2 bf16, 3e-3 f16); all other
 * tokens and every float32-cache token must match to 1e-5. */
#define ATT_PREFILL_RUN 8

struct att_seq {
    int64_t start, n;
};

struct att_case {
    const char *name;
    int64_t H, Hkv, D;
    int32_t bs;
    int64_t window;
    int nseq;
    struct att_seq seq[6];
    bool flat; /* hand the tables over as tables_flat [T, max_blocks_per_seq] */
};

static void att_run(const struct att_case *c, enum tuna_dtype dt)
{
    const int64_t H = c->H, Hkv = c->Hkv, D = c->D, HkvD = Hkv * D, bs = c->bs;
    int64_t nblk[6], total_blocks = 0, T = 0, maxlen = 0;
    for (int s = 0; s < c->nseq; s++) {
        int64_t len = c->seq[s].start + c->seq[s].n;
        nblk[s] = (len + bs - 1) / bs;
        total_blocks += nblk[s];
        T += c->seq[s].n;
        maxlen = len > maxlen ? len : maxlen;
    }
    total_blocks += 3; /* unused blocks in between */
    const int64_t slots = total_blocks * bs;
    /* scrambled block numbers: a multiplier coprime with total_blocks */
    int64_t mul = 7;
    for (;; mul += 2) { /* gcd(mul, total_blocks) == 1 */
        int64_t x = mul, y = total_blocks;
        while (y) {
            int64_t r = x % y;
            x = y, y = r;
        }
        if (x == 1) break;
    }
    int32_t *perm = malloc((size_t)total_blocks * sizeof(int32_t));
    for (int64_t i = 0; i < total_blocks; i++) perm[i] = (int32_t)((i * mul + 5) % total_blocks);
    const int32_t *tabs[6];
    int64_t used = 0;
    for (int s = 0; s < c->nseq; s++) {
        tabs[s] = perm + used;
        used += nblk[s];
    }
    /* K/V as the cache stores them: random float32 rounded to dt */
    const size_t esz = tuna_dtype_nbytes(dt, 1), n_cache = (size_t)(slots * HkvD);
    float *kf = rnd(n_cache), *vf = rnd(n_cache);
    void *kh = malloc(n_cache * esz), *vh = malloc(n_cache * esz);
    tuna_convert_from_f32(dt, kf, kh, n_cache);
    tuna_convert_from_f32(dt, vf, vh, n_cache);
    void *dkc = dev(kh, n_cache * esz), *dvc = dev(vh, n_cache * esz);
    /* the batch */
    int64_t *pos = malloc((size_t)T * sizeof(int64_t));
    const int32_t **bt = malloc((size_t)T * sizeof(*bt));
    bool *loose = malloc((size_t)T);
    int64_t t = 0;
    for (int s = 0; s < c->nseq; s++)
        for (int64_t i = 0; i < c->seq[s].n; i++, t++) {
            pos[t] = c->seq[s].start + i;
            bt[t] = tabs[s];
            loose[t] = c->seq[s].n >= ATT_PREFILL_RUN && dt != TUNA_DTYPE_F32;
        }
    const int32_t MB = (int32_t)((maxlen + 100 + bs - 1) / bs); /* a bound above every table */
    int32_t *flat = NULL;
    if (c->flat) {
        flat = malloc((size_t)(T * MB) * sizeof(int32_t));
        for (int64_t r = 0; r < T; r++)
            for (int64_t j = 0; j < MB; j++) flat[r * MB + j] = j <= pos[r] / bs ? bt[r][j] : -12345; /* junk past it */
    }
    const size_t nq = (size_t)(T * H * D);
    float *q = rnd(nq), *oc = malloc(nq * 4), *og = malloc(nq * 4);
    float *dq = dev(q, nq * 4), *dout = dev(NULL, nq * 4);
    struct tuna_attn_batch b = {T, pos, bt, (int32_t)bs, c->window, MB, flat};
    const float scale = 1.0f / sqrtf((float)D);
    g_cops->attention(g_cpu, oc, q, kh, vh, dt, &b, H, Hkv, D, scale);
    g_gops->attention(g_gpu, dout, dq, dkc, dvc, dt, &b, H, Hkv, D, scale);
    back(og, dout, nq * 4);
    /* compare the strict rows and the loose rows separately */
    for (int pass = 0; pass < 2; pass++) {
        size_t n = 0;
        float *a = malloc(nq * 4), *e = malloc(nq * 4);
        for (int64_t r = 0; r < T; r++) {
            if (loose[r] != (pass == 1)) continue;
            memcpy(a + n, og + r * H * D, (size_t)(H * D) * 4);
            memcpy(e + n, oc + r * H * D, (size_t)(H * D) * 4);
            n += (size_t)(H * D);
        }
        if (n) {
            char what[200];
            snprintf(what, sizeof what, "attention %s, %s cache, %s rows (H=%lld Hkv=%lld D=%lld bs=%lld window=%lld)",
                     c->name, tuna_dtype_name(dt), pass ? "prefill-run" : "strict", (long long)H, (long long)Hkv,
                     (long long)D, (long long)bs, (long long)c->window);
            double tol = pass == 0 ? 1e-5 : dt == TUNA_DTYPE_BF16 ? 1e-2 : 3e-3;
            check(what, a, e, n, tol);
            printf("  %s: rel err %.2e\n", what, tt_rel_err(a, e, n));
        }
        free(a), free(e);
    }
    /* the 16-bit activation op (attention16): q and out in the cache's 16-bit type (bf16 for a
     * float32 cache), against its CPU twin */
    {
        const enum tuna_dtype adt = dt == TUNA_DTYPE_F32 ? TUNA_DTYPE_BF16 : dt;
        uint16_t *q16 = malloc(nq * 2), *oc16 = malloc(nq * 2), *og16 = malloc(nq * 2);
        tuna_convert_from_f32(adt, q, q16, nq);
        void *dq16 = dev(q16, nq * 2), *do16 = dev(NULL, nq * 2);
        tuna_cpu_attention16(g_cpu, oc16, q16, adt, kh, vh, dt, &b, H, Hkv, D, scale);
        g_gops->attention16(g_gpu, do16, dq16, adt, dkc, dvc, dt, &b, H, Hkv, D, scale);
        back(og16, do16, nq * 2);
        float *a = wide16(adt, og16, nq), *e = wide16(adt, oc16, nq);
        char what[200];
        snprintf(what, sizeof what, "attention16 %s, %s cache, %s activations", c->name, tuna_dtype_name(dt),
                 tuna_dtype_name(adt));
        check(what, a, e, nq, tol16(adt));
        printf("  %s: rel err %.2e\n", what, tt_rel_err(a, e, nq));
        free(q16), free(oc16), free(og16), free(a), free(e);
        tuna_cuda_free(g_gpu, dq16), tuna_cuda_free(g_gpu, do16);
    }
    free(perm), free(kf), free(vf), free(kh), free(vh), free(pos), free(bt), free(loose), free(flat);
    free(q), free(oc), free(og);
    tuna_cuda_free(g_gpu, dkc), tuna_cuda_free(g_gpu, dvc), tuna_cuda_free(g_gpu, dq), tuna_cuda_free(g_gpu, dout);
}

static void test_attention(void **state)
{
    (void)state;
    NEED_GPU();
    static const struct att_case cases[] = {
        /* decode, Llama-3-8B heads: contexts 1 .. 3000 split across blocks */
        {"decode", 32, 8, 128, 16, 0, 5, {{0, 1}, {16, 1}, {999, 1}, {2999, 1}, {63, 1}}, false},
        {"decode flat tables", 32, 8, 128, 16, 0, 3, {{0, 1}, {1500, 1}, {2999, 1}}, true},
        /* GQA 1 and odd head dims (80, 72: padded for the tensor cores; 36 and 250: no 16-byte rows) */
        {"mha D80", 4, 4, 80, 16, 0, 3, {{0, 40}, {700, 1}, {33, 3}}, false},
        {"gqa4 D72", 8, 2, 72, 16, 0, 2, {{100, 70}, {2000, 1}}, false},
        {"gqa2 D36", 4, 2, 36, 16, 0, 2, {{0, 20}, {1200, 1}}, false},
        {"gqa1 D250", 2, 2, 250, 16, 0, 2, {{0, 17}, {333, 1}}, false},
        /* GQA 8, and groups of more than 8 query heads per kv head (16, 12) */
        {"gqa8", 16, 2, 64, 16, 0, 3, {{0, 33}, {2500, 1}, {10, 1}}, false},
        {"gqa16", 32, 2, 64, 16, 0, 2, {{0, 1}, {1800, 1}}, false},
        {"gqa12", 24, 2, 64, 16, 0, 2, {{50, 20}, {900, 1}}, false},
        /* sliding window 100 over long contexts, decode and prefill */
        {"window", 8, 2, 128, 16, 100, 3, {{2900, 1}, {0, 150}, {350, 40}}, false},
        /* block size 1 */
        {"bs1", 8, 4, 64, 1, 0, 3, {{0, 25}, {300, 1}, {77, 2}}, false},
        /* a mixed step: a prefill from 0, a chunked prefill after earlier context, decodes, a
         * 5-token run that stays on the decode path */
        {"mixed", 8, 2, 128, 16, 0, 5, {{0, 300}, {2000, 1}, {40, 5}, {500, 70}, {1, 1}}, false},
        {"mixed flat tables", 8, 2, 128, 16, 0, 4, {{0, 130}, {1000, 1}, {7, 9}, {2999, 1}}, true},
        /* long runs for the tensor-core (mma) prefill kernel: a 2048-token prefill, a chunk of 700
         * new tokens after 1300 cached ones, head dims 64/80/96/128/256, windows that start inside
         * key tiles, block size 1, tiles shorter than the kernel's 64 rows */
        {"prefill 2048", 8, 2, 128, 16, 0, 1, {{0, 2048}}, false},
        {"chunk 700 after 1300", 8, 2, 128, 16, 0, 2, {{1300, 700}, {640, 1}}, true},
        {"D64 gqa8 window 300", 8, 1, 64, 16, 300, 2, {{0, 1000}, {1500, 100}}, false},
        {"D80 chunk", 4, 2, 80, 16, 0, 2, {{200, 333}, {0, 9}}, false},
        {"D96 window 77", 4, 4, 96, 16, 77, 1, {{50, 260}}, false},
        {"D256 window 129", 4, 2, 256, 16, 129, 2, {{0, 260}, {400, 150}}, false},
        {"D128 bs1 window 200 chunk", 8, 2, 128, 1, 200, 1, {{900, 300}}, false},
    };
    const enum tuna_dtype dts[3] = {TUNA_DTYPE_F32, TUNA_DTYPE_BF16, TUNA_DTYPE_F16};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        for (int d = 0; d < 3; d++) att_run(&cases[i], dts[d]);
    TT_OK(tuna_cuda_status(g_gpu));
}

/* One token (batch 1): on sm_90+ the cluster kernel of attention_b1.cu. Positions at and around
 * the edges of its groups of 16 keys, of a round of its 8 blocks x 4 warps (512 keys) and of the
 * groups it copies before the PDL wait (2 per warp: 1024 keys), up to contexts where each warp
 * loops over many groups; head shapes with 1, 4, 8 and 12 query heads per kv head (12: two
 * head groups), D 64 and 128, a window, block size 1. Strict rows: 1e-5 against the CPU. */
static void test_attention_b1(void **state)
{
    (void)state;
    NEED_GPU();
    static const int64_t pos[] = {0, 1, 15, 16, 17, 127, 128, 129, 511, 512, 513, 1023, 1024, 1025, 1040, 4095, 9000};
    static const struct att_case shapes[] = {
        {"b1 llama3", 32, 8, 128, 16, 0, 1, {{0, 1}}, false},
        {"b1 mha", 4, 4, 128, 16, 0, 1, {{0, 1}}, true},
        {"b1 gqa8 D64", 16, 2, 64, 16, 0, 1, {{0, 1}}, false},
        {"b1 gqa12 D64", 24, 2, 64, 16, 0, 1, {{0, 1}}, false},
        {"b1 window 100", 8, 2, 128, 16, 100, 1, {{0, 1}}, false},
        {"b1 bs1", 8, 2, 128, 1, 0, 1, {{0, 1}}, false},
    };
    const enum tuna_dtype dts[2] = {TUNA_DTYPE_BF16, TUNA_DTYPE_F16};
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++)
        for (size_t k = 0; k < sizeof pos / sizeof pos[0]; k++) {
            struct att_case c = shapes[i];
            c.seq[0].start = pos[k];
            att_run(&c, dts[(i + k) % 2]);
        }
    TT_OK(tuna_cuda_status(g_gpu));
}

/* Decode batches of many sequences (one new token each, random contexts), the batch sizes where
 * the decode kernel's split count changes (one wave of blocks, a few waves, many waves) on any
 * GPU of up to ~250 SMs, several head shapes (GQA 4 and 8 with D 128 / 64, GQA 12 in two head
 * groups, D 80 and 256, a window, block size 1), every cache dtype. Every call runs twice (the
 * split counters must be back at 0 for the second) and both outputs must match the CPU to 1e-5. */
struct att_bcase {
    int64_t H, Hkv, D;
    int32_t bs;
    int64_t window, max_ctx;
    int n_nseq;
    int nseq[12];
};

static void att_run_batch(const struct att_bcase *c, int nseq, enum tuna_dtype dt)
{
    const int64_t H = c->H, Hkv = c->Hkv, D = c->D, HkvD = Hkv * D, bs = c->bs, T = nseq;
    int64_t *pos = malloc((size_t)T * sizeof(int64_t)), total_blocks = 1, maxlen = 0;
    for (int64_t s = 0; s < T; s++) {
        pos[s] = (int64_t)((frand() * 0.5f + 0.5f) * (float)c->max_ctx) % c->max_ctx; /* 0 .. max_ctx - 1 */
        if (s == T / 2) pos[s] = c->max_ctx - 1;
        total_blocks += pos[s] / bs + 1;
        maxlen = pos[s] + 1 > maxlen ? pos[s] + 1 : maxlen;
    }
    /* block tables: consecutive runs of a permutation of the blocks (reversed order) */
    int32_t *perm = malloc((size_t)total_blocks * sizeof(int32_t));
    for (int64_t i = 0; i < total_blocks; i++) perm[i] = (int32_t)(total_blocks - 1 - i);
    const int32_t **bt = malloc((size_t)T * sizeof(*bt));
    for (int64_t s = 0, used = 0; s < T; s++) {
        bt[s] = perm + used;
        used += pos[s] / bs + 1;
    }
    const int64_t slots = total_blocks * bs;
    const size_t esz = tuna_dtype_nbytes(dt, 1), n_cache = (size_t)(slots * HkvD);
    float *kf = rnd(n_cache), *vf = rnd(n_cache);
    void *kh = malloc(n_cache * esz), *vh = malloc(n_cache * esz);
    tuna_convert_from_f32(dt, kf, kh, n_cache);
    tuna_convert_from_f32(dt, vf, vh, n_cache);
    void *dkc = dev(kh, n_cache * esz), *dvc = dev(vh, n_cache * esz);
    const size_t nq = (size_t)(T * H * D);
    float *q = rnd(nq), *oc = malloc(nq * 4), *og = malloc(nq * 4), *zero = calloc(nq, 4);
    float *dq = dev(q, nq * 4), *dout = dev(NULL, nq * 4);
    const int32_t MB = (int32_t)((c->max_ctx + 50 + bs - 1) / bs);
    struct tuna_attn_batch b = {T, pos, bt, (int32_t)bs, c->window, MB, NULL};
    const float scale = 1.0f / sqrtf((float)D);
    g_cops->attention(g_cpu, oc, q, kh, vh, dt, &b, H, Hkv, D, scale);
    for (int rep = 0; rep < 2; rep++) {
        TT_OK(tuna_cuda_upload(g_gpu, dout, zero, nq * 4));
        g_gops->attention(g_gpu, dout, dq, dkc, dvc, dt, &b, H, Hkv, D, scale);
        back(og, dout, nq * 4);
        char what[200];
        snprintf(what, sizeof what, "attention decode batch %d (run %d), %s cache (H=%lld Hkv=%lld D=%lld bs=%lld window=%lld)",
                 nseq, rep + 1, tuna_dtype_name(dt), (long long)H, (long long)Hkv, (long long)D, (long long)bs,
                 (long long)c->window);
        check(what, og, oc, nq, 1e-5);
        if (rep == 0) printf("  %s: rel err %.2e\n", what, tt_rel_err(og, oc, nq));
    }
    free(pos), free(perm), free(bt), free(kf), free(vf), free(kh), free(vh), free(q), free(oc), free(og), free(zero);
    tuna_cuda_free(g_gpu, dkc), tuna_cuda_free(g_gpu, dvc), tuna_cuda_free(g_gpu, dq), tuna_cuda_free(g_gpu, dout);
}

static void test_attention_batches(void **state)
{
    (void)state;
    NEED_GPU();
    static const struct att_bcase cases[] = {
        /* GQA 4, D 128 (Llama-3-8B's group): units = 2 * batch cross 1, 2, 4 waves of 1..4 blocks per SM */
        {8, 2, 128, 16, 0, 300, 12, {1, 2, 7, 40, 65, 66, 67, 131, 132, 133, 265, 530}},
        {16, 2, 64, 16, 0, 400, 5, {1, 33, 150, 300, 600}},      /* GQA 8, D 64 */
        {24, 2, 64, 16, 0, 200, 4, {1, 20, 140, 400}},           /* GQA 12: head groups of 8 and 4 */
        {4, 2, 80, 16, 50, 500, 4, {1, 30, 140, 300}},           /* D 80 (chunks of 10), window 50 */
        {6, 2, 256, 16, 0, 300, 4, {1, 30, 130, 260}},           /* D 256, GQA 3 */
        {8, 2, 128, 1, 0, 200, 3, {3, 90, 200}},                 /* block size 1 */
        {32, 8, 128, 16, 0, 2100, 3, {1, 3, 20}},                /* Llama-3-8B heads, long contexts */
    };
    const enum tuna_dtype dts[3] = {TUNA_DTYPE_BF16, TUNA_DTYPE_F16, TUNA_DTYPE_F32};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        for (int k = 0; k < cases[i].n_nseq; k++)
            for (int d = 0; d < 3; d++) {
                if (d == 2 && k > 0) continue; /* float32 (the general kernel, test_attention's): one size */
                att_run_batch(&cases[i], cases[i].nseq[k], dts[d]);
            }
    TT_OK(tuna_cuda_status(g_gpu));
}

/* kv_store into scattered slots, every cache dtype: the same bits as the CPU's conversion. */
static void test_kv_store(void **state)
{
    (void)state;
    NEED_GPU();
    const int64_t T = 9, HkvD = 2 * 80, slots = 1024;
    const int64_t slot[9] = {5, 700, 33, 1023, 0, 512, 77, 78, 79};
    const enum tuna_dtype dts[3] = {TUNA_DTYPE_F32, TUNA_DTYPE_BF16, TUNA_DTYPE_F16};
    for (int d = 0; d < 3; d++) {
        const size_t esz = tuna_dtype_nbytes(dts[d], 1), bytes = (size_t)(slots * HkvD) * esz;
        unsigned char *kc = calloc(bytes, 1), *vc = calloc(bytes, 1), *kg = malloc(bytes);
        void *dkc = dev(kc, bytes), *dvc = dev(vc, bytes);
        float *k = rnd((size_t)(T * HkvD)), *v = rnd((size_t)(T * HkvD));
        k[3] = 1e-6f, k[4] = -70000.0f, v[5] = 3e-8f; /* f16 subnormal and overflow */
        float *dk = dev(k, (size_t)(T * HkvD) * 4), *dv = dev(v, (size_t)(T * HkvD) * 4);
        g_cops->kv_store(g_cpu, kc, vc, dts[d], k, v, slot, T, HkvD);
        g_gops->kv_store(g_gpu, dkc, dvc, dts[d], dk, dv, slot, T, HkvD);
        back(kg, dkc, bytes);
        assert_memory_equal(kg, kc, bytes);
        back(kg, dvc, bytes);
        assert_memory_equal(kg, vc, bytes);
        free(kc), free(vc), free(kg), free(k), free(v);
        tuna_cuda_free(g_gpu, dkc), tuna_cuda_free(g_gpu, dvc), tuna_cuda_free(g_gpu, dk), tuna_cuda_free(g_gpu, dv);
    }
}

/* The 16-bit activation ops (backend.h rmsnorm16, matmul16, glu16, rope_kv_store16; attention16
 * in att_run) against their CPU twins (backend/cpu/act16.h), bf16 and f16 activations, sizes
 * that take the vector and the scalar paths. */
static void test_act16(void **state)
{
    (void)state;
    NEED_GPU();
    const enum tuna_dtype adts[2] = {TUNA_DTYPE_BF16, TUNA_DTYPE_F16};
    assert_non_null(g_gops->act16_min_t);
    assert_true(g_gops->act16_min_t(g_gpu) >= 1);
    for (int ai = 0; ai < 2; ai++) {
        const enum tuna_dtype adt = adts[ai];
        const char *an = tuna_dtype_name(adt);
        char what[200];
        /* rmsnorm16: C = 333 (scalar), 256 (float4); rows back to back, and 40 elements apart
         * more (the LoRA fold's packed rows: only the C columns of each row are compared) */
        const int64_t Cs[4] = {333, 256, 333, 256};
        for (int ci = 0; ci < 4; ci++) {
            const int64_t T = 9, C = Cs[ci], ld = ci < 2 ? C : C + 40;
            const size_t n = (size_t)(T * C), nl = (size_t)(T * ld);
            float *x = rnd(n), *w = rnd((size_t)C);
            uint16_t *yc = calloc(nl, 2), *yg = malloc(nl * 2);
            float *dx = dev(x, n * 4), *dw = dev(w, (size_t)C * 4);
            void *dy = dev(NULL, nl * 2);
            tuna_cpu_rmsnorm16(g_cpu, yc, ci < 2 ? 0 : ld, x, w, T, C, 1e-5f, adt);
            g_gops->rmsnorm16(g_gpu, dy, ci < 2 ? 0 : ld, dx, dw, T, C, 1e-5f, adt);
            back(yg, dy, nl * 2);
            for (int64_t t = 1; t < T && ld > C; t++) { /* the rows' C columns to the front */
                memmove(yc + t * C, yc + t * ld, (size_t)C * 2);
                memmove(yg + t * C, yg + t * ld, (size_t)C * 2);
            }
            float *a = wide16(adt, yg, n), *e = wide16(adt, yc, n);
            snprintf(what, sizeof what, "rmsnorm16 %s C=%lld ldy=%lld", an, (long long)C, (long long)ld);
            check(what, a, e, n, tol16(adt));
            free(x), free(w), free(yc), free(yg), free(a), free(e);
            tuna_cuda_free(g_gpu, dx), tuna_cuda_free(g_gpu, dw), tuna_cuda_free(g_gpu, dy);
        }
        /* glu16: n = 2331 (scalar), 800 (8 per thread); every activation */
        const int64_t ns[2] = {2331, 800};
        for (int ni = 0; ni < 2; ni++) {
            const size_t n = (size_t)ns[ni];
            float *g = rnd(n), *u = rnd(n);
            for (size_t i = 0; i < n; i++) g[i] *= 4.0f;
            uint16_t *g16 = malloc(n * 2), *u16 = malloc(n * 2), *oc = malloc(n * 2), *og = malloc(n * 2);
            tuna_convert_from_f32(adt, g, g16, n);
            tuna_convert_from_f32(adt, u, u16, n);
            void *dg = dev(g16, n * 2), *du = dev(u16, n * 2), *dout = dev(NULL, n * 2);
            for (int act = 0; act < 3; act++) {
                tuna_cpu_glu16(g_cpu, oc, g16, u16, (int64_t)n, act, adt);
                g_gops->glu16(g_gpu, dout, dg, du, (int64_t)n, act, adt);
                back(og, dout, n * 2);
                float *a = wide16(adt, og, n), *e = wide16(adt, oc, n);
                snprintf(what, sizeof what, "glu16 %s n=%zu act %d", an, n, act);
                check(what, a, e, n, tol16(adt));
                free(a), free(e);
            }
            /* in place (out == gate) */
            tuna_cpu_glu16(g_cpu, oc, g16, u16, (int64_t)n, 0, adt);
            g_gops->glu16(g_gpu, dg, dg, du, (int64_t)n, 0, adt);
            back(og, dg, n * 2);
            float *a = wide16(adt, og, n), *e = wide16(adt, oc, n);
            check("glu16 in place", a, e, n, tol16(adt));
            free(a), free(e), free(g), free(u), free(g16), free(u16), free(oc), free(og);
            tuna_cuda_free(g_gpu, dg), tuna_cuda_free(g_gpu, du), tuna_cuda_free(g_gpu, dout);
        }
        /* matmul16: 16-bit and float32 outputs, with and without bias, accumulating */
        const int64_t NK[][2] = {{37, 40}, {256, 1024}, {300, 72}};
        const int64_t Ts[] = {3, 33};
        for (size_t s = 0; s < 3; s++)
            for (size_t ti = 0; ti < 2; ti++) {
                const int64_t N = NK[s][0], K = NK[s][1], T = Ts[ti];
                float *wf = rnd((size_t)(N * K)), *x = rnd((size_t)(T * K)), *bias = rnd((size_t)N);
                float *y0 = rnd((size_t)(T * N));
                uint16_t *wh = malloc((size_t)(N * K) * 2), *x16 = malloc((size_t)(T * K) * 2);
                tuna_convert_from_f32(adt, wf, wh, (size_t)(N * K));
                tuna_convert_from_f32(adt, x, x16, (size_t)(T * K));
                struct tuna_weight wc = {adt, N, K, wh, NULL, 0};
                struct tuna_weight wg = {adt, N, K, dev(wh, (size_t)(N * K) * 2), NULL, 0};
                void *dx = dev(x16, (size_t)(T * K) * 2), *dbias = dev(bias, (size_t)N * 4);
                void *dy = dev(NULL, (size_t)(T * N) * 4);
                float *yc = malloc((size_t)(T * N) * 4), *yg = malloc((size_t)(T * N) * 4);
                for (int mode = 0; mode < 4; mode++) { /* 16-bit out, +bias; float32 out, acc + bias */
                    const bool out16 = mode < 2, withb = mode & 1, acc = mode == 3;
                    const enum tuna_dtype ydt = out16 ? adt : TUNA_DTYPE_F32;
                    memcpy(yc, y0, (size_t)(T * N) * 4);
                    TT_OK(tuna_cuda_upload(g_gpu, dy, y0, (size_t)(T * N) * 4));
                    assert_true(tuna_cpu_matmul16(g_cpu, yc, ydt, x16, adt, &wc, withb ? bias : NULL, T, acc));
                    assert_true(g_gops->matmul16(g_gpu, dy, ydt, dx, adt, &wg, withb ? dbias : NULL, T, acc));
                    back(yg, dy, (size_t)(T * N) * 4);
                    float *a = out16 ? wide16(adt, yg, (size_t)(T * N)) : yg;
                    float *e = out16 ? wide16(adt, yc, (size_t)(T * N)) : yc;
                    snprintf(what, sizeof what, "matmul16 %s T=%lld N=%lld K=%lld out %s%s%s", an, (long long)T,
                             (long long)N, (long long)K, tuna_dtype_name(ydt), withb ? " bias" : "", acc ? " acc" : "");
                    check(what, a, e, (size_t)(T * N), out16 ? tol16(adt) : 1e-5);
                    if (out16) free(a), free(e);
                }
                /* declined: another weight type, a 16-bit output with acc */
                struct tuna_weight wo = wg;
                wo.dtype = adt == TUNA_DTYPE_BF16 ? TUNA_DTYPE_F16 : TUNA_DTYPE_BF16;
                assert_false(g_gops->matmul16(g_gpu, dy, adt, dx, adt, &wo, NULL, T, false));
                assert_false(g_gops->matmul16(g_gpu, dy, adt, dx, adt, &wg, NULL, T, true));
                free(wf), free(x), free(bias), free(y0), free(wh), free(x16), free(yc), free(yg);
                tuna_cuda_free(g_gpu, (void *)wg.data), tuna_cuda_free(g_gpu, dx), tuna_cuda_free(g_gpu, dbias);
                tuna_cuda_free(g_gpu, dy);
            }
        /* rope_kv_store16: 5 heads of 48 dims (32 rotated), GQA 5:1, with and without q/k norms,
         * float32, bf16, f16 and fp8 caches */
        const enum tuna_dtype kdts[4] = {TUNA_DTYPE_F32, TUNA_DTYPE_BF16, TUNA_DTYPE_F16, TUNA_DTYPE_F8_E4M3};
        for (int kd = 0; kd < 4; kd++)
            for (int withn = 0; withn < 2; withn++) {
                const int64_t T = 7, H = 5, Hkv = 1, D = 48, rot = 32, slots = 64;
                const size_t nq = (size_t)(T * H * D), nk = (size_t)(T * Hkv * D);
                float *q = rnd(nq), *k = rnd(nk), *v = rnd(nk), *qn = rnd((size_t)D), *kn = rnd((size_t)D);
                float *inv = malloc((size_t)rot / 2 * 4);
                for (int64_t i = 0; i < rot / 2; i++) inv[i] = powf(10000.0f, -2.0f * (float)i / (float)rot);
                int64_t pos[7] = {0, 1, 2, 100, 4095, 17, 9}, slot[7] = {3, 60, 0, 17, 18, 40, 5};
                uint16_t *q16 = malloc(nq * 2), *k16 = malloc(nk * 2), *v16 = malloc(nk * 2);
                uint16_t *qg = malloc(nq * 2), *kg = malloc(nk * 2);
                tuna_convert_from_f32(adt, q, q16, nq);
                tuna_convert_from_f32(adt, k, k16, nk);
                tuna_convert_from_f32(adt, v, v16, nk);
                void *dq = dev(q16, nq * 2), *dk = dev(k16, nk * 2), *dv = dev(v16, nk * 2);
                float *dqn = dev(qn, (size_t)D * 4), *dkn = dev(kn, (size_t)D * 4);
                const size_t cbytes = tuna_dtype_nbytes(kdts[kd], (uint64_t)(slots * Hkv * D));
                unsigned char *kc = calloc(cbytes, 1), *vc = calloc(cbytes, 1), *cg = malloc(cbytes);
                void *dkc = dev(kc, cbytes), *dvc = dev(vc, cbytes);
                tuna_cpu_rope_kv_store16(g_cpu, q16, k16, v16, adt, withn ? qn : NULL, withn ? kn : NULL, 1e-6f, kc, vc,
                                         kdts[kd], pos, slot, T, H, Hkv, D, rot, inv, 1.1f);
                g_gops->rope_kv_store16(g_gpu, dq, dk, dv, adt, withn ? dqn : NULL, withn ? dkn : NULL, 1e-6f, dkc, dvc,
                                        kdts[kd], pos, slot, T, H, Hkv, D, rot, inv, 1.1f);
                back(qg, dq, nq * 2);
                back(kg, dk, nk * 2);
                float *a = wide16(adt, qg, nq), *e = wide16(adt, q16, nq);
                snprintf(what, sizeof what, "rope_kv_store16 %s q, %s cache%s", an, tuna_dtype_name(kdts[kd]),
                         withn ? ", q/k norms" : "");
                check(what, a, e, nq, tol16(adt));
                free(a), free(e);
                a = wide16(adt, kg, nk), e = wide16(adt, k16, nk);
                check(what, a, e, nk, tol16(adt));
                free(a), free(e);
                /* the caches: widened, the same values up to a unit of the cache type here and there */
                for (int c = 0; c < 2; c++) {
                    back(cg, c ? dvc : dkc, cbytes);
                    const size_t nc = (size_t)(slots * Hkv * D);
                    float *cw = malloc(nc * 4), *cc = malloc(nc * 4);
                    assert_true(tuna_convert_to_f32(kdts[kd], cg, cw, nc));
                    assert_true(tuna_convert_to_f32(kdts[kd], c ? vc : kc, cc, nc));
                    check(what, cw, cc, nc, kdts[kd] == TUNA_DTYPE_F8_E4M3 ? 7e-2 : tol16(adt));
                    free(cw), free(cc);
                }
                free(q), free(k), free(v), free(qn), free(kn), free(inv), free(q16), free(k16), free(v16), free(qg);
                free(kg), free(kc), free(vc), free(cg);
                tuna_cuda_free(g_gpu, dq), tuna_cuda_free(g_gpu, dk), tuna_cuda_free(g_gpu, dv);
                tuna_cuda_free(g_gpu, dqn), tuna_cuda_free(g_gpu, dkn), tuna_cuda_free(g_gpu, dkc);
                tuna_cuda_free(g_gpu, dvc);
            }
    }
    TT_OK(tuna_cuda_status(g_gpu));
}

/* tuna_cuda_backend_stream is the stream the backend queues on: a stream of its own (not the
 * legacy default stream), and work queued on it is done once tuna_cuda_sync returns. */
static void test_stream(void **state)
{
    (void)state;
    NEED_GPU();
    cudaStream_t st = (cudaStream_t)tuna_cuda_backend_stream(g_gpu);
    assert_non_null(st);
    const size_t bytes = (size_t)256 << 20;
    void *d = NULL;
    assert_int_equal(cudaMalloc(&d, bytes), cudaSuccess);
    for (int r = 0; r < 4; r++) assert_int_equal(cudaMemsetAsync(d, r, bytes, st), cudaSuccess);
    TT_OK(tuna_cuda_sync(g_gpu));
    assert_int_equal(cudaStreamQuery(st), cudaSuccess);
    unsigned char b = 0;
    assert_int_equal(cudaMemcpy(&b, (const char *)d + bytes - 1, 1, cudaMemcpyDeviceToHost), cudaSuccess);
    assert_int_equal(b, 3);
    cudaFree(d);
}

/* A failed call makes the backend sticky-unusable with a message naming the call. */
static void test_sticky_error(void **state)
{
    (void)state;
    NEED_GPU();
    tuna_backend *be;
    TT_OK(tuna_cuda_backend_new(0, &be));
    struct tuna_weight w = {TUNA_DTYPE_I32, 4, 4, NULL, NULL, 0};
    tuna_cuda_backend_ops()->matmul(be, NULL, NULL, &w, NULL, 1);
    TT_FAILS(tuna_cuda_status(be), TUNA_E_CUDA, "matmul");
    TT_FAILS(tuna_cuda_sync(be), TUNA_E_CUDA, "GPU engine stopped");
    tuna_cuda_backend_free(be);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_matmul),
        cmocka_unit_test(test_matmul_q4),
        cmocka_unit_test(test_lora),
        cmocka_unit_test(test_argmax),
        cmocka_unit_test(test_elementwise),
        cmocka_unit_test(test_attention),
        cmocka_unit_test(test_attention_batches),
        cmocka_unit_test(test_attention_b1),
        cmocka_unit_test(test_kv_store),
        cmocka_unit_test(test_act16),
        cmocka_unit_test(test_stream),
        cmocka_unit_test(test_sticky_error),
    };
    return cmocka_run_group_tests(tests, ct_ops_setup, ct_ops_teardown);
}
