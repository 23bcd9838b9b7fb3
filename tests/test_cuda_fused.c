/* test_cuda_fused.c — the CUDA backend's optional fused ops (fused.cu) against the composition
 * of the CPU backend's plain ops: matmul_multi (q/k/v in one launch), matmul_glu (gate/up + GLU)
 * and matmul_add (projection into the residual). bf16/f16 weights run the grouped GEMV for
 * T <= 8 and the unfused fallback above; float32 weights always the fallback. Sizes and
 * alignments that are multiples of no tile. Skips without a GPU. */
#define CT_RNG_SEED 0x9E3779B97F4A7C15ull
#include "cuda_testutil.h"

#include "core/dtype.h"
#include "quant/nf4.h"

/* A weight on both sides: host copy in dtype, device copy. */
struct wpair {
    struct tuna_weight c, g;
    float *bias, *dbias;
};

static void wpair_new(struct wpair *p, enum tuna_dtype dt, int64_t N, int64_t K, bool bias)
{
    float *wf = rnd((size_t)(N * K));
    size_t bytes = tuna_dtype_nbytes(dt, (uint64_t)(N * K));
    void *wh = malloc(bytes);
    assert_non_null(wh);
    tuna_convert_from_f32(dt, wf, wh, (size_t)(N * K));
    free(wf);
    p->c = (struct tuna_weight){dt, N, K, wh, NULL, 0};
    p->g = (struct tuna_weight){dt, N, K, dev(wh, bytes), NULL, 0};
    p->bias = bias ? rnd((size_t)N) : NULL;
    p->dbias = bias ? dev(p->bias, (size_t)N * 4) : NULL;
}

static void wpair_free(struct wpair *p)
{
    free((void *)p->c.data);
    tuna_cuda_free(g_gpu, (void *)p->g.data);
    free(p->bias);
    tuna_cuda_free(g_gpu, p->dbias);
}

static const enum tuna_dtype k_types[] = {TUNA_DTYPE_BF16, TUNA_DTYPE_F16, TUNA_DTYPE_F32};
static const int64_t k_Ts[] = {1, 2, 5, 8, 9, 20};

/* bf16/f16 above T = 8 go through cuBLAS with 16-bit activations */
static double tol_for(enum tuna_dtype dt, int64_t T)
{
    if (T > tuna_cuda_gemv_max_t16() && dt == TUNA_DTYPE_BF16) return 1e-2;
    if (T > tuna_cuda_gemv_max_t16() && dt == TUNA_DTYPE_F16) return 2e-3;
    return 1e-5;
}

static void test_matmul_multi(void **state)
{
    (void)state;
    NEED_GPU();
    const int64_t shapes[][4] = {{3, 40, 24, 24}, {64, 136, 16, 16}, {300, 1024, 100, 100}, {17, 8, 5, 9}};
    for (size_t ti = 0; ti < 3; ti++)
        for (size_t si = 0; si < 4; si++) {
            int64_t K = shapes[si][1], N[3] = {shapes[si][0], shapes[si][2], shapes[si][3]};
            struct wpair w[3];
            for (int i = 0; i < 3; i++) wpair_new(&w[i], k_types[ti], N[i], K, si & 1);
            for (size_t tt = 0; tt < sizeof k_Ts / sizeof k_Ts[0]; tt++) {
                int64_t T = k_Ts[tt];
                float *x = rnd((size_t)(T * K)), *dx = dev(x, (size_t)(T * K) * 4);
                float *yc[3], *dy[3];
                for (int i = 0; i < 3; i++) {
                    yc[i] = malloc((size_t)(T * N[i]) * 4);
                    dy[i] = dev(NULL, (size_t)(T * N[i]) * 4);
                    g_cops->matmul(g_cpu, yc[i], x, &w[i].c, w[i].bias, T);
                }
                const struct tuna_weight *ws[3] = {&w[0].g, &w[1].g, &w[2].g};
                const float *bs[3] = {w[0].dbias, w[1].dbias, w[2].dbias};
                g_gops->matmul_multi(g_gpu, 3, dy, dx, ws, bs, T);
                for (int i = 0; i < 3; i++) {
                    float *yg = malloc((size_t)(T * N[i]) * 4);
                    back(yg, dy[i], (size_t)(T * N[i]) * 4);
                    char what[160];
                    snprintf(what, sizeof what, "matmul_multi %s T=%lld weight %d [%lld, %lld]",
                             tuna_dtype_name(k_types[ti]), (long long)T, i, (long long)N[i], (long long)K);
                    check(what, yg, yc[i], (size_t)(T * N[i]), tol_for(k_types[ti], T));
                    free(yg);
                    free(yc[i]);
                    tuna_cuda_free(g_gpu, dy[i]);
                }
                free(x);
                tuna_cuda_free(g_gpu, dx);
            }
            for (int i = 0; i < 3; i++) wpair_free(&w[i]);
        }
}

static void test_matmul_glu(void **state)
{
    (void)state;
    NEED_GPU();
    const int64_t shapes[][2] = {{37, 40}, {300, 136}, {1000, 512}};
    for (size_t ti = 0; ti < 3; ti++)
        for (size_t si = 0; si < 3; si++)
            for (int act = 0; act < 3; act++) {
                int64_t I = shapes[si][0], K = shapes[si][1];
                struct wpair g, u;
                wpair_new(&g, k_types[ti], I, K, act == 1);
                wpair_new(&u, k_types[ti], I, K, act == 1);
                for (size_t tt = 0; tt < sizeof k_Ts / sizeof k_Ts[0]; tt++) {
                    int64_t T = k_Ts[tt];
                    float *x = rnd((size_t)(T * K)), *dx = dev(x, (size_t)(T * K) * 4);
                    float *gc = malloc((size_t)(T * I) * 4), *uc = malloc((size_t)(T * I) * 4);
                    float *og = malloc((size_t)(T * I) * 4), *dout = dev(NULL, (size_t)(T * I) * 4);
                    g_cops->matmul(g_cpu, gc, x, &g.c, g.bias, T);
                    g_cops->matmul(g_cpu, uc, x, &u.c, u.bias, T);
                    g_cops->glu(g_cpu, gc, gc, uc, T * I, act);
                    g_gops->matmul_glu(g_gpu, dout, dx, &g.g, g.dbias, &u.g, u.dbias, T, act);
                    back(og, dout, (size_t)(T * I) * 4);
                    char what[160];
                    snprintf(what, sizeof what, "matmul_glu %s act %d T=%lld [%lld, %lld]", tuna_dtype_name(k_types[ti]),
                             act, (long long)T, (long long)I, (long long)K);
                    check(what, og, gc, (size_t)(T * I), 2 * tol_for(k_types[ti], T));
                    free(x);
                    free(gc);
                    free(uc);
                    free(og);
                    tuna_cuda_free(g_gpu, dx);
                    tuna_cuda_free(g_gpu, dout);
                }
                wpair_free(&g);
                wpair_free(&u);
            }
}

static void test_matmul_add(void **state)
{
    (void)state;
    NEED_GPU();
    const int64_t shapes[][2] = {{37, 40}, {256, 1032}, {129, 8}};
    for (size_t ti = 0; ti < 3; ti++)
        for (size_t si = 0; si < 3; si++) {
            int64_t N = shapes[si][0], K = shapes[si][1];
            struct wpair w;
            wpair_new(&w, k_types[ti], N, K, si == 1);
            for (size_t tt = 0; tt < sizeof k_Ts / sizeof k_Ts[0]; tt++) {
                int64_t T = k_Ts[tt];
                float *x = rnd((size_t)(T * K)), *dx = dev(x, (size_t)(T * K) * 4);
                float *y = rnd((size_t)(T * N)), *dy = dev(y, (size_t)(T * N) * 4);
                float *tmp = malloc((size_t)(T * N) * 4), *yg = malloc((size_t)(T * N) * 4);
                g_cops->matmul(g_cpu, tmp, x, &w.c, w.bias, T);
                g_cops->add(g_cpu, y, tmp, T * N);
                g_gops->matmul_add(g_gpu, dy, dx, &w.g, w.dbias, T);
                back(yg, dy, (size_t)(T * N) * 4);
                char what[160];
                snprintf(what, sizeof what, "matmul_add %s T=%lld [%lld, %lld]", tuna_dtype_name(k_types[ti]),
                         (long long)T, (long long)N, (long long)K);
                check(what, yg, y, (size_t)(T * N), tol_for(k_types[ti], T));
                free(x);
                free(y);
                free(tmp);
                free(yg);
                tuna_cuda_free(g_gpu, dx);
                tuna_cuda_free(g_gpu, dy);
            }
            wpair_free(&w);
        }
}

/* x[T,K] through the CPU's rmsnorm into xn, then the plain matmuls. */
static void cpu_norm(float *xn, const float *x, const float *nw, int64_t T, int64_t K)
{
    g_cops->rmsnorm(g_cpu, xn, x, nw, T, K, 1e-5f);
}

static float *rnd_norm_w(int64_t K)
{
    float *w = rnd((size_t)K);
    for (int64_t i = 0; i < K; i++) w[i] = 1.0f + 0.5f * w[i];
    return w;
}

/* rmsnorm_matmul_multi against rmsnorm + matmul (both outputs: the projections and xn); n = 1
 * with many rows is the final norm + lm_head */
static void test_rmsnorm_matmul_multi(void **state)
{
    (void)state;
    NEED_GPU();
    const int64_t shapes[][5] = {{3, 64, 24, 24, 3}, {64, 136, 16, 16, 3}, {300, 1024, 100, 100, 3},
                                 {17, 12, 5, 9, 3}, {3001, 256, 0, 0, 1}};
    for (size_t ti = 0; ti < 3; ti++)
        for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
            const int n = (int)shapes[si][4];
            int64_t K = shapes[si][1], N[3] = {shapes[si][0], shapes[si][2], shapes[si][3]};
            struct wpair w[3];
            memset(w, 0, sizeof w);
            for (int i = 0; i < n; i++) wpair_new(&w[i], k_types[ti], N[i], K, si & 1);
            float *nw = rnd_norm_w(K), *dnw = dev(nw, (size_t)K * 4);
            for (size_t tt = 0; tt < sizeof k_Ts / sizeof k_Ts[0]; tt++) {
                int64_t T = k_Ts[tt];
                float *x = rnd((size_t)(T * K)), *dx = dev(x, (size_t)(T * K) * 4);
                float *xn = malloc((size_t)(T * K) * 4), *xng = malloc((size_t)(T * K) * 4);
                float *dxn = dev(NULL, (size_t)(T * K) * 4);
                cpu_norm(xn, x, nw, T, K);
                float *yc[3], *dy[3];
                for (int i = 0; i < n; i++) {
                    yc[i] = malloc((size_t)(T * N[i]) * 4);
                    dy[i] = dev(NULL, (size_t)(T * N[i]) * 4);
                    g_cops->matmul(g_cpu, yc[i], xn, &w[i].c, w[i].bias, T);
                }
                const struct tuna_weight *ws[3] = {&w[0].g, &w[1].g, &w[2].g};
                const float *bs[3] = {w[0].dbias, w[1].dbias, w[2].dbias};
                g_gops->rmsnorm_matmul_multi(g_gpu, n, dy, dxn, dx, dnw, 1e-5f, ws, bs, T);
                char what[160];
                back(xng, dxn, (size_t)(T * K) * 4);
                snprintf(what, sizeof what, "rmsnorm_matmul_multi %s T=%lld xn [%lld]", tuna_dtype_name(k_types[ti]),
                         (long long)T, (long long)K);
                check(what, xng, xn, (size_t)(T * K), 1e-6);
                for (int i = 0; i < n; i++) {
                    float *yg = malloc((size_t)(T * N[i]) * 4);
                    back(yg, dy[i], (size_t)(T * N[i]) * 4);
                    snprintf(what, sizeof what, "rmsnorm_matmul_multi %s T=%lld weight %d [%lld, %lld]",
                             tuna_dtype_name(k_types[ti]), (long long)T, i, (long long)N[i], (long long)K);
                    check(what, yg, yc[i], (size_t)(T * N[i]), tol_for(k_types[ti], T));
                    free(yg);
                    free(yc[i]);
                    tuna_cuda_free(g_gpu, dy[i]);
                }
                free(x), free(xn), free(xng);
                tuna_cuda_free(g_gpu, dx);
                tuna_cuda_free(g_gpu, dxn);
            }
            for (int i = 0; i < n; i++) wpair_free(&w[i]);
            free(nw);
            tuna_cuda_free(g_gpu, dnw);
        }
}

static void test_rmsnorm_matmul_glu(void **state)
{
    (void)state;
    NEED_GPU();
    const int64_t shapes[][2] = {{37, 40}, {300, 136}, {1000, 512}, {33, 20}};
    for (size_t ti = 0; ti < 3; ti++)
        for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++)
            for (int act = 0; act < 3; act++) {
                int64_t I = shapes[si][0], K = shapes[si][1];
                struct wpair g, u;
                wpair_new(&g, k_types[ti], I, K, act == 1);
                wpair_new(&u, k_types[ti], I, K, act == 1);
                float *nw = rnd_norm_w(K), *dnw = dev(nw, (size_t)K * 4);
                for (size_t tt = 0; tt < sizeof k_Ts / sizeof k_Ts[0]; tt++) {
                    int64_t T = k_Ts[tt];
                    float *x = rnd((size_t)(T * K)), *dx = dev(x, (size_t)(T * K) * 4);
                    float *xn = malloc((size_t)(T * K) * 4), *dxn = dev(NULL, (size_t)(T * K) * 4);
                    float *gc = malloc((size_t)(T * I) * 4), *uc = malloc((size_t)(T * I) * 4);
                    float *og = malloc((size_t)(T * I) * 4), *dout = dev(NULL, (size_t)(T * I) * 4);
                    cpu_norm(xn, x, nw, T, K);
                    g_cops->matmul(g_cpu, gc, xn, &g.c, g.bias, T);
                    g_cops->matmul(g_cpu, uc, xn, &u.c, u.bias, T);
                    g_cops->glu(g_cpu, gc, gc, uc, T * I, act);
                    g_gops->rmsnorm_matmul_glu(g_gpu, dout, dxn, dx, dnw, 1e-5f, &g.g, g.dbias, &u.g, u.dbias, T, act);
                    back(og, dout, (size_t)(T * I) * 4);
                    char what[160];
                    snprintf(what, sizeof what, "rmsnorm_matmul_glu %s act %d T=%lld [%lld, %lld]",
                             tuna_dtype_name(k_types[ti]), act, (long long)T, (long long)I, (long long)K);
                    check(what, og, gc, (size_t)(T * I), 2 * tol_for(k_types[ti], T));
                    float *xg = malloc((size_t)(T * K) * 4); /* xn is [T, K], out [T, I] */
                    back(xg, dxn, (size_t)(T * K) * 4);
                    check("rmsnorm_matmul_glu xn", xg, xn, (size_t)(T * K), 1e-6);
                    free(xg);
                    free(x), free(xn), free(gc), free(uc), free(og);
                    tuna_cuda_free(g_gpu, dx);
                    tuna_cuda_free(g_gpu, dxn);
                    tuna_cuda_free(g_gpu, dout);
                }
                wpair_free(&g);
                wpair_free(&u);
                free(nw);
                tuna_cuda_free(g_gpu, dnw);
            }
}

/* A bitsandbytes 4-bit weight on both sides: the CPU state and its GPU descriptor (as
 * src/model/device.c makes it); od: the checkpoint was bf16 (dequantized values rounded to bf16,
 * bf16 compute) or float32 (exact float32 kernels). */
struct q4pair {
    struct tuna_q4_weight q;
    struct tuna_cuda_q4 d;
    struct tuna_weight c, g;
    float *bias, *dbias;
};

/* The GPU descriptor of q as src/model/device.c makes it: float32 absmax uploaded, or (nested)
 * the double-quantized scales (code table, nested absmax, 8-bit codes). */
static void q4desc_new(struct tuna_cuda_q4 *d, const struct tuna_q4_weight *q, bool nested, enum tuna_dtype prefill)
{
    memset(d, 0, sizeof *d);
    tuna_q4_dequant_table(q->type, d->lut);
    d->blocksize = q->blocksize;
    d->round_mode = q->dtype == TUNA_DTYPE_BF16 ? 1 : q->dtype == TUNA_DTYPE_F16 ? 2 : 0;
    d->prefill = prefill;
    if (!nested) {
        d->absmax = dev(q->absmax, (size_t)q->n_blocks * 4);
        return;
    }
    assert_true(q->nested);
    while ((1 << d->nested_shift) < q->nested_blocksize) d->nested_shift++;
    assert_int_equal(1 << d->nested_shift, q->nested_blocksize);
    d->nested_code = dev(q->nested_code, sizeof q->nested_code);
    d->nested_absmax = dev(q->nested_absmax, (size_t)q->n_nested * 4);
    d->qabsmax = dev(q->qabsmax, (size_t)q->n_blocks);
    d->nested_offset = q->nested_offset;
}

static void q4desc_free(struct tuna_cuda_q4 *d)
{
    tuna_cuda_free(g_gpu, (void *)d->absmax);
    tuna_cuda_free(g_gpu, (void *)d->nested_code);
    tuna_cuda_free(g_gpu, (void *)d->nested_absmax);
    tuna_cuda_free(g_gpu, (void *)d->qabsmax);
}

/* od: the weights' original dtype (what dequantizing rounds to): 0 float32, 1 bf16, 2 f16. */
static void q4pair_new(struct q4pair *p, int type, int od, int64_t N, int64_t K, bool bias, bool nested)
{
    const enum tuna_dtype odt = od == 2 ? TUNA_DTYPE_F16 : od ? TUNA_DTYPE_BF16 : TUNA_DTYPE_F32;
    float *wf = rnd((size_t)(N * K));
    TT_OK(tuna_q4_quantize(wf, TUNA_DTYPE_F32, N, K, type ? TUNA_Q4_FP4 : TUNA_Q4_NF4, 64, true, odt, &p->q));
    free(wf);
    enum tuna_dtype dt = type ? TUNA_DTYPE_FP4 : TUNA_DTYPE_NF4;
    p->c = (struct tuna_weight){dt, N, K, p->q.codes, &p->q, 0};
    q4desc_new(&p->d, &p->q, nested, odt);
    p->g = (struct tuna_weight){dt, N, K, dev(p->q.codes, (size_t)((N * K + 1) / 2)), &p->d, 0};
    p->bias = bias ? rnd((size_t)N) : NULL;
    p->dbias = bias ? dev(p->bias, (size_t)N * 4) : NULL;
}

static void q4pair_free(struct q4pair *p)
{
    tuna_cuda_free(g_gpu, (void *)p->g.data);
    q4desc_free(&p->d);
    tuna_q4_weight_free(&p->q);
    free(p->bias);
    tuna_cuda_free(g_gpu, p->dbias);
}

/* The grouped 4-bit GEMV (q4.cu) behind every fused op, against the CPU's matmul on the
 * bitsandbytes state: q/k/v (+ the norm), gate/up + GLU (+ the norm), o into the residual;
 * T up to 8 (the kernel) and 9 (the fallback); NF4 and FP4; float32 and bf16 checkpoints; the
 * scales double-quantized on the GPU (as a model loads them) or float32, alternately. */
static void test_q4_grouped(void **state)
{
    (void)state;
    NEED_GPU();
    const int64_t Ts[] = {1, 2, 3, 8, 9};
    /* the last shape has more rows than one wave of blocks: warps take several rows; 2200 x 1088
     * (17 blocks of 64 per row) gives k_q4_mma (TUNA_Q4_K=3) more items than SMs and a second,
     * partly empty stage per warp and item */
    const int64_t shapes[][4] = {{64, 256, 32, 32}, {300, 1024, 100, 100}, {37, 72, 5, 9}, {2200, 1088, 40, 24},
                                 {14336, 64, 4000, 3000}};
    for (int type = 0; type < 2; type++)
        for (int od = 0; od < 2; od++)
            for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
                const int64_t K = shapes[si][1], N[3] = {shapes[si][0], shapes[si][2], shapes[si][3]};
                struct q4pair w[3], up;
                const bool nested = ((int)si + od) % 2 == 0;
                for (int i = 0; i < 3; i++) q4pair_new(&w[i], type, od, N[i], K, i == 1, nested);
                q4pair_new(&up, type, od, N[0], K, false, nested);
                float *nw = rnd_norm_w(K), *dnw = dev(nw, (size_t)K * 4);
                for (size_t tt = 0; tt < sizeof Ts / sizeof Ts[0]; tt++) {
                    const int64_t T = Ts[tt];
                    /* bf16: the fast kernel skips the rounding of each weight to bf16 that the CPU
                     * reference does (up to 2^-9 per weight); on the short rows of the 37 x 72 shape
                     * that reached 4.3e-3 on the H100 (FP4, T = 1), so 1e-2 as for the dequantize +
                     * cuBLAS path above T = 8 */
                    const double tol = od ? 1e-2 : 1e-5;
                    char what[200];
                    float *x = rnd((size_t)(T * K)), *dx = dev(x, (size_t)(T * K) * 4);
                    float *xn = malloc((size_t)(T * K) * 4), *dxn = dev(NULL, (size_t)(T * K) * 4);
                    cpu_norm(xn, x, nw, T, K);
                    const struct tuna_weight *ws[3] = {&w[0].g, &w[1].g, &w[2].g};
                    const float *bs[3] = {w[0].dbias, w[1].dbias, w[2].dbias};
                    for (int norm = 0; norm < 2; norm++) {
                        float *yc[3], *dy[3];
                        for (int i = 0; i < 3; i++) {
                            yc[i] = malloc((size_t)(T * N[i]) * 4);
                            dy[i] = dev(NULL, (size_t)(T * N[i]) * 4);
                            g_cops->matmul(g_cpu, yc[i], norm ? xn : x, &w[i].c, w[i].bias, T);
                        }
                        if (norm) g_gops->rmsnorm_matmul_multi(g_gpu, 3, dy, dxn, dx, dnw, 1e-5f, ws, bs, T);
                        else g_gops->matmul_multi(g_gpu, 3, dy, dx, ws, bs, T);
                        for (int i = 0; i < 3; i++) {
                            float *yg = malloc((size_t)(T * N[i]) * 4);
                            back(yg, dy[i], (size_t)(T * N[i]) * 4);
                            snprintf(what, sizeof what, "%s %s from %s%s T=%lld weight %d [%lld, %lld]",
                                     norm ? "rmsnorm_matmul_multi" : "matmul_multi", type ? "FP4" : "NF4",
                                     od ? "bf16" : "f32", nested ? " nested" : "", (long long)T, i, (long long)N[i],
                                     (long long)K);
                            check(what, yg, yc[i], (size_t)(T * N[i]), tol);
                            free(yg), free(yc[i]);
                            tuna_cuda_free(g_gpu, dy[i]);
                        }
                        /* gate/up + GLU */
                        const int64_t I = N[0];
                        float *gc = malloc((size_t)(T * I) * 4), *uc = malloc((size_t)(T * I) * 4);
                        float *og = malloc((size_t)(T * I) * 4), *dout = dev(NULL, (size_t)(T * I) * 4);
                        g_cops->matmul(g_cpu, gc, norm ? xn : x, &w[0].c, w[0].bias, T);
                        g_cops->matmul(g_cpu, uc, norm ? xn : x, &up.c, NULL, T);
                        g_cops->glu(g_cpu, gc, gc, uc, T * I, 0);
                        if (norm) g_gops->rmsnorm_matmul_glu(g_gpu, dout, dxn, dx, dnw, 1e-5f, &w[0].g, w[0].dbias, &up.g, NULL, T, 0);
                        else g_gops->matmul_glu(g_gpu, dout, dx, &w[0].g, w[0].dbias, &up.g, NULL, T, 0);
                        back(og, dout, (size_t)(T * I) * 4);
                        snprintf(what, sizeof what, "%s %s from %s T=%lld [%lld, %lld]",
                                 norm ? "rmsnorm_matmul_glu" : "matmul_glu", type ? "FP4" : "NF4", od ? "bf16" : "f32",
                                 (long long)T, (long long)I, (long long)K);
                        check(what, og, gc, (size_t)(T * I), 2 * tol);
                        if (norm) {
                            float *xg = malloc((size_t)(T * K) * 4);
                            back(xg, dxn, (size_t)(T * K) * 4);
                            check("4-bit rmsnorm_matmul_glu xn", xg, xn, (size_t)(T * K), 1e-6);
                            free(xg);
                        }
                        free(gc), free(uc), free(og);
                        tuna_cuda_free(g_gpu, dout);
                    }
                    /* o into the residual */
                    {
                        const int64_t No = N[1];
                        float *y = rnd((size_t)(T * No)), *dy = dev(y, (size_t)(T * No) * 4);
                        float *tmp = malloc((size_t)(T * No) * 4), *yg = malloc((size_t)(T * No) * 4);
                        g_cops->matmul(g_cpu, tmp, x, &w[1].c, w[1].bias, T);
                        g_cops->add(g_cpu, y, tmp, T * No);
                        g_gops->matmul_add(g_gpu, dy, dx, &w[1].g, w[1].dbias, T);
                        back(yg, dy, (size_t)(T * No) * 4);
                        snprintf(what, sizeof what, "matmul_add %s from %s T=%lld [%lld, %lld]", type ? "FP4" : "NF4",
                                 od ? "bf16" : "f32", (long long)T, (long long)No, (long long)K);
                        check(what, yg, y, (size_t)(T * No), tol);
                        free(y), free(tmp), free(yg);
                        tuna_cuda_free(g_gpu, dy);
                    }
                    free(x), free(xn);
                    tuna_cuda_free(g_gpu, dx);
                    tuna_cuda_free(g_gpu, dxn);
                }
                for (int i = 0; i < 3; i++) q4pair_free(&w[i]);
                q4pair_free(&up);
                free(nw);
                tuna_cuda_free(g_gpu, dnw);
            }
}

/* The 4-bit GEMM k_q4_mm (q4_mm.cu, twenty-first session) behind matmul and matmul_add from 9 tokens
 * (where the fused GEMVs leave off) to TUNA_Q4_MM_MAXT (256 here), in launches of up to 128 tokens
 * (65-128 in the 16-group form; above 64 also k_q4_wg, TUNA_Q4_WG=1, where the GPU runs it): against the
 * CPU (1e-2, the 16-bit operands of the dequantize + cuBLAS path) and against that path itself
 * (TUNA_Q4_MM_MAXT=0: the same 16-bit weights and activations, float32 sums in another order:
 * 1e-5), with and without bias, into y and added onto it; NF4 and FP4; bf16 and f16 compute;
 * float32 and nested scales; weights of float32, bf16 and f16 origin (their rounding is the pack's
 * own, or not: both forms of q4mm_pair); rows that end inside a 64-row block, K = 128 (one step),
 * 2048 and 14336; two runs give the same bits and the kernel ran ceil(T / 128) times per call. */
static void test_q4_mm(void **state)
{
    (void)state;
    NEED_GPU();
    const int64_t Ts[] = {9, 16, 25, 33, 64, 65, 128, 130};
    const int64_t shapes[][2] = {{300, 2048}, {77, 128}, {100, 14336}};
    const char *env = getenv("TUNA_Q4_MM_MAXT");
    char *saved = env ? strdup(env) : NULL;
    const char *env_wg = getenv("TUNA_Q4_WG");
    char *saved_wg = env_wg ? strdup(env_wg) : NULL;
    const long wg0 = tuna_cuda_q4_wg_launches();
    int combo = 0;
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++)
        for (int type = 0; type < 2; type++) {
            const int64_t N = shapes[si][0], K = shapes[si][1];
            const bool nested = (si + (size_t)type) % 2 == 0;
            const enum tuna_dtype pf = (si + (size_t)type) % 3 == 1 ? TUNA_DTYPE_F16 : TUNA_DTYPE_BF16;
            /* the six cases: weights float32 / bf16 / f16 under bf16 compute and bf16 / f16 under f16 */
            const int od = (int)((2 * si + (size_t)type) % 3);
            static const char *const od_name[] = {"f32", "bf16", "f16"};
            struct q4pair w;
            q4pair_new(&w, type, od, N, K, true, nested);
            struct tuna_cuda_q4 d16;
            q4desc_new(&d16, &w.q, nested, pf);
            struct tuna_weight wg = w.g;
            wg.q4 = &d16;
            for (size_t tt = 0; tt < sizeof Ts / sizeof Ts[0]; tt++, combo++) {
                const int64_t T = Ts[tt];
                const bool bias = combo % 2 == 0;
                const size_t ny = (size_t)(T * N);
                float *x = rnd((size_t)(T * K)), *dx = dev(x, (size_t)(T * K) * 4);
                float *y0 = rnd(ny), *want = malloc(ny * 4), *wadd = malloc(ny * 4);
                g_cops->matmul(g_cpu, want, x, &w.c, bias ? w.bias : NULL, T);
                memcpy(wadd, y0, ny * 4);
                g_cops->add(g_cpu, wadd, want, T * N);
                float *got[3][2] = {{NULL}}; /* [k_q4_mm, dequantize + cuBLAS, k_q4_wg][matmul, matmul_add] */
                for (int path = 0; path < 3; path++) {
                    if (path == 2 && T <= 64) continue;
                    setenv("TUNA_Q4_MM_MAXT", path == 1 ? "0" : "256", 1); /* 256: T > 128 too (default 128) */
                    setenv("TUNA_Q4_WG", path == 2 ? "1" : "0", 1);
                    for (int add = 0; add < 2; add++) {
                        float *dy = dev(add ? y0 : NULL, ny * 4);
                        const long l0 = tuna_cuda_q4_mm_launches();
                        if (add) g_gops->matmul_add(g_gpu, dy, dx, &wg, bias ? w.dbias : NULL, T);
                        else g_gops->matmul(g_gpu, dy, dx, &wg, bias ? w.dbias : NULL, T);
                        /* matmul_add up to the fused GEMVs' limit may run k_q4_tc instead (not counted) */
                        const bool counted = !add || T > tuna_cuda_q4_gemv_max_t();
                        const long runs = tuna_cuda_q4_mm_launches() - l0, expect = path == 1 ? 0 : (T + 127) / 128;
                        got[path][add] = malloc(ny * 4);
                        back(got[path][add], dy, ny * 4);
                        char what[200];
                        snprintf(what, sizeof what, "%s %s (%s weights) %s%s %s T=%lld [%lld, %lld]%s",
                                 add ? "matmul_add" : "matmul", type ? "FP4" : "NF4", od_name[od],
                                 pf == TUNA_DTYPE_F16 ? "f16" : "bf16", nested ? " nested" : "",
                                 path == 1 ? "dequantized + cuBLAS" : path == 2 ? "k_q4_wg" : "k_q4_mm", (long long)T,
                                 (long long)N, (long long)K, bias ? " + bias" : "");
                        check(what, got[path][add], add ? wadd : want, ny, 1e-2);
                        if (counted && runs != expect) {
                            print_error("%s: k_q4_mm ran %ld times, expected %ld\n", what, runs, expect);
                            fail();
                        }
                        if (!path && !add) { /* the same bits again */
                            float *again = malloc(ny * 4);
                            g_gops->matmul(g_gpu, dy, dx, &wg, bias ? w.dbias : NULL, T);
                            back(again, dy, ny * 4);
                            if (memcmp(again, got[0][0], ny * 4) != 0) {
                                print_error("%s: two runs differ\n", what);
                                fail();
                            }
                            free(again);
                        }
                        tuna_cuda_free(g_gpu, dy);
                    }
                }
                for (int add = 0; add < 2; add++)
                    for (int path = 0; path < 3; path += 2) {
                        if (!got[path][add]) continue;
                        char what[200];
                        snprintf(what, sizeof what, "%s against dequantize + cuBLAS, %s %s (%s weights) %s T=%lld [%lld, %lld]",
                                 path ? "k_q4_wg" : "k_q4_mm", add ? "matmul_add" : "matmul", type ? "FP4" : "NF4",
                                 od_name[od], pf == TUNA_DTYPE_F16 ? "f16" : "bf16", (long long)T, (long long)N,
                                 (long long)K);
                        check(what, got[path][add], got[1][add], ny, 1e-5);
                    }
                for (int path = 0; path < 3; path++)
                    free(got[path][0]), free(got[path][1]);
                free(x), free(y0), free(want), free(wadd);
                tuna_cuda_free(g_gpu, dx);
            }
            q4desc_free(&d16);
            q4pair_free(&w);
        }
    /* k_q4_wg runs only where the GPU and the build have wgmma; elsewhere the TUNA_Q4_WG=1 pass ran k_q4_mm */
    printf("  k_q4_wg: %ld launches (TUNA_Q4_WG=1 pass)\n", tuna_cuda_q4_wg_launches() - wg0);
    if (saved) setenv("TUNA_Q4_MM_MAXT", saved, 1);
    else unsetenv("TUNA_Q4_MM_MAXT");
    if (saved_wg) setenv("TUNA_Q4_WG", saved_wg, 1);
    else unsetenv("TUNA_Q4_WG");
    free(saved), free(saved_wg);
}

/* Double-quantized scales on the GPU give the same bits as float32 ones: a weight dequantized
 * (the prefill path) both ways, and against the CPU's dequantizer (float32 prefill: the same
 * products, so the same bits), and the decode GEMVs (single, grouped, norm folded, GLU, added)
 * both ways at T = 1..8. NF4 and FP4, float32/bf16/f16 checkpoints, blocksizes 32/64/128,
 * shapes whose block and nested-block counts are not multiples of anything. */
static void test_q4_nested_bits(void **state)
{
    (void)state;
    NEED_GPU();
    const int64_t shapes[][2] = {{37, 72}, {300, 1024}, {64, 200}, {129, 4096}};
    const int bss[] = {64, 32, 128};
    const enum tuna_dtype ods[] = {TUNA_DTYPE_F32, TUNA_DTYPE_BF16, TUNA_DTYPE_F16};
    const enum tuna_dtype pfs[] = {TUNA_DTYPE_F32, TUNA_DTYPE_BF16, TUNA_DTYPE_F16};
    int cases = 0;
    for (int type = 0; type < 2; type++)
        for (size_t oi = 0; oi < 3; oi++)
            for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
                const int64_t N = shapes[si][0], K = shapes[si][1], NK = N * K;
                const int bs = bss[(si + oi) % 3];
                float *wf = rnd((size_t)NK);
                struct tuna_q4_weight q;
                TT_OK(tuna_q4_quantize(wf, TUNA_DTYPE_F32, N, K, type ? TUNA_Q4_FP4 : TUNA_Q4_NF4, bs, true, ods[oi], &q));
                free(wf);
                assert_true(q.nested);
                const enum tuna_dtype dt = type ? TUNA_DTYPE_FP4 : TUNA_DTYPE_NF4;
                void *codes = dev(q.codes, (size_t)((NK + 1) / 2));
                float *cpu = malloc((size_t)NK * 4);
                tuna_q4_dequantize_rows(&q, 0, N, cpu);
                for (size_t pi = 0; pi < 3; pi++) {
                    struct tuna_cuda_q4 d[2];
                    struct tuna_weight g[2];
                    void *out[2], *host[2];
                    const size_t ob = tuna_dtype_nbytes(pfs[pi], (uint64_t)NK);
                    for (int n = 0; n < 2; n++) {
                        q4desc_new(&d[n], &q, n == 1, pfs[pi]);
                        g[n] = (struct tuna_weight){dt, N, K, codes, &d[n], 0};
                        out[n] = dev(NULL, ob);
                        host[n] = malloc(ob);
                        TT_OK(tuna_cuda_q4_dequantize(g_gpu, &g[n], out[n]));
                        back(host[n], out[n], ob);
                    }
                    char what[200];
                    snprintf(what, sizeof what, "%s from %s, blocksize %d, [%lld, %lld], dequantized to %s",
                             type ? "FP4" : "NF4", tuna_dtype_name(ods[oi]), bs, (long long)N, (long long)K,
                             tuna_dtype_name(pfs[pi]));
                    if (memcmp(host[0], host[1], ob) != 0) {
                        print_error("%s: nested scales differ from float32 ones\n", what);
                        fail();
                    }
                    if (pfs[pi] == TUNA_DTYPE_F32 && memcmp(host[1], cpu, ob) != 0) {
                        print_error("%s: differs from the CPU's dequantizer\n", what);
                        fail();
                    }
                    /* the decode GEMVs, both ways, same bits */
                    for (int64_t T = 1; T <= 8; T += pi == 0 ? 1 : 3) {
                        float *x = rnd((size_t)(T * K)), *dx = dev(x, (size_t)(T * K) * 4);
                        float *nw = rnd_norm_w(K), *dnw = dev(nw, (size_t)K * 4);
                        const size_t yb = (size_t)(T * N) * 4;
                        float *y0 = rnd((size_t)(T * N)); /* what matmul_add adds to */
                        float *y[2][5];
                        for (int n = 0; n < 2; n++) {
                            float *dy[5], *dxn = dev(NULL, (size_t)(T * K) * 4);
                            for (int k = 0; k < 5; k++) {
                                dy[k] = dev(NULL, yb);
                                TT_OK(tuna_cuda_upload(g_gpu, dy[k], y0, yb));
                            }
                            const struct tuna_weight *ws[2] = {&g[n], &g[n]};
                            g_gops->matmul(g_gpu, dy[0], dx, &g[n], NULL, T);
                            g_gops->matmul_multi(g_gpu, 2, dy + 1, dx, ws, NULL, T);
                            g_gops->rmsnorm_matmul_glu(g_gpu, dy[3], dxn, dx, dnw, 1e-5f, &g[n], NULL, &g[n], NULL, T, 0);
                            g_gops->matmul_add(g_gpu, dy[4], dx, &g[n], NULL, T);
                            for (int k = 0; k < 5; k++) {
                                y[n][k] = malloc(yb);
                                back(y[n][k], dy[k], yb);
                                tuna_cuda_free(g_gpu, dy[k]);
                            }
                            tuna_cuda_free(g_gpu, dxn);
                        }
                        for (int k = 0; k < 5; k++) {
                            if (memcmp(y[0][k], y[1][k], yb) != 0) {
                                print_error("%s: GEMV %d at T=%lld differs between nested and float32 scales\n", what,
                                            k, (long long)T);
                                fail();
                            }
                            free(y[0][k]), free(y[1][k]);
                        }
                        free(x), free(nw), free(y0);
                        tuna_cuda_free(g_gpu, dx);
                        tuna_cuda_free(g_gpu, dnw);
                    }
                    for (int n = 0; n < 2; n++) {
                        q4desc_free(&d[n]);
                        tuna_cuda_free(g_gpu, out[n]);
                        free(host[n]);
                    }
                    cases++;
                }
                free(cpu);
                tuna_cuda_free(g_gpu, codes);
                tuna_q4_weight_free(&q);
            }
    assert_int_equal(cases, 2 * 3 * 4 * 3);
}

/* The batch-1 4-bit kernel's f16 products (q4.cu k_q4_h2) over the range of x: x scaled by 1e5
 * (past f16's 65504), 1e-7 (below its normal range) and 1 against the CPU at the bf16 tolerance;
 * odd row counts (an item's second row past the end) and K = 96, 1056 and 4128 (units of 1024
 * weights split between a pair of warps, the last one partial); two runs give the same bits. */
static void test_q4_range(void **state)
{
    (void)state;
    NEED_GPU();
    const int64_t shapes[][3] = {{33, 96, 7}, {257, 1056, 9}, {65, 4128, 3}};
    const float scales[] = {1.0f, 1e5f, 1e-7f};
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++)
        for (int type = 0; type < 2; type++) {
            const int64_t N = shapes[si][0], K = shapes[si][1], N2 = shapes[si][2];
            const bool nested = (si + (size_t)type) % 2 == 0;
            struct q4pair a, b;
            q4pair_new(&a, type, 1, N, K, true, nested);
            q4pair_new(&b, type, 1, N2, K, false, nested);
            for (size_t ci = 0; ci < sizeof scales / sizeof scales[0]; ci++) {
                char what[200];
                float *x = rnd((size_t)K);
                for (int64_t i = 0; i < K; i++) x[i] *= scales[ci];
                float *nw = rnd_norm_w(K);
                for (int64_t i = 0; i < K; i++) nw[i] *= scales[ci]; /* the normalized x scaled too */
                float *xn = malloc((size_t)K * 4);
                cpu_norm(xn, x, nw, 1, K);
                float *dx = dev(x, (size_t)K * 4), *dnw = dev(nw, (size_t)K * 4), *dxn = dev(NULL, (size_t)K * 4);
                float *ya = malloc((size_t)N * 4), *yb = malloc((size_t)N2 * 4), *t = malloc((size_t)N * 4);
                float *g = malloc((size_t)N * 4), *ga = malloc((size_t)N * 4), *gb = malloc((size_t)N * 4);
                float *da = dev(NULL, (size_t)N * 4), *db = dev(NULL, (size_t)N2 * 4);
                for (int norm = 0; norm < 2; norm++) {
                    const float *xin = norm ? xn : x;
                    /* q/k/v-like: two matrices in one launch */
                    g_cops->matmul(g_cpu, ya, xin, &a.c, a.bias, 1);
                    g_cops->matmul(g_cpu, yb, xin, &b.c, NULL, 1);
                    float *dys[2] = {da, db};
                    const struct tuna_weight *ws[2] = {&a.g, &b.g};
                    const float *bs[2] = {a.dbias, NULL};
                    for (int rep = 0; rep < 2; rep++) {
                        if (norm) g_gops->rmsnorm_matmul_multi(g_gpu, 2, dys, dxn, dx, dnw, 1e-5f, ws, bs, 1);
                        else g_gops->matmul_multi(g_gpu, 2, dys, dx, ws, bs, 1);
                        back(rep ? gb : ga, da, (size_t)N * 4);
                    }
                    snprintf(what, sizeof what, "%s %s x%g%s [%lld, %lld]", norm ? "rmsnorm_matmul_multi" : "matmul_multi",
                             type ? "FP4" : "NF4", (double)scales[ci], nested ? " nested" : "", (long long)N, (long long)K);
                    check(what, ga, ya, (size_t)N, 1e-2);
                    assert_memory_equal(ga, gb, (size_t)N * 4);
                    back(g, db, (size_t)N2 * 4);
                    check(what, g, yb, (size_t)N2, 1e-2);
                    /* gate/up + GLU (a as gate and up) */
                    g_cops->matmul(g_cpu, t, xin, &a.c, NULL, 1);
                    memcpy(g, t, (size_t)N * 4);
                    g_cops->glu(g_cpu, g, g, t, N, 0);
                    if (norm) g_gops->rmsnorm_matmul_glu(g_gpu, da, dxn, dx, dnw, 1e-5f, &a.g, NULL, &a.g, NULL, 1, 0);
                    else g_gops->matmul_glu(g_gpu, da, dx, &a.g, NULL, &a.g, NULL, 1, 0);
                    back(ga, da, (size_t)N * 4);
                    snprintf(what, sizeof what, "%s %s x%g [%lld, %lld]", norm ? "rmsnorm_matmul_glu" : "matmul_glu",
                             type ? "FP4" : "NF4", (double)scales[ci], (long long)N, (long long)K);
                    check(what, ga, g, (size_t)N, 2e-2);
                }
                /* into the residual */
                float *y0 = rnd((size_t)N);
                for (int64_t i = 0; i < N; i++) y0[i] *= scales[ci];
                TT_OK(tuna_cuda_upload(g_gpu, da, y0, (size_t)N * 4));
                g_cops->matmul(g_cpu, t, x, &a.c, a.bias, 1);
                g_cops->add(g_cpu, y0, t, N);
                g_gops->matmul_add(g_gpu, da, dx, &a.g, a.dbias, 1);
                back(ga, da, (size_t)N * 4);
                snprintf(what, sizeof what, "matmul_add %s x%g [%lld, %lld]", type ? "FP4" : "NF4", (double)scales[ci],
                         (long long)N, (long long)K);
                check(what, ga, y0, (size_t)N, 1e-2);
                free(y0), free(x), free(nw), free(xn), free(ya), free(yb), free(t), free(g), free(ga), free(gb);
                tuna_cuda_free(g_gpu, dx), tuna_cuda_free(g_gpu, dnw), tuna_cuda_free(g_gpu, dxn);
                tuna_cuda_free(g_gpu, da), tuna_cuda_free(g_gpu, db);
            }
            q4pair_free(&a);
            q4pair_free(&b);
        }
}

/* One run of the batch-1 fused 4-bit ops on the GPU (T = 1): q/k/v (3 matrices, + the norm), gate
 * (w[0]) and up + GLU (+ the norm), o (w[1]) added into y0; results in out[0..2] (q/k/v), out[3]
 * (GLU) and out[4] (added), host copies. */
static void q4s_run(const struct tuna_weight *const *ws, const struct tuna_weight *up, const float *const *dbias,
                    const int64_t *N, int64_t K, int64_t T, const float *dx, const float *dnw, const float *y0, int norm,
                    float **out)
{
    float *dy[3], *dxn = dev(NULL, (size_t)(T * K) * 4);
    for (int i = 0; i < 3; i++) dy[i] = dev(NULL, (size_t)(T * N[i]) * 4);
    if (norm) g_gops->rmsnorm_matmul_multi(g_gpu, 3, dy, dxn, dx, dnw, 1e-5f, ws, dbias, T);
    else g_gops->matmul_multi(g_gpu, 3, dy, dx, ws, dbias, T);
    for (int i = 0; i < 3; i++) {
        out[i] = malloc((size_t)(T * N[i]) * 4);
        back(out[i], dy[i], (size_t)(T * N[i]) * 4);
        tuna_cuda_free(g_gpu, dy[i]);
    }
    float *dg = dev(NULL, (size_t)(T * N[0]) * 4);
    if (norm) g_gops->rmsnorm_matmul_glu(g_gpu, dg, dxn, dx, dnw, 1e-5f, ws[0], dbias[0], up, NULL, T, 0);
    else g_gops->matmul_glu(g_gpu, dg, dx, ws[0], dbias[0], up, NULL, T, 0);
    out[3] = malloc((size_t)(T * N[0]) * 4);
    back(out[3], dg, (size_t)(T * N[0]) * 4);
    tuna_cuda_free(g_gpu, dg);
    float *da = dev(y0, (size_t)(T * N[1]) * 4);
    g_gops->matmul_add(g_gpu, da, dx, ws[1], dbias[1], T);
    out[4] = malloc((size_t)(T * N[1]) * 4);
    back(out[4], da, (size_t)(T * N[1]) * 4);
    tuna_cuda_free(g_gpu, da);
    if (norm) { /* the normalized rows every token's norm writes */
        out[5] = malloc((size_t)(T * K) * 4);
        back(out[5], dxn, (size_t)(T * K) * 4);
    } else {
        out[5] = NULL;
    }
    tuna_cuda_free(g_gpu, dxn);
}

/* The weights of test_q4_stream and test_q4_tokens: q/k/v of N[0..2] rows (k with a bias), the GLU's
 * up matrix of N[0] rows, and the same codes with the other form of scales (og, od). */
struct q4set {
    struct q4pair w[3], up;
    struct tuna_cuda_q4 od[4];
    struct tuna_weight og[4];
};

static void q4set_new(struct q4set *q, int type, const int64_t *N, int64_t K, bool nested)
{
    for (int i = 0; i < 3; i++) q4pair_new(&q->w[i], type, 1, N[i], K, i == 1, nested);
    q4pair_new(&q->up, type, 1, N[0], K, false, nested);
    for (int i = 0; i < 4; i++) {
        struct q4pair *p = i < 3 ? &q->w[i] : &q->up;
        q4desc_new(&q->od[i], &p->q, !nested, TUNA_DTYPE_BF16);
        q->og[i] = p->g;
        q->og[i].q4 = &q->od[i];
    }
}

static void q4set_free(struct q4set *q)
{
    for (int i = 0; i < 4; i++) q4desc_free(&q->od[i]);
    for (int i = 0; i < 3; i++) q4pair_free(&q->w[i]);
    q4pair_free(&q->up);
}

/* The CPU's answers to q4s_run for T tokens, in the same order: q/k/v of xin (x or its normalized
 * rows), the GLU of xin, and o of x added to y0; want[0..4] allocated here. */
static void q4s_want(const struct q4set *q, const int64_t *N, int64_t T, const float *xin, const float *x,
                     const float *y0, float **want)
{
    for (int i = 0; i < 3; i++) {
        want[i] = malloc((size_t)(T * N[i]) * 4);
        g_cops->matmul(g_cpu, want[i], xin, &q->w[i].c, q->w[i].bias, T);
    }
    float *u = malloc((size_t)(T * N[0]) * 4);
    want[3] = malloc((size_t)(T * N[0]) * 4);
    memcpy(want[3], want[0], (size_t)(T * N[0]) * 4);
    g_cops->matmul(g_cpu, u, xin, &q->up.c, NULL, T);
    g_cops->glu(g_cpu, want[3], want[3], u, T * N[0], 0);
    free(u);
    want[4] = malloc((size_t)(T * N[1]) * 4), u = malloc((size_t)(T * N[1]) * 4);
    memcpy(want[4], y0, (size_t)(T * N[1]) * 4);
    g_cops->matmul(g_cpu, u, x, &q->w[1].c, q->w[1].bias, T);
    g_cops->add(g_cpu, want[4], u, T * N[1]);
    free(u);
}

/* The batch-1 stream kernel (q4_stream.cu k_q4_s, TUNA_Q4_K=5), k_q4_v (TUNA_Q4_K=6, eighth session),
 * k_q4_h4 (TUNA_Q4_K=8, twelfth session: must give k_q4_h2's bits), k_q4_tc (TUNA_Q4_K=9, twentieth
 * session: the tensor cores, on the shapes with K % 128 == 0 and K >= 2048; k_q4_h4 on the others),
 * k_q4_sk (TUNA_Q4_K=7, twenty-first session: the units spread evenly over the warps, tiles cut
 * between warps and added in a fixed order; on the shapes with K % 256 == 0, k_q4_h4 on the others;
 * o with 7 rows is one tile cut 16 ways), k_q4_r (TUNA_Q4_RING=1, twenty-sixth session, q/k/v's default
 * since the thirtieth; the other passes run with TUNA_Q4_RING=0: k_q4_h4 fed by
 * bulk copies, on the shapes with K % 2048 == 0 where the GPU is sm_90+: must give k_q4_h2's bits
 * too, with its cap of one stage in flight per pair (the default since the thirty-first session)
 * and without it, TUNA_Q4R_CAP=0) and k_q4_h2 (TUNA_Q4_K=4) against
 * the CPU at T = 1 (bf16 checkpoints: 16-bit compute): q/k/v (+ the norm), gate/up + GLU (+ the
 * norm), o into the residual. Shapes: row counts that are multiples of no tile, matrices that end
 * inside a block's range, several tiles per block so the stage ring wraps (3000 rows), K = 4096
 * (8 warps in 2 row groups), 14336 (one group, 2 chunks per lane), 11008 (scale rows of 172
 * bytes), 192 and 1088 (most lanes idle; rows of 3 and 17 nested scale bytes: copies that start
 * off a 16-byte boundary); x scaled by 1e5 and 1e-7 on two shapes. Per kernel: two runs give the
 * same bits, and float32 and nested scales give the same bits. The stream kernel must have run
 * on a GPU that has it (compute capability 9.0+). */
static void test_q4_stream(void **state)
{
    (void)state;
    NEED_GPU();
    const int64_t shapes[][4] = {{300, 4096, 100, 37}, {70, 14336, 33, 5},  {129, 192, 3, 64},
                                 {1000, 1088, 17, 9},  {41, 11008, 2, 3},   {3000, 4096, 7, 64}};
    const float xs[] = {1.0f, 1.0f, 1e5f, 1e-7f, 1.0f, 1.0f};
    const char *env = getenv("TUNA_Q4_K");
    char *saved = env ? strdup(env) : NULL;
    const long l0 = tuna_cuda_q4_stream_launches(g_gpu), h0 = tuna_cuda_q4_h4_launches();
    const long r0 = tuna_cuda_q4_r_launches(g_gpu);
    const char *envr = getenv("TUNA_Q4_RING");
    char *saved_r = envr ? strdup(envr) : NULL;
    setenv("TUNA_Q4_RING", "0", 1); /* k_q4_h4 for q/k/v too (k_q4_r is their default on sm_90+) */
    int ring_shapes = 0;
    const long c0 = tuna_cuda_q4_tc_launches(), s0 = tuna_cuda_q4_sk_launches();
    int tc_shapes = 0, sk_shapes = 0;
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
        const int64_t K = shapes[si][1], N[3] = {shapes[si][0], shapes[si][2], shapes[si][3]};
        if (K % 128 == 0 && K >= 2048) tc_shapes++;
        if (K % 256 == 0) sk_shapes++;
        if (K % 2048 == 0) ring_shapes++;
        const int type = (int)(si % 2);
        const bool nested = si % 3 != 1;
        struct q4set qs;
        q4set_new(&qs, type, N, K, nested);
        struct q4pair *w = qs.w, *upp = &qs.up;
        struct tuna_weight *og = qs.og;
        float *x = rnd((size_t)K), *nw = rnd_norm_w(K), *xn = malloc((size_t)K * 4);
        for (int64_t i = 0; i < K; i++) x[i] *= xs[si];
        cpu_norm(xn, x, nw, 1, K);
        float *y0 = rnd((size_t)N[1]);
        float *dx = dev(x, (size_t)K * 4), *dnw = dev(nw, (size_t)K * 4);
        const struct tuna_weight *ws[3] = {&w[0].g, &w[1].g, &w[2].g}, *wo[3] = {&og[0], &og[1], &og[2]};
        const float *dbias[3] = {w[0].dbias, w[1].dbias, w[2].dbias};
        for (int norm = 0; norm < 2; norm++) {
            float *want[5]; /* the CPU: q/k/v, GLU, o added */
            q4s_want(&qs, N, 1, norm ? xn : x, x, y0, want);
            float *ref[5] = {NULL, NULL, NULL, NULL, NULL}; /* k_q4_h2's outputs: k_q4_h4 must give its bits */
            /* 10: k_q4_r (TUNA_Q4_K=8 TUNA_Q4_RING=1); 11: TUNA_Q4_K=8 with TUNA_Q4_RING unset (the
             * default: k_q4_r for q/k/v only); 12: k_q4_r everywhere without its cap of one stage in
             * flight per pair (TUNA_Q4R_CAP=0: every free stage copied at once) */
            for (int km = 4; km <= 12; km++) {
                const char kms[2] = {(char)('0' + (km >= 10 ? 8 : km)), 0};
                setenv("TUNA_Q4_K", kms, 1);
                if (km == 10 || km == 12) setenv("TUNA_Q4_RING", "1", 1);
                if (km == 11) unsetenv("TUNA_Q4_RING");
                if (km == 12) setenv("TUNA_Q4R_CAP", "0", 1);
                float *got[6], *again[6], *other[6];
                q4s_run(ws, &upp->g, dbias, N, K, 1, dx, dnw, y0, norm, got);
                q4s_run(ws, &upp->g, dbias, N, K, 1, dx, dnw, y0, norm, again);
                q4s_run(wo, &og[3], dbias, N, K, 1, dx, dnw, y0, norm, other);
                free(got[5]), free(again[5]), free(other[5]);
                for (int o = 0; o < 5; o++) {
                    const int64_t n = o < 3 ? N[o] : o == 3 ? N[0] : N[1];
                    char what[200];
                    snprintf(what, sizeof what, "TUNA_Q4_K=%d %s %s%s output %d [%lld, %lld] x%g", km,
                             o < 3 ? (norm ? "rmsnorm_matmul_multi" : "matmul_multi")
                                   : o == 3 ? (norm ? "rmsnorm_matmul_glu" : "matmul_glu") : "matmul_add",
                             type ? "FP4" : "NF4", nested ? " nested" : "", o, (long long)n, (long long)K,
                             (double)xs[si]);
                    check(what, got[o], want[o], (size_t)n, o == 3 ? 2e-2 : 1e-2);
                    if (memcmp(got[o], again[o], (size_t)n * 4) != 0) {
                        print_error("%s: two runs differ\n", what);
                        fail();
                    }
                    if (memcmp(got[o], other[o], (size_t)n * 4) != 0) {
                        print_error("%s: float32 and nested scales differ\n", what);
                        fail();
                    }
                    if ((km == 8 || km >= 10) && memcmp(got[o], ref[o], (size_t)n * 4) != 0) {
                        print_error("%s: %s and k_q4_h2 differ\n", what,
                                    km == 8    ? "k_q4_h4"
                                    : km == 10 ? "k_q4_r"
                                    : km == 12 ? "k_q4_r without its cap"
                                               : "the default kernels");
                        fail();
                    }
                    if (km == 4) ref[o] = got[o];
                    else free(got[o]);
                    free(again[o]), free(other[o]);
                }
            }
            setenv("TUNA_Q4_RING", "0", 1);
            unsetenv("TUNA_Q4R_CAP");
            for (int o = 0; o < 5; o++) free(want[o]), free(ref[o]);
        }
        free(x), free(nw), free(xn), free(y0);
        tuna_cuda_free(g_gpu, dx), tuna_cuda_free(g_gpu, dnw);
        q4set_free(&qs);
    }
    if (saved) setenv("TUNA_Q4_K", saved, 1);
    else unsetenv("TUNA_Q4_K");
    free(saved);
    if (saved_r) setenv("TUNA_Q4_RING", saved_r, 1);
    else unsetenv("TUNA_Q4_RING");
    free(saved_r);
    const long l1 = tuna_cuda_q4_stream_launches(g_gpu), r1 = tuna_cuda_q4_r_launches(g_gpu);
    /* 6 shapes x 2 norms x 3 runs x 3 launches (q/k/v, GLU, o) */
    if (l0 >= 0 && l1 - l0 != 6 * 2 * 3 * 3) {
        print_error("k_q4_s ran %ld times, expected %d\n", l1 - l0, 6 * 2 * 3 * 3);
        fail();
    }
    /* k_q4_r: the shapes with K % 2048 == 0 where the GPU has it (sm_90+), for all three launches
     * with TUNA_Q4_RING=1 (twice: with and without its cap) and for q/k/v alone by default */
    const int ring_run = r0 >= 0 ? ring_shapes : 0;
    if (r0 >= 0 && r1 - r0 != ring_run * 2 * 3 * 7) {
        print_error("k_q4_r ran %ld times, expected %d\n", r1 - r0, ring_run * 2 * 3 * 7);
        fail();
    }
    /* k_q4_h4: every shape with TUNA_Q4_K=8, those k_q4_tc does not take with 9, those k_q4_sk does
     * not take with 7, those k_q4_r does not take in the two passes with TUNA_Q4_RING=1, and by
     * default GLU and o everywhere and q/k/v where k_q4_r does not take it */
    const long h1 = tuna_cuda_q4_h4_launches(), c1 = tuna_cuda_q4_tc_launches(), s1 = tuna_cuda_q4_sk_launches();
    const int h4_want =
        (30 - tc_shapes - sk_shapes - 2 * ring_run) * 2 * 3 * 3 + 6 * 2 * 3 * 2 + (6 - ring_run) * 2 * 3;
    if (h1 - h0 != h4_want) {
        print_error("k_q4_h4 ran %ld times, expected %d\n", h1 - h0, h4_want);
        fail();
    }
    if (s1 - s0 != sk_shapes * 2 * 3 * 3) {
        print_error("k_q4_sk ran %ld times, expected %d\n", s1 - s0, sk_shapes * 2 * 3 * 3);
        fail();
    }
    if (c1 - c0 != tc_shapes * 2 * 3 * 3) {
        print_error("k_q4_tc ran %ld times, expected %d\n", c1 - c0, tc_shapes * 2 * 3 * 3);
        fail();
    }
}

/* k_q4_tc at T = 2..24 (twentieth session: the default 4-bit path at T = 2..8 where it fits, up to 24
 * with TUNA_Q4_TC_MAXT=24 as here (k_q4_mm takes T > 8 by default since the twenty-first); 8 tokens per
 * launch where their x fits in shared memory (K = 4096; 11008 at T = 5), else 4) against the CPU,
 * each token on its own (the tokens' x scaled by 1, 1e3 and 1e-4 in turn: each has its own f16
 * scale): q/k/v (+ the norm, and the normalized rows it writes) and o into the residual as one vector,
 * gate/up + GLU (+ the norm); K = 4096, 14336, 11008; two runs give the same bits, float32 and
 * nested scales give the same bits, and the kernel ran ceil(T / tokens per launch) times per op. */
static void test_q4_tokens(void **state)
{
    (void)state;
    NEED_GPU();
    const int64_t shapes[][4] = {{300, 4096, 100, 37}, {70, 14336, 33, 5}, {41, 11008, 2, 3}};
    const int64_t Ts[] = {2, 3, 4, 5, 8, 12, 24};
    const char *env = getenv("TUNA_Q4_K"), *envm = getenv("TUNA_Q4_TC_MAXT");
    char *saved = env ? strdup(env) : NULL, *savedm = envm ? strdup(envm) : NULL;
    unsetenv("TUNA_Q4_K"); /* the default */
    setenv("TUNA_Q4_TC_MAXT", "24", 1);
    long want_launches = 0;
    const long c0 = tuna_cuda_q4_tc_launches();
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
        const int64_t K = shapes[si][1], N[3] = {shapes[si][0], shapes[si][2], shapes[si][3]};
        const int type = (int)(si % 2);
        const bool nested = si != 1;
        struct q4set qs;
        q4set_new(&qs, type, N, K, nested);
        struct q4pair *w = qs.w, *upp = &qs.up;
        struct tuna_weight *og = qs.og;
        const struct tuna_weight *ws[3] = {&w[0].g, &w[1].g, &w[2].g}, *wo[3] = {&og[0], &og[1], &og[2]};
        const float *dbias[3] = {w[0].dbias, w[1].dbias, w[2].dbias};
        float *nw = rnd_norm_w(K), *dnw = dev(nw, (size_t)K * 4);
        for (size_t ti = 0; ti < sizeof Ts / sizeof Ts[0]; ti++) {
            const int64_t T = Ts[ti];
            if (T > tuna_cuda_q4_tc_max_t()) continue; /* the dequantize + GEMM path */
            float *x = rnd((size_t)(T * K)), *xn = malloc((size_t)(T * K) * 4), *y0 = rnd((size_t)(T * N[1]));
            for (int64_t t = 0; t < T; t++)
                for (int64_t i = 0; i < K; i++) x[t * K + i] *= t % 3 == 1 ? 1e3f : t % 3 == 2 ? 1e-4f : 1.0f;
            cpu_norm(xn, x, nw, T, K);
            float *dx = dev(x, (size_t)(T * K) * 4);
            for (int norm = 0; norm < 2; norm++) {
                float *want[5];
                q4s_want(&qs, N, T, norm ? xn : x, x, y0, want);
                float *got[6], *again[6], *other[6];
                q4s_run(ws, &upp->g, dbias, N, K, T, dx, dnw, y0, norm, got);
                q4s_run(ws, &upp->g, dbias, N, K, T, dx, dnw, y0, norm, again);
                q4s_run(wo, &og[3], dbias, N, K, T, dx, dnw, y0, norm, other);
                const int per = tuna_cuda_q4_tc_tokens(g_gpu, K, T);
                assert_true(per > 0);
                want_launches += 3 * 3 * ((T + per - 1) / per);
                /* q/k/v and the added o per token as one vector (k and o have as few as 2 rows: alone,
                 * a token whose few sums happen to be small would make the relative error meaningless) */
                const int64_t nv = N[0] + N[1] + N[2] + N[1];
                float *gq = malloc((size_t)nv * 4), *wq = malloc((size_t)nv * 4);
                for (int64_t t = 0; t < T; t++) {
                    int64_t at = 0;
                    for (int o = 0; o < 5; o++) {
                        if (o == 3) continue;
                        const int64_t n = o < 3 ? N[o] : N[1];
                        memcpy(gq + at, got[o] + t * n, (size_t)n * 4);
                        memcpy(wq + at, want[o] + t * n, (size_t)n * 4);
                        at += n;
                    }
                    char what[200];
                    snprintf(what, sizeof what, "%s %s%s q/k/v and matmul_add token %lld of %lld [%lld, %lld]",
                             norm ? "rmsnorm_matmul_multi" : "matmul_multi", type ? "FP4" : "NF4",
                             nested ? " nested" : "", (long long)t, (long long)T, (long long)nv, (long long)K);
                    check(what, gq, wq, (size_t)nv, 1e-2);
                }
                free(gq), free(wq);
                for (int o = 0; o < 6; o++) {
                    if (o == 5 && !norm) break;
                    const int64_t n = o < 3 ? N[o] : o == 3 ? N[0] : o == 4 ? N[1] : K;
                    for (int64_t t = 0; t < T && (o == 3 || o == 5); t++) { /* the others above */
                        char what[200];
                        snprintf(what, sizeof what, "%s %s%s token %lld of %lld [%lld, %lld]",
                                 o == 5 ? "rmsnorm_matmul_multi's normalized rows"
                                        : (norm ? "rmsnorm_matmul_glu" : "matmul_glu"),
                                 type ? "FP4" : "NF4", nested ? " nested" : "", (long long)t, (long long)T,
                                 (long long)n, (long long)K);
                        check(what, got[o] + t * n, o == 5 ? xn + t * K : want[o] + t * n, (size_t)n,
                              o == 3 ? 2e-2 : o == 5 ? 1e-5 : 1e-2);
                    }
                    if (memcmp(got[o], again[o], (size_t)(T * n) * 4) != 0) {
                        print_error("T=%lld output %d: two runs differ\n", (long long)T, o);
                        fail();
                    }
                    if (memcmp(got[o], other[o], (size_t)(T * n) * 4) != 0) {
                        print_error("T=%lld output %d: float32 and nested scales differ\n", (long long)T, o);
                        fail();
                    }
                }
                for (int o = 0; o < 6; o++) free(got[o]), free(again[o]), free(other[o]);
                for (int o = 0; o < 5; o++) free(want[o]);
            }
            free(x), free(xn), free(y0);
            tuna_cuda_free(g_gpu, dx);
        }
        free(nw);
        tuna_cuda_free(g_gpu, dnw);
        q4set_free(&qs);
    }
    if (saved) setenv("TUNA_Q4_K", saved, 1);
    free(saved);
    if (savedm) setenv("TUNA_Q4_TC_MAXT", savedm, 1);
    else unsetenv("TUNA_Q4_TC_MAXT");
    free(savedm);
    const long c1 = tuna_cuda_q4_tc_launches();
    if (c1 - c0 != want_launches) {
        print_error("k_q4_tc ran %ld times, expected %ld\n", c1 - c0, want_launches);
        fail();
    }
}

static float *kv_as_f32(const void *cache, enum tuna_dtype dt, size_t n)
{
    float *f = malloc(n * 4 + 4);
    assert_non_null(f);
    tuna_convert_to_f32(dt, cache, f, n);
    return f;
}

/* rope_kv_store against the CPU's rmsnorm (q/k norm), rope, rope, kv_store (tolerance: sin/cos
 * of two libraries) and against the GPU's own plain ops (bit for bit, the fused op with an L2
 * prefetch hint pending): three cache dtypes, partial rotary, GQA, q/k norm on and off,
 * scattered slots. */
static void test_rope_kv_store(void **state)
{
    (void)state;
    NEED_GPU();
    const int64_t heads[][4] = {{8, 2, 64, 64}, {4, 4, 36, 24}, {6, 2, 128, 128}, {2, 1, 256, 256}};
    const enum tuna_dtype kdt[] = {TUNA_DTYPE_F32, TUNA_DTYPE_BF16, TUNA_DTYPE_F16};
    const int64_t Ts[] = {1, 3, 17};
    const int64_t NS = 64;
    for (size_t hi = 0; hi < sizeof heads / sizeof heads[0]; hi++)
        for (size_t ki = 0; ki < 3; ki++)
            for (size_t tt = 0; tt < 3; tt++)
                for (int qk = 0; qk < 2; qk++) {
                    const int64_t H = heads[hi][0], Hkv = heads[hi][1], D = heads[hi][2], rot = heads[hi][3];
                    const int64_t T = Ts[tt], half = rot / 2, HD = H * D, KD = Hkv * D;
                    const enum tuna_dtype dt = kdt[ki];
                    const size_t cbytes = tuna_dtype_nbytes(dt, (uint64_t)(NS * KD));
                    float *inv = malloc((size_t)(half + 1) * 4);
                    for (int64_t i = 0; i < half; i++) inv[i] = (float)pow(10000.0, -2.0 * (double)i / (double)rot);
                    int64_t pos[17], slot[17];
                    for (int64_t t = 0; t < T; t++) {
                        pos[t] = (t * 977 + 13 * (int64_t)hi) % 4000;
                        slot[t] = (t * 7 + 5) % NS;
                    }
                    const float af = qk ? 0.9f : 1.0f;
                    float *q = rnd((size_t)(T * HD)), *k = rnd((size_t)(T * KD)), *v = rnd((size_t)(T * KD));
                    float *qn = qk ? rnd_norm_w(D) : NULL, *kn = qk ? rnd_norm_w(D) : NULL;
                    float *dqn = qn ? dev(qn, (size_t)D * 4) : NULL, *dkn = kn ? dev(kn, (size_t)D * 4) : NULL;
                    /* CPU reference */
                    void *kc = calloc(1, cbytes), *vc = calloc(1, cbytes);
                    float *qc = malloc((size_t)(T * HD) * 4), *kcpu = malloc((size_t)(T * KD) * 4);
                    memcpy(qc, q, (size_t)(T * HD) * 4);
                    memcpy(kcpu, k, (size_t)(T * KD) * 4);
                    if (qn) g_cops->rmsnorm(g_cpu, qc, qc, qn, T * H, D, 1e-6f);
                    if (kn) g_cops->rmsnorm(g_cpu, kcpu, kcpu, kn, T * Hkv, D, 1e-6f);
                    g_cops->rope(g_cpu, qc, pos, T, H, D, rot, inv, af);
                    g_cops->rope(g_cpu, kcpu, pos, T, Hkv, D, rot, inv, af);
                    g_cops->kv_store(g_cpu, kc, vc, dt, kcpu, v, slot, T, KD);
                    /* the GPU: fused (1) and the plain ops (0) */
                    float *gq[2], *gk[2];
                    void *gkc[2], *gvc[2];
                    for (int f = 0; f < 2; f++) {
                        float *dq = dev(q, (size_t)(T * HD) * 4), *dk = dev(k, (size_t)(T * KD) * 4);
                        float *dv = dev(v, (size_t)(T * KD) * 4);
                        void *dkc = dev(NULL, cbytes), *dvc = dev(NULL, cbytes);
                        void *zero = calloc(1, cbytes);
                        TT_OK(tuna_cuda_upload(g_gpu, dkc, zero, cbytes));
                        TT_OK(tuna_cuda_upload(g_gpu, dvc, zero, cbytes));
                        free(zero);
                        if (f) {
                            /* an L2 prefetch hint pending (main sets TUNA_L2PF=2: this kernel issues it):
                             * no effect on the bits */
                            if (g_gops->prefetch_l2) g_gops->prefetch_l2(g_gpu, dq, (size_t)(T * HD) * 4);
                            g_gops->rope_kv_store(g_gpu, dq, dk, dv, dqn, dkn, 1e-6f, dkc, dvc, dt, pos, slot, T, H, Hkv, D,
                                                  rot, inv, af);
                        } else {
                            if (dqn) g_gops->rmsnorm(g_gpu, dq, dq, dqn, T * H, D, 1e-6f);
                            if (dkn) g_gops->rmsnorm(g_gpu, dk, dk, dkn, T * Hkv, D, 1e-6f);
                            g_gops->rope(g_gpu, dq, pos, T, H, D, rot, inv, af);
                            g_gops->rope(g_gpu, dk, pos, T, Hkv, D, rot, inv, af);
                            g_gops->kv_store(g_gpu, dkc, dvc, dt, dk, dv, slot, T, KD);
                        }
                        gq[f] = malloc((size_t)(T * HD) * 4);
                        gk[f] = malloc((size_t)(T * KD) * 4);
                        gkc[f] = malloc(cbytes);
                        gvc[f] = malloc(cbytes);
                        back(gq[f], dq, (size_t)(T * HD) * 4);
                        back(gk[f], dk, (size_t)(T * KD) * 4);
                        back(gkc[f], dkc, cbytes);
                        back(gvc[f], dvc, cbytes);
                        tuna_cuda_free(g_gpu, dq), tuna_cuda_free(g_gpu, dk), tuna_cuda_free(g_gpu, dv);
                        tuna_cuda_free(g_gpu, dkc), tuna_cuda_free(g_gpu, dvc);
                    }
                    char what[160];
                    snprintf(what, sizeof what, "rope_kv_store H=%lld Hkv=%lld D=%lld rot=%lld T=%lld %s%s", (long long)H,
                             (long long)Hkv, (long long)D, (long long)rot, (long long)T, tuna_dtype_name(dt),
                             qk ? " q/k norm" : "");
                    if (memcmp(gq[0], gq[1], (size_t)(T * HD) * 4) || memcmp(gk[0], gk[1], (size_t)(T * KD) * 4) ||
                        memcmp(gkc[0], gkc[1], cbytes) || memcmp(gvc[0], gvc[1], cbytes)) {
                        print_error("%s: differs from the GPU's plain ops\n", what);
                        fail();
                    }
                    const double tol = dt == TUNA_DTYPE_F32 ? 1e-5 : 1e-2;
                    check(what, gq[1], qc, (size_t)(T * HD), 1e-5);
                    check(what, gk[1], kcpu, (size_t)(T * KD), 1e-5);
                    float *a = kv_as_f32(gkc[1], dt, (size_t)(NS * KD)), *b = kv_as_f32(kc, dt, (size_t)(NS * KD));
                    check(what, a, b, (size_t)(NS * KD), tol);
                    free(a), free(b);
                    a = kv_as_f32(gvc[1], dt, (size_t)(NS * KD)), b = kv_as_f32(vc, dt, (size_t)(NS * KD));
                    check(what, a, b, (size_t)(NS * KD), 1e-6);
                    free(a), free(b);
                    for (int f = 0; f < 2; f++) free(gq[f]), free(gk[f]), free(gkc[f]), free(gvc[f]);
                    free(q), free(k), free(v), free(qn), free(kn), free(inv), free(kc), free(vc), free(qc), free(kcpu);
                    tuna_cuda_free(g_gpu, dqn);
                    tuna_cuda_free(g_gpu, dkn);
                }
}

/* rmsnorm_qkv_rope_kv (the q/k/v GEMV with RoPE and the KV store in its epilogue) against the
 * CPU's rmsnorm, three matmuls, rope of q and k and kv_store: 16-bit weights at T = 1, 2 (the
 * fused kernel), T = 3 and float32 weights (the two-op fallback), partial rotary (fallback),
 * three cache dtypes, biases, GQA, scattered slots, K that is no multiple of the split. */
static void test_rmsnorm_qkv_rope_kv(void **state)
{
    (void)state;
    NEED_GPU();
    /* H, Hkv, D, rot, K */
    const int64_t heads[][5] = {{4, 2, 64, 64, 256}, {8, 2, 128, 128, 2056}, {3, 1, 36, 36, 72}, {4, 4, 64, 32, 136}};
    const enum tuna_dtype kdt[] = {TUNA_DTYPE_F32, TUNA_DTYPE_BF16, TUNA_DTYPE_F16};
    const int64_t Ts[] = {1, 2, 3};
    const int64_t NS = 32;
    for (size_t hi = 0; hi < sizeof heads / sizeof heads[0]; hi++)
        for (size_t wi = 0; wi < 3; wi++)
            for (size_t tt = 0; tt < 3; tt++) {
                const int64_t H = heads[hi][0], Hkv = heads[hi][1], D = heads[hi][2], rot = heads[hi][3];
                const int64_t K = heads[hi][4], T = Ts[tt], half = rot / 2, HD = H * D, KD = Hkv * D;
                const enum tuna_dtype dt = kdt[(hi + tt + wi) % 3];
                const size_t cbytes = tuna_dtype_nbytes(dt, (uint64_t)(NS * KD));
                struct wpair w[3];
                const int64_t N[3] = {HD, KD, KD};
                for (int i = 0; i < 3; i++) wpair_new(&w[i], k_types[wi], N[i], K, (hi & 1) != 0);
                float *inv = malloc((size_t)half * 4);
                for (int64_t i = 0; i < half; i++) inv[i] = (float)pow(500000.0, -2.0 * (double)i / (double)rot);
                int64_t pos[3], slot[3];
                for (int64_t t = 0; t < T; t++) {
                    pos[t] = (t * 977 + 131 * (int64_t)hi) % 3000;
                    slot[t] = (t * 11 + 3 + (int64_t)wi) % NS;
                }
                const float af = hi == 2 ? 0.9f : 1.0f;
                float *x = rnd((size_t)(T * K)), *nw = rnd_norm_w(K);
                /* CPU reference */
                float *xn = malloc((size_t)(T * K) * 4), *yc[3];
                cpu_norm(xn, x, nw, T, K);
                for (int i = 0; i < 3; i++) {
                    yc[i] = malloc((size_t)(T * N[i]) * 4);
                    g_cops->matmul(g_cpu, yc[i], xn, &w[i].c, w[i].bias, T);
                }
                g_cops->rope(g_cpu, yc[0], pos, T, H, D, rot, inv, af);
                g_cops->rope(g_cpu, yc[1], pos, T, Hkv, D, rot, inv, af);
                void *kc = calloc(1, cbytes), *vc = calloc(1, cbytes);
                g_cops->kv_store(g_cpu, kc, vc, dt, yc[1], yc[2], slot, T, KD);
                /* the GPU */
                float *dx = dev(x, (size_t)(T * K) * 4), *dnw = dev(nw, (size_t)K * 4);
                float *dxn = dev(NULL, (size_t)(T * K) * 4), *dy[3];
                for (int i = 0; i < 3; i++) dy[i] = dev(NULL, (size_t)(T * N[i]) * 4);
                void *zero = calloc(1, cbytes), *dkc = dev(zero, cbytes), *dvc = dev(zero, cbytes);
                free(zero);
                const struct tuna_weight *ws[3] = {&w[0].g, &w[1].g, &w[2].g};
                const float *bs[3] = {w[0].dbias, w[1].dbias, w[2].dbias};
                g_gops->rmsnorm_qkv_rope_kv(g_gpu, dy, dxn, dx, dnw, 1e-5f, ws, bs, dkc, dvc, dt, pos, slot, T, H, Hkv,
                                            D, rot, inv, af);
                char what[200];
                snprintf(what, sizeof what,
                         "rmsnorm_qkv_rope_kv %s weights, H=%lld Hkv=%lld D=%lld rot=%lld K=%lld T=%lld, %s cache",
                         tuna_dtype_name(k_types[wi]), (long long)H, (long long)Hkv, (long long)D, (long long)rot,
                         (long long)K, (long long)T, tuna_dtype_name(dt));
                const double tol = tol_for(k_types[wi], T);
                float *g = malloc((size_t)(T * (HD > K ? HD : K)) * 4);
                back(g, dxn, (size_t)(T * K) * 4);
                check(what, g, xn, (size_t)(T * K), 1e-6);
                for (int i = 0; i < 3; i++) {
                    back(g, dy[i], (size_t)(T * N[i]) * 4);
                    check(what, g, yc[i], (size_t)(T * N[i]), 2 * tol);
                }
                void *hk = malloc(cbytes), *hv = malloc(cbytes);
                back(hk, dkc, cbytes);
                back(hv, dvc, cbytes);
                const double ctol = dt == TUNA_DTYPE_F32 ? 2 * tol : 1e-2;
                float *a = kv_as_f32(hk, dt, (size_t)(NS * KD)), *b = kv_as_f32(kc, dt, (size_t)(NS * KD));
                check(what, a, b, (size_t)(NS * KD), ctol);
                free(a), free(b);
                a = kv_as_f32(hv, dt, (size_t)(NS * KD)), b = kv_as_f32(vc, dt, (size_t)(NS * KD));
                check(what, a, b, (size_t)(NS * KD), ctol);
                free(a), free(b), free(hk), free(hv), free(g);
                for (int i = 0; i < 3; i++) {
                    free(yc[i]);
                    tuna_cuda_free(g_gpu, dy[i]);
                    wpair_free(&w[i]);
                }
                free(x), free(nw), free(xn), free(inv), free(kc), free(vc);
                tuna_cuda_free(g_gpu, dx), tuna_cuda_free(g_gpu, dnw), tuna_cuda_free(g_gpu, dxn);
                tuna_cuda_free(g_gpu, dkc), tuna_cuda_free(g_gpu, dvc);
            }
}

int main(void)
{
    /* the opt-in L2 prefetches run in every case (pdl.cu, fused.cu): they must change no result */
    setenv("TUNA_L2PF", "2", 0);
    setenv("TUNA_GEMV_L2SMALL", "1", 0);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_matmul_multi),
        cmocka_unit_test(test_matmul_glu),
        cmocka_unit_test(test_matmul_add),
        cmocka_unit_test(test_rmsnorm_matmul_multi),
        cmocka_unit_test(test_rmsnorm_matmul_glu),
        cmocka_unit_test(test_q4_grouped),
        cmocka_unit_test(test_q4_nested_bits),
        cmocka_unit_test(test_q4_range),
        cmocka_unit_test(test_q4_stream),
        cmocka_unit_test(test_q4_tokens),
        cmocka_unit_test(test_rope_kv_store),
        cmocka_unit_test(test_rmsnorm_qkv_rope_kv),
        cmocka_unit_test(test_q4_mm), /* last: the tests before it keep their random inputs */
    };
    return cmocka_run_group_tests(tests, ct_ops_setup, ct_ops_teardown);
}
