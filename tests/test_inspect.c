/* test_inspect.c — src/inspect: every fixture folder reports its real architecture and
 * quantization; contradictions between config.json and the tensors are flagged; folder names
 * never decide anything. */
#include "testutil.h"

#include <dirent.h>

#include "core/file.h"
#include "core/json.h"
#include "inspect/inspect.h"

static const cJSON *get(const cJSON *o, const char *path)
{
    char buf[256];
    snprintf(buf, sizeof buf, "%s", path);
    for (char *tok = strtok(buf, "."); tok && o; tok = strtok(NULL, ".")) o = cJSON_GetObjectItem(o, tok);
    return o;
}

static bool has_problem(const cJSON *r, const char *level, const char *needle)
{
    for (const cJSON *e = get(r, "problems")->child; e; e = e->next)
        if (!strcmp(get(e, "level")->valuestring, level) && strstr(get(e, "message")->valuestring, needle)) return true;
    return false;
}

static void dump_problems(const cJSON *r)
{
    for (const cJSON *e = get(r, "problems")->child; e; e = e->next)
        print_error("  %s: %s\n", get(e, "level")->valuestring, get(e, "message")->valuestring);
}

static void test_fixture_folders(void **state)
{
    (void)state;
    static const struct {
        const char *rel, *model_type, *found, *quant_type;
    } cases[] = {
        {"fixtures/models/llama-tiny", "llama", NULL, NULL},
        {"fixtures/models/mistral-tiny", "mistral", NULL, NULL},
        {"fixtures/models/qwen2-tiny", "qwen2", NULL, NULL},
        {"fixtures/models/qwen3-tiny", "qwen3", NULL, NULL},
        {"fixtures/models/gemma-tiny", "gemma", NULL, NULL},
        {"fixtures/models/pymini", "llama", NULL, NULL},
        {"fixtures/bnb/llama-tiny-bnb-nf4-dq", "llama", "bitsandbytes 4-bit", "nf4"},
        {"fixtures/bnb/llama-tiny-bnb-fp4", "llama", "bitsandbytes 4-bit", "fp4"},
        {"fixtures/bnb/qwen2-tiny-bnb-nf4-dq", "qwen2", "bitsandbytes 4-bit", "nf4"},
        {"fixtures/bnb/pymini-bnb-nf4-dq", "llama", "bitsandbytes 4-bit", "nf4"},
        {"fixtures/lora/llama-tiny/merged", "llama", NULL, NULL},
        {"fixtures/lora/llama-tiny-rslora/merged", "llama", NULL, NULL},
    };
    int ran = 0;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char dir[4200];
        if (!tt_shared_path(dir, sizeof dir, cases[i].rel)) continue;
        cJSON *r;
        TT_OK(tuna_inspect(dir, &r));
        assert_string_equal(get(r, "architecture.model_type")->valuestring, cases[i].model_type);
        if (tuna_inspect_error_count(r) || cJSON_GetArraySize(get(r, "problems")) != 0) {
            print_error("%s has problems:\n", cases[i].rel);
            dump_problems(r);
            fail();
        }
        const cJSON *found = get(r, "quantization.found");
        if (cases[i].found) {
            assert_string_equal(get(found, "method")->valuestring, cases[i].found);
            assert_string_equal(get(found, "quant_type")->valuestring, cases[i].quant_type);
            assert_true(get(found, "blocksize")->valuedouble == 64);
        } else {
            assert_true(cJSON_IsNull(found));
            assert_true(cJSON_IsNull(get(r, "quantization.declared")));
        }
        ran++;
        cJSON_Delete(r);
    }
    /* adapters */
    char dir[4200];
    if (tt_shared_path(dir, sizeof dir, "fixtures/lora/llama-tiny-rslora/adapter")) {
        cJSON *r;
        TT_OK(tuna_inspect(dir, &r));
        assert_string_equal(get(r, "kind")->valuestring, "adapter");
        assert_true(cJSON_IsTrue(get(r, "adapter.use_rslora")));
        assert_int_equal(get(r, "adapter.r")->valueint, 16);
        assert_int_equal(tuna_inspect_error_count(r), 0);
        cJSON_Delete(r);
    }
    if (!ran) skip();
}

/* Every folder under fixtures/ with a config.json or adapter_config.json (models, bitsandbytes
 * checkpoints, merged models, adapters, training start/end adapters) inspects without an error. */
static int g_walked;

static void walk(const char *dir)
{
    char p[4400];
    snprintf(p, sizeof p, "%s/config.json", dir);
    bool model = tuna_path_exists(p);
    snprintf(p, sizeof p, "%s/adapter_config.json", dir);
    bool adapter = tuna_path_exists(p);
    if (model || adapter) {
        cJSON *r;
        TT_OK(tuna_inspect(dir, &r));
        if (tuna_inspect_error_count(r)) {
            print_error("%s:\n", dir);
            dump_problems(r);
            fail();
        }
        assert_string_equal(get(r, "kind")->valuestring, model ? "model" : "adapter");
        cJSON_Delete(r);
        g_walked++;
    }
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
        if (tuna_path_is_dir(p)) walk(p);
    }
    closedir(d);
}

static void test_every_fixture_folder(void **state)
{
    (void)state;
    char dir[4200];
    if (!tt_shared_path(dir, sizeof dir, "fixtures")) skip();
    walk(dir);
    printf("inspected %d fixture folders without an error\n", g_walked);
    assert_true(g_walked >= 20);
}

/* Makes a folder "<tmp>/<name>" holding src's model.safetensors (a link) and config text. */
static const char *make_dir(const char *name, const char *src_dir, const char *config_text)
{
    static char dir[4200];
    char path[4400], target[4400];
    snprintf(dir, sizeof dir, "%s/%s", tt_tmpdir(), name);
    assert_int_equal(tuna_mkdir_p(dir), TUNA_OK);
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    snprintf(target, sizeof target, "%s/model.safetensors", src_dir);
    unlink(path);
    assert_int_equal(symlink(target, path), 0);
    snprintf(path, sizeof path, "%s/config.json", dir);
    tt_write(path, config_text, strlen(config_text));
    return dir;
}

static char *config_with(const char *src_dir, const char *remove_key, const char *add_key, const char *add_json)
{
    char path[4300];
    snprintf(path, sizeof path, "%s/config.json", src_dir);
    cJSON *doc;
    assert_int_equal(tuna_json_load(path, 0, &doc), TUNA_OK);
    if (remove_key) cJSON_DeleteItemFromObject(doc, remove_key);
    if (add_key) {
        cJSON_DeleteItemFromObject(doc, add_key);
        cJSON_AddItemToObject(doc, add_key, cJSON_Parse(add_json));
    }
    char *text = cJSON_Print(doc);
    cJSON_Delete(doc);
    return text;
}

static void test_contradictions(void **state)
{
    (void)state;
    char bnb[4200], plain[4200];
    if (!tt_shared_path(bnb, sizeof bnb, "fixtures/bnb/llama-tiny-bnb-nf4-dq") ||
        !tt_shared_path(plain, sizeof plain, "fixtures/lora/llama-tiny/merged"))
        skip();
    cJSON *r;
    char *cfg;

    /* 4-bit tensors, no quantization_config */
    cfg = config_with(bnb, "quantization_config", NULL, NULL);
    TT_OK(tuna_inspect(make_dir("noqc", bnb, cfg), &r));
    free(cfg);
    assert_true(has_problem(r, "warning", "no quantization_config but model.layers.0"));
    assert_string_equal(get(r, "quantization.found.quant_type")->valuestring, "nf4");
    cJSON_Delete(r);

    /* a merged 16-bit model that kept a stale quantization_config */
    cfg = config_with(plain, NULL, "quantization_config",
                      "{\"quant_method\":\"bitsandbytes\",\"load_in_4bit\":true,\"bnb_4bit_quant_type\":\"nf4\"}");
    TT_OK(tuna_inspect(make_dir("stale", plain, cfg), &r));
    free(cfg);
    assert_true(has_problem(r, "warning", "stale quantization_config"));
    assert_true(cJSON_IsNull(get(r, "quantization.found")));
    cJSON_Delete(r);

    /* config says fp4, tensors are nf4 */
    cfg = config_with(bnb, NULL, "quantization_config",
                      "{\"quant_method\":\"bitsandbytes\",\"load_in_4bit\":true,\"bnb_4bit_quant_type\":\"fp4\","
                      "\"bnb_4bit_use_double_quant\":true}");
    TT_OK(tuna_inspect(make_dir("fp4nf4", bnb, cfg), &r));
    free(cfg);
    assert_true(has_problem(r, "error", "says bnb_4bit_quant_type fp4 but the tensors are nf4"));
    cJSON_Delete(r);

    /* more layers than the tensors hold; a wrong vocab size */
    cfg = config_with(plain, NULL, "num_hidden_layers", "3");
    TT_OK(tuna_inspect(make_dir("layers", plain, cfg), &r));
    free(cfg);
    assert_true(has_problem(r, "error", "model.layers.2.input_layernorm.weight is missing"));
    cJSON_Delete(r);
    cfg = config_with(plain, NULL, "vocab_size", "2048");
    TT_OK(tuna_inspect(make_dir("vocab", plain, cfg), &r));
    free(cfg);
    assert_true(has_problem(r, "error", "vocab_size 2048"));
    cJSON_Delete(r);
    cfg = config_with(plain, NULL, "num_hidden_layers", "1");
    TT_OK(tuna_inspect(make_dir("fewer", plain, cfg), &r));
    free(cfg);
    assert_true(has_problem(r, "warning", "not part of a llama model"));
    cJSON_Delete(r);

    /* a folder named like a 4-bit checkpoint that holds a 16-bit model: the name decides nothing */
    cfg = config_with(plain, NULL, NULL, NULL);
    TT_OK(tuna_inspect(make_dir("llama-tiny-bnb-4bit", plain, cfg), &r));
    free(cfg);
    assert_true(cJSON_IsNull(get(r, "quantization.found")));
    assert_int_equal(tuna_inspect_error_count(r), 0);
    cJSON_Delete(r);

    /* unsupported architecture */
    cfg = config_with(plain, NULL, "model_type", "\"falcon\"");
    TT_OK(tuna_inspect(make_dir("falcon", plain, cfg), &r));
    free(cfg);
    assert_true(has_problem(r, "error", "tuna supports llama, mistral, qwen2, qwen3, gemma"));
    cJSON_Delete(r);

    TT_FAILS(tuna_inspect("/nonexistent/folder", &r), TUNA_E_NOT_FOUND, "not a folder");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fixture_folders),
        cmocka_unit_test(test_every_fixture_folder),
        cmocka_unit_test(test_contradictions),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
