/* inspect.h — what a model folder holds, before anything is loaded.
 *
 * Reads config.json, the safetensors headers (never the weights), the tokenizer and template
 * files and adapter_config.json, and reports the architecture, the quantization declared in the
 * config and the one found in the tensors, every contradiction with what to do about it, and
 * the memory it will take. Folder names never decide anything.
 */
#ifndef TUNA_INSPECT_INSPECT_H
#define TUNA_INSPECT_INSPECT_H

#include <cjson/cJSON.h>

#include "tuna.h"

/* Builds the report of dir into *report (a cJSON object, free with cJSON_Delete). Problems in
 * the folder are entries of report.problems, not failures: the call fails only when dir cannot
 * be read at all. */
tuna_status tuna_inspect(const char *dir, cJSON **report);

/* Number of problems of level "error" in a report. */
int tuna_inspect_error_count(const cJSON *report);

/* Writes the report as text for a person. */
void tuna_inspect_print(const cJSON *report, void *file /* FILE * */);

#endif
