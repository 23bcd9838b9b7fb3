/* test_lora_device.c — the LoRA device views of model.h (lin->lora_dev): made on first use or by
 * tuna_model_lora_prepare, dropped by attach and detach, so an adapter reloaded at the same
 * addresses with other values is never served from stale copies.
 * - On the CPU backend (every build) the view machinery runs through the op table's alloc/upload
 *   (host memory), and the views' contents are checked against the adapters after attach,
 *   detach, an in-place change and a re-attach at the same addresses.
 * - On a GPU (skips without one): models/pymini in float32 on CUDA against the CPU, with two
 *   adapters mixed in one batch, then detach, the same arrays refilled with other values,
 *   re-attach (same addresses): the GPU logits follow the new values; the engine path
 *   (tuna_engine_set_lora: load, unload, reload into the same slot) gives the CPU's greedy text. */
#include "testutil.h"

#include "lora/lora.h"
#include "serve/bench.h"
#include "serve/engine.h"

static struct tuna_model *load(enum tuna_device dev)
{
    struct tuna_model_opts o = {.threads = 1, .device = dev, .quiet = true, .gpu_dtype = TUNA_DTYPE_F32};
    struct tuna_model *m = NULL;
    tuna_status st = tuna_model_load(TUNA_SOURCE_DIR "/models/pymini", &o, &m);
    if (st && dev == TUNA_DEVICE_CPU) {
        print_error("models/pymini: %s\n", tuna_last_error());
        fail();
    }
    return st ? NULL : m;
}

/* Refills every A and B of the adapter in place (same addresses) with other values. */
static void refill(struct tuna_lora_adapter *a, float k)
{
    for (int i = 0; i < a->n_modules; i++) {
        struct tuna_lora_module *mod = &a->modules[i];
        for (int64_t j = 0; j < mod->r * mod->in; j++)
            mod->A[j] = mod->A[j] * k + 0.01f;
        for (int64_t j = 0; j < mod->out * mod->r; j++)
            mod->B[j] = -mod->B[j] * k;
    }
}

/* Every adapted linear's view holds the adapters' current values (in the view's dtype). */
static void check_views(struct tuna_model *m, const struct tuna_lora_adapter *const *ads, int n)
{
    TT_OK(tuna_model_lora_prepare(m));
    for (int64_t l = 0; l < m->arch.n_layers; l++) {
        struct tuna_linear *lin = &m->layers[l].q;
        const struct tuna_lora_bank *v = tuna_model_lora_on_device(m, lin);
        assert_non_null(v);
        assert_ptr_equal(v, lin->lora_dev);
        assert_int_equal(lin->n_lora, n);
        assert_int_equal(v->n, n);
        struct tuna_lora_w w[8];
        assert_true(n <= 8);
        TT_OK(m->ops->download(m->be, w, v->w, (size_t)n * sizeof w[0]));
        char name[96];
        snprintf(name, sizeof name, "model.layers.%lld.self_attn.q_proj", (long long)l);
        for (int a = 0; a < n; a++) {
            const struct tuna_lora_module *mod = tuna_lora_find(ads[a], name);
            assert_non_null(mod);
            assert_int_equal(w[a].r, mod->r);
            assert_true(w[a].r <= v->max_r);
            assert_true(w[a].scale == mod->scale);
            assert_ptr_not_equal(w[a].A, mod->A); /* a copy, not the adapter's array */
            size_t na = (size_t)(mod->r * mod->in), ba = tuna_dtype_nbytes(v->dtype, na);
            char *hA = malloc(ba), *wA = malloc(ba);
            TT_OK(m->ops->download(m->be, hA, w[a].A, ba));
            assert_true(tuna_convert_from_f32(v->dtype, mod->A, wA, na));
            assert_memory_equal(hA, wA, ba);
            free(hA), free(wA);
            /* B: slot a of B_all (checked below), rows n * rs apart */
            assert_ptr_equal(w[a].B, (const char *)v->B_all + (size_t)(a * v->rs) * tuna_dtype_nbytes(v->dtype, 1));
            assert_int_equal(w[a].ldb, n * v->rs);
        }
        /* the dense form (float32 on the CPU): slot a of A_all holds A_a (ranks past r zero), the
         * columns of slot a of B_all hold B_a */
        assert_true(v->dtype == TUNA_DTYPE_F32 && v->rs >= v->max_r && v->rs % 8 == 0);
        assert_non_null(v->A_all);
        assert_non_null(v->B_all);
        const int64_t K = lin->w.cols, N = lin->w.rows, RU = n * v->rs;
        float *hA = malloc((size_t)(RU * K) * 4), *hB = malloc((size_t)(N * RU) * 4);
        assert_true(hA && hB);
        TT_OK(m->ops->download(m->be, hA, v->A_all, (size_t)(RU * K) * 4));
        TT_OK(m->ops->download(m->be, hB, v->B_all, (size_t)(N * RU) * 4));
        for (int a = 0; a < n; a++) {
            const struct tuna_lora_module *mod = tuna_lora_find(ads[a], name);
            for (int64_t j = 0; j < v->rs; j++)
                for (int64_t k = 0; k < K; k++)
                    assert_true(hA[(a * v->rs + j) * K + k] == (j < mod->r ? mod->A[j * K + k] : 0.0f));
            for (int64_t i = 0; i < N; i++)
                for (int64_t j = 0; j < v->rs; j++)
                    assert_true(hB[i * RU + a * v->rs + j] == (j < mod->r ? mod->B[i * mod->r + j] : 0.0f));
        }
        free(hA), free(hB);
        /* q, k and v share one buffer with their A_all back to back (one shrink GEMM for the three) */
        const struct tuna_lora_bank *vk = tuna_model_lora_on_device(m, &m->layers[l].k),
                                    *vv = tuna_model_lora_on_device(m, &m->layers[l].v);
        assert_non_null(vk);
        assert_non_null(vv);
        assert_ptr_equal(vk->A_all, (const char *)v->A_all + (size_t)(RU * K) * 4);
        assert_ptr_equal(vv->A_all, (const char *)vk->A_all + (size_t)(n * vk->rs * K) * 4);
    }
    /* the adapters (tuna_serve_bench_make_adapters: all seven projections, one rank) take exactly
     * what the serve's memory plan keeps for them (host memory: no allocation granularity) */
    int64_t r = 0;
    for (int a = 0; a < ads[0]->n_modules; a++) r = ads[0]->modules[a].r > r ? ads[0]->modules[a].r : r;
    assert_int_equal(tuna_model_lora_view_bytes_made(m), tuna_model_lora_view_bytes(m, n, r));
}

static void test_views_cpu(void **state)
{
    (void)state;
    struct tuna_model *m = load(TUNA_DEVICE_CPU);
    struct tuna_lora_adapter *ads[2];
    TT_OK(tuna_serve_bench_make_adapters(m, 2, 4, 3, ads));
    const struct tuna_lora_adapter *const *cads = (const struct tuna_lora_adapter *const *)ads;
    tuna_lora_attachment *att = NULL;
    TT_OK(tuna_lora_attach(m, cads, 2, &att));
    check_views(m, cads, 2);
    const struct tuna_lora *lora0 = m->layers[0].q.lora;
    const uint64_t gen = tuna_model_lora_generation(m);
    tuna_lora_detach(m, att);
    for (int64_t l = 0; l < m->arch.n_layers; l++) {
        assert_null(m->layers[l].down.lora_dev);
        assert_null(m->layers[l].q.lora_dev);
    }
    assert_true(tuna_model_lora_generation(m) != gen); /* graphs keyed by the old set die */
    refill(ads[0], 0.5f);
    refill(ads[1], 2.0f);
    TT_OK(tuna_lora_attach(m, cads, 2, &att));
    (void)lora0; /* the attachment's arrays may well be at the same address again: views must not care */
    check_views(m, cads, 2);
    /* a linear whose array is swapped by hand (no invalidate) is noticed by its source pointer */
    struct tuna_linear *lin = &m->layers[1].q; /* has a view (check_views) */
    const struct tuna_lora *saved = lin->lora;
    struct tuna_lora copy[2];
    memcpy(copy, saved, sizeof copy);
    lin->lora = copy;
    const uint64_t gen2 = tuna_model_lora_generation(m);
    const struct tuna_lora_bank *v = tuna_model_lora_on_device(m, lin);
    assert_non_null(v);
    assert_ptr_equal(lin->lora_dev_src, copy);
    assert_true(tuna_model_lora_generation(m) != gen2);
    lin->lora = saved;
    tuna_lora_detach(m, att);
    tuna_lora_free(ads[0]);
    tuna_lora_free(ads[1]);
    tuna_model_free(m);
}

static double rel_err(const float *a, const float *b, size_t n)
{
    return tt_rel_err(a, b, n);
}

/* logits of a 3-sequence batch: adapter 0, adapter 1, base; fresh KV cache each time */
static void run_batch(struct tuna_model *m, float *out)
{
    static const int32_t p[3][5] = {{1, 20, 300, 4000, 5}, {7, 8, 9, 10, 11}, {99, 98, 97, 96, 95}};
    tuna_kv_cache *kv = NULL;
    TT_OK(tuna_model_kv_new(m, 64, 4, &kv));
    struct tuna_batch b;
    tuna_batch_init(&b);
    for (int s = 0; s < 3; s++) {
        int32_t seq;
        TT_OK(tuna_kv_seq_new(kv, &seq));
        int32_t ids[5];
        for (int i = 0; i < 5; i++) ids[i] = (int32_t)(p[s][i] % m->arch.vocab_size); /* llama-tiny: 1024 */
        TT_OK(tuna_batch_add_seq(&b, ids, 5, seq, 0, true, true));
        tuna_lora_batch_use(&b, seq, s < 2 ? s : -1);
    }
    TT_OK(tuna_model_forward(m, kv, &b, out, NULL));
    tuna_batch_free(&b);
    tuna_kv_free(kv);
}

static void test_reload_gpu(void **state)
{
    (void)state;
    struct tuna_model *g = load(TUNA_DEVICE_CUDA);
    if (!g) {
        fprintf(stderr, "SKIP: no GPU model (%s)\n", tuna_last_error());
        skip();
    }
    struct tuna_model *c = load(TUNA_DEVICE_CPU);
    const size_t n = (size_t)(15 * c->arch.vocab_size);
    float *lc = malloc(n * 4), *lg = malloc(n * 4), *lg_old = malloc(n * 4);
    struct tuna_lora_adapter *ads[2];
    TT_OK(tuna_serve_bench_make_adapters(c, 2, 8, 5, ads));
    const struct tuna_lora_adapter *const *cads = (const struct tuna_lora_adapter *const *)ads;
    tuna_lora_attachment *ac = NULL, *ag = NULL;
    for (int round = 0; round < 2; round++) {
        if (round == 1) { /* a reload at the same addresses: new values in the old arrays */
            tuna_lora_detach(c, ac);
            tuna_lora_detach(g, ag);
            refill(ads[0], 0.5f);
            refill(ads[1], 3.0f);
        }
        TT_OK(tuna_lora_attach(c, cads, 2, &ac));
        TT_OK(tuna_lora_attach(g, cads, 2, &ag));
        run_batch(c, lc);
        run_batch(g, lg);
        double e = rel_err(lg, lc, n);
        fprintf(stderr, "round %d: GPU vs CPU logits relative error %.2e\n", round, e);
        if (!(e < 1e-5)) {
            print_error("round %d: GPU logits differ from the CPU's by %.3g (stale adapter copies?)\n", round, e);
            fail();
        }
        if (round == 1) assert_true(rel_err(lg, lg_old, n) > 1e-3); /* the refill changed the outputs */
        memcpy(lg_old, lg, n * 4);
    }
    tuna_lora_detach(c, ac);
    tuna_lora_detach(g, ag);

    /* the engine (tuna_engine_set_lora attaches and prepares): the same adapters served twice
     * on the GPU, refilled in between (same addresses), each time as the CPU engine serves them */
    struct tuna_engine_config ec = {.kv_tokens = 512,
                                    .block_size = 4,
                                    .max_num_seqs = 8,
                                    .max_num_batched_tokens = 64,
                                    .enable_prefix_caching = true};
    struct tuna_serve_bench_config bc = {.n_requests = 4, .prompt_len = 9, .gen = 6, .seed = 2, .keep_outputs = true};
    for (int round = 0; round < 2; round++) {
        if (round == 1) {
            refill(ads[0], 0.25f);
            refill(ads[1], 4.0f);
        }
        struct tuna_serve_bench_result rc, rg;
        TT_OK(tuna_serve_bench_run(c, NULL, &ec, cads, 2, &bc, &rc));
        TT_OK(tuna_serve_bench_run(g, NULL, &ec, cads, 2, &bc, &rg));
        assert_int_equal(rg.completed, 4);
        for (int64_t i = 0; i < 4; i++)
            if (memcmp(rc.outputs[i], rg.outputs[i], (size_t)bc.gen * 4)) {
                print_error("engine round %d request %lld: GPU greedy ids differ from the CPU's\n", round,
                            (long long)i);
                fail();
            }
        tuna_serve_bench_result_free(&rc);
        tuna_serve_bench_result_free(&rg);
    }
    tuna_lora_free(ads[0]);
    tuna_lora_free(ads[1]);
    free(lc), free(lg), free(lg_old);
    tuna_model_free(c);
    tuna_model_free(g);
}

/* The fixture adapter (PEFT, all seven projections) on models/llama-tiny: GPU float32 logits
 * within 1e-5 of the CPU's for a batch mixing the adapter and the base model. */
static void test_fixture_gpu(void **state)
{
    (void)state;
    char md[4096], ad[4096];
    if (!tt_shared_path(md, sizeof md, "fixtures/models/llama-tiny") ||
        !tt_shared_path(ad, sizeof ad, "fixtures/lora/llama-tiny/adapter"))
        skip();
    struct tuna_model_opts og = {.threads = 1, .device = TUNA_DEVICE_CUDA, .quiet = true, .gpu_dtype = TUNA_DTYPE_F32};
    struct tuna_model_opts oc = {.threads = 1, .device = TUNA_DEVICE_CPU, .quiet = true};
    struct tuna_model *g = NULL, *c = NULL;
    if (tuna_model_load(md, &og, &g)) {
        fprintf(stderr, "SKIP: no GPU model (%s)\n", tuna_last_error());
        skip();
    }
    TT_OK(tuna_model_load(md, &oc, &c));
    struct tuna_lora_adapter *a = NULL;
    TT_OK(tuna_lora_load(ad, &a));
    const struct tuna_lora_adapter *const list[2] = {a, a};
    tuna_lora_attachment *ac = NULL, *ag = NULL;
    TT_OK(tuna_lora_attach(c, list, 2, &ac));
    TT_OK(tuna_lora_attach(g, list, 2, &ag));
    const size_t n = (size_t)(15 * c->arch.vocab_size);
    float *lc = malloc(n * 4), *lg = malloc(n * 4);
    run_batch(c, lc);
    run_batch(g, lg);
    double e = rel_err(lg, lc, n);
    fprintf(stderr, "fixture adapter: GPU float32 vs CPU logits relative error %.2e\n", e);
    if (!(e < 1e-5)) fail_msg("fixture adapter: GPU logits differ from the CPU's by %.3g", e);
    tuna_lora_detach(c, ac);
    tuna_lora_detach(g, ag);
    tuna_lora_free(a);
    free(lc), free(lg);
    tuna_model_free(c);
    tuna_model_free(g);
}

/* The dense form (backend.h lora_matmul: every slot's shrink and expand as cuBLAS GEMMs, each
 * token's slot masked in between): models/pymini in bf16 on CUDA, adapters of rank 16 and 8 (slot
 * width 16: the rank-8 slot's upper half zero) and the base model mixed in one batch of 15
 * tokens (the GEMM sizes). Against the CPU's float32 logits it must be as close as the segmented
 * kernels (TUNA_LORA_DENSE=0), and the adapters' own effect on the logits must be far larger
 * than that error (so a path that dropped or swapped an adapter fails). */
static void test_dense_gpu(void **state)
{
    (void)state;
    struct tuna_model_opts og = {.threads = 1, .device = TUNA_DEVICE_CUDA, .quiet = true, .gpu_dtype = TUNA_DTYPE_BF16};
    struct tuna_model *g = NULL;
    if (tuna_model_load(TUNA_SOURCE_DIR "/models/pymini", &og, &g)) {
        fprintf(stderr, "SKIP: no GPU model (%s)\n", tuna_last_error());
        skip();
    }
    struct tuna_model *c = load(TUNA_DEVICE_CPU);
    const size_t n = (size_t)(15 * c->arch.vocab_size);
    float *lc = malloc(n * 4), *lc0 = malloc(n * 4), *ld = malloc(n * 4), *lo = malloc(n * 4);
    assert_true(lc && lc0 && ld && lo);
    struct tuna_lora_adapter *ads[2];
    TT_OK(tuna_serve_bench_make_adapters(c, 1, 16, 21, ads));
    TT_OK(tuna_serve_bench_make_adapters(c, 1, 8, 22, ads + 1));
    const struct tuna_lora_adapter *const *cads = (const struct tuna_lora_adapter *const *)ads;
    float *lg0 = malloc(n * 4);
    assert_non_null(lg0);
    run_batch(c, lc0); /* no adapters attached: the base model for every sequence */
    run_batch(g, lg0); /* the GPU's own error without adapters (16-bit activations where they apply) */
    tuna_lora_attachment *ac = NULL, *ag = NULL;
    TT_OK(tuna_lora_attach(c, cads, 2, &ac));
    TT_OK(tuna_lora_attach(g, cads, 2, &ag));
    run_batch(c, lc);
    run_batch(g, ld);
    setenv("TUNA_LORA_DENSE", "0", 1);
    run_batch(g, lo);
    unsetenv("TUNA_LORA_DENSE");
    const double ed = rel_err(ld, lc, n), eo = rel_err(lo, lc, n), ea = rel_err(lc0, lc, n), edo = rel_err(ld, lo, n),
                 e0 = rel_err(lg0, lc0, n);
    fprintf(stderr, "bf16 vs CPU float32 logits: dense %.2e, segmented %.2e (dense vs segmented %.2e), no adapters "
                    "%.2e; the adapters move the CPU logits by %.2e\n", ed, eo, edo, e0, ea);
    /* the dense form runs on 16-bit activations where the base model does (e0), the segmented
     * kernels on float32 ones: as close as the closer of the two allows */
    const double ref = eo > e0 ? eo : e0;
    if (!(ed < 1.5 * ref + 2e-3) || !(ed < 5e-2))
        fail_msg("dense LoRA: bf16 logits %.3g from the CPU's (segmented kernels: %.3g, no adapters %.3g)", ed, eo, e0);
    if (!(ea > 2 * ed)) fail_msg("the adapters move the logits by %.3g only, against an error of %.3g", ea, ed);
    tuna_lora_detach(c, ac);
    tuna_lora_detach(g, ag);
    tuna_lora_free(ads[0]);
    tuna_lora_free(ads[1]);
    free(lc), free(lc0), free(ld), free(lo), free(lg0);
    tuna_model_free(c);
    tuna_model_free(g);
}

/* logits of one sequence of 2 tokens on adapter a (the GEMV sizes: T <= 2), fresh KV cache */
static void run_pair(struct tuna_model *m, int a, float *out)
{
    tuna_kv_cache *kv = NULL;
    TT_OK(tuna_model_kv_new(m, 16, 4, &kv));
    struct tuna_batch b;
    tuna_batch_init(&b);
    int32_t seq;
    TT_OK(tuna_kv_seq_new(kv, &seq));
    const int32_t ids[2] = {17, 230};
    TT_OK(tuna_batch_add_seq(&b, ids, 2, seq, 0, true, true));
    tuna_lora_batch_use(&b, seq, a);
    TT_OK(tuna_model_forward(m, kv, &b, out, NULL));
    tuna_batch_free(&b);
    tuna_kv_free(kv);
}

/* The LoRA fold (model.h lora_fold, docs/LORA.md): models/pymini in bf16 on CUDA loaded with 64
 * fold columns (4 slots of 16), two adapters (ranks 16 and 8: 32 of the 64 columns used, so k/up's
 * B does not start at column 0) mixed with the base model. The layout is checked on the weights;
 * at 15 tokens (the folded GEMMs) the logits must be as close to the CPU's float32 ones as the
 * unfolded dense form's; at 2 tokens (the GEMVs reading the strided rows, the segmented kernels
 * reading B from them) they must equal the unfolded model's. Then the adapters are detached,
 * refilled in place and re-attached: the folded columns are rewritten and the logits follow. */
static void test_fold_gpu(void **state)
{
    (void)state;
    struct tuna_model_opts og = {.threads = 1, .device = TUNA_DEVICE_CUDA, .quiet = true, .gpu_dtype = TUNA_DTYPE_BF16};
    struct tuna_model *g = NULL, *f = NULL;
    if (tuna_model_load(TUNA_SOURCE_DIR "/models/pymini", &og, &g)) {
        fprintf(stderr, "SKIP: no GPU model (%s)\n", tuna_last_error());
        skip();
    }
    og.lora_fold = 64;
    TT_OK(tuna_model_load(TUNA_SOURCE_DIR "/models/pymini", &og, &f));
    assert_int_equal(g->lora_fold_cols, 0);
    assert_int_equal(f->lora_fold_cols, 64);
    const int64_t C = f->arch.hidden_size;
    for (int64_t l = 0; l < f->arch.n_layers; l++) {
        const struct tuna_layer *L = &f->layers[l];
        assert_int_equal(tuna_weight_ld(&L->q.w), C + 64);
        assert_int_equal(tuna_weight_ld(&L->k.w), C + 64);
        assert_int_equal(tuna_weight_ld(&L->v.w), C + 128);
        assert_int_equal(tuna_weight_ld(&L->gate.w), C + 64);
        assert_int_equal(tuna_weight_ld(&L->up.w), C + 64);
        assert_int_equal(tuna_weight_ld(&L->o.w), L->o.w.cols);
        assert_int_equal(tuna_weight_ld(&L->down.w), L->down.w.cols);
        assert_ptr_equal(L->k.w.data, (const char *)L->k.fold_base + 64 * 2);
    }
    struct tuna_model *c = load(TUNA_DEVICE_CPU);
    const size_t n = (size_t)(15 * c->arch.vocab_size), V = (size_t)c->arch.vocab_size;
    float *lc = malloc(n * 4), *lc0 = malloc(n * 4), *ld = malloc(n * 4), *lf = malloc(n * 4);
    float *pc = malloc(2 * V * 4), *pg = malloc(2 * V * 4), *pf = malloc(2 * V * 4);
    assert_true(lc && lc0 && ld && lf && pc && pg && pf);
    struct tuna_lora_adapter *ads[2];
    TT_OK(tuna_serve_bench_make_adapters(c, 1, 16, 31, ads));
    TT_OK(tuna_serve_bench_make_adapters(c, 1, 8, 32, ads + 1));
    const struct tuna_lora_adapter *const *cads = (const struct tuna_lora_adapter *const *)ads;
    run_batch(c, lc0);
    for (int round = 0; round < 2; round++) {
        if (round == 1) {
            refill(ads[0], 2.0f);
            refill(ads[1], 0.5f);
        }
        tuna_lora_attachment *ac = NULL, *ag = NULL, *af = NULL;
        TT_OK(tuna_lora_attach(c, cads, 2, &ac));
        TT_OK(tuna_lora_attach(g, cads, 2, &ag));
        TT_OK(tuna_lora_attach(f, cads, 2, &af));
        const struct tuna_lora_bank *bq = tuna_model_lora_on_device(f, &f->layers[0].q);
        const struct tuna_lora_bank *bu = tuna_model_lora_on_device(f, &f->layers[0].up);
        assert_non_null(bq);
        assert_non_null(bu);
        assert_true(bq->fold_ld == C + 64 && bq->fold_k == C + 32 && bq->fold_stride == C + 3 * 32);
        assert_true(bu->fold_ld == C + 64 && bu->fold_k == C + 32 && bu->fold_xoff == 0 && bu->fold_xcol == 32);
        run_batch(c, lc);
        run_batch(g, ld);
        run_batch(f, lf);
        const double ed = rel_err(ld, lc, n), ef = rel_err(lf, lc, n), efd = rel_err(lf, ld, n),
                     ea = rel_err(lc0, lc, n);
        fprintf(stderr, "round %d, bf16 vs CPU float32 logits at 15 tokens: dense %.2e, folded %.2e (folded vs dense "
                        "%.2e); the adapters move the CPU logits by %.2e\n", round, ed, ef, efd, ea);
        if (!(ef < 1.5 * ed + 2e-3) || !(ef < 5e-2))
            fail_msg("round %d: folded LoRA logits %.3g from the CPU's (dense form: %.3g)", round, ef, ed);
        if (!(ea > 2 * ef)) fail_msg("the adapters move the logits by %.3g only, against an error of %.3g", ea, ef);
        /* float32 activations (TUNA_ACT16=0): the dense form's expands read B from the folded rows */
        setenv("TUNA_ACT16", "0", 1);
        run_batch(f, lf);
        run_batch(g, ld);
        unsetenv("TUNA_ACT16");
        const double e32 = rel_err(lf, ld, n), e32c = rel_err(lf, lc, n);
        fprintf(stderr, "round %d, float32 activations: folded vs unfolded %.2e, vs CPU %.2e\n", round, e32, e32c);
        if (!(e32 < 1e-3)) fail_msg("float32 activations: folded and unfolded logits differ by %.3g", e32);
        for (int a = 0; a < 2; a++) {
            run_pair(c, a, pc);
            run_pair(g, a, pg);
            run_pair(f, a, pf);
            const double e2 = rel_err(pf, pg, 2 * V), e2c = rel_err(pf, pc, 2 * V);
            fprintf(stderr, "round %d adapter %d at 2 tokens: folded vs unfolded %.2e%s, vs CPU %.2e\n", round, a, e2,
                    memcmp(pf, pg, 2 * V * 4) ? "" : " (identical)", e2c);
            if (!(e2 < 1e-6)) fail_msg("2 tokens: the folded model's logits differ from the unfolded by %.3g", e2);
        }
        tuna_lora_detach(c, ac);
        tuna_lora_detach(g, ag);
        tuna_lora_detach(f, af);
    }
    /* float16 compute from the bf16 checkpoint: the folded weights are converted on their way
     * into the padded rows (the staging path of move_weight_ld, not the straight upload) */
    og.gpu_dtype = TUNA_DTYPE_F16;
    struct tuna_model *f16 = NULL, *g16 = NULL;
    TT_OK(tuna_model_load(TUNA_SOURCE_DIR "/models/pymini", &og, &f16));
    og.lora_fold = 0;
    TT_OK(tuna_model_load(TUNA_SOURCE_DIR "/models/pymini", &og, &g16));
    assert_int_equal(f16->lora_fold_cols, 64);
    assert_int_equal(tuna_weight_ld(&f16->layers[0].v.w), C + 128);
    tuna_lora_attachment *a16 = NULL, *b16 = NULL;
    TT_OK(tuna_lora_attach(f16, cads, 2, &a16));
    TT_OK(tuna_lora_attach(g16, cads, 2, &b16));
    run_pair(f16, 1, pf);
    run_pair(g16, 1, pg);
    const double e16 = rel_err(pf, pg, 2 * V);
    fprintf(stderr, "float16 at 2 tokens: folded vs unfolded %.2e\n", e16);
    if (!(e16 < 1e-6)) fail_msg("float16: the folded model's logits differ from the unfolded by %.3g", e16);
    run_batch(f16, lf);
    run_batch(g16, ld);
    const double ef16 = rel_err(lf, lc, n), ed16 = rel_err(ld, lc, n);
    fprintf(stderr, "float16 at 15 tokens vs CPU float32: folded %.2e, dense %.2e\n", ef16, ed16);
    if (!(ef16 < 1.5 * ed16 + 2e-3)) fail_msg("float16: folded logits %.3g from the CPU's (dense %.3g)", ef16, ed16);
    tuna_lora_detach(f16, a16);
    tuna_lora_detach(g16, b16);
    tuna_model_free(f16);
    tuna_model_free(g16);
    tuna_lora_free(ads[0]);
    tuna_lora_free(ads[1]);
    free(lc), free(lc0), free(ld), free(lf), free(pc), free(pg), free(pf);
    tuna_model_free(c);
    tuna_model_free(g);
    tuna_model_free(f);
}

/* tuna_lora_fold_for: the fold's columns that tuna serve and bench --serve ask the load for */
static void test_fold_cols(void **state)
{
    (void)state;
    assert_int_equal(tuna_lora_fold_for(8, 16), 128);
    assert_int_equal(tuna_lora_fold_for(8, 12), 128); /* a slot is the rank rounded up to 8 */
    assert_int_equal(tuna_lora_fold_for(2, 1), 16);
    assert_int_equal(tuna_lora_fold_for(64, (int64_t)1 << 20), (int64_t)64 << 20);
    assert_int_equal(tuna_lora_fold_for(0, 16), 0);                 /* no adapters: no fold */
    assert_int_equal(tuna_lora_fold_for(8, ((int64_t)1 << 20) + 1), 0); /* no model could fold it */
    assert_int_equal(tuna_lora_fold_for(8, INT64_MAX), 0);          /* no overflow */
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_views_cpu),
        cmocka_unit_test(test_fold_cols),
        cmocka_unit_test(test_reload_gpu),
        cmocka_unit_test(test_fixture_gpu),
        cmocka_unit_test(test_dense_gpu),
        cmocka_unit_test(test_fold_gpu),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
