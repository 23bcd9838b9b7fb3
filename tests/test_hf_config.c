/* test_hf_config.c — src/io/hf_config.c on the fixtures' configs, real configs (MLC presets copied
 * from Hugging Face) and malformed ones. */
#include "testutil.h"

#include <math.h>

#include "core/json.h"
#include "io/hf_config.h"

static tuna_status parse(const char *json, struct tuna_arch *a)
{
    return tuna_arch_parse(json, strlen(json), "config.json", a);
}

static void test_fixture_families(void **state)
{
    (void)state;
    char dir[4200];
    struct tuna_arch a;
    if (!tt_shared_path(dir, sizeof dir, "fixtures/models")) skip();

    snprintf(dir, sizeof dir, "%s/fixtures/models/qwen3-tiny", tt_shared_dir());
    TT_OK(tuna_arch_load(dir, &a));
    assert_int_equal(a.family, TUNA_FAMILY_QWEN3);
    assert_int_equal(a.head_dim, 64); /* ≠ hidden/heads = 32 */
    assert_true(a.qk_norm);
    assert_true(a.tie_word_embeddings);
    assert_false(a.attention_bias);
    assert_true(a.rope.theta == 1000000.0);
    assert_int_equal(a.dtype, TUNA_DTYPE_BF16);
    tuna_arch_free(&a);

    snprintf(dir, sizeof dir, "%s/fixtures/models/qwen2-tiny", tt_shared_dir());
    TT_OK(tuna_arch_load(dir, &a));
    assert_true(a.attention_bias);
    assert_false(a.o_bias);
    assert_int_equal(a.sliding_window, 0);
    tuna_arch_free(&a);

    snprintf(dir, sizeof dir, "%s/fixtures/models/gemma-tiny", tt_shared_dir());
    TT_OK(tuna_arch_load(dir, &a));
    assert_int_equal(a.family, TUNA_FAMILY_GEMMA);
    assert_true(a.norm_add_one && a.embed_scale_sqrt);
    assert_int_equal(a.act, TUNA_ACT_GELU_TANH);
    assert_int_equal(a.n_kv_heads, 1);
    assert_true(fabs(a.norm_eps - 1e-5) < 1e-12);
    tuna_arch_free(&a);

    snprintf(dir, sizeof dir, "%s/fixtures/models/mistral-tiny", tt_shared_dir());
    TT_OK(tuna_arch_load(dir, &a));
    assert_int_equal(a.family, TUNA_FAMILY_MISTRAL);
    assert_int_equal(a.sliding_window, 0); /* explicit null */
    tuna_arch_free(&a);

    snprintf(dir, sizeof dir, "%s/fixtures/bnb/llama-tiny-bnb-nf4-dq", tt_shared_dir());
    TT_OK(tuna_arch_load(dir, &a));
    assert_int_equal(a.quant.method, TUNA_QUANT_BNB_4BIT);
    assert_true(a.quant.bnb_4bit_quant_type_nf4);
    assert_true(a.quant.bnb_double_quant);
    assert_int_equal(a.quant.bnb_compute_dtype, TUNA_DTYPE_F32);
    assert_int_equal(a.dtype, TUNA_DTYPE_F32);
    assert_true(a.rope.theta == 500000.0);
    tuna_arch_free(&a);

    snprintf(dir, sizeof dir, "%s/fixtures/bnb/llama-tiny-bnb-fp4", tt_shared_dir());
    TT_OK(tuna_arch_load(dir, &a));
    assert_false(a.quant.bnb_4bit_quant_type_nf4);
    tuna_arch_free(&a);
}

/* Real configs as Hugging Face ships them (copied into MLC-LLM's presets). */
static void test_real_configs(void **state)
{
    (void)state;
    char path[4200];
    if (!tt_shared_path(path, sizeof path, "peers/extracted/mlc_llm_model_presets_configs.json")) skip();
    cJSON *doc;
    TT_OK(tuna_json_load(path, 0, &doc));
    const cJSON *cfgs = tuna_json_member(doc, "configs");
    struct tuna_arch a;
    char *txt;

    txt = cJSON_PrintUnformatted(cJSON_GetObjectItem(cfgs, "llama3_2_1b"));
    TT_OK(parse(txt, &a));
    free(txt);
    assert_int_equal(a.rope.type, TUNA_ROPE_LLAMA3);
    assert_true(a.rope.factor == 32.0 && a.rope.original_max_pos == 8192 && a.rope.theta == 500000.0);
    assert_int_equal(a.n_eos, 3);
    assert_int_equal(a.eos_token_ids[2], 128009);
    assert_true(a.tie_word_embeddings);
    /* Llama-3.2-1B has 1,235,814,400 parameters */
    assert_int_equal(tuna_arch_param_count(&a), 1235814400ull);
    /* 16 layers × 8 kv heads × 64 × 2 (K,V) × 2 bytes */
    assert_int_equal(tuna_arch_kv_bytes_per_token(&a, 2), 32768);
    tuna_arch_free(&a);

    txt = cJSON_PrintUnformatted(cJSON_GetObjectItem(cfgs, "mistral_7b"));
    TT_OK(parse(txt, &a));
    free(txt);
    assert_int_equal(a.sliding_window, 4096); /* the MistralConfig default: the key is absent here */
    assert_int_equal(a.head_dim, 128);
    assert_int_equal(tuna_arch_param_count(&a), 7241732096ull);
    tuna_arch_free(&a);

    txt = cJSON_PrintUnformatted(cJSON_GetObjectItem(cfgs, "gemma_2b"));
    TT_OK(parse(txt, &a));
    free(txt);
    assert_int_equal(a.act, TUNA_ACT_GELU_TANH); /* hidden_act "gelu" is ignored, as transformers does */
    assert_true(a.tie_word_embeddings);
    assert_int_equal(tuna_arch_param_count(&a), 2506172416ull);
    tuna_arch_free(&a);

    txt = cJSON_PrintUnformatted(cJSON_GetObjectItem(cfgs, "qwen2_0_5b"));
    TT_OK(parse(txt, &a));
    free(txt);
    assert_int_equal(a.sliding_window, 0); /* use_sliding_window false */
    assert_int_equal(tuna_arch_param_count(&a), 494032768ull);
    tuna_arch_free(&a);

    txt = cJSON_PrintUnformatted(cJSON_GetObjectItem(cfgs, "qwen3_0.6b"));
    TT_OK(parse(txt, &a));
    free(txt);
    assert_int_equal(a.head_dim, 128);
    assert_int_equal(tuna_arch_param_count(&a), 596049920ull);
    tuna_arch_free(&a);

    /* families tuna does not load are refused with the list */
    txt = cJSON_PrintUnformatted(cJSON_GetObjectItem(cfgs, "gpt2"));
    TT_FAILS(parse(txt, &a), TUNA_E_UNSUPPORTED, "llama, mistral, qwen2, qwen3, gemma");
    free(txt);
    cJSON_Delete(doc);
}

static void test_rope_variants(void **state)
{
    (void)state;
    struct tuna_arch a;
    const char *base = "{\"model_type\":\"llama\",\"hidden_size\":64,\"num_hidden_layers\":1,"
                       "\"num_attention_heads\":4,\"intermediate_size\":128,\"vocab_size\":10,";
    char buf[1024];
    snprintf(buf, sizeof buf, "%s\"rope_theta\":5000,\"rope_scaling\":{\"type\":\"linear\",\"factor\":2.0}}", base);
    TT_OK(parse(buf, &a));
    assert_int_equal(a.rope.type, TUNA_ROPE_LINEAR);
    assert_true(a.rope.factor == 2.0 && a.rope.theta == 5000);
    snprintf(buf, sizeof buf, "%s\"rope_scaling\":{\"rope_type\":\"dynamic\",\"factor\":4.0}}", base);
    TT_OK(parse(buf, &a));
    assert_int_equal(a.rope.type, TUNA_ROPE_DYNAMIC);
    snprintf(buf, sizeof buf,
             "%s\"rope_parameters\":{\"rope_type\":\"yarn\",\"rope_theta\":1e6,\"factor\":4.0,"
             "\"original_max_position_embeddings\":32768}}",
             base);
    TT_OK(parse(buf, &a));
    assert_int_equal(a.rope.type, TUNA_ROPE_YARN);
    assert_true(a.rope.theta == 1e6 && a.rope.beta_fast == 32 && a.rope.beta_slow == 1);
    snprintf(buf, sizeof buf, "%s\"rope_scaling\":{\"type\":\"longrope\",\"factor\":4.0}}", base);
    TT_FAILS(parse(buf, &a), TUNA_E_UNSUPPORTED, "longrope");
    snprintf(buf, sizeof buf, "%s\"rope_scaling\":{\"rope_type\":\"llama3\",\"factor\":8.0}}", base);
    TT_FAILS(parse(buf, &a), TUNA_E_FORMAT, "original_max_position_embeddings");
    /* head_dim derived; kv heads default to heads */
    snprintf(buf, sizeof buf, "%s\"torch_dtype\":\"float16\"}", base);
    TT_OK(parse(buf, &a));
    assert_int_equal(a.head_dim, 16);
    assert_int_equal(a.n_kv_heads, 4);
    assert_int_equal(a.dtype, TUNA_DTYPE_F16);
}

static void test_quant_configs(void **state)
{
    (void)state;
    struct tuna_arch a;
    const char *base = "{\"model_type\":\"qwen2\",\"hidden_size\":64,\"num_hidden_layers\":1,"
                       "\"num_attention_heads\":4,\"intermediate_size\":128,\"vocab_size\":10,";
    char buf[1024];
    snprintf(buf, sizeof buf, "%s\"quantization_config\":{\"quant_method\":\"awq\",\"bits\":4,\"group_size\":128}}", base);
    TT_OK(parse(buf, &a));
    assert_int_equal(a.quant.method, TUNA_QUANT_AWQ);
    assert_int_equal(a.quant.bits, 4);
    assert_int_equal(a.quant.group_size, 128);
    snprintf(buf, sizeof buf, "%s\"quantization_config\":{\"quant_method\":\"gptq\",\"bits\":8}}", base);
    TT_OK(parse(buf, &a));
    assert_int_equal(a.quant.method, TUNA_QUANT_GPTQ);
    snprintf(buf, sizeof buf, "%s\"quantization_config\":{\"quant_method\":\"fp8\"}}", base);
    TT_OK(parse(buf, &a));
    assert_int_equal(a.quant.method, TUNA_QUANT_FP8);
    snprintf(buf, sizeof buf,
             "%s\"quantization_config\":{\"quant_method\":\"bitsandbytes\",\"load_in_8bit\":true,"
             "\"llm_int8_skip_modules\":[\"lm_head\",\"mlp.gate\"]}}",
             base);
    TT_OK(parse(buf, &a));
    assert_int_equal(a.quant.method, TUNA_QUANT_BNB_8BIT);
    assert_int_equal(a.quant.n_skip_modules, 2);
    assert_string_equal(a.quant.skip_modules[1], "mlp.gate");
    tuna_arch_free(&a);
    snprintf(buf, sizeof buf, "%s\"quantization_config\":{\"load_in_4bit\":true,\"bnb_4bit_quant_type\":\"int4\"}}", base);
    TT_FAILS(parse(buf, &a), TUNA_E_UNSUPPORTED, "int4");
}

static void test_malformed(void **state)
{
    (void)state;
    struct tuna_arch a;
    TT_FAILS(parse("{\"hidden_size\": 4}", &a), TUNA_E_FORMAT, "no \"model_type\"");
    TT_FAILS(parse("{\"model_type\":\"llama\",\"hidden_size\":64}", &a), TUNA_E_FORMAT, "\"num_hidden_layers\" is missing");
    TT_FAILS(parse("{\"model_type\":\"llama\",\"hidden_size\":\"64\"}", &a), TUNA_E_FORMAT, "\"hidden_size\" should be an integer");
    TT_FAILS(parse("{\"model_type\":\"llama\",\"hidden_size\":64,\"num_hidden_layers\":1,\"num_attention_heads\":4,"
                   "\"num_key_value_heads\":3,\"intermediate_size\":128,\"vocab_size\":10}",
                   &a),
             TUNA_E_FORMAT, "not a multiple");
    TT_FAILS(parse("{\"model_type\":\"llama\",\"hidden_size\":-64,\"num_hidden_layers\":1}", &a), TUNA_E_FORMAT,
             "must be positive");
    TT_FAILS(parse("{\"model_type\":\"llama\",", &a), TUNA_E_FORMAT, "not valid JSON");
    TT_FAILS(parse("[1]", &a), TUNA_E_FORMAT, "not a JSON object");
    TT_FAILS(tuna_arch_load(tt_tmpdir(), &a), TUNA_E_NOT_FOUND, "config.json");
    TT_FAILS(parse("{\"model_type\":\"llama\",\"hidden_size\":64,\"num_hidden_layers\":1,\"num_attention_heads\":4,"
                   "\"intermediate_size\":128,\"vocab_size\":10,\"hidden_act\":\"relu2\"}",
                   &a),
             TUNA_E_UNSUPPORTED, "relu2");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fixture_families), cmocka_unit_test(test_real_configs),
        cmocka_unit_test(test_rope_variants),    cmocka_unit_test(test_quant_configs),
        cmocka_unit_test(test_malformed),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
