/* device.c — which backend runs a model, and moving a loaded model into that backend's memory.
 *
 * The loader (weights.c) first builds the model on the host: weights are views into the mapped
 * files, small vectors (norms, biases) float32 copies. For the CPU backend that is the end. For a
 * backend with its own memory (CUDA), every weight is converted once to the compute dtype and
 * uploaded (4-bit bitsandbytes weights stay 4-bit: codes + absmax, read by a fused dequant-GEMV
 * for decode and dequantized per GEMM for prefill), the vectors are uploaded and their host
 * copies freed.
 * The device buffers are listed in m->dev_allocs and freed with the model.
 *
 * dtype policy (as vLLM): auto = bf16 on compute capability >= 8.0, f16 below, said on stderr;
 * an explicit bf16 on an older GPU is refused with the GPU's name and capability.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cpu/cpu.h"
#include "core/status.h"
#include "model/model.h"
#include "quant/nf4.h"
#ifdef TUNA_HAVE_CUDA
#include "backend/cuda/arena.h"
#include "backend/cuda/cuda.h"
#include "backend/cuda/device.h"
#endif

#ifdef TUNA_HAVE_CUDA
static tuna_status track(struct tuna_model *m, void *p)
{
    if (m->n_dev_allocs == m->cap_dev_allocs) {
        int64_t nc = m->cap_dev_allocs ? m->cap_dev_allocs * 2 : 64;
        void **na = realloc(m->dev_allocs, (size_t)nc * sizeof *na);
        if (!na) return tuna_fail_oom("device allocation table", (size_t)nc * sizeof *na);
        m->dev_allocs = na;
        m->cap_dev_allocs = nc;
    }
    m->dev_allocs[m->n_dev_allocs++] = p;
    return TUNA_OK;
}

/* A device buffer of its own (never in the arena), tracked and freed with the model. */
static tuna_status dev_alloc_own(struct tuna_model *m, size_t bytes, void **out)
{
    *out = NULL;
    void *d = NULL;
    tuna_status st = m->ops->alloc(m->be, bytes, &d);
    if (st) return st;
    if ((st = track(m, d))) {
        m->ops->release(m->be, d);
        return st;
    }
    *out = d;
    return TUNA_OK;
}

/* A device buffer of the model, freed with it: from the weight arena (arena.h: no 2 MiB page
 * rounding per buffer) when there is one, else one of its own. */
static tuna_status dev_alloc(struct tuna_model *m, size_t bytes, void **out)
{
    if (m->dev_arena) {
        *out = NULL;
        return tuna_cuda_arena_alloc((tuna_cuda_arena *)m->dev_arena, bytes, out);
    }
    return dev_alloc_own(m, bytes, out);
}

/* Uploads n host bytes into a new device buffer of the model. */
static tuna_status upload_new(struct tuna_model *m, const void *src, size_t bytes, void **out)
{
    void *d = NULL;
    tuna_status st = dev_alloc(m, bytes, &d);
    if (st) return st;
    *out = d;
    return m->ops->upload(m->be, d, src, bytes);
}

/* TUNA_MEM_TRACE=1: free device memory at each stage of the load, on stderr. */
static void mem_trace(const struct tuna_model *m, int dev, const char *what, size_t *last)
{
    static int on = -1;
    if (on < 0) {
        const char *e = getenv("TUNA_MEM_TRACE");
        on = e && *e && strcmp(e, "0") != 0;
    }
    if (!on) return;
    struct tuna_cuda_device_info info;
    if (tuna_cuda_device_query(dev, &info)) return;
    const size_t used = tuna_cuda_arena_used((const tuna_cuda_arena *)m->dev_arena),
                 mapped = tuna_cuda_arena_mapped((const tuna_cuda_arena *)m->dev_arena);
    fprintf(stderr, "tuna mem: %-34s free %9.3f GB (took %+.3f GB); %lld cudaMallocs; arena %.3f GB used, %.3f mapped\n",
            what, (double)info.free_bytes / 1e9, *last ? ((double)*last - (double)info.free_bytes) / 1e9 : 0.0,
            (long long)m->n_dev_allocs, (double)used / 1e9, (double)mapped / 1e9);
    *last = info.free_bytes;
}

/* Replaces a host float vector by a device copy (the host copy is freed). */
static tuna_status move_vec(struct tuna_model *m, float **v, int64_t n)
{
    if (!*v) return TUNA_OK;
    void *d;
    tuna_status st = upload_new(m, *v, (size_t)n * sizeof(float), &d);
    if (st) return st;
    free(*v);
    *v = d;
    return TUNA_OK;
}

/* A 4-bit weight stays 4-bit on the GPU: codes and block scales uploaded, a descriptor
 * (struct tuna_cuda_q4) with the CPU dequantizer's own nibble table (so both backends use the
 * same values, FP4's sign bit included) and the rounding of the checkpoint. Double-quantized
 * scales stay double-quantized (1 byte per block + a float per 256 blocks instead of a float per
 * block: ~0.3 GB less at 7B); the kernels rebuild each absmax bit-identical to the CPU's. */
static tuna_status move_q4(struct tuna_model *m, struct tuna_weight *w, enum tuna_dtype compute)
{
    const struct tuna_q4_weight *q = w->q4;
    if (!m->gpu_q4) {
        m->gpu_q4 = calloc((size_t)(m->n_q4 > 0 ? m->n_q4 : 1), sizeof(struct tuna_cuda_q4));
        if (!m->gpu_q4) return tuna_fail_oom("4-bit GPU descriptors", sizeof(struct tuna_cuda_q4));
    }
    if (m->n_gpu_q4 >= m->n_q4) return tuna_fail(TUNA_E_INTERNAL, "more 4-bit weights than the model recorded");
    struct tuna_cuda_q4 *d = (struct tuna_cuda_q4 *)m->gpu_q4 + m->n_gpu_q4++;
    tuna_q4_dequant_table(q->type, d->lut);
    d->blocksize = q->blocksize;
    d->round_mode = q->dtype == TUNA_DTYPE_BF16 ? 1 : q->dtype == TUNA_DTYPE_F16 ? 2 : 0;
    d->prefill = compute;
    void *codes, *scales;
    tuna_status st = upload_new(m, q->codes, (size_t)((q->numel + 1) / 2), &codes);
    if (st) return st;
    int nshift = 0;
    while (nshift < 30 && (1 << nshift) < q->nested_blocksize) nshift++;
    if (q->nested && q->qabsmax && q->nested_absmax && (1 << nshift) == q->nested_blocksize &&
        q->n_nested == (q->n_blocks + q->nested_blocksize - 1) / q->nested_blocksize) {
        /* one buffer: nested_code [256] f32 | nested_absmax [n_nested] f32 | qabsmax [n_blocks] u8 */
        const size_t cb = sizeof q->nested_code, nb = (size_t)q->n_nested * sizeof(float);
        const size_t bytes = cb + nb + (size_t)q->n_blocks;
        uint8_t *h = malloc(bytes);
        if (!h) return tuna_fail_oom("double-quantized absmax", bytes);
        memcpy(h, q->nested_code, cb);
        memcpy(h + cb, q->nested_absmax, nb);
        memcpy(h + cb + nb, q->qabsmax, (size_t)q->n_blocks);
        st = upload_new(m, h, bytes, &scales);
        free(h);
        if (st) return st;
        d->absmax = NULL;
        d->nested_code = (const float *)scales;
        d->nested_absmax = (const float *)((const uint8_t *)scales + cb);
        d->qabsmax = (const uint8_t *)scales + cb + nb;
        d->nested_offset = q->nested_offset;
        d->nested_shift = nshift;
    } else {
        if ((st = upload_new(m, q->absmax, (size_t)q->n_blocks * sizeof(float), &scales))) return st;
        d->absmax = scales;
    }
    w->data = codes;
    w->q4 = d; /* from now on the CUDA descriptor; the CPU state stays owned by m->q4 */
    return TUNA_OK;
}

/* Zeroes the columns of rows x ld elements (esz bytes each) at d outside [w0, w0 + cols). */
static tuna_status zero_sides(struct tuna_model *m, char *d, int64_t rows, int64_t ld, int64_t w0, int64_t cols,
                              size_t esz)
{
    const int64_t right = ld - w0 - cols, zw = w0 > right ? w0 : right;
    void *z = calloc((size_t)(rows * zw), esz);
    if (!z) return tuna_fail_oom("LoRA fold zeros", (size_t)(rows * zw) * esz);
    const size_t rb = (size_t)ld * esz;
    tuna_status st = TUNA_OK;
    if (w0 > 0) st = m->ops->upload_2d(m->be, d, rb, z, (size_t)w0 * esz, (size_t)w0 * esz, (size_t)rows);
    if (!st && right > 0)
        st = m->ops->upload_2d(m->be, d + (size_t)(w0 + cols) * esz, rb, z, (size_t)right * esz, (size_t)right * esz,
                               (size_t)rows);
    free(z);
    return st;
}

/* Converts a weight to dtype `to` and uploads it (4-bit weights go to move_q4 and stay 4-bit).
 * ld > cols (the LoRA fold; the backend has upload_2d): the device rows are ld elements apart, W
 * in columns w0..w0 + cols of each, the other columns zero; w->data then points at column w0 of
 * row 0 and w->ld = ld. */
static tuna_status move_weight_ld(struct tuna_model *m, struct tuna_weight *w, enum tuna_dtype to, int64_t ld,
                                  int64_t w0, void **base)
{
    if (w->q4) return move_q4(m, w, to);
    const bool padded = ld > w->cols;
    if (!padded) ld = w->cols, w0 = 0;
    const size_t out_bytes = tuna_dtype_nbytes(to, (uint64_t)(w->rows * ld));
    const size_t esz = (size_t)tuna_dtype_bits(to) / 8, in_esz = (size_t)tuna_dtype_bits(w->dtype) / 8;
    const size_t rb = (size_t)ld * esz, wb = (size_t)w->cols * esz; /* a device row, W's part of it */
    void *d = NULL;
    tuna_status st;
    if (w->dtype == to && !padded) {
        st = upload_new(m, w->data, out_bytes, &d);
    } else {
        st = dev_alloc(m, out_bytes, &d);
        if (!st && padded) st = zero_sides(m, d, w->rows, ld, w0, w->cols, esz);
    }
    if (!st && w->dtype == to && padded) /* the rows straight into their columns */
        st = m->ops->upload_2d(m->be, (char *)d + (size_t)w0 * esz, rb, w->data, wb, wb, (size_t)w->rows);
    if (!st && w->dtype != to) { /* convert in chunks of rows through a float32 staging buffer */
        int64_t rows_per = (int64_t)((8u << 20) / (size_t)(w->cols * 4));
        if (rows_per < 1) rows_per = 1;
        if (rows_per > w->rows) rows_per = w->rows;
        float *f = malloc((size_t)(rows_per * w->cols) * sizeof(float));
        void *h = malloc(tuna_dtype_nbytes(to, (uint64_t)(rows_per * w->cols)));
        if (!f || !h) st = tuna_fail_oom("weight conversion buffer", (size_t)(rows_per * w->cols) * 6);
        for (int64_t r0 = 0; !st && r0 < w->rows; r0 += rows_per) {
            const int64_t nr = w->rows - r0 < rows_per ? w->rows - r0 : rows_per;
            const size_t cnt = (size_t)(nr * w->cols);
            if (!tuna_convert_to_f32(w->dtype, (const char *)w->data + (size_t)(r0 * w->cols) * in_esz, f, cnt)) {
                st = tuna_fail(TUNA_E_UNSUPPORTED, "cannot convert %s weights for the GPU", tuna_dtype_name(w->dtype));
                break;
            }
            tuna_convert_from_f32(to, f, h, cnt);
            char *dst = (char *)d + (size_t)(r0 * ld + w0) * esz;
            st = padded ? m->ops->upload_2d(m->be, dst, rb, h, wb, wb, (size_t)nr)
                        : m->ops->upload(m->be, dst, h, cnt * esz);
        }
        free(f);
        free(h);
    }
    if (st) return st;
    w->dtype = to;
    w->data = (char *)d + (size_t)w0 * esz;
    if (padded) w->ld = ld;
    if (base) *base = d;
    return TUNA_OK;
}

static tuna_status move_weight(struct tuna_model *m, struct tuna_weight *w, enum tuna_dtype to)
{
    return move_weight_ld(m, w, to, 0, 0, NULL);
}

static tuna_status move_linear(struct tuna_model *m, struct tuna_linear *l, enum tuna_dtype to)
{
    tuna_status st = move_weight(m, &l->w, to);
    if (!st) st = move_vec(m, &l->bias, l->w.rows);
    return st;
}

/* The LoRA fold's columns for a model going to the GPU in dtype dt (0: no fold): opts.lora_fold
 * rounded up to 8, for 16-bit compute on a backend with upload_2d, unless TUNA_LORA_KFOLD=0. */
static int64_t fold_cols(const struct tuna_model *m, const struct tuna_model_opts *opts, enum tuna_dtype dt)
{
    const char *e = getenv("TUNA_LORA_KFOLD");
    if (!opts || opts->lora_fold <= 0 || opts->lora_fold > INT32_MAX || (e && e[0] == '0') || !m->ops->upload_2d)
        return 0; /* (more columns than int32 could never pass move_linear_fold's K >= 4M) */
    if (dt != TUNA_DTYPE_BF16 && dt != TUNA_DTYPE_F16) return 0;
    return (opts->lora_fold + 7) / 8 * 8;
}

/* Moves a layer's q/k/v/gate/up with the LoRA fold's layout (M columns): the rows of the
 * matrices the folded GEMMs read (lora.cu dense_call; docs/LORA.md):
 *   q, gate  [W | B]        ld K + M, W at column 0 (B from column K)
 *   k, up    [B | W]        ld K + M, W at column M (B ends at column M)
 *   v        [W | 0 | B]    ld K + 2M, W at column 0 (B after the zeros q's slots meet)
 * A 4-bit weight, or K not a multiple of 8 or below 4M, stays as it is (unfolded). */
static tuna_status move_linear_fold(struct tuna_model *m, struct tuna_linear *l, enum tuna_dtype to, int64_t M,
                                    int role)
{
    const int64_t K = l->w.cols;
    if (l->w.q4 || K % 8 != 0 || K < 4 * M) return move_linear(m, l, to); /* at most a quarter more */
    const int64_t ld = role == 2 ? K + 2 * M : K + M, w0 = role == 1 ? M : 0;
    tuna_status st = move_weight_ld(m, &l->w, to, ld, w0, &l->fold_base);
    if (!st) l->fold_w0 = w0;
    if (!st) st = move_vec(m, &l->bias, l->w.rows);
    return st;
}

static tuna_status start_cuda(struct tuna_model *m, const struct tuna_model_opts *opts, enum tuna_dtype *dtype)
{
    int dev = opts ? opts->cuda_device : 0;
    struct tuna_cuda_device_info info;
    tuna_status st = tuna_cuda_device_query(dev, &info);
    if (st) return st;
    enum tuna_dtype want = opts ? opts->gpu_dtype : TUNA_DTYPE_INVALID;
    bool bf16_ok = tuna_cuda_supports_bf16(&info);
    if (want == TUNA_DTYPE_INVALID) {
        want = bf16_ok ? TUNA_DTYPE_BF16 : TUNA_DTYPE_F16;
        if (!bf16_ok && !(opts && opts->quiet))
            fprintf(stderr, "tuna: %s has compute capability %d.%d (bfloat16 needs 8.0): computing in float16\n",
                    info.name, info.cc_major, info.cc_minor);
    } else if (want == TUNA_DTYPE_BF16 && !bf16_ok) {
        return tuna_fail(TUNA_E_UNSUPPORTED,
                         "--dtype bfloat16 needs compute capability 8.0 or newer, but GPU %d (%s) has %d.%d; use "
                         "--dtype float16 or --dtype auto",
                         dev, info.name, info.cc_major, info.cc_minor);
    } else if (want != TUNA_DTYPE_F16 && want != TUNA_DTYPE_F32 && want != TUNA_DTYPE_BF16) {
        return tuna_fail(TUNA_E_INVALID, "GPU dtype %s: use auto, bfloat16, float16 or float32", tuna_dtype_name(want));
    }
    if ((st = tuna_cuda_backend_new(dev, &m->be))) return st;
    m->ops = tuna_cuda_backend_ops();
    *dtype = want;
    snprintf(m->device_desc, sizeof m->device_desc, "cuda:%d %s (cc %d.%d), %s", dev, info.name, info.cc_major,
             info.cc_minor, tuna_dtype_torch_name(want));
    if (!(opts && opts->quiet)) fprintf(stderr, "tuna: running on %s\n", m->device_desc);
    return TUNA_OK;
}
#endif

/* Chooses and starts the backend, and moves the model into its memory. */
tuna_status tuna_model_start_backend(struct tuna_model *m, const struct tuna_model_opts *opts, int64_t max_k)
{
    enum tuna_device dev = opts ? opts->device : TUNA_DEVICE_CPU;
#ifdef TUNA_HAVE_CUDA
    if (dev == TUNA_DEVICE_AUTO) dev = tuna_cuda_device_count() > 0 ? TUNA_DEVICE_CUDA : TUNA_DEVICE_CPU;
    if (dev == TUNA_DEVICE_CUDA) {
        enum tuna_dtype dt = TUNA_DTYPE_BF16;
        const int cdev = opts ? opts->cuda_device : 0;
        size_t free_last = 0;
        mem_trace(m, cdev, "before the backend", &free_last);
        tuna_status st = start_cuda(m, opts, &dt);
        if (st) return st;
        mem_trace(m, cdev, "backend made (stream, cuBLAS)", &free_last);
        bool tied = m->lm_head.w.data == m->embed.data;
        /* the embedding has its own buffer (the training memory mode moves it to the host:
           tuna_model_embed_to_host); every other weight and vector goes to the arena */
        if ((st = move_weight(m, &m->embed, dt))) return st;
        mem_trace(m, cdev, "embedding uploaded", &free_last);
        const char *ae = getenv("TUNA_WEIGHT_ARENA");
        const bool want_arena = ae && *ae ? strcmp(ae, "0") != 0 : opts && opts->weight_arena;
        tuna_cuda_arena *arena = NULL;
        if (want_arena && tuna_cuda_arena_new(cdev, 0, &arena) == TUNA_OK) m->dev_arena = arena;
        const int64_t fold = fold_cols(m, opts, dt);
        if (tied) m->lm_head.w = m->embed;
        else if ((st = move_linear(m, &m->lm_head, dt))) return st;
        for (int64_t l = 0; l < m->arch.n_layers && !st; l++) {
            struct tuna_layer *L = &m->layers[l];
            if (!st) st = move_vec(m, &L->attn_norm, m->arch.hidden_size);
            if (!st) st = move_vec(m, &L->mlp_norm, m->arch.hidden_size);
            if (!st) st = move_vec(m, &L->q_norm, m->arch.head_dim);
            if (!st) st = move_vec(m, &L->k_norm, m->arch.head_dim);
            struct tuna_linear *lins[] = {&L->q, &L->k, &L->v, &L->o, &L->gate, &L->up, &L->down};
            /* the LoRA fold's roles (move_linear_fold): 0 q/gate, 1 k/up, 2 v; -1 o/down (never folded) */
            const int role[] = {0, 1, 2, -1, 0, 1, -1};
            for (size_t i = 0; i < sizeof lins / sizeof lins[0] && !st; i++)
                st = fold && role[i] >= 0 ? move_linear_fold(m, lins[i], dt, fold, role[i])
                                          : move_linear(m, lins[i], dt);
            if (!st && fold && L->q.fold_base) m->lora_fold_cols = fold;
        }
        if (!st) st = move_vec(m, &m->final_norm, m->arch.hidden_size);
        if (!st) st = tuna_cuda_sync(m->be);
        mem_trace(m, cdev, "every weight uploaded", &free_last);
        return st;
    }
#else
    if (dev == TUNA_DEVICE_CUDA)
        return tuna_fail(TUNA_E_UNSUPPORTED, "this tuna was built without the CUDA backend (no nvcc at build "
                         "time); rebuild with -DTUNA_CUDA=ON or use --device cpu");
#endif
    m->ops = tuna_cpu_backend_ops();
    tuna_status st = tuna_cpu_backend_new(opts ? opts->threads : 0, &m->be);
    if (st) return st;
    snprintf(m->device_desc, sizeof m->device_desc, "cpu, %d threads", tuna_cpu_backend_threads(m->be));
    return tuna_cpu_backend_reserve(m->be, max_k);
}

static void lora_cache_free(struct tuna_model *m);

/* Frees what the backend holds for the model (device buffers, then the backend itself). */
void tuna_model_stop_backend(struct tuna_model *m)
{
    if (!m->be) return;
    for (int64_t i = 0; i < m->n_dev_allocs; i++) m->ops->release(m->be, m->dev_allocs[i]);
    free(m->dev_allocs);
    m->dev_allocs = NULL;
    m->n_dev_allocs = 0;
#ifdef TUNA_HAVE_CUDA
    if (m->dev_arena) {
        m->ops->sync(m->be); /* queued kernels may still read the weights */
        tuna_cuda_arena_free((tuna_cuda_arena *)m->dev_arena);
        m->dev_arena = NULL;
    }
#endif
    free(m->gpu_q4);
    m->gpu_q4 = NULL;
    m->n_gpu_q4 = 0;
    lora_cache_free(m);
    if (m->ops->host_memory) {
        tuna_cpu_backend_free(m->be);
    } else {
#ifdef TUNA_HAVE_CUDA
        tuna_cuda_backend_free(m->be);
#endif
    }
    m->be = NULL;
}

/* True when p is a device buffer of the model (so the host free() must skip it). */
bool tuna_model_owns_device_ptr(const struct tuna_model *m, const void *p)
{
    for (int64_t i = 0; i < m->n_dev_allocs; i++)
        if (m->dev_allocs[i] == p) return true;
#ifdef TUNA_HAVE_CUDA
    if (tuna_cuda_arena_contains((const tuna_cuda_arena *)m->dev_arena, p)) return true;
#endif
    return false;
}

/* The training memory mode: the embedding table (its own device buffer, see
 * tuna_model_start_backend) moves to `host`, page-locked memory of the table's size that the
 * caller owns; the embedding kernel then reads the looked-up rows through unified addressing. */
tuna_status tuna_model_embed_to_host(struct tuna_model *m, void *host)
{
    if (!m->be || m->ops->host_memory) return tuna_fail(TUNA_E_INVALID, "the embedding is already in host memory");
    if (m->lm_head.w.data == m->embed.data)
        return tuna_fail(TUNA_E_UNSUPPORTED, "the embedding is tied to lm_head: it stays on the GPU");
    int64_t k = -1;
    for (int64_t i = 0; i < m->n_dev_allocs; i++)
        if (m->dev_allocs[i] == m->embed.data) k = i;
    if (k < 0) return tuna_fail(TUNA_E_INTERNAL, "the embedding is not a buffer of its own on the GPU");
    const size_t bytes = tuna_dtype_nbytes(m->embed.dtype, (uint64_t)(m->embed.rows * m->embed.cols));
    tuna_status st = m->ops->download(m->be, host, m->embed.data, bytes);
    if (!st) st = m->ops->sync(m->be);
    if (st) return st;
    m->ops->release(m->be, m->dev_allocs[k]);
    m->dev_allocs[k] = m->dev_allocs[--m->n_dev_allocs];
    m->embed.data = host;
    return TUNA_OK;
}

/* Back to a device buffer of its own (before the caller frees the host table). */
tuna_status tuna_model_embed_to_device(struct tuna_model *m)
{
    if (!m->be || m->ops->host_memory) return TUNA_OK;
#ifndef TUNA_HAVE_CUDA
    return tuna_fail(TUNA_E_INTERNAL, "a device backend without CUDA");
#else
    const size_t bytes = tuna_dtype_nbytes(m->embed.dtype, (uint64_t)(m->embed.rows * m->embed.cols));
    void *d = NULL;
    tuna_status st = dev_alloc_own(m, bytes, &d); /* its own buffer, as at load: it can move again */
    if (!st) st = m->ops->upload(m->be, d, m->embed.data, bytes);
    if (st) return st; /* a buffer already made is tracked and goes with the model */
    m->embed.data = d;
    return TUNA_OK;
#endif
}

int tuna_model_q4_blocksize(const struct tuna_model *m, const struct tuna_weight *w)
{
    if (!w->q4) return 1;
#ifdef TUNA_HAVE_CUDA
    if (m->ops && !m->ops->host_memory) return ((const struct tuna_cuda_q4 *)w->q4)->blocksize;
#else
    (void)m;
#endif
    return ((const struct tuna_q4_weight *)w->q4)->blocksize;
}

uint64_t tuna_model_q4_scale_bytes(const struct tuna_model *m, const struct tuna_weight *w)
{
    if (!w->q4) return 0;
    const int64_t bs = tuna_model_q4_blocksize(m, w);
    const uint64_t blocks = (uint64_t)((w->rows * w->cols + bs - 1) / bs);
#ifdef TUNA_HAVE_CUDA
    if (m->ops && !m->ops->host_memory) {
        const struct tuna_cuda_q4 *d = (const struct tuna_cuda_q4 *)w->q4;
        if (!d->absmax) /* double-quantized: a byte per block, a float per 2^shift blocks, the code table */
            return blocks + ((blocks + ((uint64_t)1 << d->nested_shift) - 1) >> d->nested_shift) * sizeof(float) +
                   256 * sizeof(float);
    }
#endif
    return blocks * sizeof(float); /* float32 absmax per block */
}

/* --- LoRA adapters on the GPU: each adapted linear holds its device view (lin->lora_dev: a
 * struct tuna_lora_bank whose descriptors, A and B live in one backend buffer per linear, A and B
 * in the model's compute dtype: bf16/f16 in 16-bit mode, float32 in float32 mode and on the CPU).
 * Views are made on first use (or by tuna_model_lora_prepare) and all dropped by
 * tuna_model_lora_invalidate, which attach/detach call: a reload whose arrays land at the old
 * addresses gets fresh uploads. Every invalidate bumps the cache's generation, which keys the
 * CUDA graphs of steps with adapters (forward.c): a graph never outlives the views it reads. */
struct lora_dev_view {
    struct tuna_linear *lin;
    void *buf; /* backend memory: descriptors [n], then A [r, K] and B [N, r] of each adapter */
};
struct tuna_lora_dev_cache {
    struct lora_dev_view *v;
    int64_t n, cap;
    uint64_t gen; /* bumped by every invalidate */
    size_t bytes; /* backend memory the views hold (lora_views_make's buffers) */
};

/* Frees the views (not the cache and its generation). */
static void lora_views_free(struct tuna_model *m)
{
    struct tuna_lora_dev_cache *c = m->lora_dev;
    for (int64_t i = 0; c && i < c->n; i++) {
        m->ops->release(m->be, c->v[i].buf);
        free(c->v[i].lin->lora_dev);
        c->v[i].lin->lora_dev = NULL;
        c->v[i].lin->lora_dev_src = NULL;
    }
    if (c) c->n = 0, c->bytes = 0;
}

static void lora_cache_free(struct tuna_model *m)
{
    if (!m->lora_dev) return;
    lora_views_free(m);
    free(m->lora_dev->v);
    free(m->lora_dev);
    m->lora_dev = NULL;
}

static struct tuna_lora_dev_cache *lora_cache(struct tuna_model *m)
{
    if (!m->lora_dev) m->lora_dev = calloc(1, sizeof *m->lora_dev);
    return m->lora_dev;
}

void tuna_model_lora_invalidate(struct tuna_model *m)
{
    if (!m) return;
    struct tuna_lora_dev_cache *c = lora_cache(m);
    if (!c) return; /* out of memory: nothing was ever made either */
    if (c->n) {
        m->ops->sync(m->be); /* queued kernels may still read the buffers */
        lora_views_free(m);
    }
    c->gen++;
}

uint64_t tuna_model_lora_generation(const struct tuna_model *m)
{
    return m->lora_dev ? m->lora_dev->gen : 0;
}

/* The dtype of a view's A and B: the weights' compute dtype on a GPU (the embedding was converted
 * to it at load), float32 on the CPU. */
static enum tuna_dtype lora_view_dtype(const struct tuna_model *m)
{
    if (m->ops->host_memory) return TUNA_DTYPE_F32;
    enum tuna_dtype d = m->embed.dtype;
    return d == TUNA_DTYPE_BF16 || d == TUNA_DTYPE_F16 ? d : TUNA_DTYPE_F32;
}

static size_t align256(size_t n) { return (n + 255) & ~(size_t)255; }

/* The LoRA fold of one group's views (q/k/v or gate/up; docs/LORA.md): where each linear's B
 * goes in its folded rows and where its GEMM meets the packed rows [hm_k | x | hm_q | hm_v]
 * (gate/up: [hm_up | x | hm_gate]) that lora.cu's dense_call builds per token. */
struct fold_geom {
    int role;          /* 0 q/gate (hm after x), 1 k/up (hm before x), 2 v (hm after q's) */
    int64_t ld;        /* the folded rows' length */
    int64_t tail0, tw; /* the columns outside W: [tail0, tail0 + tw) */
    int64_t bcol;      /* B's first column (slot 0) */
    const void *w, *B_all;
    int64_t k, xoff, hcol, xcol, stride;
};

/* Whether a group's slots (ru = n * rs columns) fit the fold's columns. lora_fold_cols > 0 only
 * on a backend that folded at load (fold_cols: not the CPU, upload_2d present). */
static bool fold_holds(const struct tuna_model *m, int64_t ru)
{
    return m->lora_fold_cols > 0 && ru <= m->lora_fold_cols;
}

/* Whether the group's views fold, and where (fg[i] per linear): every linear folded at load in
 * the views' dtype with its slots (n * rs) inside the fold's columns, roles all different, and a
 * backend that uploads rows (upload_2d). */
static bool fold_plan(const struct tuna_model *m, struct tuna_linear *const *lins, int k, int64_t rs,
                      enum tuna_dtype dt, struct fold_geom *fg)
{
    const int64_t M = m->lora_fold_cols;
    if (!fold_holds(m, 0)) return false;
    const int64_t K = lins[0]->w.cols;
    int64_t ru[3] = {0, 0, 0};
    int seen = 0;
    for (int i = 0; i < k; i++) {
        const struct tuna_linear *l = lins[i];
        const int64_t RU = (int64_t)l->n_lora * rs;
        if (!l->fold_base || l->w.dtype != dt || !fold_holds(m, RU)) return false;
        const int64_t ld = tuna_weight_ld(&l->w);
        const int role = l->fold_w0 == M ? 1 : ld == K + 2 * M ? 2 : 0;
        if (seen & (1 << role)) return false;
        seen |= 1 << role;
        fg[i].role = role;
        fg[i].ld = ld;
        ru[role] = RU;
    }
    const size_t esz = tuna_dtype_nbytes(dt, 1);
    const int64_t xcol = ru[1], stride = ru[1] + K + ru[0] + ru[2];
    for (int i = 0; i < k; i++) {
        struct fold_geom *g = &fg[i];
        const char *base = lins[i]->fold_base;
        const int64_t RU = ru[g->role];
        g->xcol = xcol;
        g->stride = stride;
        if (g->role == 1) { /* [B | W]: B ends where W starts; the GEMM starts at B */
            g->tail0 = 0, g->tw = M, g->bcol = M - RU;
            g->w = base + (size_t)g->bcol * esz;
            g->k = RU + K, g->xoff = 0, g->hcol = 0;
        } else if (g->role == 0) { /* [W | B] */
            g->tail0 = K, g->tw = M, g->bcol = K;
            g->w = base;
            g->k = K + RU, g->xoff = xcol, g->hcol = xcol + K;
        } else { /* [W | 0 for q's hm | B] */
            g->tail0 = K, g->tw = 2 * M, g->bcol = K + ru[0];
            g->w = base;
            g->k = K + ru[0] + RU, g->xoff = xcol, g->hcol = xcol + K + ru[0];
        }
        g->B_all = base + (size_t)g->bcol * esz;
    }
    return true;
}

/* Writes a folded linear's columns outside W: zeros, and B_all (bt [N, RU] float32, slot a at
 * columns a*rs..) from column g->bcol, in the weight's dtype. Every column outside W is
 * rewritten, so what earlier adapters left there never meets a packed row. */
static tuna_status fold_write_b(struct tuna_model *m, const struct tuna_linear *l, const struct fold_geom *g,
                                const float *bt, int64_t RU, enum tuna_dtype dt)
{
    const int64_t N = l->w.rows, tw = g->tw, b0 = g->bcol - g->tail0;
    const size_t esz = tuna_dtype_nbytes(dt, 1);
    float *f = calloc((size_t)(N * tw), sizeof(float));
    void *h = malloc((size_t)(N * tw) * esz);
    tuna_status st = !f || !h ? tuna_fail_oom("LoRA fold columns", (size_t)(N * tw) * (4 + esz)) : TUNA_OK;
    for (int64_t j = 0; !st && bt && j < N; j++) memcpy(f + j * tw + b0, bt + j * RU, (size_t)RU * sizeof(float));
    if (!st && !tuna_convert_from_f32(dt, f, h, (size_t)(N * tw)))
        st = tuna_fail(TUNA_E_UNSUPPORTED, "LoRA fold: cannot convert adapters to %s", tuna_dtype_name(dt));
    if (!st)
        st = m->ops->upload_2d(m->be, (char *)l->fold_base + (size_t)g->tail0 * esz, (size_t)g->ld * esz, h,
                               (size_t)tw * esz, (size_t)tw * esz, (size_t)N);
    free(f);
    free(h);
    return st;
}

/* Makes the device views of k <= 3 linears of one input (q/k/v, gate/up; or one) in one buffer:
 * each linear's descriptors, then the A_all [n * rs, K] of the k linears back to back (adapter a's A
 * in the rows of slot a, its descriptor's A pointing there, ranks r..rs zero: one GEMM can shrink
 * for all k linears at once), then each B_all [N, n * rs] (slot a = columns a*rs..: its
 * descriptor's B points there, rows n * rs apart; until the sixteenth session each adapter also
 * had a copy of its own B [N, r], a third of the views' memory); built on the host and uploaded at
 * once. rs = the largest rank of the k linears rounded up to 8. The first view owns the buffer. */
static tuna_status lora_views_make(struct tuna_model *m, struct tuna_linear *const *lins, int k)
{
    struct tuna_lora_dev_cache *c = lora_cache(m);
    if (!c) return tuna_fail_oom("LoRA device views", sizeof *m->lora_dev);
    if (c->n + k > c->cap) {
        int64_t nc = c->cap ? c->cap * 2 : 64;
        struct lora_dev_view *nv = realloc(c->v, (size_t)nc * sizeof *nv);
        if (!nv) return tuna_fail_oom("LoRA device views", (size_t)nc * sizeof *nv);
        c->v = nv;
        c->cap = nc;
    }
    const enum tuna_dtype dt = lora_view_dtype(m);
    const size_t esz = tuna_dtype_nbytes(dt, 1);
    const int64_t K = lins[0]->w.cols;
    int64_t max_r = 0;
    for (int i = 0; i < k; i++) {
        if (lins[i]->n_lora <= 0 || lins[i]->w.cols != K)
            return tuna_fail(TUNA_E_INTERNAL, "a LoRA device view of a linear without adapters or another input");
        for (int a = 0; a < lins[i]->n_lora; a++)
            if (lins[i]->lora[a].r > max_r) max_r = lins[i]->lora[a].r;
    }
    const int64_t rs = (max_r + 7) / 8 * 8;
    /* the LoRA fold: B goes into the folded weights' rows instead of the view (fold_plan) */
    struct fold_geom fg[3];
    const bool fold = fold_plan(m, lins, k, rs, dt, fg);
    size_t o_desc[3], o_a[3], o_b[3], total = 0;
    for (int i = 0; i < k; i++) {
        o_desc[i] = total;
        total += align256((size_t)lins[i]->n_lora * sizeof(struct tuna_lora_w));
    }
    for (int i = 0; i < k; i++) {
        o_a[i] = total;
        total += (size_t)(lins[i]->n_lora * rs * K) * esz;
    }
    total = align256(total);
    for (int i = 0; i < k; i++) {
        o_b[i] = total;
        if (!fold) total += align256((size_t)(lins[i]->w.rows * lins[i]->n_lora * rs) * esz);
    }
    struct tuna_lora_bank *set[3] = {NULL, NULL, NULL};
    bool ok = true;
    for (int i = 0; i < k; i++) ok = ok && (set[i] = calloc(1, sizeof *set[i])) != NULL;
    char *host = ok ? malloc(total) : NULL;
    if (!host) {
        for (int i = 0; i < k; i++) free(set[i]);
        return tuna_fail_oom("LoRA device view", total);
    }
    void *buf = NULL;
    tuna_status st = m->ops->alloc(m->be, total, &buf);
    if (st) {
        for (int i = 0; i < k; i++) free(set[i]);
        free(host);
        return tuna_fail_prefix(st, "LoRA adapters on the GPU (%.1f MiB for one layer)", (double)total / 1048576.0);
    }
    memset(host, 0, total);
    for (int i = 0; i < k && !st; i++) {
        const struct tuna_linear *lin = lins[i];
        const int n = lin->n_lora;
        const int64_t N = lin->w.rows, RU = n * rs;
        struct tuna_lora_w *desc = (struct tuna_lora_w *)(host + o_desc[i]);
        float *bt = RU > 0 ? calloc((size_t)(N * RU), sizeof(float)) : NULL;
        if (RU > 0 && !bt) {
            st = tuna_fail_oom("LoRA device view", (size_t)(N * RU) * sizeof(float));
            break;
        }
        for (int a = 0; a < n && !st; a++) {
            const struct tuna_lora *h = &lin->lora[a];
            desc[a] = (struct tuna_lora_w){NULL, NULL, h->r, h->scale, 0};
            if (h->r == 0) continue; /* an adapter that leaves this linear alone */
            const size_t na = (size_t)(h->r * K), o_slot = o_a[i] + (size_t)(a * rs * K) * esz;
            if (!tuna_convert_from_f32(dt, h->A, host + o_slot, na)) {
                st = tuna_fail(TUNA_E_UNSUPPORTED, "LoRA view: cannot convert adapters to %s", tuna_dtype_name(dt));
                break;
            }
            for (int64_t j = 0; j < N; j++) memcpy(bt + j * RU + a * rs, h->B + j * h->r, (size_t)h->r * sizeof(float));
            /* A and B in the slot of the dense form: B's rows RU elements apart (no copy of its own);
             * folded: B in the weight's rows, fold_ld apart */
            desc[a].A = (char *)buf + o_slot;
            desc[a].B = fold ? (const char *)fg[i].B_all + (size_t)(a * rs) * esz
                             : (const char *)buf + o_b[i] + (size_t)(a * rs) * esz;
            desc[a].ldb = fold ? fg[i].ld : RU;
        }
        if (!st && fold) st = fold_write_b(m, lins[i], &fg[i], bt, RU, dt);
        else if (!st && bt && !tuna_convert_from_f32(dt, bt, host + o_b[i], (size_t)(N * RU)))
            st = tuna_fail(TUNA_E_UNSUPPORTED, "LoRA view: cannot convert adapters to %s", tuna_dtype_name(dt));
        free(bt);
        *set[i] = (struct tuna_lora_bank){.n = n,
                                          .max_r = max_r,
                                          .dtype = dt,
                                          .w = (const struct tuna_lora_w *)((char *)buf + o_desc[i]),
                                          .A_all = RU ? (char *)buf + o_a[i] : NULL,
                                          .B_all = RU ? (fold ? fg[i].B_all : (char *)buf + o_b[i]) : NULL,
                                          .rs = rs};
        if (fold && RU) {
            struct tuna_lora_bank *b = set[i];
            b->fold_w = fg[i].w;
            b->fold_ld = fg[i].ld;
            b->fold_k = fg[i].k;
            b->fold_xoff = fg[i].xoff;
            b->fold_hcol = fg[i].hcol;
            b->fold_xcol = fg[i].xcol;
            b->fold_stride = fg[i].stride;
        }
    }
    if (!st) st = m->ops->upload(m->be, buf, host, total);
    free(host);
    if (st) {
        m->ops->release(m->be, buf);
        for (int i = 0; i < k; i++) free(set[i]);
        return st;
    }
    c->bytes += total;
    for (int i = 0; i < k; i++) {
        c->v[c->n].lin = lins[i];
        c->v[c->n].buf = i == 0 ? buf : NULL;
        c->n++;
        lins[i]->lora_dev = set[i];
        lins[i]->lora_dev_src = lins[i]->lora;
    }
    return TUNA_OK;
}

size_t tuna_model_lora_view_bytes(const struct tuna_model *m, int slots, int64_t r)
{
    if (slots <= 0 || r <= 0) return 0;
    const struct tuna_arch *a = &m->arch;
    const size_t esz = tuna_dtype_nbytes(lora_view_dtype(m), 1), n = (size_t)slots, rs = (size_t)((r + 7) / 8 * 8);
    const size_t C = (size_t)a->hidden_size, Q = (size_t)(a->n_heads * a->head_dim);
    const size_t KV = (size_t)(a->n_kv_heads * a->head_dim), I = (size_t)a->intermediate_size;
    /* lora_views_make's groups: q/k/v, o, gate/up, down (K, and N of each linear) */
    const struct {
        size_t K;
        int k;
        size_t N[3];
    } g[4] = {{C, 3, {Q, KV, KV}}, {Q, 1, {C, 0, 0}}, {C, 2, {I, I, 0}}, {I, 1, {C, 0, 0}}};
    size_t layer = 0;
    for (int gi = 0; gi < 4; gi++) {
        size_t t = 0;
        for (int i = 0; i < g[gi].k; i++) t += align256(n * sizeof(struct tuna_lora_w));
        for (int i = 0; i < g[gi].k; i++) t += n * rs * g[gi].K * esz; /* A_all */
        t = align256(t);
        /* B_all, unless the fold keeps it in the weights' rows (q/k/v, gate/up: fold_plan) */
        const bool folded = (gi == 0 || gi == 2) && fold_holds(m, (int64_t)(n * rs));
        for (int i = 0; i < g[gi].k && !folded; i++) t += align256(g[gi].N[i] * n * rs * esz);
        /* one allocation per group: on a GPU, cudaMalloc's 2 MiB granularity */
        if (!m->ops->host_memory) t = (t + ((size_t)2 << 20) - 1) / ((size_t)2 << 20) * ((size_t)2 << 20);
        layer += t;
    }
    return layer * (size_t)a->n_layers;
}

size_t tuna_model_lora_view_bytes_made(const struct tuna_model *m)
{
    return m->lora_dev ? m->lora_dev->bytes : 0;
}

static tuna_status lora_views_all(struct tuna_model *m);

static bool view_fresh(const struct tuna_linear *lin)
{
    return lin->lora_dev && lin->lora_dev_src == lin->lora;
}

const struct tuna_lora_bank *tuna_model_lora_on_device(struct tuna_model *m, const struct tuna_linear *lin)
{
    if (view_fresh(lin)) return lin->lora_dev;
    /* every view at once (q/k/v and gate/up grouped): the view is a cache the model owns */
    return lora_views_all(m) || !view_fresh(lin) ? NULL : lin->lora_dev;
}

tuna_status tuna_model_lora_prepare(struct tuna_model *m)
{
    if (m->ops->host_memory) return TUNA_OK; /* the CPU reads the attached arrays */
    return lora_views_all(m);
}

/* Makes every missing view, q/k/v and gate/up of a layer grouped (lora_views_make). */
static tuna_status lora_views_all(struct tuna_model *m)
{
    /* a view that no longer matches its linear's adapters: drop them all (attach/detach did not) */
    for (int64_t l = -1; l < m->arch.n_layers; l++) {
        struct tuna_layer *L = l >= 0 ? &m->layers[l] : NULL;
        struct tuna_linear *all[7] = {&m->lm_head};
        const int na = L ? 7 : 1;
        if (L) {
            struct tuna_linear *ll[7] = {&L->q, &L->k, &L->v, &L->o, &L->gate, &L->up, &L->down};
            memcpy(all, ll, sizeof ll);
        }
        for (int i = 0; i < na; i++)
            if (all[i]->lora_dev && !view_fresh(all[i])) {
                tuna_model_lora_invalidate(m);
                l = m->arch.n_layers; /* done: every view is gone */
                break;
            }
    }
    for (int64_t l = -1; l < m->arch.n_layers; l++) {
        struct tuna_layer *L = l >= 0 ? &m->layers[l] : NULL;
        /* groups of one input: q/k/v, o, gate/up, down (lm_head alone) */
        struct tuna_linear *groups[4][3] = {{&m->lm_head}};
        int gn[4] = {1, 0, 0, 0}, ng = 1;
        if (L) {
            struct tuna_linear *g[4][3] = {{&L->q, &L->k, &L->v}, {&L->o}, {&L->gate, &L->up}, {&L->down}};
            memcpy(groups, g, sizeof g);
            gn[0] = 3, gn[1] = 1, gn[2] = 2, gn[3] = 1;
            ng = 4;
        }
        for (int gi = 0; gi < ng; gi++) {
            struct tuna_linear *todo[3];
            int k = 0;
            for (int i = 0; i < gn[gi]; i++)
                if (groups[gi][i]->n_lora > 0 && !view_fresh(groups[gi][i])) todo[k++] = groups[gi][i];
            if (k == 0) continue;
            tuna_status st = lora_views_make(m, todo, k);
            if (st) return st;
        }
    }
    return TUNA_OK;
}
