#include "common.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <openssl/evp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static _Thread_local char last_error[1024];

sg_status sg_fail(sg_status status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    return status;
}

void sg_clear_error(void) { last_error[0] = '\0'; }

const char *sg_last_error(void) { return last_error; }

int sg_buf_append(sg_buf *b, const char *data, size_t len) {
    if (b->len + len + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 64;
        while (cap < b->len + len + 1) cap *= 2;
        char *grown = realloc(b->data, cap);
        if (!grown) return -1;
        b->data = grown;
        b->cap = cap;
    }
    if (len) memcpy(b->data + b->len, data, len);
    b->len += len;
    b->data[b->len] = '\0';
    return 0;
}

int sg_buf_append_str(sg_buf *b, const char *s) { return sg_buf_append(b, s, strlen(s)); }

char *sg_buf_take(sg_buf *b) {
    char *out = b->data ? b->data : calloc(1, 1);
    b->data = NULL;
    b->len = b->cap = 0;
    return out;
}

void sg_buf_free(sg_buf *b) {
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

char *sg_read_file(const char *path, size_t *length, sg_status *status) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        *status = sg_fail(SG_ERR_IO, "%s: cannot open (%s)", path, strerror(errno));
        return NULL;
    }
    sg_buf b = {0};
    char chunk[1 << 16];
    size_t n;
    while ((n = fread(chunk, 1, sizeof chunk, f)) > 0) {
        if (sg_buf_append(&b, chunk, n)) {
            fclose(f);
            sg_buf_free(&b);
            *status = sg_fail(SG_ERR_OUT_OF_MEMORY, "%s: out of memory reading it", path);
            return NULL;
        }
    }
    int failed = ferror(f);
    fclose(f);
    if (failed) {
        sg_buf_free(&b);
        *status = sg_fail(SG_ERR_IO, "%s: read error", path);
        return NULL;
    }
    if (length) *length = b.len;
    *status = SG_OK;
    return sg_buf_take(&b);
}

cJSON *sg_read_json(const char *path, sg_status *status) {
    size_t len;
    char *text = sg_read_file(path, &len, status);
    if (!text) return NULL;
    cJSON *json = cJSON_ParseWithLength(text, len);
    free(text);
    if (!json) *status = sg_fail(SG_ERR_CORRUPT_BUNDLE, "%s: not valid JSON; re-export the bundle", path);
    return json;
}

char *sg_join_path(const char *dir, const char *rel) {
    size_t a = strlen(dir), r = strlen(rel);
    char *out = malloc(a + r + 2);
    if (!out) return NULL;
    memcpy(out, dir, a);
    out[a] = '/';
    memcpy(out + a + 1, rel, r + 1);
    return out;
}

int sg_sha256_file(const char *path, char out[65]) {
    FILE *f = fopen(path, "rb");
    if (!f) return -1;
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    int ok = ctx && EVP_DigestInit_ex(ctx, EVP_sha256(), NULL);
    static const size_t chunk_size = 1 << 20;
    unsigned char *chunk = malloc(chunk_size);
    ok = ok && chunk;
    size_t n;
    while (ok && (n = fread(chunk, 1, chunk_size, f)) > 0) ok = EVP_DigestUpdate(ctx, chunk, n);
    ok = ok && !ferror(f);
    unsigned char digest[32];
    unsigned int dlen = 0;
    ok = ok && EVP_DigestFinal_ex(ctx, digest, &dlen) && dlen == 32;
    free(chunk);
    EVP_MD_CTX_free(ctx);
    fclose(f);
    if (!ok) return -1;
    for (int i = 0; i < 32; i++) snprintf(out + 2 * i, 3, "%02x", digest[i]);
    return 0;
}

/* Length of the well-formed UTF-8 sequence at s (1-4), or 0 with *bad = how many leading bytes form
 * the maximal invalid subpart to replace by one U+FFFD (Unicode's "maximal subpart" practice). */
static size_t utf8_sequence(const unsigned char *s, size_t len, size_t *bad) {
    unsigned char c = s[0];
    if (c < 0x80) return 1;
    size_t need;
    unsigned char lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF)
        need = 1;
    else if (c == 0xE0)
        need = 2, lo = 0xA0;
    else if (c >= 0xE1 && c <= 0xEC)
        need = 2;
    else if (c == 0xED)
        need = 2, hi = 0x9F;
    else if (c >= 0xEE && c <= 0xEF)
        need = 2;
    else if (c == 0xF0)
        need = 3, lo = 0x90;
    else if (c >= 0xF1 && c <= 0xF3)
        need = 3;
    else if (c == 0xF4)
        need = 3, hi = 0x8F;
    else {
        *bad = 1;
        return 0;
    }
    for (size_t i = 1; i <= need; i++) {
        if (i >= len) {
            *bad = i;
            return 0;
        }
        unsigned char l = i == 1 ? lo : 0x80, h = i == 1 ? hi : 0xBF;
        if (s[i] < l || s[i] > h) {
            *bad = i;
            return 0;
        }
    }
    return need + 1;
}

size_t sg_utf8_valid_prefix(const char *s, size_t len) {
    size_t i = 0, bad;
    while (i < len) {
        size_t n = utf8_sequence((const unsigned char *)s + i, len - i, &bad);
        if (!n) return i;
        i += n;
    }
    return i;
}

size_t sg_utf8_complete_prefix(const char *s, size_t len) {
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0, bad;
    while (i < len) {
        size_t n = utf8_sequence(u + i, len - i, &bad);
        if (n) {
            i += n;
            continue;
        }
        int valid_lead = u[i] >= 0xC2 && u[i] <= 0xF4;
        if (valid_lead && bad == len - i) return i; /* cut short, not wrong: the next token may finish it */
        i += bad;
    }
    return len;
}

int sg_utf8_append_lossy(sg_buf *b, const char *s, size_t len) {
    static const char replacement[] = "\xEF\xBF\xBD";
    size_t i = 0;
    while (i < len) {
        size_t run = sg_utf8_valid_prefix(s + i, len - i);
        if (sg_buf_append(b, s + i, run)) return -1;
        i += run;
        if (i < len) {
            size_t bad = 1;
            utf8_sequence((const unsigned char *)s + i, len - i, &bad);
            if (sg_buf_append(b, replacement, 3)) return -1;
            i += bad;
        }
    }
    return 0;
}

double sg_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}
