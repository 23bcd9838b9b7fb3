/* test_perplexity.c — pymini's held-out perplexity against eval.json (transformers, float32
 * compute on the bf16 weights): within 0.1%. Also the window arithmetic on a short stream. */
#include "testutil.h"

#include <math.h>

#include "core/file.h"
#include "core/json.h"
#include "model/perplexity.h"
#include "tokenizer/tokenizer.h"

/* The held-out text of pymini scored by model folder rel (eval.json key `key`). */
static void heldout(const char *rel, const char *key, bool extra)
{
    char dir[4096], txt[4200], ev[4200], base[4096];
    if (!tt_shared_path(dir, sizeof dir, rel) || !tt_shared_path(base, sizeof base, "fixtures/models/pymini")) skip();
    snprintf(txt, sizeof txt, "%s/heldout.txt", base);
    snprintf(ev, sizeof ev, "%s/eval.json", dir);
    cJSON *doc;
    TT_OK(tuna_json_load(ev, 0, &doc));
    double want = 0;
    int64_t want_n = 0;
    tuna_status st;
    assert_true(tuna_json_get_num(doc, key, &want, &st, ev));
    assert_true(tuna_json_get_int(doc, "heldout_tokens", &want_n, &st, ev));
    cJSON_Delete(doc);
    char *text;
    size_t len;
    TT_OK(tuna_read_file(txt, 0, &text, &len));
    tuna_tokenizer *tok;
    TT_OK(tuna_tokenizer_load(dir, &tok));
    int32_t *ids;
    size_t n;
    TT_OK(tuna_tokenizer_encode(tok, text, len, false, true, &ids, &n));
    struct tuna_model *m;
    struct tuna_model_opts o = {.threads = 2, .max_model_len = 0};
    TT_OK(tuna_model_load(dir, &o, &m));
    struct tuna_ppl_result r;
    TT_OK(tuna_perplexity(m, ids, (int64_t)n, 256, 256, NULL, NULL, &r));
    printf("  %s heldout: ppl %.6f (reference %.6f, rel diff %.2e), %lld targets (reference %lld)\n", rel, r.ppl,
           want, fabs(r.ppl - want) / want, (long long)r.targets, (long long)want_n);
    assert_int_equal(r.targets, want_n);
    assert_true(fabs(r.ppl - want) / want < 1e-3);
    if (!extra) goto out;
    /* a sliding window scores each target once: same count as one pass over the windows' span */
    struct tuna_ppl_result r2;
    TT_OK(tuna_perplexity(m, ids, 600, 128, 64, NULL, NULL, &r2));
    assert_int_equal(r2.windows, (600 - 128 - 1 + 63) / 64);
    assert_int_equal(r2.targets, 127 + (r2.windows - 1) * 64);
    TT_FAILS(tuna_perplexity(m, ids, 100, 256, 256, NULL, NULL, &r2), TUNA_E_INVALID, "fewer than --ctx");
    TT_FAILS(tuna_perplexity(m, ids, (int64_t)n, 5000, 256, NULL, NULL, &r2), TUNA_E_RANGE, "context limit");
out:
    tuna_model_free(m);
    free(ids);
    tuna_tokenizer_free(tok);
    free(text);
}

static void test_pymini_heldout(void **state)
{
    (void)state;
    heldout("fixtures/models/pymini", "heldout_ppl_bf16_weights_fp32_compute", true);
}

static void test_pymini_nf4_heldout(void **state)
{
    (void)state;
    heldout("fixtures/bnb/pymini-bnb-nf4-dq", "heldout_ppl_bnb_4bit_fp32_compute", false);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pymini_heldout),
        cmocka_unit_test(test_pymini_nf4_heldout),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
