/* loras.c — the served adapters' slots. Spec: loras.h. */
#include "serve/loras.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "core/status.h"

tuna_status tuna_serve_loras_init(struct tuna_serve_loras *L, int max_loras, int64_t max_rank, const char *lora_root)
{
    memset(L, 0, sizeof *L);
    if (max_loras < 1 || max_loras > 64)
        return tuna_fail(TUNA_E_INVALID, "--max-loras must be 1..64, got %d", max_loras);
    if (max_rank < 1) return tuna_fail(TUNA_E_INVALID, "--max-lora-rank must be >= 1, got %lld", (long long)max_rank);
    if (lora_root) {
        char *r = realpath(lora_root, NULL);
        struct stat sb;
        if (!r || stat(r, &sb) != 0 || !S_ISDIR(sb.st_mode)) {
            free(r);
            return tuna_fail(TUNA_E_NOT_FOUND, "--lora-root %s is not a folder (%s)", lora_root,
                             errno ? strerror(errno) : "not a directory");
        }
        L->root = r;
    }
    L->slots = calloc((size_t)max_loras, sizeof *L->slots);
    if (!L->slots) {
        free(L->root);
        L->root = NULL;
        return tuna_fail_oom("adapter slots", (size_t)max_loras);
    }
    L->n_slots = max_loras;
    L->max_rank = max_rank;
    L->next_key = 1 << 20; /* away from the small indices and -1 (base model) */
    pthread_mutex_init(&L->mu, NULL);
    pthread_cond_init(&L->cv, NULL);
    return TUNA_OK;
}

static void slot_clear(struct tuna_lora_slot *s)
{
    free(s->name);
    free(s->root);
    tuna_lora_free(s->ad);
    memset(s, 0, sizeof *s);
}

void tuna_serve_loras_destroy(struct tuna_serve_loras *L)
{
    if (!L->slots) return;
    for (int i = 0; i < L->n_slots; i++)
        slot_clear(&L->slots[i]);
    free(L->slots);
    free(L->root);
    pthread_mutex_destroy(&L->mu);
    pthread_cond_destroy(&L->cv);
    memset(L, 0, sizeof *L);
}

tuna_status tuna_serve_lora_path(const char *root, const char *path, char **out, struct tuna_openai_error *err)
{
    *out = NULL;
    if (!root)
        return tuna_openai_fail(err, 400, NULL,
                                "loading adapters at run time is off: start tuna serve with "
                                "--lora-root DIR and load folders under DIR");
    if (!path || !path[0]) return tuna_openai_fail(err, 400, "lora_path", "'lora_path' must be a non-empty string");
    size_t n = strlen(root) + strlen(path) + 2;
    char *joined = malloc(n);
    if (!joined) return tuna_openai_fail(err, 500, NULL, "out of memory");
    if (path[0] == '/')
        snprintf(joined, n, "%s", path);
    else
        snprintf(joined, n, "%s/%s", root, path);
    errno = 0;
    char *real = realpath(joined, NULL);
    free(joined);
    if (!real)
        return tuna_openai_fail(err, 404, "lora_path", "lora_path '%s' does not exist under --lora-root %s (%s)", path,
                                root, strerror(errno ? errno : ENOENT));
    size_t rl = strlen(root);
    bool inside =
        !strncmp(real, root, rl) && (real[rl] == '/' || (rl == 1 && root[0] == '/')) && real[rl] && real[rl + 1];
    if (!inside) {
        tuna_openai_fail(err, 400, "lora_path",
                         "lora_path '%s' resolves to %s, which is not inside --lora-root %s "
                         "(paths with .. or symlinks leading out of the root are refused)",
                         path, real, root);
        free(real);
        return TUNA_E_INVALID;
    }
    struct stat sb;
    if (stat(real, &sb) != 0 || !S_ISDIR(sb.st_mode)) {
        tuna_openai_fail(err, 400, "lora_path",
                         "lora_path '%s' (%s) is not a folder: give the adapter's folder "
                         "(with adapter_config.json and adapter_model.safetensors)",
                         path, real);
        free(real);
        return TUNA_E_INVALID;
    }
    *out = real;
    return TUNA_OK;
}

static int find_named(const struct tuna_serve_loras *L, const char *name)
{
    for (int i = 0; i < L->n_slots; i++)
        if (L->slots[i].state != TUNA_LORA_FREE && !strcmp(L->slots[i].name, name)) return i;
    return -1;
}

tuna_status tuna_serve_loras_begin_load(struct tuna_serve_loras *L, const char *name, const char *base_name, int *slot,
                                        int32_t *key, struct tuna_openai_error *err)
{
    *slot = -1;
    *key = -1;
    if (!name || !name[0]) return tuna_openai_fail(err, 400, "lora_name", "'lora_name' must be a non-empty string");
    if (base_name && !strcmp(name, base_name))
        return tuna_openai_fail(err, 400, "lora_name", "'%s' is the base model's name; pick another lora_name", name);
    pthread_mutex_lock(&L->mu);
    tuna_status st = TUNA_OK;
    int k = find_named(L, name);
    if (k >= 0) {
        st = tuna_openai_fail(err, 400, "lora_name", "The lora adapter '%s' has already been loaded%s.", name,
                              L->slots[k].state == TUNA_LORA_READY ? "" : " (or is being loaded or unloaded)");
    } else {
        int f = 0;
        while (f < L->n_slots && L->slots[f].state != TUNA_LORA_FREE)
            f++;
        if (f == L->n_slots) {
            char names[512] = "";
            for (int i = 0; i < L->n_slots; i++) {
                strncat(names, i ? ", " : "", sizeof names - strlen(names) - 1);
                strncat(names, L->slots[i].name, sizeof names - strlen(names) - 1);
            }
            st = tuna_openai_fail(err, 400, "lora_name",
                                  "cannot load '%s': all %d adapter slots (--max-loras) are "
                                  "taken by %s; unload one first (POST /v1/unload_lora_adapter)",
                                  name, L->n_slots, names);
        } else {
            L->slots[f].name = strdup(name);
            if (!L->slots[f].name)
                st = tuna_openai_fail(err, 500, NULL, "out of memory");
            else {
                L->slots[f].state = TUNA_LORA_LOADING;
                L->slots[f].key = *key = L->next_key++;
                *slot = f;
            }
        }
    }
    pthread_mutex_unlock(&L->mu);
    return st;
}

tuna_status tuna_serve_loras_check_rank(const struct tuna_serve_loras *L, const struct tuna_lora_adapter *ad,
                                        struct tuna_openai_error *err)
{
    int64_t r = ad->r;
    const char *where = "r in adapter_config.json";
    for (int i = 0; i < ad->n_modules; i++)
        if (ad->modules[i].r > r) {
            r = ad->modules[i].r;
            where = ad->modules[i].name;
        }
    if (r > L->max_rank)
        return tuna_openai_fail(err, 400, "lora_path",
                                "the adapter's rank %lld (%s) is above --max-lora-rank %lld; "
                                "restart with --max-lora-rank %lld or more",
                                (long long)r, where, (long long)L->max_rank, (long long)r);
    return TUNA_OK;
}

bool tuna_serve_loras_finish_load(struct tuna_serve_loras *L, int slot, struct tuna_lora_adapter *ad, const char *root)
{
    pthread_mutex_lock(&L->mu);
    struct tuna_lora_slot *s = &L->slots[slot];
    char *r = ad && root ? strdup(root) : NULL;
    bool ok = ad && (r || !root);
    if (ok) {
        s->ad = ad;
        s->root = r;
        s->pins = 0;
        s->state = TUNA_LORA_READY;
    } else {
        tuna_lora_free(ad);
        slot_clear(s);
    }
    pthread_mutex_unlock(&L->mu);
    return ok;
}

tuna_status tuna_serve_loras_begin_unload(struct tuna_serve_loras *L, const char *name, int *slot,
                                          struct tuna_openai_error *err)
{
    *slot = -1;
    if (!name || !name[0]) return tuna_openai_fail(err, 400, "lora_name", "'lora_name' must be a non-empty string");
    pthread_mutex_lock(&L->mu);
    tuna_status st = TUNA_OK;
    int k = find_named(L, name);
    if (k < 0 || L->slots[k].state != TUNA_LORA_READY) {
        st = tuna_openai_fail(err, 404, "lora_name", "The lora adapter '%s' cannot be found%s.", name,
                              k >= 0 ? " (it is being loaded or unloaded)" : "");
    } else {
        L->slots[k].state = TUNA_LORA_UNLOADING;
        *slot = k;
    }
    pthread_mutex_unlock(&L->mu);
    return st;
}

void tuna_serve_loras_wait_unpinned(struct tuna_serve_loras *L, int slot)
{
    pthread_mutex_lock(&L->mu);
    while (L->slots[slot].pins > 0)
        pthread_cond_wait(&L->cv, &L->mu);
    pthread_mutex_unlock(&L->mu);
}

void tuna_serve_loras_finish_unload(struct tuna_serve_loras *L, int slot, bool ok)
{
    pthread_mutex_lock(&L->mu);
    if (ok)
        slot_clear(&L->slots[slot]);
    else
        L->slots[slot].state = TUNA_LORA_READY;
    pthread_mutex_unlock(&L->mu);
}

int tuna_serve_loras_pin(struct tuna_serve_loras *L, const char *name)
{
    pthread_mutex_lock(&L->mu);
    int k = find_named(L, name);
    if (k >= 0 && L->slots[k].state == TUNA_LORA_READY)
        L->slots[k].pins++;
    else
        k = -1;
    pthread_mutex_unlock(&L->mu);
    return k;
}

void tuna_serve_loras_unpin(struct tuna_serve_loras *L, int slot)
{
    if (slot < 0 || slot >= L->n_slots) return;
    pthread_mutex_lock(&L->mu);
    if (L->slots[slot].pins > 0 && --L->slots[slot].pins == 0) pthread_cond_broadcast(&L->cv);
    pthread_mutex_unlock(&L->mu);
}

void tuna_serve_loras_each(struct tuna_serve_loras *L, void (*fn)(void *arg, const char *name, const char *root),
                           void *arg)
{
    pthread_mutex_lock(&L->mu);
    for (int i = 0; i < L->n_slots; i++)
        if (L->slots[i].state == TUNA_LORA_READY) fn(arg, L->slots[i].name, L->slots[i].root);
    pthread_mutex_unlock(&L->mu);
}

double tuna_serve_lora_bytes(const struct tuna_model *m, int slots, int64_t r)
{
    /* what the views will take (model/device.c), in the GPU's dtype: before the sixteenth session
     * this assumed float32 A and B, 1.25 GiB for 8 slots of rank 16 on Llama-3-8B, where the bf16
     * views took 0.95 (each adapter's B twice) and now take 0.63 (0.69 with the 2 MiB rounding) */
    return (double)tuna_model_lora_view_bytes(m, slots, r);
}
