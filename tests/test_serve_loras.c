/* test_serve_loras.c — the served adapters (serve/loras.h): --lora-root path checks (.., absolute
 * paths, symlinks out of and inside the root, files, missing folders), the slot state machine
 * (names resolve only when READY, duplicates and full slots refused, rank limit, pins, an unload
 * that waits for the requests using the adapter), and the engine's between-steps attach/detach
 * (tuna_engine_set_lora) on the llama-tiny fixture with its adapter. */
#include "testutil.h"

#include <limits.h>
#include <pthread.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "serve/engine.h"
#include "serve/loras.h"

static char g_root[PATH_MAX];

static void mk(const char *rel)
{
    char p[PATH_MAX + 64];
    snprintf(p, sizeof p, "%s/%s", tt_tmpdir(), rel);
    assert_int_equal(mkdir(p, 0755), 0);
}

static void ln(const char *target, const char *rel)
{
    char p[PATH_MAX + 64];
    snprintf(p, sizeof p, "%s/%s", tt_tmpdir(), rel);
    assert_int_equal(symlink(target, p), 0);
}

/* Resolves path against g_root; expects `http` (0 = success, then the result must end in want). */
static void check_path(const char *path, int http, const char *want)
{
    struct tuna_openai_error err = {0};
    char *out = NULL;
    tuna_status st = tuna_serve_lora_path(g_root, path, &out, &err);
    if (http == 0) {
        if (st) {
            print_error("'%s' refused: %s\n", path, err.message);
            fail();
        }
        size_t n = strlen(out), w = strlen(want);
        if (n < w || strcmp(out + n - w, want)) {
            print_error("'%s' resolved to %s, wanted ...%s\n", path, out, want);
            fail();
        }
        assert_true(!strncmp(out, g_root, strlen(g_root)));
        free(out);
    } else {
        assert_int_not_equal(st, TUNA_OK);
        assert_null(out);
        if (err.http != http || !strstr(err.message, want)) {
            print_error("'%s': got %d \"%s\", wanted %d containing \"%s\"\n", path, err.http, err.message, http, want);
            fail();
        }
    }
}

static void test_paths(void **state)
{
    (void)state;
    mk("root");
    mk("root/ad1");
    mk("root/sub");
    mk("root/sub/ad2");
    mk("outside");
    mk("rootx"); /* shares the root's name as a prefix */
    char p[PATH_MAX + 64];
    snprintf(p, sizeof p, "%s/root/file", tt_tmpdir());
    tt_write(p, "x", 1);
    ln("../outside", "root/out_rel");
    snprintf(p, sizeof p, "%s/outside", tt_tmpdir());
    ln(p, "root/out_abs");
    ln("sub/ad2", "root/in_link");
    ln("../rootx", "root/to_rootx");
    char *r = realpath(tt_tmpdir(), NULL);
    assert_non_null(r);
    snprintf(g_root, sizeof g_root, "%s/root", r);
    free(r);

    check_path("ad1", 0, "/root/ad1");
    check_path("sub/ad2", 0, "/root/sub/ad2");
    check_path("sub/../ad1", 0, "/root/ad1");
    check_path("in_link", 0, "/root/sub/ad2"); /* a symlink that stays inside is fine */
    snprintf(p, sizeof p, "%s/ad1", g_root);
    check_path(p, 0, "/root/ad1"); /* absolute, inside */
    check_path("../outside", 400, "not inside --lora-root");
    check_path("sub/../../outside", 400, "not inside --lora-root");
    check_path("out_rel", 400, "not inside --lora-root");
    check_path("out_abs", 400, "not inside --lora-root");
    check_path("to_rootx", 400, "not inside --lora-root");
    check_path("../rootx", 400, "not inside --lora-root");
    check_path(".", 400, "not inside --lora-root"); /* the root itself is not an adapter folder */
    check_path("/", 400, "not inside --lora-root");
    check_path("/etc", 400, "not inside --lora-root");
    check_path("file", 400, "is not a folder");
    check_path("missing", 404, "does not exist");
    check_path("", 400, "non-empty");
    struct tuna_openai_error err;
    char *out = NULL;
    assert_int_not_equal(tuna_serve_lora_path(NULL, "ad1", &out, &err), TUNA_OK);
    assert_int_equal(err.http, 400);
    assert_non_null(strstr(err.message, "--lora-root"));
}

/* An in-memory adapter with one module of rank r (tuna_lora_free frees it). */
static struct tuna_lora_adapter *fake_adapter(int64_t r, int64_t module_r)
{
    struct tuna_lora_adapter *a = calloc(1, sizeof *a);
    assert_non_null(a);
    a->r = r;
    a->modules = calloc(1, sizeof *a->modules);
    assert_non_null(a->modules);
    a->n_modules = 1;
    a->modules[0].name = strdup("model.layers.0.self_attn.q_proj");
    a->modules[0].r = module_r;
    return a;
}

struct unpin_arg {
    struct tuna_serve_loras *L;
    int slot;
    int done;
};

static void *unpin_later(void *p)
{
    struct unpin_arg *u = p;
    struct timespec ts = {0, 200 * 1000 * 1000};
    nanosleep(&ts, NULL);
    __atomic_store_n(&u->done, 1, __ATOMIC_SEQ_CST);
    tuna_serve_loras_unpin(u->L, u->slot);
    return NULL;
}

static void test_state_machine(void **state)
{
    (void)state;
    struct tuna_serve_loras L;
    struct tuna_openai_error err;
    TT_FAILS(tuna_serve_loras_init(&L, 0, 16, NULL), TUNA_E_INVALID, "--max-loras");
    TT_FAILS(tuna_serve_loras_init(&L, 1, 0, NULL), TUNA_E_INVALID, "--max-lora-rank");
    TT_FAILS(tuna_serve_loras_init(&L, 1, 16, "/nonexistent/tuna-root"), TUNA_E_NOT_FOUND, "--lora-root");
    TT_OK(tuna_serve_loras_init(&L, 2, 16, NULL));
    int s0, s1, s2;
    int32_t k0, k1, k2;
    assert_int_equal(tuna_serve_loras_begin_load(&L, "base", "base", &s0, &k0, &err), TUNA_E_INVALID);
    assert_non_null(strstr(err.message, "base model"));
    assert_int_equal(tuna_serve_loras_begin_load(&L, "", "base", &s0, &k0, &err), TUNA_E_INVALID);
    TT_OK(tuna_serve_loras_begin_load(&L, "a", "base", &s0, &k0, &err));
    assert_int_equal(s0, 0);
    assert_int_equal(tuna_serve_loras_pin(&L, "a"), -1); /* LOADING: not served yet */
    assert_int_equal(tuna_serve_loras_begin_load(&L, "a", "base", &s1, &k1, &err), TUNA_E_INVALID);
    assert_int_equal(err.http, 400);
    assert_non_null(strstr(err.message, "already been loaded"));
    struct tuna_lora_adapter *big = fake_adapter(8, 32);
    assert_int_equal(tuna_serve_loras_check_rank(&L, big, &err), TUNA_E_INVALID);
    assert_non_null(strstr(err.message, "rank 32"));
    assert_non_null(strstr(err.message, "--max-lora-rank 16"));
    tuna_lora_free(big);
    struct tuna_lora_adapter *ad = fake_adapter(8, 8);
    TT_OK(tuna_serve_loras_check_rank(&L, ad, &err));
    assert_true(tuna_serve_loras_finish_load(&L, s0, ad, "/x/a"));
    TT_OK(tuna_serve_loras_begin_load(&L, "b", "base", &s1, &k1, &err));
    assert_int_equal(s1, 1);
    assert_int_not_equal(k0, k1);
    assert_int_equal(tuna_serve_loras_begin_load(&L, "c", "base", &s2, &k2, &err), TUNA_E_INVALID);
    assert_non_null(strstr(err.message, "all 2 adapter slots"));
    tuna_serve_loras_finish_load(&L, s1, NULL, NULL); /* "b" failed to load: slot free again */
    assert_int_equal(tuna_serve_loras_pin(&L, "b"), -1);
    TT_OK(tuna_serve_loras_begin_load(&L, "c", "base", &s2, &k2, &err));
    assert_int_equal(s2, 1);
    assert_true(k2 != k0 && k2 != k1); /* a reused slot gets a new prefix-cache key */
    assert_true(tuna_serve_loras_finish_load(&L, s2, fake_adapter(4, 4), "/x/c"));

    /* pins; an unload waits until the request using the adapter lets go */
    assert_int_equal(tuna_serve_loras_pin(&L, "a"), 0);
    assert_int_equal(tuna_serve_loras_pin(&L, "zzz"), -1);
    int slot;
    assert_int_equal(tuna_serve_loras_begin_unload(&L, "zzz", &slot, &err), TUNA_E_INVALID);
    assert_int_equal(err.http, 404);
    TT_OK(tuna_serve_loras_begin_unload(&L, "a", &slot, &err));
    assert_int_equal(slot, 0);
    assert_int_equal(tuna_serve_loras_pin(&L, "a"), -1); /* UNLOADING: new requests get 404 */
    assert_int_equal(tuna_serve_loras_begin_unload(&L, "a", &slot, &err), TUNA_E_INVALID);
    assert_int_equal(err.http, 404);
    struct unpin_arg u = {&L, 0, 0};
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, unpin_later, &u), 0);
    tuna_serve_loras_wait_unpinned(&L, 0);
    assert_int_equal(__atomic_load_n(&u.done, __ATOMIC_SEQ_CST), 1);
    pthread_join(th, NULL);
    tuna_serve_loras_finish_unload(&L, 0, true);
    assert_int_equal(tuna_serve_loras_pin(&L, "a"), -1);
    /* a failed unload (engine gone) leaves it served */
    TT_OK(tuna_serve_loras_begin_unload(&L, "c", &slot, &err));
    tuna_serve_loras_finish_unload(&L, slot, false);
    assert_int_equal(tuna_serve_loras_pin(&L, "c"), 1);
    tuna_serve_loras_unpin(&L, 1);
    /* the freed slot 0 takes the next load */
    TT_OK(tuna_serve_loras_begin_load(&L, "a", "base", &s0, &k0, &err));
    assert_int_equal(s0, 0);
    tuna_serve_loras_destroy(&L); /* frees the LOADING name and c's adapter */
}

/* Requests resolve adapter names through the registry and pin the slot until they are freed;
 * /v1/models lists the READY adapters with their parent. */
static void test_parse_pins(void **state)
{
    (void)state;
    tuna_tokenizer *tok;
    TT_OK(tuna_tokenizer_load(TUNA_SOURCE_DIR "/models/pymini", &tok));
    struct tuna_serve_loras L;
    struct tuna_openai_error err;
    TT_OK(tuna_serve_loras_init(&L, 2, 16, NULL));
    int slot;
    int32_t key;
    TT_OK(tuna_serve_loras_begin_load(&L, "loading", "pymini", &slot, &key, &err));
    TT_OK(tuna_serve_loras_begin_load(&L, "sql", "pymini", &slot, &key, &err));
    assert_true(tuna_serve_loras_finish_load(&L, slot, fake_adapter(8, 8), "/adapters/sql"));
    struct tuna_openai_ctx c = {.tok = tok,
                                .model_name = "pymini",
                                .model_root = "models/pymini",
                                .loras = &L,
                                .max_model_len = 64,
                                .vocab_size = 4096};
    tuna_sampling_default(&c.defaults);
    struct tuna_serve_params p, q, bad;
    const char *b1 = "{\"model\": \"sql\", \"prompt\": \"a\", \"max_tokens\": 2}";
    TT_OK(tuna_openai_parse(&c, TUNA_SERVE_COMPLETION, b1, strlen(b1), &p, &err));
    assert_int_equal(p.adapter, 1);
    TT_OK(tuna_openai_parse(&c, TUNA_SERVE_COMPLETION, b1, strlen(b1), &q, &err));
    assert_int_equal(L.slots[1].pins, 2);
    const char *b2 = "{\"model\": \"loading\", \"prompt\": \"a\"}";
    assert_int_not_equal(tuna_openai_parse(&c, TUNA_SERVE_COMPLETION, b2, strlen(b2), &bad, &err), TUNA_OK);
    assert_int_equal(err.http, 404);
    /* a request that fails after resolving the model lets its pin go */
    const char *b3 = "{\"model\": \"sql\", \"prompt\": \"a\", \"temperature\": -1}";
    assert_int_not_equal(tuna_openai_parse(&c, TUNA_SERVE_COMPLETION, b3, strlen(b3), &bad, &err), TUNA_OK);
    assert_int_equal(L.slots[1].pins, 2);
    char *models = tuna_openai_models_json(&c, 1);
    assert_non_null(strstr(models, "{\"id\":\"sql\",\"object\":\"model\""));
    assert_non_null(strstr(models, "\"root\":\"/adapters/sql\",\"parent\":\"pymini\""));
    assert_null(strstr(models, "loading"));
    free(models);
    tuna_serve_params_free(&q);
    assert_int_equal(L.slots[1].pins, 1);
    TT_OK(tuna_serve_loras_begin_unload(&L, "sql", &slot, &err));
    tuna_serve_params_free(&p); /* the last request using it: the unload may go on */
    assert_int_equal(L.slots[1].pins, 0);
    tuna_serve_loras_wait_unpinned(&L, slot);
    tuna_serve_loras_finish_unload(&L, slot, true);
    models = tuna_openai_models_json(&c, 1);
    assert_null(strstr(models, "sql"));
    free(models);
    tuna_serve_loras_destroy(&L);
    tuna_tokenizer_free(tok);
}

/* The engine attaches slot changes between steps; a misfit adapter leaves the model as it was. */
static void test_engine_set_lora(void **state)
{
    (void)state;
    char dir[4096], adir[4096];
    if (!tt_shared_path(dir, sizeof dir, "fixtures/models/llama-tiny") ||
        !tt_shared_path(adir, sizeof adir, "fixtures/lora/llama-tiny/adapter"))
        skip();
    struct tuna_model_opts mo = {.threads = 2, .max_model_len = 0};
    struct tuna_model *m;
    TT_OK(tuna_model_load(dir, &mo, &m));
    tuna_tokenizer *tok;
    TT_OK(tuna_tokenizer_load(dir, &tok));
    struct tuna_metrics metrics;
    tuna_metrics_init(&metrics);
    struct tuna_engine_config ec = {.kv_tokens = 1024,
                                    .block_size = 16,
                                    .max_num_seqs = 4,
                                    .max_num_batched_tokens = 256,
                                    .max_pending = 16,
                                    .max_loras = 2};
    tuna_engine *e;
    TT_OK(tuna_engine_start(m, tok, &ec, &metrics, &e));
    struct tuna_lora_adapter *ad;
    TT_OK(tuna_lora_load(adir, &ad));
    const struct tuna_lora_module *mod = &ad->modules[0];
    TT_FAILS(tuna_engine_set_lora(e, 2, ad, 7), TUNA_E_INVALID, "outside");
    TT_OK(tuna_engine_set_lora(e, 1, ad, 7));
    /* find the linear the first module adapts: it now has 2 entries, slot 0 empty, slot 1 = ad */
    int found = 0;
    for (int64_t l = 0; l < m->arch.n_layers; l++) {
        struct tuna_linear *lins[7] = {&m->layers[l].q,    &m->layers[l].k,  &m->layers[l].v,   &m->layers[l].o,
                                       &m->layers[l].gate, &m->layers[l].up, &m->layers[l].down};
        for (int k = 0; k < 7; k++)
            if (lins[k]->n_lora) {
                assert_int_equal(lins[k]->n_lora, 2);
                assert_int_equal(lins[k]->lora[0].r, 0);
                assert_true(lins[k]->lora[1].r > 0);
                if (lins[k]->lora[1].A == mod->A) found++;
            }
    }
    assert_int_equal(found, 1);
    /* a misfit: module shapes of another model; refused and the model keeps ad */
    struct tuna_lora_adapter *bad = calloc(1, sizeof *bad);
    assert_non_null(bad);
    bad->modules = calloc(1, sizeof *bad->modules);
    bad->n_modules = 1;
    bad->modules[0].name = strdup(mod->name);
    bad->modules[0].r = 1;
    bad->modules[0].in = mod->in + 1;
    bad->modules[0].out = mod->out;
    TT_FAILS(tuna_engine_set_lora(e, 0, bad, 8), TUNA_E_INVALID, "another base model");
    found = 0;
    for (int64_t l = 0; l < m->arch.n_layers; l++) {
        struct tuna_linear *lins[7] = {&m->layers[l].q,    &m->layers[l].k,  &m->layers[l].v,   &m->layers[l].o,
                                       &m->layers[l].gate, &m->layers[l].up, &m->layers[l].down};
        for (int k = 0; k < 7; k++)
            if (lins[k]->n_lora && lins[k]->lora[1].A == mod->A) found++;
    }
    assert_int_equal(found, 1);
    /* empty the slot: nothing attached any more */
    TT_OK(tuna_engine_set_lora(e, 1, NULL, -1));
    for (int64_t l = 0; l < m->arch.n_layers; l++) {
        assert_int_equal(m->layers[l].q.n_lora + m->layers[l].k.n_lora + m->layers[l].v.n_lora + m->layers[l].o.n_lora +
                             m->layers[l].gate.n_lora + m->layers[l].up.n_lora + m->layers[l].down.n_lora,
                         0);
    }
    TT_OK(tuna_engine_set_lora(e, 0, ad, 9)); /* attached again, freed with the engine */
    tuna_engine_stop(e);
    TT_FAILS(tuna_engine_set_lora(e, 0, NULL, -1), TUNA_E_INVALID, "shutting down");
    tuna_engine_free(e);
    for (int64_t l = 0; l < m->arch.n_layers; l++)
        assert_int_equal(m->layers[l].q.n_lora, 0);
    tuna_lora_free(bad);
    tuna_lora_free(ad);
    tuna_metrics_destroy(&metrics);
    tuna_tokenizer_free(tok);
    tuna_model_free(m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_paths),
        cmocka_unit_test(test_state_machine),
        cmocka_unit_test(test_parse_pins),
        cmocka_unit_test(test_engine_set_lora),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
