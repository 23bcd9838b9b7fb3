/* gguf_logits.c — float32 logits of every position of a prompt, computed by llama.cpp, written
 * as a safetensors file in the layout `tuna logits` writes ("logits" F32 [T, vocab], "input_ids"
 * I32 [T]), so that one comparison reads both. Used by scripts/check_gguf_llamacpp.sh.
 *
 * Uses only llama.cpp's public C API (llama.h). Build against a llama.cpp build tree, e.g.:
 *   cc -std=c11 -O2 scripts/gguf_logits.c -I$LCPP/include -I$LCPP/ggml/include \
 *      -L$LCPP/build/bin -Wl,-rpath,$LCPP/build/bin -lllama -lggml -lggml-base -o gguf_logits
 *
 * usage: gguf_logits MODEL.gguf (--ids 1,2,3 | --text TEXT) -o OUT.safetensors
 *                    [--threads N] [--kv f32|f16] [--print-ids] [--lora FILE [--lora-scale S]]
 *        gguf_logits MODEL.gguf --text TEXT --tokenize-only
 * --text tokenizes with llama.cpp's tokenizer (add_special = true, parse_special = true, the way
 * llama-completion tokenizes a prompt); --print-ids prints the ids used as "1,2,3" on stdout;
 * --tokenize-only prints them and stops.
 * The KV cache is float32 unless --kv f16 (llama.cpp's default) is given, and flash attention is
 * off, so that an f32 model is computed in float32 throughout.
 * --lora loads a GGUF LoRA adapter (llama_adapter_lora_init) and sets it on the context with
 * scale S (default 1, llama.cpp's --lora), as llama-cli applies it: unmerged, y += S·(alpha/r)·B(Ax).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "llama.h"

static enum ggml_log_level quiet_log_level = GGML_LOG_LEVEL_ERROR;

static void log_cb(enum ggml_log_level level, const char *text, void *ud)
{
    (void)ud;
    if (level >= quiet_log_level && level != GGML_LOG_LEVEL_CONT) fputs(text, stderr);
}

static int parse_ids(const char *s, llama_token **out, int *n)
{
    int cap = 16, k = 0;
    llama_token *v = malloc(sizeof *v * (size_t)cap);
    if (!v) return -1;
    const char *p = s;
    while (*p) {
        char *end;
        errno = 0;
        long x = strtol(p, &end, 10);
        if (end == p || errno || x < 0 || x > 0x7fffffffL) {
            fprintf(stderr, "gguf_logits: bad id list at '%s' (want comma-separated non-negative integers)\n", p);
            free(v);
            return -1;
        }
        if (k == cap) {
            cap *= 2;
            llama_token *nv = realloc(v, sizeof *v * (size_t)cap);
            if (!nv) {
                free(v);
                return -1;
            }
            v = nv;
        }
        v[k++] = (llama_token)x;
        p = end;
        if (*p == ',')
            p++;
        else if (*p) {
            fprintf(stderr, "gguf_logits: bad id list at '%s'\n", p);
            free(v);
            return -1;
        }
    }
    *out = v;
    *n = k;
    return 0;
}

/* safetensors: u64 header length, JSON header (padded with spaces to 8 bytes), data. */
static int write_safetensors(const char *path, const float *logits, int n, int vocab, const llama_token *ids)
{
    size_t lbytes = sizeof(float) * (size_t)n * (size_t)vocab, ibytes = sizeof(int32_t) * (size_t)n;
    char hdr[512];
    int hl = snprintf(hdr, sizeof hdr,
                      "{\"input_ids\":{\"dtype\":\"I32\",\"shape\":[%d],\"data_offsets\":[0,%zu]},"
                      "\"logits\":{\"dtype\":\"F32\",\"shape\":[%d,%d],\"data_offsets\":[%zu,%zu]}}",
                      n, ibytes, n, vocab, ibytes, ibytes + lbytes);
    if (hl < 0 || (size_t)hl >= sizeof hdr - 8) return -1;
    while (hl % 8)
        hdr[hl++] = ' ';
    FILE *f = fopen(path, "wb");
    if (!f) {
        fprintf(stderr, "gguf_logits: cannot write %s: %s\n", path, strerror(errno));
        return -1;
    }
    unsigned char len8[8];
    for (int i = 0; i < 8; i++)
        len8[i] = (unsigned char)(((unsigned long long)hl >> (8 * i)) & 0xff);
    int ok = fwrite(len8, 1, 8, f) == 8 && fwrite(hdr, 1, (size_t)hl, f) == (size_t)hl;
    for (int i = 0; ok && i < n; i++) {
        int32_t x = ids[i];
        ok = fwrite(&x, sizeof x, 1, f) == 1;
    }
    ok = ok && fwrite(logits, 1, lbytes, f) == lbytes;
    if (fclose(f) != 0) ok = 0;
    if (!ok) fprintf(stderr, "gguf_logits: write error on %s\n", path);
    return ok ? 0 : -1;
}

/* Decodes ids in one batch with logits at every position and writes them to out. 0 on success. */
static int decode_and_write(struct llama_model *model, const llama_token *ids, int n, int threads, const char *kv,
                            struct llama_adapter_lora *lora, float lora_scale, const char *out)
{
    int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model)), rc = 1;
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t)(n < 64 ? 64 : n);
    cp.n_batch = cp.n_ubatch = (uint32_t)n;
    cp.n_seq_max = 1;
    cp.n_threads = cp.n_threads_batch = threads;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    cp.type_k = cp.type_v = strcmp(kv, "f32") ? GGML_TYPE_F16 : GGML_TYPE_F32;
    cp.no_perf = true;
    struct llama_context *ctx = llama_init_from_model(model, cp);
    if (!ctx) {
        fprintf(stderr, "gguf_logits: cannot create a llama.cpp context\n");
        return 1;
    }
    if (lora && llama_set_adapters_lora(ctx, &lora, 1, &lora_scale) != 0) {
        fprintf(stderr, "gguf_logits: llama_set_adapters_lora failed\n");
        llama_free(ctx);
        return 1;
    }
    struct llama_batch b = llama_batch_init(n, 0, 1);
    for (int i = 0; i < n; i++) {
        b.token[i] = ids[i];
        b.pos[i] = i;
        b.n_seq_id[i] = 1;
        b.seq_id[i][0] = 0;
        b.logits[i] = 1;
    }
    b.n_tokens = n;
    float *all = malloc(sizeof *all * (size_t)n * (size_t)n_vocab);
    int d = all ? llama_decode(ctx, b) : -100;
    if (d != 0) fprintf(stderr, "gguf_logits: llama_decode returned %d\n", d);
    for (int i = 0; d == 0 && i < n; i++) {
        const float *l = llama_get_logits_ith(ctx, i);
        if (!l) {
            fprintf(stderr, "gguf_logits: no logits for position %d\n", i);
            d = -1;
        } else {
            memcpy(all + (size_t)i * (size_t)n_vocab, l, sizeof *all * (size_t)n_vocab);
        }
    }
    if (d == 0 && write_safetensors(out, all, n, n_vocab, ids) == 0) {
        rc = 0;
        fprintf(stderr, "gguf_logits: wrote logits [%d, %d] to %s\n", n, n_vocab, out);
    }
    free(all);
    llama_batch_free(b);
    llama_free(ctx);
    return rc;
}

int main(int argc, char **argv)
{
    const char *model_path = NULL, *ids_s = NULL, *text = NULL, *out = NULL, *kv = "f32", *lora_path = NULL;
    float lora_scale = 1.0f;
    int threads = 2, print_ids = 0, tok_only = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        int has_val = i + 1 < argc;
        if (!strcmp(a, "--ids") && has_val)
            ids_s = argv[++i];
        else if (!strcmp(a, "--text") && has_val)
            text = argv[++i];
        else if (!strcmp(a, "-o") && has_val)
            out = argv[++i];
        else if (!strcmp(a, "--threads") && has_val)
            threads = atoi(argv[++i]);
        else if (!strcmp(a, "--kv") && has_val)
            kv = argv[++i];
        else if (!strcmp(a, "--lora") && has_val)
            lora_path = argv[++i];
        else if (!strcmp(a, "--lora-scale") && has_val)
            lora_scale = strtof(argv[++i], NULL);
        else if (!strcmp(a, "--print-ids"))
            print_ids = 1;
        else if (!strcmp(a, "--tokenize-only"))
            tok_only = print_ids = 1;
        else if (!strcmp(a, "-v"))
            quiet_log_level = GGML_LOG_LEVEL_DEBUG;
        else if (a[0] != '-' && !model_path)
            model_path = a;
        else {
            fprintf(stderr, "gguf_logits: unexpected argument '%s'\n", a);
            return 2;
        }
    }
    if (!model_path || (!out && !tok_only) || !ids_s == !text || threads < 1 ||
        (strcmp(kv, "f32") && strcmp(kv, "f16"))) {
        fprintf(stderr, "usage: gguf_logits MODEL.gguf (--ids 1,2,3 | --text TEXT) -o OUT.safetensors "
                        "[--threads N] [--kv f32|f16] [--print-ids] [--lora FILE [--lora-scale S]] [-v]\n"
                        "       gguf_logits MODEL.gguf --text TEXT --tokenize-only\n");
        return 2;
    }
    llama_log_set(log_cb, NULL);
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    struct llama_model *model = llama_model_load_from_file(model_path, mp);
    if (!model) {
        fprintf(stderr, "gguf_logits: llama.cpp could not load %s\n", model_path);
        return 1;
    }
    struct llama_adapter_lora *lora = NULL;
    if (lora_path && !(lora = llama_adapter_lora_init(model, lora_path))) {
        fprintf(stderr, "gguf_logits: llama.cpp could not load the LoRA adapter %s\n", lora_path);
        llama_model_free(model);
        return 1;
    }
    const struct llama_vocab *vocab = llama_model_get_vocab(model);
    int n_vocab = llama_vocab_n_tokens(vocab);
    llama_token *ids = NULL;
    int n = 0, rc = 1;
    if (ids_s) {
        if (parse_ids(ids_s, &ids, &n)) goto done_model;
    } else {
        int len = (int)strlen(text), cap = len + 8;
        ids = malloc(sizeof *ids * (size_t)cap);
        if (!ids) goto done_model;
        n = llama_tokenize(vocab, text, len, ids, cap, true, true);
        if (n < 0) {
            fprintf(stderr, "gguf_logits: tokenization needs %d tokens\n", -n);
            goto done_model;
        }
    }
    if (n == 0 && !tok_only) {
        fprintf(stderr, "gguf_logits: no tokens\n");
        goto done_model;
    }
    for (int i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= n_vocab) {
            fprintf(stderr, "gguf_logits: token id %d out of range [0, %d)\n", ids[i], n_vocab);
            goto done_model;
        }
    if (print_ids) {
        for (int i = 0; i < n; i++)
            printf("%s%d", i ? "," : "", ids[i]);
        printf("\n");
    }
    if (tok_only) {
        rc = 0;
        goto done_model;
    }
    rc = decode_and_write(model, ids, n, threads, kv, lora, lora_scale, out);
done_model:
    free(ids);
    if (lora) llama_adapter_lora_free(lora);
    llama_model_free(model);
    llama_backend_free();
    return rc;
}
