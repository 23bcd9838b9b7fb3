/* attach.c — attaching loaded adapters to a model's linear layers. Each adapted linear gets an
 * array of n struct tuna_lora (one per adapter, rank 0 where an adapter leaves it alone); the
 * forward pass picks the entry by batch.adapter[t]. The attachment owns those arrays and
 * borrows the adapters' A/B. */
#include <stdlib.h>
#include <string.h>

#include "core/status.h"
#include "lora/lora.h"

struct tuna_lora_attachment {
    int n;                        /* adapters */
    int n_linears;                /* linears touched */
    struct tuna_linear **linears; /* [n_linears] */
    struct tuna_lora *entries;    /* [n_linears * n] */
};

/* The linear named by an HF module path, or NULL. */
static struct tuna_linear *find_linear(struct tuna_model *m, const char *name)
{
    if (!strcmp(name, "lm_head")) return &m->lm_head;
    static const char k_layers[] = "model.layers.";
    if (strncmp(name, k_layers, sizeof k_layers - 1) != 0) return NULL;
    const char *p = name + sizeof k_layers - 1;
    if (*p < '0' || *p > '9') return NULL;
    char *end;
    long l = strtol(p, &end, 10);
    if (*end != '.' || (p[0] == '0' && end - p > 1) || l < 0 || l >= m->arch.n_layers) return NULL;
    struct tuna_layer *ly = &m->layers[l];
    const char *s = end + 1;
    if (!strcmp(s, "self_attn.q_proj")) return &ly->q;
    if (!strcmp(s, "self_attn.k_proj")) return &ly->k;
    if (!strcmp(s, "self_attn.v_proj")) return &ly->v;
    if (!strcmp(s, "self_attn.o_proj")) return &ly->o;
    if (!strcmp(s, "mlp.gate_proj")) return &ly->gate;
    if (!strcmp(s, "mlp.up_proj")) return &ly->up;
    if (!strcmp(s, "mlp.down_proj")) return &ly->down;
    return NULL;
}

static void undo(struct tuna_lora_attachment *att)
{
    for (int i = 0; i < att->n_linears; i++) {
        att->linears[i]->n_lora = 0;
        att->linears[i]->lora = NULL;
    }
}

void tuna_lora_detach(struct tuna_model *m, tuna_lora_attachment *att)
{
    if (!att) return;
    tuna_model_lora_invalidate(m); /* GPU copies of these adapters go with them */
    undo(att);
    free(att->linears);
    free(att->entries);
    free(att);
}

tuna_status tuna_lora_attach(struct tuna_model *m, const struct tuna_lora_adapter *const *adapters, int n,
                             tuna_lora_attachment **out)
{
    *out = NULL;
    if (n < 1) return tuna_fail(TUNA_E_INVALID, "attach: no adapters given");
    tuna_model_lora_invalidate(m); /* no device view may survive into the new set */
    int total = 0;
    for (int i = 0; i < n; i++)
        total += adapters[i]->n_modules;
    struct tuna_lora_attachment *att = calloc(1, sizeof *att);
    if (!att) return tuna_fail_oom("attachment", sizeof *att);
    att->n = n;
    att->linears = calloc((size_t)(total ? total : 1), sizeof *att->linears);
    att->entries = calloc((size_t)(total ? total : 1) * (size_t)n, sizeof *att->entries);
    tuna_status st = TUNA_OK;
    if (!att->linears || !att->entries) st = tuna_fail_oom("attachment", (size_t)total * (size_t)n);
    for (int ai = 0; !st && ai < n; ai++) {
        const struct tuna_lora_adapter *a = adapters[ai];
        const char *what = a->dir ? a->dir : "adapter";
        for (int k = 0; k < a->n_modules; k++) {
            const struct tuna_lora_module *mod = &a->modules[k];
            struct tuna_linear *lin = find_linear(m, mod->name);
            if (!lin) {
                st = tuna_fail(TUNA_E_INVALID,
                               "%s (adapter %d) adapts module \"%s\", which this model (%s, %lld layers) does not "
                               "have; is it an adapter for another base model?",
                               what, ai, mod->name, m->arch.model_type, (long long)m->arch.n_layers);
                break;
            }
            if (lin->w.rows != mod->out || lin->w.cols != mod->in) {
                st = tuna_fail(TUNA_E_INVALID,
                               "%s (adapter %d): module %s is [%lld, %lld] in the model but the adapter's B·A is "
                               "[%lld, %lld]; is it an adapter for another base model?",
                               what, ai, mod->name, (long long)lin->w.rows, (long long)lin->w.cols, (long long)mod->out,
                               (long long)mod->in);
                break;
            }
            int li = 0;
            while (li < att->n_linears && att->linears[li] != lin)
                li++;
            if (li == att->n_linears) {
                if (lin->n_lora != 0) {
                    st = tuna_fail(TUNA_E_INVALID, "attach: the model already has adapters on %s; detach them first",
                                   mod->name);
                    break;
                }
                att->linears[att->n_linears++] = lin;
            }
            struct tuna_lora *e = &att->entries[(size_t)li * (size_t)n + (size_t)ai];
            e->r = mod->r;
            e->A = mod->A;
            e->B = mod->B;
            e->scale = mod->scale;
        }
    }
    if (st) {
        free(att->linears);
        free(att->entries);
        free(att);
        return st;
    }
    for (int li = 0; li < att->n_linears; li++) {
        att->linears[li]->lora = &att->entries[(size_t)li * (size_t)n];
        att->linears[li]->n_lora = n;
    }
    *out = att;
    return TUNA_OK;
}

void tuna_lora_batch_use(struct tuna_batch *b, int32_t seq, int32_t adapter)
{
    for (int64_t t = 0; t < b->n; t++)
        if (b->seq[t] == seq) b->adapter[t] = adapter;
}

void tuna_lora_set_free(struct tuna_model *m, struct tuna_lora_set *s)
{
    if (!s) return;
    tuna_lora_detach(m, s->att);
    for (int i = 0; i < s->n; i++)
        tuna_lora_free(s->adapters[i]);
    free(s->adapters);
    free(s);
}

tuna_status tuna_lora_set_open(struct tuna_model *m, const char *const *dirs, int n, struct tuna_lora_set **out)
{
    *out = NULL;
    struct tuna_lora_set *s = calloc(1, sizeof *s);
    if (!s) return tuna_fail_oom("lora set", sizeof *s);
    s->adapters = calloc((size_t)(n > 0 ? n : 1), sizeof *s->adapters);
    tuna_status st = s->adapters ? TUNA_OK : tuna_fail_oom("lora set", (size_t)n);
    for (int i = 0; !st && i < n; i++) {
        st = tuna_lora_load(dirs[i], &s->adapters[i]);
        if (!st) s->n++;
    }
    if (!st) st = tuna_lora_attach(m, (const struct tuna_lora_adapter *const *)s->adapters, n, &s->att);
    if (st) {
        tuna_lora_set_free(m, s);
        return st;
    }
    *out = s;
    return TUNA_OK;
}
