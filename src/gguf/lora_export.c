/* lora_export.c — a PEFT LoRA adapter → GGUF LoRA adapter file (what llama.cpp's
 * convert_lora_to_gguf.py writes and llama_adapter_lora_init reads; docs/GGUF.md).
 *
 * llama.cpp applies, per adapted weight W [out, in] (GGUF ne {in, out}),
 *   y += (adapter_scale · alpha / r) · B (A x),  r = lora_b's ne[0]
 * with lora_a ne {in, r} (PEFT's A [r, in] as stored) and lora_b ne {r, out} (PEFT's B [out, r]).
 * The base GGUF holds llama q/k rows permuted to interleaved RoPE order, so the rows of their B
 * are permuted the same way (A is unchanged: it acts on the input side).
 * One alpha per file: PEFT's per-module scale (alpha_pattern, rank_pattern with rsLoRA,
 * use_rslora) is folded into B where it differs from llama.cpp's alpha / r.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/status.h"
#include "gguf/export.h"
#include "gguf/quants.h"
#include "io/safetensors.h"

double tuna_gguf_lora_fold(const struct tuna_lora_module *mod, float alpha)
{
    /* llama_adapter_lora_weight::get_scale with adapter_scale 1: float alpha / float rank,
     * and 1 when alpha is 0 */
    float lscale = alpha != 0.0f ? 1.0f * alpha / (float)mod->r : 1.0f;
    if (mod->scale == lscale) return 1.0;
    return (double)mod->scale / (double)lscale;
}

static const char *base_name(const char *p)
{
    if (!p) return "adapter";
    size_t n = strlen(p);
    while (n > 1 && p[n - 1] == '/')
        n--;
    const char *s = p + n;
    while (s > p && s[-1] != '/')
        s--;
    return s;
}

/* Converts n floats to `type` into a new buffer (*data, *nbytes) for a tensor of rows × cols. */
static tuna_status convert(uint32_t type, const float *x, int64_t rows, int64_t cols, void **data, size_t *nbytes)
{
    *nbytes = tuna_ggml_row_size(type, cols) * (size_t)rows;
    *data = malloc(*nbytes ? *nbytes : 1);
    if (!*data) return tuna_fail_oom("LoRA tensor", *nbytes);
    tuna_status st = tuna_ggml_quantize(type, x, *data, rows * cols);
    if (st) {
        free(*data);
        *data = NULL;
    }
    return st;
}

tuna_status tuna_gguf_export_lora(const char *dir, const struct tuna_lora_adapter *ad,
                                  const struct tuna_gguf_lora_opts *o, const char *out_path,
                                  struct tuna_gguf_lora_report *rep)
{
    struct tuna_arch a;
    memset(&a, 0, sizeof a);
    tuna_st_set *set = NULL;
    tuna_gguf_writer *w = NULL;
    float *b = NULL, *tmp = NULL;
    struct tuna_gguf_lora_report r = {0};
    uint32_t type;
    tuna_status st;
    switch (o->ftype) {
    case TUNA_GGUF_FT_F32: type = TUNA_GGML_F32; break;
    case TUNA_GGUF_FT_F16: type = TUNA_GGML_F16; break;
    case TUNA_GGUF_FT_BF16: type = TUNA_GGML_BF16; break;
    default:
        return tuna_fail(TUNA_E_UNSUPPORTED,
                         "a GGUF LoRA adapter is written in f32, f16 or bf16 (llama.cpp multiplies the "
                         "adapter in that type); quantized adapters are not written");
    }
    if ((st = tuna_arch_load(dir, &a))) return tuna_fail_prefix(st, "exporting a GGUF LoRA adapter for %s", dir);
    const char *an = tuna_gguf_arch_name(a.family);
    if (!an) {
        st = tuna_fail(TUNA_E_UNSUPPORTED, "%s: architecture %s has no GGUF export", dir, tuna_family_name(a.family));
        goto done;
    }
    if ((st = tuna_st_set_open(dir, "model", &set))) goto done;
    bool tied = a.tie_word_embeddings || !tuna_st_set_find(set, "lm_head.weight");
    if ((st = tuna_gguf_writer_new(&w))) goto done;
    char name[256];
    snprintf(name, sizeof name, "%s", o->name ? o->name : base_name(ad->dir));
    r.alpha = (float)ad->alpha;
    if ((st = tuna_gguf_set_str(w, "general.architecture", an)) || (st = tuna_gguf_set_str(w, "general.type", "adapter")) ||
        (st = tuna_gguf_set_str(w, "general.name", name)) || (st = tuna_gguf_set_str(w, "adapter.type", "lora")) ||
        (st = tuna_gguf_set_f32(w, "adapter.lora.alpha", r.alpha)) ||
        (st = tuna_gguf_set_u32(w, "general.file_type", (uint32_t)o->ftype)))
        goto done;
    for (int i = 0; i < ad->n_modules; i++) {
        const struct tuna_lora_module *m = &ad->modules[i];
        char hf[512], gg[TUNA_GGUF_MAX_NAME], ga[TUNA_GGUF_MAX_NAME + 8], gb[TUNA_GGUF_MAX_NAME + 8];
        snprintf(hf, sizeof hf, "%s.weight", m->name);
        if (!strcmp(m->name, "lm_head") && tied) {
            st = tuna_fail(TUNA_E_UNSUPPORTED,
                           "the adapter adapts lm_head but %s ties its output to the embeddings: the GGUF base has no "
                           "output.weight for llama.cpp to apply it to (merge it instead: tuna export gguf --lora "
                           "refuses this too; train without lm_head)",
                           dir);
            goto done;
        }
        const struct tuna_tensor_view *tv = tuna_st_set_find(set, hf);
        if (!tv) {
            st = tuna_fail(TUNA_E_INVALID, "the adapter adapts %s but %s has no tensor %s: is it an adapter for another base model?",
                           m->name, dir, hf);
            goto done;
        }
        if (tv->ndim != 2 || tv->shape[0] != m->out || tv->shape[1] != m->in) {
            st = tuna_fail(TUNA_E_INVALID, "LoRA module %s is [%lld, %lld] but %s in %s has another shape: is the adapter for another base model?",
                           m->name, (long long)m->out, (long long)m->in, hf, dir);
            goto done;
        }
        if (!tuna_gguf_tensor_name(hf, gg, sizeof gg) || strlen(gg) + 7 >= TUNA_GGUF_MAX_NAME) {
            st = tuna_fail(TUNA_E_UNSUPPORTED, "LoRA module %s: %s has no GGUF name for arch %s", m->name, hf, an);
            goto done;
        }
        snprintf(ga, sizeof ga, "%s.lora_a", gg);
        snprintf(gb, sizeof gb, "%s.lora_b", gg);
        size_t nb = (size_t)(m->out * m->r);
        free(b);
        free(tmp);
        tmp = NULL;
        if (!(b = malloc(sizeof *b * (nb ? nb : 1)))) {
            st = tuna_fail_oom("lora_b", sizeof *b * nb);
            goto done;
        }
        double fold = tuna_gguf_lora_fold(m, r.alpha);
        for (size_t j = 0; j < nb; j++)
            b[j] = fold == 1.0 ? m->B[j] : (float)((double)m->B[j] * fold);
        r.n_folded += fold != 1.0;
        bool is_q = strstr(gg, ".attn_q.") != NULL, is_k = strstr(gg, ".attn_k.") != NULL;
        if (tuna_gguf_family_permutes_qk(a.family) && (is_q || is_k)) {
            if (!(tmp = malloc(sizeof *tmp * (nb ? nb : 1)))) {
                st = tuna_fail_oom("lora_b", sizeof *tmp * nb);
                goto done;
            }
            tuna_gguf_permute_qk(b, tmp, is_q ? a.n_heads : a.n_kv_heads, m->out, m->r, true);
        }
        void *da = NULL, *db = NULL;
        size_t na = 0, nbb = 0;
        int64_t nea[2] = {m->in, m->r}, neb[2] = {m->r, m->out};
        if ((st = convert(type, m->A, m->r, m->in, &da, &na))) goto done;
        if ((st = tuna_gguf_add_tensor(w, ga, type, 2, nea, da, na, true))) goto done;
        if ((st = convert(type, b, m->out, m->r, &db, &nbb))) goto done;
        if ((st = tuna_gguf_add_tensor(w, gb, type, 2, neb, db, nbb, true))) goto done;
        if (!o->quiet)
            fprintf(stderr, "  %-34s %-4s [%lld, %lld]  %-34s [%lld, %lld]%s\n", ga, tuna_ggml_type_name(type),
                    (long long)m->in, (long long)m->r, gb, (long long)m->r, (long long)m->out,
                    fold != 1.0 ? "  (scale folded into B)" : "");
        r.n_modules++;
    }
    if (r.n_modules == 0) {
        st = tuna_fail(TUNA_E_INVALID, "the adapter %s has no modules", ad->dir ? ad->dir : "(in memory)");
        goto done;
    }
    st = tuna_gguf_writer_save(w, out_path);
done:
    free(b);
    free(tmp);
    tuna_gguf_writer_free(w);
    tuna_st_set_close(set);
    tuna_arch_free(&a);
    if (st) return tuna_fail_prefix(st, "exporting a GGUF LoRA adapter for %s", dir);
    if (rep) *rep = r;
    return TUNA_OK;
}
