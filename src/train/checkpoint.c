/* checkpoint.c — save / read / find training checkpoints (checkpoint.h). */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "core/file.h"
#include "core/json.h"
#include "core/status.h"
#include "train/checkpoint.h"

void tuna_train_state_free(struct tuna_train_state *s)
{
    if (!s) return;
    free(s->losses);
    s->losses = NULL;
    s->n_losses = 0;
}

static tuna_status write_state(const struct tuna_train_state *s, const char *dir)
{
    cJSON *o = cJSON_CreateObject();
    if (!o) return tuna_fail_oom("trainer_state.json", 256);
    cJSON_AddNumberToObject(o, "global_step", (double)s->step);
    cJSON_AddNumberToObject(o, "max_steps", (double)s->max_steps);
    cJSON_AddNumberToObject(o, "batch_size", (double)s->batch_size);
    cJSON_AddNumberToObject(o, "grad_accum", (double)s->grad_accum);
    cJSON_AddBoolToObject(o, "shuffle", s->shuffle);
    char seed[32];
    snprintf(seed, sizeof seed, "%llu", (unsigned long long)s->seed); /* exact beyond 2^53 */
    cJSON_AddStringToObject(o, "seed", seed);
    cJSON *l = cJSON_AddArrayToObject(o, "losses");
    for (int64_t i = 0; l && i < s->n_losses; i++)
        cJSON_AddItemToArray(l, cJSON_CreateNumber(s->losses[i]));
    char path[4096];
    snprintf(path, sizeof path, "%s/trainer_state.json", dir);
    tuna_status st = tuna_json_save(path, o);
    cJSON_Delete(o);
    return st;
}

tuna_status tuna_checkpoint_save(const tuna_trainer *t, const struct tuna_train_state *s, const char *out_dir,
                                 const char *base_model, char *path, size_t cap)
{
    char final[4096];
    snprintf(final, sizeof final, "%s/checkpoint-%lld", out_dir, (long long)tuna_trainer_step_count(t));
    tuna_status st = tuna_mkdir_p(out_dir);
    char *tmp = NULL;
    if (!st) st = tuna_atomic_dir_begin(final, &tmp);
    if (st) return tuna_fail_prefix(st, "checkpoint %s", final);
    st = tuna_trainer_export(t, tmp, base_model, true);
    if (!st) st = tuna_trainer_save_optimizer(t, tmp);
    if (!st) st = write_state(s, tmp);
    if (!st) st = tuna_atomic_dir_commit(tmp, final, true);
    if (st) tuna_atomic_dir_abort(tmp);
    free(tmp);
    if (st) return tuna_fail_prefix(st, "checkpoint %s", final);
    if (path) snprintf(path, cap, "%s", final);
    return TUNA_OK;
}

tuna_status tuna_checkpoint_read_state(const char *dir, struct tuna_train_state *s)
{
    memset(s, 0, sizeof *s);
    char path[4096];
    snprintf(path, sizeof path, "%s/trainer_state.json", dir);
    cJSON *o = NULL;
    tuna_status st = tuna_json_load(path, 64u << 20, &o);
    if (st) return st;
    bool b;
    const char *seed;
    if (!tuna_json_get_int(o, "global_step", &s->step, &st, path) ||
        !tuna_json_get_int(o, "max_steps", &s->max_steps, &st, path) ||
        !tuna_json_get_int(o, "batch_size", &s->batch_size, &st, path) ||
        !tuna_json_get_int(o, "grad_accum", &s->grad_accum, &st, path) ||
        !tuna_json_get_bool(o, "shuffle", &b, &st, path) || !tuna_json_get_str(o, "seed", &seed, &st, path)) {
        cJSON_Delete(o);
        return st ? st : tuna_fail(TUNA_E_FORMAT, "%s: a field is missing", path);
    }
    s->shuffle = b;
    s->seed = strtoull(seed, NULL, 10);
    const cJSON *l = cJSON_GetObjectItem(o, "losses");
    int n = cJSON_IsArray(l) ? cJSON_GetArraySize(l) : 0;
    s->losses = calloc((size_t)(n ? n : 1), sizeof *s->losses);
    if (!s->losses) {
        cJSON_Delete(o);
        return tuna_fail_oom("losses", (size_t)n * 8);
    }
    for (int i = 0; i < n; i++)
        s->losses[i] = cJSON_GetArrayItem(l, i)->valuedouble;
    s->n_losses = n;
    cJSON_Delete(o);
    if (s->step < 0 || s->batch_size <= 0 || s->grad_accum <= 0) {
        tuna_train_state_free(s);
        return tuna_fail(TUNA_E_FORMAT, "%s: step, batch_size or grad_accum out of range", path);
    }
    return TUNA_OK;
}

tuna_status tuna_checkpoint_latest(const char *out_dir, char *path, size_t cap)
{
    DIR *d = opendir(out_dir);
    if (!d) return tuna_fail(TUNA_E_NOT_FOUND, "no checkpoint to resume: %s does not exist", out_dir);
    long long best = -1;
    struct dirent *e;
    while ((e = readdir(d))) {
        long long n;
        int used = 0;
        if (sscanf(e->d_name, "checkpoint-%lld%n", &n, &used) == 1 && e->d_name[used] == '\0' && n > best) best = n;
    }
    closedir(d);
    if (best < 0)
        return tuna_fail(TUNA_E_NOT_FOUND,
                         "no checkpoint-N folder in %s to resume from (checkpoints are written "
                         "with --save-steps N)",
                         out_dir);
    snprintf(path, cap, "%s/checkpoint-%lld", out_dir, best);
    return TUNA_OK;
}
