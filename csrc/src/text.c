/* Text in and out: chat messages rendered with the template's pieces, tokenization, detokenization. */
#include <stdlib.h>
#include <string.h>

#include "model.h"

static sg_status validate_messages(const sg_model *m, const sg_message *msgs, size_t n) {
    if (!msgs || !n) return sg_fail(SG_ERR_INVALID_ARGUMENT, "no chat messages given");
    if (!m->bundle.has_chat)
        return sg_fail(SG_ERR_UNSUPPORTED,
                       "%s: the manifest has no chat pieces (an older export, or a chat template "
                       "that is not plain text pieces); re-export the bundle, or pass token ids",
                       m->bundle.root);
    for (size_t i = 0; i < n; i++) {
        const char *role = msgs[i].role, *content = msgs[i].content;
        if (!role || !content) return sg_fail(SG_ERR_INVALID_ARGUMENT, "message %zu has no role or no content", i);
        int system = !strcmp(role, "system");
        if ((system && i) || (!system && strcmp(role, "user") && strcmp(role, "assistant")))
            return sg_fail(SG_ERR_INVALID_ARGUMENT,
                           "message %zu: role '%s'; roles are system (first message only), "
                           "user and assistant",
                           i, role);
        size_t len = strlen(content), valid = sg_utf8_valid_prefix(content, len);
        if (valid != len)
            return sg_fail(SG_ERR_INVALID_ARGUMENT, "message %zu is not valid UTF-8 (at byte %zu)", i, valid);
        if (!strcmp(role, "user") && strspn(content, " \t\n\r\v\f") == len)
            return sg_fail(SG_ERR_INVALID_ARGUMENT, "the prompt is empty");
    }
    return SG_OK;
}

/* The chat rendered with the template's pieces (steerguard/export/chat_pieces.py: render_pieces); with
 * `upto_last_user`, only what comes before the last user message's content. */
static int render_chat(const sg_chat_pieces *c, const sg_message *msgs, size_t n, int upto_last_user, sg_buf *b) {
    size_t last_user = n;
    for (size_t i = 0; i < n; i++)
        if (!strcmp(msgs[i].role, "user")) last_user = i;
    size_t i = 0;
    int rc = 0;
    if (!strcmp(msgs[0].role, "system")) {
        rc |= sg_buf_append_str(b, c->head_system) | sg_buf_append_str(b, msgs[0].content) |
              sg_buf_append_str(b, c->close_system);
        i = 1;
    } else {
        rc |= sg_buf_append_str(b, c->head);
    }
    for (; i < n; i++) {
        int user = !strcmp(msgs[i].role, "user");
        rc |= sg_buf_append_str(b, user ? c->open_user : c->open_assistant);
        if (upto_last_user && i == last_user) return rc;
        rc |= sg_buf_append_str(b, msgs[i].content) | sg_buf_append_str(b, user ? c->close_user : c->close_assistant);
    }
    return rc | (upto_last_user ? 0 : sg_buf_append_str(b, c->generation_prompt));
}

static sg_status encode_text(const sg_model *m, const char *text, size_t len, sg_tokens *out) {
    size_t cap = 0;
    out->ids = NULL;
    out->count = 0;
    sg_status st = sg_tokenizer_encode(m->tokenizer, text, len, &out->ids, &out->count, &cap);
    if (st != SG_OK) sg_tokens_free(out);
    return st;
}

sg_status sg_encode_chat_ids(const sg_model *m, const sg_message *msgs, size_t n, sg_tokens *out, size_t *user_start) {
    sg_status st = validate_messages(m, msgs, n);
    if (st != SG_OK) return st;
    sg_buf text = {0};
    if (render_chat(&m->bundle.chat, msgs, n, 0, &text)) return sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory");
    st = encode_text(m, text.data, text.len, out);
    sg_buf_free(&text);
    if (st != SG_OK || !user_start) return st;
    *user_start = 0;
    if (!m->bundle.risk_per_token) return SG_OK; /* only a per-token prober reads where the user's turn begins */
    sg_tokens prefix = {0};
    if (render_chat(&m->bundle.chat, msgs, n, 1, &text)) st = sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory");
    if (st == SG_OK) st = encode_text(m, text.data, text.len, &prefix);
    sg_buf_free(&text);
    if (st == SG_OK) *user_start = prefix.count < out->count ? prefix.count : 0;
    sg_tokens_free(&prefix);
    if (st != SG_OK) sg_tokens_free(out);
    return st;
}

sg_status sg_tokenize(const sg_model *m, const char *text, size_t len, sg_tokens *out) {
    sg_clear_error();
    if (!m || !out || (!text && len)) return sg_fail(SG_ERR_INVALID_ARGUMENT, "sg_tokenize: NULL model, text or out");
    return encode_text(m, text ? text : "", len, out);
}

sg_status sg_encode_chat(const sg_model *m, const sg_message *msgs, size_t n, sg_tokens *out) {
    sg_clear_error();
    if (!m || !out) return sg_fail(SG_ERR_INVALID_ARGUMENT, "sg_encode_chat: NULL model or out");
    return sg_encode_chat_ids(m, msgs, n, out, NULL);
}

void sg_tokens_free(sg_tokens *t) {
    if (!t) return;
    free(t->ids);
    t->ids = NULL;
    t->count = 0;
}

sg_status sg_detokenize(const sg_model *m, const int32_t *ids, size_t count, char **out, size_t *length) {
    sg_clear_error();
    if (!m || !out || (!ids && count)) return sg_fail(SG_ERR_INVALID_ARGUMENT, "sg_detokenize: NULL model, ids or out");
    sg_buf text = {0};
    if (sg_tokenizer_decode(m->tokenizer, ids, count, &text)) {
        sg_buf_free(&text);
        return sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory");
    }
    if (length) *length = text.len;
    *out = sg_buf_take(&text);
    return SG_OK;
}

void sg_string_free(char *text) { free(text); }
