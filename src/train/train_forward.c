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
void tuna_train_linear_forward_rows(tuna_trainer *t, int64_t l, int proj, float *y, const float *x, void *x16,
                                    int64_t T, int64_t row0)
{
    struct tuna_model *m = t->m;
    const struct tuna_linear *lin = proj_lin(&m->layers[l], proj);
    const struct tmod *md = t->by_lin[l * TUNA_PROJ_COUNT + proj];
    uint64_t key = md ? tuna_train_key_at(tuna_train_drop_key(t, (int)(md - t->mods)), row0 * md->K) : 0;
    if (x16 && t->kcat) { /* the adapter inside the frozen GEMM (kcat: no dropout) */
        float *h = md ? tuna_train_lora_h(t, l, proj, row0, md->r) : NULL;
        if (!key && t->tops->matmul16_lora(m->be, y, x16, lin->w.cols + t->kpad, &lin->w, lin->bias,
                                           md ? &md->lora : NULL, h ? h : t->lwork, T))
            return;
        x16 = NULL; /* not for this weight: the float32 ops (x16's rows are padded, matmul16 reads them dense) */
    }
    if (x16)
        t->tops->matmul16(m->be, y, x16, &lin->w, lin->bias, T);
    else
        m->ops->matmul(m->be, y, x, &lin->w, lin->bias, T);
    if (!md) return;
    const float *xin = x;
    if (key) {
        t->tops->dropout(m->be, t->drop, x, T * md->K, t->lo.dropout, key);
        xin = t->drop;
    }
    float *h = tuna_train_lora_h(t, l, proj, row0, md->r); /* kept for the backward */
    t->tops->lora_forward(m->be, y, xin, &md->lora, T, md->N, md->K, h ? h : t->lwork, t->fast);
}

void tuna_train_linear_forward(tuna_trainer *t, int64_t l, int proj, float *y, const float *x, int64_t T)
{
    tuna_train_linear_forward_rows(t, l, proj, y, x, NULL, T, 0);
}

/* element i of a 16-bit array (NULL stays NULL) */
static void *h16_at(void *p, int64_t i)
{
    return p ? (char *)p + 2 * i : NULL;
}

void tuna_train_mlp_chunk_forward(tuna_trainer *t, int64_t l, const struct tuna_fwd_layer_acts *A, int64_t r0,
                                  int64_t n)
{
    const struct tuna_arch *a = &t->m->arch;
    const int64_t C = a->hidden_size, I = a->intermediate_size;
    void *x16 = t->h16 ? h16_at(t->xa16, r0 * (C + t->kpad)) : NULL; /* xn_mlp rounded, from add_rmsnorm16 */
    tuna_train_linear_forward_rows(t, l, TUNA_PROJ_GATE, A->gate, A->xn_mlp + r0 * C, x16, n, r0);
    tuna_train_linear_forward_rows(t, l, TUNA_PROJ_UP, A->up, A->xn_mlp + r0 * C, x16, n, r0);
    if (t->h16)
        t->tops->glu16(t->m->be, A->act, t->act16, A->gate, A->up, n * I, I, I + t->kpad, (int)a->act, t->hdt);
    else
        t->m->ops->glu(t->m->be, A->act, A->gate, A->up, n * I, (int)a->act);
}

/* One layer, in place on x[T, C]; A receives the activations (x_in and x_mid included). */
static void layer_fwd(tuna_trainer *t, int64_t l, const struct tuna_fwd_layer_acts *A, float *lse, float *x,
                      const struct tuna_batch *b, bool mlp)
{
    struct tuna_model *m = t->m;
    const struct tuna_arch *a = &m->arch;
    const struct tuna_backend_ops *op = m->ops;
    tuna_backend *be = m->be;
    const struct tuna_layer *L = &m->layers[l];
    const int64_t T = b->n, C = a->hidden_size, H = a->n_heads, Hkv = a->n_kv_heads, D = a->head_dim;
    const int64_t I = a->intermediate_size;
    const float eps = (float)a->norm_eps;
    void *x16 = t->h16 ? t->xa16 : NULL;
    const int64_t kp = t->kpad; /* spare columns of each 16-bit operand row (kcat) */
    if (t->h16) { /* the previous layer's residual add, the copy, the norm and its operand in one pass */
        t->tops->add_rmsnorm16(be, x, t->add_pending ? t->tmp : NULL, A->x_in, A->xn_attn, t->xa16, C + kp,
                               L->attn_norm, T, C, eps, t->hdt);
        t->add_pending = false;
    } else {
        op->copy(be, A->x_in, x, (size_t)(T * C) * sizeof *x);
        op->rmsnorm(be, A->xn_attn, x, L->attn_norm, T, C, eps);
    }
    tuna_train_linear_forward_rows(t, l, TUNA_PROJ_Q, A->q, A->xn_attn, x16, T, 0);
    tuna_train_linear_forward_rows(t, l, TUNA_PROJ_K, A->k, A->xn_attn, x16, T, 0);
    tuna_train_linear_forward_rows(t, l, TUNA_PROJ_V, A->v, A->xn_attn, x16, T, 0);
    if (L->q_norm) op->rmsnorm(be, A->q, A->q, L->q_norm, T * H, D, eps);
    if (L->k_norm) op->rmsnorm(be, A->k, A->k, L->k_norm, T * Hkv, D, eps);
    op->rope(be, A->q, b->pos, T, H, D, m->rot_dim, m->inv_freq, m->attn_factor);
    op->rope(be, A->k, b->pos, T, Hkv, D, m->rot_dim, m->inv_freq, m->attn_factor);
    t->tops->attention_forward(be, A->att, lse, A->q, A->k, A->v, b->pos, T, H, Hkv, D, (float)(1.0 / sqrt((double)D)),
                               a->sliding_window, t->fast, (float *)t->attn_mem, t->attn_floats);
    if (t->h16) t->tops->to_half(be, t->xa16, A->att, T * H * D, H * D, H * D + kp, t->hdt);
    tuna_train_linear_forward_rows(t, l, TUNA_PROJ_O, t->tmp, A->att, x16, T, 0);
    if (t->h16) { /* the residual add, its copy, the norm and its operand in one pass */
        t->tops->add_rmsnorm16(be, x, t->tmp, A->x_mid, A->xn_mlp, t->xa16, C + kp, L->mlp_norm, T, C, eps,
                               t->hdt);
    } else {
        op->add(be, x, t->tmp, T * C);
        op->copy(be, A->x_mid, x, (size_t)(T * C) * sizeof *x);
        op->rmsnorm(be, A->xn_mlp, x, L->mlp_norm, T, C, eps);
    }
    if (!mlp) return; /* a recompute for backward, which runs the MLP chunk by chunk itself */
    void *a16 = t->h16 ? t->act16 : NULL;
    if (t->mlp_rows >= T) {
        tuna_train_linear_forward_rows(t, l, TUNA_PROJ_GATE, A->gate, A->xn_mlp, x16, T, 0);
        tuna_train_linear_forward_rows(t, l, TUNA_PROJ_UP, A->up, A->xn_mlp, x16, T, 0);
        if (t->h16)
            t->tops->glu16(be, A->act, t->act16, A->gate, A->up, T * I, I, I + kp, (int)a->act, t->hdt);
        else
            op->glu(be, A->act, A->gate, A->up, T * I, (int)a->act);
        tuna_train_linear_forward_rows(t, l, TUNA_PROJ_DOWN, t->tmp, A->act, a16, T, 0);
    } else {
        for (int64_t r0 = 0; r0 < T; r0 += t->mlp_rows) {
            const int64_t n = T - r0 < t->mlp_rows ? T - r0 : t->mlp_rows;
            tuna_train_mlp_chunk_forward(t, l, A, r0, n);
            tuna_train_linear_forward_rows(t, l, TUNA_PROJ_DOWN, t->tmp + r0 * C, A->act, a16, n, r0);
        }
    }
    if (t->h16 && !t->ckpt) /* the next layer's add_rmsnorm16 adds it (tuna_train_forward after the last) */
        t->add_pending = true;
    else
        op->add(be, x, t->tmp, T * C);
}

/* Rows per chunk of the head (logits + fused cross-entropy): at most 64 Mi floats of logits
 * (8 Mi = 32 MiB in the offload mode). */
static int64_t head_chunk(int64_t T, int64_t V, bool small)
{
    int64_t c = ((int64_t)1 << (small ? 23 : 26)) / (V > 0 ? V : 1);
    if (c < 1) c = 1;
    return c < T ? c : T;
}

/* Hands out 256-byte aligned pieces of one allocation (or just counts when base is NULL). */
struct carver {
    char *base;
    size_t used;
    int cat;        /* the category pieces are counted under (enum mem_cat) */
    size_t tally[8];
};
enum mem_cat { MC_RESID, MC_ACTS, MC_CKPT, MC_GRADS, MC_LOGITS, MC_LWORK };
static void *carve(struct carver *c, size_t bytes)
{
    size_t off = (c->used + 255) & ~(size_t)255;
    c->tally[c->cat] += off + bytes - c->used;
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
    const int64_t MR = t->offload && T > t->mlp_rows ? t->mlp_rows : T; /* rows of the [., I] buffers */
    const size_t f = sizeof(float);
    bool qk_norm = false;
    for (int64_t l = 0; l < L; l++)
        qk_norm |= t->m->layers[l].q_norm || t->m->layers[l].k_norm;
    struct carver c = {base, 0, MC_RESID, {0}};
    t->loss_rows = carve(&c, (size_t)T * sizeof(double));
    t->lse = carve(&c, (size_t)(nact * T * a->n_heads) * f);
    c.cat = MC_ACTS;
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
        A->gate = carve(&c, (size_t)(MR * I) * f);
        A->up = carve(&c, (size_t)(MR * I) * f);
        A->act = carve(&c, (size_t)(MR * I) * f);
    }
    c.cat = MC_CKPT;
    t->x_saved = t->ckpt && !t->offload ? carve(&c, (size_t)(L * T * C) * f) : NULL;
    c.cat = MC_RESID;
    t->x = carve(&c, (size_t)(T * C) * f);
    t->tmp = HD >= C ? NULL : carve(&c, (size_t)(T * C) * f); /* else g.datt, below */
    if (t->ckpt) {
        /* the selected rows live only between the last layer and the first recompute: in the
           recomputed layer's buffers, dead then */
        t->sel_in = t->acts[0].x_in;
        t->sel_n = t->acts[0].xn_attn;
        t->dsel_n = t->acts[0].x_mid;
        t->dsel = t->acts[0].xn_mlp;
    } else {
        t->sel_in = carve(&c, (size_t)(T * C) * f);
        t->sel_n = carve(&c, (size_t)(T * C) * f);
        t->dsel_n = carve(&c, (size_t)(T * C) * f);
        t->dsel = carve(&c, (size_t)(T * C) * f);
    }
    c.cat = MC_LWORK;
    const bool dropout = t->lo.dropout > 0; /* the dropped inputs exist only with dropout */
    t->drop = dropout ? carve(&c, (size_t)(T * KI) * f) : NULL;
    t->drop_g = dropout ? carve(&c, (size_t)(T * KI) * f) : NULL;
    t->lwork = carve(&c, (size_t)(2 * T * t->max_r) * f);
    const char *lhe = getenv("TUNA_TRAIN_LORA_H"); /* "0": recompute x A^T in the backward (comparisons) */
    t->lh = t->tops->lora_backward_h && !(lhe && !strcmp(lhe, "0"))
                ? carve(&c, (size_t)(nact * TUNA_PROJ_COUNT * T * t->max_r) * f)
                : NULL;
    c.cat = MC_LOGITS;
    t->chunk = head_chunk(T, V, t->offload);
    t->logits = carve(&c, (size_t)(t->chunk * V) * f);
    c.cat = MC_GRADS;
    t->g.dx = carve(&c, (size_t)(T * C) * f);
    t->g.dxn = carve(&c, (size_t)(T * C) * f);
    t->g.pre = qk_norm ? carve(&c, (size_t)(T * HD) * f) : NULL;
    t->g.dpre = qk_norm ? carve(&c, (size_t)(T * HD) * f) : NULL;
    t->g.datt = carve(&c, (size_t)(T * HD) * f);
    /* the layer's o and down outputs: backward buffers are free in the forward and in a
       recompute (layer_backward zeroes datt before using it) */
    if (HD >= C) t->tmp = t->g.datt;
    t->g.dq = carve(&c, (size_t)(T * HD) * f);
    t->g.dk = carve(&c, (size_t)(T * KD) * f);
    t->g.dv = carve(&c, (size_t)(T * KD) * f);
    t->g.dact = carve(&c, (size_t)(MR * I) * f);
    t->g.dgate = MR < T ? t->acts[0].act : carve(&c, (size_t)(T * I) * f);
    t->g.dup = carve(&c, (size_t)(MR * I) * f);
    if (t->h16) { /* 16-bit operands (trainer_internal.h) */
        t->xa16 = carve(&c, (size_t)(T * ((HD > C ? HD : C) + t->kpad)) * 2);
        t->act16 = carve(&c, (size_t)(MR * (I + t->kpad)) * 2);
        t->dup16 = carve(&c, (size_t)(MR * (I + t->kpad)) * 2);
        t->dx16 = carve(&c, (size_t)(T * (C + t->kpad)) * 2);
        if (t->qkv) { /* one buffer, row = [dq | pad | dk | pad | dv | pad] */
            t->ld_qkv = HD + 2 * KD + 3 * t->kpad;
            t->dq16 = carve(&c, (size_t)(T * t->ld_qkv) * 2);
            t->dk16 = base ? (char *)t->dq16 + (size_t)(HD + t->kpad) * 2 : NULL;
            t->dv16 = base ? (char *)t->dk16 + (size_t)(KD + t->kpad) * 2 : NULL;
        } else {
            t->dq16 = carve(&c, (size_t)(T * (HD + t->kpad)) * 2);
            t->dk16 = carve(&c, (size_t)(T * (KD + t->kpad)) * 2);
            t->dv16 = carve(&c, (size_t)(T * (KD + t->kpad)) * 2);
        }
    }
    if (base) memcpy(t->mem_cat, c.tally, sizeof c.tally);
    return c.used;
}

/* The backend's GEMM scratch for batches of T tokens, sized once and exactly: the largest 4-bit
 * weight dequantized to the compute dtype, and the largest GEMM input or output gradient rounded to
 * 16 bits ([T, C], [T, H*D], an MLP chunk [rows, I], a logits chunk [rows, V]). */
static void reserve_gemm_scratch(tuna_trainer *t, int64_t T)
{
    struct tuna_model *m = t->m;
    const struct tuna_arch *a = &m->arch;
    const enum tuna_dtype dt = m->embed.dtype;
    if (!t->tops->reserve_scratch || (dt != TUNA_DTYPE_BF16 && dt != TUNA_DTYPE_F16)) return;
    size_t wb = 0;
    for (int64_t l = 0; l < a->n_layers; l++)
        for (int p = 0; p < TUNA_PROJ_COUNT; p++) {
            const struct tuna_weight *w = &proj_lin(&m->layers[l], p)->w;
            if (w->dtype != TUNA_DTYPE_NF4 && w->dtype != TUNA_DTYPE_FP4) continue;
            /* kcat: rows of cols + kpad (the adapter's B in the spare columns), or kpad more rows (A) */
            const size_t b = tuna_dtype_nbytes(dt, (uint64_t)((w->rows + t->kpad) * (w->cols + t->kpad)));
            if (b > wb) wb = b;
        }
    if (t->qkv) { /* q, k, v stacked with their adapters' rows (matmul_backward16_lora_n) */
        const struct tuna_layer *L0 = &m->layers[0];
        const size_t b = tuna_dtype_nbytes(
            dt, (uint64_t)((L0->q.w.rows + L0->k.w.rows + L0->v.w.rows + 3 * t->kpad) * L0->q.w.cols));
        if (L0->q.w.dtype == TUNA_DTYPE_NF4 || L0->q.w.dtype == TUNA_DTYPE_FP4) wb = b > wb ? b : wb;
    }
    const int64_t HD = a->n_heads * a->head_dim;
    int64_t n = T * a->hidden_size;
    if (T * HD > n) n = T * HD;
    if (t->mlp_rows * a->intermediate_size > n) n = t->mlp_rows * a->intermediate_size;
    if (t->chunk * a->vocab_size > n) n = t->chunk * a->vocab_size;
    t->tops->reserve_scratch(m->be, wb, (size_t)n * 2);
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
    /* offload: MLP chunks of at most 4 Mi floats per [rows, I] buffer, whole 64-row tiles */
    int64_t mr = ((int64_t)1 << 22) / (a->intermediate_size > 0 ? a->intermediate_size : 1);
    mr = mr >= 128 ? mr - mr % 64 : 64;
    if (t->lo.mlp_chunk_rows > 0) mr = t->lo.mlp_chunk_rows;
    t->mlp_rows = t->offload && mr < T ? mr : T;
    if (t->offload) {
        const size_t hb = (size_t)(a->n_layers * T * a->hidden_size) * sizeof(float);
        t->tops->host_free(m->be, t->x_saved_host);
        t->x_saved_host = NULL;
        t->x_saved_host_bytes = 0;
        tuna_status hst = t->tops->host_alloc(m->be, hb, (void **)&t->x_saved_host);
        if (hst)
            return tuna_fail_prefix(hst, "offloaded checkpoints for %lld tokens (%.1f MiB of host memory)",
                                    (long long)T, (double)hb / 1048576.0);
        t->x_saved_host_bytes = hb;
    }
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
    reserve_gemm_scratch(t, T);
    return m->ops->sync(m->be);
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
        const size_t xb = (size_t)(T * C) * sizeof(float);
        if (t->offload)
            t->tops->to_host(m->be, t->x_saved_host + l * T * C, t->x, xb);
        else if (t->ckpt)
            m->ops->copy(m->be, t->x_saved + l * T * C, t->x, xb);
        const int64_t k = t->ckpt ? 0 : l;
        layer_fwd(t, l, &t->acts[k], t->lse + k * T * a->n_heads, t->x, b, true);
    }
    if (t->add_pending) {
        m->ops->add(m->be, t->x, t->tmp, T * C);
        t->add_pending = false;
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
    const size_t xb = (size_t)(T * C) * sizeof(float);
    if (t->offload)
        t->tops->from_host(t->m->be, t->x, t->x_saved_host + l * T * C, xb);
    else
        t->m->ops->copy(t->m->be, t->x, t->x_saved + l * T * C, xb);
    /* with MLP chunks, backward recomputes the MLP per chunk: stop after its norm */
    layer_fwd(t, l, &t->acts[0], t->lse, t->x, b, t->mlp_rows >= T);
}
