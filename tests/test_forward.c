/* test_forward.c — logits of every fixture model against transformers' float32 reference
 * (reference.safetensors), greedy decoding through the paged KV cache against the reference's
 * greedy tokens where our top-1 margin is clear, and a mixed batch (prefill + decode of several
 * sequences in one step) against each sequence run alone. */
#include "testutil.h"

#include <math.h>

#include "io/safetensors.h"
#include "model/model.h"
#ifdef TUNA_HAVE_CUDA
#include "backend/cuda/device.h"
#endif

/* The device under test: the CPU by default; TUNA_TEST_DEVICE=cuda runs the same checks on the
 * GPU (TUNA_TEST_GPU_DTYPE=float32|bfloat16|float16), with tolerances for the dtype: float32
 * keeps 1e-4; 16-bit compute is compared at 3e-2 and greedy tokens only where the margin is
 * over 0.3. ctest registers forward_cuda_* variants that skip without a GPU. */
static enum tuna_device g_device = TUNA_DEVICE_CPU;
static enum tuna_dtype g_gpu_dtype = TUNA_DTYPE_F32;
static double g_tol = 1e-4, g_batch_tol = 1e-5;
static float g_margin = 1e-3f;

static void dev_opts(struct tuna_model_opts *o)
{
    o->device = g_device;
    o->gpu_dtype = g_gpu_dtype;
    o->quiet = true;
}

#define NEED_DEVICE()                                                                                  \
    do {                                                                                               \
        if (!device_available()) {                                                                     \
            fprintf(stderr, "SKIP: TUNA_TEST_DEVICE=cuda but no CUDA device (or no CUDA build)\n");    \
            skip();                                                                                    \
        }                                                                                              \
    } while (0)

static bool device_available(void)
{
    if (g_device == TUNA_DEVICE_CPU) return true;
#ifdef TUNA_HAVE_CUDA
    return tuna_cuda_device_count() > 0;
#else
    return false;
#endif
}

static const char *k_models[] = {"models/llama-tiny",          "models/mistral-tiny",     "models/qwen2-tiny",
                                 "models/qwen3-tiny",          "models/gemma-tiny",       "models/pymini",
                                 "bnb/llama-tiny-bnb-nf4-dq", "bnb/llama-tiny-bnb-fp4", "bnb/qwen2-tiny-bnb-nf4-dq",
                                 "bnb/pymini-bnb-nf4-dq"};
#define N_MODELS (sizeof k_models / sizeof k_models[0])

struct prompt {
    int32_t *ids;
    int64_t T;
    float *logits; /* [T, V] */
    int32_t greedy[24];
};

static int load_prompt(tuna_st_set *ref, int i, int64_t V, struct prompt *p)
{
    char name[64];
    snprintf(name, sizeof name, "prompt%d.input_ids", i);
    const struct tuna_tensor_view *ids = tuna_st_set_find(ref, name);
    if (!ids) return 0;
    snprintf(name, sizeof name, "prompt%d.logits", i);
    const struct tuna_tensor_view *lg = tuna_st_set_find(ref, name);
    snprintf(name, sizeof name, "prompt%d.greedy", i);
    const struct tuna_tensor_view *gr = tuna_st_set_find(ref, name);
    assert_non_null(lg);
    assert_non_null(gr);
    assert_int_equal(ids->dtype, TUNA_DTYPE_I32);
    assert_int_equal(gr->numel, 24);
    p->T = (int64_t)ids->numel;
    assert_int_equal(lg->numel, (uint64_t)(p->T * V));
    p->ids = malloc(ids->nbytes);
    memcpy(p->ids, ids->data, ids->nbytes);
    p->logits = malloc(lg->nbytes);
    memcpy(p->logits, lg->data, lg->nbytes);
    memcpy(p->greedy, gr->data, sizeof p->greedy);
    return 1;
}

static int64_t argmax(const float *x, int64_t n, float *margin)
{
    int64_t best = 0;
    for (int64_t i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    float second = -INFINITY;
    for (int64_t i = 0; i < n; i++)
        if (i != best && x[i] > second) second = x[i];
    *margin = x[best] - second;
    return best;
}

/* Prompt logits, then greedy decoding; returns how many greedy tokens were compared. */
static int check_prompt(struct tuna_model *m, const char *name, int pi, const struct prompt *p)
{
    const int64_t V = m->arch.vocab_size;
    tuna_kv_cache *kv;
    TT_OK(tuna_model_kv_new(m, p->T + 32, 0, &kv));
    int32_t seq;
    TT_OK(tuna_kv_seq_new(kv, &seq));
    struct tuna_batch b;
    tuna_batch_init(&b);
    TT_OK(tuna_batch_add_seq(&b, p->ids, p->T, seq, 0, true, false));
    float *lg = malloc(sizeof(float) * (size_t)(p->T * V));
    TT_OK(tuna_model_forward(m, kv, &b, lg, NULL));
    double err = tt_rel_err(lg, p->logits, (size_t)(p->T * V));
    printf("  %-26s prompt%d  T=%-3lld logits rel err %.2e\n", name, pi, (long long)p->T, err);
    assert_true(err < g_tol);
    /* greedy through the cache, one token per step */
    float margin;
    int32_t tok = (int32_t)argmax(lg + (p->T - 1) * V, V, &margin);
    int compared = 0;
    for (int i = 0; i < 24; i++) {
        if (margin > g_margin) {
            if (tok != p->greedy[i])
                print_error("%s prompt%d: greedy token %d is %d, reference %d (margin %g)\n", name, pi, i, tok,
                            p->greedy[i], margin);
            assert_int_equal(tok, p->greedy[i]);
            compared++;
        } else {
            break; /* an unclear choice: later tokens may legitimately differ */
        }
        tuna_batch_clear(&b);
        TT_OK(tuna_batch_add(&b, tok, seq, p->T + i, true));
        TT_OK(tuna_model_forward(m, kv, &b, lg, NULL));
        tok = (int32_t)argmax(lg, V, &margin);
    }
    printf("  %-26s prompt%d  greedy: %d of 24 tokens compared and equal\n", name, pi, compared);
    free(lg);
    tuna_batch_free(&b);
    tuna_kv_free(kv);
    return compared;
}

static void test_reference_logits(void **state)
{
    (void)state;
    NEED_DEVICE();
    char path[4096];
    if (!tt_shared_path(path, sizeof path, "fixtures")) skip();
    int total_greedy = 0;
    for (size_t mi = 0; mi < N_MODELS; mi++) {
        char dir[4200], refp[4300];
        snprintf(dir, sizeof dir, "%s/%s", path, k_models[mi]);
        snprintf(refp, sizeof refp, "%s/reference.safetensors", dir);
        struct tuna_model *m;
        struct tuna_model_opts o = {.threads = 2, .max_model_len = 0};
        dev_opts(&o);
        TT_OK(tuna_model_load(dir, &o, &m));
        tuna_st_set *ref;
        TT_OK(tuna_st_set_open_file(refp, &ref));
        for (int i = 0; i < 8; i++) {
            struct prompt p;
            if (!load_prompt(ref, i, m->arch.vocab_size, &p)) break;
            total_greedy += check_prompt(m, k_models[mi], i, &p);
            free(p.ids);
            free(p.logits);
        }
        tuna_st_set_close(ref);
        tuna_model_free(m);
    }
    assert_true(total_greedy > 0);
}

/* Three prompts: each alone, then together in steps that mix prefill and decode. */
static void test_batched_equals_alone(void **state)
{
    (void)state;
    NEED_DEVICE();
    char dir[4096];
    if (!tt_shared_path(dir, sizeof dir, "fixtures/models/qwen3-tiny")) skip();
    char refp[4200];
    snprintf(refp, sizeof refp, "%s/reference.safetensors", dir);
    struct tuna_model *m;
    struct tuna_model_opts o = {.threads = 2, .max_model_len = 0};
    dev_opts(&o);
    TT_OK(tuna_model_load(dir, &o, &m));
    const int64_t V = m->arch.vocab_size;
    tuna_st_set *ref;
    TT_OK(tuna_st_set_open_file(refp, &ref));
    struct prompt p[3];
    for (int i = 0; i < 3; i++) assert_true(load_prompt(ref, i, V, &p[i]));
    const int steps = 5;
    /* alone: prompt prefill then `steps` decode tokens fed from a fixed list */
    float *alone[3];
    int32_t feed[3][8];
    for (int i = 0; i < 3; i++) {
        for (int s = 0; s < steps; s++) feed[i][s] = (int32_t)((7 * i + 13 * s + 3) % V);
        alone[i] = malloc(sizeof(float) * (size_t)V * (size_t)(steps + 1));
        tuna_kv_cache *kv;
        TT_OK(tuna_model_kv_new(m, 256, 0, &kv));
        int32_t seq;
        TT_OK(tuna_kv_seq_new(kv, &seq));
        struct tuna_batch b;
        tuna_batch_init(&b);
        TT_OK(tuna_batch_add_seq(&b, p[i].ids, p[i].T, seq, 0, false, true));
        TT_OK(tuna_model_forward(m, kv, &b, alone[i], NULL));
        for (int s = 0; s < steps; s++) {
            tuna_batch_clear(&b);
            TT_OK(tuna_batch_add(&b, feed[i][s], seq, p[i].T + s, true));
            TT_OK(tuna_model_forward(m, kv, &b, alone[i] + (s + 1) * V, NULL));
        }
        tuna_batch_free(&b);
        tuna_kv_free(kv);
    }
    /* together: sequence i starts its prefill at step i, so steps hold prefill and decode rows */
    tuna_kv_cache *kv;
    TT_OK(tuna_model_kv_new(m, 3 * 256, 4, &kv)); /* small blocks: tables interleave */
    int32_t seqs[3];
    for (int i = 0; i < 3; i++) TT_OK(tuna_kv_seq_new(kv, &seqs[i]));
    int done[3] = {0, 0, 0}; /* logits rows produced per sequence */
    float *lg = malloc(sizeof(float) * (size_t)V * 8);
    struct tuna_batch b;
    tuna_batch_init(&b);
    double worst = 0;
    for (int step = 0; step < steps + 3; step++) {
        tuna_batch_clear(&b);
        int order[3], n = 0;
        for (int k = 2; k >= 0; k--) { /* reverse order: rows of seq 2 come first */
            int i = k;
            if (step < i || done[i] > steps) continue;
            if (done[i] == 0)
                TT_OK(tuna_batch_add_seq(&b, p[i].ids, p[i].T, seqs[i], 0, false, true));
            else
                TT_OK(tuna_batch_add(&b, feed[i][done[i] - 1], seqs[i], p[i].T + done[i] - 1, true));
            order[n++] = i;
        }
        if (n == 0) break;
        TT_OK(tuna_model_forward(m, kv, &b, lg, NULL));
        for (int r = 0; r < n; r++) {
            int i = order[r];
            double e = tt_rel_err(lg + r * V, alone[i] + done[i] * V, (size_t)V);
            if (e > worst) worst = e;
            done[i]++;
        }
    }
    printf("  batched vs alone: worst rel err %.2e over %d sequences x %d steps\n", worst, 3, steps + 1);
    for (int i = 0; i < 3; i++) assert_int_equal(done[i], steps + 1);
    assert_true(worst < g_batch_tol); /* rounding only: the GEMM path depends on the step size */
    for (int i = 0; i < 3; i++) {
        free(alone[i]);
        free(p[i].ids);
        free(p[i].logits);
    }
    free(lg);
    tuna_batch_free(&b);
    tuna_kv_free(kv);
    tuna_st_set_close(ref);
    tuna_model_free(m);
}

static void test_context_limit(void **state)
{
    (void)state;
    NEED_DEVICE();
    char dir[4096];
    if (!tt_shared_path(dir, sizeof dir, "fixtures/models/llama-tiny")) skip();
    struct tuna_model *m;
    struct tuna_model_opts o = {.threads = 1, .max_model_len = 8};
    dev_opts(&o);
    TT_OK(tuna_model_load(dir, &o, &m));
    tuna_kv_cache *kv;
    TT_OK(tuna_model_kv_new(m, 64, 0, &kv));
    int32_t seq;
    TT_OK(tuna_kv_seq_new(kv, &seq));
    int32_t ids[9] = {1, 2, 3, 4, 5, 6, 7, 8, 9};
    struct tuna_batch b;
    tuna_batch_init(&b);
    TT_OK(tuna_batch_add_seq(&b, ids, 9, seq, 0, false, true));
    float *lg = malloc(sizeof(float) * (size_t)m->arch.vocab_size);
    TT_FAILS(tuna_model_forward(m, kv, &b, lg, NULL), TUNA_E_RANGE, "context limit of 8");
    assert_int_equal(tuna_kv_seq_len(kv, seq), 0);
    tuna_batch_clear(&b);
    TT_OK(tuna_batch_add_seq(&b, ids, 8, seq, 0, false, true));
    TT_OK(tuna_model_forward(m, kv, &b, lg, NULL));
    tuna_batch_clear(&b);
    TT_OK(tuna_batch_add(&b, 5, seq, 9, true)); /* skips position 8 */
    TT_FAILS(tuna_model_forward(m, kv, &b, lg, NULL), TUNA_E_INVALID, "continues at 8");
    tuna_batch_clear(&b);
    TT_OK(tuna_batch_add(&b, 5000, seq, 8, true));
    TT_FAILS(tuna_model_forward(m, kv, &b, lg, NULL), TUNA_E_RANGE, "outside the vocabulary");
    free(lg);
    tuna_batch_free(&b);
    tuna_kv_free(kv);
    tuna_model_free(m);
    /* a model folder whose weights do not match its config */
    struct tuna_model_opts o2 = {.threads = 0, .max_model_len = 100000};
    dev_opts(&o2);
    TT_FAILS(tuna_model_load(dir, &o2, &m), TUNA_E_RANGE, "above max_position_embeddings");
}

/* The activation trace a backward pass will read: same logits as without it, and its tensors
 * are what they claim to be. */
static void test_trace(void **state)
{
    (void)state;
    if (g_device != TUNA_DEVICE_CPU) {
        fprintf(stderr, "SKIP: the trace is read on the host here (CPU only)\n");
        skip();
    }
    char dir[4096];
    if (!tt_shared_path(dir, sizeof dir, "fixtures/models/llama-tiny")) skip();
    struct tuna_model *m;
    struct tuna_model_opts o = {.threads = 2, .max_model_len = 0};
    dev_opts(&o);
    TT_OK(tuna_model_load(dir, &o, &m));
    const int64_t V = m->arch.vocab_size, C = m->arch.hidden_size, I = m->arch.intermediate_size, T = 6;
    int32_t ids[6] = {5, 17, 300, 2, 99, 1000};
    float *a = malloc(sizeof(float) * (size_t)(T * V)), *b = malloc(sizeof(float) * (size_t)(T * V));
    struct tuna_fwd_trace tr;
    memset(&tr, 0, sizeof tr);
    for (int pass = 0; pass < 2; pass++) {
        tuna_kv_cache *kv;
        TT_OK(tuna_model_kv_new(m, 64, 0, &kv));
        int32_t seq;
        TT_OK(tuna_kv_seq_new(kv, &seq));
        struct tuna_batch bt;
        tuna_batch_init(&bt);
        TT_OK(tuna_batch_add_seq(&bt, ids, T, seq, 0, true, false));
        TT_OK(tuna_model_forward(m, kv, &bt, pass ? b : a, pass ? &tr : NULL));
        tuna_batch_free(&bt);
        tuna_kv_free(kv);
    }
    assert_memory_equal(a, b, sizeof(float) * (size_t)(T * V));
    assert_int_equal(tr.T, T);
    for (int64_t t = 0; t < T; t++)
        for (int64_t c = 0; c < C; c++)
            assert_true(tr.layers[0].x_in[t * C + c] ==
                        tuna_bf16_to_f32(((const uint16_t *)m->embed.data)[ids[t] * C + c]));
    for (int64_t i = 0; i < T * I; i++) {
        float g = tr.layers[1].gate[i];
        assert_true(fabsf(tr.layers[1].act[i] - g / (1 + expf(-g)) * tr.layers[1].up[i]) < 1e-6f);
    }
    tuna_fwd_trace_free(&tr);
    free(a);
    free(b);
    tuna_model_free(m);
}

/* --load-in-4bit quantizes pymini's projections at load to exactly the codes bitsandbytes wrote
 * in fixtures/bnb/pymini-bnb-nf4-dq (same bf16 inputs, NF4, double quant, block 64). */
static void test_load_in_4bit(void **state)
{
    (void)state;
    NEED_DEVICE();
    if (g_device != TUNA_DEVICE_CPU) skip(); /* compares the host-side codes */
    char dir[4200], bnb[4200];
    if (!tt_shared_path(dir, sizeof dir, "fixtures/models/pymini") ||
        !tt_shared_path(bnb, sizeof bnb, "fixtures/bnb/pymini-bnb-nf4-dq"))
        skip();
    struct tuna_model *m;
    struct tuna_model_opts o = {.threads = 2, .load_in_4bit = true};
    TT_OK(tuna_model_load(dir, &o, &m));
    tuna_st_set *set;
    TT_OK(tuna_st_set_open(bnb, "model", &set));
    int compared = 0;
    for (int64_t l = 0; l < m->arch.n_layers; l++) {
        const struct tuna_layer *L = &m->layers[l];
        const struct tuna_linear *lins[] = {&L->q, &L->k, &L->v, &L->o, &L->gate, &L->up, &L->down};
        const char *names[] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                               "mlp.gate_proj",    "mlp.up_proj",      "mlp.down_proj"};
        for (int i = 0; i < 7; i++) {
            char n[128];
            snprintf(n, sizeof n, "model.layers.%lld.%s.weight", (long long)l, names[i]);
            const struct tuna_tensor_view *t = tuna_st_set_find(set, n);
            assert_non_null(t);
            assert_int_equal(lins[i]->w.dtype, TUNA_DTYPE_NF4);
            assert_memory_equal(lins[i]->w.data, t->data, t->nbytes);
            compared++;
        }
    }
    printf("  --load-in-4bit: %d projections byte-identical to bitsandbytes' codes\n", compared);
    assert_int_equal(m->embed.dtype, TUNA_DTYPE_BF16); /* embeddings and lm_head stay 16-bit */
    tuna_st_set_close(set);
    tuna_model_free(m);
}

int main(void)
{
    const char *dev = getenv("TUNA_TEST_DEVICE"), *dt = getenv("TUNA_TEST_GPU_DTYPE");
    if (dev && !strcmp(dev, "cuda")) {
        g_device = TUNA_DEVICE_CUDA;
        if (dt && !strcmp(dt, "bfloat16")) g_gpu_dtype = TUNA_DTYPE_BF16;
        else if (dt && !strcmp(dt, "float16")) g_gpu_dtype = TUNA_DTYPE_F16;
        if (g_gpu_dtype != TUNA_DTYPE_F32) {
            g_tol = 3e-2;
            g_batch_tol = 3e-2;
            g_margin = 0.3f;
        }
        printf("device under test: cuda, %s\n", tuna_dtype_name(g_gpu_dtype));
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_reference_logits),
        cmocka_unit_test(test_batched_equals_alone),
        cmocka_unit_test(test_context_limit),
        cmocka_unit_test(test_trace),
        cmocka_unit_test(test_load_in_4bit),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
