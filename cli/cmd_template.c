/* cmd_template.c — `tuna template DIR --messages FILE [--add-generation-prompt |
 * --continue-final-message] [--tools FILE] [--template-name NAME] [--tokenize]`: renders the model folder's chat
 * template as transformers' apply_chat_template does, and prints the text (or, with --tokenize, its token ids as a JSON
 * array: encoded without adding BOS/EOS, special tokens in the text recognised, as
 * apply_chat_template(tokenize=True) does). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "chat/chat.h"
#include "cli.h"
#include "core/file.h"
#include "core/status.h"
#include "tokenizer/tokenizer.h"

static void usage(FILE *f)
{
    fprintf(f, "usage: tuna template DIR --messages FILE [--add-generation-prompt | --continue-final-message]\n"
               "                     [--tools FILE] [--template-name NAME] [--tokenize]\n"
               "  DIR                     a model folder (chat_template.jinja, chat_template.json or\n"
               "                          tokenizer_config.json with \"chat_template\")\n"
               "  --messages FILE         a JSON array of {\"role\", \"content\", ...}, or an object with\n"
               "                          \"messages\" and optionally \"tools\", \"documents\",\n"
               "                          \"add_generation_prompt\" and further template variables\n"
               "  --add-generation-prompt end with the assistant turn's header\n"
               "  --continue-final-message end right after the last message's text (to continue it)\n"
               "  --tools FILE            a JSON array of tool schemas\n"
               "  --template-name NAME    pick a named template (default, tool_use, rag, ...)\n"
               "  --tokenize              print token ids (JSON array) instead of the text\n");
}

/* JSON as Python's json.loads reads it (1.0 stays a float in the template) */
static tuna_status load_json(const char *path, cJSON **out)
{
    char *text = NULL;
    size_t len = 0;
    tuna_status st = tuna_read_file(path, 256u << 20, &text, &len);
    if (!st) st = tuna_jinja_json_parse(text, len, path, out);
    free(text);
    return st;
}

int cmd_template(int argc, char **argv)
{
    const char *dir = NULL, *msg_file = NULL, *tools_file = NULL, *name = NULL;
    bool gen = false, tokenize = false, cont = false, bad = false;
    for (int i = 1; i < argc && !bad; i++) {
        if (tuna_cli_flag(argv, i, "--help") || tuna_cli_flag(argv, i, "-h")) {
            usage(stdout);
            return 0;
        }
        if (tuna_cli_opt_str(argc, argv, &i, "--messages", &msg_file, &bad)) continue;
        if (tuna_cli_opt_str(argc, argv, &i, "--tools", &tools_file, &bad)) continue;
        if (tuna_cli_opt_str(argc, argv, &i, "--template-name", &name, &bad)) continue;
        if (tuna_cli_flag(argv, i, "--add-generation-prompt"))
            gen = true;
        else if (tuna_cli_flag(argv, i, "--continue-final-message"))
            cont = true;
        else if (tuna_cli_flag(argv, i, "--tokenize"))
            tokenize = true;
        else if (argv[i][0] == '-' && argv[i][1]) {
            fprintf(stderr, "tuna template: unknown option '%s'\n", argv[i]);
            bad = true;
        } else if (!dir)
            dir = argv[i];
        else {
            fprintf(stderr, "tuna template: unexpected argument '%s'\n", argv[i]);
            bad = true;
        }
    }
    if (bad || !dir || !msg_file) {
        if (!bad) fprintf(stderr, "tuna template: give a model folder and --messages FILE\n");
        usage(stderr);
        return 2;
    }
    cJSON *doc = NULL, *tools = NULL, *extra = NULL;
    struct tuna_chat_template *ct = NULL;
    tuna_tokenizer *tok = NULL;
    char *text = NULL;
    int32_t *ids = NULL;
    int rc = 0;
    tuna_status st = load_json(msg_file, &doc);
    if (!st && tools_file) st = load_json(tools_file, &tools);
    if (st) goto fail;
    struct tuna_chat_render_opts o = {
        .add_generation_prompt = gen, .continue_final_message = cont, .template_name = name, .tools = tools};
    const cJSON *messages = doc;
    if (cJSON_IsObject(doc)) {
        messages = cJSON_GetObjectItemCaseSensitive(doc, "messages");
        if (!o.tools) o.tools = cJSON_GetObjectItemCaseSensitive(doc, "tools");
        o.documents = cJSON_GetObjectItemCaseSensitive(doc, "documents");
        const cJSON *agp = cJSON_GetObjectItemCaseSensitive(doc, "add_generation_prompt");
        if (cJSON_IsBool(agp) && !gen) o.add_generation_prompt = cJSON_IsTrue(agp);
        extra = cJSON_Duplicate(doc, 1);
        if (!extra) {
            st = tuna_fail_oom("messages", 0);
            goto fail;
        }
        static const char *const taken[] = {"messages", "tools", "documents", "add_generation_prompt"};
        for (size_t k = 0; k < sizeof taken / sizeof *taken; k++)
            cJSON_DeleteItemFromObjectCaseSensitive(extra, taken[k]);
        o.extra = extra;
    }
    if (!cJSON_IsArray(messages)) {
        st =
            tuna_fail(TUNA_E_INVALID, "%s: expected a JSON array of messages or an object with \"messages\"", msg_file);
        goto fail;
    }
    if ((st = tuna_chat_load(dir, &ct))) goto fail;
    if ((st = tuna_chat_render(ct, messages, &o, &text))) goto fail;
    if (!tokenize) {
        fputs(text, stdout);
    } else {
        size_t n = 0;
        if ((st = tuna_tokenizer_load(dir, &tok))) goto fail;
        if ((st = tuna_tokenizer_encode(tok, text, strlen(text), false, true, &ids, &n))) goto fail;
        putchar('[');
        for (size_t i = 0; i < n; i++)
            printf(i ? ", %d" : "%d", ids[i]);
        printf("]\n");
    }
    goto done;
fail:
    rc = tuna_cli_fail("template", st);
done:
    free(ids);
    free(text);
    tuna_tokenizer_free(tok);
    tuna_chat_free(ct);
    cJSON_Delete(extra);
    cJSON_Delete(tools);
    cJSON_Delete(doc);
    return rc;
}
