/* forward.c — the forward pass, written once for every supported family as a straight list of op
 * calls per layer (llm.c's gpt2_forward style). Architecture differences come in as data from
 * struct tuna_model (NULL biases / q,k norms, 1+w norms folded at load, embedding scale,
 * activation), so there is no branch on the family here.
 *
 * Per step: embed → for each layer: norm → q,k,v (+bias) → [q/k norm] → RoPE → KV store →
 * paged attention → o_proj → residual → norm → gate, up → act(gate)*up → down → residual;
 * then the final norm and lm_head only for the rows whose logits were asked for.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/dtype.h"
#include "core/status.h"
#include "model/model.h"
#include "model/rope_freq.h"

/* adapter indices grouped per step: the lora op's n_groups (serve's --max-loras is at most 64) */
#define TUNA_FWD_LORA_GROUPS 64

struct tuna_fwd_ws {
    int64_t cap;                  /* tokens the buffers hold */
    float *x;                     /* [T, C] residual stream */
    float *tmp;                   /* [T, C] projection output before the residual add */
    struct tuna_fwd_layer_acts a; /* shared by every layer when there is no trace */
    float *sel;                   /* [T, C] rows that want logits */
    float *logits;                /* [logits_cap, V] in backend memory (non-host backends) */
    int64_t logits_cap;
    int64_t *slot;                /* [T] KV slot of each token */
    const int32_t **bt;           /* [T] block table of each token's sequence */
    /* this step's LoRA tokens (lora_tokens): grouped by adapter on the host, pointing into the
     * step block when it holds them; lora_used false = no token has an adapter (LoRA skipped) */
    bool lora_used;
    struct tuna_lora_tokens lt;
    int32_t *lora_order;          /* [lora_cap] */
    int64_t lora_cap;
    int32_t lora_start[TUNA_FWD_LORA_GROUPS + 1];
};

void tuna_fwd_ws_free(const struct tuna_model *m, struct tuna_fwd_ws *ws);

static void acts_free(const struct tuna_model *m, struct tuna_fwd_layer_acts *a)
{
    float **bufs[] = {&a->x_in, &a->xn_attn, &a->q, &a->k, &a->v, &a->att,
                      &a->x_mid, &a->xn_mlp, &a->gate, &a->up, &a->act};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) m->ops->release(m->be, *bufs[i]);
    memset(a, 0, sizeof *a);
}

/* n floats of backend memory into *p; false when out of memory. */
static bool bk_alloc(const struct tuna_model *m, float **p, size_t n)
{
    void *v = NULL;
    if (m->ops->alloc(m->be, n * sizeof(float), &v) != TUNA_OK) v = NULL;
    *p = v;
    return v != NULL;
}

/* Allocates one set of layer activations for T tokens; with_saves adds the buffers only a
 * trace needs (x_in, x_mid, act). */
static tuna_status acts_alloc(const struct tuna_model *m, int64_t T, bool with_saves, struct tuna_fwd_layer_acts *a)
{
    const struct tuna_arch *ar = &m->arch;
    size_t C = (size_t)(T * ar->hidden_size), HD = (size_t)(T * ar->n_heads * ar->head_dim);
    size_t KD = (size_t)(T * ar->n_kv_heads * ar->head_dim), I = (size_t)(T * ar->intermediate_size);
    memset(a, 0, sizeof *a);
    bool ok = bk_alloc(m, &a->xn_attn, C) && bk_alloc(m, &a->q, HD) && bk_alloc(m, &a->k, KD) &&
              bk_alloc(m, &a->v, KD) && bk_alloc(m, &a->att, HD) && bk_alloc(m, &a->xn_mlp, C) &&
              bk_alloc(m, &a->gate, I) && bk_alloc(m, &a->up, I);
    if (ok && with_saves) ok = bk_alloc(m, &a->x_in, C) && bk_alloc(m, &a->x_mid, C) && bk_alloc(m, &a->act, I);
    if (!ok) {
        acts_free(m, a);
        return tuna_fail(TUNA_E_OOM, "forward: cannot allocate activations for %lld tokens "
                         "(%.1f MiB per layer) on the %s backend; use shorter prompts or a smaller batch",
                         (long long)T, (double)(4 * C + 2 * HD + 2 * KD + 3 * I) * 4 / 1048576.0, m->ops->name);
    }
    return TUNA_OK;
}

void tuna_fwd_ws_free(const struct tuna_model *m, struct tuna_fwd_ws *ws)
{
    if (!ws) return;
    m->ops->release(m->be, ws->x);
    m->ops->release(m->be, ws->tmp);
    m->ops->release(m->be, ws->sel);
    m->ops->release(m->be, ws->logits);
    free(ws->slot);
    free(ws->bt);
    free(ws->lora_order);
    acts_free(m, &ws->a);
    free(ws);
}

static tuna_status ws_reserve(struct tuna_model *m, int64_t T)
{
    if (m->ws && m->ws->cap >= T) return TUNA_OK;
    int64_t cap = m->ws ? m->ws->cap : 0;
    if (cap < 16) cap = 16;
    while (cap < T) cap *= 2;
    tuna_fwd_ws_free(m, m->ws);
    m->ws = calloc(1, sizeof *m->ws);
    if (!m->ws) return tuna_fail_oom("forward workspace", sizeof *m->ws);
    struct tuna_fwd_ws *ws = m->ws;
    size_t C = (size_t)(cap * m->arch.hidden_size);
    ws->slot = malloc((size_t)cap * sizeof *ws->slot);
    ws->bt = malloc((size_t)cap * sizeof *ws->bt);
    tuna_status st = TUNA_OK;
    if (!bk_alloc(m, &ws->x, C) || !bk_alloc(m, &ws->tmp, C) || !bk_alloc(m, &ws->sel, C) || !ws->slot || !ws->bt)
        st = tuna_fail_oom("forward workspace", C * 12);
    else
        st = acts_alloc(m, cap, false, &ws->a);
    if (st) {
        tuna_fwd_ws_free(m, ws);
        m->ws = NULL;
        return st;
    }
    ws->cap = cap;
    return TUNA_OK;
}

void tuna_fwd_trace_free(struct tuna_fwd_trace *tr)
{
    if (!tr) return;
    if (tr->layers && tr->owner)
        for (int64_t l = 0; l < tr->cap; l++) acts_free(tr->owner, &tr->layers[l]);
    free(tr->layers);
    if (tr->owner) tr->owner->ops->release(tr->owner->be, tr->x_final);
    memset(tr, 0, sizeof *tr);
}

/* tr->cap counts layers; buffers are sized for tr->T tokens. */
static tuna_status trace_reserve(const struct tuna_model *m, struct tuna_fwd_trace *tr, int64_t T)
{
    if (tr->layers && tr->T == T) return TUNA_OK;
    tuna_fwd_trace_free(tr);
    tr->owner = m;
    tr->layers = calloc((size_t)m->arch.n_layers, sizeof *tr->layers);
    bk_alloc(m, &tr->x_final, (size_t)(T * m->arch.hidden_size));
    if (!tr->layers || !tr->x_final) {
        tuna_fwd_trace_free(tr);
        return tuna_fail_oom("forward trace", (size_t)(T * m->arch.hidden_size) * 4);
    }
    tr->cap = m->arch.n_layers;
    tr->T = T;
    for (int64_t l = 0; l < m->arch.n_layers; l++) {
        tuna_status st = acts_alloc(m, T, true, &tr->layers[l]);
        if (st) {
            tuna_fwd_trace_free(tr);
            return st;
        }
    }
    return TUNA_OK;
}

/* Groups the step's tokens by adapter for the lora op (host arrays in ws; fill_step_block may
 * move them into the step block). */
static tuna_status lora_tokens(struct tuna_model *m, const struct tuna_batch *b)
{
    struct tuna_fwd_ws *ws = m->ws;
    const int64_t T = b->n;
    ws->lora_used = false;
    for (int64_t t = 0; b->adapter && t < T && !ws->lora_used; t++) ws->lora_used = b->adapter[t] >= 0;
    if (!ws->lora_used) return TUNA_OK;
    if (ws->lora_cap < T) {
        int32_t *o = realloc(ws->lora_order, (size_t)T * sizeof *o);
        if (!o) return tuna_fail_oom("LoRA token groups", (size_t)T * sizeof *o);
        ws->lora_order = o;
        ws->lora_cap = T;
    }
    tuna_lora_group(b->adapter, T, TUNA_FWD_LORA_GROUPS, ws->lora_order, ws->lora_start);
    ws->lt = (struct tuna_lora_tokens){b->adapter, ws->lora_order, ws->lora_start, TUNA_FWD_LORA_GROUPS};
    return TUNA_OK;
}

/* Whether lin's adapters take part in this step (it carries some and a token uses one). */
static bool lora_on(const struct tuna_model *m, const struct tuna_linear *lin)
{
    return lin->n_lora > 0 && m->ws->lora_used;
}

/* No adapter of the layer is used in this step. */
static bool layer_without_lora(const struct tuna_model *m, const struct tuna_layer *L)
{
    const struct tuna_linear *const lins[7] = {&L->q, &L->k, &L->v, &L->o, &L->gate, &L->up, &L->down};
    for (int i = 0; i < 7; i++)
        if (lora_on(m, lins[i])) return false;
    return true;
}

/* The lora op over n <= 3 linears sharing x: ys[i] += each token's adapter of lins[i]; with
 * glu_out (gate and up), glu_out = act(gate + LoRA) * (up + LoRA) instead (see backend.h). The
 * linears without adapters get none; the caller checked that the step uses adapters. */
static void lora_apply(struct tuna_model *m, int n, const struct tuna_linear *const *lins, float *const *ys,
                       const float *x, int64_t T, float *glu_out, int act)
{
    const struct tuna_lora_bank *sets[3] = {NULL, NULL, NULL};
    int64_t Ns[3] = {0, 0, 0};
    for (int i = 0; i < n; i++) Ns[i] = lins[i]->w.rows;
    const int64_t K = lins[0]->w.cols;
    if (!m->ops->host_memory) { /* a GPU backend reads its device copies (device.c) */
        for (int i = 0; i < n; i++) {
            if (lins[i]->n_lora == 0) continue;
            sets[i] = tuna_model_lora_on_device(m, lins[i]);
            if (!sets[i]) return; /* the upload failed: the backend's sticky error reports it */
        }
        m->ops->lora(m->be, n, ys, Ns, x, T, K, sets, &m->ws->lt, glu_out, act);
        return;
    }
    /* host memory: the attached float32 arrays themselves */
    struct tuna_lora_w stack_w[3 * TUNA_FWD_LORA_GROUPS], *w = stack_w;
    struct tuna_lora_bank banks[3];
    int total = 0;
    for (int i = 0; i < n; i++) total += lins[i]->n_lora;
    if (total > 3 * TUNA_FWD_LORA_GROUPS && !(w = malloc((size_t)total * sizeof *w))) {
        tuna_fail_oom("LoRA descriptors", (size_t)total * sizeof *w); /* ops do not fail: the step goes without */
        return;
    }
    for (int i = 0, off = 0; i < n; i++) {
        const struct tuna_linear *lin = lins[i];
        if (lin->n_lora == 0) continue;
        int64_t max_r = 0;
        for (int a = 0; a < lin->n_lora; a++) {
            const struct tuna_lora *h = &lin->lora[a];
            w[off + a] = (struct tuna_lora_w){h->A, h->B, h->r, h->scale, 0};
            if (h->r > max_r) max_r = h->r;
        }
        banks[i] = (struct tuna_lora_bank){.n = lin->n_lora, .max_r = max_r, .dtype = TUNA_DTYPE_F32, .w = w + off};
        sets[i] = &banks[i];
        off += lin->n_lora;
    }
    m->ops->lora(m->be, n, ys, Ns, x, T, K, sets, &m->ws->lt, glu_out, act);
    if (w != stack_w) free(w);
}

/* Announces the lora_apply call that follows (same lins, x, glu_out, act) after only the
 * projections' GEMMs: a GPU backend starts its shrink beside them (backend.h lora_begin). */
static void lora_begin(struct tuna_model *m, int n, const struct tuna_linear *const *lins, const float *x, int64_t T,
                       float *glu_out, int act)
{
    if (!m->ops->lora_begin || m->ops->host_memory) return;
    const struct tuna_lora_bank *sets[3] = {NULL, NULL, NULL};
    int64_t Ns[3] = {0, 0, 0};
    for (int i = 0; i < n; i++) {
        Ns[i] = lins[i]->w.rows;
        if (lins[i]->n_lora == 0) continue;
        sets[i] = tuna_model_lora_on_device(m, lins[i]);
        if (!sets[i]) return;
    }
    m->ops->lora_begin(m->be, n, Ns, x, T, lins[0]->w.cols, sets, &m->ws->lt, glu_out, act);
}

/* TUNA_LORA_DENSE=0: layers with adapters take the float32 ops and the segmented kernels (the
 * CUDA backend then declines lora_matmul too); read at every call: tests switch it. */
static bool lora_dense_env_on(void)
{
    const char *e = getenv("TUNA_LORA_DENSE");
    return !(e && e[0] == '0');
}

/* The weights, biases and (when used this step) device adapter banks of n <= 3 linears, for the
 * lora_matmul ops. False when an adapter's upload failed (the backend's sticky error reports it). */
static bool lora_group(struct tuna_model *m, int n, const struct tuna_linear *const *lins,
                       const struct tuna_weight **ws, const float **bs, const struct tuna_lora_bank **sets)
{
    for (int i = 0; i < n; i++) {
        ws[i] = &lins[i]->w;
        bs[i] = lins[i]->bias;
        const bool on = lora_on(m, lins[i]);
        sets[i] = on ? tuna_model_lora_on_device(m, lins[i]) : NULL;
        if (on && !sets[i]) return false;
    }
    return true;
}

/* lora_matmul16 over n <= 3 linears of one 16-bit input x (adt): ys in ydt (see backend.h). */
static bool lora_matmul16(struct tuna_model *m, int n, const struct tuna_linear *const *lins, void *const *ys,
                          enum tuna_dtype ydt, const void *x, enum tuna_dtype adt, int64_t T, bool acc)
{
    const struct tuna_lora_bank *sets[3] = {NULL, NULL, NULL};
    const struct tuna_weight *ws[3];
    const float *bs[3];
    if (!lora_group(m, n, lins, ws, bs, sets)) return true;
    return m->ops->lora_matmul16(m->be, n, ys, ydt, x, adt, ws, bs, T, sets, &m->ws->lt, acc);
}

/* The LoRA fold's packed rows for a lora_matmul16 call over n linears (backend.h
 * tuna_lora_fold_stride): their length, *xcol x's column in them; 0 when the call does not fold. */
static int64_t fold_rows(struct tuna_model *m, int n, const struct tuna_linear *const *lins, int64_t *xcol)
{
    const struct tuna_lora_bank *sets[3] = {NULL, NULL, NULL};
    const struct tuna_weight *ws[3];
    const float *bs[3];
    if (!lora_group(m, n, lins, ws, bs, sets)) return 0;
    return tuna_lora_fold_stride(n, sets, xcol);
}

/* Whether a layer whose linears carry adapters used this step can take the 16-bit path: the
 * backend's lora_matmul16 takes steps of T tokens (its n = 0 query), the adapters' views are in
 * adt and q/k/v/gate/up have no bias. */
static bool lora16_ok(struct tuna_model *m, const struct tuna_layer *L, int64_t T, enum tuna_dtype adt)
{
    const struct tuna_backend_ops *op = m->ops;
    if (!lora_dense_env_on() || !op->lora_matmul16 || op->host_memory ||
        !op->lora_matmul16(m->be, 0, NULL, adt, NULL, adt, NULL, NULL, T, NULL, NULL, false))
        return false;
    const struct tuna_linear *const lins[7] = {&L->q, &L->k, &L->v, &L->gate, &L->up, &L->o, &L->down};
    bool on_qkv = false, on_gu = false, bias_qkv = false, bias_gu = false;
    for (int i = 0; i < 7; i++) {
        if (i < 3) bias_qkv = bias_qkv || lins[i]->bias;
        else if (i < 5) bias_gu = bias_gu || lins[i]->bias;
        if (!lora_on(m, lins[i])) continue;
        if (i < 3) on_qkv = true;
        else if (i < 5) on_gu = true;
        const struct tuna_lora_bank *v = tuna_model_lora_on_device(m, lins[i]);
        if (!v || v->dtype != adt) return false;
    }
    return !(on_qkv && bias_qkv) && !(on_gu && bias_gu); /* 16-bit outputs with a bias: declined */
}

/* The projections of lins and their adapters in one backend op (backend.h lora_matmul): ys[i] =
 * (acc: +=) x W_i^T + b_i + each token's adapter of lins[i]. False when the backend has no such
 * op or declines the call: the caller composes the plain ops. */
static bool lora_matmul(struct tuna_model *m, int n, const struct tuna_linear *const *lins, float *const *ys,
                        const float *x, int64_t T, bool acc)
{
    if (!m->ops->lora_matmul || m->ops->host_memory) return false;
    const struct tuna_lora_bank *sets[3] = {NULL, NULL, NULL};
    const struct tuna_weight *ws[3];
    const float *bs[3];
    if (!lora_group(m, n, lins, ws, bs, sets)) return true;
    return m->ops->lora_matmul(m->be, n, ys, x, ws, bs, T, sets, &m->ws->lt, acc);
}

/* TUNA_LORA_ACC=0: o/down with adapters as before (the projection into scratch, then one pass
 * adding it and the adapter into the residual stream); default: the projection accumulates into
 * the residual stream (matmul_add: a GEMM with beta = 1 on the GPU) and the adapter's term is
 * added to its tokens' rows after. */
static bool lora_acc_on(void)
{
    const char *e = getenv("TUNA_LORA_ACC"); /* read at every call: tests switch it */
    return !(e && e[0] == '0');
}

/* y[T,N] += each token's LoRA adapter, when the layer carries any and the step uses one. */
static void lora_add(struct tuna_model *m, const struct tuna_linear *lin, float *y, const float *x, int64_t T,
                     const struct tuna_batch *b)
{
    (void)b; /* the step's tokens are in m->ws->lt */
    if (!lora_on(m, lin)) return;
    const struct tuna_linear *const lins[1] = {lin};
    float *const ys[1] = {y};
    lora_apply(m, 1, lins, ys, x, T, NULL, 0);
}

/* y[T,N] = x W^T + b, plus each token's LoRA adapter when the layer carries any. */
static void linear(struct tuna_model *m, const struct tuna_linear *lin, float *y, const float *x, int64_t T,
                   const struct tuna_batch *b)
{
    m->ops->matmul(m->be, y, x, &lin->w, lin->bias, T);
    lora_add(m, lin, y, x, T, b);
}

/* The attention projections q, k, v of one input: one grouped launch when the backend fuses,
 * and their adapters in one lora call (one pass over x). */
static void linear_qkv(struct tuna_model *m, const struct tuna_layer *L, const struct tuna_fwd_layer_acts *A,
                       int64_t T, const struct tuna_batch *b, bool fuse)
{
    float *const ys[3] = {A->q, A->k, A->v};
    const bool on = lora_on(m, &L->q) || lora_on(m, &L->k) || lora_on(m, &L->v);
    const struct tuna_linear *const lins[3] = {&L->q, &L->k, &L->v};
    if (!fuse) {
        m->ops->matmul(m->be, A->q, A->xn_attn, &L->q.w, L->q.bias, T); /* (T, H*D) */
        m->ops->matmul(m->be, A->k, A->xn_attn, &L->k.w, L->k.bias, T); /* (T, Hkv*D) */
        m->ops->matmul(m->be, A->v, A->xn_attn, &L->v.w, L->v.bias, T); /* (T, Hkv*D) */
    } else {
        const struct tuna_weight *const ws[3] = {&L->q.w, &L->k.w, &L->v.w};
        const float *const bs[3] = {L->q.bias, L->k.bias, L->v.bias};
        if (on && lora_matmul(m, 3, lins, ys, A->xn_attn, T, false)) return; /* q/k/v and their adapters */
        if (on) lora_begin(m, 3, lins, A->xn_attn, T, NULL, 0); /* the shrink beside the GEMMs */
        m->ops->matmul_multi(m->be, 3, ys, A->xn_attn, ws, bs, T);
    }
    (void)b;
    if (!on) return;
    lora_apply(m, 3, lins, ys, A->xn_attn, T, NULL, 0);
}

/* x[T,C] += in W^T (+ LoRA): o_proj and down_proj into the residual stream. */
static void linear_residual(struct tuna_model *m, const struct tuna_linear *lin, float *x, const float *in,
                            float *tmp, int64_t T, const struct tuna_batch *b, bool fuse)
{
    if (!fuse) {
        linear(m, lin, tmp, in, T, b);
        m->ops->add(m->be, x, tmp, T * lin->w.rows);
        return;
    }
    if (!lora_on(m, lin)) {
        m->ops->matmul_add(m->be, x, in, &lin->w, lin->bias, T);
        return;
    }
    const struct tuna_linear *const lins[1] = {lin};
    if (lora_acc_on()) {
        float *const yx[1] = {x};
        if (lora_matmul(m, 1, lins, yx, in, T, true)) return; /* x += in W^T + LoRA in one op */
        /* with adapters: the projection accumulated into x (its shrink beside it), then the
         * adapters' terms added to their tokens' rows of x */
        lora_begin(m, 1, lins, in, T, NULL, 0);
        m->ops->matmul_add(m->be, x, in, &lin->w, lin->bias, T);
        float *const ys[1] = {x};
        lora_apply(m, 1, lins, ys, in, T, NULL, 0);
        return;
    }
    /* TUNA_LORA_ACC=0: the projection into tmp, then tmp and the adapter added into x in one pass */
    lora_begin(m, 1, lins, in, T, x, TUNA_LORA_RESIDUAL);
    m->ops->matmul(m->be, tmp, in, &lin->w, lin->bias, T);
    float *const ys[1] = {tmp};
    lora_apply(m, 1, lins, ys, in, T, x, TUNA_LORA_RESIDUAL);
}

/* Checks positions against the cache and grows each sequence to hold this step's tokens. Tokens
 * of one sequence must continue it in order: position = cached length + earlier tokens of it. */
static tuna_status place_tokens(struct tuna_model *m, tuna_kv_cache *kv, const struct tuna_batch *b)
{
    enum { MAXS = 1024 }; /* sequences in one step (--max-num-seqs at most) */
    int32_t ids[MAXS];
    int64_t start[MAXS], next[MAXS];
    int ns = 0;
    for (int64_t t = 0; t < b->n; t++) {
        int32_t s = b->seq[t];
        if (b->tokens[t] < 0 || b->tokens[t] >= m->arch.vocab_size)
            return tuna_fail(TUNA_E_RANGE, "token id %d (batch row %lld) is outside the vocabulary of %lld",
                             b->tokens[t], (long long)t, (long long)m->arch.vocab_size);
        int j = 0;
        while (j < ns && ids[j] != s) j++;
        if (j == ns) {
            if (ns == MAXS) return tuna_fail(TUNA_E_INVALID, "forward: more than %d sequences in one step", MAXS);
            int64_t len = tuna_kv_seq_len(kv, s);
            if (len < 0) return tuna_fail(TUNA_E_INVALID, "forward: batch row %lld names unknown KV sequence %d",
                                          (long long)t, s);
            ids[ns] = s;
            start[ns] = next[ns] = len;
            ns++;
        }
        if (b->pos[t] != next[j])
            return tuna_fail(TUNA_E_INVALID, "forward: batch row %lld puts sequence %d at position %lld, but the "
                             "sequence continues at %lld", (long long)t, s, (long long)b->pos[t], (long long)next[j]);
        if (b->pos[t] >= m->max_model_len)
            return tuna_fail(TUNA_E_RANGE, "sequence %d reaches %lld tokens, past the context limit of %lld "
                             "(max_position_embeddings or --max-model-len); shorten the prompt or max tokens",
                             s, (long long)b->pos[t] + 1, (long long)m->max_model_len);
        next[j]++;
    }
    for (int j = 0; j < ns; j++) {
        tuna_status st = tuna_kv_seq_grow(kv, ids[j], next[j]);
        if (st) {
            for (int i = 0; i < j; i++) tuna_kv_seq_truncate(kv, ids[i], start[i]);
            return st;
        }
    }
    return TUNA_OK;
}

/* Where a step's metadata lives for the ops: the caller's host arrays, or their copies in the
 * backend's step block (one upload per step; what makes the step capturable as a graph). */
struct step_meta {
    const int32_t *ids;
    const int64_t *pos, *slot;
    const float *inv_freq;
    const struct tuna_attn_batch *ab;
};

/* Steps of at most this many tokens put their metadata in the step block (decode and small
 * mixed batches; a long prefill's flattened block tables would not be worth it). */
#define STEP_BLOCK_MAX_T 512

static size_t align16(size_t n) { return (n + 15) & ~(size_t)15; }

/* Copies the step's metadata into the backend's step block; false when the backend has none or
 * the step is too large (the ops then take the host arrays). */
static bool fill_step_block(struct tuna_model *m, const struct tuna_batch *b, struct tuna_attn_batch *ab,
                            struct step_meta *md)
{
    const struct tuna_backend_ops *op = m->ops;
    const int64_t T = b->n, W = ab->max_blocks_per_seq, half = m->rot_dim / 2;
    if (!op->step_block || T > STEP_BLOCK_MAX_T || W <= 0) return false;
    size_t o_pos = align16((size_t)T * 4), o_slot = o_pos + align16((size_t)T * 8),
           o_freq = o_slot + align16((size_t)T * 8), o_tab = o_freq + align16((size_t)half * 4),
           total = o_tab + (size_t)T * (size_t)W * 4;
    /* LoRA: adapter [T], order [T], start [groups + 1] (lora_tokens) */
    const size_t o_lad = align16(total), o_lord = o_lad + align16((size_t)T * 4), o_lst = o_lord + align16((size_t)T * 4);
    if (m->ws->lora_used) total = o_lst + sizeof m->ws->lora_start;
    char *blk = op->step_block(m->be, total);
    if (!blk) return false;
    memcpy(blk, b->tokens, (size_t)T * 4);
    memcpy(blk + o_pos, b->pos, (size_t)T * 8);
    memcpy(blk + o_slot, m->ws->slot, (size_t)T * 8);
    memcpy(blk + o_freq, m->inv_freq, (size_t)half * 4);
    int32_t *tab = (int32_t *)(blk + o_tab);
    for (int64_t t = 0; t < T; t++) {
        int64_t nb = b->pos[t] / ab->block_size + 1;
        if (nb > W) nb = W; /* place_tokens already bounded positions by the cache */
        memcpy(tab + t * W, ab->block_tables[t], (size_t)nb * 4);
    }
    struct tuna_fwd_ws *ws = m->ws;
    if (ws->lora_used) {
        memcpy(blk + o_lad, b->adapter, (size_t)T * 4);
        memcpy(blk + o_lord, ws->lora_order, (size_t)T * 4);
        memcpy(blk + o_lst, ws->lora_start, sizeof ws->lora_start);
        ws->lt.adapter = (const int32_t *)(blk + o_lad);
        ws->lt.order = (const int32_t *)(blk + o_lord);
        ws->lt.start = (const int32_t *)(blk + o_lst);
    }
    op->step_upload(m->be, total);
    ab->pos = (const int64_t *)(blk + o_pos);
    ab->tables_flat = tab;
    md->ids = (const int32_t *)blk;
    md->pos = ab->pos;
    md->slot = (const int64_t *)(blk + o_slot);
    md->inv_freq = (const float *)(blk + o_freq);
    return true;
}

static uint64_t mix_key(uint64_t h, uint64_t v)
{
    h ^= v + 0x9E3779B97F4A7C15ULL + (h << 6) + (h >> 2);
    return h * 0xBF58476D1CE4E5B9ULL;
}

/* TUNA_ACT16=0: every layer takes the float32 ops (the A/B of the 16-bit activation path). */
static bool act16_env_on(void)
{
    const char *e = getenv("TUNA_ACT16"); /* read at every step: tests switch it */
    return !(e && e[0] == '0');
}

/* What a captured step depends on besides the step block: sizes and every buffer address it
 * touches. Every layer's K/V storage is hashed, not just the first: a new KV cache can reuse the
 * freed one's first allocation while its other layers land elsewhere. (Weights need no hash: the
 * graphs live in the model's own backend and die with it.) */
static struct tuna_decode_layer decode_args(const struct tuna_model *m, const struct tuna_layer *L,
                                            const struct tuna_fwd_layer_acts *A, float *x, void *kc, void *vc,
                                            enum tuna_dtype kvdt, const struct step_meta *md, float scale);

static uint64_t graph_key(const struct tuna_model *m, tuna_kv_cache *kv, const struct tuna_attn_batch *ab, int64_t T,
                          bool ids, const struct step_meta *md)
{
    const struct tuna_fwd_ws *ws = m->ws;
    uint64_t h = mix_key(0, (uint64_t)T);
    /* whether the backend takes layer 0's attention with RoPE and warms its cache around it (it
     * may decide by the context length: CUDA's rope_attention and warm_l2), asked as step_body
     * asks. Either way the results are the same, so this is for speed only: a step captured at a
     * short context is captured again past the switch instead of replaying what is slower there.
     * One layer stands for all (the answers change from step to step only with the position). */
    if (T == 1 && m->arch.n_layers > 0 && (m->ops->rope_attention || m->ops->warm_l2)) {
        const float scale = (float)(1.0 / sqrt((double)m->arch.head_dim));
        const struct tuna_decode_layer dl = decode_args(m, &m->layers[0], &ws->a, ws->x, tuna_kv_k(kv, 0),
                                                        tuna_kv_v(kv, 0), tuna_kv_dtype(kv), md, scale);
        if (m->ops->rope_attention) h = mix_key(h, (uint64_t)m->ops->rope_attention(m->be, &dl, true));
        if (m->ops->warm_l2) h = mix_key(h, 2 + (uint64_t)m->ops->warm_l2(m->be, &dl, true));
    }
    h = mix_key(h, (uint64_t)ids); /* the step ends with the greedy ids' kernels (argmax_queue) */
    h = mix_key(h, (uint64_t)ab->max_blocks_per_seq);
    h = mix_key(h, (uint64_t)ab->block_size);
    h = mix_key(h, (uint64_t)tuna_kv_dtype(kv));
    h = mix_key(h, (uint64_t)act16_env_on()); /* which ops the layers run */
    /* LoRA: whether the step runs the adapters, and which set (its device views) it reads */
    h = mix_key(h, (uint64_t)ws->lora_used);
    if (ws->lora_used) h = mix_key(h, (uint64_t)lora_dense_env_on()); /* dense or segmented LoRA */
    if (ws->lora_used) h = mix_key(h, tuna_model_lora_generation(m) + 1);
    for (int64_t l = 0; l < m->arch.n_layers; l++) {
        h = mix_key(h, (uint64_t)(uintptr_t)tuna_kv_k(kv, l));
        h = mix_key(h, (uint64_t)(uintptr_t)tuna_kv_v(kv, l));
    }
    const void *bufs[] = {ws->x,     ws->tmp,      ws->sel,    ws->logits, ws->a.xn_attn, ws->a.q, ws->a.k,
                          ws->a.v,   ws->a.att,    ws->a.xn_mlp, ws->a.gate, ws->a.up};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) h = mix_key(h, (uint64_t)(uintptr_t)bufs[i]);
    return h;
}

/* The activations' 16-bit type of layer L on the 16-bit activation path (backend.h's rmsnorm16 ..
 * act16_min_t), or TUNA_DTYPE_INVALID when the layer takes the float32 ops: the fused
 * path (no trace), a backend with every 16-bit op, T >= its act16_min_t, all seven weights in the
 * same bf16 or f16 type and no adapter used in the layer this step. */
static enum tuna_dtype act16_type(const struct tuna_model *m, const struct tuna_layer *L, int64_t T, bool on)
{
    const struct tuna_backend_ops *op = m->ops;
    if (!on || !op->rmsnorm16 || !op->matmul16 || !op->rope_kv_store16 || !op->attention16 || !op->glu16 ||
        !op->act16_min_t || T < op->act16_min_t(m->be))
        return TUNA_DTYPE_INVALID;
    const enum tuna_dtype dt = L->q.w.dtype;
    if (dt != TUNA_DTYPE_BF16 && dt != TUNA_DTYPE_F16) return TUNA_DTYPE_INVALID;
    const struct tuna_linear *const lins[7] = {&L->q, &L->k, &L->v, &L->o, &L->gate, &L->up, &L->down};
    bool lora = false;
    for (int i = 0; i < 7; i++) {
        if (lins[i]->w.dtype != dt) return TUNA_DTYPE_INVALID;
        lora = lora || lora_on(m, lins[i]);
    }
    /* adapters: the dense form on 16-bit activations (lora_matmul16) where the backend takes it */
    if (lora && !lora16_ok((struct tuna_model *)m, L, T, dt)) return TUNA_DTYPE_INVALID;
    return dt;
}

/* One layer on the 16-bit activation path (backend.h): xn, q/k/v, the attention output, gate/up
 * and the GLU output in 16 bits of adt, in the float32 buffers of A (each holds twice the
 * elements); the residual stream x stays float32 (o and down accumulate into it). */
static tuna_status layer_act16(struct tuna_model *m, const struct tuna_layer *L, const struct tuna_fwd_layer_acts *A,
                               float *x, void *kc, void *vc, enum tuna_dtype kvdt, const struct step_meta *md,
                               int64_t T, enum tuna_dtype adt)
{
    const struct tuna_arch *a = &m->arch;
    const struct tuna_backend_ops *op = m->ops;
    tuna_backend *be = m->be;
    const int64_t C = a->hidden_size, H = a->n_heads, Hkv = a->n_kv_heads, D = a->head_dim, I = a->intermediate_size;
    const float eps = (float)a->norm_eps, scale = (float)(1.0 / sqrt((double)D));
    const enum tuna_dtype F32 = TUNA_DTYPE_F32;
    const struct tuna_linear *const qkv[3] = {&L->q, &L->k, &L->v}, *const gu[2] = {&L->gate, &L->up};
    const struct tuna_linear *const o1[1] = {&L->o}, *const d1[1] = {&L->down};
    void *const yqkv[3] = {A->q, A->k, A->v}, *const ygu[2] = {A->gate, A->up}, *const yx[1] = {x};
    /* the LoRA fold (docs/LORA.md): the norm writes x into the packed rows the call reads */
    const bool lqkv = lora_on(m, &L->q) || lora_on(m, &L->k) || lora_on(m, &L->v);
    int64_t xc = 0;
    int64_t ps = lqkv ? fold_rows(m, 3, qkv, &xc) : 0;
    op->rmsnorm16(be, (char *)A->xn_attn + (size_t)xc * 2, ps, x, L->attn_norm, T, C, eps, adt);
    bool ok = lqkv ? lora_matmul16(m, 3, qkv, yqkv, adt, A->xn_attn, adt, T, false)
                  : op->matmul16(be, A->q, adt, A->xn_attn, adt, &L->q.w, L->q.bias, T, false) &&
                        op->matmul16(be, A->k, adt, A->xn_attn, adt, &L->k.w, L->k.bias, T, false) &&
                        op->matmul16(be, A->v, adt, A->xn_attn, adt, &L->v.w, L->v.bias, T, false);
    if (!ok) return tuna_fail(TUNA_E_INTERNAL, "forward: the backend declined a 16-bit q/k/v projection");
    op->rope_kv_store16(be, A->q, A->k, A->v, adt, L->q_norm, L->k_norm, eps, kc, vc, kvdt, md->pos, md->slot, T, H, Hkv,
                        D, m->rot_dim, md->inv_freq, m->attn_factor);
    op->attention16(be, A->att, A->q, adt, kc, vc, kvdt, md->ab, H, Hkv, D, scale);
    ok = lora_on(m, &L->o) ? lora_matmul16(m, 1, o1, yx, F32, A->att, adt, T, true)
                           : op->matmul16(be, x, F32, A->att, adt, &L->o.w, L->o.bias, T, true); /* x += att W_o^T */
    const bool lgu = lora_on(m, &L->gate) || lora_on(m, &L->up);
    xc = 0;
    ps = lgu ? fold_rows(m, 2, gu, &xc) : 0;
    op->rmsnorm16(be, (char *)A->xn_mlp + (size_t)xc * 2, ps, x, L->mlp_norm, T, C, eps, adt);
    ok = ok && (lgu ? lora_matmul16(m, 2, gu, ygu, adt, A->xn_mlp, adt, T, false)
                    : op->matmul16(be, A->gate, adt, A->xn_mlp, adt, &L->gate.w, L->gate.bias, T, false) &&
                          op->matmul16(be, A->up, adt, A->xn_mlp, adt, &L->up.w, L->up.bias, T, false));
    op->glu16(be, A->gate, A->gate, A->up, T * I, (int)a->act, adt);
    ok = ok && (lora_on(m, &L->down) ? lora_matmul16(m, 1, d1, yx, F32, A->gate, adt, T, true)
                                     : op->matmul16(be, x, F32, A->gate, adt, &L->down.w, L->down.bias, T,
                                                    true)); /* x += act W_down^T */
    return ok ? TUNA_OK : tuna_fail(TUNA_E_INTERNAL, "forward: the backend declined a 16-bit projection");
}

/* RoPE of q and k (after the q/k norms where the model has them) and k, v into the cache. */
static void rope_and_store(struct tuna_model *m, const struct tuna_layer *L, const struct tuna_fwd_layer_acts *A,
                           void *kc, void *vc, enum tuna_dtype kvdt, const struct step_meta *md, int64_t T, bool fuse)
{
    const struct tuna_arch *a = &m->arch;
    const struct tuna_backend_ops *op = m->ops;
    tuna_backend *be = m->be;
    const int64_t H = a->n_heads, Hkv = a->n_kv_heads, D = a->head_dim;
    if (fuse && op->rope_kv_store) { /* q/k norm, RoPE of q and k and the KV store in one op */
        op->rope_kv_store(be, A->q, A->k, A->v, L->q_norm, L->k_norm, (float)a->norm_eps, kc, vc, kvdt, md->pos,
                          md->slot, T, H, Hkv, D, m->rot_dim, md->inv_freq, m->attn_factor);
        return;
    }
    if (L->q_norm) op->rmsnorm(be, A->q, A->q, L->q_norm, T * H, D, (float)a->norm_eps);
    if (L->k_norm) op->rmsnorm(be, A->k, A->k, L->k_norm, T * Hkv, D, (float)a->norm_eps);
    op->rope(be, A->q, md->pos, T, H, D, m->rot_dim, md->inv_freq, m->attn_factor);
    op->rope(be, A->k, md->pos, T, Hkv, D, m->rot_dim, md->inv_freq, m->attn_factor);
    op->kv_store(be, kc, vc, kvdt, A->k, A->v, md->slot, T, Hkv * D);
}

/* Layer L's ops' arguments as one struct, for the backends that fuse a layer or parts of it (A: the
 * activations' buffers, kc and vc its cache). */
static struct tuna_decode_layer decode_args(const struct tuna_model *m, const struct tuna_layer *L,
                                            const struct tuna_fwd_layer_acts *A, float *x, void *kc, void *vc,
                                            enum tuna_dtype kvdt, const struct step_meta *md, float scale)
{
    const struct tuna_arch *a = &m->arch;
    const struct tuna_decode_layer dl = {
        x, A->q, A->k, A->v, A->att, A->xn_attn, A->xn_mlp, A->gate, L->attn_norm, L->mlp_norm,
        (float)a->norm_eps, {&L->q.w, &L->k.w, &L->v.w, &L->o.w, &L->gate.w, &L->up.w, &L->down.w},
        {L->q.bias, L->k.bias, L->v.bias, L->o.bias, L->gate.bias, L->up.bias, L->down.bias}, kc, vc, kvdt,
        md->pos, md->slot, md->inv_freq, m->attn_factor, scale, md->ab, a->n_heads, a->n_kv_heads, a->head_dim,
        m->rot_dim, (int)a->act};
    return dl;
}

/* Embedding, the layers, the final norm and lm_head of one step: logits of the wanted rows into
 * `logits` (host backends) or ws->logits. */
static tuna_status step_body(struct tuna_model *m, tuna_kv_cache *kv, const struct tuna_batch *b, float *logits,
                             bool want_logits, struct tuna_fwd_trace *trace, const struct step_meta *md)
{
    const struct tuna_arch *a = &m->arch;
    const struct tuna_backend_ops *op = m->ops;
    tuna_backend *be = m->be;
    const int64_t T = b->n, C = a->hidden_size, H = a->n_heads, Hkv = a->n_kv_heads, D = a->head_dim;
    const int64_t I = a->intermediate_size;
    struct tuna_fwd_ws *ws = m->ws;
    const enum tuna_dtype kvdt = tuna_kv_dtype(kv); /* float32, or 16-bit on the GPU */
    const float scale = (float)(1.0 / sqrt((double)D));
    float *x = ws->x;
    /* the backend's fused projections, except when backward needs every intermediate */
    const bool fuse = !trace && op->matmul_multi && op->matmul_glu && op->matmul_add;
    const bool act16 = fuse && act16_env_on(); /* the 16-bit activation path where a layer allows it */

    op->embedding(be, x, md->ids, T, &m->embed, m->embed_scale);
    bool qkv_ready = false; /* the previous layer's decode_o_mlp made this layer's q, k and v */
    for (int64_t l = 0; l < a->n_layers; l++) {
        const struct tuna_layer *L = &m->layers[l];
        const struct tuna_fwd_layer_acts *A = trace ? &trace->layers[l] : &ws->a;
        void *kc = tuna_kv_k(kv, l), *vc = tuna_kv_v(kv, l);
        if (trace) op->copy(be, A->x_in, x, (size_t)(T * C) * sizeof(float));
        const enum tuna_dtype adt = act16_type(m, L, T, act16);
        if (adt != TUNA_DTYPE_INVALID) {
            tuna_status st = layer_act16(m, L, A, x, kc, vc, kvdt, md, T, adt);
            if (st) return st;
            continue;
        }
        /* the ops' arguments as one struct, for the backends that fuse a layer or its attention */
        const struct tuna_decode_layer dl = decode_args(m, L, A, x, kc, vc, kvdt, md, scale);
        const bool pre = qkv_ready;
        qkv_ready = false;
        if (!pre && fuse && T == 1 && op->decode_layer && !L->q_norm && !L->k_norm && layer_without_lora(m, L)) {
            /* the whole layer in one call where the backend takes it (CUDA: one kernel, 4-bit) */
            if (op->decode_layer(be, &dl)) continue;
        }
        const bool qkv_plain = L->q.n_lora == 0 && L->k.n_lora == 0 && L->v.n_lora == 0;
        /* RoPE, the KV store, attention and o in one op after the q/k/v projections, where the
         * backend takes it (CUDA: one kernel for a 4-bit o at batch 1) */
        const bool ao = !pre && fuse && T == 1 && op->attention_o && op->rmsnorm_matmul_multi && qkv_plain &&
                        !lora_on(m, &L->o) && !L->q_norm && !L->k_norm && op->attention_o(be, &dl, true);
        /* attention block; the o projection's weights may stream into the device's cache while
         * RoPE and attention leave memory bandwidth idle (a hint: prefetch_l2) */
        if (fuse && op->prefetch_l2 && !ao)
            op->prefetch_l2(be, L->o.w.data, tuna_dtype_nbytes(L->o.w.dtype, (uint64_t)(L->o.w.rows * L->o.w.cols)));
        /* RoPE, the KV store and attention in one op after q/k/v projected without RoPE, where the
         * backend takes it (CUDA: the batch-1 attention kernel, for 4-bit q/k/v weights) */
        const bool ra = !ao && fuse && T == 1 && op->rope_attention && !L->q_norm && !L->k_norm &&
                        op->rope_attention(be, &dl, true);
        bool roped = false; /* RoPE and the KV store done */
        if (pre) {
            /* q, k and v were projected by the previous layer's decode_o_mlp */
        } else if (fuse && op->rmsnorm_qkv_rope_kv && qkv_plain && !L->q_norm && !L->k_norm && !ao && !ra) {
            /* norm, q/k/v, RoPE and the KV store in one op (one kernel on the GPU) */
            float *const ys[3] = {A->q, A->k, A->v};
            const struct tuna_weight *const w3[3] = {&L->q.w, &L->k.w, &L->v.w};
            const float *const b3[3] = {L->q.bias, L->k.bias, L->v.bias};
            op->rmsnorm_qkv_rope_kv(be, ys, A->xn_attn, x, L->attn_norm, (float)a->norm_eps, w3, b3, kc, vc, kvdt,
                                    md->pos, md->slot, T, H, Hkv, D, m->rot_dim, md->inv_freq, m->attn_factor);
            roped = true;
        } else if (fuse && op->rmsnorm_matmul_multi && qkv_plain) {
            /* the norm folded into the q/k/v GEMV (it still writes xn_attn) */
            float *const ys[3] = {A->q, A->k, A->v};
            const struct tuna_weight *const w3[3] = {&L->q.w, &L->k.w, &L->v.w};
            const float *const b3[3] = {L->q.bias, L->k.bias, L->v.bias};
            op->rmsnorm_matmul_multi(be, 3, ys, A->xn_attn, x, L->attn_norm, (float)a->norm_eps, w3, b3, T);
        } else {
            op->rmsnorm(be, A->xn_attn, x, L->attn_norm, T, C, (float)a->norm_eps);
            linear_qkv(m, L, A, T, b, fuse); /* q (T, H*D), k and v (T, Hkv*D) */
        }
        /* the weights after the attention (o, gate, up) may stream into the device's cache while
         * the attention leaves memory bandwidth idle (a hint: warm_l2) */
        if (fuse && T == 1 && !ao && op->warm_l2) op->warm_l2(be, &dl, false);
        if (!(ao && op->attention_o(be, &dl, false))) {
            if (!(ra && op->rope_attention(be, &dl, false))) {
                if (!roped) rope_and_store(m, L, A, kc, vc, kvdt, md, T, fuse);
                op->attention(be, A->att, A->q, kc, vc, kvdt, md->ab, H, Hkv, D, scale); /* (T, H*D) */
            }
            /* o and the MLP block in one op where the backend takes it (CUDA: one persistent
             * kernel for 4-bit weights at batch 1, TUNA_Q4_OM) */
            if (fuse && T == 1 && op->decode_o_mlp && !lora_on(m, &L->o) && !lora_on(m, &L->gate) &&
                !lora_on(m, &L->up) && !lora_on(m, &L->down)) {
                /* ... and the next layer's q/k/v projections where it takes the plain path */
                const struct tuna_layer *N = l + 1 < a->n_layers ? &m->layers[l + 1] : NULL;
                const bool nplain = N && op->rmsnorm_matmul_multi && N->q.n_lora == 0 && N->k.n_lora == 0 &&
                                    N->v.n_lora == 0 && act16_type(m, N, T, act16) == TUNA_DTYPE_INVALID;
                struct tuna_decode_layer dn;
                if (nplain)
                    dn = decode_args(m, N, A, x, tuna_kv_k(kv, l + 1), tuna_kv_v(kv, l + 1), kvdt, md, scale);
                bool next_qkv = false;
                if (op->decode_o_mlp(be, &dl, nplain ? &dn : NULL, &next_qkv)) {
                    qkv_ready = next_qkv;
                    continue;
                }
            }
            linear_residual(m, &L->o, x, A->att, ws->tmp, T, b, fuse); /* x (T, C) += */
        }
        if (trace) op->copy(be, A->x_mid, x, (size_t)(T * C) * sizeof(float));
        /* MLP block */
        float *act = trace ? A->act : A->gate;
        const bool mlp_plain = !lora_on(m, &L->gate) && !lora_on(m, &L->up); /* no adapter in this step */
        /* the whole MLP in one op where the backend takes it (CUDA: one kernel for 4-bit weights at
         * batch 1 with TUNA_Q4_MLP=1, down's sums left pending for x's next reader; not in the last
         * layer, whose reader is lm_head's GEMV) */
        if (fuse && T == 1 && op->rmsnorm_glu_down && mlp_plain && !lora_on(m, &L->down) && !L->gate.bias &&
            !L->up.bias && !L->down.bias && l + 1 < a->n_layers &&
            op->rmsnorm_glu_down(be, x, A->xn_mlp, L->mlp_norm, (float)a->norm_eps, &L->gate.w, &L->up.w,
                                 &L->down.w, T, (int)a->act))
            continue;
        if (fuse && op->rmsnorm_matmul_glu && mlp_plain) {
            op->rmsnorm_matmul_glu(be, act, A->xn_mlp, x, L->mlp_norm, (float)a->norm_eps, &L->gate.w, L->gate.bias,
                                   &L->up.w, L->up.bias, T, (int)a->act);
        } else if (fuse && mlp_plain) {
            op->rmsnorm(be, A->xn_mlp, x, L->mlp_norm, T, C, (float)a->norm_eps);
            op->matmul_glu(be, act, A->xn_mlp, &L->gate.w, L->gate.bias, &L->up.w, L->up.bias, T, (int)a->act);
        } else if (!trace && !mlp_plain) {
            /* gate and up, then their adapters folded into the GLU (one pass over xn_mlp) */
            op->rmsnorm(be, A->xn_mlp, x, L->mlp_norm, T, C, (float)a->norm_eps);
            float *const ys[3] = {A->gate, A->up, NULL}; /* (T, I) each; [2]: down's (unused) */
            /* down's adapters too: the GPU folds down's shrink into the GLU (backend.h) */
            const struct tuna_linear *const lins[3] = {&L->gate, &L->up, &L->down};
            const int nl = lora_on(m, &L->down) ? 3 : 2;
            const bool dense = fuse && lora_matmul(m, 2, lins, ys, A->xn_mlp, T, false);
            if (dense) {
                /* gate and up with their adapters in one op, then the GLU (down: its own op) */
                op->glu(be, act, A->gate, A->up, T * I, (int)a->act);
            } else if (fuse) {
                const struct tuna_weight *const w2[2] = {&L->gate.w, &L->up.w};
                const float *const b2[2] = {L->gate.bias, L->up.bias};
                lora_begin(m, nl, lins, A->xn_mlp, T, act, (int)a->act); /* the shrink beside the GEMMs */
                op->matmul_multi(be, 2, ys, A->xn_mlp, w2, b2, T);
            } else {
                op->matmul(be, A->gate, A->xn_mlp, &L->gate.w, L->gate.bias, T);
                op->matmul(be, A->up, A->xn_mlp, &L->up.w, L->up.bias, T);
            }
            if (!dense) lora_apply(m, nl, lins, ys, A->xn_mlp, T, act, (int)a->act);
        } else {
            op->rmsnorm(be, A->xn_mlp, x, L->mlp_norm, T, C, (float)a->norm_eps);
            linear(m, &L->gate, A->gate, A->xn_mlp, T, b); /* (T, I) */
            linear(m, &L->up, A->up, A->xn_mlp, T, b);     /* (T, I) */
            op->glu(be, act, A->gate, A->up, T * I, (int)a->act);
        }
        linear_residual(m, &L->down, x, act, ws->tmp, T, b, fuse); /* x (T, C) += */
    }
    if (trace) op->copy(be, trace->x_final, x, (size_t)(T * C) * sizeof(float));
    if (!want_logits) return TUNA_OK;
    int64_t n = b->n_logits;
    float *out = logits; /* (n, V): the caller's host array, or ws->logits */
    if (!(op->host_memory && logits)) {
        const int64_t V = a->vocab_size;
        if (ws->logits_cap < n) {
            op->release(be, ws->logits);
            ws->logits = NULL;
            ws->logits_cap = 0;
            if (!bk_alloc(m, &ws->logits, (size_t)(n * V))) return tuna_fail_prefix(TUNA_E_OOM, "forward: logits buffer");
            ws->logits_cap = n;
        }
        out = ws->logits;
    }
    if (n == T && fuse && op->rmsnorm_matmul_multi) { /* the final norm folded into lm_head's GEMV */
        float *const ys[1] = {out};
        const struct tuna_weight *const w1[1] = {&m->lm_head.w};
        op->rmsnorm_matmul_multi(be, 1, ys, ws->sel, x, m->final_norm, (float)a->norm_eps, w1, NULL, n);
        return TUNA_OK;
    }
    if (n == T) { /* every row: normalize straight from the residual stream */
        op->rmsnorm(be, ws->sel, x, m->final_norm, n, C, (float)a->norm_eps);
    } else {
        n = 0;
        for (int64_t t = 0; t < T; t++)
            if (b->logits[t]) op->copy(be, ws->sel + (n++) * C, x + t * C, (size_t)C * sizeof(float));
        op->rmsnorm(be, ws->sel, ws->sel, m->final_norm, n, C, (float)a->norm_eps);
    }
    op->matmul(be, out, ws->sel, &m->lm_head.w, NULL, n); /* (n, V) */
    return TUNA_OK;
}

/* The step; the rows that want logits get them in `logits` (host [n, V]) or, when `ids` is given
 * instead, only their greedy ids (host [n]) through the backend's argmax. */
static tuna_status forward_step(struct tuna_model *m, tuna_kv_cache *kv, const struct tuna_batch *b, float *logits,
                                int32_t *ids, struct tuna_fwd_trace *trace)
{
    const struct tuna_arch *a = &m->arch;
    const struct tuna_backend_ops *op = m->ops;
    tuna_backend *be = m->be;
    const int64_t T = b->n;
    if (T == 0) return TUNA_OK;
    tuna_status st = ws_reserve(m, T);
    if (!st && trace) st = trace_reserve(m, trace, T);
    if (!st) st = place_tokens(m, kv, b);
    if (st) return st;
    struct tuna_fwd_ws *ws = m->ws;
    int64_t maxpos = 0;
    for (int64_t t = 0; t < T; t++) {
        ws->slot[t] = tuna_kv_slot(kv, b->seq[t], b->pos[t]);
        ws->bt[t] = tuna_kv_seq_blocks(kv, b->seq[t]);
        if (b->pos[t] > maxpos) maxpos = b->pos[t];
    }
    if (a->rope.type == TUNA_ROPE_DYNAMIC && maxpos + 1 != m->inv_freq_len) {
        tuna_rope_inv_freq(a, maxpos + 1, m->inv_freq, &m->attn_factor);
        m->inv_freq_len = maxpos + 1;
    }
    struct tuna_attn_batch ab = {T, b->pos, ws->bt, tuna_kv_block_size(kv), a->sliding_window,
                                 tuna_kv_max_blocks_per_seq(kv, m->max_model_len), NULL};
    struct step_meta md = {b->tokens, b->pos, ws->slot, m->inv_freq, &ab};
    const bool want_logits = (logits || ids) && b->n_logits > 0;
    const int64_t n = b->n_logits, V = a->vocab_size;
    /* greedy ids: their kernels queued with the step (inside its graph) where the backend splits
     * argmax, so only the wait for T ints follows it */
    const bool q_ids = ids && want_logits && op->argmax_queue && op->argmax_take;
    int graph = -1;
    if ((st = lora_tokens(m, b))) return st;
    if (!trace && fill_step_block(m, b, &ab, &md)) {
        /* a whole step as one CUDA graph: decode-like steps (with or without adapters: their
         * choice per token is in the step block), every row's logits, buffers already sized (a
         * logits buffer that would grow is allocated by the eager run) */
        if (op->graph_begin && want_logits && b->n_logits == T && ws->logits_cap >= T)
            graph = op->graph_begin(be, graph_key(m, kv, &ab, T, q_ids, &md));
    }
    if (graph != 1) {
        st = step_body(m, kv, b, logits, want_logits, trace, &md);
        if (!st && q_ids) op->argmax_queue(be, ws->logits, n, V);
        if (!st && graph == 0 && !op->graph_end(be)) {
            st = step_body(m, kv, b, logits, want_logits, trace, &md);
            if (!st && q_ids) op->argmax_queue(be, ws->logits, n, V);
        }
        if (st) return st;
    }
    if (!want_logits) return op->sync(be);
    if (op->host_memory && logits) return TUNA_OK;
    if (q_ids) return op->argmax_take(be, ids, n);                               /* n ints cross the bus, syncs */
    if (ids) return op->argmax(be, ids, ws->logits, n, V);                       /* n ints cross the bus, syncs */
    return op->download(be, logits, ws->logits, (size_t)(n * V) * sizeof(float)); /* syncs */
}

tuna_status tuna_model_forward(struct tuna_model *m, tuna_kv_cache *kv, const struct tuna_batch *b, float *logits,
                               struct tuna_fwd_trace *trace)
{
    return forward_step(m, kv, b, logits, NULL, trace);
}

tuna_status tuna_model_forward_greedy(struct tuna_model *m, tuna_kv_cache *kv, const struct tuna_batch *b, int32_t *ids)
{
    return forward_step(m, kv, b, NULL, ids, NULL);
}
