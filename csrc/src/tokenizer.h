/* The bundle's byte-level BPE tokenizer, read from its tokenizer.json (Hugging Face `tokenizers`
 * format): added tokens, normalizer (none or NFC), pre-tokenizers (ByteLevel, Split by regex, Digits),
 * a BPE model with ranked merges, and the ByteLevel decoder. */
#ifndef SG_TOKENIZER_H
#define SG_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "common.h"

typedef struct sg_tokenizer sg_tokenizer;

/* Parse tokenizer.json; NULL with the error set when it is of a kind this library does not run. */
sg_tokenizer *sg_tokenizer_load(const char *path, sg_status *status);
void sg_tokenizer_free(sg_tokenizer *tok);

/* Append the ids of UTF-8 `text` to *ids (grown with realloc). */
sg_status sg_tokenizer_encode(const sg_tokenizer *tok, const char *text, size_t len, int32_t **ids, size_t *count,
                              size_t *capacity);
/* Append the bytes of the tokens (special tokens skipped) to b; not yet UTF-8 checked. */
int sg_tokenizer_decode_bytes(const sg_tokenizer *tok, const int32_t *ids, size_t count, sg_buf *b);
int32_t sg_tokenizer_vocab_size(const sg_tokenizer *tok);

#endif
