/* inspect.c — `tuna inspect`: a report of a model (or adapter) folder from its headers.
 *
 * Quantization is found from the tensors: bitsandbytes 4-bit by `<w>.quant_state.bitsandbytes__nf4|fp4`
 * (+ `.absmax`, `.nested_absmax`), LLM.int8 by `<w>.SCB`, AWQ/GPTQ by `<w>.qweight`/`.qzeros`/`.scales`,
 * FP8 by F8 weights with `.weight_scale`. It is then compared with config.json's
 * quantization_config, and every mismatch becomes a problem with what to do.
 */
#include "inspect.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/file.h"
#include "core/json.h"
#include "core/status.h"
#include "core/strmap.h"
#include "io/hf_config.h"
#include "io/safetensors.h"

static void add_problem(cJSON *problems, const char *level, const char *fmt, ...) TUNA_PRINTF(3, 4);

static void add_problem(cJSON *problems, const char *level, const char *fmt, ...)
{
    char msg[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    cJSON *p = cJSON_CreateObject();
    cJSON_AddStringToObject(p, "level", level);
    cJSON_AddStringToObject(p, "message", msg);
    cJSON_AddItemToArray(problems, p);
}

static bool ends_with(const char *s, const char *suffix)
{
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && !strcmp(s + a - b, suffix);
}

/* --- what the tensors say about quantization --- */
struct found_quant {
    int bnb4, bnb8, awq_gptq, fp8;   /* number of weights of each kind */
    int nf4, fp4, nested;            /* among bnb4 */
    int64_t blocksize;               /* from the first quant_state (0 = none) */
    bool mixed_blocksize;
    char example[1100];               /* a weight name, for messages */
    char storage_dtype[16];          /* dtype of the packed bnb weight */
    uint64_t quantized_params;       /* logical elements of quantized weights */
};

/* Reads the quant_state JSON blob of a bnb 4-bit weight. */
static void read_quant_state(const struct tuna_tensor_view *t, struct found_quant *fq, uint64_t *numel, cJSON *problems)
{
    cJSON *doc = cJSON_ParseWithLength(t->data, t->nbytes);
    if (!doc) {
        add_problem(problems, "error", "%s is not valid quant_state JSON: the checkpoint is damaged", t->name);
        return;
    }
    const cJSON *bs = tuna_json_member(doc, "blocksize");
    if (cJSON_IsNumber(bs)) {
        if (fq->blocksize && fq->blocksize != (int64_t)bs->valuedouble) fq->mixed_blocksize = true;
        if (!fq->blocksize) fq->blocksize = (int64_t)bs->valuedouble;
    }
    const cJSON *shape = tuna_json_member(doc, "shape");
    if (cJSON_IsArray(shape)) {
        uint64_t n = 1;
        for (const cJSON *d = shape->child; d; d = d->next) n *= cJSON_IsNumber(d) ? (uint64_t)d->valuedouble : 0;
        *numel = n;
    }
    cJSON_Delete(doc);
}

static void scan_quant(const tuna_st_set *set, struct found_quant *fq, cJSON *problems)
{
    memset(fq, 0, sizeof *fq);
    char base[1024];
    for (size_t i = 0; i < tuna_st_set_count(set); i++) {
        const struct tuna_tensor_view *t = tuna_st_set_at(set, i);
        const char *q = strstr(t->name, ".quant_state.bitsandbytes__");
        if (q) {
            size_t n = (size_t)(q - t->name);
            if (n >= sizeof base) continue;
            memcpy(base, t->name, n);
            base[n] = '\0';
            fq->bnb4++;
            if (ends_with(t->name, "__nf4")) fq->nf4++;
            else fq->fp4++;
            if (!fq->example[0]) snprintf(fq->example, sizeof fq->example, "%s", base);
            const struct tuna_tensor_view *w = tuna_st_set_find(set, base);
            uint64_t numel = w ? w->numel * 2 : 0;
            if (w && !fq->storage_dtype[0]) snprintf(fq->storage_dtype, sizeof fq->storage_dtype, "%s", tuna_dtype_name(w->dtype));
            read_quant_state(t, fq, &numel, problems);
            fq->quantized_params += numel;
            char aux[1100];
            snprintf(aux, sizeof aux, "%s.nested_absmax", base);
            if (tuna_st_set_find(set, aux)) fq->nested++;
            snprintf(aux, sizeof aux, "%s.absmax", base);
            if (!tuna_st_set_find(set, aux))
                add_problem(problems, "error", "%s has a quant_state but no .absmax tensor: the checkpoint is incomplete", base);
            if (!w) add_problem(problems, "error", "%s has a quant_state but the packed weight itself is missing", base);
        } else if (ends_with(t->name, ".SCB")) {
            fq->bnb8++;
            if (!fq->example[0]) snprintf(fq->example, sizeof fq->example, "%s", t->name);
        } else if (ends_with(t->name, ".qweight")) {
            fq->awq_gptq++;
            if (!fq->example[0]) snprintf(fq->example, sizeof fq->example, "%s", t->name);
        } else if ((t->dtype == TUNA_DTYPE_F8_E4M3 || t->dtype == TUNA_DTYPE_F8_E5M2) && ends_with(t->name, ".weight")) {
            fq->fp8++;
            if (!fq->example[0]) snprintf(fq->example, sizeof fq->example, "%s", t->name);
        }
    }
}

/* --- expected tensors of the architecture --- */
static const char *k_linears[] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                  "mlp.gate_proj",    "mlp.up_proj",      "mlp.down_proj"};

static bool is_quant_aux(const char *name)
{
    static const char *suffixes[] = {".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".SCB",
                                     ".weight_format", ".qzeros", ".scales", ".g_idx", ".weight_scale",
                                     ".weight_scale_inv", ".input_scale"};
    if (strstr(name, ".quant_state.")) return true;
    for (size_t i = 0; i < sizeof suffixes / sizeof suffixes[0]; i++)
        if (ends_with(name, suffixes[i])) return true;
    return false;
}

/* Checks one expected tensor; shape[0..nd) of 0 means "any". Returns true when present. */
static bool expect(const tuna_st_set *set, struct tuna_strmap *seen, const char *name, int nd, const int64_t *shape,
                   cJSON *problems, int *n_missing, bool quantizable)
{
    const struct tuna_tensor_view *t = tuna_st_set_find(set, name);
    tuna_strmap_puts(seen, name, 1, NULL);
    if (!t && quantizable) {
        /* AWQ / GPTQ store <linear>.qweight instead of <linear>.weight */
        char alt[1024];
        snprintf(alt, sizeof alt, "%.*s.qweight", (int)(strlen(name) - 7), name);
        if (tuna_st_set_find(set, alt)) return true;
    }
    if (!t) {
        if (*n_missing < 5) add_problem(problems, "error", "tensor %s is missing for this architecture", name);
        (*n_missing)++;
        return false;
    }
    if (quantizable && t->dtype == TUNA_DTYPE_U8 && t->ndim == 2 && t->shape[1] == 1) {
        /* packed 4-bit: [numel/2, 1] */
        uint64_t want = 1;
        for (int i = 0; i < nd; i++) want *= (uint64_t)shape[i];
        if (t->numel * 2 != want)
            add_problem(problems, "error", "%s holds %llu packed 4-bit values, the architecture needs %llu", name,
                        (unsigned long long)(t->numel * 2), (unsigned long long)want);
        return true;
    }
    bool ok = t->ndim == nd;
    for (int i = 0; ok && i < nd; i++) ok = shape[i] == 0 || t->shape[i] == shape[i];
    if (!ok) {
        char got[128] = "", want[128] = "";
        for (int i = 0; i < t->ndim; i++)
            snprintf(got + strlen(got), sizeof got - strlen(got), "%s%lld", i ? ", " : "", (long long)t->shape[i]);
        for (int i = 0; i < nd; i++)
            snprintf(want + strlen(want), sizeof want - strlen(want), "%s%lld", i ? ", " : "", (long long)shape[i]);
        add_problem(problems, "error", "%s has shape [%s]; config.json implies [%s]", name, got, want);
    }
    return true;
}

static void check_tensors(const struct tuna_arch *a, const tuna_st_set *set, cJSON *problems, cJSON *out)
{
    struct tuna_strmap seen;
    tuna_strmap_init(&seen);
    int n_missing = 0;
    int64_t C = a->hidden_size, H = a->n_heads, Hkv = a->n_kv_heads, D = a->head_dim, I = a->intermediate_size,
            V = a->vocab_size;
    char name[512];
    int64_t s2[2];
    int64_t s1[1];
    s2[0] = V;
    s2[1] = C;
    if (!expect(set, &seen, "model.embed_tokens.weight", 2, s2, problems, &n_missing, false)) {
        /* a vocab size mismatch is the common cause of trouble: say it directly */
    } else {
        const struct tuna_tensor_view *e = tuna_st_set_find(set, "model.embed_tokens.weight");
        if (e->ndim == 2 && e->shape[0] != V)
            add_problem(problems, "error",
                        "config.json says vocab_size %lld but model.embed_tokens.weight has %lld rows: fix vocab_size "
                        "(resized embeddings are saved with the new size)",
                        (long long)V, (long long)e->shape[0]);
    }
    s1[0] = C;
    expect(set, &seen, "model.norm.weight", 1, s1, problems, &n_missing, false);
    if (!a->tie_word_embeddings) {
        expect(set, &seen, "lm_head.weight", 2, s2, problems, &n_missing, true);
    } else {
        tuna_strmap_puts(&seen, "lm_head.weight", 1, NULL); /* tolerated when tied */
    }
    for (int64_t l = 0; l < a->n_layers; l++) {
        snprintf(name, sizeof name, "model.layers.%lld.input_layernorm.weight", (long long)l);
        expect(set, &seen, name, 1, s1, problems, &n_missing, false);
        snprintf(name, sizeof name, "model.layers.%lld.post_attention_layernorm.weight", (long long)l);
        expect(set, &seen, name, 1, s1, problems, &n_missing, false);
        for (size_t k = 0; k < sizeof k_linears / sizeof k_linears[0]; k++) {
            int64_t out_f, in_f;
            switch (k) {
            case 0: out_f = H * D; in_f = C; break;
            case 1:
            case 2: out_f = Hkv * D; in_f = C; break;
            case 3: out_f = C; in_f = H * D; break;
            case 4:
            case 5: out_f = I; in_f = C; break;
            default: out_f = C; in_f = I; break;
            }
            s2[0] = out_f;
            s2[1] = in_f;
            snprintf(name, sizeof name, "model.layers.%lld.%s.weight", (long long)l, k_linears[k]);
            expect(set, &seen, name, 2, s2, problems, &n_missing, true);
            bool bias = (k < 3 && a->attention_bias) || (k == 3 && a->o_bias) || (k >= 4 && a->mlp_bias);
            if (bias) {
                s1[0] = out_f;
                snprintf(name, sizeof name, "model.layers.%lld.%s.bias", (long long)l, k_linears[k]);
                expect(set, &seen, name, 1, s1, problems, &n_missing, false);
                s1[0] = C;
            }
        }
        if (a->qk_norm) {
            int64_t sd[1] = {D};
            snprintf(name, sizeof name, "model.layers.%lld.self_attn.q_norm.weight", (long long)l);
            expect(set, &seen, name, 1, sd, problems, &n_missing, false);
            snprintf(name, sizeof name, "model.layers.%lld.self_attn.k_norm.weight", (long long)l);
            expect(set, &seen, name, 1, sd, problems, &n_missing, false);
        }
    }
    if (n_missing > 5) add_problem(problems, "error", "... %d more tensors are missing", n_missing - 5);
    /* unexpected tensors */
    int n_unexpected = 0;
    cJSON *examples = cJSON_CreateArray();
    for (size_t i = 0; i < tuna_st_set_count(set); i++) {
        const char *n = tuna_st_set_at(set, i)->name;
        if (tuna_strmap_gets(&seen, n, NULL) || is_quant_aux(n) || ends_with(n, "rotary_emb.inv_freq")) continue;
        if (ends_with(n, ".qweight")) continue;
        if (n_unexpected < 5) cJSON_AddItemToArray(examples, cJSON_CreateString(n));
        n_unexpected++;
    }
    if (n_unexpected) {
        char *ex = cJSON_PrintUnformatted(examples);
        add_problem(problems, "warning",
                    "%d tensors are not part of a %s model with this config (e.g. %s): they will be ignored; check "
                    "num_hidden_layers and the architecture",
                    n_unexpected, a->model_type, ex ? ex : "");
        free(ex);
    }
    cJSON_Delete(examples);
    cJSON_AddNumberToObject(out, "missing", n_missing);
    cJSON_AddNumberToObject(out, "unexpected", n_unexpected);
    tuna_strmap_free(&seen);
}

static cJSON *arch_json(const struct tuna_arch *a)
{
    cJSON *j = cJSON_CreateObject();
    cJSON_AddStringToObject(j, "model_type", a->model_type);
    cJSON_AddStringToObject(j, "architecture", a->architecture);
    cJSON_AddNumberToObject(j, "hidden_size", (double)a->hidden_size);
    cJSON_AddNumberToObject(j, "num_hidden_layers", (double)a->n_layers);
    cJSON_AddNumberToObject(j, "num_attention_heads", (double)a->n_heads);
    cJSON_AddNumberToObject(j, "num_key_value_heads", (double)a->n_kv_heads);
    cJSON_AddNumberToObject(j, "head_dim", (double)a->head_dim);
    cJSON_AddNumberToObject(j, "intermediate_size", (double)a->intermediate_size);
    cJSON_AddNumberToObject(j, "vocab_size", (double)a->vocab_size);
    cJSON_AddNumberToObject(j, "max_position_embeddings", (double)a->max_position_embeddings);
    cJSON_AddNumberToObject(j, "rms_norm_eps", a->norm_eps);
    cJSON_AddStringToObject(j, "activation", a->act == TUNA_ACT_SILU ? "silu" : a->act == TUNA_ACT_GELU ? "gelu" : "gelu_pytorch_tanh");
    cJSON_AddBoolToObject(j, "tie_word_embeddings", a->tie_word_embeddings);
    cJSON_AddBoolToObject(j, "qkv_bias", a->attention_bias);
    cJSON_AddBoolToObject(j, "qk_norm", a->qk_norm);
    cJSON_AddNumberToObject(j, "sliding_window", (double)a->sliding_window);
    cJSON_AddStringToObject(j, "dtype", tuna_dtype_torch_name(a->dtype) ? tuna_dtype_torch_name(a->dtype) : "?");
    cJSON *r = cJSON_AddObjectToObject(j, "rope");
    cJSON_AddStringToObject(r, "type", tuna_rope_type_name(a->rope.type));
    cJSON_AddNumberToObject(r, "theta", a->rope.theta);
    if (a->rope.type != TUNA_ROPE_DEFAULT) cJSON_AddNumberToObject(r, "factor", a->rope.factor);
    return j;
}

static cJSON *declared_quant_json(const struct tuna_quant_config *q)
{
    if (q->method == TUNA_QUANT_NONE) return cJSON_CreateNull();
    cJSON *j = cJSON_CreateObject();
    cJSON_AddStringToObject(j, "method", tuna_quant_method_name(q->method));
    cJSON_AddStringToObject(j, "quant_method", q->method_name);
    if (q->method == TUNA_QUANT_BNB_4BIT) {
        cJSON_AddStringToObject(j, "quant_type", q->bnb_4bit_quant_type_nf4 ? "nf4" : "fp4");
        cJSON_AddBoolToObject(j, "double_quant", q->bnb_double_quant);
        cJSON_AddStringToObject(j, "compute_dtype", tuna_dtype_torch_name(q->bnb_compute_dtype) ? tuna_dtype_torch_name(q->bnb_compute_dtype) : "?");
        cJSON_AddStringToObject(j, "quant_storage", q->bnb_quant_storage);
    }
    if (q->bits) cJSON_AddNumberToObject(j, "bits", q->bits);
    if (q->group_size) cJSON_AddNumberToObject(j, "group_size", q->group_size);
    return j;
}

static void compare_quant(const struct tuna_arch *a, const struct found_quant *fq, cJSON *problems)
{
    const struct tuna_quant_config *q = &a->quant;
    bool found_any = fq->bnb4 || fq->bnb8 || fq->awq_gptq || fq->fp8;
    if (q->method == TUNA_QUANT_NONE && fq->bnb4)
        add_problem(problems, "warning",
                    "config.json has no quantization_config but %s has a bitsandbytes %s quant_state: this is a "
                    "bitsandbytes 4-bit checkpoint; tuna loads it as such, but transformers will fail on it (add "
                    "quantization_config, or re-save with `tuna quantize`)",
                    fq->example, fq->nf4 ? "nf4" : "fp4");
    if (q->method == TUNA_QUANT_NONE && fq->bnb8)
        add_problem(problems, "warning",
                    "config.json has no quantization_config but %s exists: this is a bitsandbytes 8-bit (LLM.int8) "
                    "checkpoint", fq->example);
    if (q->method == TUNA_QUANT_NONE && (fq->awq_gptq || fq->fp8))
        add_problem(problems, "warning", "config.json has no quantization_config but %s is quantized", fq->example);
    if (q->method != TUNA_QUANT_NONE && !found_any)
        add_problem(problems, "warning",
                    "config.json declares %s quantization (quantization_config) but every weight is stored in 16/32-bit: "
                    "a stale quantization_config, usually left by a merge. transformers and vLLM will try to load it "
                    "as quantized and fail (KeyError ...weight.absmax). tuna loads the 16-bit weights; remove "
                    "quantization_config from config.json (tuna export merged-16bit never writes it)",
                    tuna_quant_method_name(q->method));
    if (q->method == TUNA_QUANT_BNB_4BIT && fq->bnb4) {
        if (q->bnb_4bit_quant_type_nf4 && fq->fp4 && !fq->nf4)
            add_problem(problems, "error",
                        "config.json says bnb_4bit_quant_type nf4 but the tensors are fp4 (%s): tuna follows the "
                        "tensors; fix quantization_config", fq->example);
        if (!q->bnb_4bit_quant_type_nf4 && fq->nf4 && !fq->fp4)
            add_problem(problems, "error",
                        "config.json says bnb_4bit_quant_type fp4 but the tensors are nf4 (%s): tuna follows the "
                        "tensors; fix quantization_config", fq->example);
        if (q->bnb_double_quant != (fq->nested > 0))
            add_problem(problems, "warning",
                        "config.json says bnb_4bit_use_double_quant %s but the tensors %s nested absmax: tuna follows "
                        "the tensors", q->bnb_double_quant ? "true" : "false", fq->nested ? "have" : "have no");
        if (strcmp(q->bnb_quant_storage, "uint8") != 0)
            add_problem(problems, "error", "bnb_4bit_quant_storage \"%s\": tuna reads uint8 storage only; re-quantize "
                        "with `tuna quantize`", q->bnb_quant_storage);
    }
    if (q->method == TUNA_QUANT_BNB_4BIT && !fq->bnb4 && fq->bnb8)
        add_problem(problems, "error", "config.json declares 4-bit but the tensors are bitsandbytes 8-bit (%s)", fq->example);
    if (fq->bnb4 && fq->nf4 && fq->fp4)
        add_problem(problems, "warning", "the checkpoint mixes nf4 (%d) and fp4 (%d) weights", fq->nf4, fq->fp4);
    if (fq->mixed_blocksize) add_problem(problems, "warning", "the 4-bit weights use more than one block size");
    if (fq->bnb8)
        add_problem(problems, "error",
                    "bitsandbytes 8-bit (LLM.int8) weights: tuna does not load them yet; load the 16-bit model with "
                    "--load-in-4bit instead");
    if (fq->awq_gptq)
        add_problem(problems, "error", "AWQ/GPTQ weights (%s): tuna does not load them yet", fq->example);
    if (fq->fp8) add_problem(problems, "error", "FP8 weights (%s): tuna does not load them yet", fq->example);
}

static cJSON *found_quant_json(const struct found_quant *fq)
{
    if (!fq->bnb4 && !fq->bnb8 && !fq->awq_gptq && !fq->fp8) return cJSON_CreateNull();
    cJSON *j = cJSON_CreateObject();
    if (fq->bnb4) {
        cJSON_AddStringToObject(j, "method", "bitsandbytes 4-bit");
        cJSON_AddStringToObject(j, "quant_type", fq->nf4 && fq->fp4 ? "mixed" : fq->nf4 ? "nf4" : "fp4");
        cJSON_AddNumberToObject(j, "weights", fq->bnb4);
        cJSON_AddNumberToObject(j, "blocksize", (double)fq->blocksize);
        cJSON_AddBoolToObject(j, "double_quant", fq->nested > 0);
        cJSON_AddStringToObject(j, "storage", fq->storage_dtype);
    } else if (fq->bnb8) {
        cJSON_AddStringToObject(j, "method", "bitsandbytes 8-bit");
        cJSON_AddNumberToObject(j, "weights", fq->bnb8);
    } else if (fq->awq_gptq) {
        cJSON_AddStringToObject(j, "method", "AWQ/GPTQ");
        cJSON_AddNumberToObject(j, "weights", fq->awq_gptq);
    } else {
        cJSON_AddStringToObject(j, "method", "FP8");
        cJSON_AddNumberToObject(j, "weights", fq->fp8);
    }
    return j;
}

static void inspect_files(const char *dir, cJSON *report, cJSON *problems, bool is_model)
{
    cJSON *tok = cJSON_AddObjectToObject(report, "files");
    static const char *names[] = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                  "tokenizer.model", "generation_config.json"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        char *p = tuna_path_join(dir, names[i]);
        cJSON_AddBoolToObject(tok, names[i], p && tuna_path_exists(p));
        free(p);
    }
    /* the chat template: chat_template.jinja, chat_template.json, or tokenizer_config.json's field */
    const char *tmpl = NULL;
    char *p = tuna_path_join(dir, "chat_template.jinja");
    if (p && tuna_path_exists(p)) tmpl = "chat_template.jinja";
    free(p);
    p = tuna_path_join(dir, "chat_template.json");
    if (!tmpl && p && tuna_path_exists(p)) tmpl = "chat_template.json";
    free(p);
    if (!tmpl) {
        p = tuna_path_join(dir, "tokenizer_config.json");
        cJSON *tc = NULL;
        if (p && tuna_path_exists(p) && tuna_json_load(p, 0, &tc) == TUNA_OK) {
            if (tuna_json_member(tc, "chat_template")) tmpl = "tokenizer_config.json";
        } else if (p && tuna_path_exists(p)) {
            add_problem(problems, "error", "tokenizer_config.json: %s", tuna_last_error());
        }
        cJSON_Delete(tc);
        free(p);
    }
    if (tmpl) cJSON_AddStringToObject(tok, "chat_template", tmpl);
    else cJSON_AddNullToObject(tok, "chat_template");
    if (!is_model) return;
    if (!cJSON_IsTrue(cJSON_GetObjectItem(tok, "tokenizer.json"))) {
        if (cJSON_IsTrue(cJSON_GetObjectItem(tok, "tokenizer.model")))
            add_problem(problems, "warning",
                        "no tokenizer.json, only tokenizer.model (SentencePiece): tuna reads tokenizer.json; "
                        "convert with transformers (AutoTokenizer.from_pretrained(...).save_pretrained(...))");
        else
            add_problem(problems, "warning", "no tokenizer.json: text commands need one (ids still work)");
    }
    if (!tmpl) add_problem(problems, "info", "no chat template: --chat and the chat API are not available");
}

static void inspect_adapter(const char *dir, cJSON *report, cJSON *problems)
{
    char *p = tuna_path_join(dir, "adapter_config.json");
    cJSON *cfg = NULL;
    if (!p || tuna_json_load(p, 0, &cfg) != TUNA_OK) {
        add_problem(problems, "error", "%s", tuna_last_error());
        free(p);
        return;
    }
    free(p);
    cJSON *a = cJSON_AddObjectToObject(report, "adapter");
    static const char *keys[] = {"peft_type", "r", "lora_alpha", "use_rslora", "use_dora", "target_modules",
                                 "base_model_name_or_path", "modules_to_save", "bias", "task_type"};
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(cfg, keys[i]);
        if (v) cJSON_AddItemToObject(a, keys[i], cJSON_Duplicate(v, 1));
    }
    const cJSON *pt = tuna_json_member(cfg, "peft_type");
    if (!cJSON_IsString(pt) || strcmp(pt->valuestring, "LORA") != 0)
        add_problem(problems, "error", "adapter peft_type is %s: tuna loads LORA adapters",
                    cJSON_IsString(pt) ? pt->valuestring : "missing");
    if (cJSON_IsTrue(tuna_json_member(cfg, "use_dora")))
        add_problem(problems, "error", "the adapter uses DoRA (use_dora): tuna does not apply DoRA yet");
    const cJSON *mts = tuna_json_member(cfg, "modules_to_save");
    if (mts && cJSON_IsArray(mts) && cJSON_GetArraySize(mts) > 0)
        add_problem(problems, "error", "the adapter has modules_to_save: tuna does not load full module copies yet");
    const cJSON *bias = tuna_json_member(cfg, "bias");
    if (cJSON_IsString(bias) && strcmp(bias->valuestring, "none") != 0)
        add_problem(problems, "error", "the adapter trains biases (bias=\"%s\"): tuna does not load them yet",
                    bias->valuestring);
    tuna_st_set *set = NULL;
    if (tuna_st_set_open(dir, "adapter_model", &set) == TUNA_OK) {
        cJSON_AddNumberToObject(a, "tensors", (double)tuna_st_set_count(set));
        cJSON_AddNumberToObject(a, "bytes", (double)tuna_st_set_total_bytes(set));
        tuna_st_set_close(set);
    } else {
        add_problem(problems, "error", "%s", tuna_last_error());
    }
    cJSON_Delete(cfg);
}

tuna_status tuna_inspect(const char *dir, cJSON **report)
{
    *report = NULL;
    if (!tuna_path_is_dir(dir)) return tuna_fail(TUNA_E_NOT_FOUND, "%s is not a folder", dir);
    cJSON *r = cJSON_CreateObject();
    if (!r) return tuna_fail_oom("report", 0);
    cJSON_AddStringToObject(r, "path", dir);
    cJSON *problems = cJSON_CreateArray();
    char *cfg_path = tuna_path_join(dir, "config.json");
    char *adapter_path = tuna_path_join(dir, "adapter_config.json");
    bool has_config = cfg_path && tuna_path_exists(cfg_path);
    bool has_adapter = adapter_path && tuna_path_exists(adapter_path);
    free(cfg_path);
    free(adapter_path);
    cJSON_AddStringToObject(r, "kind", has_config ? "model" : has_adapter ? "adapter" : "unknown");

    struct tuna_arch arch;
    bool arch_ok = false;
    if (has_config) {
        if (tuna_arch_load(dir, &arch) == TUNA_OK) {
            arch_ok = true;
            cJSON_AddItemToObject(r, "architecture", arch_json(&arch));
        } else {
            cJSON_AddNullToObject(r, "architecture");
            add_problem(problems, "error", "%s", tuna_last_error());
        }
    } else if (!has_adapter) {
        add_problem(problems, "error",
                    "no config.json or adapter_config.json in %s: not a Hugging Face model or PEFT adapter folder", dir);
    }
    if (has_adapter) inspect_adapter(dir, r, problems);

    if (has_config) {
        tuna_st_set *set = NULL;
        struct found_quant fq;
        memset(&fq, 0, sizeof fq);
        if (tuna_st_set_open(dir, "model", &set) != TUNA_OK) {
            add_problem(problems, "error", "%s", tuna_last_error());
        } else {
            cJSON *t = cJSON_AddObjectToObject(r, "tensors");
            cJSON_AddNumberToObject(t, "count", (double)tuna_st_set_count(set));
            cJSON_AddNumberToObject(t, "files", (double)tuna_st_set_nfiles(set));
            cJSON_AddNumberToObject(t, "bytes", (double)tuna_st_set_total_bytes(set));
            cJSON *by = cJSON_AddObjectToObject(t, "by_dtype");
            uint64_t params = 0;
            for (size_t i = 0; i < tuna_st_set_count(set); i++) {
                const struct tuna_tensor_view *v = tuna_st_set_at(set, i);
                const char *dn = tuna_dtype_name(v->dtype);
                cJSON *e = cJSON_GetObjectItem(by, dn);
                if (!e) {
                    e = cJSON_AddObjectToObject(by, dn);
                    cJSON_AddNumberToObject(e, "count", 0);
                    cJSON_AddNumberToObject(e, "bytes", 0);
                }
                cJSON *c = cJSON_GetObjectItem(e, "count"), *b = cJSON_GetObjectItem(e, "bytes");
                cJSON_SetNumberValue(c, c->valuedouble + 1);
                cJSON_SetNumberValue(b, b->valuedouble + (double)v->nbytes);
                if (!is_quant_aux(v->name) && v->dtype != TUNA_DTYPE_U8) params += v->numel;
            }
            scan_quant(set, &fq, problems);
            params += fq.quantized_params;
            cJSON_AddNumberToObject(r, "parameters", (double)params);
            if (arch_ok) {
                cJSON *chk = cJSON_AddObjectToObject(t, "check");
                check_tensors(&arch, set, problems, chk);
                /* the stored dtype of the float weights vs config.json's dtype */
                const struct tuna_tensor_view *n = tuna_st_set_find(set, "model.norm.weight");
                if (n && n->dtype != arch.dtype && tuna_dtype_is_float(n->dtype))
                    add_problem(problems, "info", "config.json says dtype %s but the float weights are stored as %s",
                                tuna_dtype_torch_name(arch.dtype) ? tuna_dtype_torch_name(arch.dtype) : "?",
                                tuna_dtype_name(n->dtype));
            }
        }
        cJSON *q = cJSON_AddObjectToObject(r, "quantization");
        cJSON_AddItemToObject(q, "declared", arch_ok ? declared_quant_json(&arch.quant) : cJSON_CreateNull());
        cJSON_AddItemToObject(q, "found", found_quant_json(&fq));
        if (arch_ok && set) compare_quant(&arch, &fq, problems);
        if (arch_ok) {
            cJSON *m = cJSON_AddObjectToObject(r, "memory");
            uint64_t stored = set ? tuna_st_set_total_bytes(set) : 0;
            cJSON_AddNumberToObject(m, "weights_stored_bytes", (double)stored);
            /* NF4 estimate: the seven projections at 4 bits + 1 byte of absmax per 64 (double
             * quant) + a float per 256 blocks; embeddings, lm_head and norms in 16-bit. */
            uint64_t C = (uint64_t)arch.hidden_size, I = (uint64_t)arch.intermediate_size;
            uint64_t D = (uint64_t)arch.head_dim, H = (uint64_t)arch.n_heads, Hkv = (uint64_t)arch.n_kv_heads;
            uint64_t lin = (uint64_t)arch.n_layers * (2 * C * H * D + 2 * C * Hkv * D + 3 * C * I);
            uint64_t total = tuna_arch_param_count(&arch);
            uint64_t nf4 = lin / 2 + lin / 64 + (lin / 64 / 256 + 1) * 4 + (total - lin) * 2;
            cJSON_AddNumberToObject(m, "weights_nf4_bytes", (double)nf4);
            cJSON_AddNumberToObject(m, "kv_bytes_per_token_16bit", (double)tuna_arch_kv_bytes_per_token(&arch, 2));
            cJSON_AddNumberToObject(m, "kv_bytes_max_context_16bit",
                                    (double)(tuna_arch_kv_bytes_per_token(&arch, 2) * (uint64_t)arch.max_position_embeddings));
        }
        tuna_st_set_close(set);
        inspect_files(dir, r, problems, true);
    } else if (has_adapter) {
        inspect_files(dir, r, problems, false);
    }
    if (arch_ok) tuna_arch_free(&arch);
    cJSON_AddItemToObject(r, "problems", problems);
    *report = r;
    return TUNA_OK;
}

int tuna_inspect_error_count(const cJSON *report)
{
    int n = 0;
    const cJSON *p = cJSON_GetObjectItem(report, "problems");
    for (const cJSON *e = p ? p->child : NULL; e; e = e->next) {
        const cJSON *l = cJSON_GetObjectItem(e, "level");
        if (cJSON_IsString(l) && !strcmp(l->valuestring, "error")) n++;
    }
    return n;
}
