/* rope_freq.c — see rope_freq.h. Each case mirrors transformers' _compute_<type>_rope_parameters. */
#include "model/rope_freq.h"

#include <math.h>

int64_t tuna_rope_rot_dim(const struct tuna_arch *a)
{
    double f = a->rope.partial_rotary_factor > 0 ? a->rope.partial_rotary_factor : 1.0;
    int64_t d = (int64_t)((double)a->head_dim * f);
    return d & ~(int64_t)1;
}

/* 1 / base ** (arange(0, dim, 2).float() / dim), all float32 */
static void default_freq(double base, int64_t dim, float *inv)
{
    for (int64_t i = 0; i < dim / 2; i++) {
        float e = (float)(2 * i) / (float)dim;
        inv[i] = 1.0f / powf((float)base, e);
    }
}

static double yarn_mscale(double scale, double m)
{
    return scale <= 1 ? 1.0 : 0.1 * m * log(scale) + 1.0;
}

static double yarn_corr_dim(double rot, int64_t dim, double base, double maxpos)
{
    return ((double)dim * log(maxpos / (rot * 2 * M_PI))) / (2 * log(base));
}

static void yarn(const struct tuna_arch *a, int64_t dim, float *inv, float *attn_factor)
{
    const struct tuna_rope *r = &a->rope;
    double base = r->theta, factor = r->factor;
    double orig = r->original_max_pos > 0 ? (double)r->original_max_pos : (double)a->max_position_embeddings;
    double af = r->attention_factor;
    if (af <= 0) {
        if (r->mscale > 0 && r->mscale_all_dim > 0)
            af = yarn_mscale(factor, r->mscale) / yarn_mscale(factor, r->mscale_all_dim);
        else
            af = yarn_mscale(factor, 1.0);
    }
    double beta_fast = r->beta_fast > 0 ? r->beta_fast : 32, beta_slow = r->beta_slow > 0 ? r->beta_slow : 1;
    double low = yarn_corr_dim(beta_fast, dim, base, orig), high = yarn_corr_dim(beta_slow, dim, base, orig);
    if (r->truncate) {
        low = floor(low);
        high = ceil(high);
    }
    if (low < 0) low = 0;
    if (high > (double)(dim - 1)) high = (double)(dim - 1);
    if (low == high) high += 0.001;
    for (int64_t i = 0; i < dim / 2; i++) {
        float pos_freq = powf((float)base, (float)(2 * i) / (float)dim);
        float extra = 1.0f / pos_freq;
        float inter = 1.0f / ((float)factor * pos_freq);
        float ramp = ((float)i - (float)low) / (float)(high - low);
        ramp = ramp < 0 ? 0 : ramp > 1 ? 1 : ramp;
        float extra_factor = 1.0f - ramp;
        inv[i] = inter * (1.0f - extra_factor) + extra * extra_factor;
    }
    *attn_factor = (float)af;
}

static void llama3(const struct tuna_rope *r, int64_t dim, float *inv)
{
    default_freq(r->theta, dim, inv);
    float factor = (float)r->factor, lf = (float)r->low_freq_factor, hf = (float)r->high_freq_factor;
    float old = (float)r->original_max_pos;
    double low_wl = (double)r->original_max_pos / r->low_freq_factor;
    double high_wl = (double)r->original_max_pos / r->high_freq_factor;
    for (int64_t i = 0; i < dim / 2; i++) {
        float wl = (float)(2 * M_PI) / inv[i];
        float f = (double)wl > low_wl ? inv[i] / factor : inv[i];
        float smooth = (old / wl - lf) / (hf - lf);
        float smoothed = (1.0f - smooth) * f / factor + smooth * f;
        bool medium = !((double)wl < high_wl) && !((double)wl > low_wl);
        inv[i] = medium ? smoothed : f;
    }
}

void tuna_rope_inv_freq(const struct tuna_arch *a, int64_t seq_len, float *inv, float *attn_factor)
{
    const struct tuna_rope *r = &a->rope;
    int64_t dim = tuna_rope_rot_dim(a);
    *attn_factor = 1.0f;
    switch (r->type) {
    case TUNA_ROPE_LINEAR:
        default_freq(r->theta, dim, inv);
        for (int64_t i = 0; i < dim / 2; i++) inv[i] /= (float)r->factor;
        break;
    case TUNA_ROPE_DYNAMIC: {
        double maxpos = (double)a->max_position_embeddings;
        double sl = (double)seq_len > maxpos ? (double)seq_len : maxpos;
        double base = r->theta * pow((r->factor * sl / maxpos) - (r->factor - 1), (double)dim / (double)(dim - 2));
        default_freq(base, dim, inv);
        break;
    }
    case TUNA_ROPE_LLAMA3:
        llama3(r, dim, inv);
        break;
    case TUNA_ROPE_YARN:
        yarn(a, dim, inv, attn_factor);
        break;
    default:
        default_freq(r->theta, dim, inv);
        break;
    }
}
