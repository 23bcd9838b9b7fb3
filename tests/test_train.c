/* test_train.c — the fixture training runs (shared/fixtures/train/<run>, made by PEFT + torch, see
 * make_fixtures.py train_fixture): from adapter_init, 12 AdamW steps on batches of 2 in file
 * order; every step's loss within relative 1e-4 and gradient norm within 1e-3 of trace.json,
 * and the final adapter within 1e-3 (relative L2 per tensor) of adapter_final. Also: optimizer
 * state saved mid-run and resumed gives the same adapter as the uninterrupted run; the
 * learning-rate schedules; a NaN step is refused with the step named.
 *
 * The device under test: the CPU by default; TUNA_TEST_DEVICE=cuda runs the same runs on the GPU
 * (TUNA_TEST_GPU_DTYPE=float32|bfloat16): float32 keeps the CPU tolerances, 16-bit compute is
 * compared at loss 1e-2, gradient norm 5e-2, adapter 1e-1 (and skips the finite-difference
 * check). ctest registers train_cuda_* variants that skip without a GPU.
 */
#include "testutil.h"

#include <math.h>

#include "chat/chat.h"
#include "core/json.h"
#include "lora/lora.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"
#include "core/file.h"
#include "train/checkpoint.h"
#include "train/dataset.h"
#include "train/report.h"
#include "train/trainer.h"
#ifdef TUNA_HAVE_CUDA
#include "backend/cuda/device.h"
#endif

static enum tuna_device g_device = TUNA_DEVICE_CPU;
static enum tuna_dtype g_gpu_dtype = TUNA_DTYPE_F32;
static double g_tol_loss = 1e-4, g_tol_gn = 1e-3, g_tol_adapter = 1e-3;

static bool device_available(void)
{
    if (g_device == TUNA_DEVICE_CPU) return true;
#ifdef TUNA_HAVE_CUDA
    return tuna_cuda_device_count() > 0;
#else
    return false;
#endif
}

#define NEED_DEVICE()                                                                                  \
    do {                                                                                               \
        if (!device_available()) {                                                                     \
            fprintf(stderr, "SKIP: TUNA_TEST_DEVICE=cuda but no CUDA device (or no CUDA build)\n");    \
            skip();                                                                                    \
        }                                                                                              \
    } while (0)

static void dev_opts(struct tuna_model_opts *mo)
{
    mo->device = g_device;
    mo->gpu_dtype = g_gpu_dtype;
    mo->quiet = true;
}

struct run {
    struct tuna_model *m;
    tuna_tokenizer *tok;
    struct tuna_chat_template *tmpl;
    tuna_dataset *ds;
    struct tuna_lora_adapter *init;
    cJSON *trace;
};

static bool g_weight_arena; /* run_open: the weights in one device arena (the memory mode) */

static void run_open(struct run *r, const char *name, const char *base_rel, bool *ok)
{
    char dir[8192], base[8192], path[8400], rel[512];
    memset(r, 0, sizeof *r);
    *ok = false;
    if (!device_available()) {
        fprintf(stderr, "SKIP: TUNA_TEST_DEVICE=cuda but no CUDA device (or no CUDA build)\n");
        return;
    }
    snprintf(rel, sizeof rel, "fixtures/train/%s", name);
    if (!tt_shared_path(dir, sizeof dir, rel)) return;
    snprintf(rel, sizeof rel, "fixtures/%s", base_rel);
    if (!tt_shared_path(base, sizeof base, rel)) return;
    struct tuna_model_opts mo = {0};
    mo.threads = 2;
    dev_opts(&mo);
    mo.weight_arena = g_weight_arena; /* the offload runs load as the memory mode does */
    TT_OK(tuna_model_load(base, &mo, &r->m));
    TT_OK(tuna_tokenizer_load(base, &r->tok));
    TT_OK(tuna_chat_load(base, &r->tmpl));
    snprintf(path, sizeof path, "%s/trace.json", dir);
    TT_OK(tuna_json_load(path, 1 << 20, &r->trace));
    struct tuna_dataset_opts dopt;
    tuna_dataset_opts_default(&dopt);
    dopt.train_on_responses_only = cJSON_IsTrue(cJSON_GetObjectItem(r->trace, "responses_only"));
    snprintf(path, sizeof path, "%s/data.jsonl", dir);
    TT_OK(tuna_dataset_load(path, r->tok, r->tmpl, &dopt, &r->ds));
    snprintf(path, sizeof path, "%s/adapter_init", dir);
    TT_OK(tuna_lora_load(path, &r->init));
    *ok = true;
}

static void run_close(struct run *r)
{
    tuna_lora_free(r->init);
    tuna_dataset_free(r->ds);
    tuna_chat_free(r->tmpl);
    tuna_tokenizer_free(r->tok);
    tuna_model_free(r->m);
    cJSON_Delete(r->trace);
}

static void fixture_optim(struct tuna_optim_opts *oo)
{
    tuna_optim_opts_default(oo);
    oo->lr = 2e-3;
    oo->weight_decay = 0.01;
    oo->schedule = TUNA_LR_CONSTANT;
    oo->max_grad_norm = 0; /* no clipping */
}

/* Runs steps [s0, s1) of the fixture order; checks loss and grad norm against the trace. */
static void train_steps(struct run *r, tuna_trainer *t, int s0, int s1, bool check)
{
    const cJSON *steps = cJSON_GetObjectItem(r->trace, "trace");
    for (int s = s0; s < s1; s++) {
        size_t idx[2];
        tuna_dataset_batch_indices(r->ds, s, 2, false, 0, idx);
        const cJSON *ref = cJSON_GetArrayItem(steps, s);
        const cJSON *ex = cJSON_GetObjectItem(ref, "examples");
        assert_int_equal((int)idx[0], cJSON_GetArrayItem(ex, 0)->valueint);
        assert_int_equal((int)idx[1], cJSON_GetArrayItem(ex, 1)->valueint);
        struct tuna_train_batch b;
        TT_OK(tuna_dataset_make_batch(r->ds, idx, 2, &b));
        struct tuna_step_stats st;
        TT_OK(tuna_trainer_step(t, &b, 1, &st));
        tuna_train_batch_free(&b);
        double rl = cJSON_GetObjectItem(ref, "loss")->valuedouble;
        double rg = cJSON_GetObjectItem(ref, "grad_norm")->valuedouble;
        double el = fabs(st.loss - rl) / fabs(rl), eg = fabs(st.grad_norm - rg) / fabs(rg);
        if (check) {
            printf("  step %2d: loss %.6f (ref %.6f, rel %.1e)  grad_norm %.6f (ref %.6f, rel %.1e)\n", s + 1, st.loss,
                   rl, el, st.grad_norm, rg, eg);
            assert_true(el < g_tol_loss);
            assert_true(eg < g_tol_gn);
        }
    }
}

/* Relative L2 error of every A and B of `got` against `want`; returns the largest. */
static double adapter_err(const struct tuna_lora_adapter *got, const struct tuna_lora_adapter *want)
{
    assert_int_equal(got->n_modules, want->n_modules);
    double worst = 0;
    for (int i = 0; i < want->n_modules; i++) {
        const struct tuna_lora_module *w = &want->modules[i];
        const struct tuna_lora_module *g = tuna_lora_find(got, w->name);
        assert_non_null(g);
        assert_int_equal(g->r, w->r);
        double ea = tt_rel_err(g->A, w->A, (size_t)(w->r * w->in));
        double eb = tt_rel_err(g->B, w->B, (size_t)(w->out * w->r));
        if (ea > worst) worst = ea;
        if (eb > worst) worst = eb;
    }
    return worst;
}

/* mode 0: every activation kept; 1: gradient checkpointing; 2: the offload mode (checkpoints and
 * AdamW on the host, the MLP in chunks of 5 rows: several per sequence, one ending mid-way) */
static void fixture_run(const char *name, const char *base_rel, bool quantize, int mode)
{
    const bool ckpt = mode == 1;
    struct run r;
    bool ok;
    if (quantize && g_device != TUNA_DEVICE_CPU) {
        /* tuna_train_quantize_base works on host weights; on a GPU --load-in-4bit quantizes at
           load with the stored dtype's rounding, not the fixture's float32 quant_state */
        fprintf(stderr, "SKIP: the in-memory float32-state NF4 base is a CPU path\n");
        skip();
    }
    g_weight_arena = mode == 2;
    run_open(&r, name, base_rel, &ok);
    g_weight_arena = false;
    if (!ok) skip();
    printf("%s (base %s%s%s)\n", name, base_rel, quantize ? ", quantized on load" : "",
           mode == 2 ? ", offload" : ckpt ? ", gradient checkpointing" : "");
    if (quantize) TT_OK(tuna_train_quantize_base(r.m));
    struct tuna_lora_train_opts lo;
    tuna_lora_train_opts_default(&lo);
    lo.gradient_checkpointing = ckpt;
    lo.offload = mode == 2;
    lo.mlp_chunk_rows = mode == 2 ? 5 : 0;
    struct tuna_optim_opts oo;
    fixture_optim(&oo);
    tuna_trainer *t = NULL;
    TT_OK(tuna_trainer_new(r.m, &lo, &oo, r.init, &t));
    if (mode == 2 && g_device != TUNA_DEVICE_CPU) {
        /* the memory mode reads the (untied) embedding table from page-locked host memory */
        struct tuna_train_memory tm;
        tuna_trainer_memory(t, &tm);
        printf("  embedding in host memory: %zu bytes; weights in one arena: %s\n", tm.host_embedding,
               r.m->dev_arena ? "yes" : "no");
        assert_non_null(r.m->dev_arena);
        assert_int_equal(tm.host_embedding, (size_t)(r.m->embed.rows * r.m->embed.cols) *
                                                 (size_t)tuna_dtype_bits(r.m->embed.dtype) / 8);
    }
    { /* evaluation (no update, no dropout) of step 1's batch gives step 1's loss */
        size_t idx[2];
        tuna_dataset_batch_indices(r.ds, 0, 2, false, 0, idx);
        struct tuna_train_batch b;
        TT_OK(tuna_dataset_make_batch(r.ds, idx, 2, &b));
        double loss,
            ref =
                cJSON_GetObjectItem(cJSON_GetArrayItem(cJSON_GetObjectItem(r.trace, "trace"), 0), "loss")->valuedouble;
        TT_OK(tuna_trainer_eval(t, &b, &loss));
        tuna_train_batch_free(&b);
        assert_true(fabs(loss - ref) / ref < g_tol_loss);
        assert_int_equal(tuna_trainer_step_count(t), 0);
    }
    train_steps(&r, t, 0, 12, true);
    char out[8192], path[512], fin[8192];
    snprintf(out, sizeof out, "%s/train-%s", tt_tmpdir(), name);
    TT_OK(tuna_trainer_export(t, out, NULL, true));
    struct tuna_lora_adapter *got = NULL, *want = NULL;
    TT_OK(tuna_lora_load(out, &got));
    snprintf(path, sizeof path, "fixtures/train/%s/adapter_final", name);
    assert_non_null(tt_shared_path(fin, sizeof fin, path));
    TT_OK(tuna_lora_load(fin, &want));
    double err = adapter_err(got, want);
    double err0 = adapter_err(r.init, want);
    printf("  adapter_final: worst relative error %.2e (adapter_init: %.2e)\n", err, err0);
    assert_true(err < g_tol_adapter);
    /* the untrained start is far from the end: the comparison can fail */
    assert_true(err0 > 2 * g_tol_adapter);
    tuna_lora_free(got);
    tuna_lora_free(want);
    tuna_trainer_free(t);
    run_close(&r);
}

static void test_lora_run(void **state)
{
    (void)state;
    fixture_run("llama-tiny-lora", "models/llama-tiny", false, 0);
}
static void test_lora_responses_run(void **state)
{
    (void)state;
    fixture_run("llama-tiny-lora-responses", "models/llama-tiny", false, 0);
}
static void test_qlora_run(void **state)
{
    (void)state;
    /* the NF4 double-quant base of the run: bitsandbytes quantized the same float32 weights
       the same way when it made bnb/llama-tiny-bnb-nf4-dq */
    fixture_run("llama-tiny-qlora", "bnb/llama-tiny-bnb-nf4-dq", false, 0);
}
/* gradient checkpointing: the trainer's own forward, each layer recomputed in backward */
static void test_lora_run_checkpointing(void **state)
{
    (void)state;
    fixture_run("llama-tiny-lora", "models/llama-tiny", false, 1);
}
static void test_qlora_run_checkpointing(void **state)
{
    (void)state;
    fixture_run("llama-tiny-qlora", "bnb/llama-tiny-bnb-nf4-dq", false, 1);
}

/* the offload mode (--offload): the same runs */
static void test_lora_run_offload(void **state)
{
    (void)state;
    fixture_run("llama-tiny-lora", "models/llama-tiny", false, 2);
}
static void test_qlora_run_offload(void **state)
{
    (void)state;
    fixture_run("llama-tiny-qlora", "bnb/llama-tiny-bnb-nf4-dq", false, 2);
}

static void test_qlora_load_in_4bit(void **state)
{
    (void)state;
    /* the same run from the 16-bit base, quantized in memory as --load-in-4bit does */
    fixture_run("llama-tiny-qlora", "models/llama-tiny", true, 0);
}

/* 5 steps, save (adapter + optimizer), a new trainer from them, 7 more = 12 uninterrupted.
 * A fresh adapter (module order of the plan, not of the file), LoRA dropout (masks must repeat)
 * and gradient checkpointing. */
static void test_resume(void **state)
{
    (void)state;
    struct run r;
    bool ok;
    run_open(&r, "llama-tiny-lora", "models/llama-tiny", &ok);
    if (!ok) skip();
    struct tuna_lora_train_opts lo;
    tuna_lora_train_opts_default(&lo);
    lo.dropout = 0.1;
    lo.gradient_checkpointing = true;
    struct tuna_optim_opts oo;
    fixture_optim(&oo);
    char ck[8192], full[8192];
    snprintf(ck, sizeof ck, "%s/train-resume-ck", tt_tmpdir());
    snprintf(full, sizeof full, "%s/train-resume-full", tt_tmpdir());
    tuna_trainer *t = NULL;
    TT_OK(tuna_trainer_new(r.m, &lo, &oo, NULL, &t));
    train_steps(&r, t, 0, 12, false);
    TT_OK(tuna_trainer_export(t, full, NULL, true));
    tuna_trainer_free(t);

    TT_OK(tuna_trainer_new(r.m, &lo, &oo, NULL, &t));
    train_steps(&r, t, 0, 5, false);
    TT_OK(tuna_trainer_export(t, ck, NULL, true));
    TT_OK(tuna_trainer_save_optimizer(t, ck));
    tuna_trainer_free(t);

    struct tuna_lora_adapter *mid = NULL, *a = NULL, *b = NULL;
    TT_OK(tuna_lora_load(ck, &mid));
    TT_OK(tuna_trainer_new(r.m, &lo, &oo, mid, &t));
    TT_OK(tuna_trainer_load_optimizer(t, ck));
    assert_int_equal(tuna_trainer_step_count(t), 5);
    train_steps(&r, t, 5, 12, false);
    char res[8192];
    snprintf(res, sizeof res, "%s/train-resume-res", tt_tmpdir());
    TT_OK(tuna_trainer_export(t, res, NULL, true));
    tuna_trainer_free(t);
    TT_OK(tuna_lora_load(full, &a));
    TT_OK(tuna_lora_load(res, &b));
    double err = adapter_err(b, a);
    printf("resume after 5 steps vs uninterrupted: %.2e\n", err);
    assert_true(err == 0.0);
    assert_true(adapter_err(b, mid) > 1e-3); /* it trained on after the checkpoint */

    /* optimizer state of another plan is refused */
    lo.dropout = 0;
    lo.targets = (const char *const[]){"q_proj"};
    lo.n_targets = 1;
    TT_OK(tuna_trainer_new(r.m, &lo, &oo, NULL, &t));
    TT_FAILS(tuna_trainer_load_optimizer(t, ck), TUNA_E_FORMAT, "optimizer state");
    tuna_trainer_free(t);
    tuna_lora_free(mid);
    tuna_lora_free(a);
    tuna_lora_free(b);
    run_close(&r);
}

static void test_schedules(void **state)
{
    (void)state;
    struct tuna_optim_opts o;
    tuna_optim_opts_default(&o);
    o.lr = 1.0;
    o.warmup_steps = 4;
    o.total_steps = 14;
    o.schedule = TUNA_LR_LINEAR;
    assert_float_equal(tuna_lr_at(&o, 0), 0.0, 1e-12);
    assert_float_equal(tuna_lr_at(&o, 2), 0.5, 1e-12);
    assert_float_equal(tuna_lr_at(&o, 4), 1.0, 1e-12);
    assert_float_equal(tuna_lr_at(&o, 9), 0.5, 1e-12);
    assert_float_equal(tuna_lr_at(&o, 14), 0.0, 1e-12);
    o.schedule = TUNA_LR_COSINE;
    assert_float_equal(tuna_lr_at(&o, 9), 0.5, 1e-12);
    assert_float_equal(tuna_lr_at(&o, 4), 1.0, 1e-12);
    o.schedule = TUNA_LR_CONSTANT;
    assert_float_equal(tuna_lr_at(&o, 13), 1.0, 1e-12);
    enum tuna_lr_schedule s;
    TT_FAILS(tuna_lr_schedule_parse("cosine_with_restarts", &s), TUNA_E_INVALID, "constant, linear or cosine");
    /* clipping as torch: coef = max / (norm + 1e-6) */
    float g[2] = {3, 4};
    tuna_grad_clip(g, 2, 5.0, 1.0);
    assert_float_equal(g[0], 3.0 / (5.0 + 1e-6), 1e-6);
}

static void test_nan_step(void **state)
{
    (void)state;
    struct run r;
    bool ok;
    run_open(&r, "llama-tiny-lora", "models/llama-tiny", &ok);
    if (!ok) skip();
    struct tuna_lora_train_opts lo;
    tuna_lora_train_opts_default(&lo);
    struct tuna_optim_opts oo;
    fixture_optim(&oo);
    oo.lr = 1e30; /* one huge step, then the loss overflows */
    tuna_trainer *t = NULL;
    TT_OK(tuna_trainer_new(r.m, &lo, &oo, r.init, &t));
    tuna_status st = TUNA_OK;
    for (int s = 0; s < 4 && !st; s++) {
        size_t idx[2];
        tuna_dataset_batch_indices(r.ds, s, 2, false, 0, idx);
        struct tuna_train_batch b;
        TT_OK(tuna_dataset_make_batch(r.ds, idx, 2, &b));
        st = tuna_trainer_step(t, &b, 1, NULL);
        tuna_train_batch_free(&b);
    }
    assert_int_equal(st, TUNA_E_RANGE);
    assert_non_null(strstr(tuna_last_error(), "step "));
    printf("diverged: %s\n", tuna_last_error());
    tuna_trainer_free(t);
    run_close(&r);
}

/* Whole-model gradient check on other architectures (Qwen3 q/k norms, Gemma GeGLU and 1+w
 * norms, a 4-bit base), with LoRA dropout and gradient checkpointing: the directional derivative
 * of the loss along a random direction in each of a few parameter groups, by central
 * differences of tuna_trainer_loss_grad (same dropout masks), against grads · direction. */
static uint64_t trng = 99;
static double tgauss(void)
{
    double u = 0;
    for (int i = 0; i < 12; i++) {
        trng = trng * 6364136223846793005ULL + 1442695040888963407ULL;
        u += (double)(trng >> 11) / 9007199254740992.0;
    }
    return u - 6;
}

/* ckpt: 0 none, 1 gradient checkpointing, 2 offload with MLP chunks of 4 rows (dropout masks
 * of a chunk must be those rows' masks for the numeric and analytic gradients to agree) */
static void gradient_case(const char *model_rel, double dropout, int ckpt)
{
    char base[8192], rel[512];
    snprintf(rel, sizeof rel, "fixtures/%s", model_rel);
    if (!tt_shared_path(base, sizeof base, rel)) skip();
    NEED_DEVICE();
    if (g_device != TUNA_DEVICE_CPU && g_gpu_dtype != TUNA_DTYPE_F32) {
        fprintf(stderr, "SKIP: finite differences need float32 compute\n");
        skip();
    }
    struct tuna_model_opts mo = {0};
    mo.threads = 2;
    dev_opts(&mo);
    struct tuna_model *m = NULL;
    TT_OK(tuna_model_load(base, &mo, &m));
    struct tuna_lora_train_opts lo;
    tuna_lora_train_opts_default(&lo);
    lo.r = 4;
    lo.alpha = 8;
    lo.dropout = dropout;
    lo.gradient_checkpointing = ckpt == 1;
    lo.offload = ckpt == 2;
    lo.mlp_chunk_rows = 4;
    struct tuna_optim_opts oo;
    tuna_optim_opts_default(&oo);
    tuna_trainer *t = NULL;
    TT_OK(tuna_trainer_new(m, &lo, &oo, NULL, &t));
    const int64_t P = tuna_trainer_param_count(t);
    float *p = tuna_trainer_params(t);
    for (int64_t i = 0; i < P; i++)
        p[i] = (float)(0.05 * tgauss()); /* B != 0: A gets gradients too */
    enum { B = 2, T = 9 };
    int32_t ids[B * T], labels[B * T], attn[B * T];
    int64_t len[B] = {T, 6};
    struct tuna_train_batch b = {B, T, ids, labels, attn, len, 0};
    for (int i = 0; i < B * T; i++) {
        ids[i] = (int32_t)((uint64_t)(tgauss() * 1e6 + 1e7) % (uint64_t)m->arch.vocab_size);
        bool real = i % T < len[i / T];
        labels[i] = real && i % T != 2 ? ids[i] : TUNA_LABEL_IGNORE; /* one masked label */
        attn[i] = real;
        if (labels[i] != TUNA_LABEL_IGNORE && i % T >= 1) b.n_targets++;
    }
    double L0, Lp, Lm;
    TT_OK(tuna_trainer_loss_grad(t, &b, 1, &L0, NULL, NULL));
    float *g = malloc((size_t)P * sizeof *g), *v = calloc((size_t)P, sizeof *v), *p0 = malloc((size_t)P * sizeof *p0);
    memcpy(g, tuna_trainer_grads(t), (size_t)P * sizeof *g);
    memcpy(p0, p, (size_t)P * sizeof *p0);
    /* groups: the first module's A, the first module's B, everything */
    const int64_t a0 = 4 * m->arch.hidden_size, groups[3][2] = {{0, a0}, {a0, a0 + 4 * m->layers[0].q.w.rows}, {0, P}};
    double worst = 0;
    for (int gi = 0; gi < 3; gi++) {
        memset(v, 0, (size_t)P * sizeof *v);
        double nv = 0, gv = 0;
        for (int64_t i = groups[gi][0]; i < groups[gi][1]; i++) {
            v[i] = (float)tgauss();
            nv += (double)v[i] * v[i];
        }
        for (int64_t i = groups[gi][0]; i < groups[gi][1]; i++) {
            v[i] = (float)(v[i] / sqrt(nv));
            gv += (double)g[i] * v[i];
        }
        const double h = 2e-2;
        for (int64_t i = 0; i < P; i++)
            p[i] = (float)(p0[i] + h * v[i]);
        TT_OK(tuna_trainer_loss_grad(t, &b, 1, &Lp, NULL, NULL));
        for (int64_t i = 0; i < P; i++)
            p[i] = (float)(p0[i] - h * v[i]);
        TT_OK(tuna_trainer_loss_grad(t, &b, 1, &Lm, NULL, NULL));
        memcpy(p, p0, (size_t)P * sizeof *p);
        double num = (Lp - Lm) / (2 * h), err = fabs(num - gv) / fmax(fabs(gv), 1e-3);
        printf("  %s dropout %.2f%s group %d: g.v %.6e numeric %.6e (rel %.1e)\n", model_rel, dropout,
               ckpt == 2 ? " offload" : ckpt ? " ckpt" : "", gi, gv, num, err);
        if (err > worst) worst = err;
        assert_true(fabs(gv) > 1e-4); /* the direction sees a gradient */
    }
    assert_true(worst < 1e-2);
    /* the loss is a function of the parameters: same masks, same value */
    TT_OK(tuna_trainer_loss_grad(t, &b, 1, &Lp, NULL, NULL));
    assert_true(Lp == L0);
    free(g), free(v), free(p0);
    tuna_trainer_free(t);
    tuna_model_free(m);
}

static void test_model_gradients(void **state)
{
    (void)state;
    gradient_case("models/llama-tiny", 0.0, false);
    gradient_case("models/qwen3-tiny", 0.0, false);
    gradient_case("models/qwen3-tiny", 0.3, true);
    gradient_case("models/gemma-tiny", 0.3, false);
    gradient_case("models/qwen2-tiny", 0.0, true);
    gradient_case("bnb/llama-tiny-bnb-nf4-dq", 0.2, true);
    gradient_case("models/qwen3-tiny", 0.3, 2);
    gradient_case("models/llama-tiny", 0.2, 2);
}

/* checkpoint folder: adapter + optimizer + state, found as the latest, read back */
static void test_checkpoint_files(void **state)
{
    (void)state;
    struct run r;
    bool ok;
    run_open(&r, "llama-tiny-lora", "models/llama-tiny", &ok);
    if (!ok) skip();
    struct tuna_lora_train_opts lo;
    tuna_lora_train_opts_default(&lo);
    struct tuna_optim_opts oo;
    fixture_optim(&oo);
    tuna_trainer *t = NULL;
    TT_OK(tuna_trainer_new(r.m, &lo, &oo, r.init, &t));
    char out[8192], path[8400], latest[8400];
    snprintf(out, sizeof out, "%s/train-ckpt", tt_tmpdir());
    TT_FAILS(tuna_checkpoint_latest(out, latest, sizeof latest), TUNA_E_NOT_FOUND, "does not exist");
    double losses[3] = {7.5, 7.25, 7.0};
    struct tuna_train_state s = {0, 10, 2, 1, false, 12345678901234567ULL, losses, 0};
    for (int k = 1; k <= 3; k++) {
        train_steps(&r, t, k - 1, k, false);
        s.step = k;
        s.n_losses = k;
        TT_OK(tuna_checkpoint_save(t, &s, out, "base", path, sizeof path));
    }
    TT_OK(tuna_checkpoint_latest(out, latest, sizeof latest));
    assert_string_equal(latest, path);
    assert_non_null(strstr(latest, "checkpoint-3"));
    struct tuna_train_state rs;
    TT_OK(tuna_checkpoint_read_state(latest, &rs));
    assert_int_equal(rs.step, 3);
    assert_int_equal(rs.max_steps, 10);
    assert_true(rs.seed == 12345678901234567ULL);
    assert_false(rs.shuffle);
    assert_int_equal(rs.n_losses, 3);
    assert_true(rs.losses[2] == 7.0);
    tuna_train_state_free(&rs);
    struct tuna_lora_adapter *a = NULL;
    TT_OK(tuna_lora_load(latest, &a)); /* a PEFT folder */
    assert_int_equal(a->n_modules, r.init->n_modules);
    tuna_lora_free(a);
    /* no temporary folders left behind */
    snprintf(path, sizeof path, "%s/checkpoint-3.tmp.%d", out, (int)getpid());
    assert_false(tuna_path_exists(path));
    tuna_trainer_free(t);
    run_close(&r);
}

static void test_report(void **state)
{
    (void)state;
    char path[8192];
    snprintf(path, sizeof path, "%s/loss.svg", tt_tmpdir());
    double loss[4] = {7.4, 7.1, NAN, 6.2};
    TT_FAILS(tuna_loss_svg_write(path, loss, 0, 1, NULL), TUNA_E_INVALID, "no steps");
    TT_OK(tuna_loss_svg_write(path, loss, 4, 1, "a <b> & c"));
    char *svg = NULL;
    size_t len = 0;
    TT_OK(tuna_read_file(path, 1 << 20, &svg, &len));
    assert_non_null(strstr(svg, "<svg"));
    assert_non_null(strstr(svg, "a &lt;b&gt; &amp; c"));
    assert_non_null(strstr(svg, "<polyline"));
    assert_non_null(strstr(svg, "</svg>"));
    free(svg);
    snprintf(path, sizeof path, "%s/metrics.jsonl", tt_tmpdir());
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    struct tuna_step_stats st = {3, 5.25, 1.5, 2e-3, 100, 90, 0.5};
    tuna_metrics_write(f, &st, 0.75);
    fclose(f);
    cJSON *j = NULL;
    TT_OK(tuna_json_load(path, 1 << 20, &j));
    assert_int_equal(cJSON_GetObjectItem(j, "step")->valueint, 3);
    assert_true(cJSON_GetObjectItem(j, "loss")->valuedouble == 5.25);
    assert_true(cJSON_GetObjectItem(j, "grad_norm")->valuedouble == 1.5);
    assert_true(cJSON_GetObjectItem(j, "learning_rate")->valuedouble == 2e-3);
    assert_true(cJSON_GetObjectItem(j, "tokens_per_second")->valuedouble == 200);
    cJSON_Delete(j);
}

int main(void)
{
    const char *dev = getenv("TUNA_TEST_DEVICE"), *dt = getenv("TUNA_TEST_GPU_DTYPE");
    if (dev && !strcmp(dev, "cuda")) {
        g_device = TUNA_DEVICE_CUDA;
        if (dt && !strcmp(dt, "bfloat16")) g_gpu_dtype = TUNA_DTYPE_BF16;
        else if (dt && !strcmp(dt, "float16")) g_gpu_dtype = TUNA_DTYPE_F16;
        if (g_gpu_dtype != TUNA_DTYPE_F32) {
            g_tol_loss = 1e-2;
            g_tol_gn = 5e-2;
            g_tol_adapter = 1e-1;
        }
        printf("device under test: cuda, %s\n", tuna_dtype_name(g_gpu_dtype));
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_schedules),
        cmocka_unit_test(test_lora_run),
        cmocka_unit_test(test_lora_responses_run),
        cmocka_unit_test(test_qlora_run),
        cmocka_unit_test(test_qlora_load_in_4bit),
        cmocka_unit_test(test_lora_run_checkpointing),
        cmocka_unit_test(test_qlora_run_checkpointing),
        cmocka_unit_test(test_lora_run_offload),
        cmocka_unit_test(test_qlora_run_offload),
        cmocka_unit_test(test_model_gradients),
        cmocka_unit_test(test_resume),
        cmocka_unit_test(test_nan_step),
        cmocka_unit_test(test_checkpoint_files),
        cmocka_unit_test(test_report),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    tuna_remove_tree(tt_tmpdir()); /* adapters, checkpoints, pictures of this run */
    return rc;
}
