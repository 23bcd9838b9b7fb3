/* cmd_logits.c — `tuna logits DIR (--ids 1,2,3 | --text T) -o OUT.safetensors`: float32 logits
 * [T, vocab] of every position under the name "logits" (and the ids as "input_ids" int32 [T]). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "core/status.h"
#include "infer_common.h"
#include "io/safetensors.h"
#include "lora/lora.h"

static void usage(FILE *f)
{
    fprintf(f, "usage: tuna logits DIR (--ids 1,2,3 | --text TEXT) -o OUT.safetensors [options]\n\n"
               "Runs the model over the tokens and writes float32 logits [T, vocab] as tensor \"logits\"\n"
               "(and the ids as \"input_ids\") in a safetensors file.\n\n"
               "  --ids LIST     comma-separated token ids\n"
               "  --text TEXT    text, tokenized with special tokens (BOS) as HF encode() does\n"
               "  -o PATH        output file\n"
               "  --lora DIR     apply a PEFT LoRA adapter folder (unmerged)\n");
    infer_flags_help(f, false);
}

int cmd_logits(int argc, char **argv)
{
    const char *dir = NULL, *ids_s = NULL, *text = NULL, *outp = NULL, *lora = NULL;
    struct infer_flags fl;
    infer_flags_init(&fl);
    bool bad = false;
    for (int i = 1; i < argc && !bad; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            usage(stdout);
            return 0;
        }
        if (tuna_cli_opt_str(argc, argv, &i, "--ids", &ids_s, &bad) ||
            tuna_cli_opt_str(argc, argv, &i, "--text", &text, &bad) ||
            tuna_cli_opt_str(argc, argv, &i, "-o", &outp, &bad) ||
            tuna_cli_opt_str(argc, argv, &i, "--lora", &lora, &bad) ||
            tuna_cli_opt_str(argc, argv, &i, "--output", &outp, &bad) || infer_flags_parse(&fl, argc, argv, &i, &bad))
            continue;
        if (argv[i][0] == '-' || dir) {
            fprintf(stderr, "tuna logits: unexpected argument %s\n", argv[i]);
            bad = true;
        } else {
            dir = argv[i];
        }
    }
    if (bad || !dir || !outp || (!ids_s == !text)) {
        if (!bad) fprintf(stderr, "tuna logits: need DIR, -o OUT and exactly one of --ids / --text\n");
        usage(stderr);
        return 2;
    }
    int32_t *ids = NULL;
    int64_t n = 0;
    tuna_status st = TUNA_OK;
    if (ids_s) {
        st = parse_id_list(ids_s, &ids, &n);
    } else {
        tuna_tokenizer *tok;
        st = tuna_tokenizer_load(dir, &tok);
        if (!st) {
            size_t nn = 0;
            st = tuna_tokenizer_encode(tok, text, strlen(text), true, true, &ids, &nn);
            n = (int64_t)nn;
            tuna_tokenizer_free(tok);
        }
    }
    if (st) return tuna_cli_fail("logits", st);
    struct tuna_model *m = NULL;
    tuna_kv_cache *kv = NULL;
    float *logits = NULL;
    tuna_st_writer *w = NULL;
    struct tuna_batch b;
    tuna_batch_init(&b);
    int32_t seq;
    if (n == 0) st = tuna_fail(TUNA_E_INVALID, "no tokens to run");
    struct tuna_lora_set *ls = NULL;
    if (!st) st = tuna_model_load(dir, &fl.model, &m);
    if (!st && lora) st = tuna_lora_set_open(m, &lora, 1, &ls);
    if (!st) st = tuna_model_kv_new(m, n, 0, &kv);
    if (!st) st = tuna_kv_seq_new(kv, &seq);
    if (!st) st = tuna_batch_add_seq(&b, ids, n, seq, 0, true, false);
    if (!st && ls) tuna_lora_batch_use(&b, seq, 0);
    if (!st) {
        logits = malloc(sizeof(float) * (size_t)(n * m->arch.vocab_size));
        if (!logits) st = tuna_fail_oom("logits", sizeof(float) * (size_t)(n * m->arch.vocab_size));
    }
    if (!st) st = tuna_model_forward(m, kv, &b, logits, NULL);
    if (!st) st = tuna_st_writer_new(&w);
    if (!st) {
        int64_t shape[2] = {n, m->arch.vocab_size};
        st = tuna_st_writer_add(w, "logits", TUNA_DTYPE_F32, 2, shape, logits,
                                sizeof(float) * (size_t)(n * m->arch.vocab_size), false);
    }
    if (!st) st = tuna_st_writer_add(w, "input_ids", TUNA_DTYPE_I32, 1, &n, ids, sizeof(int32_t) * (size_t)n, false);
    if (!st) st = tuna_st_writer_save(w, outp);
    if (!st) fprintf(stderr, "wrote logits [%lld, %lld] to %s\n", (long long)n, (long long)m->arch.vocab_size, outp);
    tuna_st_writer_free(w);
    free(logits);
    free(ids);
    tuna_batch_free(&b);
    tuna_kv_free(kv);
    tuna_lora_set_free(m, ls);
    tuna_model_free(m);
    return st ? tuna_cli_fail("logits", st) : 0;
}
