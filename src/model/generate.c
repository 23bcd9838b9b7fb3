/* generate.c — see generate.h. */
#include "model/generate.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/status.h"

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

void tuna_gen_result_free(struct tuna_gen_result *r)
{
    free(r->ids);
    free(r->text);
    memset(r, 0, sizeof *r);
}

bool tuna_gen_is_plain_greedy(const struct tuna_sampling *s)
{
    return s->temperature < 1e-5f && s->repetition_penalty == 1.0f && s->presence_penalty == 0 &&
           s->frequency_penalty == 0;
}

struct textbuf {
    char *s;
    size_t len, cap, emitted;
};

static tuna_status tb_append(struct textbuf *t, const char *p, size_t n)
{
    if (t->len + n + 1 > t->cap) {
        size_t c = t->cap ? t->cap : 256;
        while (c < t->len + n + 1) c *= 2;
        char *ns = realloc(t->s, c);
        if (!ns) return tuna_fail_oom("generated text", c);
        t->s = ns;
        t->cap = c;
    }
    memcpy(t->s + t->len, p, n);
    t->len += n;
    t->s[t->len] = '\0';
    return TUNA_OK;
}

/* Emits text[emitted, upto) through on_text; returns non-zero when the callback asks to stop. */
static int emit(const struct tuna_gen_opts *o, struct textbuf *t, size_t upto)
{
    if (upto <= t->emitted) return 0;
    int r = o->on_text ? o->on_text(o->on_text_ctx, t->s + t->emitted, upto - t->emitted) : 0;
    t->emitted = upto;
    return r;
}

/* Looks for a stop string that ends in the new text; returns its start or -1. */
static long find_stop(const struct tuna_gen_opts *o, const struct textbuf *t, size_t from)
{
    long best = -1;
    for (int i = 0; i < o->n_stop; i++) {
        size_t sl = strlen(o->stop[i]);
        if (!sl) continue;
        size_t start = from > sl ? from - sl + 1 : 0;
        const char *hit = t->len >= start ? strstr(t->s + start, o->stop[i]) : NULL;
        if (hit && (best < 0 || hit - t->s < best)) best = hit - t->s;
    }
    return best;
}

static bool is_stop_id(const struct tuna_gen_opts *o, int32_t id)
{
    for (int i = 0; i < o->n_stop_ids; i++)
        if (o->stop_ids[i] == id) return true;
    return false;
}

tuna_status tuna_generate(struct tuna_model *m, tuna_kv_cache *kv, int32_t seq, const int32_t *prompt,
                          int64_t n_prompt, const struct tuna_gen_opts *o, struct tuna_gen_result *res)
{
    memset(res, 0, sizeof *res);
    const int64_t V = m->arch.vocab_size;
    int64_t cached = tuna_kv_seq_len(kv, seq);
    if (cached < 0) return tuna_fail(TUNA_E_INVALID, "generate: unknown KV sequence %d", seq);
    if (n_prompt <= 0) return tuna_fail(TUNA_E_INVALID, "generate: the prompt is empty");
    if (cached + n_prompt >= m->max_model_len)
        return tuna_fail(TUNA_E_RANGE, "the prompt (%lld tokens%s) leaves no room in the context of %lld tokens "
                         "(max_position_embeddings or --max-model-len)", (long long)(cached + n_prompt),
                         cached ? " with the conversation so far" : "", (long long)m->max_model_len);
    size_t maxstop = 0;
    for (int i = 0; i < o->n_stop; i++)
        if (strlen(o->stop[i]) > maxstop) maxstop = strlen(o->stop[i]);

    tuna_sampler *smp = NULL;
    struct tuna_batch b;
    tuna_batch_init(&b);
    struct textbuf tb = {0};
    float *logits = malloc(sizeof(float) * (size_t)V);
    int64_t cap_ids = 64;
    res->ids = malloc(sizeof(int32_t) * (size_t)cap_ids);
    tuna_status st = (!logits || !res->ids) ? tuna_fail_oom("generate buffers", sizeof(float) * (size_t)V) : TUNA_OK;
    if (!st) st = tuna_sampler_new(&o->sampling, V, &smp);
    if (st) goto done;
    tuna_sampler_reset(smp, prompt, n_prompt);
    res->prompt_tokens = n_prompt;
    res->finish_reason = "length";

    /* plain greedy: only the id crosses from the backend (no [V] logits download per token) */
    const bool greedy = tuna_gen_is_plain_greedy(&o->sampling);
    int32_t gid = 0;
    double t0 = now_s();
    st = tuna_batch_add_seq(&b, prompt, n_prompt, seq, cached, false, true);
    for (int64_t t = 0; t < b.n; t++) b.adapter[t] = o->adapter_plus1 - 1;
    if (!st) st = greedy ? tuna_model_forward_greedy(m, kv, &b, &gid) : tuna_model_forward(m, kv, &b, logits, NULL);
    if (st) goto done;
    res->prefill_seconds = now_s() - t0;
    t0 = now_s();
    int64_t pos = cached + n_prompt;
    for (;;) {
        int32_t id = greedy ? gid : tuna_sampler_sample(smp, logits);
        if (is_stop_id(o, id)) {
            res->finish_reason = "stop";
            break;
        }
        tuna_sampler_accept(smp, id);
        if (res->n == cap_ids) {
            cap_ids *= 2;
            int32_t *ni = realloc(res->ids, sizeof(int32_t) * (size_t)cap_ids);
            if (!ni) {
                st = tuna_fail_oom("generated ids", sizeof(int32_t) * (size_t)cap_ids);
                goto done;
            }
            res->ids = ni;
        }
        res->ids[res->n++] = id;
        if (o->detok) {
            char *piece = NULL;
            if ((st = o->detok(o->detok_ctx, id, &piece))) goto done;
            size_t before = tb.len;
            st = tb_append(&tb, piece ? piece : "", piece ? strlen(piece) : 0);
            free(piece);
            if (st) goto done;
            long hit = o->n_stop ? find_stop(o, &tb, before) : -1;
            if (hit >= 0) {
                tb.len = (size_t)hit;
                tb.s[hit] = '\0';
                emit(o, &tb, tb.len);
                res->finish_reason = "stop";
                break;
            }
            /* hold back what could still become a stop string, on a UTF-8 boundary */
            size_t safe = tb.len > maxstop ? tb.len - (maxstop ? maxstop - 1 : 0) : (maxstop ? 0 : tb.len);
            while (safe > tb.emitted && safe < tb.len && ((unsigned char)tb.s[safe] & 0xC0) == 0x80) safe--;
            if (emit(o, &tb, safe)) {
                res->finish_reason = "abort";
                break;
            }
        }
        if (o->max_tokens > 0 && res->n >= o->max_tokens) break;
        if (pos + 1 >= m->max_model_len) break; /* "length": prompt + output fill the context */
        tuna_batch_clear(&b);
        if ((st = tuna_batch_add(&b, id, seq, pos, true))) goto done;
        b.adapter[b.n - 1] = o->adapter_plus1 - 1;
        st = greedy ? tuna_model_forward_greedy(m, kv, &b, &gid) : tuna_model_forward(m, kv, &b, logits, NULL);
        if (st) goto done;
        pos++;
    }
    if (o->detok && strcmp(res->finish_reason, "abort") != 0) emit(o, &tb, tb.len);
    res->decode_seconds = now_s() - t0;
    if (o->detok) {
        res->text = tb.s ? tb.s : calloc(1, 1);
        tb.s = NULL;
    }
done:
    free(tb.s);
    free(logits);
    tuna_sampler_free(smp);
    tuna_batch_free(&b);
    if (st) tuna_gen_result_free(res);
    return st;
}
