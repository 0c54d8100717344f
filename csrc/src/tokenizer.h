/* The bundle's BPE tokenizer, read from its tokenizer.json (Hugging Face `tokenizers` format), in the two
 * kinds this library reproduces exactly:
 *  - byte-level BPE (GPT-2, SmolLM2, Qwen2, Llama 3): NFC or no normalizer, Split / Digits / ByteLevel
 *    pre-tokenizers, the ByteLevel decoder;
 *  - SentencePiece-style BPE (Llama 2, Gemma, Phi-3): byte fallback (`<0x41>` tokens), an unknown token
 *    (fused or not), Replace / Prepend / NFC normalizers, Split and Metaspace pre-tokenizers, and the
 *    Replace, ByteFallback, Fuse, Strip and Metaspace decoders.
 * Added tokens (special or not, matched before or after normalization) split the text first. Anything
 * else (WordPiece, Unigram, other normalizers, pre-tokenizers or decoders) is refused at load, naming it. */
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
/* Append the text of a whole sequence of ids to `text` as `tokenizers` decodes it (special tokens and ids
 * out of range skipped): valid UTF-8, with U+FFFD where the tokens' bytes are not. */
int sg_tokenizer_decode(const sg_tokenizer *tok, const int32_t *ids, size_t count, sg_buf *text);
/* Streaming: append the bytes of the next tokens of an answer whose earlier bytes are in b (not yet UTF-8
 * checked: a character can arrive in pieces). The concatenation equals sg_tokenizer_decode except where
 * byte-fallback tokens form invalid UTF-8 (U+FFFD per byte there, per invalid sequence here) and where a
 * decoder's start-of-text rule meets a first token that decodes to nothing. */
int sg_tokenizer_decode_bytes(const sg_tokenizer *tok, const int32_t *ids, size_t count, sg_buf *b);
int32_t sg_tokenizer_vocab_size(const sg_tokenizer *tok);

#endif
