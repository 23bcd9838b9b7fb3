/* test_perplexity.c — pymini's held-out perplexity against eval.json (transformers, float32
 * compute on the bf16 weights): within 0.1%. Also the window arithmetic on a short stream. */
#include "testutil.h"

#include <math.h>

#include "core/file.h"
#include "core/json.h"
#include "model/perplexity.h"
#include "tokenizer/tokenizer.h"

static void test_pymini_heldout(void **state)
{
    (void)state;
    char dir[4096], txt[4200], ev[4200];
    if (!tt_shared_path(dir, sizeof dir, "fixtures/models/pymini")) skip();
    snprintf(txt, sizeof txt, "%s/heldout.txt", dir);
    snprintf(ev, sizeof ev, "%s/eval.json", dir);
    cJSON *doc;
    TT_OK(tuna_json_load(ev, 0, &doc));
    double want = 0;
    int64_t want_n = 0;
    tuna_status st;
    assert_true(tuna_json_get_num(doc, "heldout_ppl_bf16_weights_fp32_compute", &want, &st, ev));
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
    struct tuna_model_opts o = {2, 0};
    TT_OK(tuna_model_load(dir, &o, &m));
    struct tuna_ppl_result r;
    TT_OK(tuna_perplexity(m, ids, (int64_t)n, 256, 256, NULL, NULL, &r));
    printf("  pymini heldout: ppl %.6f (reference %.6f, rel diff %.2e), %lld targets (reference %lld)\n", r.ppl,
           want, fabs(r.ppl - want) / want, (long long)r.targets, (long long)want_n);
    assert_int_equal(r.targets, want_n);
    assert_true(fabs(r.ppl - want) / want < 1e-3);
    /* a sliding window scores each target once: same count as one pass over the windows' span */
    struct tuna_ppl_result r2;
    TT_OK(tuna_perplexity(m, ids, 600, 128, 64, NULL, NULL, &r2));
    assert_int_equal(r2.windows, (600 - 128 - 1 + 63) / 64);
    assert_int_equal(r2.targets, 127 + (r2.windows - 1) * 64);
    TT_FAILS(tuna_perplexity(m, ids, 100, 256, 256, NULL, NULL, &r2), TUNA_E_INVALID, "fewer than --ctx");
    TT_FAILS(tuna_perplexity(m, ids, (int64_t)n, 5000, 256, NULL, NULL, &r2), TUNA_E_RANGE, "context limit");
    tuna_model_free(m);
    free(ids);
    tuna_tokenizer_free(tok);
    free(text);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pymini_heldout),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
