#include "tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <cjson/cJSON.h>
#include <pcre2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

/* ---- hash maps: text -> id, and a merge's pair of ids -> (rank, merged id) ----------------------- */

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

static int32_t text_find(const text_slot *slots, size_t n_slots, const char *s, size_t n) {
    size_t mask = n_slots - 1;
    for (size_t i = hash_bytes(s, n) & mask;; i = (i + 1) & mask) {
        if (!slots[i].key) return -1;
        if (slots[i].key_len == n && !memcmp(slots[i].key, s, n)) return slots[i].id;
    }
}

static void text_put(text_slot *slots, size_t n_slots, const char *s, size_t n, int32_t id) {
    size_t mask = n_slots - 1;
    size_t i = hash_bytes(s, n) & mask;
    while (slots[i].key && !(slots[i].key_len == n && !memcmp(slots[i].key, s, n))) i = (i + 1) & mask;
    slots[i] = (text_slot){s, n, id};
}

/* ---- the tokenizer ------------------------------------------------------------------------------ */

typedef enum { NORM_NFC, NORM_REPLACE, NORM_PREPEND } norm_kind;

typedef struct {
    norm_kind kind;
    char *from, *to; /* NORM_REPLACE: every `from` becomes `to`; NORM_PREPEND: `to` goes in front */
    size_t from_len, to_len;
} norm_step;

typedef enum { STEP_SPLIT, STEP_DIGITS, STEP_BYTE_LEVEL, STEP_METASPACE } step_kind;
/* how a split keeps its delimiters (tokenizers' SplitDelimiterBehavior) */
typedef enum { KEEP_REMOVED, KEEP_ISOLATED, KEEP_WITH_PREVIOUS, KEEP_WITH_NEXT, KEEP_CONTIGUOUS } split_behavior;
typedef enum { PREPEND_NEVER, PREPEND_FIRST, PREPEND_ALWAYS } prepend_scheme;

typedef struct {
    step_kind kind;
    pcre2_code *regex; /* STEP_SPLIT, and STEP_BYTE_LEVEL with use_regex */
    split_behavior behavior;
    int invert;
    int individual_digits; /* STEP_DIGITS */
    int add_prefix_space;  /* STEP_BYTE_LEVEL */
    char replacement[5];   /* STEP_METASPACE: one character, UTF-8 */
    size_t replacement_len;
    prepend_scheme prepend;
    int split;
} pre_step;

typedef enum { DEC_REPLACE, DEC_BYTE_FALLBACK, DEC_FUSE, DEC_STRIP, DEC_METASPACE } dec_kind;

typedef struct {
    dec_kind kind;
    char *from, *to; /* DEC_REPLACE; DEC_STRIP and DEC_METASPACE: `from` is the character */
    size_t from_len, to_len;
    int start, stop; /* DEC_STRIP */
    prepend_scheme prepend;
} dec_step;

typedef struct {
    char *content;
    size_t len;
    int32_t id;
    int special, lstrip, rstrip, normalized;
} added_token;

/* The added tokens matched in one pass (on the raw text, or on each piece after normalization): by
 * content, and for each first byte the lengths that occur, longest first. */
typedef struct {
    text_slot *slots;
    size_t n_slots;
    size_t *lengths[256];
    size_t n_lengths[256];
} added_set;

struct sg_tokenizer {
    int32_t vocab_size; /* one past the highest id */
    char **token_text;  /* id -> text (the vocabulary's form; added tokens: content) */
    size_t *token_len;
    char **token_bytes; /* id -> the bytes the ByteLevel decoder gives it */
    size_t *token_bytes_len;
    uint8_t *special; /* id -> skipped when decoding */
    text_slot *vocab;
    size_t vocab_slots;
    pair_slot *merges;
    size_t merge_slots;
    char byte_char[256][3]; /* the ByteLevel stand-in character of each byte, UTF-8 */
    uint8_t byte_char_len[256];
    int32_t fallback_id[256]; /* the <0xHH> token of each byte; -1 when absent */
    int32_t unk_id;
    int byte_fallback, fuse_unk, ignore_merges;
    added_token *added;
    size_t n_added;
    added_set raw_added, normalized_added;
    norm_step *norms;
    size_t n_norms;
    pre_step *steps;
    size_t n_steps;
    int byte_level;         /* a ByteLevel pre-tokenizer (the last step): BPE runs on its byte characters */
    int byte_level_decoder; /* the ByteLevel decoder; otherwise the `decs` chain */
    dec_step *decs;
    size_t n_decs;
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

/* Length of the UTF-8 character that starts with byte c (the text is valid UTF-8). */
static size_t char_len(unsigned char c) { return c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4; }

static int32_t vocab_find(const sg_tokenizer *t, const char *s, size_t n) {
    return text_find(t->vocab, t->vocab_slots, s, n);
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

/* ---- reading tokenizer.json ----------------------------------------------------------------------- */

static pcre2_code *compile_regex(const char *pattern, int literal, sg_status *st, const char *path) {
    int code;
    PCRE2_SIZE at;
    uint32_t flags = PCRE2_UTF | (literal ? PCRE2_LITERAL : PCRE2_UCP); /* UCP is refused beside LITERAL */
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

/* A single-character string option (Metaspace's replacement, Strip's content). */
static int one_char(const char *s, char out[5], size_t *len) {
    if (!s || !*s) return -1;
    size_t n = char_len((unsigned char)s[0]);
    if (strlen(s) != n || n > 4) return -1;
    memcpy(out, s, n);
    out[n] = '\0';
    *len = n;
    return 0;
}

/* Metaspace's prepend_scheme, or the older add_prefix_space flag; -1 when neither is readable. */
static int read_prepend(const cJSON *o) {
    const char *scheme = json_str(o, "prepend_scheme");
    if (scheme) return !strcmp(scheme, "always") ? PREPEND_ALWAYS
                       : !strcmp(scheme, "first") ? PREPEND_FIRST
                       : !strcmp(scheme, "never") ? PREPEND_NEVER
                                                  : -1;
    return json_flag(o, "add_prefix_space", 1) ? PREPEND_ALWAYS : PREPEND_NEVER;
}

/* A Replace's {"pattern": {"String": ...}, "content": ...}; a regex pattern is not run. */
static int read_replace(const cJSON *o, char **from, size_t *from_len, char **to, size_t *to_len) {
    const char *pattern = json_str(cJSON_GetObjectItemCaseSensitive(o, "pattern"), "String");
    const char *content = json_str(o, "content");
    if (!pattern || !*pattern || !content) return -1;
    *from = strdup(pattern);
    *to = strdup(content);
    *from_len = strlen(pattern);
    *to_len = strlen(content);
    return 0;
}

static sg_status add_norm(sg_tokenizer *t, const cJSON *n, const char *path) {
    const char *type = json_str(n, "type");
    if (!type) return sg_fail(SG_ERR_UNSUPPORTED, "%s: a normalizer has no type", path);
    if (!strcmp(type, "Sequence")) {
        const cJSON *item;
        cJSON_ArrayForEach(item, cJSON_GetObjectItemCaseSensitive(n, "normalizers")) {
            sg_status st = add_norm(t, item, path);
            if (st != SG_OK) return st;
        }
        return SG_OK;
    }
    norm_step *grown = realloc(t->norms, (t->n_norms + 1) * sizeof *grown);
    if (!grown) return sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory");
    t->norms = grown;
    norm_step *s = &t->norms[t->n_norms];
    memset(s, 0, sizeof *s);
    if (!strcmp(type, "NFC")) {
        s->kind = NORM_NFC;
    } else if (!strcmp(type, "Replace")) {
        s->kind = NORM_REPLACE;
        if (read_replace(n, &s->from, &s->from_len, &s->to, &s->to_len))
            return sg_fail(SG_ERR_UNSUPPORTED, "%s: normalizer Replace with a regex or an empty pattern is not "
                           "supported by the C library", path);
    } else if (!strcmp(type, "Prepend")) {
        s->kind = NORM_PREPEND;
        const char *prepend = json_str(n, "prepend");
        if (!prepend) return sg_fail(SG_ERR_CORRUPT_BUNDLE, "%s: a Prepend normalizer without its text", path);
        s->to = strdup(prepend);
        s->to_len = strlen(prepend);
    } else {
        return sg_fail(SG_ERR_UNSUPPORTED, "%s: normalizer %s is not supported by the C library", path, type);
    }
    t->n_norms++;
    if ((s->kind != NORM_NFC && !s->to) || (s->kind == NORM_REPLACE && !s->from))
        return sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory");
    return SG_OK;
}

static int read_behavior(const char *b) {
    static const char *names[] = {"Removed", "Isolated", "MergedWithPrevious", "MergedWithNext", "Contiguous"};
    for (int i = 0; b && i < 5; i++)
        if (!strcmp(b, names[i])) return i;
    return -1;
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
    if (t->byte_level)
        return sg_fail(SG_ERR_UNSUPPORTED, "%s: pre-tokenizer %s after ByteLevel is not supported by the C library",
                       path, type);
    pre_step *grown = realloc(t->steps, (t->n_steps + 1) * sizeof *grown);
    if (!grown) return sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory");
    t->steps = grown;
    pre_step *s = &t->steps[t->n_steps];
    memset(s, 0, sizeof *s);
    if (!strcmp(type, "ByteLevel")) {
        s->kind = STEP_BYTE_LEVEL;
        s->behavior = KEEP_ISOLATED;
        s->add_prefix_space = json_flag(p, "add_prefix_space", 0);
        t->byte_level = 1;
        if (json_flag(p, "use_regex", 1) && !(s->regex = compile_regex(GPT2_PATTERN, 0, &st, path))) return st;
    } else if (!strcmp(type, "Split")) {
        s->kind = STEP_SPLIT;
        const cJSON *pattern = cJSON_GetObjectItemCaseSensitive(p, "pattern");
        const char *regex = json_str(pattern, "Regex"), *literal = json_str(pattern, "String");
        const char *behavior = json_str(p, "behavior");
        int keep = read_behavior(behavior);
        if ((!regex && !literal) || (literal && !*literal) || keep < 0)
            return sg_fail(SG_ERR_UNSUPPORTED,
                           "%s: a Split pre-tokenizer of a kind this library does not run (behavior %s)", path,
                           behavior ? behavior : "?");
        s->behavior = (split_behavior)keep;
        s->invert = json_flag(p, "invert", 0);
        if (!(s->regex = compile_regex(regex ? regex : literal, !regex, &st, path))) return st;
    } else if (!strcmp(type, "Digits")) {
        s->kind = STEP_DIGITS;
        s->individual_digits = json_flag(p, "individual_digits", 0);
    } else if (!strcmp(type, "Metaspace")) {
        s->kind = STEP_METASPACE;
        int prepend = read_prepend(p);
        if (one_char(json_str(p, "replacement"), s->replacement, &s->replacement_len) || prepend < 0)
            return sg_fail(SG_ERR_UNSUPPORTED, "%s: a Metaspace pre-tokenizer of a kind this library does not run",
                           path);
        s->prepend = (prepend_scheme)prepend;
        s->split = json_flag(p, "split", 1);
    } else {
        return sg_fail(SG_ERR_UNSUPPORTED, "%s: pre-tokenizer %s is not supported by the C library", path, type);
    }
    t->n_steps++;
    return SG_OK;
}

static sg_status add_decoder(sg_tokenizer *t, const cJSON *d, const char *path) {
    const char *type = json_str(d, "type");
    if (!type) return sg_fail(SG_ERR_UNSUPPORTED, "%s: a decoder has no type", path);
    if (!strcmp(type, "Sequence")) {
        const cJSON *item;
        cJSON_ArrayForEach(item, cJSON_GetObjectItemCaseSensitive(d, "decoders")) {
            sg_status st = add_decoder(t, item, path);
            if (st != SG_OK) return st;
        }
        return SG_OK;
    }
    if (!strcmp(type, "ByteLevel")) {
        t->byte_level_decoder = 1;
        return SG_OK;
    }
    dec_step *grown = realloc(t->decs, (t->n_decs + 1) * sizeof *grown);
    if (!grown) return sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory");
    t->decs = grown;
    dec_step *s = &t->decs[t->n_decs];
    memset(s, 0, sizeof *s);
    char c[5];
    size_t clen;
    int bad = 0;
    if (!strcmp(type, "Replace")) {
        s->kind = DEC_REPLACE;
        bad = read_replace(d, &s->from, &s->from_len, &s->to, &s->to_len);
    } else if (!strcmp(type, "ByteFallback")) {
        s->kind = DEC_BYTE_FALLBACK;
    } else if (!strcmp(type, "Fuse")) {
        s->kind = DEC_FUSE;
    } else if (!strcmp(type, "Strip") || !strcmp(type, "Metaspace")) {
        int metaspace = !strcmp(type, "Metaspace");
        const cJSON *start = cJSON_GetObjectItemCaseSensitive(d, "start");
        const cJSON *stop = cJSON_GetObjectItemCaseSensitive(d, "stop");
        int prepend = metaspace ? read_prepend(d) : 0;
        bad = one_char(json_str(d, metaspace ? "replacement" : "content"), c, &clen) || prepend < 0 ||
              (!metaspace && (!cJSON_IsNumber(start) || !cJSON_IsNumber(stop) || start->valueint < 0 ||
                              stop->valueint < 0));
        s->kind = metaspace ? DEC_METASPACE : DEC_STRIP;
        s->prepend = (prepend_scheme)prepend;
        if (!bad) {
            s->from = strdup(c);
            s->from_len = clen;
            s->start = metaspace ? 0 : start->valueint;
            s->stop = metaspace ? 0 : stop->valueint;
        }
    } else {
        return sg_fail(SG_ERR_UNSUPPORTED, "%s: decoder %s is not supported by the C library", path, type);
    }
    t->n_decs++;
    if (bad)
        return sg_fail(SG_ERR_UNSUPPORTED, "%s: a %s decoder of a kind this library does not run (regex or "
                       "multi-character pattern)", path, type);
    if ((s->kind == DEC_REPLACE && (!s->from || !s->to)) || ((s->kind == DEC_STRIP || s->kind == DEC_METASPACE) &&
                                                             !s->from))
        return sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory");
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

/* The bytes the ByteLevel decoder gives a token: its characters mapped back through the byte map, or its
 * text as it is when any character is outside the map. */
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

static sg_status read_bpe_options(sg_tokenizer *t, const cJSON *model, const char *path) {
    const char *type = json_str(model, "type");
    if (!type || strcmp(type, "BPE"))
        return sg_fail(SG_ERR_UNSUPPORTED, "%s: tokenizer model %s; the C library runs BPE only", path,
                       type ? type : "(none)");
    const char *prefix = json_str(model, "continuing_subword_prefix"), *suffix = json_str(model, "end_of_word_suffix");
    if ((prefix && *prefix) || (suffix && *suffix))
        return sg_fail(SG_ERR_UNSUPPORTED,
                       "%s: BPE with a continuing_subword_prefix or end_of_word_suffix is not supported by "
                       "the C library", path);
    const cJSON *dropout = cJSON_GetObjectItemCaseSensitive(model, "dropout");
    if (cJSON_IsNumber(dropout) && dropout->valuedouble > 0)
        return sg_fail(SG_ERR_UNSUPPORTED, "%s: BPE dropout is not supported by the C library", path);
    t->ignore_merges = json_flag(model, "ignore_merges", 0);
    t->byte_fallback = json_flag(model, "byte_fallback", 0);
    t->fuse_unk = json_flag(model, "fuse_unk", 0);
    return SG_OK;
}

static sg_status read_added(sg_tokenizer *t, const cJSON *added, const char *path) {
    int n_added = cJSON_GetArraySize(added);
    t->added = calloc(n_added > 0 ? (size_t)n_added : 1, sizeof *t->added);
    if (!t->added) return sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory");
    const cJSON *e;
    cJSON_ArrayForEach(e, added) {
        const char *content = json_str(e, "content");
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(e, "id");
        if (!content || !*content || !cJSON_IsNumber(id) || id->valueint < 0)
            return sg_fail(SG_ERR_CORRUPT_BUNDLE, "%s: an added token without content or id", path);
        if (json_flag(e, "single_word", 0))
            return sg_fail(SG_ERR_UNSUPPORTED, "%s: added token %s is single_word, which the C library does not run",
                           path, content);
        added_token *a = &t->added[t->n_added++];
        a->len = strlen(content);
        a->content = strdup(content);
        a->id = id->valueint;
        a->special = json_flag(e, "special", 0);
        a->lstrip = json_flag(e, "lstrip", 0);
        a->rstrip = json_flag(e, "rstrip", 0);
        a->normalized = json_flag(e, "normalized", !a->special);
        if (!a->content) return sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory");
        /* an id the vocabulary already names keeps that entry (the vocabulary's index points at it) */
        if (!t->token_text[a->id] && set_token(t, a->id, content, a->len))
            return sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory");
        if (a->special) t->special[a->id] = 1;
    }
    return SG_OK;
}

static int cmp_desc(const void *a, const void *b) {
    size_t x = *(const size_t *)a, y = *(const size_t *)b;
    return x < y ? 1 : x > y ? -1 : 0;
}

static int build_added_set(sg_tokenizer *t, added_set *set, int normalized) {
    set->n_slots = table_size(t->n_added);
    set->slots = calloc(set->n_slots, sizeof *set->slots);
    if (!set->slots) return -1;
    for (size_t i = 0; i < t->n_added; i++) {
        const added_token *a = &t->added[i];
        if (a->normalized != normalized) continue;
        text_put(set->slots, set->n_slots, a->content, a->len, (int32_t)i);
        unsigned char first = (unsigned char)a->content[0];
        size_t k = 0;
        while (k < set->n_lengths[first] && set->lengths[first][k] != a->len) k++;
        if (k < set->n_lengths[first]) continue;
        size_t *grown = realloc(set->lengths[first], (k + 1) * sizeof *grown);
        if (!grown) return -1;
        grown[k] = a->len;
        set->lengths[first] = grown;
        set->n_lengths[first]++;
    }
    for (int b = 0; b < 256; b++)
        if (set->n_lengths[b]) qsort(set->lengths[b], set->n_lengths[b], sizeof(size_t), cmp_desc);
    return 0;
}

static void free_added_set(added_set *set) {
    free(set->slots);
    for (int b = 0; b < 256; b++) free(set->lengths[b]);
}

static sg_status load_model(sg_tokenizer *t, const cJSON *root, const char *path) {
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model");
    sg_status st = read_bpe_options(t, model, path);
    if (st != SG_OK) return st;
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
    size_t n = (size_t)t->vocab_size;
    t->token_text = calloc(n, sizeof *t->token_text);
    t->token_len = calloc(n, sizeof *t->token_len);
    t->token_bytes = calloc(n, sizeof *t->token_bytes);
    t->token_bytes_len = calloc(n, sizeof *t->token_bytes_len);
    t->special = calloc(n ? n : 1, 1);
    t->vocab_slots = table_size(n);
    t->vocab = calloc(t->vocab_slots, sizeof *t->vocab);
    if (!t->token_text || !t->token_len || !t->token_bytes || !t->token_bytes_len || !t->special || !t->vocab)
        return sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory");
    cJSON_ArrayForEach(e, vocab) {
        if (set_token(t, e->valueint, e->string, strlen(e->string)))
            return sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory");
    }
    cJSON_ArrayForEach(e, vocab) text_put(t->vocab, t->vocab_slots, t->token_text[e->valueint],
                                          t->token_len[e->valueint], e->valueint);
    const char *unk = json_str(model, "unk_token");
    t->unk_id = unk ? vocab_find(t, unk, strlen(unk)) : -1;
    for (int b = 0; b < 256; b++) {
        char name[8];
        snprintf(name, sizeof name, "<0x%02X>", b);
        t->fallback_id[b] = vocab_find(t, name, 6);
        t->byte_char_len[b] = (uint8_t)encode_codepoint(byte_to_codepoint(b), t->byte_char[b]);
    }
    if ((st = read_added(t, added, path)) != SG_OK) return st;
    if (build_added_set(t, &t->raw_added, 0) || build_added_set(t, &t->normalized_added, 1))
        return sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory");
    return load_merges(t, cJSON_GetObjectItemCaseSensitive(model, "merges"), path);
}

/* The ByteLevel decoder's bytes of every token, computed once. */
static sg_status load_byte_level_decoder(sg_tokenizer *t) {
    int16_t cp_to_byte[512];
    memset(cp_to_byte, -1, sizeof cp_to_byte);
    for (int b = 0; b < 256; b++) cp_to_byte[byte_to_codepoint(b)] = (int16_t)b;
    for (int32_t id = 0; id < t->vocab_size; id++) {
        if (t->token_text[id] && !t->special[id] && set_token_bytes(t, id, cp_to_byte))
            return sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory");
    }
    return SG_OK;
}

static sg_status load_pipeline(sg_tokenizer *t, const cJSON *root, const char *path) {
    const cJSON *norm = cJSON_GetObjectItemCaseSensitive(root, "normalizer");
    sg_status st = SG_OK;
    if (norm && !cJSON_IsNull(norm) && (st = add_norm(t, norm, path)) != SG_OK) return st;
    const cJSON *pre = cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer");
    if (pre && !cJSON_IsNull(pre) && (st = add_step(t, pre, path)) != SG_OK) return st;
    const cJSON *dec = cJSON_GetObjectItemCaseSensitive(root, "decoder");
    if (!dec || cJSON_IsNull(dec))
        return sg_fail(SG_ERR_UNSUPPORTED, "%s: no decoder; the C library runs BPE with a ByteLevel or "
                       "SentencePiece-style decoder", path);
    if ((st = add_decoder(t, dec, path)) != SG_OK) return st;
    if (t->byte_level_decoder && t->n_decs)
        return sg_fail(SG_ERR_UNSUPPORTED, "%s: the ByteLevel decoder combined with others is not supported by the "
                       "C library", path);
    return t->byte_level_decoder ? load_byte_level_decoder(t) : SG_OK;
}

sg_tokenizer *sg_tokenizer_load(const char *path, sg_status *status) {
    cJSON *root = sg_read_json(path, status);
    if (!root) return NULL;
    sg_tokenizer *t = calloc(1, sizeof *t);
    sg_status st = t ? load_model(t, root, path) : sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory");
    if (st == SG_OK) st = load_pipeline(t, root, path);
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
    free(t->special);
    free(t->vocab);
    free(t->merges);
    for (size_t i = 0; i < t->n_added; i++) free(t->added[i].content);
    free(t->added);
    free_added_set(&t->raw_added);
    free_added_set(&t->normalized_added);
    for (size_t i = 0; i < t->n_norms; i++) {
        free(t->norms[i].from);
        free(t->norms[i].to);
    }
    free(t->norms);
    for (size_t i = 0; i < t->n_steps; i++) pcre2_code_free(t->steps[i].regex);
    free(t->steps);
    for (size_t i = 0; i < t->n_decs; i++) {
        free(t->decs[i].from);
        free(t->decs[i].to);
    }
    free(t->decs);
    free(t);
}

int32_t sg_tokenizer_vocab_size(const sg_tokenizer *t) { return t->vocab_size; }

/* ---- normalization ------------------------------------------------------------------------------ */

static int replace_all(const char *s, size_t n, const char *from, size_t from_len, const char *to, size_t to_len,
                       sg_buf *out) {
    size_t at = 0;
    for (size_t i = 0; from_len <= n && i + from_len <= n;) {
        if (!memcmp(s + i, from, from_len)) {
            if (sg_buf_append(out, s + at, i - at) || sg_buf_append(out, to, to_len)) return -1;
            i += from_len;
            at = i;
        } else {
            i++;
        }
    }
    return sg_buf_append(out, s + at, n - at);
}

/* Apply the normalizers to text into out (which holds the result). */
static sg_status normalize(const sg_tokenizer *t, const char *text, size_t len, sg_buf *out) {
    if (sg_buf_append(out, text, len)) return sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory");
    for (size_t k = 0; k < t->n_norms; k++) {
        const norm_step *s = &t->norms[k];
        sg_buf next = {0};
        int rc = 0;
        if (s->kind == NORM_NFC) {
            utf8proc_uint8_t *nfc = NULL;
            utf8proc_ssize_t n = utf8proc_map((const utf8proc_uint8_t *)(out->data ? out->data : ""),
                                              (utf8proc_ssize_t)out->len, &nfc, UTF8PROC_STABLE | UTF8PROC_COMPOSE);
            if (n < 0)
                return sg_fail(SG_ERR_INVALID_ARGUMENT, "text cannot be NFC-normalized (%s)", utf8proc_errmsg(n));
            rc = sg_buf_append(&next, (const char *)nfc, (size_t)n);
            free(nfc);
        } else if (s->kind == NORM_REPLACE) {
            rc = replace_all(out->data, out->len, s->from, s->from_len, s->to, s->to_len, &next);
        } else if (out->len) { /* Prepend leaves an empty text empty */
            rc = sg_buf_append(&next, s->to, s->to_len) || sg_buf_append(&next, out->data, out->len);
        }
        sg_buf_free(out);
        *out = next;
        if (rc) return sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory");
    }
    return SG_OK;
}

/* ---- pre-tokenization --------------------------------------------------------------------------- */

typedef struct {
    char *data;
    size_t len;
    int at_origin; /* begins where the input text begins (Metaspace's prepend_scheme "first") */
} piece;

typedef struct {
    piece *items;
    size_t count, cap;
} piece_list;

static int pieces_push(piece_list *l, const char *data, size_t len, int at_origin) {
    if (!len) return 0; /* tokenizers drops empty pieces */
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
    l->items[l->count++] = (piece){copy, len, at_origin};
    return 0;
}

static void pieces_free(piece_list *l) {
    for (size_t i = 0; i < l->count; i++) free(l->items[i].data);
    free(l->items);
    *l = (piece_list){0};
}

/* A piece cut into spans [start, end), each a match of the delimiter or not. */
typedef struct {
    size_t start, end;
    int match;
} span;

typedef struct {
    span *items;
    size_t count, cap;
} span_list;

static int spans_push(span_list *l, size_t start, size_t end, int match) {
    if (l->count == l->cap) {
        size_t cap = l->cap ? 2 * l->cap : 16;
        span *grown = realloc(l->items, cap * sizeof *grown);
        if (!grown) return -1;
        l->items = grown;
        l->cap = cap;
    }
    l->items[l->count++] = (span){start, end, match};
    return 0;
}

/* The regex's matches in p and the text between them, in order. */
static int find_regex(const pcre2_code *re, const piece *p, span_list *out) {
    pcre2_match_data *md = pcre2_match_data_create_from_pattern(re, NULL);
    if (!md) return -1;
    size_t at = 0, prev = 0;
    int rc = 0;
    while (at <= p->len && !rc) {
        int n = pcre2_match(re, (PCRE2_SPTR)p->data, p->len, at, PCRE2_NO_UTF_CHECK, md, NULL);
        if (n < 0) break;
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
        size_t start = ov[0], end = ov[1];
        if (start > prev) rc |= spans_push(out, prev, start, 0);
        rc |= spans_push(out, start, end, 1);
        prev = end;
        at = end > start ? end : end + (end < p->len ? char_len((unsigned char)p->data[end]) : 1);
    }
    if (prev < p->len) rc |= spans_push(out, prev, p->len, 0);
    pcre2_match_data_free(md);
    return rc;
}

/* Every occurrence of one character in p, and the text between. */
static int find_char(const char *c, size_t clen, const piece *p, span_list *out) {
    size_t prev = 0;
    int rc = 0;
    for (size_t i = 0; i + clen <= p->len;) {
        if (!memcmp(p->data + i, c, clen)) {
            if (i > prev) rc |= spans_push(out, prev, i, 0);
            rc |= spans_push(out, i, i + clen, 1);
            i += clen;
            prev = i;
        } else {
            i += char_len((unsigned char)p->data[i]);
        }
    }
    if (prev < p->len) rc |= spans_push(out, prev, p->len, 0);
    return rc;
}

/* Cut p at its spans the way tokenizers' NormalizedString::split keeps delimiters (MergedWithNext walks
 * backwards, merging each delimiter into what follows it). */
static int split_spans(const piece *p, span_list *s, split_behavior keep, int invert, piece_list *out) {
    span_list kept = {0};
    int rc = 0, previous_match = 0, backwards = keep == KEEP_WITH_NEXT;
    for (size_t k = 0; k < s->count && !rc; k++) {
        span x = s->items[backwards ? s->count - 1 - k : k];
        if (invert) x.match = !x.match;
        span *last = kept.count ? &kept.items[kept.count - 1] : NULL;
        int join = keep == KEEP_CONTIGUOUS                                 ? x.match == previous_match
                   : keep == KEEP_WITH_PREVIOUS || keep == KEEP_WITH_NEXT ? x.match && !previous_match
                                                                           : 0;
        if (join && last && backwards)
            last->start = x.start;
        else if (join && last)
            last->end = x.end;
        else
            rc = spans_push(&kept, x.start, x.end, keep == KEEP_REMOVED && x.match);
        previous_match = x.match;
    }
    for (size_t k = 0; k < kept.count && !rc; k++) {
        const span *x = &kept.items[backwards ? kept.count - 1 - k : k];
        if (!x->match) rc = pieces_push(out, p->data + x->start, x->end - x->start, p->at_origin && x->start == 0);
    }
    free(kept.items);
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
            if (pieces_push(out, p->data + run, i - run, p->at_origin && run == 0) ||
                pieces_push(out, p->data + i, j - i, p->at_origin && i == 0))
                return -1;
            run = j;
        }
        i = j;
    }
    return pieces_push(out, p->data + run, p->len - run, p->at_origin && run == 0);
}

/* Metaspace: spaces become the replacement character, which is prepended as the scheme says; the piece is
 * then cut before each replacement character. */
static int metaspace(const pre_step *s, const piece *p, piece_list *out) {
    sg_buf text = {0};
    int prepend = s->prepend == PREPEND_ALWAYS || (s->prepend == PREPEND_FIRST && p->at_origin);
    int rc = replace_all(p->data, p->len, " ", 1, s->replacement, s->replacement_len, &text);
    if (!rc && prepend && (text.len < s->replacement_len || memcmp(text.data, s->replacement, s->replacement_len))) {
        sg_buf with = {0};
        rc = sg_buf_append(&with, s->replacement, s->replacement_len) || sg_buf_append(&with, text.data, text.len);
        sg_buf_free(&text);
        text = with;
    }
    piece whole = {text.data, text.len, p->at_origin};
    span_list spans = {0};
    if (!rc && !s->split)
        rc = pieces_push(out, text.data, text.len, p->at_origin);
    else if (!rc)
        rc = find_char(s->replacement, s->replacement_len, &whole, &spans) ||
             split_spans(&whole, &spans, KEEP_WITH_NEXT, 0, out);
    free(spans.items);
    sg_buf_free(&text);
    return rc;
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
        span_list spans = {0};
        if (s->kind == STEP_DIGITS)
            rc = split_digits(s->individual_digits, p, &out);
        else if (s->kind == STEP_METASPACE)
            rc = metaspace(s, p, &out);
        else if (s->regex)
            rc = find_regex(s->regex, p, &spans) || split_spans(p, &spans, s->behavior, s->invert, &out);
        else
            rc = pieces_push(&out, p->data, p->len, p->at_origin);
        free(spans.items);
    }
    pieces_free(l);
    *l = out;
    return rc;
}

/* ---- the BPE model ------------------------------------------------------------------------------ */

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

/* The word's starting symbols, as tokenizers' BPE makes them: each character's token; a character the
 * vocabulary lacks becomes its bytes' <0xHH> tokens (byte fallback, when every one exists), else the unknown
 * token (consecutive ones fused into one with fuse_unk), else nothing. Returns the count. */
static int32_t initial_symbols(const sg_tokenizer *t, const char *w, size_t n, int32_t *sym) {
    int32_t count = 0;
    int unk_pending = 0;
    for (size_t i = 0; i < n;) {
        size_t len = char_len((unsigned char)w[i]);
        if (len > n - i) len = n - i;
        int32_t id = vocab_find(t, w + i, len);
        int fallback = t->byte_fallback;
        for (size_t k = 0; id < 0 && fallback && k < len; k++) fallback = t->fallback_id[(unsigned char)w[i + k]] >= 0;
        if (id >= 0) {
            if (unk_pending) sym[count++] = t->unk_id;
            unk_pending = 0;
            sym[count++] = id;
        } else if (fallback) { /* a pending unknown stays pending across byte tokens, as in tokenizers */
            for (size_t k = 0; k < len; k++) sym[count++] = t->fallback_id[(unsigned char)w[i + k]];
        } else if (t->unk_id >= 0) {
            if (unk_pending && !t->fuse_unk) sym[count++] = t->unk_id;
            unk_pending = 1;
        }
        i += len;
    }
    if (unk_pending) sym[count++] = t->unk_id;
    return count;
}

/* BPE over one word: merge the lowest-ranked adjacent pair (the leftmost among equals) until no pair has a
 * merge, through a queue of candidates that are dropped when a neighbour changed (n log n, so a long word
 * cannot stall the caller). */
static int bpe_word(const sg_tokenizer *t, const char *w, size_t len, int32_t **ids, size_t *count, size_t *cap) {
    if (t->ignore_merges) {
        int32_t whole = vocab_find(t, w, len);
        if (whole >= 0) return push_id(ids, count, cap, whole);
    }
    int32_t *sym = malloc((len + 1) * sizeof *sym), *next = malloc((len + 1) * sizeof *next);
    int32_t *prev = malloc((len + 1) * sizeof *prev);
    /* every merge adds at most two candidates to the n - 1 of the start */
    merge_queue q = {malloc(3 * (len + 1) * sizeof *q.items), 0};
    int rc = -1;
    if (!sym || !next || !prev || !q.items) goto done;
    int32_t n = initial_symbols(t, w, len, sym);
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

static int bpe_piece(const sg_tokenizer *t, const piece *p, int32_t **ids, size_t *count, size_t *cap) {
    if (!t->byte_level) return bpe_word(t, p->data, p->len, ids, count, cap);
    sg_buf mapped = {0}; /* the ByteLevel pre-tokenizer's characters */
    for (size_t i = 0; i < p->len; i++) {
        unsigned char byte = (unsigned char)p->data[i];
        if (sg_buf_append(&mapped, t->byte_char[byte], t->byte_char_len[byte])) {
            sg_buf_free(&mapped);
            return -1;
        }
    }
    int rc = bpe_word(t, mapped.data, mapped.len, ids, count, cap);
    sg_buf_free(&mapped);
    return rc;
}

/* ---- encoding ----------------------------------------------------------------------------------- */

typedef struct {
    const sg_tokenizer *t;
    int32_t **ids;
    size_t *count, *cap;
} encoder;

/* Unicode's White_Space (Rust's char::is_whitespace, what an added token's lstrip/rstrip takes). */
static int is_white_space(utf8proc_int32_t c) {
    return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

/* Length of the white space character that starts at text[i] (0 if none). */
static size_t space_at(const char *text, size_t len, size_t i) {
    utf8proc_int32_t c;
    utf8proc_ssize_t n = utf8proc_iterate((const utf8proc_uint8_t *)text + i, (utf8proc_ssize_t)(len - i), &c);
    return n > 0 && is_white_space(c) ? (size_t)n : 0;
}

/* Length of the white space character that ends at text[end - 1] and starts at or after `from`. */
static size_t space_before(const char *text, size_t from, size_t end) {
    size_t start = end - 1;
    while (start > from && ((unsigned char)text[start] & 0xC0) == 0x80) start--;
    return space_at(text, end, start) == end - start ? end - start : 0;
}

/* The leftmost added token of `set` in text[from..len), the longest one where several start there. */
static const added_token *find_added(const sg_tokenizer *t, const added_set *set, const char *text, size_t len,
                                     size_t from, size_t *at) {
    for (size_t i = from; i < len; i++) {
        unsigned char first = (unsigned char)text[i];
        for (size_t k = 0; k < set->n_lengths[first]; k++) {
            size_t n = set->lengths[first][k];
            int32_t found = n <= len - i ? text_find(set->slots, set->n_slots, text + i, n) : -1;
            if (found >= 0) {
                *at = i;
                return &t->added[found];
            }
        }
    }
    return NULL;
}

typedef sg_status (*segment_fn)(const encoder *e, const char *text, size_t len, int at_origin);

/* Cut text at the added tokens of `set` (their ids go out in place), handing the text between to `each`.
 * As in tokenizers, the tokens are found first (leftmost, longest, each search going on where the last
 * token ends) and widened over white space by lstrip/rstrip after: a widened token can overlap the next
 * one, whose text then counts twice. */
static sg_status split_added(const encoder *e, const added_set *set, const char *text, size_t len, int at_origin,
                             segment_fn each) {
    size_t search = 0, done = 0, n; /* done: where the last token, widened, ends */
    for (;;) {
        size_t at = len;
        const added_token *a = find_added(e->t, set, text, len, search, &at);
        size_t start = a ? at : len, stop = a ? at + a->len : len;
        search = stop;
        if (a && a->lstrip) {
            while (start > 0 && (n = space_before(text, 0, start))) start -= n;
            if (start < done) start = done;
        }
        if (a && a->rstrip)
            while (stop < len && (n = space_at(text, len, stop))) stop += n;
        sg_status st = start > done ? each(e, text + done, start - done, at_origin && done == 0) : SG_OK;
        if (st != SG_OK || !a) return st;
        if (push_id(e->ids, e->count, e->cap, a->id))
            return sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory while tokenizing");
        done = stop;
    }
}

/* A normalized piece without added tokens: pre-tokenize, then BPE each piece. */
static sg_status encode_words(const encoder *e, const char *text, size_t len, int at_origin) {
    piece_list l = {0};
    int rc = pieces_push(&l, text, len, at_origin);
    for (size_t s = 0; s < e->t->n_steps && !rc; s++) rc = apply_step(&e->t->steps[s], &l);
    for (size_t i = 0; i < l.count && !rc; i++) rc = bpe_piece(e->t, &l.items[i], e->ids, e->count, e->cap);
    pieces_free(&l);
    return rc ? sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory while tokenizing") : SG_OK;
}

/* Text between raw added tokens: normalize, then split at the added tokens matched after normalization. */
static sg_status encode_segment(const encoder *e, const char *text, size_t len, int at_origin) {
    sg_buf norm = {0};
    sg_status st = normalize(e->t, text, len, &norm);
    if (st == SG_OK && norm.len)
        st = split_added(e, &e->t->normalized_added, norm.data, norm.len, at_origin, encode_words);
    sg_buf_free(&norm);
    return st;
}

sg_status sg_tokenizer_encode(const sg_tokenizer *t, const char *text, size_t len, int32_t **ids, size_t *count,
                              size_t *cap) {
    size_t bad = sg_utf8_valid_prefix(text, len);
    if (bad != len) return sg_fail(SG_ERR_INVALID_ARGUMENT, "the text is not valid UTF-8 (at byte %zu)", bad);
    encoder e = {t, ids, count, cap};
    return split_added(&e, &t->raw_added, text, len, 1, encode_segment);
}

/* ---- decoding ----------------------------------------------------------------------------------- */

typedef struct {
    sg_buf *items;
    size_t count;
} token_list;

static void tokens_free(token_list *l) {
    for (size_t i = 0; i < l->count; i++) sg_buf_free(&l->items[i]);
    free(l->items);
    *l = (token_list){0};
}

static int tokens_push(token_list *l, const char *s, size_t n) {
    sg_buf *grown = realloc(l->items, (l->count + 1) * sizeof *grown);
    if (!grown) return -1;
    l->items = grown;
    l->items[l->count] = (sg_buf){0};
    return sg_buf_append(&l->items[l->count++], s ? s : "", n);
}

/* The byte a <0xHH> token stands for, or -1. */
static int fallback_byte(const sg_buf *b) {
    const char *s = b->data;
    if (b->len != 6 || memcmp(s, "<0x", 3) || s[5] != '>') return -1;
    int v = 0;
    for (int k = 3; k < 5; k++) {
        char c = s[k];
        int d = c >= '0' && c <= '9'   ? c - '0'
                : c >= 'a' && c <= 'f' ? c - 'a' + 10
                : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                       : -1;
        if (d < 0) return -1;
        v = v * 16 + d;
    }
    return v;
}

/* ByteFallback: runs of <0xHH> tokens become the text of their bytes, or one U+FFFD per byte when those
 * bytes are not UTF-8; streaming, the bytes go out as they are (the stream completes characters). */
static int byte_fallback(token_list *l, int streaming) {
    token_list out = {0};
    sg_buf run = {0};
    int rc = 0;
    for (size_t i = 0; i <= l->count && !rc; i++) {
        int byte = i < l->count ? fallback_byte(&l->items[i]) : -1;
        if (byte >= 0) {
            char c = (char)byte;
            rc = streaming ? tokens_push(&out, &c, 1) : sg_buf_append(&run, &c, 1);
            continue;
        }
        if (run.len && sg_utf8_valid_prefix(run.data, run.len) == run.len)
            rc = tokens_push(&out, run.data, run.len);
        else
            for (size_t k = 0; k < run.len && !rc; k++) rc = tokens_push(&out, "\xEF\xBF\xBD", 3);
        run.len = 0;
        if (i < l->count && !rc) rc = tokens_push(&out, l->items[i].data, l->items[i].len);
    }
    sg_buf_free(&run);
    tokens_free(l);
    *l = out;
    return rc;
}

static int fuse(token_list *l) {
    sg_buf all = {0};
    int rc = 0;
    for (size_t i = 0; i < l->count && !rc; i++) rc = sg_buf_append(&all, l->items[i].data, l->items[i].len);
    if (!rc && !all.data) rc = sg_buf_append(&all, "", 0); /* fusing no tokens gives one empty token */
    tokens_free(l);
    if (rc || !(l->items = malloc(sizeof *l->items))) {
        sg_buf_free(&all);
        return -1;
    }
    l->items[0] = all;
    l->count = 1;
    return 0;
}

/* Strip: up to `start` copies of the character off the front, up to `stop` off the back. */
static void strip(const dec_step *s, sg_buf *b, int keep_front) {
    size_t front = 0, back = b->len, n = s->from_len;
    for (int k = 0; !keep_front && k < s->start && back - front >= n && !memcmp(b->data + front, s->from, n); k++)
        front += n;
    for (int k = 0; k < s->stop && back - front >= n && !memcmp(b->data + back - n, s->from, n); k++) back -= n;
    if (front) memmove(b->data, b->data + front, back - front);
    b->len = back - front;
    if (b->data) b->data[b->len] = '\0';
}

/* Run the decoder chain over the tokens' texts. `continuation`: the tokens follow text already decoded,
 * so start-of-text rules (Metaspace's first token, a Strip after Fuse) do not apply. */
static int run_decoders(const sg_tokenizer *t, token_list *l, int streaming, int continuation) {
    int fused = 0;
    for (size_t k = 0; k < t->n_decs; k++) {
        const dec_step *s = &t->decs[k];
        for (size_t i = 0; i < l->count && (s->kind == DEC_REPLACE || s->kind == DEC_METASPACE); i++) {
            sg_buf out = {0};
            int first = i == 0 && !continuation && s->prepend != PREPEND_NEVER;
            int rc = s->kind == DEC_REPLACE
                         ? replace_all(l->items[i].data, l->items[i].len, s->from, s->from_len, s->to, s->to_len, &out)
                         : replace_all(l->items[i].data, l->items[i].len, s->from, s->from_len, " ", !first, &out);
            sg_buf_free(&l->items[i]);
            l->items[i] = out;
            if (rc) return -1;
        }
        if (s->kind == DEC_STRIP)
            for (size_t i = 0; i < l->count; i++) strip(s, &l->items[i], i == 0 && continuation && fused);
        if (s->kind == DEC_BYTE_FALLBACK && byte_fallback(l, streaming)) return -1;
        if (s->kind == DEC_FUSE) {
            if (fuse(l)) return -1;
            fused = 1;
        }
    }
    return 0;
}

/* The texts of the ids that decode (not special, in range), through the decoder chain, appended to out. */
static int decode_chain(const sg_tokenizer *t, const int32_t *ids, size_t count, int streaming, sg_buf *out) {
    token_list l = {0};
    int rc = 0;
    for (size_t i = 0; i < count && !rc; i++) {
        int32_t id = ids[i];
        if (id >= 0 && id < t->vocab_size && t->token_text[id] && !t->special[id])
            rc = tokens_push(&l, t->token_text[id], t->token_len[id]);
    }
    if (!rc) rc = run_decoders(t, &l, streaming, streaming && out->len > 0);
    for (size_t i = 0; i < l.count && !rc; i++) rc = sg_buf_append(out, l.items[i].data, l.items[i].len);
    tokens_free(&l);
    return rc;
}

static int byte_level_bytes(const sg_tokenizer *t, const int32_t *ids, size_t count, sg_buf *b) {
    for (size_t i = 0; i < count; i++) {
        int32_t id = ids[i];
        if (id < 0 || id >= t->vocab_size || !t->token_bytes[id]) continue;
        if (sg_buf_append(b, t->token_bytes[id], t->token_bytes_len[id])) return -1;
    }
    return 0;
}

int sg_tokenizer_decode(const sg_tokenizer *t, const int32_t *ids, size_t count, sg_buf *text) {
    if (!t->byte_level_decoder) return decode_chain(t, ids, count, 0, text);
    sg_buf bytes = {0};
    int rc = byte_level_bytes(t, ids, count, &bytes) ||
             sg_utf8_append_lossy(text, bytes.data ? bytes.data : "", bytes.len);
    sg_buf_free(&bytes);
    return rc;
}

int sg_tokenizer_decode_bytes(const sg_tokenizer *t, const int32_t *ids, size_t count, sg_buf *b) {
    return t->byte_level_decoder ? byte_level_bytes(t, ids, count, b) : decode_chain(t, ids, count, 1, b);
}
