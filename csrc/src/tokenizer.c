#include "tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <cjson/cJSON.h>
#include <pcre2.h>
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

/* ---- hash maps: token text -> id, and a merge's pair of ids -> (rank, merged id) ----------------- */

typedef struct {
    const char *key; /* NULL = empty slot */
    size_t key_len;
    int32_t id;
} text_slot;

typedef struct {
    uint64_t key; /* (left << 32 | right) + 1; 0 = empty slot */
    int32_t rank, merged;
} pair_slot;

static uint64_t hash_bytes(const char *s, size_t n) {
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (size_t i = 0; i < n; i++) h = (h ^ (unsigned char)s[i]) * 1099511628211ull;
    return h;
}

static uint64_t hash_u64(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    return x;
}

static size_t table_size(size_t n) {
    size_t size = 16;
    while (size < 2 * n + 1) size *= 2;
    return size;
}

/* ---- the tokenizer ------------------------------------------------------------------------------ */

typedef enum { STEP_SPLIT, STEP_DIGITS, STEP_BYTE_LEVEL } step_kind;

typedef struct {
    step_kind kind;
    pcre2_code *regex;     /* STEP_SPLIT, and STEP_BYTE_LEVEL with use_regex */
    int remove_matches;    /* Split behaviour "Removed" (otherwise "Isolated") */
    int individual_digits; /* STEP_DIGITS */
    int add_prefix_space;  /* STEP_BYTE_LEVEL */
} pre_step;

typedef struct {
    char *content;
    size_t len;
    int32_t id;
    int special, lstrip, rstrip;
} added_token;

struct sg_tokenizer {
    int32_t vocab_size; /* one past the highest id */
    char **token_text;  /* id -> text (byte-level form; added tokens: content) */
    size_t *token_len;
    char **token_bytes; /* id -> the bytes it decodes to; NULL for special tokens */
    size_t *token_bytes_len;
    text_slot *vocab;
    size_t vocab_slots;
    pair_slot *merges;
    size_t merge_slots;
    int32_t byte_id[256];   /* the id of each single byte's symbol */
    char byte_char[256][3]; /* each byte's printable stand-in, UTF-8 */
    uint8_t byte_char_len[256];
    added_token *added;
    size_t n_added;
    pre_step *steps;
    size_t n_steps;
    int nfc;
    int ignore_merges;
};

/* The GPT-2 byte <-> printable character map: printable Latin-1 bytes stand for themselves, the rest
 * take code points from 256 up, in byte order. */
static int byte_to_codepoint(int b) {
    if ((b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255)) return b;
    int n = 0;
    for (int c = 0; c < b; c++)
        if (!((c >= 33 && c <= 126) || (c >= 161 && c <= 172) || (c >= 174 && c <= 255))) n++;
    return 256 + n;
}

static size_t encode_codepoint(int cp, char *out) {
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char)(0xC0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    out[0] = (char)(0xE0 | (cp >> 12));
    out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
    out[2] = (char)(0x80 | (cp & 0x3F));
    return 3;
}

static int32_t vocab_find(const sg_tokenizer *t, const char *s, size_t n) {
    size_t mask = t->vocab_slots - 1;
    for (size_t i = hash_bytes(s, n) & mask;; i = (i + 1) & mask) {
        const text_slot *slot = &t->vocab[i];
        if (!slot->key) return -1;
        if (slot->key_len == n && !memcmp(slot->key, s, n)) return slot->id;
    }
}

static void vocab_put(sg_tokenizer *t, const char *s, size_t n, int32_t id) {
    size_t mask = t->vocab_slots - 1;
    size_t i = hash_bytes(s, n) & mask;
    while (t->vocab[i].key && !(t->vocab[i].key_len == n && !memcmp(t->vocab[i].key, s, n))) i = (i + 1) & mask;
    t->vocab[i] = (text_slot){s, n, id};
}

static const pair_slot *merge_find(const sg_tokenizer *t, int32_t a, int32_t b) {
    uint64_t key = ((uint64_t)(uint32_t)a << 32 | (uint32_t)b) + 1;
    size_t mask = t->merge_slots - 1;
    for (size_t i = hash_u64(key) & mask;; i = (i + 1) & mask) {
        if (!t->merges[i].key) return NULL;
        if (t->merges[i].key == key) return &t->merges[i];
    }
}

static void merge_put(sg_tokenizer *t, int32_t a, int32_t b, int32_t rank, int32_t merged) {
    uint64_t key = ((uint64_t)(uint32_t)a << 32 | (uint32_t)b) + 1;
    size_t mask = t->merge_slots - 1;
    size_t i = hash_u64(key) & mask;
    while (t->merges[i].key && t->merges[i].key != key) i = (i + 1) & mask;
    if (!t->merges[i].key) t->merges[i] = (pair_slot){key, rank, merged}; /* the first (lowest) rank wins */
}

static pcre2_code *compile_regex(const char *pattern, int literal, sg_status *st, const char *path) {
    int code;
    PCRE2_SIZE at;
    uint32_t flags = PCRE2_UTF | PCRE2_UCP | (literal ? PCRE2_LITERAL : 0);
    pcre2_code *re = pcre2_compile((PCRE2_SPTR)pattern, PCRE2_ZERO_TERMINATED, flags, &code, &at, NULL);
    if (!re) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(code, msg, sizeof msg);
        *st = sg_fail(SG_ERR_UNSUPPORTED, "%s: pre-tokenizer regex does not compile at %zu (%s)", path, (size_t)at,
                      (char *)msg);
        return NULL;
    }
    pcre2_jit_compile(re, PCRE2_JIT_COMPLETE); /* optional: falls back to the interpreter */
    return re;
}

static const char GPT2_PATTERN[] = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

static int json_flag(const cJSON *o, const char *key, int fallback) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsBool(v) ? cJSON_IsTrue(v) : fallback;
}

static const char *json_str(const cJSON *o, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

static sg_status add_step(sg_tokenizer *t, const cJSON *p, const char *path) {
    const char *type = json_str(p, "type");
    sg_status st = SG_OK;
    if (!type) return sg_fail(SG_ERR_UNSUPPORTED, "%s: a pre-tokenizer has no type", path);
    if (!strcmp(type, "Sequence")) {
        const cJSON *item;
        cJSON_ArrayForEach(item, cJSON_GetObjectItemCaseSensitive(p, "pretokenizers")) {
            if ((st = add_step(t, item, path)) != SG_OK) return st;
        }
        return SG_OK;
    }
    pre_step *grown = realloc(t->steps, (t->n_steps + 1) * sizeof *grown);
    if (!grown) return sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory");
    t->steps = grown;
    pre_step *s = &t->steps[t->n_steps];
    memset(s, 0, sizeof *s);
    if (!strcmp(type, "ByteLevel")) {
        s->kind = STEP_BYTE_LEVEL;
        s->add_prefix_space = json_flag(p, "add_prefix_space", 0);
        if (json_flag(p, "use_regex", 1) && !(s->regex = compile_regex(GPT2_PATTERN, 0, &st, path))) return st;
    } else if (!strcmp(type, "Split")) {
        s->kind = STEP_SPLIT;
        const cJSON *pattern = cJSON_GetObjectItemCaseSensitive(p, "pattern");
        const char *regex = json_str(pattern, "Regex"), *literal = json_str(pattern, "String");
        const char *behavior = json_str(p, "behavior");
        if ((!regex && !literal) || json_flag(p, "invert", 0) || !behavior ||
            (strcmp(behavior, "Isolated") && strcmp(behavior, "Removed")))
            return sg_fail(SG_ERR_UNSUPPORTED,
                           "%s: a Split pre-tokenizer of a kind this library does not run "
                           "(behavior %s)",
                           path, behavior ? behavior : "?");
        s->remove_matches = !strcmp(behavior, "Removed");
        if (!(s->regex = compile_regex(regex ? regex : literal, !regex, &st, path))) return st;
    } else if (!strcmp(type, "Digits")) {
        s->kind = STEP_DIGITS;
        s->individual_digits = json_flag(p, "individual_digits", 0);
    } else {
        return sg_fail(SG_ERR_UNSUPPORTED, "%s: pre-tokenizer %s is not supported by the C library", path, type);
    }
    t->n_steps++;
    return SG_OK;
}

static sg_status load_merges(sg_tokenizer *t, const cJSON *merges, const char *path) {
    int n = cJSON_GetArraySize(merges);
    t->merge_slots = table_size((size_t)n);
    t->merges = calloc(t->merge_slots, sizeof *t->merges);
    if (!t->merges) return sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory");
    sg_buf joined = {0};
    int rank = 0;
    const cJSON *m;
    cJSON_ArrayForEach(m, merges) {
        const char *a, *b;
        size_t alen, blen;
        const char *space;
        if (cJSON_IsArray(m) && cJSON_GetArraySize(m) == 2 && cJSON_IsString(cJSON_GetArrayItem(m, 0)) &&
            cJSON_IsString(cJSON_GetArrayItem(m, 1))) {
            a = cJSON_GetArrayItem(m, 0)->valuestring;
            b = cJSON_GetArrayItem(m, 1)->valuestring;
            alen = strlen(a);
            blen = strlen(b);
        } else if (cJSON_IsString(m) && (space = strchr(m->valuestring, ' '))) {
            a = m->valuestring;
            alen = (size_t)(space - a);
            b = space + 1;
            blen = strlen(b);
        } else {
            sg_buf_free(&joined);
            return sg_fail(SG_ERR_CORRUPT_BUNDLE, "%s: merge %d is neither [a, b] nor \"a b\"", path, rank);
        }
        joined.len = 0;
        if (sg_buf_append(&joined, a, alen) || sg_buf_append(&joined, b, blen)) {
            sg_buf_free(&joined);
            return sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory");
        }
        int32_t ia = vocab_find(t, a, alen), ib = vocab_find(t, b, blen), im = vocab_find(t, joined.data, joined.len);
        if (ia >= 0 && ib >= 0 && im >= 0) merge_put(t, ia, ib, rank, im);
        rank++;
    }
    sg_buf_free(&joined);
    return SG_OK;
}

static int set_token(sg_tokenizer *t, int32_t id, const char *text, size_t len) {
    free(t->token_text[id]); /* a vocabulary listing one id twice: the last text wins, as in a JSON object */
    t->token_text[id] = malloc(len + 1);
    if (!t->token_text[id]) return -1;
    memcpy(t->token_text[id], text, len);
    t->token_text[id][len] = '\0';
    t->token_len[id] = len;
    return 0;
}

/* The bytes a token decodes to: its characters mapped back through the byte map, or its text as it
 * is when any character is outside the map (as the ByteLevel decoder does). */
static int set_token_bytes(sg_tokenizer *t, int32_t id, const int16_t *cp_to_byte) {
    const char *s = t->token_text[id];
    size_t n = t->token_len[id], out = 0;
    char *bytes = malloc(n + 1);
    if (!bytes) return -1;
    size_t i = 0;
    while (i < n) {
        utf8proc_int32_t cp;
        utf8proc_ssize_t step = utf8proc_iterate((const utf8proc_uint8_t *)s + i, (utf8proc_ssize_t)(n - i), &cp);
        if (step <= 0 || cp >= 512 || cp_to_byte[cp] < 0) {
            memcpy(bytes, s, n);
            out = n;
            break;
        }
        bytes[out++] = (char)cp_to_byte[cp];
        i += (size_t)step;
    }
    t->token_bytes[id] = bytes;
    t->token_bytes_len[id] = out;
    return 0;
}

static sg_status load_model(sg_tokenizer *t, const cJSON *root, const char *path) {
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model");
    const char *type = json_str(model, "type");
    if (!type || strcmp(type, "BPE"))
        return sg_fail(SG_ERR_UNSUPPORTED, "%s: tokenizer model %s; the C library runs byte-level BPE only", path,
                       type ? type : "(none)");
    const char *prefix = json_str(model, "continuing_subword_prefix"), *suffix = json_str(model, "end_of_word_suffix");
    if ((prefix && *prefix) || (suffix && *suffix) || json_flag(model, "byte_fallback", 0))
        return sg_fail(SG_ERR_UNSUPPORTED,
                       "%s: BPE with subword prefixes, suffixes or byte fallback is not "
                       "supported by the C library",
                       path);
    t->ignore_merges = json_flag(model, "ignore_merges", 0);
    const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(model, "vocab");
    const cJSON *added = cJSON_GetObjectItemCaseSensitive(root, "added_tokens");
    if (!cJSON_IsObject(vocab)) return sg_fail(SG_ERR_CORRUPT_BUNDLE, "%s: no BPE vocabulary", path);
    int32_t top = -1;
    const cJSON *e;
    cJSON_ArrayForEach(e, vocab) {
        if (!cJSON_IsNumber(e) || e->valuedouble < 0 || e->valuedouble > 1e8)
            return sg_fail(SG_ERR_CORRUPT_BUNDLE, "%s: vocabulary entry with a bad id", path);
        if (e->valueint > top) top = e->valueint;
    }
    cJSON_ArrayForEach(e, added) {
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(e, "id");
        if (cJSON_IsNumber(id) && id->valueint > top && id->valuedouble <= 1e8) top = id->valueint;
    }
    t->vocab_size = top + 1;
    t->token_text = calloc((size_t)t->vocab_size, sizeof *t->token_text);
    t->token_len = calloc((size_t)t->vocab_size, sizeof *t->token_len);
    t->token_bytes = calloc((size_t)t->vocab_size, sizeof *t->token_bytes);
    t->token_bytes_len = calloc((size_t)t->vocab_size, sizeof *t->token_bytes_len);
    t->vocab_slots = table_size((size_t)t->vocab_size);
    t->vocab = calloc(t->vocab_slots, sizeof *t->vocab);
    if (!t->token_text || !t->token_len || !t->token_bytes || !t->token_bytes_len || !t->vocab)
        return sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory");
    cJSON_ArrayForEach(e, vocab) {
        if (set_token(t, e->valueint, e->string, strlen(e->string)))
            return sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory");
    }
    cJSON_ArrayForEach(e, vocab) vocab_put(t, t->token_text[e->valueint], t->token_len[e->valueint], e->valueint);

    int16_t cp_to_byte[512];
    memset(cp_to_byte, -1, sizeof cp_to_byte);
    for (int b = 0; b < 256; b++) {
        int cp = byte_to_codepoint(b);
        cp_to_byte[cp] = (int16_t)b;
        t->byte_char_len[b] = (uint8_t)encode_codepoint(cp, t->byte_char[b]);
        t->byte_id[b] = vocab_find(t, t->byte_char[b], t->byte_char_len[b]);
    }

    int n_added = cJSON_GetArraySize(added);
    t->added = calloc(n_added > 0 ? (size_t)n_added : 1, sizeof *t->added);
    if (!t->added) return sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory");
    cJSON_ArrayForEach(e, added) {
        const char *content = json_str(e, "content");
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(e, "id");
        if (!content || !*content || !cJSON_IsNumber(id) || id->valueint < 0)
            return sg_fail(SG_ERR_CORRUPT_BUNDLE, "%s: an added token without content or id", path);
        added_token *a = &t->added[t->n_added++];
        a->len = strlen(content);
        a->content = strdup(content);
        a->id = id->valueint;
        a->special = json_flag(e, "special", 0);
        a->lstrip = json_flag(e, "lstrip", 0);
        a->rstrip = json_flag(e, "rstrip", 0);
        if (!a->content) return sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory");
        /* an id the vocabulary already names keeps that entry (the vocabulary's index points at it) */
        if (!t->token_text[a->id] && set_token(t, a->id, content, a->len))
            return sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory");
    }
    for (int32_t id = 0; id < t->vocab_size; id++) {
        if (t->token_text[id] && set_token_bytes(t, id, cp_to_byte))
            return sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory");
    }
    for (size_t i = 0; i < t->n_added; i++) {
        if (t->added[i].special) {
            free(t->token_bytes[t->added[i].id]);
            t->token_bytes[t->added[i].id] = NULL;
        }
    }
    return load_merges(t, cJSON_GetObjectItemCaseSensitive(model, "merges"), path);
}

sg_tokenizer *sg_tokenizer_load(const char *path, sg_status *status) {
    cJSON *root = sg_read_json(path, status);
    if (!root) return NULL;
    sg_tokenizer *t = calloc(1, sizeof *t);
    sg_status st = t ? load_model(t, root, path) : sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory");
    if (st == SG_OK) {
        const cJSON *norm = cJSON_GetObjectItemCaseSensitive(root, "normalizer");
        const char *ntype = json_str(norm, "type");
        if (ntype && !strcmp(ntype, "NFC"))
            t->nfc = 1;
        else if (norm && !cJSON_IsNull(norm))
            st = sg_fail(SG_ERR_UNSUPPORTED, "%s: normalizer %s is not supported by the C library", path,
                         ntype ? ntype : "?");
    }
    const cJSON *pre = cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer");
    if (st == SG_OK && pre && !cJSON_IsNull(pre)) st = add_step(t, pre, path);
    const char *dtype = json_str(cJSON_GetObjectItemCaseSensitive(root, "decoder"), "type");
    if (st == SG_OK && (!dtype || strcmp(dtype, "ByteLevel")))
        st = sg_fail(SG_ERR_UNSUPPORTED, "%s: decoder %s; the C library runs byte-level BPE only", path,
                     dtype ? dtype : "(none)");
    cJSON_Delete(root);
    if (st != SG_OK) {
        sg_tokenizer_free(t);
        *status = st;
        return NULL;
    }
    *status = SG_OK;
    return t;
}

void sg_tokenizer_free(sg_tokenizer *t) {
    if (!t) return;
    for (int32_t i = 0; t->token_text && i < t->vocab_size; i++) free(t->token_text[i]);
    for (int32_t i = 0; t->token_bytes && i < t->vocab_size; i++) free(t->token_bytes[i]);
    free(t->token_text);
    free(t->token_len);
    free(t->token_bytes);
    free(t->token_bytes_len);
    free(t->vocab);
    free(t->merges);
    for (size_t i = 0; i < t->n_added; i++) free(t->added[i].content);
    free(t->added);
    for (size_t i = 0; i < t->n_steps; i++) pcre2_code_free(t->steps[i].regex);
    free(t->steps);
    free(t);
}

int32_t sg_tokenizer_vocab_size(const sg_tokenizer *t) { return t->vocab_size; }

/* ---- encoding ----------------------------------------------------------------------------------- */

typedef struct {
    char *data;
    size_t len;
} piece;

typedef struct {
    piece *items;
    size_t count, cap;
} piece_list;

static int pieces_push(piece_list *l, const char *data, size_t len) {
    if (!len) return 0;
    if (l->count == l->cap) {
        size_t cap = l->cap ? 2 * l->cap : 16;
        piece *grown = realloc(l->items, cap * sizeof *grown);
        if (!grown) return -1;
        l->items = grown;
        l->cap = cap;
    }
    char *copy = malloc(len);
    if (!copy) return -1;
    memcpy(copy, data, len);
    l->items[l->count++] = (piece){copy, len};
    return 0;
}

static void pieces_free(piece_list *l) {
    for (size_t i = 0; i < l->count; i++) free(l->items[i].data);
    free(l->items);
    *l = (piece_list){0};
}

static int split_regex(const pcre2_code *re, int remove_matches, const piece *p, piece_list *out) {
    pcre2_match_data *md = pcre2_match_data_create_from_pattern(re, NULL);
    if (!md) return -1;
    size_t at = 0;
    int rc = 0;
    while (at < p->len) {
        int n = pcre2_match(re, (PCRE2_SPTR)p->data, p->len, at, PCRE2_NO_UTF_CHECK, md, NULL);
        if (n < 0) break;
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
        size_t start = ov[0], end = ov[1];
        if (end == start) { /* an empty match: step over one character */
            end = start + 1;
            while (end < p->len && ((unsigned char)p->data[end] & 0xC0) == 0x80) end++;
            if (pieces_push(out, p->data + at, end - at)) rc = -1;
            at = end;
            continue;
        }
        if (pieces_push(out, p->data + at, start - at) ||
            (!remove_matches && pieces_push(out, p->data + start, end - start)))
            rc = -1;
        at = end;
    }
    if (at < p->len && pieces_push(out, p->data + at, p->len - at)) rc = -1;
    pcre2_match_data_free(md);
    return rc;
}

static int split_digits(int individual, const piece *p, piece_list *out) {
    size_t run = 0;
    for (size_t i = 0; i < p->len;) {
        int digit = p->data[i] >= '0' && p->data[i] <= '9';
        size_t j = i + 1;
        if (digit && !individual)
            while (j < p->len && p->data[j] >= '0' && p->data[j] <= '9') j++;
        if (digit) {
            if (pieces_push(out, p->data + run, i - run) || pieces_push(out, p->data + i, j - i)) return -1;
            run = j;
        }
        i = j;
    }
    return pieces_push(out, p->data + run, p->len - run);
}

static int apply_step(const pre_step *s, piece_list *l) {
    piece_list out = {0};
    int rc = 0;
    for (size_t i = 0; i < l->count && !rc; i++) {
        piece *p = &l->items[i];
        if (s->kind == STEP_BYTE_LEVEL && s->add_prefix_space && p->data[0] != ' ') {
            char *spaced = malloc(p->len + 1);
            if (!spaced) {
                rc = -1;
                break;
            }
            spaced[0] = ' ';
            memcpy(spaced + 1, p->data, p->len);
            free(p->data);
            p->data = spaced;
            p->len++;
        }
        if (s->kind == STEP_DIGITS)
            rc = split_digits(s->individual_digits, p, &out);
        else if (s->regex)
            rc = split_regex(s->regex, s->remove_matches, p, &out);
        else
            rc = pieces_push(&out, p->data, p->len);
    }
    pieces_free(l);
    *l = out;
    return rc;
}

static int push_id(int32_t **ids, size_t *count, size_t *cap, int32_t id) {
    if (*count == *cap) {
        size_t grown_cap = *cap ? 2 * *cap : 64;
        int32_t *grown = realloc(*ids, grown_cap * sizeof *grown);
        if (!grown) return -1;
        *ids = grown;
        *cap = grown_cap;
    }
    (*ids)[(*count)++] = id;
    return 0;
}

/* A candidate merge of the symbols at `left` and the one after it, ordered by rank, then position. */
typedef struct {
    int32_t rank, left, left_id, right_id;
} candidate;

typedef struct {
    candidate *items;
    size_t count;
} merge_queue;

static int before(const candidate *a, const candidate *b) {
    return a->rank != b->rank ? a->rank < b->rank : a->left < b->left;
}

static void queue_push(merge_queue *q, candidate c) {
    size_t i = q->count++;
    while (i && before(&c, &q->items[(i - 1) / 2])) {
        q->items[i] = q->items[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    q->items[i] = c;
}

static candidate queue_pop(merge_queue *q) {
    candidate top = q->items[0], last = q->items[--q->count];
    size_t i = 0;
    for (;;) {
        size_t child = 2 * i + 1;
        if (child >= q->count) break;
        if (child + 1 < q->count && before(&q->items[child + 1], &q->items[child])) child++;
        if (!before(&q->items[child], &last)) break;
        q->items[i] = q->items[child];
        i = child;
    }
    if (q->count) q->items[i] = last;
    return top;
}

static void consider(const sg_tokenizer *t, merge_queue *q, const int32_t *sym, int32_t left, int32_t right) {
    if (left < 0 || right < 0) return;
    const pair_slot *m = merge_find(t, sym[left], sym[right]);
    if (m) queue_push(q, (candidate){m->rank, left, sym[left], sym[right]});
}

/* BPE over one pre-tokenized piece: start from its bytes' symbols and merge the lowest-ranked adjacent
 * pair (the leftmost among equals) until no pair has a merge, through a queue of candidates that are
 * dropped when a neighbour changed (n log n, so a long word cannot stall the caller). */
static int bpe_piece(const sg_tokenizer *t, const piece *p, int32_t **ids, size_t *count, size_t *cap) {
    if (t->ignore_merges) {
        sg_buf mapped = {0};
        for (size_t i = 0; i < p->len; i++) {
            unsigned char byte = (unsigned char)p->data[i];
            if (sg_buf_append(&mapped, t->byte_char[byte], t->byte_char_len[byte])) return -1;
        }
        int32_t whole = vocab_find(t, mapped.data, mapped.len);
        sg_buf_free(&mapped);
        if (whole >= 0) return push_id(ids, count, cap, whole);
    }
    int32_t *sym = malloc(p->len * sizeof *sym), *next = malloc(p->len * sizeof *next);
    int32_t *prev = malloc(p->len * sizeof *prev);
    /* every merge adds at most two candidates to the n - 1 of the start */
    merge_queue q = {malloc(3 * (p->len + 1) * sizeof *q.items), 0};
    int rc = -1;
    if (!sym || !next || !prev || !q.items) goto done;
    int32_t n = 0;
    for (size_t i = 0; i < p->len; i++) {
        int32_t id = t->byte_id[(unsigned char)p->data[i]];
        if (id >= 0) sym[n++] = id; /* a vocabulary without this byte drops it, as BPE without unk does */
    }
    for (int32_t i = 0; i < n; i++) {
        prev[i] = i - 1;
        next[i] = i + 1 < n ? i + 1 : -1;
    }
    for (int32_t i = 0; i + 1 < n; i++) consider(t, &q, sym, i, i + 1);
    while (q.count) {
        candidate c = queue_pop(&q);
        int32_t right = next[c.left];
        if (sym[c.left] != c.left_id || right < 0 || sym[right] != c.right_id || prev[c.left] == -2) continue;
        sym[c.left] = merge_find(t, c.left_id, c.right_id)->merged;
        next[c.left] = next[right];
        if (next[right] >= 0) prev[next[right]] = c.left;
        prev[right] = -2; /* gone */
        consider(t, &q, sym, prev[c.left], c.left);
        consider(t, &q, sym, c.left, next[c.left]);
    }
    rc = 0;
    for (int32_t i = n ? 0 : -1; i >= 0 && !rc; i = next[i]) rc = push_id(ids, count, cap, sym[i]);
done:
    free(sym);
    free(next);
    free(prev);
    free(q.items);
    return rc;
}

static sg_status encode_segment(const sg_tokenizer *t, const char *text, size_t len, int32_t **ids, size_t *count,
                                size_t *cap) {
    if (!len) return SG_OK;
    piece_list l = {0};
    utf8proc_uint8_t *nfc = NULL;
    if (t->nfc) {
        utf8proc_ssize_t n = utf8proc_map((const utf8proc_uint8_t *)text, (utf8proc_ssize_t)len, &nfc,
                                          UTF8PROC_STABLE | UTF8PROC_COMPOSE);
        if (n < 0) return sg_fail(SG_ERR_INVALID_ARGUMENT, "text cannot be NFC-normalized (%s)", utf8proc_errmsg(n));
        text = (const char *)nfc;
        len = (size_t)n;
    }
    int rc = pieces_push(&l, text, len);
    free(nfc);
    for (size_t s = 0; s < t->n_steps && !rc; s++) rc = apply_step(&t->steps[s], &l);
    for (size_t i = 0; i < l.count && !rc; i++) rc = bpe_piece(t, &l.items[i], ids, count, cap);
    pieces_free(&l);
    return rc ? sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory while tokenizing") : SG_OK;
}

static int is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }

/* The leftmost added token in text[from..len), the longest one where several start there. */
static const added_token *find_added(const sg_tokenizer *t, const char *text, size_t len, size_t from, size_t *at) {
    for (size_t i = from; i < len; i++) {
        const added_token *best = NULL;
        for (size_t k = 0; k < t->n_added; k++) {
            const added_token *a = &t->added[k];
            if (a->len <= len - i && a->content[0] == text[i] && !memcmp(a->content, text + i, a->len) &&
                (!best || a->len > best->len))
                best = a;
        }
        if (best) {
            *at = i;
            return best;
        }
    }
    return NULL;
}

sg_status sg_tokenizer_encode(const sg_tokenizer *t, const char *text, size_t len, int32_t **ids, size_t *count,
                              size_t *cap) {
    size_t bad = sg_utf8_valid_prefix(text, len);
    if (bad != len) return sg_fail(SG_ERR_INVALID_ARGUMENT, "the text is not valid UTF-8 (at byte %zu)", bad);
    size_t from = 0;
    for (;;) {
        size_t at = len;
        const added_token *a = find_added(t, text, len, from, &at);
        size_t seg_end = at, next = a ? at + a->len : len;
        if (a && a->lstrip)
            while (seg_end > from && is_space(text[seg_end - 1])) seg_end--;
        if (a && a->rstrip)
            while (next < len && is_space(text[next])) next++;
        sg_status st = encode_segment(t, text + from, seg_end - from, ids, count, cap);
        if (st != SG_OK) return st;
        if (!a) return SG_OK;
        if (push_id(ids, count, cap, a->id)) return sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory while tokenizing");
        from = next;
    }
}

int sg_tokenizer_decode_bytes(const sg_tokenizer *t, const int32_t *ids, size_t count, sg_buf *b) {
    for (size_t i = 0; i < count; i++) {
        int32_t id = ids[i];
        if (id < 0 || id >= t->vocab_size || !t->token_bytes[id]) continue;
        if (sg_buf_append(b, t->token_bytes[id], t->token_bytes_len[id])) return -1;
    }
    return 0;
}
