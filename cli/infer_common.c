/* infer_common.c — see infer_common.h. */
#include "infer_common.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "core/status.h"

void infer_flags_init(struct infer_flags *f)
{
    memset(f, 0, sizeof *f);
    tuna_sampling_default(&f->sampling);
    f->max_tokens = 256;
    f->model.device = TUNA_DEVICE_AUTO;
}

bool infer_device_parse(struct tuna_model_opts *o, int argc, char **argv, int *i, bool *bad)
{
    const char *s;
    if (tuna_cli_opt_str(argc, argv, i, "--device", &s, bad)) {
        if (!strcmp(s, "cpu")) o->device = TUNA_DEVICE_CPU;
        else if (!strcmp(s, "auto")) o->device = TUNA_DEVICE_AUTO;
        else if (!strncmp(s, "cuda", 4)) {
            o->device = TUNA_DEVICE_CUDA;
            o->cuda_device = s[4] == ':' ? atoi(s + 5) : 0;
        } else {
            fprintf(stderr, "--device wants cpu, cuda, cuda:N or auto, got '%s'\n", s);
            *bad = true;
        }
        return true;
    }
    if (!strcmp(argv[*i], "--load-in-4bit")) {
        o->load_in_4bit = true;
        return true;
    }
    if (!strcmp(argv[*i], "--no-double-quant")) {
        o->no_double_quant = true;
        return true;
    }
    if (!strcmp(argv[*i], "--double-quant")) {
        o->no_double_quant = false;
        return true;
    }
    if (tuna_cli_opt_str(argc, argv, i, "--quant-type", &s, bad)) {
        if (!strcmp(s, "nf4") || !strcmp(s, "fp4")) o->quant_fp4 = !strcmp(s, "fp4");
        else {
            fprintf(stderr, "--quant-type wants nf4 or fp4, got '%s'\n", s);
            *bad = true;
        }
        return true;
    }
    {
        long long bs;
        if (tuna_cli_opt_int(argc, argv, i, "--blocksize", &bs, bad)) {
            o->quant_blocksize = (int)bs;
            return true;
        }
    }
    if (tuna_cli_opt_str(argc, argv, i, "--dtype", &s, bad)) {
        if (!strcmp(s, "auto")) o->gpu_dtype = TUNA_DTYPE_INVALID;
        else if (!strcmp(s, "bfloat16") || !strcmp(s, "bf16")) o->gpu_dtype = TUNA_DTYPE_BF16;
        else if (!strcmp(s, "float16") || !strcmp(s, "half") || !strcmp(s, "fp16")) o->gpu_dtype = TUNA_DTYPE_F16;
        else if (!strcmp(s, "float32") || !strcmp(s, "float") || !strcmp(s, "fp32")) o->gpu_dtype = TUNA_DTYPE_F32;
        else {
            fprintf(stderr, "--dtype wants auto, bfloat16, float16 or float32, got '%s'\n", s);
            *bad = true;
        }
        return true;
    }
    if (tuna_cli_opt_str(argc, argv, i, "--kv-cache-dtype", &s, bad)) {
        if (!tuna_kv_dtype_parse(s, &o->kv_cache_dtype)) {
            fprintf(stderr, "--kv-cache-dtype wants auto, bfloat16, float16, float32, fp8 or fp8_e4m3, got '%s'\n", s);
            *bad = true;
        }
        return true;
    }
    return false;
}

bool infer_flags_parse(struct infer_flags *f, int argc, char **argv, int *i, bool *bad)
{
    long long v;
    double d;
    const char *s;
    if (infer_device_parse(&f->model, argc, argv, i, bad)) return true;
    if (tuna_cli_opt_int(argc, argv, i, "--threads", &v, bad)) {
        f->model.threads = (int)v;
        return true;
    }
    if (tuna_cli_opt_int(argc, argv, i, "--max-model-len", &v, bad)) {
        f->model.max_model_len = v;
        return true;
    }
    if (tuna_cli_opt_int(argc, argv, i, "--max-tokens", &v, bad)) {
        f->max_tokens = v;
        return true;
    }
    if (tuna_cli_opt_float(argc, argv, i, "--temperature", &d, bad)) {
        f->sampling.temperature = (float)d;
        f->set_temperature = true;
        return true;
    }
    if (tuna_cli_opt_int(argc, argv, i, "--top-k", &v, bad)) {
        f->sampling.top_k = v;
        f->set_top_k = true;
        return true;
    }
    if (tuna_cli_opt_float(argc, argv, i, "--top-p", &d, bad)) {
        f->sampling.top_p = (float)d;
        f->set_top_p = true;
        return true;
    }
    if (tuna_cli_opt_float(argc, argv, i, "--min-p", &d, bad)) {
        f->sampling.min_p = (float)d;
        f->set_min_p = true;
        return true;
    }
    if (tuna_cli_opt_float(argc, argv, i, "--repetition-penalty", &d, bad)) {
        f->sampling.repetition_penalty = (float)d;
        f->set_rep = true;
        return true;
    }
    if (tuna_cli_opt_float(argc, argv, i, "--presence-penalty", &d, bad)) {
        f->sampling.presence_penalty = (float)d;
        return true;
    }
    if (tuna_cli_opt_float(argc, argv, i, "--frequency-penalty", &d, bad)) {
        f->sampling.frequency_penalty = (float)d;
        return true;
    }
    if (tuna_cli_opt_int(argc, argv, i, "--seed", &v, bad)) {
        f->sampling.seed = (uint64_t)v;
        f->sampling.has_seed = true;
        return true;
    }
    if (tuna_cli_opt_str(argc, argv, i, "--stop", &s, bad)) {
        if (f->n_stop == 16) {
            fprintf(stderr, "at most 16 --stop strings\n");
            *bad = true;
        } else {
            f->stop[f->n_stop++] = s;
        }
        return true;
    }
    if (tuna_cli_opt_str(argc, argv, i, "--stop-token-ids", &s, bad)) {
        int32_t *ids;
        int64_t n;
        if (parse_id_list(s, &ids, &n)) {
            fprintf(stderr, "%s\n", tuna_last_error());
            *bad = true;
            return true;
        }
        for (int64_t k = 0; k < n && f->n_stop_ids < 32; k++) f->stop_ids[f->n_stop_ids++] = ids[k];
        free(ids);
        return true;
    }
    if (tuna_cli_flag(argv, *i, "--ignore-eos")) {
        f->ignore_eos = true;
        return true;
    }
    return false;
}

void infer_flags_help(FILE *out, bool sampling)
{
    fprintf(out, "  --device D             cpu, cuda, cuda:N or auto (default: the GPU when there is one)\n"
                 "  --dtype T              GPU compute: auto (bf16 on compute capability >= 8.0, else fp16),\n"
                 "                         bfloat16, float16, float32\n"
                 "  --kv-cache-dtype T     KV cache: auto (float32 on the CPU, the compute dtype on the GPU),\n"
                 "                         bfloat16, float16, float32, fp8 (= fp8_e4m3, GPU only: half the bytes)\n"
                 "  --load-in-4bit          quantize the decoder projections at load (NF4 + double quant,\n"
                 "                         block 64; --quant-type fp4, --no-double-quant, --blocksize N)\n"
                 "  --threads N            CPU threads (default: all)\n"
                 "  --max-model-len N      context limit (default: max_position_embeddings)\n");
    if (!sampling) return;
    fprintf(out, "  --max-tokens N         tokens to generate at most (default 256)\n"
                 "  --temperature T        0 = greedy (default: generation_config.json, else greedy)\n"
                 "  --top-k K  --top-p P  --min-p P\n"
                 "  --repetition-penalty R --presence-penalty P --frequency-penalty F   (vLLM semantics)\n"
                 "  --seed S               same seed, same output\n"
                 "  --stop STR             stop string (repeatable; not included in the output)\n"
                 "  --stop-token-ids 1,2   extra stop tokens; --ignore-eos to not stop at EOS\n");
}

tuna_status infer_flags_finish(struct infer_flags *f, const char *dir, const struct tuna_model *m,
                               struct tuna_gen_opts *o)
{
    struct tuna_gen_config gc;
    tuna_status st = tuna_gen_config_load(dir, &gc);
    if (st) return st;
    struct tuna_sampling s = f->sampling;
    if (gc.found) { /* generation_config.json gives defaults; flags win */
        if (!f->set_temperature) s.temperature = gc.sampling.temperature;
        if (!f->set_top_k) s.top_k = gc.sampling.top_k;
        if (!f->set_top_p) s.top_p = gc.sampling.top_p;
        if (!f->set_min_p) s.min_p = gc.sampling.min_p;
        if (!f->set_rep) s.repetition_penalty = gc.sampling.repetition_penalty;
    }
    if ((st = tuna_sampling_check(&s))) return st;
    f->sampling = s;
    if (!f->ignore_eos) {
        if (gc.n_eos)
            for (int i = 0; i < gc.n_eos && f->n_stop_ids < 32; i++) f->stop_ids[f->n_stop_ids++] = gc.eos_ids[i];
        else
            for (int i = 0; i < m->arch.n_eos && f->n_stop_ids < 32; i++)
                f->stop_ids[f->n_stop_ids++] = m->arch.eos_token_ids[i];
    }
    memset(o, 0, sizeof *o);
    o->sampling = s;
    o->max_tokens = f->max_tokens;
    o->stop_ids = f->stop_ids;
    o->n_stop_ids = f->n_stop_ids;
    o->stop = f->stop;
    o->n_stop = f->n_stop;
    return TUNA_OK;
}

tuna_status parse_id_list(const char *s, int32_t **ids, int64_t *n)
{
    *ids = NULL;
    *n = 0;
    int64_t cap = 1;
    for (const char *p = s; *p; p++) cap += *p == ',';
    int32_t *out = malloc(sizeof(int32_t) * (size_t)cap);
    if (!out) return tuna_fail_oom("id list", sizeof(int32_t) * (size_t)cap);
    const char *p = s;
    int64_t k = 0;
    while (*p) {
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (end == p || errno || v < 0 || v > INT32_MAX || (*end && *end != ',')) {
            free(out);
            return tuna_fail(TUNA_E_INVALID, "token id list '%s': expected comma-separated whole numbers, "
                             "problem at '%s'", s, p);
        }
        out[k++] = (int32_t)v;
        p = *end ? end + 1 : end;
    }
    if (k == 0) {
        free(out);
        return tuna_fail(TUNA_E_INVALID, "token id list is empty");
    }
    *ids = out;
    *n = k;
    return TUNA_OK;
}

tuna_status detok_stream_cb(void *ctx, int32_t id, char **piece)
{
    return tuna_detok_stream_push(ctx, id, piece);
}

int print_text_cb(void *ctx, const char *text, size_t len)
{
    (void)ctx;
    fwrite(text, 1, len, stdout);
    fflush(stdout);
    return 0;
}

tuna_status render_chat_ids(const tuna_tokenizer *tok, const struct tuna_chat_template *ct, const cJSON *messages,
                            int32_t **ids, int64_t *n)
{
    struct tuna_chat_render_opts ro = {0};
    ro.add_generation_prompt = true;
    char *text = NULL;
    tuna_status st = tuna_chat_render(ct, messages, &ro, &text);
    size_t nn = 0;
    if (!st) st = tuna_tokenizer_encode(tok, text, strlen(text), false, true, ids, &nn);
    *n = (int64_t)nn;
    free(text);
    return st;
}
