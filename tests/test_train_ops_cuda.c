/* test_train_ops_cuda.c — every op of the CUDA training table (backend/train_ops.h) against the
 * CPU table (the reference) on random inputs with odd sizes, multiples of no tile or block.
 * Gradient outputs start from random values, so the "accumulate, never overwrite" contract is
 * checked too. Tolerances: float32 paths 1e-5 relative (the CPU sums in double); GEMMs with
 * 16-bit weights round dy to 16 bits: 1e-2 (bf16) / 2e-3 (f16); TF32 attention 1e-2.
 * Skips without a GPU. */
#define CT_RNG_SEED 0x2545F4914F6CDD1Dull
#include "cuda_testutil.h"

#include "backend/train_ops.h"
#include "core/dtype.h"
#include "io/hf_config.h"
#include "quant/nf4.h"

static const struct tuna_train_ops *g_ct, *g_gt;

static float *copyf(const float *src, size_t n)
{
    float *p = malloc(n * sizeof(float) + 16);
    memcpy(p, src, n * sizeof(float));
    return p;
}

/* the device array, downloaded into a new host array */
static float *back_new(const void *d, size_t n)
{
    float *h = malloc(n * sizeof(float) + 16);
    back(h, d, n * sizeof(float));
    return h;
}

/* check() with the error printed for every op */
static void check_print(const char *what, const float *got, const float *want, size_t n, double tol)
{
    printf("  %-60s rel %.2e (tol %.0e)\n", what, tt_rel_err(got, want, n), tol);
    check(what, got, want, n, tol);
}

/* the GPU result of `d` (n floats) against the CPU's `h`, then both freed */
static void check_dev(const char *what, void *d, float *h, size_t n, double tol)
{
    float *g = back_new(d, n);
    check_print(what, g, h, n, tol);
    free(g);
    free(h);
    tuna_cuda_free(g_gpu, d);
}

static int setup(void **state)
{
    (void)state;
    g_ct = tuna_cpu_train_ops();
    g_gt = tuna_cuda_train_ops();
    return ct_backends_new();
}

static int teardown(void **state)
{
    (void)state;
    ct_backends_free();
    return 0;
}

/* dx[T,K] += dy[T,N] W for f32, bf16, f16 and NF4 (f32 and bf16 compute) weights */
static void test_matmul_backward(void **state)
{
    (void)state;
    NEED_GPU();
    const int64_t Ts[] = {1, 9, 33};
    const int64_t NK[][2] = {{37, 40}, {129, 64}, {300, 136}};
    for (int kind = 0; kind < 5; kind++) {
        for (size_t s = 0; s < 3; s++) {
            const int64_t N = NK[s][0], K = NK[s][1];
            float *wf = rnd((size_t)(N * K));
            struct tuna_weight wc, wg;
            struct tuna_q4_weight q;
            struct tuna_cuda_q4 d;
            void *wh = NULL;
            double tol = 1e-5;
            if (kind < 3) {
                enum tuna_dtype t = kind == 0 ? TUNA_DTYPE_F32 : kind == 1 ? TUNA_DTYPE_BF16 : TUNA_DTYPE_F16;
                size_t bytes = tuna_dtype_nbytes(t, (uint64_t)(N * K));
                wh = malloc(bytes);
                tuna_convert_from_f32(t, wf, wh, (size_t)(N * K));
                wc = (struct tuna_weight){t, N, K, wh, NULL, 0};
                wg = (struct tuna_weight){t, N, K, dev(wh, bytes), NULL, 0};
                tol = kind == 1 ? 1e-2 : kind == 2 ? 2e-3 : 1e-5;
            } else {
                TT_OK(tuna_q4_quantize(wf, TUNA_DTYPE_F32, N, K, TUNA_Q4_NF4, 64, true, TUNA_DTYPE_F32, &q));
                wc = (struct tuna_weight){TUNA_DTYPE_NF4, N, K, q.codes, &q, 0};
                tuna_q4_dequant_table(q.type, d.lut);
                d.blocksize = q.blocksize;
                d.round_mode = 0;
                d.prefill = kind == 3 ? TUNA_DTYPE_F32 : TUNA_DTYPE_BF16;
                d.absmax = dev(q.absmax, (size_t)q.n_blocks * 4);
                wg = (struct tuna_weight){TUNA_DTYPE_NF4, N, K, dev(q.codes, (size_t)((N * K + 1) / 2)), &d, 0};
                tol = kind == 3 ? 1e-5 : 1e-2;
            }
            for (size_t ti = 0; ti < 3; ti++) {
                const int64_t T = Ts[ti];
                float *dy = rnd((size_t)(T * N)), *dx = rnd((size_t)(T * K));
                float *ddy = dev(dy, (size_t)(T * N) * 4), *ddx = dev(dx, (size_t)(T * K) * 4);
                g_ct->matmul_backward(g_cpu, dx, dy, &wc, T);
                g_gt->matmul_backward(g_gpu, ddx, ddy, &wg, T);
                char what[128];
                snprintf(what, sizeof what, "matmul_backward %s T=%lld N=%lld K=%lld",
                         kind < 3    ? tuna_dtype_name(wc.dtype)
                         : kind == 3 ? "nf4/f32"
                                     : "nf4/bf16",
                         (long long)T, (long long)N, (long long)K);
                check_dev(what, ddx, dx, (size_t)(T * K), tol);
                tuna_cuda_free(g_gpu, ddy);
                free(dy);
            }
            tuna_cuda_free(g_gpu, (void *)wg.data);
            if (kind >= 3) {
                tuna_cuda_free(g_gpu, (void *)d.absmax);
                tuna_q4_weight_free(&q);
            }
            free(wh);
            free(wf);
        }
    }
}

/* One adapter's operands on the CPU and the GPU (same random values) for the lora ops' tests. */
struct lora_case {
    int64_t T, N, K, R;
    float *A, *B, *x, *y, *dy, *dx, *dA, *dB, *work;       /* host */
    float *gx, *gy, *gdy, *gdx, *gdA, *gdB, *gwork;        /* device */
    struct tuna_lora lc, lg;                                 /* CPU and GPU views of the adapter */
};

static void lora_case_new(struct lora_case *c, int64_t T, int64_t N, int64_t K, int64_t R, float scale)
{
    c->T = T, c->N = N, c->K = K, c->R = R;
    c->A = rnd((size_t)(R * K)), c->B = rnd((size_t)(N * R));
    c->lc = (struct tuna_lora){R, c->A, c->B, scale};
    c->lg = (struct tuna_lora){R, dev(c->A, (size_t)(R * K) * 4), dev(c->B, (size_t)(N * R) * 4), scale};
    c->x = rnd((size_t)(T * K)), c->y = rnd((size_t)(T * N)), c->dy = rnd((size_t)(T * N));
    c->dx = rnd((size_t)(T * K)), c->dA = rnd((size_t)(R * K)), c->dB = rnd((size_t)(N * R));
    c->work = malloc((size_t)(2 * T * R) * 4);
    c->gx = dev(c->x, (size_t)(T * K) * 4), c->gy = dev(c->y, (size_t)(T * N) * 4);
    c->gdy = dev(c->dy, (size_t)(T * N) * 4), c->gdx = dev(c->dx, (size_t)(T * K) * 4);
    c->gdA = dev(c->dA, (size_t)(R * K) * 4), c->gdB = dev(c->dB, (size_t)(N * R) * 4);
    c->gwork = dev(NULL, (size_t)(2 * T * R) * 4);
}

/* y, dx, dA, dB and their device copies are not freed here: check_dev frees what it checks */
static void lora_case_free(struct lora_case *c)
{
    tuna_cuda_free(g_gpu, (void *)c->lg.A), tuna_cuda_free(g_gpu, (void *)c->lg.B);
    tuna_cuda_free(g_gpu, c->gx), tuna_cuda_free(g_gpu, c->gdy), tuna_cuda_free(g_gpu, c->gwork);
    free(c->A), free(c->B), free(c->x), free(c->dy), free(c->work);
}

static void test_lora(void **state)
{
    (void)state;
    NEED_GPU();
    struct lora_case c;
    lora_case_new(&c, 13, 37, 41, 5, 0.75f);
    const int64_t T = c.T, N = c.N, K = c.K, R = c.R;
    float *gy2 = dev(c.y, (size_t)(T * N) * 4), *gdx2 = dev(c.dx, (size_t)(T * K) * 4); /* for the TF32 runs */
    g_ct->lora_forward(g_cpu, c.y, c.x, &c.lc, T, N, K, c.work, false);
    g_gt->lora_forward(g_gpu, c.gy, c.gx, &c.lg, T, N, K, c.gwork, false);
    g_gt->lora_forward(g_gpu, gy2, c.gx, &c.lg, T, N, K, c.gwork, true);
    float *got = back_new(gy2, (size_t)(T * N));
    check_print("lora_forward (TF32)", got, c.y, (size_t)(T * N), 1e-2);
    free(got);
    check_dev("lora_forward", c.gy, c.y, (size_t)(T * N), 1e-5);
    g_ct->lora_backward(g_cpu, c.dx, c.dA, c.dB, c.dy, c.x, &c.lc, T, N, K, c.work, false);
    float *gdA3 = dev(c.dA, (size_t)(R * K) * 4), *gdB3 = dev(c.dB, (size_t)(N * R) * 4);
    g_gt->lora_backward(g_gpu, gdx2, gdA3, gdB3, c.gdy, c.gx, &c.lg, T, N, K, c.gwork, true);
    got = back_new(gdx2, (size_t)(T * K));
    check_print("lora_backward dx (TF32)", got, c.dx, (size_t)(T * K), 1e-2);
    free(got);
    tuna_cuda_free(g_gpu, gy2), tuna_cuda_free(g_gpu, gdx2), tuna_cuda_free(g_gpu, gdA3), tuna_cuda_free(g_gpu, gdB3);
    g_gt->lora_backward(g_gpu, c.gdx, c.gdA, c.gdB, c.gdy, c.gx, &c.lg, T, N, K, c.gwork, false);
    check_dev("lora_backward dx", c.gdx, c.dx, (size_t)(T * K), 1e-5);
    check_dev("lora_backward dA", c.gdA, c.dA, (size_t)(R * K), 1e-5);
    check_dev("lora_backward dB", c.gdB, c.dB, (size_t)(N * R), 1e-5);
    /* dx NULL: only the adapter's gradients */
    float *dA2 = rnd((size_t)(R * K)), *gdA2 = dev(dA2, (size_t)(R * K) * 4);
    float *dB2 = rnd((size_t)(N * R)), *gdB2 = dev(dB2, (size_t)(N * R) * 4);
    g_ct->lora_backward(g_cpu, NULL, dA2, dB2, c.dy, c.x, &c.lc, T, N, K, c.work, false);
    g_gt->lora_backward(g_gpu, NULL, gdA2, gdB2, c.gdy, c.gx, &c.lg, T, N, K, c.gwork, false);
    check_dev("lora_backward dA (dx NULL)", gdA2, dA2, (size_t)(R * K), 1e-5);
    check_dev("lora_backward dB (dx NULL)", gdB2, dB2, (size_t)(N * R), 1e-5);
    lora_case_free(&c);
}

/* LoRA in the fast mode on shapes whose long reductions take the split-K path of train_gemm.cu
 * (K, N, T >= 1024, r 16: x A^T, dy B, u^T x and dy^T hx with partials summed in order), against
 * the CPU's float32 ops; dA and dB accumulate into their previous values */
static void test_lora_splitk(void **state)
{
    (void)state;
    NEED_GPU();
    struct lora_case c;
    lora_case_new(&c, 1024, 1024, 2048, 16, 2.0f);
    const int64_t T = c.T, N = c.N, K = c.K, R = c.R;
    g_ct->lora_forward(g_cpu, c.y, c.x, &c.lc, T, N, K, c.work, false);
    g_gt->lora_forward(g_gpu, c.gy, c.gx, &c.lg, T, N, K, c.gwork, true);
    check_dev("lora_forward split-K (TF32) T 1024 N 1024 K 2048 r 16", c.gy, c.y, (size_t)(T * N), 1e-2);
    g_ct->lora_backward(g_cpu, c.dx, c.dA, c.dB, c.dy, c.x, &c.lc, T, N, K, c.work, false);
    g_gt->lora_backward(g_gpu, c.gdx, c.gdA, c.gdB, c.gdy, c.gx, &c.lg, T, N, K, c.gwork, true);
    check_dev("lora_backward split-K dx (TF32)", c.gdx, c.dx, (size_t)(T * K), 1e-2);
    check_dev("lora_backward split-K dA (TF32)", c.gdA, c.dA, (size_t)(R * K), 1e-2);
    check_dev("lora_backward split-K dB (TF32)", c.gdB, c.dB, (size_t)(N * R), 1e-2);
    lora_case_free(&c);
}

static void test_norm_rope_glu(void **state)
{
    (void)state;
    NEED_GPU();
    { /* rmsnorm backward */
        const int64_t T = 7, C = 300;
        float *x = rnd((size_t)(T * C)), *w = rnd((size_t)C), *dy = rnd((size_t)(T * C)), *dx = rnd((size_t)(T * C));
        float *gx = dev(x, (size_t)(T * C) * 4), *gw = dev(w, (size_t)C * 4), *gdy = dev(dy, (size_t)(T * C) * 4);
        float *gdx = dev(dx, (size_t)(T * C) * 4);
        g_ct->rmsnorm_backward(g_cpu, dx, dy, x, w, T, C, 1e-5f);
        g_gt->rmsnorm_backward(g_gpu, gdx, gdy, gx, gw, T, C, 1e-5f);
        check_dev("rmsnorm_backward T=7 C=300", gdx, dx, (size_t)(T * C), 1e-5);
        tuna_cuda_free(g_gpu, gx), tuna_cuda_free(g_gpu, gw), tuna_cuda_free(g_gpu, gdy);
        free(x), free(w), free(dy);
    }
    { /* RoPE backward, partial rotary, two sequences */
        const int64_t T = 11, H = 3, D = 40, rot = 32;
        int64_t pos[11];
        for (int i = 0; i < 11; i++)
            pos[i] = i < 6 ? i : i - 6;
        float inv[16];
        for (int i = 0; i < 16; i++)
            inv[i] = powf(10000.0f, -(float)(2 * i) / (float)rot);
        float *d = rnd((size_t)(T * H * D)), *gd = dev(d, (size_t)(T * H * D) * 4);
        g_ct->rope_backward(g_cpu, d, pos, T, H, D, rot, inv, 1.1f);
        g_gt->rope_backward(g_gpu, gd, pos, T, H, D, rot, inv, 1.1f);
        check_dev("rope_backward (partial, attn_factor 1.1)", gd, d, (size_t)(T * H * D), 1e-5);
    }
    for (int act = 0; act < 3; act++) { /* GLU backward: SiLU, GELU tanh, GELU erf */
        const int64_t n = 1001;
        float *gate = rnd((size_t)n), *up = rnd((size_t)n), *dout = rnd((size_t)n);
        float *dg = rnd((size_t)n), *du = rnd((size_t)n);
        float *ggate = dev(gate, (size_t)n * 4), *gup = dev(up, (size_t)n * 4), *gdout = dev(dout, (size_t)n * 4);
        float *gdg = dev(dg, (size_t)n * 4), *gdu = dev(du, (size_t)n * 4);
        g_ct->glu_backward(g_cpu, dg, du, dout, gate, up, n, act);
        g_gt->glu_backward(g_gpu, gdg, gdu, gdout, ggate, gup, n, act);
        char what[64];
        snprintf(what, sizeof what, "glu_backward act %d dgate", act);
        check_dev(what, gdg, dg, (size_t)n, 1e-5);
        snprintf(what, sizeof what, "glu_backward act %d dup", act);
        check_dev(what, gdu, du, (size_t)n, 1e-5);
        tuna_cuda_free(g_gpu, ggate), tuna_cuda_free(g_gpu, gup), tuna_cuda_free(g_gpu, gdout);
        free(gate), free(up), free(dout);
    }
}

/* two sequences (13 and 6 tokens), GQA 6 heads on 2, D 24; no window and window 5; exact
 * float32 and the bf16 mode (flash attention, no work buffer); a work buffer of one head
 * (chunks) and of every head for the exact path; the log-sum-exps of the forward */
static void test_attention(void **state)
{
    (void)state;
    NEED_GPU();
    const int64_t T = 19, H = 6, Hkv = 2, D = 24, HD = H * D, KD = Hkv * D, maxlen = 13;
    int64_t pos[19];
    for (int i = 0; i < 19; i++)
        pos[i] = i < 13 ? i : i - 13;
    const float scale = 1.0f / sqrtf((float)D);
    float *q = rnd((size_t)(T * HD)), *k = rnd((size_t)(T * KD)), *v = rnd((size_t)(T * KD));
    float *dout = rnd((size_t)(T * HD));
    float *gq = dev(q, (size_t)(T * HD) * 4), *gk = dev(k, (size_t)(T * KD) * 4), *gv = dev(v, (size_t)(T * KD) * 4);
    float *gdout = dev(dout, (size_t)(T * HD) * 4);
    for (int c = 0; c < 6; c++) {
        const int64_t window = (c & 1) ? 5 : 0;
        const bool fast = c >= 4;
        const int64_t wf = fast ? 0 : (c / 2) == 1 ? 2 * maxlen * maxlen : 2 * Hkv * maxlen * maxlen;
        float *work = wf ? dev(NULL, (size_t)wf * 4) : NULL;
        float *out = malloc((size_t)(T * HD) * 4), *lse = malloc((size_t)(T * H) * 4);
        float *gout = dev(NULL, (size_t)(T * HD) * 4), *glse = dev(NULL, (size_t)(T * H) * 4);
        g_ct->attention_forward(g_cpu, out, lse, q, k, v, pos, T, H, Hkv, D, scale, window, false, NULL, 0);
        g_gt->attention_forward(g_gpu, gout, glse, gq, gk, gv, pos, T, H, Hkv, D, scale, window, fast, work, wf);
        char what[128];
        const double tol = fast ? 2e-2 : 1e-5;
        snprintf(what, sizeof what, "attention_forward window %lld %s work %lld", (long long)window,
                 fast ? "flash bf16" : "f32", (long long)wf);
        float *got = back_new(gout, (size_t)(T * HD));
        check_print(what, got, out, (size_t)(T * HD), tol);
        free(got);
        snprintf(what, sizeof what, "attention_forward lse window %lld %s", (long long)window,
                 fast ? "flash bf16" : "f32");
        got = back_new(glse, (size_t)(T * H));
        check_print(what, got, lse, (size_t)(T * H), fast ? 1e-2 : 1e-5);
        free(got);
        float *dq = rnd((size_t)(T * HD)), *dk = rnd((size_t)(T * KD)), *dv = rnd((size_t)(T * KD));
        float *gdq = dev(dq, (size_t)(T * HD) * 4), *gdk = dev(dk, (size_t)(T * KD) * 4);
        float *gdv = dev(dv, (size_t)(T * KD) * 4);
        g_ct->attention_backward(g_cpu, dq, dk, dv, dout, out, lse, q, k, v, pos, T, H, Hkv, D, scale, window, false,
                                 NULL, 0);
        g_gt->attention_backward(g_gpu, gdq, gdk, gdv, gdout, gout, glse, gq, gk, gv, pos, T, H, Hkv, D, scale, window,
                                 fast, work, wf);
        snprintf(what, sizeof what, "attention_backward dq window %lld %s", (long long)window, fast ? "flash" : "f32");
        check_dev(what, gdq, dq, (size_t)(T * HD), tol);
        snprintf(what, sizeof what, "attention_backward dk window %lld %s", (long long)window, fast ? "flash" : "f32");
        check_dev(what, gdk, dk, (size_t)(T * KD), tol);
        snprintf(what, sizeof what, "attention_backward dv window %lld %s", (long long)window, fast ? "flash" : "f32");
        check_dev(what, gdv, dv, (size_t)(T * KD), tol);
        if (work) tuna_cuda_free(g_gpu, work);
        tuna_cuda_free(g_gpu, gout), tuna_cuda_free(g_gpu, glse);
        free(out), free(lse);
    }
    /* a work buffer below the minimum is a (sticky) error, not a write past it */
    tuna_backend *be2 = NULL;
    TT_OK(tuna_cuda_backend_new(0, &be2));
    float *small = NULL;
    TT_OK(tuna_cuda_alloc(be2, 16, (void **)&small));
    g_gt->attention_forward(be2, gdout, NULL, gq, gk, gv, pos, T, H, Hkv, D, scale, 0, false, small, 4);
    TT_FAILS(tuna_cuda_sync(be2), TUNA_E_CUDA, "work buffer");
    tuna_cuda_free(be2, small);
    tuna_cuda_backend_free(be2);
    tuna_cuda_free(g_gpu, gq), tuna_cuda_free(g_gpu, gk), tuna_cuda_free(g_gpu, gv), tuna_cuda_free(g_gpu, gdout);
    free(q), free(k), free(v), free(dout);
}

/* flash attention (the bf16 mode) on training shapes: one sequence of 300 tokens (several
 * 64-row tiles, a partial last one), D 128 and D 64, GQA 8 on 2, and two sequences with a
 * window of 100; against the CPU's float64 reference */
static void test_flash_attention(void **state)
{
    (void)state;
    NEED_GPU();
    struct {
        int64_t T, n1, H, Hkv, D, window;
    } cases[] = {{300, 300, 4, 4, 128, 0}, {300, 300, 8, 2, 64, 0}, {257, 190, 4, 2, 128, 100}, {70, 70, 2, 1, 80, 0}};
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        const int64_t T = cases[ci].T, H = cases[ci].H, Hkv = cases[ci].Hkv, D = cases[ci].D;
        const int64_t HD = H * D, KD = Hkv * D, window = cases[ci].window;
        int64_t *pos = malloc((size_t)T * sizeof *pos);
        for (int64_t i = 0; i < T; i++)
            pos[i] = i < cases[ci].n1 ? i : i - cases[ci].n1;
        const float scale = 1.0f / sqrtf((float)D);
        float *q = rnd((size_t)(T * HD)), *k = rnd((size_t)(T * KD)), *v = rnd((size_t)(T * KD));
        float *dout = rnd((size_t)(T * HD));
        for (int64_t i = 0; i < T * HD; i++)
            q[i] *= 3; /* peaked rows */
        float *gq = dev(q, (size_t)(T * HD) * 4), *gk = dev(k, (size_t)(T * KD) * 4);
        float *gv = dev(v, (size_t)(T * KD) * 4), *gdout = dev(dout, (size_t)(T * HD) * 4);
        float *out = malloc((size_t)(T * HD) * 4), *lse = malloc((size_t)(T * H) * 4);
        float *gout = dev(NULL, (size_t)(T * HD) * 4), *glse = dev(NULL, (size_t)(T * H) * 4);
        g_ct->attention_forward(g_cpu, out, lse, q, k, v, pos, T, H, Hkv, D, scale, window, false, NULL, 0);
        g_gt->attention_forward(g_gpu, gout, glse, gq, gk, gv, pos, T, H, Hkv, D, scale, window, true, NULL, 0);
        char what[128];
        snprintf(what, sizeof what, "flash forward T %lld H %lld/%lld D %lld window %lld", (long long)T, (long long)H,
                 (long long)Hkv, (long long)D, (long long)window);
        float *got = back_new(gout, (size_t)(T * HD));
        check_print(what, got, out, (size_t)(T * HD), 2e-2);
        free(got);
        got = back_new(glse, (size_t)(T * H));
        check_print(what, got, lse, (size_t)(T * H), 1e-2);
        free(got);
        float *dq = calloc((size_t)(T * HD), 4), *dk = calloc((size_t)(T * KD), 4), *dv = calloc((size_t)(T * KD), 4);
        float *gdq = dev(dq, (size_t)(T * HD) * 4), *gdk = dev(dk, (size_t)(T * KD) * 4);
        float *gdv = dev(dv, (size_t)(T * KD) * 4);
        g_ct->attention_backward(g_cpu, dq, dk, dv, dout, out, lse, q, k, v, pos, T, H, Hkv, D, scale, window, false,
                                 NULL, 0);
        g_gt->attention_backward(g_gpu, gdq, gdk, gdv, gdout, gout, glse, gq, gk, gv, pos, T, H, Hkv, D, scale, window,
                                 true, NULL, 0);
        snprintf(what, sizeof what, "flash backward dq T %lld D %lld window %lld", (long long)T, (long long)D,
                 (long long)window);
        check_dev(what, gdq, dq, (size_t)(T * HD), 3e-2);
        snprintf(what, sizeof what, "flash backward dk T %lld D %lld window %lld", (long long)T, (long long)D,
                 (long long)window);
        check_dev(what, gdk, dk, (size_t)(T * KD), 3e-2);
        snprintf(what, sizeof what, "flash backward dv T %lld D %lld window %lld", (long long)T, (long long)D,
                 (long long)window);
        check_dev(what, gdv, dv, (size_t)(T * KD), 3e-2);
        tuna_cuda_free(g_gpu, gq), tuna_cuda_free(g_gpu, gk), tuna_cuda_free(g_gpu, gv), tuna_cuda_free(g_gpu, gdout);
        tuna_cuda_free(g_gpu, gout), tuna_cuda_free(g_gpu, glse);
        free(q), free(k), free(v), free(dout), free(out), free(lse), free(pos);
    }
}

static void test_cross_entropy(void **state)
{
    (void)state;
    NEED_GPU();
    const int64_t T = 5, V = 1031;
    const int32_t target[5] = {3, -100, 1030, 0, 517};
    float *l = rnd((size_t)(T * V));
    for (int64_t i = 0; i < T * V; i++)
        l[i] *= 8; /* a peaked softmax */
    float *gl = dev(l, (size_t)(T * V) * 4);
    double loss[5], gloss[5], *dloss = dev(NULL, sizeof gloss);
    g_ct->cross_entropy(g_cpu, l, loss, l, target, T, V, 7.0); /* in place, as the trainer */
    g_gt->cross_entropy(g_gpu, gl, dloss, gl, target, T, V, 7.0);
    TT_OK(tuna_cuda_sync(g_gpu));
    TT_OK(tuna_cuda_download(g_gpu, gloss, dloss, sizeof gloss));
    for (int i = 0; i < 5; i++) {
        printf("  cross_entropy row %d: loss %.9f (cpu %.9f)\n", i, gloss[i], loss[i]);
        assert_true(fabs(gloss[i] - loss[i]) <= 1e-6 * fmax(1.0, fabs(loss[i])));
    }
    assert_true(loss[1] == 0.0 && loss[0] > 0);
    check_dev("cross_entropy dlogits", gl, l, (size_t)(T * V), 1e-5);
    tuna_cuda_free(g_gpu, dloss);
}

static void test_optim_and_small_ops(void **state)
{
    (void)state;
    NEED_GPU();
    const int64_t n = 100003;
    float *g = rnd((size_t)n), *gg = dev(g, (size_t)n * 4);
    void *work = dev(NULL, TUNA_TRAIN_NORM_WORK);
    double sc = g_ct->grad_sq_sum(g_cpu, g, n, NULL), sg = g_gt->grad_sq_sum(g_gpu, gg, n, work);
    printf("  grad_sq_sum %.12g (cpu %.12g)\n", sg, sc);
    assert_true(fabs(sg - sc) <= 1e-12 * sc);
    /* AdamW step 3 with clipping 0.5 and weight decay */
    float *p = rnd((size_t)n), *m = rnd((size_t)n), *v = rnd((size_t)n);
    for (int64_t i = 0; i < n; i++)
        v[i] = fabsf(v[i]) * 1e-3f;
    float *gp = dev(p, (size_t)n * 4), *gm = dev(m, (size_t)n * 4), *gv = dev(v, (size_t)n * 4);
    g_ct->adamw(g_cpu, p, g, m, v, n, 2e-3, 0.9, 0.999, 1e-8, 0.01, 3, 0.5);
    g_gt->adamw(g_gpu, gp, gg, gm, gv, n, 2e-3, 0.9, 0.999, 1e-8, 0.01, 3, 0.5);
    check_dev("adamw p", gp, p, (size_t)n, 1e-6);
    check_dev("adamw m", gm, m, (size_t)n, 1e-6);
    check_dev("adamw v", gv, v, (size_t)n, 1e-6);
    check_dev("adamw g (clipped)", gg, g, (size_t)n, 1e-7);
    tuna_cuda_free(g_gpu, work);
    /* dropout: the same masks, bit for bit */
    const int64_t nd = 3001;
    float *x = rnd((size_t)nd), *gx = dev(x, (size_t)nd * 4), *gy = dev(NULL, (size_t)nd * 4);
    float *y = malloc((size_t)nd * 4);
    g_ct->dropout(g_cpu, y, x, nd, 0.3, 0x1234567887654321ull);
    g_gt->dropout(g_gpu, gy, gx, nd, 0.3, 0x1234567887654321ull);
    float *yg = back_new(gy, (size_t)nd);
    int dropped = 0;
    for (int64_t i = 0; i < nd; i++) {
        assert_true(yg[i] == y[i]);
        dropped += y[i] == 0.0f;
    }
    assert_true(dropped > nd / 5 && dropped < nd * 2 / 5);
    free(yg), free(y), free(x);
    tuna_cuda_free(g_gpu, gx), tuna_cuda_free(g_gpu, gy);
    /* gather, scatter-add, zero */
    const int64_t R = 9, C = 133, n_sel = 4;
    const int32_t rows[4] = {8, 0, 5, 2};
    float *src = rnd((size_t)(R * C)), *gsrc = dev(src, (size_t)(R * C) * 4);
    float *sel = malloc((size_t)(n_sel * C) * 4), *gsel = dev(NULL, (size_t)(n_sel * C) * 4);
    g_ct->gather_rows(g_cpu, sel, src, rows, n_sel, C);
    g_gt->gather_rows(g_gpu, gsel, gsrc, rows, n_sel, C);
    check_dev("gather_rows", gsel, copyf(sel, (size_t)(n_sel * C)), (size_t)(n_sel * C), 0);
    gsel = dev(sel, (size_t)(n_sel * C) * 4);
    g_ct->scatter_add_rows(g_cpu, src, sel, rows, n_sel, C);
    g_gt->scatter_add_rows(g_gpu, gsrc, gsel, rows, n_sel, C);
    check_dev("scatter_add_rows", gsrc, copyf(src, (size_t)(R * C)), (size_t)(R * C), 0);
    g_gt->zero(g_gpu, gsel, n_sel * C);
    float *z = back_new(gsel, (size_t)(n_sel * C));
    for (int64_t i = 0; i < n_sel * C; i++)
        assert_true(z[i] == 0.0f);
    free(z), free(sel), free(src);
    tuna_cuda_free(g_gpu, gsel);
}

/* a device array of n values rounded to hdt; *host_out (when given) gets the rounded values as
 * float32 */
static void *dev16(const float *x, size_t n, enum tuna_dtype hdt, float **host_out)
{
    uint16_t *h = malloc(n * 2 + 16);
    tuna_convert_from_f32(hdt, x, h, n);
    void *d = dev(h, n * 2);
    if (host_out) {
        *host_out = malloc(n * 4 + 16);
        tuna_convert_to_f32(hdt, h, *host_out, n);
    }
    free(h);
    return d;
}

/* a 16-bit device array as float32 (host, new) */
static float *back16(const void *d, size_t n, enum tuna_dtype hdt)
{
    uint16_t *h = malloc(n * 2 + 16);
    back(h, d, n * 2);
    float *f = malloc(n * 4 + 16);
    tuna_convert_to_f32(hdt, h, f, n);
    free(h);
    return f;
}

/* want rounded to hdt and back: what a 16-bit output should hold */
static float *round16(const float *want, size_t n, enum tuna_dtype hdt)
{
    uint16_t *h = malloc(n * 2 + 16);
    float *f = malloc(n * 4 + 16);
    tuna_convert_from_f32(hdt, want, h, n);
    tuna_convert_to_f32(hdt, h, f, n);
    free(h);
    return f;
}

/* The CPU reference of a 16-bit LoRA backward (double sums over the rounded operands): u = dy B
 * [T, R] (a new array) ... */
static float *lora_u_ref(int64_t T, int64_t N, int64_t R, const float *dyr, const float *Br)
{
    float *u = malloc((size_t)(T * R) * 4);
    for (int64_t t = 0; t < T; t++)
        for (int64_t j = 0; j < R; j++) {
            double a = 0;
            for (int64_t n = 0; n < N; n++)
                a += (double)dyr[t * N + n] * Br[n * R + j];
            u[t * R + j] = (float)a;
        }
    return u;
}

/* ... then dx += u16 (s A)16, dA += s u^T x, dB += s dy^T h16 (dx [T, K], dA [R, K], dB [N, R]). */
static void lora_grads_ref(int64_t T, int64_t N, int64_t K, int64_t R, float sc, const float *dyr, const float *u,
                           const float *ur, const float *sAr, const float *xf, const float *hr, float *dx, float *dA,
                           float *dB)
{
    for (int64_t t = 0; t < T; t++)
        for (int64_t k = 0; k < K; k++) {
            double a = 0;
            for (int64_t j = 0; j < R; j++)
                a += (double)ur[t * R + j] * sAr[j * K + k];
            dx[t * K + k] += (float)a;
        }
    for (int64_t j = 0; j < R; j++)
        for (int64_t k = 0; k < K; k++) {
            double a = 0;
            for (int64_t t = 0; t < T; t++)
                a += (double)u[t * R + j] * xf[t * K + k];
            dA[j * K + k] += (float)(sc * a);
        }
    for (int64_t n = 0; n < N; n++)
        for (int64_t j = 0; j < R; j++) {
            double a = 0;
            for (int64_t t = 0; t < T; t++)
                a += (double)dyr[t * N + n] * hr[t * R + j];
            dB[n * R + j] += (float)(sc * a);
        }
}

/* the 16-bit operand path: GEMMs on operands rounded by their producer (bf16, f16, NF4 with bf16
 * compute, the trainer's dequantization) against the CPU on the same rounded operands, and every
 * producer's float32 result against its CPU op, its 16-bit result against that rounded */
static void test_half_ops(void **state)
{
    (void)state;
    NEED_GPU();
    assert_null(g_ct->matmul16); /* the CPU keeps the float32 ops */
    assert_null(g_ct->lora_backward_h);
    const struct tuna_backend_ops *cpu = tuna_cpu_backend_ops();
    for (int kind = 0; kind < 4; kind++) { /* bf16, f16, nf4 (bf16), nf4 double-quantized (bf16) */
        const int64_t T = 35, N = 136, K = 200;
        float *wf = rnd((size_t)(N * K));
        struct tuna_weight wc, wg;
        struct tuna_q4_weight q;
        struct tuna_cuda_q4 d;
        memset(&d, 0, sizeof d);
        void *wh = NULL;
        enum tuna_dtype hdt = kind == 1 ? TUNA_DTYPE_F16 : TUNA_DTYPE_BF16;
        float *bias = rnd((size_t)N), *gbias = dev(bias, (size_t)N * 4);
        if (kind < 2) {
            size_t bytes = (size_t)(N * K) * 2;
            wh = malloc(bytes);
            tuna_convert_from_f32(hdt, wf, wh, (size_t)(N * K));
            wc = (struct tuna_weight){hdt, N, K, wh, NULL, 0};
            wg = (struct tuna_weight){hdt, N, K, dev(wh, bytes), NULL, 0};
        } else {
            TT_OK(tuna_q4_quantize(wf, TUNA_DTYPE_F32, N, K, TUNA_Q4_NF4, 64, true, TUNA_DTYPE_BF16, &q));
            assert_true(q.nested);
            wc = (struct tuna_weight){TUNA_DTYPE_NF4, N, K, q.codes, &q, 0};
            tuna_q4_dequant_table(q.type, d.lut);
            d.blocksize = q.blocksize;
            d.round_mode = 1;
            d.prefill = TUNA_DTYPE_BF16;
            if (kind == 2) {
                d.absmax = dev(q.absmax, (size_t)q.n_blocks * 4);
            } else { /* the double-quantized scales, as src/model/device.c uploads them */
                int sh = 0;
                while ((1 << sh) < q.nested_blocksize) sh++;
                d.qabsmax = dev(q.qabsmax, (size_t)q.n_blocks);
                d.nested_absmax = dev(q.nested_absmax, (size_t)q.n_nested * 4);
                d.nested_code = dev(q.nested_code, sizeof q.nested_code);
                d.nested_offset = q.nested_offset;
                d.nested_shift = sh;
            }
            wg = (struct tuna_weight){TUNA_DTYPE_NF4, N, K, dev(q.codes, (size_t)((N * K + 1) / 2)), &d, 0};
        }
        const char *kn = kind == 0 ? "bf16" : kind == 1 ? "f16" : kind == 2 ? "nf4" : "nf4 nested";
        assert_int_equal(g_gt->half_dtype(g_gpu, &wg), hdt);
        char what[128];
        /* y = x16 W^T + b */
        float *x = rnd((size_t)(T * K)), *xr;
        void *gx16 = dev16(x, (size_t)(T * K), hdt, &xr);
        float *y = malloc((size_t)(T * N) * 4), *gy = dev(NULL, (size_t)(T * N) * 4);
        cpu->matmul(g_cpu, y, xr, &wc, bias, T);
        g_gt->matmul16(g_gpu, gy, gx16, &wg, gbias, T);
        snprintf(what, sizeof what, "matmul16 %s T=%lld N=%lld K=%lld", kn, (long long)T, (long long)N, (long long)K);
        check_dev(what, gy, y, (size_t)(T * N), kind < 2 ? 1e-3 : 1e-2);
        { /* matmul16_lora: y = [x16 | h16] [W | s B]^T + b with h = x16 A^T (float32 out) and h16 = h
             rounded into x16's spare columns (rows ld apart); and without an adapter */
            const int64_t R = 5, ld = K + 8;
            float *A = rnd((size_t)(R * K)), *B = rnd((size_t)(N * R)), *sB = malloc((size_t)(N * R) * 4);
            for (int64_t i = 0; i < N * R; i++)
                sB[i] = 0.75f * B[i];
            float *Ar = round16(A, (size_t)(R * K), hdt), *sBr = round16(sB, (size_t)(N * R), hdt);
            float *h = malloc((size_t)(T * R) * 4), *yl = malloc((size_t)(T * N) * 4);
            for (int64_t t = 0; t < T; t++)
                for (int64_t j = 0; j < R; j++) {
                    double a = 0;
                    for (int64_t k = 0; k < K; k++)
                        a += (double)xr[t * K + k] * Ar[j * K + k];
                    h[t * R + j] = (float)a;
                }
            float *hr = round16(h, (size_t)(T * R), hdt);
            cpu->matmul(g_cpu, yl, xr, &wc, bias, T);
            float *yp = copyf(yl, (size_t)(T * N)); /* no adapter */
            for (int64_t t = 0; t < T; t++)
                for (int64_t n = 0; n < N; n++)
                    for (int64_t j = 0; j < R; j++)
                        yl[t * N + n] += hr[t * R + j] * sBr[n * R + j];
            uint16_t *xp = calloc((size_t)(T * ld), 2); /* x16 with spare columns */
            for (int64_t t = 0; t < T; t++)
                tuna_convert_from_f32(hdt, x + t * K, xp + t * ld, (size_t)K);
            void *gxp = dev(xp, (size_t)(T * ld) * 2);
            struct tuna_lora lg = {R, dev(A, (size_t)(R * K) * 4), dev(B, (size_t)(N * R) * 4), 0.75f};
            float *gh = dev(NULL, (size_t)(T * R) * 4), *gyl = dev(NULL, (size_t)(T * N) * 4);
            float *gyp = dev(NULL, (size_t)(T * N) * 4);
            assert_true(g_gt->matmul16_lora(g_gpu, gyp, gxp, ld, &wg, gbias, NULL, NULL, T));
            assert_true(g_gt->matmul16_lora(g_gpu, gyl, gxp, ld, &wg, gbias, &lg, gh, T));
            snprintf(what, sizeof what, "matmul16_lora %s (no adapter, x16 rows %lld apart)", kn, (long long)ld);
            check_dev(what, gyp, yp, (size_t)(T * N), kind < 2 ? 1e-3 : 1e-2);
            snprintf(what, sizeof what, "matmul16_lora %s y (R %lld)", kn, (long long)R);
            check_dev(what, gyl, yl, (size_t)(T * N), kind < 2 ? 1e-3 : 1e-2);
            snprintf(what, sizeof what, "matmul16_lora %s h = x16 A^T", kn);
            check_dev(what, gh, h, (size_t)(T * R), 1e-3);
            uint16_t *xb = malloc((size_t)(T * ld) * 2);
            back(xb, gxp, (size_t)(T * ld) * 2);
            float *h16 = malloc((size_t)(T * R) * 4), *x16b = malloc((size_t)(T * K) * 4);
            for (int64_t t = 0; t < T; t++) {
                tuna_convert_to_f32(hdt, xb + t * ld + K, h16 + t * R, (size_t)R);
                tuna_convert_to_f32(hdt, xb + t * ld, x16b + t * K, (size_t)K);
            }
            snprintf(what, sizeof what, "matmul16_lora %s h16 in x16's spare columns", kn);
            check_print(what, h16, hr, (size_t)(T * R), 1e-2);
            check_print("matmul16_lora x16 itself unchanged", x16b, xr, (size_t)(T * K), 0);
            tuna_cuda_free(g_gpu, gxp), tuna_cuda_free(g_gpu, (void *)lg.A), tuna_cuda_free(g_gpu, (void *)lg.B);
            free(A), free(B), free(sB), free(Ar), free(sBr), free(hr), free(xp), free(xb), free(h16), free(x16b);
        }
        /* dx (+)= dy16 W */
        float *dy = rnd((size_t)(T * N)), *dyr;
        void *gdy16 = dev16(dy, (size_t)(T * N), hdt, &dyr);
        for (int acc = 0; acc < 2; acc++) {
            float *dx = rnd((size_t)(T * K)), *gdx = dev(dx, (size_t)(T * K) * 4);
            if (!acc) memset(dx, 0, (size_t)(T * K) * 4);
            g_ct->matmul_backward(g_cpu, dx, dyr, &wc, T);
            g_gt->matmul_backward16(g_gpu, gdx, gdy16, &wg, T, acc);
            snprintf(what, sizeof what, "matmul_backward16 %s %s", kn, acc ? "accumulated" : "overwritten");
            check_dev(what, gdx, dx, (size_t)(T * K), kind < 2 ? 1e-3 : 1e-2);
        }
        { /* matmul_backward16_lora: u = dy16 B, dx (+)= [dy16 | u16] [W ; s A], dA += s u^T x,
             dB += s dy16^T h16, dy16's rows ld apart; and without an adapter */
            const int64_t R = 5, ld = N + 8;
            const float sc = 0.75f;
            float *A = rnd((size_t)(R * K)), *B = rnd((size_t)(N * R)), *xf = rnd((size_t)(T * K)), *h = rnd((size_t)(T * R));
            float *sA = malloc((size_t)(R * K) * 4);
            for (int64_t i = 0; i < R * K; i++)
                sA[i] = sc * A[i];
            float *sAr = round16(sA, (size_t)(R * K), hdt), *Br = round16(B, (size_t)(N * R), hdt);
            float *hr = round16(h, (size_t)(T * R), hdt);
            float *u = lora_u_ref(T, N, R, dyr, Br);
            float *ur = round16(u, (size_t)(T * R), hdt);
            uint16_t *dyp = calloc((size_t)(T * ld), 2);
            for (int64_t t = 0; t < T; t++)
                tuna_convert_from_f32(hdt, dy + t * N, dyp + t * ld, (size_t)N);
            struct tuna_lora lg = {R, dev(A, (size_t)(R * K) * 4), dev(B, (size_t)(N * R) * 4), sc};
            float *gxf = dev(xf, (size_t)(T * K) * 4), *gh = dev(h, (size_t)(T * R) * 4);
            for (int acc = 0; acc < 2; acc++) {
                float *dx = rnd((size_t)(T * K)), *gdx = dev(dx, (size_t)(T * K) * 4);
                float *dxp = rnd((size_t)(T * K)), *gdxp = dev(dxp, (size_t)(T * K) * 4);
                float *dA = rnd((size_t)(R * K)), *gdA = dev(dA, (size_t)(R * K) * 4);
                float *dB = rnd((size_t)(N * R)), *gdB = dev(dB, (size_t)(N * R) * 4);
                void *gdyp = dev(dyp, (size_t)(T * ld) * 2);
                if (!acc) memset(dx, 0, (size_t)(T * K) * 4), memset(dxp, 0, (size_t)(T * K) * 4);
                g_ct->matmul_backward(g_cpu, dx, dyr, &wc, T);
                g_ct->matmul_backward(g_cpu, dxp, dyr, &wc, T);
                lora_grads_ref(T, N, K, R, sc, dyr, u, ur, sAr, xf, hr, dx, dA, dB);
                assert_true(g_gt->matmul_backward16_lora(g_gpu, gdxp, gdyp, ld, &wg, acc, NULL, NULL, NULL, NULL, NULL,
                                                         T));
                assert_true(g_gt->matmul_backward16_lora(g_gpu, gdx, gdyp, ld, &wg, acc, &lg, gdA, gdB, gxf, gh, T));
                snprintf(what, sizeof what, "matmul_backward16_lora %s %s (no adapter)", kn, acc ? "acc" : "over");
                check_dev(what, gdxp, dxp, (size_t)(T * K), kind < 2 ? 1e-3 : 1e-2);
                snprintf(what, sizeof what, "matmul_backward16_lora %s %s dx", kn, acc ? "acc" : "over");
                check_dev(what, gdx, dx, (size_t)(T * K), kind < 2 ? 1e-3 : 1e-2);
                snprintf(what, sizeof what, "matmul_backward16_lora %s dA", kn);
                check_dev(what, gdA, dA, (size_t)(R * K), 1e-2);
                snprintf(what, sizeof what, "matmul_backward16_lora %s dB", kn);
                check_dev(what, gdB, dB, (size_t)(N * R), 1e-2);
                uint16_t *b = malloc((size_t)(T * ld) * 2);
                back(b, gdyp, (size_t)(T * ld) * 2);
                float *u16 = malloc((size_t)(T * R) * 4);
                for (int64_t t = 0; t < T; t++)
                    tuna_convert_to_f32(hdt, b + t * ld + N, u16 + t * R, (size_t)R);
                check_print("matmul_backward16_lora u16 in dy16's spare columns", u16, ur, (size_t)(T * R), 1e-2);
                free(b), free(u16);
                tuna_cuda_free(g_gpu, gdyp);
            }
            tuna_cuda_free(g_gpu, (void *)lg.A), tuna_cuda_free(g_gpu, (void *)lg.B), tuna_cuda_free(g_gpu, gxf);
            tuna_cuda_free(g_gpu, gh);
            free(A), free(B), free(xf), free(h), free(sA), free(sAr), free(Br), free(hr), free(u), free(ur), free(dyp);
        }
        { /* matmul_backward16_lora_n: three linears on one x (here one weight three times), the middle
             one without an adapter, dy16 blocks [dy_i | 8 spare] in one row; dx overwritten */
            const int64_t R = 5, P8 = 8, ld = 3 * (N + P8);
            const float sc = 0.5f;
            float *xf = rnd((size_t)(T * K)), *dx = calloc((size_t)(T * K), 4);
            float *Ai[3], *Bi[3], *hi[3], *dAi[3], *dBi[3];
            uint16_t *dyp = calloc((size_t)(T * ld), 2);
            const struct tuna_weight *ws[3] = {&wg, &wg, &wg};
            struct tuna_lora lgs[3];
            const struct tuna_lora *lp[3];
            float *gdA[3], *gdB[3], *gh[3];
            for (int i = 0; i < 3; i++) {
                float *dyi = rnd((size_t)(T * N)), *dyir = round16(dyi, (size_t)(T * N), hdt);
                for (int64_t t = 0; t < T; t++)
                    tuna_convert_from_f32(hdt, dyi + t * N, dyp + t * ld + i * (N + P8), (size_t)N);
                g_ct->matmul_backward(g_cpu, dx, dyir, &wc, T);
                Ai[i] = rnd((size_t)(R * K)), Bi[i] = rnd((size_t)(N * R)), hi[i] = rnd((size_t)(T * R));
                dAi[i] = rnd((size_t)(R * K)), dBi[i] = rnd((size_t)(N * R));
                gdA[i] = dev(dAi[i], (size_t)(R * K) * 4), gdB[i] = dev(dBi[i], (size_t)(N * R) * 4);
                gh[i] = dev(hi[i], (size_t)(T * R) * 4);
                lgs[i] = (struct tuna_lora){R, dev(Ai[i], (size_t)(R * K) * 4), dev(Bi[i], (size_t)(N * R) * 4), sc};
                lp[i] = i == 1 ? NULL : &lgs[i];
                if (i != 1) {
                    float *sA = malloc((size_t)(R * K) * 4);
                    for (int64_t e = 0; e < R * K; e++)
                        sA[e] = sc * Ai[i][e];
                    float *sAr = round16(sA, (size_t)(R * K), hdt), *Br = round16(Bi[i], (size_t)(N * R), hdt);
                    float *hr = round16(hi[i], (size_t)(T * R), hdt), *u = lora_u_ref(T, N, R, dyir, Br);
                    float *ur = round16(u, (size_t)(T * R), hdt);
                    lora_grads_ref(T, N, K, R, sc, dyir, u, ur, sAr, xf, hr, dx, dAi[i], dBi[i]);
                    free(sA), free(sAr), free(Br), free(hr), free(u), free(ur);
                }
                free(dyi), free(dyir);
            }
            float *junk = rnd((size_t)(T * K)), *gdx = dev(junk, (size_t)(T * K) * 4), *gxf = dev(xf, (size_t)(T * K) * 4);
            void *gdyp = dev(dyp, (size_t)(T * ld) * 2);
            float *const gdAc[3] = {gdA[0], NULL, gdA[2]}, *const gdBc[3] = {gdB[0], NULL, gdB[2]};
            const float *ghc[3] = {gh[0], NULL, gh[2]};
            assert_true(g_gt->matmul_backward16_lora_n(g_gpu, gdx, gdyp, ld, 3, ws, lp, gdAc, gdBc, gxf, ghc, T, P8));
            snprintf(what, sizeof what, "matmul_backward16_lora_n %s dx (3 stacked, overwritten)", kn);
            check_dev(what, gdx, dx, (size_t)(T * K), kind < 2 ? 1e-3 : 1e-2);
            for (int i = 0; i < 3; i += 2) {
                snprintf(what, sizeof what, "matmul_backward16_lora_n %s dA[%d]", kn, i);
                check_dev(what, gdA[i], dAi[i], (size_t)(R * K), 1e-2);
                snprintf(what, sizeof what, "matmul_backward16_lora_n %s dB[%d]", kn, i);
                check_dev(what, gdB[i], dBi[i], (size_t)(N * R), 1e-2);
            }
            tuna_cuda_free(g_gpu, gdA[1]), tuna_cuda_free(g_gpu, gdB[1]);
            for (int i = 0; i < 3; i++) {
                tuna_cuda_free(g_gpu, gh[i]), tuna_cuda_free(g_gpu, (void *)lgs[i].A), tuna_cuda_free(g_gpu, (void *)lgs[i].B);
                free(Ai[i]), free(Bi[i]), free(hi[i]);
            }
            free(dAi[1]), free(dBi[1]), free(junk), free(xf), free(dyp);
            tuna_cuda_free(g_gpu, gxf), tuna_cuda_free(g_gpu, gdyp);
        }
        if (kind == 3) { /* the nested scales through the float32 GEMM too: exact dequantization */
            float *dx = rnd((size_t)(T * K)), *gdx = dev(dx, (size_t)(T * K) * 4), *gdyf = dev(dy, (size_t)(T * N) * 4);
            d.prefill = TUNA_DTYPE_F32;
            d.round_mode = 0;
            q.dtype = TUNA_DTYPE_F32;
            g_ct->matmul_backward(g_cpu, dx, dy, &wc, T);
            g_gt->matmul_backward(g_gpu, gdx, gdyf, &wg, T);
            check_dev("matmul_backward nf4 nested (f32, exact dequant)", gdx, dx, (size_t)(T * K), 1e-5);
            tuna_cuda_free(g_gpu, gdyf);
            tuna_cuda_free(g_gpu, (void *)d.qabsmax), tuna_cuda_free(g_gpu, (void *)d.nested_absmax);
            tuna_cuda_free(g_gpu, (void *)d.nested_code);
        }
        tuna_cuda_free(g_gpu, gx16), tuna_cuda_free(g_gpu, gdy16), tuna_cuda_free(g_gpu, (void *)wg.data);
        tuna_cuda_free(g_gpu, gbias);
        if (kind == 2) tuna_cuda_free(g_gpu, (void *)d.absmax);
        if (kind >= 2) tuna_q4_weight_free(&q);
        free(x), free(xr), free(dy), free(dyr), free(wh), free(wf), free(bias);
    }
    { /* lora_backward_h: the forward's x A^T (lora_forward's work) instead of a recomputation */
        const int64_t T = 13, N = 37, K = 41, R = 5;
        float *A = rnd((size_t)(R * K)), *B = rnd((size_t)(N * R)), *x = rnd((size_t)(T * K)), *dy = rnd((size_t)(T * N));
        float *dx = rnd((size_t)(T * K)), *dA = rnd((size_t)(R * K)), *dB = rnd((size_t)(N * R));
        float *work = malloc((size_t)(2 * T * R) * 4);
        struct tuna_lora lc = {R, A, B, 0.75f};
        struct tuna_lora lg = {R, dev(A, (size_t)(R * K) * 4), dev(B, (size_t)(N * R) * 4), 0.75f};
        float *gx = dev(x, (size_t)(T * K) * 4), *gdy = dev(dy, (size_t)(T * N) * 4), *gy = dev(NULL, (size_t)(T * N) * 4);
        float *gh = dev(NULL, (size_t)(T * R) * 4), *gwork = dev(NULL, (size_t)(T * R) * 4);
        float *gdx = dev(dx, (size_t)(T * K) * 4), *gdA = dev(dA, (size_t)(R * K) * 4), *gdB = dev(dB, (size_t)(N * R) * 4);
        g_gt->lora_forward(g_gpu, gy, gx, &lg, T, N, K, gh, false);
        g_ct->lora_backward(g_cpu, dx, dA, dB, dy, x, &lc, T, N, K, work, false);
        g_gt->lora_backward_h(g_gpu, gdx, gdA, gdB, gdy, gx, gh, &lg, T, N, K, gwork, false);
        check_dev("lora_backward_h dx", gdx, dx, (size_t)(T * K), 1e-5);
        check_dev("lora_backward_h dA", gdA, dA, (size_t)(R * K), 1e-5);
        check_dev("lora_backward_h dB", gdB, dB, (size_t)(N * R), 1e-5);
        tuna_cuda_free(g_gpu, (void *)lg.A), tuna_cuda_free(g_gpu, (void *)lg.B), tuna_cuda_free(g_gpu, gx);
        tuna_cuda_free(g_gpu, gdy), tuna_cuda_free(g_gpu, gy), tuna_cuda_free(g_gpu, gh), tuna_cuda_free(g_gpu, gwork);
        free(A), free(B), free(x), free(dy), free(work);
    }
    for (int hk = 0; hk < 2; hk++) {
        const enum tuna_dtype hdt = hk ? TUNA_DTYPE_F16 : TUNA_DTYPE_BF16;
        const char *hn = hk ? "f16" : "bf16";
        char what[128];
        for (int64_t n = 1000; n <= 1001; n++) { /* the 4-wide and the scalar kernel */
            float *x = rnd((size_t)n), *gx = dev(x, (size_t)n * 4);
            void *g16 = dev(NULL, (size_t)n * 2);
            g_gt->to_half(g_gpu, g16, gx, n, n, n, hdt);
            float *got = back16(g16, (size_t)n, hdt), *want = round16(x, (size_t)n, hdt);
            snprintf(what, sizeof what, "to_half %s n=%lld", hn, (long long)n);
            check_print(what, got, want, (size_t)n, 0);
            free(got), free(want), free(x);
            tuna_cuda_free(g_gpu, gx), tuna_cuda_free(g_gpu, g16);
        }
        { /* to_half and glu16 into rows with spare columns (the kcat operands): the gaps untouched */
            const int64_t R = 6, Cc = 40, ld = 48, n = R * Cc;
            float *x = rnd((size_t)n), *up = rnd((size_t)n), *gx = dev(x, (size_t)n * 4), *gup = dev(up, (size_t)n * 4);
            uint16_t *fill = malloc((size_t)(R * ld) * 2);
            for (int64_t i = 0; i < R * ld; i++)
                fill[i] = 0x1234;
            for (int k = 0; k < 2; k++) {
                void *g16 = dev(fill, (size_t)(R * ld) * 2);
                float *want = malloc((size_t)n * 4);
                if (k == 0) {
                    g_gt->to_half(g_gpu, g16, gx, n, Cc, ld, hdt);
                    memcpy(want, x, (size_t)n * 4);
                } else {
                    g_gt->glu16(g_gpu, NULL, g16, gx, gup, n, Cc, ld, 0, hdt);
                    cpu->glu(g_cpu, want, x, up, n, 0);
                }
                uint16_t *b = malloc((size_t)(R * ld) * 2);
                back(b, g16, (size_t)(R * ld) * 2);
                float *got = malloc((size_t)n * 4), *wr = round16(want, (size_t)n, hdt);
                int gaps = 0;
                for (int64_t r = 0; r < R; r++) {
                    tuna_convert_to_f32(hdt, b + r * ld, got + r * Cc, (size_t)Cc);
                    for (int64_t c = Cc; c < ld; c++)
                        gaps += b[r * ld + c] != 0x1234;
                }
                snprintf(what, sizeof what, "%s %s rows %lld apart", k ? "glu16" : "to_half", hn, (long long)ld);
                check_print(what, got, wr, (size_t)n, k ? 1e-2 : 0);
                assert_int_equal(gaps, 0);
                free(b), free(got), free(wr), free(want);
                tuna_cuda_free(g_gpu, g16);
            }
            free(fill), free(x), free(up);
            tuna_cuda_free(g_gpu, gx), tuna_cuda_free(g_gpu, gup);
        }
        { /* x += d, copy, norm, rounded; and with d, copy and y NULL */
            const int64_t T = 7, C = 300;
            float *x = rnd((size_t)(T * C)), *dd = rnd((size_t)(T * C)), *w = rnd((size_t)C);
            float *gx = dev(x, (size_t)(T * C) * 4), *gd = dev(dd, (size_t)(T * C) * 4), *gw = dev(w, (size_t)C * 4);
            float *gcopy = dev(NULL, (size_t)(T * C) * 4), *gyy = dev(NULL, (size_t)(T * C) * 4);
            void *g16 = dev(NULL, (size_t)(T * C) * 2);
            for (int64_t i = 0; i < T * C; i++)
                x[i] += dd[i];
            float *y = malloc((size_t)(T * C) * 4);
            cpu->rmsnorm(g_cpu, y, x, w, T, C, 1e-5f);
            g_gt->add_rmsnorm16(g_gpu, gx, gd, gcopy, gyy, g16, C, gw, T, C, 1e-5f, hdt);
            float *got = back16(g16, (size_t)(T * C), hdt), *want = round16(y, (size_t)(T * C), hdt);
            snprintf(what, sizeof what, "add_rmsnorm16 %s y16", hn);
            check_print(what, got, want, (size_t)(T * C), 1e-2);
            free(got), free(want);
            check_dev("add_rmsnorm16 x", gx, copyf(x, (size_t)(T * C)), (size_t)(T * C), 1e-6);
            check_dev("add_rmsnorm16 x_copy", gcopy, copyf(x, (size_t)(T * C)), (size_t)(T * C), 1e-6);
            check_dev("add_rmsnorm16 y", gyy, y, (size_t)(T * C), 1e-5);
            gx = dev(x, (size_t)(T * C) * 4);
            g_gt->add_rmsnorm16(g_gpu, gx, NULL, NULL, NULL, g16, C, gw, T, C, 1e-5f, hdt);
            got = back16(g16, (size_t)(T * C), hdt);
            y = malloc((size_t)(T * C) * 4);
            cpu->rmsnorm(g_cpu, y, x, w, T, C, 1e-5f);
            want = round16(y, (size_t)(T * C), hdt);
            check_print("add_rmsnorm16 (norm only) y16", got, want, (size_t)(T * C), 1e-2);
            check_dev("add_rmsnorm16 (norm only) x unchanged", gx, x, (size_t)(T * C), 0);
            free(got), free(want), free(y), free(dd), free(w);
            tuna_cuda_free(g_gpu, gd), tuna_cuda_free(g_gpu, gw), tuna_cuda_free(g_gpu, g16);
        }
        { /* rmsnorm backward + rounded */
            const int64_t T = 7, C = 300;
            float *x = rnd((size_t)(T * C)), *w = rnd((size_t)C), *dy = rnd((size_t)(T * C)), *dx = rnd((size_t)(T * C));
            float *gx = dev(x, (size_t)(T * C) * 4), *gw = dev(w, (size_t)C * 4), *gdy = dev(dy, (size_t)(T * C) * 4);
            float *gdx = dev(dx, (size_t)(T * C) * 4);
            void *g16 = dev(NULL, (size_t)(T * C) * 2);
            g_ct->rmsnorm_backward(g_cpu, dx, dy, x, w, T, C, 1e-5f);
            g_gt->rmsnorm_backward16(g_gpu, gdx, g16, C, gdy, gx, gw, T, C, 1e-5f, hdt);
            float *got = back16(g16, (size_t)(T * C), hdt), *want = round16(dx, (size_t)(T * C), hdt);
            snprintf(what, sizeof what, "rmsnorm_backward16 %s dx16", hn);
            check_print(what, got, want, (size_t)(T * C), 1e-2);
            free(got), free(want);
            check_dev("rmsnorm_backward16 dx", gdx, dx, (size_t)(T * C), 1e-5);
            tuna_cuda_free(g_gpu, gx), tuna_cuda_free(g_gpu, gw), tuna_cuda_free(g_gpu, gdy), tuna_cuda_free(g_gpu, g16);
            free(x), free(w), free(dy);
        }
        for (int act = 0; act < 3; act++) { /* GLU forward and backward */
            const int64_t n = 1001;
            float *gate = rnd((size_t)n), *up = rnd((size_t)n), *dout = rnd((size_t)n);
            float *ggate = dev(gate, (size_t)n * 4), *gup = dev(up, (size_t)n * 4), *gdout = dev(dout, (size_t)n * 4);
            float *out = malloc((size_t)n * 4), *gout = dev(NULL, (size_t)n * 4);
            void *o16 = dev(NULL, (size_t)n * 2), *dg16 = dev(NULL, (size_t)n * 2), *du16 = dev(NULL, (size_t)n * 2);
            cpu->glu(g_cpu, out, gate, up, n, act);
            g_gt->glu16(g_gpu, gout, o16, ggate, gup, n, n, n, act, hdt);
            float *got = back16(o16, (size_t)n, hdt), *want = round16(out, (size_t)n, hdt);
            snprintf(what, sizeof what, "glu16 %s act %d out16", hn, act);
            check_print(what, got, want, (size_t)n, 1e-2);
            free(got), free(want);
            check_dev("glu16 out", gout, out, (size_t)n, 1e-5);
            float *dg = calloc((size_t)n, 4), *du = calloc((size_t)n, 4);
            float *junk = rnd((size_t)n); /* what the outputs held before: overwritten */
            float *gdg = dev(junk, (size_t)n * 4), *gdu = dev(junk, (size_t)n * 4);
            free(junk);
            g_ct->glu_backward(g_cpu, dg, du, dout, gate, up, n, act);
            g_gt->glu_backward16(g_gpu, gdg, gdu, dg16, du16, gdout, ggate, gup, n, n, n, act, hdt);
            got = back16(dg16, (size_t)n, hdt), want = round16(dg, (size_t)n, hdt);
            snprintf(what, sizeof what, "glu_backward16 %s act %d dgate16", hn, act);
            check_print(what, got, want, (size_t)n, 1e-2);
            free(got), free(want);
            got = back16(du16, (size_t)n, hdt), want = round16(du, (size_t)n, hdt);
            snprintf(what, sizeof what, "glu_backward16 %s act %d dup16", hn, act);
            check_print(what, got, want, (size_t)n, 1e-2);
            free(got), free(want);
            check_dev("glu_backward16 dgate (overwritten)", gdg, dg, (size_t)n, 1e-5);
            check_dev("glu_backward16 dup (overwritten)", gdu, du, (size_t)n, 1e-5);
            tuna_cuda_free(g_gpu, ggate), tuna_cuda_free(g_gpu, gup), tuna_cuda_free(g_gpu, gdout);
            tuna_cuda_free(g_gpu, o16), tuna_cuda_free(g_gpu, dg16), tuna_cuda_free(g_gpu, du16);
            free(gate), free(up), free(dout);
        }
        for (int rot = 32; rot <= 40; rot += 8) { /* RoPE backward, partial and full rotary */
            const int64_t T = 11, H = 3, D = 40;
            int64_t pos[11];
            for (int i = 0; i < 11; i++)
                pos[i] = i < 6 ? i : i - 6;
            float inv[20];
            for (int i = 0; i < rot / 2; i++)
                inv[i] = powf(10000.0f, -(float)(2 * i) / (float)rot);
            float *dd = rnd((size_t)(T * H * D)), *gd = dev(dd, (size_t)(T * H * D) * 4);
            const int64_t ld = H * D + (rot == 32 ? 8 : 0); /* token rows with spare columns (kcat) */
            void *g16 = dev(NULL, (size_t)(T * ld) * 2);
            g_ct->rope_backward(g_cpu, dd, pos, T, H, D, rot, inv, 1.1f);
            g_gt->rope_backward16(g_gpu, gd, g16, ld, pos, T, H, D, rot, inv, 1.1f, hdt);
            float *gotp = back16(g16, (size_t)(T * ld), hdt), *want = round16(dd, (size_t)(T * H * D), hdt);
            float *got = malloc((size_t)(T * H * D) * 4);
            for (int64_t t = 0; t < T; t++)
                memcpy(got + t * H * D, gotp + t * ld, (size_t)(H * D) * 4);
            free(gotp);
            snprintf(what, sizeof what, "rope_backward16 %s rot %d d16 (rows %lld apart)", hn, rot, (long long)ld);
            check_print(what, got, want, (size_t)(T * H * D), 1e-2);
            free(got), free(want);
            check_dev("rope_backward16 d", gd, dd, (size_t)(T * H * D), 1e-5);
            tuna_cuda_free(g_gpu, g16);
        }
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_matmul_backward), cmocka_unit_test(test_lora),
        cmocka_unit_test(test_lora_splitk), cmocka_unit_test(test_norm_rope_glu),   cmocka_unit_test(test_attention), cmocka_unit_test(test_flash_attention),
        cmocka_unit_test(test_cross_entropy),   cmocka_unit_test(test_optim_and_small_ops),
        cmocka_unit_test(test_half_ops),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
