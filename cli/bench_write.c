/* bench_write.c — `tuna bench --synthetic NAME --write-synthetic DIR`: the synthetic model of
 * cmd_bench.c (real shapes, random bf16 weights) written as a Hugging Face model folder, so that
 * whole-program measurements (start-up of `tuna serve`, bench/serve_startup.sh) run on 8B shapes
 * without a download:
 *   config.json                                  LlamaForCausalLM, the architecture's numbers
 *   model-0000i-of-0000n.safetensors + index     shards of at most 5 GB, as transformers writes
 *   tokenizer.json, tokenizer_config.json        a minimal byte-level BPE made here (below)
 *   generation_config.json                       bos/eos ids
 * The tokenizer is not Llama 3's: ids 0..255 are the 256 bytes (GPT-2's byte-to-unicode
 * alphabet, no merges, so text encodes one token per byte), ids 256..127999 are placeholder
 * tokens "<synth_N>" that decode to that text, and 128000..128255 are special tokens at Llama 3's
 * ids for <|begin_of_text|>, <|end_of_text|>, <|start_header_id|>, <|end_header_id|>, <|eot_id|>
 * and <|reserved_special_token_N|> placeholders for the rest. It covers
 * every id the model can produce, so whatever a random model generates decodes. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "bench.h"
#include "cli.h"
#include "core/file.h"
#include "core/status.h"
#include "tokenizer/tokenizer.h"

static void usage(FILE *f)
{
    fprintf(f, "usage: tuna bench --synthetic llama-3.2-1b|llama-3-8b --write-synthetic DIR\n\n"
               "Writes the synthetic model (random bf16 weights of the real shapes) as a model folder:\n"
               "config.json, safetensors shards of at most 5 GB with their index, a minimal byte-level\n"
               "tokenizer covering every id, generation_config.json. DIR must not exist.\n");
}

static tuna_status write_json(const char *dir, const char *name, cJSON *j)
{
    char *text = j ? cJSON_Print(j) : NULL;
    cJSON_Delete(j);
    char *path = tuna_path_join(dir, name);
    tuna_status st = (!text || !path) ? tuna_fail_oom(name, 0) : tuna_write_file_atomic(path, text, strlen(text));
    free(text);
    free(path);
    return st;
}

static cJSON *config_json(const struct tuna_arch *a)
{
    cJSON *j = cJSON_CreateObject();
    cJSON *arr = cJSON_AddArrayToObject(j, "architectures");
    cJSON_AddItemToArray(arr, cJSON_CreateString("LlamaForCausalLM"));
    cJSON_AddStringToObject(j, "model_type", "llama");
    cJSON_AddNumberToObject(j, "hidden_size", (double)a->hidden_size);
    cJSON_AddNumberToObject(j, "intermediate_size", (double)a->intermediate_size);
    cJSON_AddNumberToObject(j, "num_hidden_layers", (double)a->n_layers);
    cJSON_AddNumberToObject(j, "num_attention_heads", (double)a->n_heads);
    cJSON_AddNumberToObject(j, "num_key_value_heads", (double)a->n_kv_heads);
    cJSON_AddNumberToObject(j, "head_dim", (double)a->head_dim);
    cJSON_AddNumberToObject(j, "vocab_size", (double)a->vocab_size);
    cJSON_AddNumberToObject(j, "max_position_embeddings", (double)a->max_position_embeddings);
    cJSON_AddNumberToObject(j, "rms_norm_eps", a->norm_eps);
    cJSON_AddNumberToObject(j, "rope_theta", a->rope.theta);
    if (a->rope.type == TUNA_ROPE_LLAMA3) {
        cJSON *r = cJSON_AddObjectToObject(j, "rope_scaling");
        cJSON_AddStringToObject(r, "rope_type", "llama3");
        cJSON_AddNumberToObject(r, "factor", a->rope.factor);
        cJSON_AddNumberToObject(r, "low_freq_factor", a->rope.low_freq_factor);
        cJSON_AddNumberToObject(r, "high_freq_factor", a->rope.high_freq_factor);
        cJSON_AddNumberToObject(r, "original_max_position_embeddings", (double)a->rope.original_max_pos);
    } else {
        cJSON_AddNullToObject(j, "rope_scaling");
    }
    cJSON_AddBoolToObject(j, "tie_word_embeddings", a->tie_word_embeddings);
    cJSON_AddStringToObject(j, "hidden_act", "silu");
    cJSON_AddBoolToObject(j, "attention_bias", false);
    cJSON_AddBoolToObject(j, "mlp_bias", false);
    cJSON_AddStringToObject(j, "torch_dtype", "bfloat16");
    cJSON_AddNumberToObject(j, "bos_token_id", 128000);
    cJSON_AddNumberToObject(j, "eos_token_id", 128001);
    return j;
}

/* GPT-2's byte-to-unicode map: printable Latin-1 bytes map to themselves, the others to 256+n. */
static void byte_char(int b, char out[4])
{
    static int map[256];
    static bool init;
    if (!init) {
        int n = 0;
        for (int c = 0; c < 256; c++) {
            bool keep = (c >= 33 && c <= 126) || (c >= 161 && c <= 172) || (c >= 174 && c <= 255);
            map[c] = keep ? c : 256 + n++;
        }
        init = true;
    }
    int u = map[b];
    if (u < 0x80) {
        out[0] = (char)u;
        out[1] = 0;
    } else { /* u < 0x800: two UTF-8 bytes */
        out[0] = (char)(0xC0 | (u >> 6));
        out[1] = (char)(0x80 | (u & 0x3F));
        out[2] = 0;
    }
}

static const char *special_name(int id, char *buf, size_t cap)
{
    static const char *const named[] = {"<|begin_of_text|>",   "<|end_of_text|>",   NULL, NULL,        NULL, NULL,
                                        "<|start_header_id|>", "<|end_header_id|>", NULL, "<|eot_id|>"};
    int k = id - 128000;
    if (k < 10 && named[k]) return named[k];
    /* the others: placeholders numbered by their offset from 128000 (not Llama 3's numbering) */
    snprintf(buf, cap, "<|reserved_special_token_%d|>", k);
    return buf;
}

static cJSON *tokenizer_json(int64_t vocab)
{
    cJSON *j = cJSON_CreateObject();
    cJSON_AddStringToObject(j, "version", "1.0");
    cJSON_AddNullToObject(j, "truncation");
    cJSON_AddNullToObject(j, "padding");
    cJSON *added = cJSON_AddArrayToObject(j, "added_tokens");
    char buf[64];
    for (int64_t id = 128000; id < vocab; id++) {
        cJSON *t = cJSON_CreateObject();
        cJSON_AddNumberToObject(t, "id", (double)id);
        cJSON_AddStringToObject(t, "content", special_name((int)id, buf, sizeof buf));
        cJSON_AddBoolToObject(t, "single_word", false);
        cJSON_AddBoolToObject(t, "lstrip", false);
        cJSON_AddBoolToObject(t, "rstrip", false);
        cJSON_AddBoolToObject(t, "normalized", false);
        cJSON_AddBoolToObject(t, "special", true);
        cJSON_AddItemToArray(added, t);
    }
    cJSON_AddNullToObject(j, "normalizer");
    cJSON *pre = cJSON_AddObjectToObject(j, "pre_tokenizer");
    cJSON_AddStringToObject(pre, "type", "ByteLevel");
    cJSON_AddBoolToObject(pre, "add_prefix_space", false);
    cJSON_AddBoolToObject(pre, "trim_offsets", true);
    cJSON_AddBoolToObject(pre, "use_regex", true);
    cJSON_AddNullToObject(j, "post_processor");
    cJSON *dec = cJSON_AddObjectToObject(j, "decoder");
    cJSON_AddStringToObject(dec, "type", "ByteLevel");
    cJSON_AddBoolToObject(dec, "add_prefix_space", true);
    cJSON_AddBoolToObject(dec, "trim_offsets", true);
    cJSON_AddBoolToObject(dec, "use_regex", true);
    cJSON *m = cJSON_AddObjectToObject(j, "model");
    cJSON_AddStringToObject(m, "type", "BPE");
    cJSON_AddNullToObject(m, "dropout");
    cJSON_AddNullToObject(m, "unk_token");
    cJSON_AddNullToObject(m, "continuing_subword_prefix");
    cJSON_AddNullToObject(m, "end_of_word_suffix");
    cJSON_AddBoolToObject(m, "fuse_unk", false);
    cJSON_AddBoolToObject(m, "byte_fallback", false);
    cJSON_AddBoolToObject(m, "ignore_merges", false);
    cJSON *v = cJSON_AddObjectToObject(m, "vocab");
    int64_t n_plain = vocab < 128000 ? vocab : 128000;
    for (int64_t id = 0; id < n_plain; id++) {
        char name[32];
        if (id < 256)
            byte_char((int)id, name);
        else
            snprintf(name, sizeof name, "<synth_%lld>", (long long)id);
        cJSON_AddNumberToObject(v, name, (double)id);
    }
    cJSON_AddArrayToObject(m, "merges");
    return j;
}

static cJSON *tokenizer_config_json(void)
{
    cJSON *j = cJSON_CreateObject();
    cJSON_AddStringToObject(j, "bos_token", "<|begin_of_text|>");
    cJSON_AddStringToObject(j, "eos_token", "<|end_of_text|>");
    cJSON_AddBoolToObject(j, "add_bos_token", false);
    cJSON_AddStringToObject(j, "tokenizer_class", "PreTrainedTokenizerFast");
    return j;
}

static cJSON *generation_config_json(void)
{
    cJSON *j = cJSON_CreateObject();
    cJSON_AddNumberToObject(j, "bos_token_id", 128000);
    cJSON_AddNumberToObject(j, "eos_token_id", 128001);
    return j;
}

int bench_write_main(int argc, char **argv)
{
    const char *name = NULL, *out = NULL;
    bool bad = false;
    for (int i = 1; i < argc && !bad; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            usage(stdout);
            return 0;
        }
        if (tuna_cli_opt_str(argc, argv, &i, "--synthetic", &name, &bad) ||
            tuna_cli_opt_str(argc, argv, &i, "--write-synthetic", &out, &bad))
            continue;
        fprintf(stderr, "tuna bench --write-synthetic: unexpected argument %s\n", argv[i]);
        bad = true;
    }
    if (bad || !name || !out) {
        usage(stderr);
        return 2;
    }
    if (tuna_path_is_dir(out)) {
        fprintf(stderr, "tuna bench --write-synthetic: %s already exists; give a new folder\n", out);
        return 2;
    }
    struct tuna_arch a;
    struct synth syn;
    tuna_st_writer *w = NULL;
    char *tmp = NULL;
    tuna_status st = bench_synth_make(name, &a, &syn);
    if (st) return tuna_cli_fail("bench", st);
    if (a.vocab_size != 128256) /* the tokenizer written here has Llama 3's ids */
        st = tuna_fail(TUNA_E_UNSUPPORTED, "--write-synthetic writes models with Llama 3's vocabulary of 128256 "
                       "(llama-3-8b, llama-3.2-1b, llama-3-tiny); %s has %lld", name, (long long)a.vocab_size);
    if (!st) st = tuna_st_writer_new(&w);
    for (int i = 0; !st && i < syn.n; i++) {
        const struct tuna_tensor_view *v = &syn.views[i];
        st = tuna_st_writer_add(w, v->name, v->dtype, v->ndim, v->shape, v->data, (size_t)v->nbytes, false);
    }
    if (!st) st = tuna_atomic_dir_begin(out, &tmp);
    if (!st) {
        double bytes = 0;
        for (int i = 0; i < syn.n; i++)
            bytes += (double)syn.views[i].nbytes;
        fprintf(stderr, "tuna bench: writing %s (%.1f GB of weights)...\n", out, bytes / 1e9);
        st = tuna_st_writer_save_dir(w, tmp, "model", 5000000000ull);
    }
    if (!st) st = write_json(tmp, "config.json", config_json(&a));
    if (!st) st = write_json(tmp, "tokenizer.json", tokenizer_json(a.vocab_size));
    if (!st) st = write_json(tmp, "tokenizer_config.json", tokenizer_config_json());
    if (!st) st = write_json(tmp, "generation_config.json", generation_config_json());
    if (!st) { /* the tokenizer must load and cover the vocabulary */
        tuna_tokenizer *tok = NULL;
        st = tuna_tokenizer_load(tmp, &tok);
        tuna_tokenizer_free(tok);
    }
    if (!st)
        st = tuna_atomic_dir_commit(tmp, out, false);
    else if (tmp)
        tuna_atomic_dir_abort(tmp);
    free(tmp);
    tuna_st_writer_free(w);
    bench_synth_free(&syn);
    if (st) return tuna_cli_fail("bench", st);
    printf("wrote %s: %s, config.json, model-*.safetensors, tokenizer.json (minimal byte-level, see tuna bench "
           "--write-synthetic --help)\n",
           out, name);
    return 0;
}
