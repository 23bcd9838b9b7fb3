/* train_forward.c — the trainer's own forward pass, used when the model's forward cannot give
 * backward what it needs: LoRA dropout (a mask on each adapter's input) and gradient
 * checkpointing (only each layer's input is kept; the layer is run again in backward). It is
 * the op list of src/model/forward.c, op for op through the same backend table, over the
 * training layout (each sequence's tokens consecutive, positions 0..len-1; attention reads k
 * and v in place through size-1 KV blocks), so without dropout it computes the same numbers —
 * test_train replays the fixture runs through it.
 *
 * Dropout masks are a pure function of (seed, optimizer step, micro-batch, module, token,
 * feature): recomputation in backward and a resumed run see the same masks, with no RNG state.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/status.h"
#include "train/trainer_internal.h"

static uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

uint64_t tuna_train_drop_key(const tuna_trainer *t, int mod)
{
    if (t->lo.dropout <= 0 || t->drop_base == 0) return 0;
    return mix64(t->drop_base + 0x9E3779B97F4A7C15ULL * (uint64_t)(mod + 1)) | 1;
}

void tuna_train_dropout(float *out, const float *in, int64_t T, int64_t K, double p, uint64_t key)
{
    const float keep_scale = (float)(1.0 / (1.0 - p));
    const uint64_t thresh = (uint64_t)(p * 18446744073709551616.0); /* drop when hash < p * 2^64 */
    for (int64_t i = 0; i < T * K; i++) {
        bool keep = mix64(key + 0x9E3779B97F4A7C15ULL * (uint64_t)i) >= thresh;
        out[i] = keep ? in[i] * keep_scale : 0.0f;
    }
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
        tuna_train_dropout(t->drop, x, T, md->K, t->lo.dropout, key);
        xin = t->drop;
    }
    const int64_t R = md->r, K = md->K, N = md->N;
    float *h = malloc((size_t)(T * R) * sizeof *h);
    if (!h) abort(); /* T x r floats */
    for (int64_t i = 0; i < T; i++)
        for (int64_t j = 0; j < R; j++) {
            double s = 0;
            for (int64_t k = 0; k < K; k++)
                s += (double)md->lora.A[j * K + k] * xin[i * K + k];
            h[i * R + j] = (float)s;
        }
    for (int64_t i = 0; i < T; i++)
        for (int64_t n = 0; n < N; n++) {
            float s = 0;
            for (int64_t j = 0; j < R; j++)
                s += md->lora.B[n * R + j] * h[i * R + j];
            y[i * N + n] += md->lora.scale * s;
        }
    free(h);
}

/* One layer, in place on x[T, C]; A receives the activations (x_in and x_mid included). */
static void layer_fwd(tuna_trainer *t, int64_t l, const struct tuna_fwd_layer_acts *A, float *x,
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
    struct tuna_attn_batch ab = {T, b->pos, t->bt, 1, a->sliding_window};
    memcpy(A->x_in, x, (size_t)(T * C) * sizeof *x);
    op->rmsnorm(be, A->xn_attn, x, L->attn_norm, T, C, eps);
    tuna_train_linear_forward(t, l, TUNA_PROJ_Q, A->q, A->xn_attn, T);
    tuna_train_linear_forward(t, l, TUNA_PROJ_K, A->k, A->xn_attn, T);
    tuna_train_linear_forward(t, l, TUNA_PROJ_V, A->v, A->xn_attn, T);
    if (L->q_norm) op->rmsnorm(be, A->q, A->q, L->q_norm, T * H, D, eps);
    if (L->k_norm) op->rmsnorm(be, A->k, A->k, L->k_norm, T * Hkv, D, eps);
    op->rope(be, A->q, b->pos, T, H, D, m->rot_dim, m->inv_freq, m->attn_factor);
    op->rope(be, A->k, b->pos, T, Hkv, D, m->rot_dim, m->inv_freq, m->attn_factor);
    op->attention(be, A->att, A->q, A->k, A->v, &ab, H, Hkv, D, (float)(1.0 / sqrt((double)D)));
    tuna_train_linear_forward(t, l, TUNA_PROJ_O, t->tmp, A->att, T);
    op->add(be, x, t->tmp, T * C);
    memcpy(A->x_mid, x, (size_t)(T * C) * sizeof *x);
    op->rmsnorm(be, A->xn_mlp, x, L->mlp_norm, T, C, eps);
    tuna_train_linear_forward(t, l, TUNA_PROJ_GATE, A->gate, A->xn_mlp, T);
    tuna_train_linear_forward(t, l, TUNA_PROJ_UP, A->up, A->xn_mlp, T);
    op->glu(be, A->act, A->gate, A->up, T * I, (int)a->act);
    tuna_train_linear_forward(t, l, TUNA_PROJ_DOWN, t->tmp, A->act, T);
    op->add(be, x, t->tmp, T * C);
}

/* Buffers for T tokens: activations of every layer (or of one, with checkpointing, plus every
 * layer's input). */
static tuna_status reserve(tuna_trainer *t, int64_t T)
{
    if (t->mem && t->cap_T >= T) return TUNA_OK;
    const struct tuna_arch *a = &t->m->arch;
    const int64_t L = a->n_layers, C = a->hidden_size, HD = a->n_heads * a->head_dim;
    const int64_t KD = a->n_kv_heads * a->head_dim, I = a->intermediate_size;
    const int64_t nact = t->ckpt ? 1 : L;
    const int64_t per_layer = T * (4 * C + 2 * HD + 2 * KD + 3 * I);
    const int64_t KI = C > I ? C : I;
    size_t n = (size_t)(nact * per_layer + (t->ckpt ? L * T * C : 0) + 4 * T * C + 2 * T * KI);
    free(t->mem);
    free(t->acts);
    free(t->rows);
    free(t->bt);
    t->mem = malloc(n * sizeof(float));
    t->acts = calloc((size_t)nact, sizeof *t->acts);
    t->rows = malloc((size_t)T * sizeof *t->rows);
    t->bt = malloc((size_t)T * sizeof *t->bt);
    if (!t->mem || !t->acts || !t->rows || !t->bt) {
        free(t->mem), free(t->acts), free(t->rows), free(t->bt);
        t->mem = NULL, t->acts = NULL, t->rows = NULL, t->bt = NULL;
        t->cap_T = 0;
        return tuna_fail(TUNA_E_OOM,
                         "training activations for %lld tokens (%.1f MiB); use a smaller --batch-size "
                         "or --max-seq-length%s",
                         (long long)T, (double)n * 4 / 1048576.0, t->ckpt ? "" : ", or --gradient-checkpointing");
    }
    float *p = t->mem;
    for (int64_t l = 0; l < nact; l++) {
        struct tuna_fwd_layer_acts *A = &t->acts[l];
        A->x_in = p, p += T * C;
        A->xn_attn = p, p += T * C;
        A->x_mid = p, p += T * C;
        A->xn_mlp = p, p += T * C;
        A->q = p, p += T * HD;
        A->att = p, p += T * HD;
        A->k = p, p += T * KD;
        A->v = p, p += T * KD;
        A->gate = p, p += T * I;
        A->up = p, p += T * I;
        A->act = p, p += T * I;
    }
    if (t->ckpt) t->x_saved = p, p += L * T * C;
    t->x = p, p += T * C;
    t->tmp = p, p += T * C;
    t->x_final = p, p += T * C;
    t->sel = p, p += T * C;
    t->drop = p, p += T * KI;
    t->drop_g = p;
    t->cap_T = T;
    return TUNA_OK;
}

tuna_status tuna_train_forward(tuna_trainer *t, const struct tuna_batch *b, float *logits, bool train)
{
    struct tuna_model *m = t->m;
    const struct tuna_arch *a = &m->arch;
    const int64_t T = b->n, C = a->hidden_size;
    for (int64_t i = 0; i < T; i++)
        if (b->pos[i] >= m->max_model_len)
            return tuna_fail(TUNA_E_RANGE,
                             "a training row reaches %lld tokens, past the model's context of %lld; "
                             "use --max-seq-length",
                             (long long)b->pos[i] + 1, (long long)m->max_model_len);
    tuna_status st = reserve(t, T);
    if (st) return st;
    for (int64_t i = 0; i < T; i++) {
        t->rows[i] = (int32_t)i;
        t->bt[i] = t->rows + (i - b->pos[i]); /* row of position p of this sequence = start + p */
    }
    m->ops->embedding(m->be, t->x, b->tokens, T, &m->embed, m->embed_scale);
    for (int64_t l = 0; l < a->n_layers; l++) {
        if (t->ckpt) memcpy(t->x_saved + l * T * C, t->x, (size_t)(T * C) * sizeof(float));
        layer_fwd(t, l, &t->acts[t->ckpt ? 0 : l], t->x, b);
    }
    (void)train;
    memcpy(t->x_final, t->x, (size_t)(T * C) * sizeof(float));
    int64_t n = 0;
    for (int64_t i = 0; i < T; i++)
        if (b->logits[i]) memcpy(t->sel + (n++) * C, t->x + i * C, (size_t)C * sizeof(float));
    if (n == 0) return TUNA_OK;
    m->ops->rmsnorm(m->be, t->sel, t->sel, m->final_norm, n, C, (float)a->norm_eps);
    m->ops->matmul(m->be, logits, t->sel, &m->lm_head.w, NULL, n);
    return TUNA_OK;
}

void tuna_train_recompute_layer(tuna_trainer *t, int64_t l, const struct tuna_batch *b)
{
    const int64_t T = b->n, C = t->m->arch.hidden_size;
    memcpy(t->x, t->x_saved + l * T * C, (size_t)(T * C) * sizeof(float));
    layer_fwd(t, l, &t->acts[0], t->x, b);
}
