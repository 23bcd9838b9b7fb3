/* inspect_print.c — the text form of a `tuna inspect` report. */
#include <stdio.h>
#include <string.h>

#include "core/units.h"
#include "inspect.h"

static double num(const cJSON *o, const char *k)
{
    const cJSON *v = cJSON_GetObjectItem(o, k);
    return cJSON_IsNumber(v) ? v->valuedouble : 0;
}

static const char *str(const cJSON *o, const char *k)
{
    const cJSON *v = cJSON_GetObjectItem(o, k);
    return cJSON_IsString(v) ? v->valuestring : "";
}

static void print_quant(FILE *f, const char *label, const cJSON *q)
{
    fprintf(f, "  %-16s", label);
    if (!q || cJSON_IsNull(q)) {
        fprintf(f, "none\n");
        return;
    }
    fprintf(f, "%s", str(q, "method"));
    if (cJSON_GetObjectItem(q, "quant_type")) fprintf(f, " %s", str(q, "quant_type"));
    if (cJSON_IsTrue(cJSON_GetObjectItem(q, "double_quant"))) fprintf(f, ", double quant");
    if (num(q, "blocksize") > 0) fprintf(f, ", blocksize %.0f", num(q, "blocksize"));
    if (num(q, "weights") > 0) fprintf(f, ", %.0f weights", num(q, "weights"));
    if (num(q, "bits") > 0) fprintf(f, ", %.0f bits", num(q, "bits"));
    fprintf(f, "\n");
}

void tuna_inspect_print(const cJSON *r, void *file)
{
    FILE *f = file;
    char b1[32], b2[32], b3[32], b4[32];
    fprintf(f, "%s (%s)\n", str(r, "path"), str(r, "kind"));
    const cJSON *a = cJSON_GetObjectItem(r, "architecture");
    if (a && cJSON_IsObject(a)) {
        fprintf(f, "  %-16s%s (%s)\n", "architecture", str(a, "model_type"), str(a, "architecture"));
        fprintf(f, "  %-16shidden %.0f, layers %.0f, heads %.0f (kv %.0f), head_dim %.0f, intermediate %.0f, vocab %.0f\n",
                "sizes", num(a, "hidden_size"), num(a, "num_hidden_layers"), num(a, "num_attention_heads"),
                num(a, "num_key_value_heads"), num(a, "head_dim"), num(a, "intermediate_size"), num(a, "vocab_size"));
        const cJSON *rope = cJSON_GetObjectItem(a, "rope");
        fprintf(f, "  %-16s%s, theta %g", "rope", str(rope, "type"), num(rope, "theta"));
        if (num(rope, "factor") > 0) fprintf(f, ", factor %g", num(rope, "factor"));
        fprintf(f, "; context %.0f tokens\n", num(a, "max_position_embeddings"));
        fprintf(f, "  %-16s%s, norm eps %g%s%s%s\n", "layers", str(a, "activation"), num(a, "rms_norm_eps"),
                cJSON_IsTrue(cJSON_GetObjectItem(a, "tie_word_embeddings")) ? ", tied embeddings" : "",
                cJSON_IsTrue(cJSON_GetObjectItem(a, "qkv_bias")) ? ", q/k/v bias" : "",
                cJSON_IsTrue(cJSON_GetObjectItem(a, "qk_norm")) ? ", q/k norm" : "");
    }
    if (cJSON_GetObjectItem(r, "parameters"))
        fprintf(f, "  %-16s%s\n", "parameters", tuna_fmt_count(b1, sizeof b1, num(r, "parameters")));
    const cJSON *t = cJSON_GetObjectItem(r, "tensors");
    if (t) {
        fprintf(f, "  %-16s%.0f in %.0f file(s), %s:", "tensors", num(t, "count"), num(t, "files"),
                tuna_fmt_bytes(b1, sizeof b1, num(t, "bytes")));
        const cJSON *by = cJSON_GetObjectItem(t, "by_dtype");
        for (const cJSON *e = by ? by->child : NULL; e; e = e->next)
            fprintf(f, " %s %.0f (%s)", e->string, num(e, "count"), tuna_fmt_bytes(b2, sizeof b2, num(e, "bytes")));
        fprintf(f, "\n");
    }
    const cJSON *q = cJSON_GetObjectItem(r, "quantization");
    if (q) {
        print_quant(f, "quant (config)", cJSON_GetObjectItem(q, "declared"));
        print_quant(f, "quant (found)", cJSON_GetObjectItem(q, "found"));
    }
    const cJSON *ad = cJSON_GetObjectItem(r, "adapter");
    if (ad) {
        char *targets = cJSON_PrintUnformatted(cJSON_GetObjectItem(ad, "target_modules"));
        fprintf(f, "  %-16s%s r=%.0f alpha=%g%s, targets %s, %.0f tensors\n", "adapter", str(ad, "peft_type"),
                num(ad, "r"), num(ad, "lora_alpha"), cJSON_IsTrue(cJSON_GetObjectItem(ad, "use_rslora")) ? " (rsLoRA)" : "",
                targets ? targets : "?", num(ad, "tensors"));
        cJSON_free(targets);
    }
    const cJSON *files = cJSON_GetObjectItem(r, "files");
    if (files) {
        fprintf(f, "  %-16s", "files");
        for (const cJSON *e = files->child; e; e = e->next) {
            if (!strcmp(e->string, "chat_template")) continue;
            fprintf(f, "%s %s  ", e->string, cJSON_IsTrue(e) ? "yes" : "no");
        }
        const cJSON *ct = cJSON_GetObjectItem(files, "chat_template");
        fprintf(f, "\n  %-16s%s\n", "chat template", cJSON_IsString(ct) ? ct->valuestring : "none");
    }
    const cJSON *m = cJSON_GetObjectItem(r, "memory");
    if (m) {
        fprintf(f, "  %-16sweights %s as stored, %s in NF4; KV cache %s/token (16-bit), %s at full context\n",
                "memory", tuna_fmt_bytes(b1, sizeof b1, num(m, "weights_stored_bytes")),
                tuna_fmt_bytes(b2, sizeof b2, num(m, "weights_nf4_bytes")),
                tuna_fmt_bytes(b3, sizeof b3, num(m, "kv_bytes_per_token_16bit")),
                tuna_fmt_bytes(b4, sizeof b4, num(m, "kv_bytes_max_context_16bit")));
    }
    const cJSON *p = cJSON_GetObjectItem(r, "problems");
    if (!p || !p->child) {
        fprintf(f, "  %-16snone\n", "problems");
        return;
    }
    fprintf(f, "  problems:\n");
    for (const cJSON *e = p->child; e; e = e->next) fprintf(f, "    %-8s %s\n", str(e, "level"), str(e, "message"));
}
