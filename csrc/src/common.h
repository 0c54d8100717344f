/* Shared helpers of libsteerguard: the thread-local error, growable buffers, files, sha256, UTF-8. */
#ifndef SG_COMMON_H
#define SG_COMMON_H

#include <stddef.h>
#include <stdint.h>

#include "steerguard.h"

/* Record `fmt` as the calling thread's last error and return `status`. */
sg_status sg_fail(sg_status status, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void sg_clear_error(void);

typedef struct {
    char *data;
    size_t len, cap;
} sg_buf;

int sg_buf_append(sg_buf *b, const char *data, size_t len); /* 0 on success, -1 out of memory */
int sg_buf_append_str(sg_buf *b, const char *s);
char *sg_buf_take(sg_buf *b); /* NUL-terminated; the buffer is emptied */
void sg_buf_free(sg_buf *b);

/* The whole file, NUL-terminated; NULL (and the error set) when unreadable. */
char *sg_read_file(const char *path, size_t *length, sg_status *status);
/* The file parsed as JSON (release with cJSON_Delete); NULL (and the error set) when unreadable or not JSON. */
struct cJSON *sg_read_json(const char *path, sg_status *status);
/* "dir/rel" in a new string. */
char *sg_join_path(const char *dir, const char *rel);
/* Lower-case hex sha256 of a file into out[65]; 0 on success. */
int sg_sha256_file(const char *path, char out[65]);

/* Length of the valid UTF-8 prefix of s (== len when all of it is valid). */
size_t sg_utf8_valid_prefix(const char *s, size_t len);
/* Append s to b with every maximal invalid UTF-8 subsequence replaced by U+FFFD (as Python's and
 * Rust's lossy decoders do). */
int sg_utf8_append_lossy(sg_buf *b, const char *s, size_t len);
/* Length of the longest prefix of s that ends on a complete UTF-8 character. */
size_t sg_utf8_complete_prefix(const char *s, size_t len);

double sg_now(void);

#endif
