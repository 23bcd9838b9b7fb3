/* trainer.c — the training step (trainer.h): the trainer's forward (train_forward.c), the loss
 * in chunks of rows, the backward of the forward's op list in reverse, LoRA gradients, clipping
 * and AdamW — every numeric step through the backend's two op tables (backend/backend.h for the
 * forward ops, backend/train_ops.h for the rest), so the same code trains on the CPU and on CUDA.
 *
 * Owns: the flat parameter / gradient / moment arrays (backend memory; host mirrors for the
 * caller when the backend has its own memory), the module table, the activations and the
 * backward scratch. Borrows the model; on the CPU its linears point at this trainer's adapters
 * until tuna_trainer_free (a GPU model keeps its own adapter path untouched).
 */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend/cpu/train_cpu.h"
#include "core/file.h"
#include "core/status.h"
#include "export/export.h"
#include "model/sampler.h"
#include "train/backward.h"
#include "train/trainer.h"
#include "train/trainer_internal.h"

static const char *const proj_names[TUNA_PROJ_COUNT] = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                                        "gate_proj", "up_proj", "down_proj"};
const char *tuna_proj_name(int p)
{
    return p >= 0 && p < TUNA_PROJ_COUNT ? proj_names[p] : "?";
}

void tuna_lora_train_opts_default(struct tuna_lora_train_opts *o)
{
    memset(o, 0, sizeof *o);
    o->r = 16;
    o->alpha = 16;
    o->seed = 3407;
}

static void module_name(char *buf, size_t cap, int64_t layer, int proj)
{
    snprintf(buf, cap, "model.layers.%lld.%s.%s", (long long)layer, proj <= TUNA_PROJ_O ? "self_attn" : "mlp",
             proj_names[proj]);
}

/* "model.layers.N.(self_attn|mlp).X_proj" → layer, proj; false for anything else. */
static bool parse_module(const char *name, int64_t *layer, int *proj)
{
    long long l;
    int n = 0;
    if (sscanf(name, "model.layers.%lld.%n", &l, &n) != 1 || n == 0) return false;
    for (int p = 0; p < TUNA_PROJ_COUNT; p++) {
        char want[96];
        module_name(want, sizeof want, l, p);
        if (strcmp(want, name) == 0) {
            *layer = l;
            *proj = p;
            return true;
        }
    }
    return false;
}

void tuna_trainer_free(tuna_trainer *t)
{
    if (!t) return;
    if (t->m && t->by_lin)
        for (int64_t i = 0; i < t->m->arch.n_layers * TUNA_PROJ_COUNT; i++)
            if (t->by_lin[i]) {
                struct tuna_linear *lin = proj_lin(&t->m->layers[i / TUNA_PROJ_COUNT], (int)(i % TUNA_PROJ_COUNT));
                lin->n_lora = 0;
                lin->lora = NULL;
            }
    if (t->m) {
        if (t->embed_host) {
            /* the model gets its table back on the device (if that fails it keeps reading it
               from host memory, and then it must stay allocated) */
            if (tuna_model_embed_to_device(t->m) == TUNA_OK) t->tops->host_free(t->m->be, t->embed_host);
        }
        if (t->tops) t->tops->host_free(t->m->be, t->x_saved_host);
        t->m->ops->release(t->m->be, t->mem);
        t->m->ops->release(t->m->be, t->attn_mem);
        t->m->ops->release(t->m->be, t->state_mem);
    }
    free(t->acts);
    free(t->sel_rows);
    free(t->h_m1);
    free(t->h_m2);
    free(t->by_lin);
    free(t->mods);
    if (!t->host) {
        free(t->h_params);
        free(t->h_grads);
    }
    free(t);
}

/* The memory mode on a GPU: the embedding table (untied) moves to page-locked host memory; the
 * lookup of a batch's rows reads them there (unified addressing), 2 x C bytes per token over PCIe.
 * TUNA_TRAIN_EMBED_HOST=0 keeps it on the device. */
static tuna_status embed_offload(tuna_trainer *t)
{
    struct tuna_model *m = t->m;
    const char *env = getenv("TUNA_TRAIN_EMBED_HOST");
    if (!t->offload || t->host || m->lm_head.w.data == m->embed.data || (env && !strcmp(env, "0"))) return TUNA_OK;
    const size_t bytes = tuna_dtype_nbytes(m->embed.dtype, (uint64_t)(m->embed.rows * m->embed.cols));
    void *h = NULL;
    tuna_status st = t->tops->host_alloc(m->be, bytes, &h);
    if (st) return tuna_fail_prefix(st, "the embedding table in host memory (offload)");
    if ((st = tuna_model_embed_to_host(m, h))) {
        t->tops->host_free(m->be, h);
        return st;
    }
    t->embed_host = h;
    t->embed_host_bytes = bytes;
    return TUNA_OK;
}

static bool target_wanted(const struct tuna_lora_train_opts *lo, int p)
{
    if (!lo->targets) return true;
    for (int i = 0; i < lo->n_targets; i++)
        if (strcmp(lo->targets[i], proj_names[p]) == 0) return true;
    return false;
}

/* Fills t->mods (without offsets) from an adapter or from lo. */
static tuna_status plan_modules(tuna_trainer *t, const struct tuna_lora_adapter *init)
{
    const struct tuna_arch *a = &t->m->arch;
    int cap = (int)(a->n_layers * TUNA_PROJ_COUNT);
    t->mods = calloc((size_t)cap, sizeof *t->mods);
    t->by_lin = calloc((size_t)cap, sizeof *t->by_lin);
    if (!t->mods || !t->by_lin) return tuna_fail_oom("trainer modules", (size_t)cap * sizeof *t->mods);
    if (init) {
        for (int i = 0; i < init->n_modules; i++) {
            int64_t layer;
            int p;
            if (!parse_module(init->modules[i].name, &layer, &p) || layer >= a->n_layers)
                return tuna_fail(TUNA_E_UNSUPPORTED,
                                 "adapter %s adapts '%s': tuna trains LoRA on the seven "
                                 "projections of layers 0..%lld only (q/k/v/o_proj, gate/up/down_proj)",
                                 init->dir ? init->dir : "(memory)", init->modules[i].name, (long long)a->n_layers - 1);
        }
        /* canonical order (layer, projection), whatever the file's order: optimizer state of a
           fresh run and of its resumption line up */
        for (int64_t l = 0; l < a->n_layers; l++)
            for (int p = 0; p < TUNA_PROJ_COUNT; p++) {
                char name[96];
                module_name(name, sizeof name, l, p);
                const struct tuna_lora_module *im = tuna_lora_find(init, name);
                if (!im) continue;
                struct tmod *md = &t->mods[t->n_mods++];
                snprintf(md->name, sizeof md->name, "%s", name);
                md->layer = l;
                md->proj = p;
                md->r = im->r;
                md->alpha = im->alpha;
                md->lora.scale = im->scale;
            }
    } else {
        for (int64_t l = 0; l < a->n_layers; l++)
            for (int p = 0; p < TUNA_PROJ_COUNT; p++) {
                if (!target_wanted(&t->lo, p)) continue;
                struct tmod *md = &t->mods[t->n_mods++];
                module_name(md->name, sizeof md->name, l, p);
                md->layer = l;
                md->proj = p;
                md->r = t->cfg_r;
                md->alpha = t->cfg_alpha;
                md->lora.scale = tuna_lora_scale(t->cfg_alpha, t->cfg_r, t->use_rslora);
            }
    }
    if (t->n_mods == 0)
        return tuna_fail(TUNA_E_INVALID, "no module to train: --target-modules names none of q_proj, k_proj, "
                                         "v_proj, o_proj, gate_proj, up_proj, down_proj");
    for (int i = 0; i < t->n_mods; i++) {
        struct tmod *md = &t->mods[i];
        struct tuna_linear *lin = proj_lin(&t->m->layers[md->layer], md->proj);
        md->N = lin->w.rows;
        md->K = lin->w.cols;
        int64_t key = md->layer * TUNA_PROJ_COUNT + md->proj;
        if (t->by_lin[key]) return tuna_fail(TUNA_E_FORMAT, "module '%s' appears twice", md->name);
        if (lin->n_lora)
            return tuna_fail(TUNA_E_INVALID,
                             "the model already has adapters attached to '%s'; the trainer "
                             "attaches its own",
                             md->name);
        t->by_lin[key] = md;
    }
    return TUNA_OK;
}

/* The 16-bit operand path (trainer_internal.h) where the backend has it, the compute is 16-bit
 * and every projection's GEMMs run in the model's dtype; TUNA_TRAIN_H16=0 keeps the float32
 * operands (each GEMM rounds its input itself), for comparisons. */
static bool half_path(tuna_trainer *t)
{
    struct tuna_model *m = t->m;
    const char *env = getenv("TUNA_TRAIN_H16");
    if (!t->fast || !t->tops->matmul16 || (env && !strcmp(env, "0"))) return false;
    t->hdt = m->embed.dtype;
    if (t->hdt != TUNA_DTYPE_BF16 && t->hdt != TUNA_DTYPE_F16) return false;
    for (int64_t l = 0; l < m->arch.n_layers; l++)
        for (int p = 0; p < TUNA_PROJ_COUNT; p++)
            if (t->tops->half_dtype(m->be, &proj_lin(&m->layers[l], p)->w) != t->hdt) return false;
    return true;
}

tuna_status tuna_trainer_new(struct tuna_model *m, const struct tuna_lora_train_opts *lo,
                             const struct tuna_optim_opts *oo, const struct tuna_lora_adapter *init, tuna_trainer **out)
{
    *out = NULL;
    const struct tuna_train_ops *tops = tuna_backend_train_ops(m->ops);
    if (!tops)
        return tuna_fail(TUNA_E_UNSUPPORTED, "the %s backend has no training ops; use --device cpu", m->ops->name);
    if (!(lo->dropout >= 0 && lo->dropout < 1))
        return tuna_fail(TUNA_E_INVALID, "LoRA dropout %g is out of range [0, 1)", lo->dropout);
    if (!init && (lo->r <= 0 || lo->r > 4096))
        return tuna_fail(TUNA_E_INVALID, "LoRA rank %lld is out of range (1..4096)", (long long)lo->r);
    tuna_trainer *t = calloc(1, sizeof *t);
    if (!t) return tuna_fail_oom("trainer", sizeof *t);
    t->m = m;
    t->tops = tops;
    t->host = m->ops->host_memory;
    /* 16-bit GPU compute: the attention GEMMs may use TF32 (float32 mode stays exact) */
    t->fast = !t->host && m->embed.dtype != TUNA_DTYPE_F32;
    t->oo = *oo;
    t->lo = *lo;
    t->use_rslora = init ? init->use_rslora : lo->use_rslora;
    t->cfg_r = init ? init->r : lo->r;
    t->cfg_alpha = init ? init->alpha : lo->alpha;
    t->offload = lo->offload;
    t->ckpt = lo->gradient_checkpointing || lo->offload;
    t->h16 = half_path(t);
    tuna_status st = plan_modules(t, init);
    if (st) {
        tuna_trainer_free(t);
        return st;
    }
    if ((st = embed_offload(t))) {
        tuna_trainer_free(t);
        return st;
    }
    int64_t P = 0;
    for (int i = 0; i < t->n_mods; i++) {
        struct tmod *md = &t->mods[i];
        md->offA = P;
        P += md->r * md->K;
        md->offB = P;
        P += md->N * md->r;
    }
    t->P = P;
    for (int i = 0; i < t->n_mods; i++)
        if (t->mods[i].r > t->max_r) t->max_r = t->mods[i].r;
    /* the LoRA forward inside the frozen GEMMs (trainer_internal.h) */
    const char *ke = getenv("TUNA_TRAIN_KCAT");
    t->kcat = t->h16 && lo->dropout <= 0 && tops->matmul16_lora && tops->matmul_backward16_lora &&
              !(ke && !strcmp(ke, "0"));
    t->kcat_bwd = t->kcat && !(ke && !strcmp(ke, "fwd")); /* "fwd": the forward's only (comparisons) */
    const char *qe = getenv("TUNA_TRAIN_QKV");
    t->qkv = t->kcat_bwd && tops->matmul_backward16_lora_n && !(qe && !strcmp(qe, "0"));
    t->kpad = t->kcat ? (t->max_r + 7) / 8 * 8 : 0;
    /* params, grads, m1, m2 and the norm's work in one backend allocation (offload: the moments
       in host memory, updated there) */
    const size_t pb = ((size_t)P * sizeof(float) + 255) & ~(size_t)255;
    const int nstate = t->offload ? 2 : 4;
    st = m->ops->alloc(m->be, (size_t)nstate * pb + TUNA_TRAIN_NORM_WORK, &t->state_mem);
    if (st) {
        tuna_trainer_free(t);
        return tuna_fail_prefix(st, "LoRA parameters, gradients and Adam moments (%lld floats each)", (long long)P);
    }
    char *sm = t->state_mem;
    t->params = (float *)sm;
    t->grads = (float *)(sm + pb);
    if (t->offload) {
        t->h_m1 = calloc((size_t)P, sizeof(float));
        t->h_m2 = calloc((size_t)P, sizeof(float));
        if (!t->h_m1 || !t->h_m2) {
            tuna_trainer_free(t);
            return tuna_fail_oom("AdamW moments in host memory", (size_t)P * 8);
        }
        t->m1 = t->h_m1;
        t->m2 = t->h_m2;
    } else {
        t->m1 = (float *)(sm + 2 * pb);
        t->m2 = (float *)(sm + 3 * pb);
    }
    t->norm_work = sm + (size_t)nstate * pb;
    tops->zero(m->be, t->params, P);
    tops->zero(m->be, t->grads, P);
    if (!t->offload) {
        tops->zero(m->be, t->m1, P);
        tops->zero(m->be, t->m2, P);
    }
    if (t->host) {
        t->h_params = t->params;
        t->h_grads = t->grads;
    } else {
        t->h_params = calloc((size_t)P, sizeof(float));
        t->h_grads = calloc((size_t)P, sizeof(float));
        if (!t->h_params || !t->h_grads) {
            tuna_trainer_free(t);
            return tuna_fail_oom("host copy of the LoRA parameters", (size_t)P * 8);
        }
    }
    struct tuna_rng rng;
    tuna_rng_seed(&rng, lo->seed);
    for (int i = 0; i < t->n_mods; i++) {
        struct tmod *md = &t->mods[i];
        float *A = t->h_params + md->offA, *B = t->h_params + md->offB; /* host: uploaded below */
        if (init) {
            const struct tuna_lora_module *im = tuna_lora_find(init, md->name);
            if (!im || im->in != md->K || im->out != md->N) {
                st = tuna_fail(TUNA_E_FORMAT,
                               "adapter module '%s' is [%lld, %lld] but the model's linear is "
                               "[%lld, %lld] (out, in): the adapter belongs to another base model",
                               md->name, im ? (long long)im->out : -1LL, im ? (long long)im->in : -1LL,
                               (long long)md->N, (long long)md->K);
                tuna_trainer_free(t);
                return st;
            }
            memcpy(A, im->A, (size_t)(md->r * md->K) * sizeof *A);
            memcpy(B, im->B, (size_t)(md->N * md->r) * sizeof *B);
        } else {
            /* PEFT: kaiming_uniform_(a=sqrt(5)) on A = U(-1/sqrt(in), 1/sqrt(in)); B = 0 */
            double bound = 1.0 / sqrt((double)md->K);
            for (int64_t j = 0; j < md->r * md->K; j++)
                A[j] = (float)((tuna_rng_uniform(&rng) * 2 - 1) * bound);
        }
        md->lora.r = md->r;
        md->lora.A = t->params + md->offA;
        md->lora.B = t->params + md->offB;
        if (t->host) { /* the CPU model's own forward sees the adapters too (same memory) */
            struct tuna_linear *lin = proj_lin(&m->layers[md->layer], md->proj);
            lin->n_lora = 1;
            lin->lora = &md->lora;
        }
    }
    if (!t->host) st = m->ops->upload(m->be, t->params, t->h_params, (size_t)P * sizeof(float));
    if (st) {
        tuna_trainer_free(t);
        return st;
    }
    *out = t;
    return TUNA_OK;
}

int64_t tuna_trainer_step_count(const tuna_trainer *t)
{
    return t->step;
}
int64_t tuna_trainer_param_count(const tuna_trainer *t)
{
    return t->P;
}
const float *tuna_trainer_grads(const tuna_trainer *t)
{
    if (!t->host && t->m->ops->download(t->m->be, t->h_grads, t->grads, (size_t)t->P * sizeof(float))) return NULL;
    return t->h_grads;
}

/* The host copy of the parameters, current (downloaded unless the caller's edits are newer). */
static tuna_status params_host(const tuna_trainer *t, const float **out)
{
    *out = t->h_params;
    if (t->host || t->h_params_dirty || t->offload) return TUNA_OK; /* offload: updated on the host */
    tuna_status st = t->m->ops->download(t->m->be, t->h_params, t->params, (size_t)t->P * sizeof(float));
    if (st) *out = NULL;
    return st;
}

float *tuna_trainer_params(tuna_trainer *t)
{
    const float *p;
    if (params_host(t, &p)) return NULL;
    /* the caller may keep the pointer and write through it at any time: from now on the host
       copy is the truth, uploaded before each use and refreshed after each update */
    if (!t->host) t->h_params_dirty = true;
    return (float *)p;
}

/* Uploads the host copy once a caller holds it (tuna_trainer_params). */
static tuna_status params_to_backend(tuna_trainer *t)
{
    if (t->host || !t->h_params_dirty) return TUNA_OK;
    return t->m->ops->upload(t->m->be, t->params, t->h_params, (size_t)t->P * sizeof(float));
}

/* ---------------------------------------------------------------- one micro-batch */

/* The tokens of b (padding dropped) as one forward batch: row i is sequence i at positions
 * 0..len-1, rows consecutive (the training layout of backend/train_ops.h). target[t] is the
 * shifted label of token t (-100 when none); logits are asked for the tokens with a target only. */
static tuna_status build_batch(const struct tuna_model *m, const struct tuna_train_batch *tb, struct tuna_batch *fb,
                               int32_t *target)
{
    tuna_batch_clear(fb);
    for (int64_t r = 0; r < tb->B; r++) {
        const int64_t len = tb->len[r];
        for (int64_t i = 0; i < len; i++) {
            int32_t y = i + 1 < tb->T ? tb->labels[r * tb->T + i + 1] : TUNA_LABEL_IGNORE;
            if (y != TUNA_LABEL_IGNORE && (y < 0 || y >= m->arch.vocab_size))
                return tuna_fail(TUNA_E_RANGE,
                                 "label %d (batch row %lld, position %lld) is outside the vocabulary "
                                 "of %lld",
                                 y, (long long)r, (long long)i + 1, (long long)m->arch.vocab_size);
            if (y != TUNA_LABEL_IGNORE && i + 1 >= len) y = TUNA_LABEL_IGNORE; /* a label on padding */
            target[fb->n] = y;
            tuna_status st = tuna_batch_add(fb, tb->ids[r * tb->T + i], (int32_t)r, i, y != TUNA_LABEL_IGNORE);
            if (st) return st;
            fb->adapter[fb->n - 1] = 0;
        }
    }
    return TUNA_OK;
}

/* dx += dy W (+ LoRA), and the adapter's dA, dB when the linear carries one. dy16: dy rounded
 * to t->hdt (the 16-bit path), or NULL; with it, acc false OVERWRITES dx with dy W first. */
static void linear_backward_rows(tuna_trainer *t, int64_t layer, int proj, float *dx, const float *dy, const void *dy16,
                                 int64_t lddy, bool acc, const float *x, int64_t T, int64_t row0, bool kept_h)
{
    struct tuna_model *m = t->m;
    const struct tuna_train_ops *to = t->tops;
    const struct tuna_linear *lin = proj_lin(&m->layers[layer], proj);
    const struct tmod *md = t->by_lin[layer * TUNA_PROJ_COUNT + proj];
    float *dA = md ? t->grads + md->offA : NULL, *dB = md ? t->grads + md->offB : NULL;
    uint64_t key = md ? tuna_train_key_at(tuna_train_drop_key(t, (int)(md - t->mods)), row0 * md->K) : 0;
    /* the forward's x A^T, unless the caller says the kept one is stale */
    const float *h = md && kept_h ? tuna_train_lora_h(t, layer, proj, row0, md->r) : NULL;
    if (dy16 && t->kcat) {
        /* kcat: dy16's rows have kpad spare columns; the adapter's dx, dA, dB inside when its
           forward's x A^T is at hand (no dropout with kcat) */
        const bool fold = md && h && !key && t->kcat_bwd;
        if (to->matmul_backward16_lora(m->be, dx, (void *)dy16, lddy > 0 ? lddy : lin->w.rows + t->kpad, &lin->w, acc,
                                       fold ? &md->lora : NULL, dA, dB, x, h, T)) {
            if (!md || fold) return;
        } else { /* not for this weight: the float32 op (which accumulates) */
            if (!acc) to->zero(m->be, dx, T * lin->w.cols);
            to->matmul_backward(m->be, dx, dy, &lin->w, T);
        }
    } else if (dy16) {
        to->matmul_backward16(m->be, dx, dy16, &lin->w, T, acc);
    } else {
        to->matmul_backward(m->be, dx, dy, &lin->w, T);
    }
    if (!md) return;
    if (!key) {
        if (h)
            to->lora_backward_h(m->be, dx, dA, dB, dy, x, h, &md->lora, T, md->N, md->K, t->lwork, t->fast);
        else
            to->lora_backward(m->be, dx, dA, dB, dy, x, &md->lora, T, md->N, md->K, t->lwork, t->fast);
        return;
    }
    /* y += s B A drop(x): the adapter sees drop(x); dropout is linear, so dx += drop(d drop(x)) */
    const int64_t n = T * md->K;
    to->dropout(m->be, t->drop, x, n, t->lo.dropout, key);
    to->zero(m->be, t->drop_g, n);
    if (h)
        to->lora_backward_h(m->be, t->drop_g, dA, dB, dy, t->drop, h, &md->lora, T, md->N, md->K, t->lwork, t->fast);
    else
        to->lora_backward(m->be, t->drop_g, dA, dB, dy, t->drop, &md->lora, T, md->N, md->K, t->lwork, t->fast);
    to->dropout(m->be, t->drop_g, t->drop_g, n, t->lo.dropout, key);
    m->ops->add(m->be, dx, t->drop_g, n);
}

static void linear_backward(tuna_trainer *t, int64_t layer, int proj, float *dx, const float *dy, const void *dy16,
                            bool acc, const float *x, int64_t T)
{
    linear_backward_rows(t, layer, proj, dx, dy, dy16, 0, acc, x, T, 0, true);
}

/* q, k, v: dxn = sum of the three input gradients (overwritten), their adapters' dA, dB. With
 * t->qkv one GEMM over the stacked weights when every adapter's forward x A^T is at hand. */
static void qkv_backward(tuna_trainer *t, int64_t l, const struct tuna_fwd_layer_acts *A, int64_t T)
{
    struct tuna_train_grad_bufs *g = &t->g;
    const bool h = t->h16;
    const int64_t ld = t->qkv ? t->ld_qkv : 0;
    if (t->qkv) {
        const struct tuna_weight *w[3];
        const struct tuna_lora *lo[3];
        float *dA[3], *dB[3];
        const float *hk[3];
        bool ok = true;
        for (int i = 0; i < 3; i++) {
            const int p = TUNA_PROJ_Q + i;
            const struct tmod *md = t->by_lin[l * TUNA_PROJ_COUNT + p];
            w[i] = &proj_lin(&t->m->layers[l], p)->w;
            lo[i] = md ? &md->lora : NULL;
            dA[i] = md ? t->grads + md->offA : NULL;
            dB[i] = md ? t->grads + md->offB : NULL;
            hk[i] = md ? tuna_train_lora_h(t, l, p, 0, md->r) : NULL;
            ok &= !md || (hk[i] && tuna_train_drop_key(t, (int)(md - t->mods)) == 0);
        }
        if (ok && t->tops->matmul_backward16_lora_n(t->m->be, g->dxn, t->dq16, ld, 3, w, lo, dA, dB, A->xn_attn, hk,
                                                      T, t->kpad))
            return;
    }
    linear_backward_rows(t, l, TUNA_PROJ_Q, g->dxn, g->dq, h ? t->dq16 : NULL, ld, false, A->xn_attn, T, 0, true);
    linear_backward_rows(t, l, TUNA_PROJ_K, g->dxn, g->dk, h ? t->dk16 : NULL, ld, true, A->xn_attn, T, 0, true);
    linear_backward_rows(t, l, TUNA_PROJ_V, g->dxn, g->dv, h ? t->dv16 : NULL, ld, true, A->xn_attn, T, 0, true);
}

static const void *h16_at(const void *p, int64_t i)
{
    return p ? (const char *)p + 2 * i : NULL;
}

/* Backward of one layer given g.dx (gradient of the layer's output), leaving in g.dx the
 * gradient of its input. The forward's op list, reversed. */
static void layer_backward(tuna_trainer *t, int64_t l, const struct tuna_fwd_layer_acts *A, const float *lse,
                           const int64_t *pos, int64_t T)
{
    struct tuna_model *m = t->m;
    const struct tuna_train_ops *to = t->tops;
    tuna_backend *be = m->be;
    const struct tuna_arch *a = &m->arch;
    const struct tuna_layer *L = &m->layers[l];
    const int64_t C = a->hidden_size, H = a->n_heads, Hkv = a->n_kv_heads, D = a->head_dim, I = a->intermediate_size;
    const float eps = (float)a->norm_eps;
    struct tuna_train_grad_bufs *g = &t->g;
    /* MLP block: x_out = x_mid + down(act(gate(xn)) * up(xn)), xn = norm(x_mid); with chunks
       (offload) each chunk of rows is recomputed (gate, up, act) and gone through in turn.
       16-bit path (h16): each GEMM reads the dy that its producer rounded (dx16 from the norm
       backward below, or the caller for the top layer; dgate16/dup16 from the GLU backward;
       dq16/dk16/dv16 from RoPE's), and the first GEMM into a buffer overwrites it (no zeroing). */
    const bool h = t->h16;
    const int64_t kp = t->kpad; /* spare columns of each 16-bit dy row (kcat) */
    if (!h) to->zero(be, g->dxn, T * C);
    const int64_t MR = t->mlp_rows < T ? t->mlp_rows : T;
    for (int64_t r0 = 0; r0 < T; r0 += MR) {
        const int64_t n = T - r0 < MR ? T - r0 : MR;
        if (MR < T) tuna_train_mlp_chunk_forward(t, l, A, r0, n);
        if (!h) to->zero(be, g->dact, n * I);
        linear_backward_rows(t, l, TUNA_PROJ_DOWN, g->dact, g->dx + r0 * C, h16_at(h ? t->dx16 : NULL, r0 * (C + kp)),
                             0, false, A->act, n, r0, MR >= T);
        if (h) {
            /* dgate16 in act16: down's forward operand, dead now */
            to->glu_backward16(be, g->dgate, g->dup, t->act16, t->dup16, g->dact, A->gate, A->up, n * I, I, I + kp,
                               (int)a->act, t->hdt);
        } else {
            to->zero(be, g->dgate, n * I); /* may be A->act: dead now */
            to->zero(be, g->dup, n * I);
            to->glu_backward(be, g->dgate, g->dup, g->dact, A->gate, A->up, n * I, (int)a->act);
        }
        linear_backward_rows(t, l, TUNA_PROJ_GATE, g->dxn + r0 * C, g->dgate, h ? t->act16 : NULL, 0, false,
                             A->xn_mlp + r0 * C, n, r0, true);
        linear_backward_rows(t, l, TUNA_PROJ_UP, g->dxn + r0 * C, g->dup, h ? t->dup16 : NULL, 0, true,
                             A->xn_mlp + r0 * C, n, r0, true);
    }
    if (h)
        to->rmsnorm_backward16(be, g->dx, t->dx16, C + kp, g->dxn, A->x_mid, L->mlp_norm, T, C, eps, t->hdt);
    else
        to->rmsnorm_backward(be, g->dx, g->dxn, A->x_mid, L->mlp_norm, T, C, eps);
    /* attention block: x_mid = x_in + o(attn(rope(norm(q(xn))), rope(norm(k(xn))), v(xn))) */
    if (!h) to->zero(be, g->datt, T * H * D);
    linear_backward(t, l, TUNA_PROJ_O, g->datt, g->dx, h ? t->dx16 : NULL, false, A->att, T);
    to->zero(be, g->dq, T * H * D);
    to->zero(be, g->dk, T * Hkv * D);
    to->zero(be, g->dv, T * Hkv * D);
    to->attention_backward(be, g->dq, g->dk, g->dv, g->datt, A->att, lse, A->q, A->k, A->v, pos, T, H, Hkv, D,
                           (float)(1.0 / sqrt((double)D)), a->sliding_window, t->fast, (float *)t->attn_mem,
                           t->attn_floats);
    const float *norm_w[2] = {L->q_norm, L->k_norm};
    if (h) { /* rotated and rounded in one pass where no per-head norm follows */
        to->rope_backward16(be, g->dq, norm_w[0] ? NULL : t->dq16, t->qkv ? t->ld_qkv : H * D + kp, pos, T, H, D,
                            m->rot_dim, m->inv_freq, m->attn_factor, t->hdt);
        to->rope_backward16(be, g->dk, norm_w[1] ? NULL : t->dk16, t->qkv ? t->ld_qkv : Hkv * D + kp, pos, T, Hkv, D,
                            m->rot_dim, m->inv_freq, m->attn_factor, t->hdt);
        to->to_half(be, t->dv16, g->dv, T * Hkv * D, Hkv * D, t->qkv ? t->ld_qkv : Hkv * D + kp, t->hdt);
    } else {
        to->rope_backward(be, g->dq, pos, T, H, D, m->rot_dim, m->inv_freq, m->attn_factor);
        to->rope_backward(be, g->dk, pos, T, Hkv, D, m->rot_dim, m->inv_freq, m->attn_factor);
    }
    float *dqk[2] = {g->dq, g->dk};
    void *dqk16[2] = {t->dq16, t->dk16};
    const int64_t heads[2] = {H, Hkv};
    for (int i = 0; i < 2; i++) {
        if (!norm_w[i]) continue;
        /* the projection before its per-head norm was overwritten in place: recompute it */
        tuna_train_linear_forward(t, l, i == 0 ? TUNA_PROJ_Q : TUNA_PROJ_K, g->pre, A->xn_attn, T);
        to->zero(be, g->dpre, T * heads[i] * D);
        to->rmsnorm_backward(be, g->dpre, dqk[i], g->pre, norm_w[i], T * heads[i], D, eps);
        m->ops->copy(be, dqk[i], g->dpre, (size_t)(T * heads[i] * D) * sizeof(float));
        if (h)
            to->to_half(be, dqk16[i], dqk[i], T * heads[i] * D, heads[i] * D, t->qkv ? t->ld_qkv : heads[i] * D + kp,
                        t->hdt);
    }
    if (!h) to->zero(be, g->dxn, T * C);
    qkv_backward(t, l, A, T);
    if (h) /* dx16: the next (lower) layer's down and o operand */
        to->rmsnorm_backward16(be, g->dx, t->dx16, C + kp, g->dxn, A->x_in, L->attn_norm, T, C, eps, t->hdt);
    else
        to->rmsnorm_backward(be, g->dx, g->dxn, A->x_in, L->attn_norm, T, C, eps);
}

/* The head on the n selected rows, in chunks of t->chunk rows: logits = lm_head(sel_n), the
 * fused cross-entropy (per-row losses into t->loss_rows, logits → dlogits in place) and, when
 * train, dsel_n += dlogits W. Never more than one chunk of [rows, V] logits. */
static void head_chunks(tuna_trainer *t, int64_t n, const int32_t *tg, double denom, bool train)
{
    struct tuna_model *m = t->m;
    const int64_t C = m->arch.hidden_size, V = m->arch.vocab_size;
    if (train) t->tops->zero(m->be, t->dsel_n, n * C);
    for (int64_t r0 = 0; r0 < n; r0 += t->chunk) {
        const int64_t nr = n - r0 < t->chunk ? n - r0 : t->chunk;
        m->ops->matmul(m->be, t->logits, t->sel_n + r0 * C, &m->lm_head.w, NULL, nr);
        t->tops->cross_entropy(m->be, t->logits, t->loss_rows + r0, t->logits, tg + r0, nr, V, denom);
        if (train) t->tops->matmul_backward(m->be, t->dsel_n + r0 * C, t->logits, &m->lm_head.w, nr);
    }
}

static double now_s(void);

/* Forward (+ backward when train) of one micro-batch; adds the CE sum to *loss_sum. */
static tuna_status micro_step(tuna_trainer *t, const struct tuna_train_batch *tb, int micro, double denom, bool train,
                              double *loss_sum, int64_t *tokens)
{
    struct tuna_model *m = t->m;
    const struct tuna_arch *a = &m->arch;
    const int64_t C = a->hidden_size;
    int64_t T = 0, max_len = 1;
    for (int64_t r = 0; r < tb->B; r++) {
        if (tb->len[r] < 0 || tb->len[r] > tb->T)
            return tuna_fail(TUNA_E_INVALID, "batch row %lld has length %lld of %lld", (long long)r,
                             (long long)tb->len[r], (long long)tb->T);
        T += tb->len[r];
        if (tb->len[r] > max_len) max_len = tb->len[r];
    }
    *tokens += T;
    if (T == 0) return TUNA_OK;
    struct tuna_batch fb;
    tuna_batch_init(&fb);
    int32_t *target = malloc((size_t)T * sizeof *target), *tg = malloc((size_t)T * sizeof *tg);
    double *loss_h = malloc((size_t)T * sizeof *loss_h);
    tuna_status st = target && tg && loss_h ? TUNA_OK : tuna_fail_oom("targets", (size_t)T * 16);
    /* dropout masks of this (step, micro-batch); none when evaluating */
    t->drop_base = train ? (t->lo.seed * 0x9E3779B97F4A7C15ULL) ^ ((uint64_t)t->step << 20) ^ (uint64_t)micro : 0;
    if (train) t->drop_base |= 1ULL << 63;
    if (!st) st = build_batch(m, tb, &fb, target);
    if (!st) st = params_to_backend(t);
    if (!st) st = tuna_train_reserve(t, T, max_len);
    int64_t n = 0;
    /* TUNA_TRAIN_TIMING=1: host times of the phases on stderr (queueing vs completion: where the
       host is the limit the queue times approach the completion times); =2 also waits for the
       forward before the head, to time the forward's GPU work alone */
    static int timing = -1;
    if (timing < 0) {
        const char *te = getenv("TUNA_TRAIN_TIMING");
        timing = te ? atoi(te) : 0;
    }
    const double tm0 = timing ? now_s() : 0;
    double tm1 = 0, tm2 = 0, tm3 = 0, tm4 = 0, tm5 = 0;
    if (!st) st = tuna_train_forward(t, &fb, &n);
    if (st || n == 0) goto done;
    if (timing) tm1 = now_s();
    if (timing > 1 && (st = m->ops->sync(m->be))) goto done;
    if (timing) tm2 = now_s();
    for (int64_t j = 0; j < n; j++)
        tg[j] = target[t->sel_rows[j]]; /* targets in logits order */
    head_chunks(t, n, tg, denom, train);
    st = m->ops->download(m->be, loss_h, t->loss_rows, (size_t)n * sizeof(double)); /* waits for the head */
    if (st) goto done;
    if (timing) tm3 = now_s();
    for (int64_t j = 0; j < n; j++)
        *loss_sum += loss_h[j];
    if (!train) goto done;

    /* final norm on the selected rows, scattered back into the residual stream's gradient */
    t->tops->zero(m->be, t->dsel, n * C);
    t->tops->rmsnorm_backward(m->be, t->dsel, t->dsel_n, t->sel_in, m->final_norm, n, C, (float)a->norm_eps);
    t->tops->zero(m->be, t->g.dx, T * C);
    t->tops->scatter_add_rows(m->be, t->g.dx, t->dsel, t->sel_rows, n, C);
    if (t->h16) /* the top layer's dy */
        t->tops->to_half(m->be, t->dx16, t->g.dx, T * C, C, C + t->kpad, t->hdt);
    for (int64_t l = a->n_layers - 1; l >= 0; l--) {
        const struct tuna_fwd_layer_acts *acts = &t->acts[l];
        const float *lse = t->lse + l * T * a->n_heads;
        if (t->ckpt) {
            tuna_train_recompute_layer(t, l, &fb); /* the layer again, from its saved input */
            acts = &t->acts[0];
            lse = t->lse;
        }
        layer_backward(t, l, acts, lse, fb.pos, T);
    }
    /* the embedding is frozen: the gradient stops here */
    if (timing) tm4 = now_s();
    st = m->ops->sync(m->be);
    if (timing) {
        tm5 = now_s();
        fprintf(stderr,
                "train timing (ms): forward queued %.2f%s %.2f, head+loss done %.2f | backward queued %.2f, done %.2f "
                "| total %.2f\n",
                (tm1 - tm0) * 1e3, timing > 1 ? ", forward done" : ", (no wait)", (tm2 - tm0) * 1e3,
                (tm3 - tm2) * 1e3, (tm4 - tm3) * 1e3, (tm5 - tm3) * 1e3, (tm5 - tm0) * 1e3);
    }
done:
    free(loss_h);
    free(tg);
    free(target);
    tuna_batch_free(&fb);
    return st;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

tuna_status tuna_trainer_loss_grad(tuna_trainer *t, const struct tuna_train_batch *mb, int n, double *loss,
                                   int64_t *tokens_out, int64_t *targets_out)
{
    int64_t targets = 0, tokens = 0;
    for (int i = 0; i < n; i++)
        targets += mb[i].n_targets;
    if (targets <= 0)
        return tuna_fail(TUNA_E_INVALID, "step %lld: its batch has no target token (every label is -100)",
                         (long long)t->step + 1);
    t->tops->zero(t->m->be, t->grads, t->P);
    double loss_sum = 0;
    for (int i = 0; i < n; i++) {
        tuna_status st = micro_step(t, &mb[i], i, (double)targets, true, &loss_sum, &tokens);
        if (st) return tuna_fail_prefix(st, "step %lld", (long long)t->step + 1);
    }
    *loss = loss_sum / (double)targets;
    if (tokens_out) *tokens_out = tokens;
    if (targets_out) *targets_out = targets;
    return TUNA_OK;
}

/* AdamW on the host (offload): the element range of one thread. */
struct host_adam {
    tuna_trainer *t;
    float *p, *g;
    int64_t lo, hi;
    double lr, coef;
};

static void *host_adam_run(void *arg)
{
    struct host_adam *h = arg;
    const struct tuna_optim_opts *o = &h->t->oo;
    tuna_cpu_train_adamw(h->p + h->lo, h->g + h->lo, h->t->m1 + h->lo, h->t->m2 + h->lo, h->hi - h->lo, h->lr, o->beta1,
                         o->beta2, o->eps, o->weight_decay, h->t->step, h->coef);
    return NULL;
}

/* The offload mode's update: the gradients come to the host, AdamW runs there over threads
 * (element-wise, so any split gives torch's result), the parameters go back. */
static tuna_status host_adamw(tuna_trainer *t, double lr, double coef)
{
    const struct tuna_backend_ops *op = t->m->ops;
    const size_t bytes = (size_t)t->P * sizeof(float);
    tuna_status st = t->host ? TUNA_OK : op->download(t->m->be, t->h_grads, t->grads, bytes);
    if (st) return st;
    enum { MAXT = 16 };
    struct host_adam h[MAXT];
    pthread_t th[MAXT];
    int nt = t->P >= ((int64_t)1 << 20) ? MAXT : 1, started = 0;
    for (int i = 0; i < nt; i++)
        h[i] = (struct host_adam){t, t->h_params, t->h_grads, t->P * i / nt, t->P * (i + 1) / nt, lr, coef};
    for (int i = 1; i < nt; i++)
        if (pthread_create(&th[i], NULL, host_adam_run, &h[i]) == 0)
            started |= 1 << i;
        else
            host_adam_run(&h[i]);
    host_adam_run(&h[0]);
    for (int i = 1; i < nt; i++)
        if (started & (1 << i)) pthread_join(th[i], NULL);
    return t->host ? TUNA_OK : op->upload(t->m->be, t->params, t->h_params, bytes);
}

void tuna_trainer_memory(const tuna_trainer *t, struct tuna_train_memory *out)
{
    memset(out, 0, sizeof *out);
    const size_t pb = ((size_t)t->P * sizeof(float) + 255) & ~(size_t)255;
    out->tokens = t->cap_T;
    out->lora_state = (size_t)(t->offload ? 2 : 4) * pb + TUNA_TRAIN_NORM_WORK;
    out->residual = t->mem_cat[0];
    out->layer_acts = t->mem_cat[1];
    out->checkpoints = t->mem_cat[2];
    out->layer_grads = t->mem_cat[3];
    out->logits = t->mem_cat[4];
    out->lora_work = t->mem_cat[5];
    out->attention = (size_t)t->attn_floats * sizeof(float);
    out->total = out->lora_state + out->residual + out->layer_acts + out->checkpoints + out->layer_grads +
                 out->logits + out->lora_work + out->attention;
    out->host_checkpoints = t->x_saved_host_bytes;
    out->host_optimizer = t->offload ? 2 * (size_t)t->P * sizeof(float) * (t->host ? 1 : 2) : 0;
    out->host_embedding = t->embed_host_bytes;
    out->mlp_rows = t->mlp_rows;
    out->head_rows = t->chunk;
}

tuna_status tuna_trainer_step(tuna_trainer *t, const struct tuna_train_batch *mb, int n, struct tuna_step_stats *out)
{
    double t0 = now_s(), loss;
    int64_t tokens = 0, targets = 0;
    tuna_status st = tuna_trainer_loss_grad(t, mb, n, &loss, &tokens, &targets);
    if (st) return st;
    double gn = sqrt(t->tops->grad_sq_sum(t->m->be, t->grads, t->P, t->norm_work));
    if ((st = t->m->ops->sync(t->m->be))) return tuna_fail_prefix(st, "step %lld", (long long)t->step + 1);
    if (!isfinite(loss) || !isfinite(gn))
        return tuna_fail(TUNA_E_RANGE,
                         "step %lld: the loss is %g and the gradient norm %g: training diverged "
                         "(lower --learning-rate, keep --max-grad-norm on, check the data); the adapter is left as "
                         "it was before this step",
                         (long long)t->step + 1, loss, gn);
    /* clip_grad_norm_: coef = max / (norm + 1e-6), applied only when below 1 */
    double coef = 1.0;
    if (t->oo.max_grad_norm > 0) {
        coef = t->oo.max_grad_norm / (gn + 1e-6);
        if (coef >= 1.0) coef = 1.0;
    }
    double lr = tuna_lr_at(&t->oo, t->step);
    t->step++;
    if (t->offload) {
        if ((st = host_adamw(t, lr, coef))) return tuna_fail_prefix(st, "step %lld (AdamW on the host)", (long long)t->step);
    } else {
        t->tops->adamw(t->m->be, t->params, t->grads, t->m1, t->m2, t->P, lr, t->oo.beta1, t->oo.beta2, t->oo.eps,
                       t->oo.weight_decay, t->step, coef);
    }
    if ((st = t->m->ops->sync(t->m->be))) return tuna_fail_prefix(st, "step %lld (AdamW)", (long long)t->step);
    if (!t->host && t->h_params_dirty && !t->offload &&
        (st = t->m->ops->download(t->m->be, t->h_params, t->params, (size_t)t->P * sizeof(float))))
        return st;
    if (out) {
        out->step = t->step;
        out->loss = loss;
        out->grad_norm = gn;
        out->lr = lr;
        out->tokens = tokens;
        out->targets = targets;
        out->seconds = now_s() - t0;
    }
    return TUNA_OK;
}

tuna_status tuna_trainer_eval(tuna_trainer *t, const struct tuna_train_batch *b, double *loss)
{
    double sum = 0;
    int64_t tokens = 0;
    if (b->n_targets <= 0) return tuna_fail(TUNA_E_INVALID, "evaluation batch has no target token");
    tuna_status st = micro_step(t, b, 0, (double)b->n_targets, false, &sum, &tokens);
    if (!st) *loss = sum / (double)b->n_targets;
    return st;
}

/* ---------------------------------------------------------------- export and state */

tuna_status tuna_trainer_export(const tuna_trainer *t, const char *dir, const char *base_model, bool replace)
{
    const float *hp;
    tuna_status st = params_host(t, &hp);
    if (st) return tuna_fail_prefix(st, "reading the adapter back from the %s backend", t->m->ops->name);
    struct tuna_peft_module *pm = calloc((size_t)t->n_mods, sizeof *pm);
    if (!pm) return tuna_fail_oom("export table", (size_t)t->n_mods * sizeof *pm);
    for (int i = 0; i < t->n_mods; i++) {
        const struct tmod *md = &t->mods[i];
        pm[i] = (struct tuna_peft_module){md->name, md->r, md->K, md->N, md->alpha, hp + md->offA, hp + md->offB};
    }
    struct tuna_peft_config cfg = {0};
    cfg.r = t->cfg_r;
    cfg.alpha = t->cfg_alpha;
    cfg.use_rslora = t->use_rslora;
    cfg.dropout = t->lo.dropout;
    cfg.base_model = base_model;
    cfg.dtype = TUNA_DTYPE_F32;
    st = tuna_export_peft(dir, &cfg, pm, t->n_mods, replace);
    free(pm);
    return st;
}

/* A fingerprint of the module layout, so optimizer state is only loaded into the same plan. */
static uint64_t layout_hash(const tuna_trainer *t)
{
    uint64_t h = 1469598103934665603ULL;
    for (int i = 0; i < t->n_mods; i++) {
        const struct tmod *md = &t->mods[i];
        for (const char *c = md->name; *c; c++)
            h = (h ^ (uint8_t)*c) * 1099511628211ULL;
        int64_t v[3] = {md->r, md->K, md->N};
        for (int j = 0; j < 3; j++)
            h = (h ^ (uint64_t)v[j]) * 1099511628211ULL;
    }
    return h;
}

#define OPT_MAGIC "TUNAADAM"

tuna_status tuna_trainer_save_optimizer(const tuna_trainer *t, const char *dir)
{
    size_t hdr = 8 + 3 * 8, bytes = hdr + (size_t)t->P * 2 * sizeof(float);
    char *buf = malloc(bytes);
    if (!buf) return tuna_fail_oom("optimizer state", bytes);
    uint64_t h[3] = {(uint64_t)t->step, (uint64_t)t->P, layout_hash(t)};
    memcpy(buf, OPT_MAGIC, 8);
    memcpy(buf + 8, h, sizeof h);
    const struct tuna_backend_ops *op = t->m->ops;
    tuna_status st = TUNA_OK;
    if (t->offload) { /* the moments are host memory */
        memcpy(buf + hdr, t->m1, (size_t)t->P * sizeof(float));
        memcpy(buf + hdr + (size_t)t->P * sizeof(float), t->m2, (size_t)t->P * sizeof(float));
    } else {
        st = op->download(t->m->be, buf + hdr, t->m1, (size_t)t->P * sizeof(float));
        if (!st)
            st = op->download(t->m->be, buf + hdr + (size_t)t->P * sizeof(float), t->m2, (size_t)t->P * sizeof(float));
    }
    if (st) {
        free(buf);
        return st;
    }
    char path[4096];
    snprintf(path, sizeof path, "%s/optimizer.bin", dir);
    st = tuna_write_file_atomic(path, buf, bytes);
    free(buf);
    return st;
}

tuna_status tuna_trainer_load_optimizer(tuna_trainer *t, const char *dir)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/optimizer.bin", dir);
    char *buf = NULL;
    size_t len = 0;
    size_t hdr = 8 + 3 * 8, want = hdr + (size_t)t->P * 2 * sizeof(float);
    tuna_status st = tuna_read_file(path, (size_t)1 << 40, &buf, &len);
    if (st) return st;
    uint64_t h[3] = {0, 0, 0};
    if (len >= hdr) memcpy(h, buf + 8, sizeof h);
    if (len != want || memcmp(buf, OPT_MAGIC, 8) != 0 || h[1] != (uint64_t)t->P || h[2] != layout_hash(t)) {
        free(buf);
        return tuna_fail(TUNA_E_FORMAT,
                         "%s does not hold the optimizer state of this run (%zu bytes; expected "
                         "%zu for %lld parameters in the same modules): resume with the same model and LoRA "
                         "settings",
                         path, len, want, (long long)t->P);
    }
    if (t->offload) {
        memcpy(t->m1, buf + hdr, (size_t)t->P * sizeof(float));
        memcpy(t->m2, buf + hdr + (size_t)t->P * sizeof(float), (size_t)t->P * sizeof(float));
    } else {
        st = t->m->ops->upload(t->m->be, t->m1, buf + hdr, (size_t)t->P * sizeof(float));
        if (!st)
            st = t->m->ops->upload(t->m->be, t->m2, buf + hdr + (size_t)t->P * sizeof(float),
                                   (size_t)t->P * sizeof(float));
    }
    free(buf);
    if (!st) t->step = (int64_t)h[0];
    return st;
}
