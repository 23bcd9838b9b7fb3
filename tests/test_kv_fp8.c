/* test_kv_fp8.c — the FP8 E4M3 KV cache (--kv-cache-dtype fp8).
 *
 * Everywhere: the host conversion tuna_f32_to_f8e4m3 (every code round-trips, ties go to the even
 * code, saturation at 448, NaN), the flag's names, and the refusals (an fp8 cache in host memory,
 * fp8 on the CPU backend, with messages that say what to do).
 *
 * On a GPU (skip without one): kv_store and the fused RoPE + KV store write the bytes the host
 * conversion gives (exact); attention over an fp8 cache against the CPU's float32 attention over
 * the same K/V values (the fp8 codes widened to float32 on the host): rows on the decode kernels
 * to 1e-5 (their arithmetic is float32 on exactly those values), rows of prefill runs on the
 * tensor-core kernel to 3e-3 (it rounds Q and P to f16, as with an f16 cache: K/V widen to f16
 * exactly); then models/pymini on the GPU with an fp8 KV cache: its prompt logits against the
 * float32 reference next to a bf16 KV cache's, and 32 greedy tokens against the bf16 cache's. */
#include "testutil.h"

#include <math.h>

#include "core/dtype.h"
#include "model/kv_cache.h"
#include "model/model.h"

#ifdef TUNA_HAVE_CUDA
#define CT_RNG_SEED 0x5eed0f8f8f8ull
#include "backend/cuda/device.h"
#include "cuda_testutil.h"
#include "io/safetensors.h"
#endif

/* Every finite code round-trips; NaN codes convert to NaN and back to 0x7f / 0xff. */
static void test_convert_roundtrip(void **state)
{
    (void)state;
    for (int c = 0; c < 256; c++) {
        const float f = tuna_f8e4m3_to_f32((uint8_t)c);
        if ((c & 0x7f) == 0x7f) {
            assert_true(isnan(f));
            assert_int_equal(tuna_f32_to_f8e4m3(f) & 0x7f, 0x7f);
            continue;
        }
        if (tuna_f32_to_f8e4m3(f) != c) {
            print_error("code 0x%02x = %g converts back to 0x%02x\n", c, (double)f, tuna_f32_to_f8e4m3(f));
            fail();
        }
    }
}

/* Between two neighbouring codes: below the midpoint the lower, above it the upper, on it the
 * even one (the lower when its code is even); beyond 448: 448 (saturating), both signs. */
static void test_convert_rounding(void **state)
{
    (void)state;
    for (int c = 0; c < 0x7e; c++) {
        const float lo = tuna_f8e4m3_to_f32((uint8_t)c), hi = tuna_f8e4m3_to_f32((uint8_t)(c + 1));
        const float mid = 0.5f * (lo + hi), eps = (hi - lo) * 0.01f;
        for (int s = 0; s < 2; s++) {
            const float sg = s ? -1.0f : 1.0f;
            const uint8_t sb = s ? 0x80 : 0;
            assert_int_equal(tuna_f32_to_f8e4m3(sg * (mid - eps)), sb | c);
            assert_int_equal(tuna_f32_to_f8e4m3(sg * (mid + eps)), sb | (c + 1));
            assert_int_equal(tuna_f32_to_f8e4m3(sg * mid), sb | ((c & 1) ? c + 1 : c));
        }
    }
    const float big[] = {448.0f, 449.0f, 463.9f, 464.0f, 470.0f, 1e6f, 3e38f, INFINITY};
    for (size_t i = 0; i < sizeof big / sizeof big[0]; i++) {
        assert_int_equal(tuna_f32_to_f8e4m3(big[i]), 0x7e);
        assert_int_equal(tuna_f32_to_f8e4m3(-big[i]), 0xfe);
    }
    assert_int_equal(tuna_f32_to_f8e4m3(0.0f), 0x00);
    assert_int_equal(tuna_f32_to_f8e4m3(-0.0f), 0x80);
    assert_int_equal(tuna_f32_to_f8e4m3(1e-30f), 0x00); /* far below the smallest subnormal 2^-9 */
    assert_int_equal(tuna_f32_to_f8e4m3(NAN) & 0x7f, 0x7f);
}

static void test_flag_names(void **state)
{
    (void)state;
    enum tuna_dtype d = TUNA_DTYPE_U8;
    assert_true(tuna_kv_dtype_parse("auto", &d));
    assert_int_equal(d, TUNA_DTYPE_INVALID);
    assert_true(tuna_kv_dtype_parse("fp8", &d));
    assert_int_equal(d, TUNA_DTYPE_F8_E4M3);
    assert_true(tuna_kv_dtype_parse("fp8_e4m3", &d));
    assert_int_equal(d, TUNA_DTYPE_F8_E4M3);
    assert_true(tuna_kv_dtype_parse("bfloat16", &d));
    assert_int_equal(d, TUNA_DTYPE_BF16);
    assert_true(tuna_kv_dtype_parse("float16", &d));
    assert_int_equal(d, TUNA_DTYPE_F16);
    assert_false(tuna_kv_dtype_parse("int8", &d));
    assert_false(tuna_kv_dtype_parse("", &d));
}

/* An fp8 cache in host memory is refused; the allocator-only cache (no storage) accepts it. */
static void test_kv_new_host(void **state)
{
    (void)state;
    struct tuna_kv_config c = {2, 2, 16, 16, 8, NULL, NULL, TUNA_DTYPE_F8_E4M3};
    tuna_kv_cache *kv = NULL;
    TT_FAILS(tuna_kv_new(&c, &kv), TUNA_E_UNSUPPORTED, "GPU only");
    assert_null(kv);
    c.n_layers = 0;
    TT_OK(tuna_kv_new(&c, &kv));
    assert_int_equal(tuna_kv_dtype(kv), TUNA_DTYPE_F8_E4M3);
    tuna_kv_free(kv);
}

/* The CPU backend refuses --kv-cache-dtype fp8 (and fp8_e5m2 everywhere) and keeps float32 by
 * default; bfloat16 there gives a bf16 cache whose logits stay near the reference. */
static void test_cpu_model(void **state)
{
    (void)state;
    char dir[1024];
    if (!tt_shared_path(dir, sizeof dir, "fixtures/models/llama-tiny")) skip();
    struct tuna_model_opts o = {0};
    o.device = TUNA_DEVICE_CPU;
    o.threads = 2;
    o.quiet = true;
    o.kv_cache_dtype = TUNA_DTYPE_F8_E4M3;
    struct tuna_model *m = NULL;
    TT_FAILS(tuna_model_load(dir, &o, &m), TUNA_E_UNSUPPORTED, "needs the GPU");
    assert_null(m);
    o.kv_cache_dtype = TUNA_DTYPE_F8_E5M2;
    TT_FAILS(tuna_model_load(dir, &o, &m), TUNA_E_UNSUPPORTED, "fp8_e5m2");
    o.kv_cache_dtype = TUNA_DTYPE_INVALID;
    TT_OK(tuna_model_load(dir, &o, &m));
    assert_int_equal(tuna_model_kv_dtype(m), TUNA_DTYPE_F32);
    tuna_model_free(m);
    o.kv_cache_dtype = TUNA_DTYPE_BF16;
    TT_OK(tuna_model_load(dir, &o, &m));
    assert_int_equal(tuna_model_kv_dtype(m), TUNA_DTYPE_BF16);
    tuna_kv_cache *kv;
    TT_OK(tuna_model_kv_new(m, 64, 0, &kv));
    assert_int_equal(tuna_kv_dtype(kv), TUNA_DTYPE_BF16);
    int32_t seq;
    TT_OK(tuna_kv_seq_new(kv, &seq));
    const int32_t ids[12] = {1, 5, 9, 200, 17, 3, 44, 101, 7, 7, 250, 31};
    struct tuna_batch b;
    tuna_batch_init(&b);
    TT_OK(tuna_batch_add_seq(&b, ids, 12, seq, 0, true, false));
    const int64_t V = m->arch.vocab_size;
    float *lg = malloc(sizeof(float) * (size_t)(12 * V)), *lf = malloc(sizeof(float) * (size_t)(12 * V));
    TT_OK(tuna_model_forward(m, kv, &b, lg, NULL));
    tuna_kv_free(kv);
    tuna_model_free(m);
    o.kv_cache_dtype = TUNA_DTYPE_INVALID; /* the float32 cache: the reference of this check */
    TT_OK(tuna_model_load(dir, &o, &m));
    TT_OK(tuna_model_kv_new(m, 64, 0, &kv));
    TT_OK(tuna_kv_seq_new(kv, &seq));
    TT_OK(tuna_model_forward(m, kv, &b, lf, NULL));
    const double e = tt_rel_err(lg, lf, (size_t)(12 * V));
    printf("  llama-tiny CPU, bf16 KV cache vs float32: logits rel err %.2e\n", e);
    assert_true(e > 0.0 && e < 3e-2);
    free(lg), free(lf);
    tuna_batch_free(&b);
    tuna_kv_free(kv);
    tuna_model_free(m);
}

#ifdef TUNA_HAVE_CUDA

/* random values of magnitude up to amp, with exact ties, subnormals and values past 448 */
static float *rnd_f8(size_t n, float amp)
{
    float *p = rnd(n);
    for (size_t i = 0; i < n; i++) p[i] *= amp;
    if (n > 8) {
        p[0] = 500.0f, p[1] = -1e5f, p[2] = 0.0029296875f /* 1.5 * 2^-9: a subnormal tie */;
        p[3] = 1.0625f /* a tie between 1 and 1.125 */, p[4] = -3e-5f, p[5] = 464.0f, p[6] = 449.0f;
    }
    return p;
}

static void to_f8(const float *x, uint8_t *o, size_t n)
{
    for (size_t i = 0; i < n; i++) o[i] = tuna_f32_to_f8e4m3(x[i]);
}

/* kv_store into scattered slots: the bytes of the host conversion. */
static void test_kv_store(void **state)
{
    (void)state;
    NEED_GPU();
    const int64_t T = 9, HkvD = 2 * 80, slots = 1024;
    const int64_t slot[9] = {5, 700, 33, 1023, 0, 512, 77, 78, 79};
    const size_t bytes = (size_t)(slots * HkvD), n = (size_t)(T * HkvD);
    uint8_t *kc = calloc(bytes, 1), *vc = calloc(bytes, 1), *kg = malloc(bytes);
    void *dkc = dev(kc, bytes), *dvc = dev(vc, bytes);
    float *k = rnd_f8(n, 3.0f), *v = rnd_f8(n, 600.0f);
    float *dk = dev(k, n * 4), *dv = dev(v, n * 4);
    for (int64_t t = 0; t < T; t++) {
        to_f8(k + t * HkvD, kc + slot[t] * HkvD, (size_t)HkvD);
        to_f8(v + t * HkvD, vc + slot[t] * HkvD, (size_t)HkvD);
    }
    g_gops->kv_store(g_gpu, dkc, dvc, TUNA_DTYPE_F8_E4M3, dk, dv, slot, T, HkvD);
    back(kg, dkc, bytes);
    assert_memory_equal(kg, kc, bytes);
    back(kg, dvc, bytes);
    assert_memory_equal(kg, vc, bytes);
    TT_OK(tuna_cuda_status(g_gpu));
    free(kc), free(vc), free(kg), free(k), free(v);
    tuna_cuda_free(g_gpu, dkc), tuna_cuda_free(g_gpu, dvc), tuna_cuda_free(g_gpu, dk), tuna_cuda_free(g_gpu, dv);
}

/* The fused RoPE + KV store into an fp8 cache: q and k as with a float32 cache (bit for bit), the
 * cache bytes the host conversion of the float32 cache's values (with and without q/k norms). */
static void test_rope_kv_store(void **state)
{
    (void)state;
    NEED_GPU();
    const int64_t T = 5, H = 8, Hkv = 2, D = 128, rot = 128, slots = 64, HkvD = Hkv * D;
    const int64_t pos[5] = {0, 1, 2, 700, 4095}, slot[5] = {3, 60, 0, 17, 33};
    float inv_freq[64];
    for (int i = 0; i < 64; i++) inv_freq[i] = powf(500000.0f, -(float)(2 * i) / (float)rot);
    for (int norms = 0; norms < 2; norms++) {
        const size_t nq = (size_t)(T * H * D), nk = (size_t)(T * HkvD), nc = (size_t)(slots * HkvD);
        float *q = rnd(nq), *k = rnd_f8(nk, 4.0f), *v = rnd_f8(nk, 4.0f), *qn = rnd((size_t)D), *kn = rnd((size_t)D);
        float *dq1 = dev(q, nq * 4), *dk1 = dev(k, nk * 4), *dq2 = dev(q, nq * 4), *dk2 = dev(k, nk * 4);
        float *dv = dev(v, nk * 4), *dqn = dev(qn, (size_t)D * 4), *dkn = dev(kn, (size_t)D * 4);
        float *zf = calloc(nc, 4);
        uint8_t *z8 = calloc(nc, 1);
        void *fkc = dev(zf, nc * 4), *fvc = dev(zf, nc * 4), *ekc = dev(z8, nc), *evc = dev(z8, nc);
        const float *pqn = norms ? dqn : NULL, *pkn = norms ? dkn : NULL;
        g_gops->rope_kv_store(g_gpu, dq1, dk1, dv, pqn, pkn, 1e-6f, fkc, fvc, TUNA_DTYPE_F32, pos, slot, T, H, Hkv, D,
                              rot, inv_freq, 1.0f);
        g_gops->rope_kv_store(g_gpu, dq2, dk2, dv, pqn, pkn, 1e-6f, ekc, evc, TUNA_DTYPE_F8_E4M3, pos, slot, T, H, Hkv,
                              D, rot, inv_freq, 1.0f);
        float *a = malloc(nq * 4), *b = malloc(nq * 4), *kf = malloc(nc * 4), *vf = malloc(nc * 4);
        uint8_t *kg = malloc(nc), *vg = malloc(nc), *kw = malloc(nc), *vw = malloc(nc);
        back(a, dq1, nq * 4), back(b, dq2, nq * 4);
        assert_memory_equal(a, b, nq * 4);
        back(a, dk1, nk * 4), back(b, dk2, nk * 4);
        assert_memory_equal(a, b, nk * 4);
        back(kf, fkc, nc * 4), back(vf, fvc, nc * 4), back(kg, ekc, nc), back(vg, evc, nc);
        to_f8(kf, kw, nc), to_f8(vf, vw, nc);
        assert_memory_equal(kg, kw, nc);
        assert_memory_equal(vg, vw, nc);
        TT_OK(tuna_cuda_status(g_gpu));
        free(q), free(k), free(v), free(qn), free(kn), free(zf), free(z8), free(a), free(b), free(kf), free(vf);
        free(kg), free(vg), free(kw), free(vw);
        void *bufs[] = {dq1, dk1, dq2, dk2, dv, dqn, dkn, fkc, fvc, ekc, evc};
        for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) tuna_cuda_free(g_gpu, bufs[i]);
    }
}

/* Attention over an fp8 cache against the CPU's float32 attention on the same values. A case is
 * a batch of sequences, each a run of n query tokens at positions start..start+n-1 (runs of at
 * least 8 may take the prefill kernel), block tables from a scrambled permutation of the blocks. */
#define ATT_MAXSEQ 600
struct att_seq {
    int64_t start, n;
};
struct att_case {
    const char *name;
    int64_t H, Hkv, D;
    int32_t bs;
    int64_t window;
    int nseq;
    struct att_seq seq[ATT_MAXSEQ];
};

/* kamp, vamp: K and V values uniform in [-amp, amp) before rounding (V past 448 saturates; K
 * stays small so that scores, and the f16 rounding of Q and P in prefill rows, stay O(1)) */
static void att_run(const struct att_case *c, float kamp, float vamp)
{
    const int64_t H = c->H, Hkv = c->Hkv, D = c->D, HkvD = Hkv * D, bs = c->bs;
    int64_t *nblk = malloc(sizeof(int64_t) * ATT_MAXSEQ), total_blocks = 3, T = 0, maxlen = 0;
    for (int s = 0; s < c->nseq; s++) {
        const int64_t len = c->seq[s].start + c->seq[s].n;
        nblk[s] = (len + bs - 1) / bs;
        total_blocks += nblk[s];
        T += c->seq[s].n;
        maxlen = len > maxlen ? len : maxlen;
    }
    int64_t mul = 7;
    for (;; mul += 2) {
        int64_t x = mul, y = total_blocks;
        while (y) {
            const int64_t r = x % y;
            x = y, y = r;
        }
        if (x == 1) break;
    }
    int32_t *perm = malloc((size_t)total_blocks * sizeof(int32_t));
    for (int64_t i = 0; i < total_blocks; i++) perm[i] = (int32_t)((i * mul + 5) % total_blocks);
    const int32_t **tabs = malloc(sizeof(*tabs) * ATT_MAXSEQ);
    for (int s = 0, used = 0; s < c->nseq; used += (int)nblk[s], s++) tabs[s] = perm + used;
    const size_t n_cache = (size_t)(total_blocks * bs * HkvD);
    float *kf = rnd(n_cache), *vf = rnd(n_cache);
    uint8_t *k8 = malloc(n_cache), *v8 = malloc(n_cache);
    for (size_t i = 0; i < n_cache; i++) {
        k8[i] = tuna_f32_to_f8e4m3(kf[i] * kamp), v8[i] = tuna_f32_to_f8e4m3(vf[i] * vamp);
        kf[i] = tuna_f8e4m3_to_f32(k8[i]), vf[i] = tuna_f8e4m3_to_f32(v8[i]); /* the values the cache holds */
    }
    void *dkc = dev(k8, n_cache), *dvc = dev(v8, n_cache);
    int64_t *pos = malloc((size_t)T * sizeof(int64_t));
    const int32_t **bt = malloc((size_t)T * sizeof(*bt));
    bool *loose = malloc((size_t)T);
    for (int s = 0, t = 0; s < c->nseq; s++)
        for (int64_t i = 0; i < c->seq[s].n; i++, t++) {
            pos[t] = c->seq[s].start + i;
            bt[t] = tabs[s];
            loose[t] = c->seq[s].n >= 8;
        }
    const int32_t MB = (int32_t)((maxlen + 100 + bs - 1) / bs);
    const size_t nq = (size_t)(T * H * D);
    float *q = rnd(nq), *oc = malloc(nq * 4), *og = malloc(nq * 4);
    float *dq = dev(q, nq * 4), *dout = dev(NULL, nq * 4);
    struct tuna_attn_batch b = {T, pos, bt, (int32_t)bs, c->window, MB, NULL};
    const float scale = 1.0f / sqrtf((float)D);
    g_cops->attention(g_cpu, oc, q, kf, vf, TUNA_DTYPE_F32, &b, H, Hkv, D, scale);
    g_gops->attention(g_gpu, dout, dq, dkc, dvc, TUNA_DTYPE_F8_E4M3, &b, H, Hkv, D, scale);
    back(og, dout, nq * 4);
    TT_OK(tuna_cuda_status(g_gpu));
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
            snprintf(what, sizeof what, "fp8 attention %s, %s rows (H=%lld Hkv=%lld D=%lld bs=%lld window=%lld)",
                     c->name, pass ? "prefill-run" : "decode", (long long)H, (long long)Hkv, (long long)D,
                     (long long)bs, (long long)c->window);
            check(what, a, e, n, pass == 0 ? 1e-5 : 3e-3);
            printf("  %s: rel err %.2e\n", what, tt_rel_err(a, e, n));
        }
        free(a), free(e);
    }
    free(nblk), free(tabs);
    free(perm), free(kf), free(vf), free(k8), free(v8), free(pos), free(bt), free(loose), free(q), free(oc), free(og);
    tuna_cuda_free(g_gpu, dkc), tuna_cuda_free(g_gpu, dvc), tuna_cuda_free(g_gpu, dq), tuna_cuda_free(g_gpu, dout);
}

static void test_attention(void **state)
{
    (void)state;
    NEED_GPU();
    static const struct att_case cases[] = {
        /* decode, Llama-3-8B heads, contexts 1 .. 3000 */
        {"decode", 32, 8, 128, 16, 0, 5, {{0, 1}, {16, 1}, {999, 1}, {2999, 1}, {63, 1}}},
        /* head dims the 16-bit-style decode kernel does not take for fp8 (72: not a multiple of
         * 16; 36: not of 8, read by element): the general kernel; their runs decode too */
        {"gqa4 D72", 8, 2, 72, 16, 0, 2, {{100, 70}, {2000, 1}}},
        {"gqa2 D36", 4, 2, 36, 16, 0, 2, {{0, 20}, {1200, 1}}},
        {"gqa8 D64", 16, 2, 64, 16, 0, 3, {{0, 33}, {2500, 1}, {10, 1}}},
        {"gqa12 D64", 24, 2, 64, 16, 0, 2, {{50, 20}, {900, 1}}},
        {"window", 8, 2, 128, 16, 100, 3, {{2900, 1}, {0, 150}, {350, 40}}},
        {"bs1", 8, 4, 64, 1, 0, 3, {{0, 25}, {300, 1}, {77, 2}}},
        {"mixed", 8, 2, 128, 16, 0, 5, {{0, 300}, {2000, 1}, {40, 5}, {500, 70}, {1, 1}}},
        {"prefill 2048", 8, 2, 128, 16, 0, 1, {{0, 2048}}},
        {"chunk 700 after 1300", 8, 2, 128, 16, 0, 2, {{1300, 700}, {640, 1}}},
        {"D64 gqa8 window 300", 8, 1, 64, 16, 300, 2, {{0, 1000}, {1500, 100}}},
        {"D80 chunk", 4, 2, 80, 16, 0, 2, {{200, 333}, {0, 9}}},
        {"D96 window 77", 4, 4, 96, 16, 77, 1, {{50, 260}}},
        {"D256 window 129", 4, 2, 256, 16, 129, 2, {{0, 260}, {400, 150}}},
        {"D128 bs1 window 200 chunk", 8, 2, 128, 1, 200, 1, {{900, 300}}},
        /* one query head per kv head (GM 1) and GQA 2 at D 128, D 64 with GQA 4: the tensor-core
         * decode variant's narrowest head groups (TUNA_ATTN_F8MMA=1) */
        {"mha D128", 4, 4, 128, 16, 0, 3, {{0, 1}, {777, 1}, {47, 1}}},
        {"gqa2 D128 window 50", 8, 4, 128, 16, 50, 2, {{900, 1}, {30, 1}}},
        {"gqa4 D64", 8, 2, 64, 16, 0, 3, {{1500, 1}, {5, 1}, {260, 1}}},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) att_run(&cases[i], 2.0f, i % 3 == 2 ? 600.0f : 1.0f);
}

/* Decode batches of many sequences (one token each, random contexts below 400; GQA 4, D 128 as
 * Llama-3-8B's group, and D 64), the batch sizes where the decode kernel's split count changes. */
static void test_attention_batches(void **state)
{
    (void)state;
    NEED_GPU();
    static const int sizes[] = {1, 7, 66, 133, 530};
    struct att_case *c = calloc(1, sizeof *c);
    for (int hd = 0; hd < 2; hd++)
        for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
            *c = (struct att_case){"batch", 8, 2, hd ? 64 : 128, 16, 0, sizes[k], {{0, 1}}};
            for (int s = 0; s < c->nseq; s++)
                c->seq[s] = (struct att_seq){(int64_t)((frand() * 0.5f + 0.5f) * 399.0f), 1};
            att_run(c, 3.0f, 100.0f);
        }
    /* Llama-3-8B heads at 270 sequences (on 132 SMs no split), positions 0 .. 199, some below one
     * group of 16 keys (warps of a block without keys); frand() is uniform in [-1, 1) */
    *c = (struct att_case){"batch 270", 32, 8, 128, 16, 0, 270, {{0, 1}}};
    for (int s = 0; s < c->nseq; s++)
        c->seq[s] = (struct att_seq){s % 37 == 5 ? s % 13 : (int64_t)((frand() * 0.5f + 0.5f) * 199.0f), 1};
    att_run(c, 3.0f, 100.0f);
    free(c);
}

/* models/pymini on the GPU (bf16 compute) with a bf16 and an fp8 KV cache: prompt logits against
 * the float32 reference, and 32 greedy tokens each, counted where they agree. */
static void run_model(const char *dir, enum tuna_dtype kvdt, const int32_t *ids, int64_t T, float *lg,
                      int32_t *greedy, int n_gen)
{
    struct tuna_model_opts o = {0};
    o.device = TUNA_DEVICE_CUDA;
    o.quiet = true;
    o.kv_cache_dtype = kvdt;
    struct tuna_model *m = NULL;
    TT_OK(tuna_model_load(dir, &o, &m));
    assert_int_equal(tuna_model_kv_dtype(m), kvdt);
    const int64_t V = m->arch.vocab_size;
    tuna_kv_cache *kv;
    TT_OK(tuna_model_kv_new(m, T + n_gen + 16, 0, &kv));
    assert_int_equal(tuna_kv_dtype(kv), kvdt);
    int32_t seq;
    TT_OK(tuna_kv_seq_new(kv, &seq));
    struct tuna_batch b;
    tuna_batch_init(&b);
    TT_OK(tuna_batch_add_seq(&b, ids, T, seq, 0, true, false));
    TT_OK(tuna_model_forward(m, kv, &b, lg, NULL));
    float *row = malloc(sizeof(float) * (size_t)V);
    memcpy(row, lg + (T - 1) * V, sizeof(float) * (size_t)V);
    for (int i = 0; i < n_gen; i++) {
        int32_t best = 0;
        for (int64_t j = 1; j < V; j++)
            if (row[j] > row[best]) best = (int32_t)j;
        greedy[i] = best;
        tuna_batch_clear(&b);
        TT_OK(tuna_batch_add(&b, best, seq, T + i, true));
        TT_OK(tuna_model_forward(m, kv, &b, row, NULL));
    }
    free(row);
    tuna_batch_free(&b);
    tuna_kv_free(kv);
    tuna_model_free(m);
}

static void test_model(void **state)
{
    (void)state;
    NEED_GPU();
    char dir[1024], refp[1100];
    if (!tt_shared_path(dir, sizeof dir, "fixtures/models/pymini")) skip();
    snprintf(refp, sizeof refp, "%s/reference.safetensors", dir);
    tuna_st_set *ref;
    TT_OK(tuna_st_set_open_file(refp, &ref));
    for (int pi = 0; pi < 3; pi++) {
        char name[64];
        snprintf(name, sizeof name, "prompt%d.input_ids", pi);
        const struct tuna_tensor_view *idv = tuna_st_set_find(ref, name);
        if (!idv) break;
        snprintf(name, sizeof name, "prompt%d.logits", pi);
        const struct tuna_tensor_view *lv = tuna_st_set_find(ref, name);
        assert_non_null(lv);
        const int64_t T = (int64_t)idv->numel, V = (int64_t)(lv->numel / idv->numel);
        int32_t *ids = malloc(idv->nbytes);
        memcpy(ids, idv->data, idv->nbytes);
        float *l16 = malloc(lv->nbytes), *l8 = malloc(lv->nbytes);
        int32_t g16[32], g8[32];
        run_model(dir, TUNA_DTYPE_BF16, ids, T, l16, g16, 32);
        run_model(dir, TUNA_DTYPE_F8_E4M3, ids, T, l8, g8, 32);
        const float *lref = (const float *)lv->data;
        const double e16 = tt_rel_err(l16, lref, (size_t)(T * V)), e8 = tt_rel_err(l8, lref, (size_t)(T * V));
        const double e8_16 = tt_rel_err(l8, l16, (size_t)(T * V));
        int same = 0;
        while (same < 32 && g8[same] == g16[same]) same++;
        int equal = 0;
        for (int i = 0; i < 32; i++) equal += g8[i] == g16[i];
        printf("  pymini prompt%d T=%lld: logits rel err vs float32 reference: bf16 KV %.2e, fp8 KV %.2e (fp8 vs "
               "bf16 KV %.2e); greedy: first %d of 32 tokens the same, %d of 32 positions equal\n",
               pi, (long long)T, e16, e8, e8_16, same, equal);
        /* fp8 K/V (3 mantissa bits) may cost accuracy, but not the model: within a few percent */
        assert_true(e8 < 0.1);
        assert_true(e16 < 3e-2);
        free(ids), free(l16), free(l8);
    }
    tuna_st_set_close(ref);
}
#endif

int main(void)
{
    const struct CMUnitTest cpu_tests[] = {
        cmocka_unit_test(test_convert_roundtrip), cmocka_unit_test(test_convert_rounding),
        cmocka_unit_test(test_flag_names),        cmocka_unit_test(test_kv_new_host),
        cmocka_unit_test(test_cpu_model),
    };
    int rc = cmocka_run_group_tests(cpu_tests, NULL, NULL);
#ifdef TUNA_HAVE_CUDA
    const struct CMUnitTest gpu_tests[] = {
        cmocka_unit_test(test_kv_store),          cmocka_unit_test(test_rope_kv_store),
        cmocka_unit_test(test_attention),         cmocka_unit_test(test_attention_batches),
        cmocka_unit_test(test_model),
    };
    rc |= cmocka_run_group_tests(gpu_tests, ct_ops_setup, ct_ops_teardown);
#endif
    return rc;
}
