/* json.h — typed access to cJSON documents with messages that name the file and key.
 *
 * Every getter distinguishes "absent" (returns false, leaves *out alone) from "present with the
 * wrong type" (returns false and sets the error with TUNA_E_FORMAT via *st). This keeps config
 * parsing short: `if (!tuna_json_get_int(doc, "hidden_size", &v, &st, file) && st) return st;`
 */
#ifndef TUNA_CORE_JSON_H
#define TUNA_CORE_JSON_H

#include <stdbool.h>
#include <stdint.h>

#include <cjson/cJSON.h>

#include "tuna.h"

/* Parses the JSON file at path (at most max_bytes; 0 = 64 MiB) into *out (free with cJSON_Delete).
 * Errors say the file and the byte offset where parsing stopped. */
tuna_status tuna_json_load(const char *path, size_t max_bytes, cJSON **out);

/* Parses a buffer; `what` names it in messages. */
tuna_status tuna_json_parse(const char *text, size_t len, const char *what, cJSON **out);

/* Object member, NULL when absent or when obj is not an object; JSON null counts as absent. */
const cJSON *tuna_json_member(const cJSON *obj, const char *key);

/* Typed getters: return true and set *out when the key is present with the right type.
 * When present with the wrong type: return false and set *st = TUNA_E_FORMAT with a message
 * naming `where` and key. When absent: return false and *st = TUNA_OK. */
bool tuna_json_get_int(const cJSON *obj, const char *key, int64_t *out, tuna_status *st, const char *where);
bool tuna_json_get_num(const cJSON *obj, const char *key, double *out, tuna_status *st, const char *where);
bool tuna_json_get_bool(const cJSON *obj, const char *key, bool *out, tuna_status *st, const char *where);
bool tuna_json_get_str(const cJSON *obj, const char *key, const char **out, tuna_status *st, const char *where);

/* Writes a cJSON document to path atomically, pretty-printed with 2-space indentation the way
 * Python's json.dump(indent=2) does, followed by a newline. */
tuna_status tuna_json_save(const char *path, const cJSON *doc);

#endif
