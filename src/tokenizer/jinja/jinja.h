/* jinja.h — a Jinja2 interpreter for chat templates, rendering exactly as transformers does.
 *
 * transformers renders chat templates with a jinja2 sandboxed Environment with trim_blocks and
 * lstrip_blocks on, keep_trailing_newline off, the loopcontrols extension ({% break %},
 * {% continue %}), its own `tojson` filter (json.dumps with ensure_ascii=False) and the globals
 * raise_exception and strftime_now, plus {% generation %} blocks. This module implements that
 * subset of Jinja2 (the parts chat templates use) with Python's value semantics: `{{ true }}`
 * prints "True", floats print as Python's repr, dicts keep insertion order.
 *
 * Anything not supported (template inheritance, includes, imports, recursive loops, ...) fails
 * with TUNA_E_UNSUPPORTED naming what and where; a render never silently differs.
 * Errors name "line L, column C" of the template.
 */
#ifndef TUNA_TOKENIZER_JINJA_H
#define TUNA_TOKENIZER_JINJA_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <cjson/cJSON.h>

#include "tuna.h"

struct tuna_jinja_options {
    bool trim_blocks;           /* drop the first newline after a block tag */
    bool lstrip_blocks;         /* strip spaces and tabs from a line's start up to a block tag */
    bool keep_trailing_newline; /* keep one newline at the end of the template */
};

/* The options transformers uses: trim_blocks, lstrip_blocks, no trailing newline. */
struct tuna_jinja_options tuna_jinja_hf_options(void);

typedef struct tuna_jinja_template tuna_jinja_template;

/* Parses a template (len bytes of UTF-8; need not be NUL-terminated). opt NULL = HF options.
 * On success *out is taken by the caller (free with tuna_jinja_free). Syntax errors give
 * TUNA_E_FORMAT, unsupported constructs TUNA_E_UNSUPPORTED, both with line and column. */
tuna_status tuna_jinja_parse(const char *src, size_t len, const struct tuna_jinja_options *opt,
                             tuna_jinja_template **out);

void tuna_jinja_free(tuna_jinja_template *t);

struct tuna_jinja_render_opts {
    int64_t now; /* seconds since the epoch used by strftime_now; 0 = the current time */
};

/* Renders with the variables of `context` (a JSON object, may be NULL) as globals. On success
 * *out is a malloc'd NUL-terminated string (taken by the caller) of *len bytes (len may be
 * NULL). A template that calls raise_exception() fails with TUNA_E_INVALID and its message;
 * other render errors with TUNA_E_FORMAT. ro may be NULL. */
tuna_status tuna_jinja_render(const tuna_jinja_template *t, const cJSON *context,
                              const struct tuna_jinja_render_opts *ro, char **out, size_t *len);

/* Parses JSON text as Python's json.loads sees it, into a cJSON tree (free with cJSON_Delete):
 * each number keeps its source text in valuestring, so that a context built from it keeps
 * 1.0 a float and big ints exact (cJSON_Parse keeps only a double). Strings holding U+0000
 * are refused (TUNA_E_UNSUPPORTED). `where` names the text in messages. */
tuna_status tuna_jinja_json_parse(const char *text, size_t len, const char *where, cJSON **out);

#endif
