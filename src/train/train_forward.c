/* train_forward.c — the trainer's forward pass: the op list of src/model/forward.c, op for op
 * through the backend's inference table, with the LoRA forward and dropout of the training table
 * (backend/train_ops.h), over the training layout (each sequence's tokens consecutive, positions
 * 0..len-1). It keeps what backward needs: every layer's activations, or with gradient
 * checkpointing only each layer's input (the layer is run again in backward). All buffers are in
 * backend memory (device memory on CUDA), planned in one allocation per batch size.
 *
 * Dropout masks are a pure function of (seed, optimizer step, micro-batch, module, token,
 * feature): recomputation in backward and a resumed run see the same masks, with no RNG state.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/status.h"
#include "train/trainer_internal.h"

uint64_t tuna_train_drop_key(const tuna_trainer *t, int mod)
{
    if (t->lo.dropout <= 0 || t->drop_base == 0) return 0;
    return tuna_train_mix64(t->drop_base + 0x9E3779B97F4A7C15ULL * (uint64_t)(mod + 1)) | 1;
}

/* y[T,N] = x W^T + b + s · B A dropout(x) */
void tuna_train_linear_forward(tuna_trainer *t, int64_t l, int proj, float *y, const float *x, int64_t T)
{
    struct tuna_model *m = t->m;
    const struct tuna_linear *lin = proj_lin(&m->layers[l], proj);
    m->ops->matmul(m->be, y, x, &lin->w, lin->bias, T);
    const struct tmod *md = t->by_lin[l * TUNA_PROJ_COUNT + proj];
    if (!md) return;
    const float *xin = x;
    uint64_t key = tuna_train_drop_key(t, (int)(md - t->mods));
    if (key) {
        t->tops->dropout(m->be, t->drop, x, T * md->K, t->lo.dropout, key);
        xin = t->drop;
    }
    t->tops->lora_forward(m->be, y, xin, &md->lora, T, md->N, md->K, t->lwork);
}

/* One layer, in place on x[T, C]; A receives the activations (x_in and x_mid included). */
static void layer_fwd(tuna_trainer *t, int64_t l, const struct tuna_fwd_layer_acts *A, float *lse, float *x,
                      const struct tuna_batch *b)
{
    struct tuna_model *m = t->m;
    const struct tuna_arch *a = &m->arch;
    const struct tuna_backend_ops *op = m->ops;
    tuna_backend *be = m->be;
    const struct tuna_layer *L = &m->layers[l];
    const int64_t T = b->n, C = a->hidden_size, H = a->n_heads, Hkv = a->n_kv_heads, D = a->head_dim;
    const int64_t I = a->intermediate_size;
    const float eps = (float)a->norm_eps;
    op->copy(be, A->x_in, x, (size_t)(T * C) * sizeof *x);
    op->rmsnorm(be, A->xn_attn, x, L->attn_norm, T, C, eps);
    tuna_train_linear_forward(t, l, TUNA_PROJ_Q, A->q, A->xn_attn, T);
    tuna_train_linear_forward(t, l, TUNA_PROJ_K, A->k, A->xn_attn, T);
    tuna_train_linear_forward(t, l, TUNA_PROJ_V, A->v, A->xn_attn, T);
    if (L->q_norm) op->rmsnorm(be, A->q, A->q, L->q_norm, T * H, D, eps);
    if (L->k_norm) op->rmsnorm(be, A->k, A->k, L->k_norm, T * Hkv, D, eps);
    op->rope(be, A->q, b->pos, T, H, D, m->rot_dim, m->inv_freq, m->attn_factor);
    op->rope(be, A->k, b->pos, T, Hkv, D, m->rot_dim, m->inv_freq, m->attn_factor);
    t->tops->attention_forward(be, A->att, lse, A->q, A->k, A->v, b->pos, T, H, Hkv, D, (float)(1.0 / sqrt((double)D)),
                               a->sliding_window, t->fast, (float *)t->attn_mem, t->attn_floats);
    tuna_train_linear_forward(t, l, TUNA_PROJ_O, t->tmp, A->att, T);
    op->add(be, x, t->tmp, T * C);
    op->copy(be, A->x_mid, x, (size_t)(T * C) * sizeof *x);
    op->rmsnorm(be, A->xn_mlp, x, L->mlp_norm, T, C, eps);
    tuna_train_linear_forward(t, l, TUNA_PROJ_GATE, A->gate, A->xn_mlp, T);
    tuna_train_linear_forward(t, l, TUNA_PROJ_UP, A->up, A->xn_mlp, T);
    op->glu(be, A->act, A->gate, A->up, T * I, (int)a->act);
    tuna_train_linear_forward(t, l, TUNA_PROJ_DOWN, t->tmp, A->act, T);
    op->add(be, x, t->tmp, T * C);
}

/* Rows per chunk of the head (logits + fused cross-entropy): at most 64 Mi floats of logits. */
static int64_t head_chunk(int64_t T, int64_t V)
{
    int64_t c = ((int64_t)1 << 26) / (V > 0 ? V : 1);
    if (c < 1) c = 1;
    return c < T ? c : T;
}

/* Hands out 256-byte aligned pieces of one allocation (or just counts when base is NULL). */
struct carver {
    char *base;
    size_t used;
};
static void *carve(struct carver *c, size_t bytes)
{
    size_t off = (c->used + 255) & ~(size_t)255;
    c->used = off + bytes;
    return c->base ? c->base + off : NULL;
}

/* Lays out every buffer for T tokens; returns the bytes needed. */
static size_t layout(tuna_trainer *t, int64_t T, char *base)
{
    const struct tuna_arch *a = &t->m->arch;
    const int64_t L = a->n_layers, C = a->hidden_size, HD = a->n_heads * a->head_dim;
    const int64_t KD = a->n_kv_heads * a->head_dim, I = a->intermediate_size, V = a->vocab_size;
    const int64_t nact = t->ckpt ? 1 : L, KI = C > I ? C : I;
    const size_t f = sizeof(float);
    struct carver c = {base, 0};
    t->loss_rows = carve(&c, (size_t)T * sizeof(double));
    for (int64_t l = 0; l < nact; l++) {
        struct tuna_fwd_layer_acts *A = &t->acts[l];
        A->x_in = carve(&c, (size_t)(T * C) * f);
        A->xn_attn = carve(&c, (size_t)(T * C) * f);
        A->x_mid = carve(&c, (size_t)(T * C) * f);
        A->xn_mlp = carve(&c, (size_t)(T * C) * f);
        A->q = carve(&c, (size_t)(T * HD) * f);
        A->att = carve(&c, (size_t)(T * HD) * f);
        A->k = carve(&c, (size_t)(T * KD) * f);
        A->v = carve(&c, (size_t)(T * KD) * f);
        A->gate = carve(&c, (size_t)(T * I) * f);
        A->up = carve(&c, (size_t)(T * I) * f);
        A->act = carve(&c, (size_t)(T * I) * f);
    }
    t->lse = carve(&c, (size_t)(nact * T * a->n_heads) * f);
    t->x_saved = t->ckpt ? carve(&c, (size_t)(L * T * C) * f) : NULL;
    t->x = carve(&c, (size_t)(T * C) * f);
    t->tmp = carve(&c, (size_t)(T * C) * f);
    t->sel_in = carve(&c, (size_t)(T * C) * f);
    t->sel_n = carve(&c, (size_t)(T * C) * f);
    t->dsel_n = carve(&c, (size_t)(T * C) * f);
    t->dsel = carve(&c, (size_t)(T * C) * f);
    const bool dropout = t->lo.dropout > 0; /* the dropped inputs exist only with dropout */
    t->drop = dropout ? carve(&c, (size_t)(T * KI) * f) : NULL;
    t->drop_g = dropout ? carve(&c, (size_t)(T * KI) * f) : NULL;
    t->lwork = carve(&c, (size_t)(2 * T * t->max_r) * f);
    t->chunk = head_chunk(T, V);
    t->logits = carve(&c, (size_t)(t->chunk * V) * f);
    t->g.dx = carve(&c, (size_t)(T * C) * f);
    t->g.dxn = carve(&c, (size_t)(T * C) * f);
    t->g.pre = carve(&c, (size_t)(T * HD) * f);
    t->g.dpre = carve(&c, (size_t)(T * HD) * f);
    t->g.datt = carve(&c, (size_t)(T * HD) * f);
    t->g.dq = carve(&c, (size_t)(T * HD) * f);
    t->g.dk = carve(&c, (size_t)(T * KD) * f);
    t->g.dv = carve(&c, (size_t)(T * KD) * f);
    t->g.dact = carve(&c, (size_t)(T * I) * f);
    t->g.dgate = carve(&c, (size_t)(T * I) * f);
    t->g.dup = carve(&c, (size_t)(T * I) * f);
    return c.used;
}

tuna_status tuna_train_reserve(tuna_trainer *t, int64_t T, int64_t max_len)
{
    struct tuna_model *m = t->m;
    const struct tuna_arch *a = &m->arch;
    /* attention scratch (CUDA: the scores of as many kv heads as fit in 1 GiB, one at least) */
    int64_t amin = tuna_train_attention_work_min(m->ops, max_len, a->head_dim, t->fast);
    if (amin > t->attn_floats) {
        int64_t want = amin * a->n_kv_heads, cap = (int64_t)1 << 28;
        if (want > cap) want = amin > cap ? amin : cap - cap % amin;
        m->ops->release(m->be, t->attn_mem);
        t->attn_mem = NULL;
        t->attn_floats = 0;
        tuna_status st = m->ops->alloc(m->be, (size_t)want * sizeof(float), &t->attn_mem);
        if (st)
            return tuna_fail_prefix(st,
                                    "attention scratch for sequences of %lld tokens; use a smaller --max-seq-length",
                                    (long long)max_len);
        t->attn_floats = want;
    }
    if (t->mem && t->cap_T >= T) return TUNA_OK;
    const int64_t nact = t->ckpt ? 1 : a->n_layers;
    m->ops->release(m->be, t->mem);
    free(t->acts);
    free(t->sel_rows);
    t->mem = NULL;
    t->cap_T = 0;
    t->acts = calloc((size_t)nact, sizeof *t->acts);
    t->sel_rows = malloc((size_t)T * sizeof *t->sel_rows);
    if (!t->acts || !t->sel_rows) return tuna_fail_oom("training activation table", (size_t)T * 4);
    size_t bytes = layout(t, T, NULL);
    tuna_status st = m->ops->alloc(m->be, bytes, &t->mem);
    if (st)
        return tuna_fail_prefix(st,
                                "training activations for %lld tokens (%.1f MiB); use a smaller --batch-size "
                                "or --max-seq-length%s",
                                (long long)T, (double)bytes / 1048576.0,
                                t->ckpt ? "" : ", or --gradient-checkpointing");
    layout(t, T, t->mem);
    t->cap_T = T;
    return TUNA_OK;
}

tuna_status tuna_train_forward(tuna_trainer *t, const struct tuna_batch *b, int64_t *n_sel)
{
    struct tuna_model *m = t->m;
    const struct tuna_arch *a = &m->arch;
    const int64_t T = b->n, C = a->hidden_size;
    *n_sel = 0;
    for (int64_t i = 0; i < T; i++)
        if (b->pos[i] >= m->max_model_len)
            return tuna_fail(TUNA_E_RANGE,
                             "a training row reaches %lld tokens, past the model's context of %lld; "
                             "use --max-seq-length",
                             (long long)b->pos[i] + 1, (long long)m->max_model_len);
    m->ops->embedding(m->be, t->x, b->tokens, T, &m->embed, m->embed_scale);
    for (int64_t l = 0; l < a->n_layers; l++) {
        if (t->ckpt) m->ops->copy(m->be, t->x_saved + l * T * C, t->x, (size_t)(T * C) * sizeof(float));
        const int64_t k = t->ckpt ? 0 : l;
        layer_fwd(t, l, &t->acts[k], t->lse + k * T * a->n_heads, t->x, b);
    }
    int64_t n = 0;
    for (int64_t i = 0; i < T; i++)
        if (b->logits[i]) t->sel_rows[n++] = (int32_t)i;
    *n_sel = n;
    if (n == 0) return TUNA_OK;
    t->tops->gather_rows(m->be, t->sel_in, t->x, t->sel_rows, n, C);
    m->ops->rmsnorm(m->be, t->sel_n, t->sel_in, m->final_norm, n, C, (float)a->norm_eps);
    return TUNA_OK;
}

void tuna_train_recompute_layer(tuna_trainer *t, int64_t l, const struct tuna_batch *b)
{
    const int64_t T = b->n, C = t->m->arch.hidden_size;
    t->m->ops->copy(t->m->be, t->x, t->x_saved + l * T * C, (size_t)(T * C) * sizeof(float));
    layer_fwd(t, l, &t->acts[0], t->lse, t->x, b);
}
