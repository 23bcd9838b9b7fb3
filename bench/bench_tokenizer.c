/* bench_tokenizer.c — one-thread encode/decode speed of the tokenizer on a few MB of text.
 *
 * usage: bench_tokenizer [TOKENIZER_DIR ...]
 * Without arguments it uses the fixture tokenizers (../shared/fixtures). The text is the pymini
 * held-out Python file plus the peers' prompt files, repeated to about 4 MB; it is encoded as one
 * string (so the word cache warms up as it would on a long document) and in 4 KB chunks from a
 * fresh tokenizer. Prints one table: MB/s and tokens/s for each. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/file.h"
#include "tokenizer/tokenizer.h"

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts); /* CPU time: stable on a shared machine */
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static char *shared_path(const char *rel)
{
    const char *env = getenv("TUNA_SHARED_DIR");
    char buf[4096];
    snprintf(buf, sizeof buf, "%s/%s", env ? env : TUNA_SOURCE_DIR "/../shared", rel);
    return strdup(buf);
}

static char *build_text(size_t target, size_t *len)
{
    static const char *files[] = {"fixtures/models/pymini/heldout.txt", "peers/ggml/examples/prompts/gpt-2.txt",
                                  "peers/ggml/examples/prompts/starcoder.txt", "peers/llama.cpp/models/ggml-vocab-llama-spm.gguf.inp"};
    char *base = NULL;
    size_t bn = 0;
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        char *p = shared_path(files[i]), *d;
        size_t n;
        if (tuna_read_file(p, 0, &d, &n) == TUNA_OK) {
            base = realloc(base, bn + n + 1);
            memcpy(base + bn, d, n);
            bn += n;
            free(d);
        }
        free(p);
    }
    if (!bn) return NULL;
    char *t = malloc(target + bn + 1);
    size_t n = 0;
    while (n < target) {
        memcpy(t + n, base, bn);
        n += bn;
    }
    t[n] = '\0';
    free(base);
    *len = n;
    return t;
}

static void bench_one(const char *dir, const char *text, size_t len)
{
    tuna_tokenizer *t = NULL;
    if (tuna_tokenizer_load(dir, &t) != TUNA_OK) {
        fprintf(stderr, "%s: %s\n", dir, tuna_last_error());
        return;
    }
    const char *name = strrchr(dir, '/') ? strrchr(dir, '/') + 1 : dir;
    /* chunked, cold cache */
    double t0 = now();
    size_t ntok = 0;
    for (size_t off = 0; off < len;) {
        size_t n = len - off < 4096 ? len - off : 4096;
        while (off + n < len && ((unsigned char)text[off + n] & 0xC0) == 0x80) n--; /* whole characters */
        int32_t *ids;
        size_t k;
        if (tuna_tokenizer_encode(t, text + off, n, false, true, &ids, &k) != TUNA_OK) {
            fprintf(stderr, "%s: %s\n", name, tuna_last_error());
            break;
        }
        ntok += k;
        free(ids);
        off += n;
    }
    double t1 = now();
    /* whole text, warm cache */
    int32_t *ids = NULL;
    size_t k = 0;
    tuna_tokenizer_encode(t, text, len, false, true, &ids, &k);
    double t2 = now();
    char *dec = NULL;
    tuna_tokenizer_decode(t, ids, k, false, &dec);
    double t3 = now();
    int same = dec && strlen(dec) == len && memcmp(dec, text, len) == 0;
    printf("%-12s %10zu %14.1f %14.1f %14.1f %12.2f %s\n", name, k, len / 1e6 / (t1 - t0), len / 1e6 / (t2 - t1),
           len / 1e6 / (t3 - t2), (double)len / (double)(k ? k : 1), same ? "yes" : "NO");
    (void)ntok;
    free(dec);
    free(ids);
    tuna_tokenizer_free(t);
}

int main(int argc, char **argv)
{
    size_t len;
    char *text = build_text(4u << 20, &len);
    if (!text) {
        fprintf(stderr, "bench_tokenizer: no text found under ../shared (set TUNA_SHARED_DIR)\n");
        return 1;
    }
    printf("text: %.2f MB, one thread, rates over thread CPU time\n", len / 1e6);
    printf("%-12s %10s %14s %14s %14s %12s %s\n", "tokenizer", "tokens", "enc MB/s 4KB", "enc MB/s all", "dec MB/s",
           "bytes/token", "round trip");
    if (argc > 1) {
        for (int i = 1; i < argc; i++) bench_one(argv[i], text, len);
    } else {
        static const char *dirs[] = {"fixtures/tokenizers/bpe-4k", "fixtures/tokenizers/spm-1k", "fixtures/models/pymini",
                                     "fixtures/models/qwen2-tiny", "peers/onnxruntime-extensions/test/data/llama2",
                                     "peers/onnxruntime-extensions/test/data/falcon-tokenizer"};
        for (size_t i = 0; i < sizeof dirs / sizeof dirs[0]; i++) {
            char *p = shared_path(dirs[i]);
            bench_one(p, text, len);
            free(p);
        }
    }
    free(text);
    return 0;
}
