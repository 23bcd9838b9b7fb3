/* loras.h — the served LoRA adapters: a fixed number of slots (--max-loras), each holding one
 * loaded adapter under its served name. Slot i is adapter index i in batch.adapter, so a slot
 * keeps its index while other slots come and go and running sequences are never renumbered.
 *
 * State machine of a slot (all under the registry's mutex):
 *   FREE --begin_load--> LOADING --finish_load(ok)--> READY --begin_unload--> UNLOADING --finish_unload--> FREE
 *                          \--finish_load(failed)--> FREE
 * Only READY slots resolve a name (tuna_serve_loras_pin), so a request never picks an adapter
 * being loaded or unloaded. A request pins its slot from parsing until it is freed
 * (tuna_serve_params_free unpins). Unloading an adapter that requests still use is delayed, not
 * refused: from begin_unload on, new requests naming it get 404, and tuna_serve_loras_wait_unpinned
 * waits until the requests already running have finished; only then is it detached. Loading when
 * every slot is taken is refused with 400 (no eviction: unload one first), as is a rank above
 * --max-lora-rank.
 *
 * Runtime loading is allowed only from folders under --lora-root: the given path (absolute, or
 * relative to the root) is resolved with realpath, which follows every symlink, and the result
 * must be the root itself's strict descendant; anything else is 400 with the resolved path.
 *
 * The model side (attaching the adapters between engine steps) is the engine's
 * (tuna_engine_set_lora); this file only keeps names, paths, pins and the state.
 */
#ifndef TUNA_SERVE_LORAS_H
#define TUNA_SERVE_LORAS_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "lora/lora.h"
#include "serve/openai.h"

enum tuna_lora_slot_state { TUNA_LORA_FREE = 0, TUNA_LORA_LOADING, TUNA_LORA_READY, TUNA_LORA_UNLOADING };

struct tuna_lora_slot {
    enum tuna_lora_slot_state state;
    char *name;                   /* served name (owned) when not FREE */
    char *root;                   /* the folder it came from (owned) */
    struct tuna_lora_adapter *ad; /* owned once finish_load succeeded */
    int pins;                     /* requests using it */
    int32_t key;                  /* unique per load: the prefix cache's adapter id */
};

struct tuna_serve_loras {
    pthread_mutex_t mu;
    pthread_cond_t cv;            /* signalled when a pin is released */
    struct tuna_lora_slot *slots; /* [n_slots] */
    int n_slots;                  /* --max-loras */
    int64_t max_rank;             /* --max-lora-rank */
    char *root;                   /* realpath of --lora-root, NULL: runtime loading off */
    int32_t next_key;
};

tuna_status tuna_serve_loras_init(struct tuna_serve_loras *L, int max_loras, int64_t max_rank, const char *lora_root);
void tuna_serve_loras_destroy(struct tuna_serve_loras *L); /* frees the adapters: detach them first */

/* Resolves `path` (absolute, or relative to root) to a folder strictly inside root (both
 * realpath'd). *out malloc'd. 400 (path outside the root, via a symlink or ..) or 404 (no such
 * folder) in err. */
tuna_status tuna_serve_lora_path(const char *root, const char *path, char **out, struct tuna_openai_error *err);

/* FREE slot → LOADING under `name`. 400: empty/duplicate name (or the base model's name), every
 * slot taken. *slot receives the slot index, *key the adapter's new prefix-cache id. */
tuna_status tuna_serve_loras_begin_load(struct tuna_serve_loras *L, const char *name, const char *base_name, int *slot,
                                        int32_t *key, struct tuna_openai_error *err);
/* 400 when the adapter's rank (the config's or any module's) is above max_rank. */
tuna_status tuna_serve_loras_check_rank(const struct tuna_serve_loras *L, const struct tuna_lora_adapter *ad,
                                        struct tuna_openai_error *err);
/* LOADING → READY with the adapter (taken) and its folder, or (ad == NULL) back to FREE.
 * false (slot FREE, adapter freed) when out of memory. */
bool tuna_serve_loras_finish_load(struct tuna_serve_loras *L, int slot, struct tuna_lora_adapter *ad, const char *root);
/* READY → UNLOADING. 404 unknown name (or one being loaded or unloaded). */
tuna_status tuna_serve_loras_begin_unload(struct tuna_serve_loras *L, const char *name, int *slot,
                                          struct tuna_openai_error *err);
/* Waits until no request pins the slot (requests that run on it finish first). */
void tuna_serve_loras_wait_unpinned(struct tuna_serve_loras *L, int slot);
/* UNLOADING → FREE (frees the adapter; it must be detached), or (ok false) back to READY. */
void tuna_serve_loras_finish_unload(struct tuna_serve_loras *L, int slot, bool ok);

/* The READY slot named `name`, pinned; -1 when there is none. */
int tuna_serve_loras_pin(struct tuna_serve_loras *L, const char *name);
void tuna_serve_loras_unpin(struct tuna_serve_loras *L, int slot);

/* Names and folders of the READY adapters, for /v1/models: calls fn for each under the lock. */
void tuna_serve_loras_each(struct tuna_serve_loras *L, void (*fn)(void *arg, const char *name, const char *root),
                           void *arg);

/* Device bytes that `slots` adapters of rank r on all seven projections of every layer of m take
 * (tuna_model_lora_view_bytes): what `tuna serve` keeps free of the KV cache on a GPU. */
double tuna_serve_lora_bytes(const struct tuna_model *m, int slots, int64_t r);

#endif
