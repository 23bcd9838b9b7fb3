/* test_backward.c — finite-difference check of every backward op in src/train/backward.c against
 * the forward op it inverts (the CPU backend's own op where there is one).
 *
 * For an op y = f(x) and a fixed random cotangent g, L(x) = sum(g · f(x)) in double; the
 * analytic gradient from *_backward must match (L(x + h e_i) - L(x - h e_i)) / 2h for every
 * input element: relative error of the whole gradient vector below 2e-3 (float32 forward, h
 * chosen for float32 rounding). Sizes are odd on purpose.
 */
#include "testutil.h"

#include <math.h>

#include "backend/cpu/cpu.h"
#include "io/hf_config.h"
#include "quant/nf4.h"
#include "train/backward.h"

static uint64_t rng = 0x1234567ULL;
static float urand(void) /* [-1, 1) */
{
    rng = rng * 6364136223846793005ULL + 1442695040888963407ULL;
    return (float)((double)(rng >> 40) / (double)(1ULL << 24) * 2.0 - 1.0);
}
static float *rand_vec(int64_t n, float amp)
{
    float *v = malloc((size_t)n * sizeof *v);
    for (int64_t i = 0; i < n; i++)
        v[i] = urand() * amp;
    return v;
}
static double dotd(const float *a, const float *b, int64_t n)
{
    double s = 0;
    for (int64_t i = 0; i < n; i++)
        s += (double)a[i] * b[i];
    return s;
}

/* The function under test: writes y from the current inputs. */
typedef void (*fwd_fn)(void *ctx, float *y);

/* Numeric gradient of L = g·f over x[n] (perturbed in place), compared with `analytic`. */
static double fd_check(fwd_fn f, void *ctx, float *x, int64_t n, const float *g, int64_t ny, const float *analytic,
                       float h)
{
    float *y = malloc((size_t)ny * sizeof *y);
    float *num = malloc((size_t)n * sizeof *num);
    for (int64_t i = 0; i < n; i++) {
        float x0 = x[i];
        x[i] = x0 + h;
        f(ctx, y);
        double lp = dotd(g, y, ny);
        x[i] = x0 - h;
        f(ctx, y);
        double lm = dotd(g, y, ny);
        x[i] = x0;
        num[i] = (float)((lp - lm) / (2.0 * h));
    }
    double err = tt_rel_err(analytic, num, (size_t)n);
    free(y);
    free(num);
    return err;
}

static tuna_backend *be;
static const struct tuna_backend_ops *ops;

static int setup(void **state)
{
    (void)state;
    ops = tuna_cpu_backend_ops();
    if (tuna_cpu_backend_new(2, &be) != TUNA_OK) return -1;
    return tuna_cpu_backend_reserve(be, 64) == TUNA_OK ? 0 : -1; /* 4-bit tiles need scratch */
}
static int teardown(void **state)
{
    (void)state;
    tuna_cpu_backend_free(be);
    return 0;
}

/* ---- rmsnorm ---- */
struct norm_ctx {
    float *x, *w;
    int64_t T, C;
};
static void norm_fwd(void *p, float *y)
{
    struct norm_ctx *c = p;
    ops->rmsnorm(be, y, c->x, c->w, c->T, c->C, 1e-5f);
}
static void test_rmsnorm(void **state)
{
    (void)state;
    struct norm_ctx c = {rand_vec(3 * 37, 1.0f), rand_vec(37, 1.5f), 3, 37};
    float *g = rand_vec(3 * 37, 1.0f), *dx = calloc(3 * 37, sizeof *dx);
    tuna_rmsnorm_backward(dx, g, c.x, c.w, 3, 37, 1e-5f);
    double err = fd_check(norm_fwd, &c, c.x, 3 * 37, g, 3 * 37, dx, 1e-2f);
    printf("rmsnorm: rel err %.2e\n", err);
    assert_true(err < 2e-3);
    /* accumulation: a second call adds the same again */
    float *dx2 = calloc(3 * 37, sizeof *dx2);
    tuna_rmsnorm_backward(dx2, g, c.x, c.w, 3, 37, 1e-5f);
    tuna_rmsnorm_backward(dx2, g, c.x, c.w, 3, 37, 1e-5f);
    for (int i = 0; i < 3 * 37; i++)
        assert_float_equal(dx2[i], 2 * dx[i], 1e-5 * (1 + fabsf(dx[i])));
    free(c.x), free(c.w), free(g), free(dx), free(dx2);
}

/* ---- rope ---- */
struct rope_ctx {
    float *x;
    int64_t T, H, D, rot;
    int64_t *pos;
    float *inv;
    float af;
};
static void rope_fwd(void *p, float *y)
{
    struct rope_ctx *c = p;
    memcpy(y, c->x, (size_t)(c->T * c->H * c->D) * sizeof *y);
    ops->rope(be, y, c->pos, c->T, c->H, c->D, c->rot, c->inv, c->af);
}
static void test_rope(void **state)
{
    (void)state;
    int64_t pos[5] = {0, 1, 2, 7, 31};
    float inv[6];
    for (int i = 0; i < 6; i++)
        inv[i] = powf(10000.0f, -(float)(2 * i) / 12.0f);
    const int64_t n = 5 * 3 * 16;
    struct rope_ctx c = {rand_vec(n, 1.0f), 5, 3, 16, 12, pos, inv, 1.1f}; /* partial rotary, YaRN factor */
    float *g = rand_vec(n, 1.0f), *d = malloc(n * sizeof *d);
    memcpy(d, g, n * sizeof *d);
    tuna_rope_backward(d, pos, 5, 3, 16, 12, inv, 1.1f);
    double err = fd_check(rope_fwd, &c, c.x, n, g, n, d, 1e-2f);
    printf("rope: rel err %.2e\n", err);
    assert_true(err < 2e-3);
    free(c.x), free(g), free(d);
}

/* ---- attention (the CPU op reading k, v through size-1 blocks: slot = row) ---- */
struct att_ctx {
    float *q, *k, *v;
    int64_t T, H, Hkv, D, window;
    int64_t *pos;
    int32_t *rows;      /* rows[i] = i */
    const int32_t **bt; /* [T] block table: rows + (t - pos[t]) */
};
static void att_fwd(void *p, float *y)
{
    struct att_ctx *c = p;
    struct tuna_attn_batch ab = {c->T, c->pos, c->bt, 1, c->window, (int32_t)c->T, NULL};
    ops->attention(be, y, c->q, c->k, c->v, TUNA_DTYPE_F32, &ab, c->H, c->Hkv, c->D, 0.35f);
}
static void attention_case(int64_t window)
{
    /* two sequences of 4 and 3 tokens, GQA 4 heads over 2 */
    enum { T = 7, H = 4, Hkv = 2, D = 8 };
    int64_t pos[T] = {0, 1, 2, 3, 0, 1, 2};
    int32_t rows[T];
    const int32_t *bt[T];
    for (int i = 0; i < T; i++)
        rows[i] = i;
    for (int i = 0; i < T; i++)
        bt[i] = rows + (i - pos[i]);
    struct att_ctx c = {rand_vec(T * H * D, 1.0f),
                        rand_vec(T * Hkv * D, 1.0f),
                        rand_vec(T * Hkv * D, 1.0f),
                        T,
                        H,
                        Hkv,
                        D,
                        window,
                        pos,
                        rows,
                        bt};
    float *g = rand_vec(T * H * D, 1.0f);
    float *dq = calloc(T * H * D, sizeof *dq), *dk = calloc(T * Hkv * D, sizeof *dk);
    float *dv = calloc(T * Hkv * D, sizeof *dv);
    tuna_attention_backward(dq, dk, dv, g, c.q, c.k, c.v, pos, T, H, Hkv, D, 0.35f, window);
    double eq = fd_check(att_fwd, &c, c.q, T * H * D, g, T * H * D, dq, 1e-2f);
    double ek = fd_check(att_fwd, &c, c.k, T * Hkv * D, g, T * H * D, dk, 1e-2f);
    double ev = fd_check(att_fwd, &c, c.v, T * Hkv * D, g, T * H * D, dv, 1e-2f);
    printf("attention (window %lld): rel err q %.2e k %.2e v %.2e\n", (long long)window, eq, ek, ev);
    assert_true(eq < 2e-3 && ek < 2e-3 && ev < 2e-3);
    free(c.q), free(c.k), free(c.v), free(g), free(dq), free(dk), free(dv);
}
static void test_attention(void **state)
{
    (void)state;
    attention_case(0);
    attention_case(2);
    /* large enough for several threads (one task per sequence and kv head): the same floats
       as one thread */
    enum { T = 120, H = 4, Hkv = 2, D = 16 };
    int64_t pos[T];
    for (int i = 0; i < T; i++)
        pos[i] = i < 50 ? i : i < 90 ? i - 50 : i - 90;
    float *q = rand_vec(T * H * D, 1.0f), *k = rand_vec(T * Hkv * D, 1.0f), *v = rand_vec(T * Hkv * D, 1.0f);
    float *g = rand_vec(T * H * D, 1.0f), *d[2][3];
    for (int r = 0; r < 2; r++) {
        d[r][0] = calloc(T * H * D, sizeof(float));
        d[r][1] = calloc(T * Hkv * D, sizeof(float));
        d[r][2] = calloc(T * Hkv * D, sizeof(float));
        tuna_backward_set_threads(r == 0 ? 1 : 4);
        tuna_attention_backward(d[r][0], d[r][1], d[r][2], g, q, k, v, pos, T, H, Hkv, D, 0.25f, 0);
    }
    tuna_backward_set_threads(0);
    assert_memory_equal(d[0][0], d[1][0], T * H * D * sizeof(float));
    assert_memory_equal(d[0][1], d[1][1], T * Hkv * D * sizeof(float));
    assert_memory_equal(d[0][2], d[1][2], T * Hkv * D * sizeof(float));
    for (int r = 0; r < 2; r++)
        free(d[r][0]), free(d[r][1]), free(d[r][2]);
    free(q), free(k), free(v), free(g);
}

/* ---- glu ---- */
struct glu_ctx {
    float *gate, *up;
    int64_t n;
    int act;
};
static void glu_fwd(void *p, float *y)
{
    struct glu_ctx *c = p;
    ops->glu(be, y, c->gate, c->up, c->n, c->act);
}
static void test_glu(void **state)
{
    (void)state;
    int acts[3] = {TUNA_ACT_SILU, TUNA_ACT_GELU_TANH, TUNA_ACT_GELU};
    for (int a = 0; a < 3; a++) {
        const int64_t n = 41;
        struct glu_ctx c = {rand_vec(n, 3.0f), rand_vec(n, 1.0f), n, acts[a]};
        float *g = rand_vec(n, 1.0f), *dg = calloc(n, sizeof *dg), *du = calloc(n, sizeof *du);
        tuna_glu_backward(dg, du, g, c.gate, c.up, n, acts[a]);
        double e1 = fd_check(glu_fwd, &c, c.gate, n, g, n, dg, 1e-2f);
        double e2 = fd_check(glu_fwd, &c, c.up, n, g, n, du, 1e-2f);
        printf("glu act %d: rel err gate %.2e up %.2e\n", acts[a], e1, e2);
        assert_true(e1 < 2e-3 && e2 < 2e-3);
        free(c.gate), free(c.up), free(g), free(dg), free(du);
    }
}

/* ---- frozen matmul (bf16 and NF4 weights) ---- */
struct mm_ctx {
    float *x;
    const struct tuna_weight *w;
    int64_t T;
};
static void mm_fwd(void *p, float *y)
{
    struct mm_ctx *c = p;
    ops->matmul(be, y, c->x, c->w, NULL, c->T);
}
static void matmul_case(const struct tuna_weight *w, const char *what)
{
    const int64_t T = 3, N = w->rows, K = w->cols;
    struct mm_ctx c = {rand_vec(T * K, 1.0f), w, T};
    float *g = rand_vec(T * N, 1.0f), *dx = calloc((size_t)(T * K), sizeof *dx);
    tuna_matmul_backward(dx, g, w, T);
    double err = fd_check(mm_fwd, &c, c.x, T * K, g, T * N, dx, 1e-2f);
    printf("matmul %s: rel err %.2e\n", what, err);
    assert_true(err < 2e-3);
    free(c.x), free(g), free(dx);
}
static void test_matmul(void **state)
{
    (void)state;
    enum { N = 19, K = 24 };
    float *wf = rand_vec(N * K, 0.5f);
    uint16_t wb[N * K];
    for (int i = 0; i < N * K; i++)
        wb[i] = tuna_f32_to_bf16(wf[i]);
    struct tuna_weight w = {TUNA_DTYPE_BF16, N, K, wb, NULL, 0};
    matmul_case(&w, "bf16");
    struct tuna_weight w32 = {TUNA_DTYPE_F32, N, K, wf, NULL, 0};
    matmul_case(&w32, "f32");
    struct tuna_q4_weight q;
    TT_OK(tuna_q4_quantize(wf, TUNA_DTYPE_F32, N, K, TUNA_Q4_NF4, 64, true, TUNA_DTYPE_F32, &q));
    struct tuna_weight w4 = {TUNA_DTYPE_NF4, N, K, q.codes, &q, 0};
    matmul_case(&w4, "nf4 (double quant, blocks across rows)");
    tuna_q4_weight_free(&q);
    free(wf);
}

/* ---- LoRA: y = s (x A^T) B^T ---- */
struct lora_ctx {
    float *x, *A, *B;
    int64_t T, N, K, R;
    float s;
};
static void lora_fwd(void *p, float *y)
{
    struct lora_ctx *c = p;
    for (int64_t t = 0; t < c->T; t++)
        for (int64_t n = 0; n < c->N; n++) {
            double acc = 0;
            for (int64_t r = 0; r < c->R; r++)
                acc += (double)c->B[n * c->R + r] * dotd(c->A + r * c->K, c->x + t * c->K, c->K);
            y[t * c->N + n] = (float)(c->s * acc);
        }
}
static void test_lora(void **state)
{
    (void)state;
    enum { T = 5, N = 11, K = 13, R = 3 };
    struct lora_ctx c = {rand_vec(T * K, 1.0f), rand_vec(R * K, 0.5f), rand_vec(N * R, 0.5f), T, N, K, R, 1.7f};
    struct tuna_lora l = {R, c.A, c.B, c.s};
    float *g = rand_vec(T * N, 1.0f);
    float *dx = calloc(T * K, sizeof *dx), *dA = calloc(R * K, sizeof *dA), *dB = calloc(N * R, sizeof *dB);
    tuna_lora_backward(dx, dA, dB, g, c.x, &l, N, K, T);
    double ex = fd_check(lora_fwd, &c, c.x, T * K, g, T * N, dx, 1e-2f);
    double ea = fd_check(lora_fwd, &c, c.A, R * K, g, T * N, dA, 1e-2f);
    double eb = fd_check(lora_fwd, &c, c.B, N * R, g, T * N, dB, 1e-2f);
    printf("lora: rel err x %.2e A %.2e B %.2e\n", ex, ea, eb);
    assert_true(ex < 2e-3 && ea < 2e-3 && eb < 2e-3);
    free(c.x), free(c.A), free(c.B), free(g), free(dx), free(dA), free(dB);
}

/* ---- cross-entropy: L = sum over valid rows of CE / denom ---- */
struct ce_ctx {
    float *logits;
    const int32_t *tgt;
    int64_t T, V;
    float *scratch;
};
static void ce_fwd(void *p, float *y)
{
    struct ce_ctx *c = p;
    y[0] = (float)(tuna_cross_entropy_backward(c->scratch, c->logits, c->tgt, c->T, c->V, 1.0) / 3.0);
}
static void test_cross_entropy(void **state)
{
    (void)state;
    enum { T = 4, V = 29 };
    int32_t tgt[T] = {3, -100, 28, 0};
    float *scratch = malloc(T * V * sizeof *scratch);
    struct ce_ctx c = {rand_vec(T * V, 4.0f), tgt, T, V, scratch};
    float *d = malloc(T * V * sizeof *d), one = 1.0f;
    double loss = tuna_cross_entropy_backward(d, c.logits, tgt, T, V, 3.0);
    assert_true(loss > 0);
    double err = fd_check(ce_fwd, &c, c.logits, T * V, &one, 1, d, 1e-2f);
    printf("cross-entropy: rel err %.2e\n", err);
    assert_true(err < 2e-3);
    for (int i = 0; i < V; i++)
        assert_true(d[V + i] == 0.0f); /* ignored row */
    free(c.logits), free(scratch), free(d);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rmsnorm),       cmocka_unit_test(test_rope),   cmocka_unit_test(test_attention),
        cmocka_unit_test(test_glu),           cmocka_unit_test(test_matmul), cmocka_unit_test(test_lora),
        cmocka_unit_test(test_cross_entropy),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
