/* Text in and out: chat messages rendered with the template's pieces, tokenization, detokenization. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "model.h"

/* The template refuses turns that do not alternate (Gemma's raises an exception): so does the library. */
static sg_status check_alternation(const sg_message *msgs, size_t n) {
    size_t first = !strcmp(msgs[0].role, "system");
    for (size_t i = first; i < n; i++) {
        const char *want = (i - first) % 2 ? "assistant" : "user";
        if (strcmp(msgs[i].role, want))
            return sg_fail(SG_ERR_INVALID_ARGUMENT,
                           "message %zu: role '%s'; this model's chat template needs user and assistant "
                           "turns to alternate, starting with user",
                           i, msgs[i].role);
    }
    return SG_OK;
}

/* White space as Python's str.isspace() sees it, which is what Jinja's `trim` (str.strip()) removes. */
static int is_space(uint32_t c) {
    return (c >= 0x09 && c <= 0x0d) || (c >= 0x1c && c <= 0x20) || c == 0x85 || c == 0xa0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200a) || c == 0x2028 || c == 0x2029 || c == 0x202f || c == 0x205f || c == 0x3000;
}

/* The code point of the valid UTF-8 sequence at s, and its length in bytes. */
static uint32_t code_point(const unsigned char *s, size_t *length) {
    if (s[0] < 0x80) return *length = 1, s[0];
    if (s[0] < 0xe0) return *length = 2, (uint32_t)(s[0] & 0x1f) << 6 | (s[1] & 0x3f);
    if (s[0] < 0xf0) return *length = 3, (uint32_t)(s[0] & 0x0f) << 12 | (uint32_t)(s[1] & 0x3f) << 6 | (s[2] & 0x3f);
    *length = 4;
    return (uint32_t)(s[0] & 0x07) << 18 | (uint32_t)(s[1] & 0x3f) << 12 | (uint32_t)(s[2] & 0x3f) << 6 | (s[3] & 0x3f);
}

/* How many bytes of white space open s[0, len) (valid UTF-8). */
static size_t space_prefix(const unsigned char *s, size_t len) {
    size_t start = 0, length;
    while (start < len && is_space(code_point(s + start, &length))) start += length;
    return start;
}

/* Where the white space that closes s[start, end) begins. */
static size_t space_suffix_start(const unsigned char *s, size_t start, size_t end) {
    size_t length;
    while (end > start) {
        size_t lead = end - 1;
        while (lead > start && (s[lead] & 0xc0) == 0x80) lead--;
        if (!is_space(code_point(s + lead, &length))) break;
        end = lead;
    }
    return end;
}

/* A content as the template writes it: whole, or (trim) without white space at either end. */
static int append_content(sg_buf *b, const char *content, int trim) {
    const unsigned char *s = (const unsigned char *)content;
    size_t start = 0, end = strlen(content);
    if (trim) {
        start = space_prefix(s, end);
        end = space_suffix_start(s, start, end);
    }
    return sg_buf_append(b, content + start, end - start);
}

static sg_status validate_messages(const sg_model *m, const sg_message *msgs, size_t n) {
    if (!msgs || !n) return sg_fail(SG_ERR_INVALID_ARGUMENT, "no chat messages given");
    if (!m->bundle.has_chat)
        return sg_fail(SG_ERR_UNSUPPORTED,
                       "%s: the manifest has no chat pieces (an older export, or a chat template "
                       "that does not reduce to text pieces and their rules); re-export the bundle, or pass "
                       "token ids",
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
        if (!strcmp(role, "user") && space_prefix((const unsigned char *)content, len) == len)
            return sg_fail(SG_ERR_INVALID_ARGUMENT, "the prompt is empty");
    }
    return m->bundle.chat.alternate ? check_alternation(msgs, n) : SG_OK;
}

/* The chat rendered with the template's pieces and rules (steerguard/export/chat_pieces.py: render_pieces). */
static int render_chat(const sg_chat_pieces *c, const sg_message *msgs, size_t n, sg_buf *b) {
    size_t first = 0;
    int rc = 0;
    const char *folded = NULL; /* a system prompt that opens the first turn after it */
    if (!strcmp(msgs[0].role, "system")) {
        first = 1;
        if (c->fold) {
            rc |= sg_buf_append_str(b, c->head);
            folded = msgs[0].content;
        } else {
            rc |= sg_buf_append_str(b, c->head_system) | append_content(b, msgs[0].content, c->trim) |
                  sg_buf_append_str(b, c->close_system);
        }
    } else {
        rc |= sg_buf_append_str(b, c->head);
    }
    for (size_t i = first; i < n; i++) {
        int user = !strcmp(msgs[i].role, "user");
        rc |= sg_buf_append_str(b, user ? c->open_user : c->open_assistant);
        if (folded && i == first) rc |= sg_buf_append_str(b, folded) | sg_buf_append_str(b, c->system_separator);
        rc |= append_content(b, msgs[i].content, c->trim) |
              sg_buf_append_str(b, user ? c->close_user : c->close_assistant);
    }
    return rc | sg_buf_append_str(b, c->generation_prompt);
}

static sg_status encode_text(const sg_model *m, const char *text, size_t len, sg_tokens *out) {
    size_t cap = 0;
    out->ids = NULL;
    out->count = 0;
    sg_status st = sg_tokenizer_encode(m->tokenizer, text, len, &out->ids, &out->count, &cap);
    if (st != SG_OK) sg_tokens_free(out);
    return st;
}

/* Where the last user message's content begins: where encodings of the chat that differ only in that content part
 * ways, over three probe contents (steerguard/runtime/chat.py: content_start). Encoding the text before the content
 * on its own is not the same: the tokenizer can merge that text's last characters differently when nothing follows
 * them (Gemma's "\n\n" after a folded system prompt is one token alone and two before the user's words). */
static sg_status user_content_start(const sg_model *m, const sg_message *msgs, size_t n, size_t *start) {
    static const char *probes[] = {"", "alpha", "omega beta"};
    size_t last = n;
    for (size_t i = 0; i < n; i++)
        if (!strcmp(msgs[i].role, "user")) last = i;
    *start = 0;
    if (last == n) return SG_OK;
    sg_message *probe = malloc(n * sizeof *probe);
    if (!probe) return sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory");
    memcpy(probe, msgs, n * sizeof *probe);
    sg_tokens enc[3] = {{0}};
    sg_status st = SG_OK;
    for (size_t k = 0; k < 3 && st == SG_OK; k++) {
        sg_buf text = {0};
        probe[last].content = probes[k];
        if (render_chat(&m->bundle.chat, probe, n, &text)) st = sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory");
        if (st == SG_OK) st = encode_text(m, text.data, text.len, &enc[k]);
        sg_buf_free(&text);
    }
    if (st == SG_OK) {
        size_t shared = SIZE_MAX;
        for (size_t a = 0; a < 3; a++)
            for (size_t b = a + 1; b < 3; b++) {
                size_t k = 0, both = enc[a].count < enc[b].count ? enc[a].count : enc[b].count;
                while (k < both && enc[a].ids[k] == enc[b].ids[k]) k++;
                if (k < shared) shared = k;
            }
        *start = shared;
    }
    for (size_t k = 0; k < 3; k++) sg_tokens_free(&enc[k]);
    free(probe);
    return st;
}

sg_status sg_encode_chat_ids(const sg_model *m, const sg_message *msgs, size_t n, sg_tokens *out, size_t *user_start) {
    sg_status st = validate_messages(m, msgs, n);
    if (st != SG_OK) return st;
    sg_buf text = {0};
    if (render_chat(&m->bundle.chat, msgs, n, &text)) return sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory");
    st = encode_text(m, text.data, text.len, out);
    sg_buf_free(&text);
    if (st != SG_OK || !user_start) return st;
    *user_start = 0;
    if (!m->bundle.risk_per_token) return SG_OK; /* only a per-token prober reads where the user's turn begins */
    size_t start = 0;
    st = user_content_start(m, msgs, n, &start);
    if (st == SG_OK) *user_start = start < out->count ? start : 0;
    else sg_tokens_free(out);
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
