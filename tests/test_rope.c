/* test_rope.c — the RoPE op against the complex-rotation definition, and the inverse frequencies
 * of every rope_type against transformers' formulas written out independently in double. */
#include "testutil.h"

#include <math.h>

#include "backend/cpu/cpu.h"
#include "io/hf_config.h"
#include "model/rope_freq.h"

static void base_arch(struct tuna_arch *a, int64_t head_dim)
{
    memset(a, 0, sizeof *a);
    a->head_dim = head_dim;
    a->max_position_embeddings = 2048;
    a->rope.theta = 10000;
    a->rope.factor = 1;
    a->rope.partial_rotary_factor = 1;
    a->rope.truncate = true;
}

static void test_rope_op(void **state)
{
    (void)state;
    tuna_backend *be;
    TT_OK(tuna_cpu_backend_new(2, &be));
    enum { T = 9, H = 3, D = 14, R = 10 }; /* partial: 10 of 14 dims rotate */
    float x[T * H * D], x0[T * H * D], inv[R / 2];
    int64_t pos[T];
    for (int i = 0; i < T * H * D; i++) x0[i] = x[i] = (float)sin(i * 0.37) * 2;
    for (int i = 0; i < R / 2; i++) inv[i] = (float)pow(10000.0, -2.0 * i / R);
    for (int t = 0; t < T; t++) pos[t] = 3 * t + 1;
    tuna_cpu_backend_ops()->rope(be, x, pos, T, H, D, R, inv, 1.5f);
    for (int t = 0; t < T; t++)
        for (int h = 0; h < H; h++) {
            const float *a = x0 + (t * H + h) * D, *b = x + (t * H + h) * D;
            for (int i = 0; i < R / 2; i++) { /* (a_i + i a_{i+R/2}) e^{i θ} × 1.5 */
                double th = (double)pos[t] * inv[i];
                double re = 1.5 * (a[i] * cos(th) - a[i + R / 2] * sin(th));
                double im = 1.5 * (a[i + R / 2] * cos(th) + a[i] * sin(th));
                assert_true(fabs(b[i] - re) < 1e-4 && fabs(b[i + R / 2] - im) < 1e-4);
            }
            for (int i = R; i < D; i++) assert_true(b[i] == a[i]);
        }
    tuna_cpu_backend_free(be);
}

static void test_inv_freq(void **state)
{
    (void)state;
    struct tuna_arch a;
    float inv[64], af;
    const int D = 128;
    /* default */
    base_arch(&a, D);
    tuna_rope_inv_freq(&a, 0, inv, &af);
    assert_true(af == 1.0f);
    for (int i = 0; i < D / 2; i++) assert_true(fabs(inv[i] - pow(10000.0, -2.0 * i / D)) < 1e-6 * pow(10000.0, -2.0 * i / D) + 1e-12);
    /* linear: divided by the factor */
    base_arch(&a, D);
    a.rope.type = TUNA_ROPE_LINEAR;
    a.rope.factor = 4;
    float lin[64];
    tuna_rope_inv_freq(&a, 0, lin, &af);
    for (int i = 0; i < D / 2; i++) assert_true(fabsf(lin[i] - inv[i] / 4) <= 1e-6f * inv[i]);
    /* llama3 (Llama 3.1: factor 8, low 1, high 4, original 8192, theta 500000) */
    base_arch(&a, D);
    a.rope.type = TUNA_ROPE_LLAMA3;
    a.rope.theta = 500000;
    a.rope.factor = 8;
    a.rope.low_freq_factor = 1;
    a.rope.high_freq_factor = 4;
    a.rope.original_max_pos = 8192;
    float l3[64];
    tuna_rope_inv_freq(&a, 0, l3, &af);
    int hi = 0, lo = 0, mid = 0;
    for (int i = 0; i < D / 2; i++) {
        double f = pow(500000.0, -2.0 * i / D), wl = 2 * M_PI / f, ref;
        if (wl < 8192.0 / 4) {
            ref = f;
            hi++;
        } else if (wl > 8192.0 / 1) {
            ref = f / 8;
            lo++;
        } else {
            double sm = (8192.0 / wl - 1) / (4 - 1);
            ref = (1 - sm) * f / 8 + sm * f;
            mid++;
        }
        assert_true(fabs(l3[i] - ref) <= 2e-6 * ref);
    }
    assert_true(hi > 0 && lo > 0 && mid > 0);
    /* dynamic: below the original length it is the default; above it the base grows */
    base_arch(&a, D);
    a.rope.type = TUNA_ROPE_DYNAMIC;
    a.rope.factor = 2;
    float dy[64];
    tuna_rope_inv_freq(&a, 100, dy, &af);
    for (int i = 0; i < D / 2; i++) assert_true(dy[i] == inv[i]);
    tuna_rope_inv_freq(&a, 4096, dy, &af);
    double base = 10000 * pow(2.0 * 4096 / 2048 - 1, (double)D / (D - 2));
    for (int i = 0; i < D / 2; i++) assert_true(fabs(dy[i] - pow(base, -2.0 * i / D)) <= 2e-6 * pow(base, -2.0 * i / D));
    /* yarn (factor 4, original 2048): high dims interpolated, low dims extrapolated, mscale */
    base_arch(&a, D);
    a.rope.type = TUNA_ROPE_YARN;
    a.rope.factor = 4;
    a.rope.original_max_pos = 2048;
    float y[64];
    tuna_rope_inv_freq(&a, 0, y, &af);
    assert_true(fabs(af - (0.1 * log(4.0) + 1)) < 1e-6);
    double lowd = floor(D * log(2048 / (32 * 2 * M_PI)) / (2 * log(10000.0)));
    double highd = ceil(D * log(2048 / (1 * 2 * M_PI)) / (2 * log(10000.0)));
    for (int i = 0; i < D / 2; i++) {
        double f = pow(10000.0, -2.0 * i / D), ramp = (i - lowd) / (highd - lowd);
        ramp = ramp < 0 ? 0 : ramp > 1 ? 1 : ramp;
        double ref = f / 4 * ramp + f * (1 - ramp);
        assert_true(fabs(y[i] - ref) <= 2e-6 * ref);
    }
    /* partial rotary factor */
    base_arch(&a, D);
    a.rope.partial_rotary_factor = 0.5;
    assert_int_equal(tuna_rope_rot_dim(&a), 64);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rope_op),
        cmocka_unit_test(test_inv_freq),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
