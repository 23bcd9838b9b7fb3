/* embedding.c — rows of the embedding matrix converted to float32 and scaled (Gemma multiplies by
 * sqrt(hidden) computed in the compute dtype; the caller passes that float32 value). */
#include <assert.h>

#include "backend/cpu/cpu_internal.h"
#include "core/dtype.h"

void tuna_cpu_embedding(tuna_backend *be, float *out, const int32_t *ids, int64_t T,
                        const struct tuna_weight *emb, float scale)
{
    const int64_t C = emb->cols;
    size_t esz = (size_t)tuna_dtype_bits(emb->dtype) / 8;
    for (int64_t t = 0; t < T; t++) {
        assert(ids[t] >= 0 && ids[t] < emb->rows);
        const char *row = (const char *)emb->data + (size_t)ids[t] * (size_t)C * esz;
        float *o = out + t * C;
        bool ok = tuna_convert_to_f32(emb->dtype, row, o, (size_t)C);
        assert(ok);
        (void)ok;
        if (scale != 1.0f)
            for (int64_t i = 0; i < C; i++) o[i] *= scale;
    }
    (void)be;
}
