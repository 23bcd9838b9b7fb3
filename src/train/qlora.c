/* qlora.c — `--load-in-4bit` on a 16-bit base: the seven projections of every layer are
 * quantized in memory to NF4 with double quantization and block size 64 (bitsandbytes'
 * quantize_4bit, as transformers' BitsAndBytesConfig(load_in_4bit=True, nf4, double quant) and
 * Unsloth load them); embeddings, norms and lm_head stay as stored. The 4-bit states are
 * appended to the model's own table (m->q4), so tuna_model_free releases them.
 */
#include <stdlib.h>

#include "core/status.h"
#include "quant/nf4.h"
#include "train/trainer.h"

static tuna_status quantize_linear(struct tuna_model *m, struct tuna_linear *lin, enum tuna_dtype compute)
{
    if (lin->w.q4) return TUNA_OK; /* already 4-bit (a bitsandbytes checkpoint) */
    struct tuna_q4_weight **nq = realloc(m->q4, sizeof *nq * (size_t)(m->n_q4 + 1));
    if (!nq) return tuna_fail_oom("4-bit weight table", sizeof *nq * (size_t)(m->n_q4 + 1));
    m->q4 = nq;
    struct tuna_q4_weight *q = calloc(1, sizeof *q);
    if (!q) return tuna_fail_oom("4-bit weight", sizeof *q);
    tuna_status st =
        tuna_q4_quantize(lin->w.data, lin->w.dtype, lin->w.rows, lin->w.cols, TUNA_Q4_NF4, 64, true, compute, q);
    if (st) {
        free(q);
        return st;
    }
    m->q4[m->n_q4++] = q;
    lin->w.dtype = TUNA_DTYPE_NF4;
    lin->w.data = q->codes;
    lin->w.q4 = q;
    return TUNA_OK;
}

tuna_status tuna_train_quantize_base(struct tuna_model *m)
{
    if (!m->ops->host_memory)
        return tuna_fail(TUNA_E_UNSUPPORTED, "--load-in-4bit quantizes on the CPU backend only so far");
    for (int64_t l = 0; l < m->arch.n_layers; l++) {
        struct tuna_layer *L = &m->layers[l];
        struct tuna_linear *lins[] = {&L->q, &L->k, &L->v, &L->o, &L->gate, &L->up, &L->down};
        for (size_t i = 0; i < sizeof lins / sizeof lins[0]; i++) {
            /* float32 quant_state dtype: dequantized values are used as they are, in float32 */
            tuna_status st = quantize_linear(m, lins[i], TUNA_DTYPE_F32);
            if (st) return tuna_fail_prefix(st, "--load-in-4bit: layer %lld", (long long)l);
        }
    }
    return TUNA_OK;
}
