"""A tiny transformers causal LM written as an F32 GGUF, laid out as llama.cpp's converter lays one out: tensor names
from gguf's own name map, llama's query/key rows in interleaved rotary pairs, Gemma's norm gains stored as 1 + w, no
`output.weight` for a tied head, rope scaling stated llama.cpp's way (llama3: a `rope_freqs` tensor; longrope:
`rope_factors_long/short` tensors; linear: metadata), and a byte-level BPE vocabulary with a ChatML template."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from conftest import CHATML

SPECIALS = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]   # ids 0..3: test_families' pad 1, bos 2, eos 3
MERGES = ["h e", "l l"]
VOCAB_SIZE = len(SPECIALS) + 256 + len(MERGES)


def vocabulary() -> list[str]:
    """The specials, the 256 byte-level symbols, the merged pairs: VOCAB_SIZE tokens."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return SPECIALS + list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in MERGES]


def interleave(w: np.ndarray, heads: int) -> np.ndarray:
    """Rows of each head from transformers' rotary halves (x0..x7, y0..y7) into the pairs (x0, y0, x1, y1, ...) that
    llama.cpp's llama architecture rotates."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, path: Path, architecture: str | None = None, drop: tuple[str, ...] = ()) -> Path:
    """Write `model` to `path`; `architecture` names the file's `general.architecture` if not the model's own;
    tensors whose GGUF name contains one of `drop` are left out (a converter that did not know them)."""
    import gguf

    cfg = model.config
    arch = cfg.model_type.removesuffix("_text")            # llama.cpp's name: gemma3_text -> gemma3
    names = gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch),
                                     cfg.num_hidden_layers)
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    rope = cfg.rope_parameters.get("full_attention", cfg.rope_parameters)
    w = gguf.GGUFWriter(path, architecture or arch)
    w.add_name(f"tiny-{arch}")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(rope["rope_theta"])
    if arch != "phi3":                                     # llama.cpp states head_dim where the config has one
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch in ("llama", "phi3"):
        w.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))

    extra: dict[str, np.ndarray] = {}
    kind = rope.get("rope_type", "default")
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    elif kind == "llama3":   # llama.cpp divides each frequency by its factor: the plain frequencies over the scaled
        plain = 1.0 / rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        extra["rope_freqs.weight"] = (plain / model.model.rotary_emb.inv_freq.double().numpy()).astype(np.float32)
    elif kind == "longrope":
        original = rope["original_max_position_embeddings"]
        scale = cfg.max_position_embeddings / original
        w.add_rope_scaling_attn_factors(float(np.sqrt(1 + np.log(scale) / np.log(original))) if scale > 1 else 1.0)
        extra["rope_factors_long.weight"] = np.asarray(rope["long_factor"], dtype=np.float32)
        extra["rope_factors_short.weight"] = np.asarray(rope["short_factor"], dtype=np.float32)
    elif kind != "default":
        raise ValueError(f"no GGUF layout here for rope_type {kind!r}")
    if arch == "phi3":
        w.add_rope_scaling_orig_ctx_len(rope.get("original_max_position_embeddings",
                                                 cfg.original_max_position_embeddings))
        w.add_sliding_window(cfg.sliding_window or 0)      # llama.cpp's 0: no window
    if arch == "gemma3":
        # a GGUF has no key for Gemma 3's layer pattern, local rotary base or query scale: llama.cpp takes every 6th
        # layer global, 10000 and 1/sqrt(head_dim) (27B aside). A model that differs cannot be written faithfully.
        pattern = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(cfg.num_hidden_layers)]
        local = cfg.rope_parameters["sliding_attention"]
        assert cfg.layer_types == pattern and local == {"rope_type": "default", "rope_theta": 10000.0}, cfg
        assert cfg.query_pre_attn_scalar == head_dim and cfg.attn_logit_softcapping is None, cfg
        w.add_sliding_window(cfg.sliding_window)
        if cfg.final_logit_softcapping:
            w.add_final_logit_softcapping(cfg.final_logit_softcapping)

    tokens = vocabulary()
    assert len(tokens) == cfg.vocab_size, (len(tokens), cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL] * len(SPECIALS)
                      + [gguf.TokenType.NORMAL] * (len(tokens) - len(SPECIALS)))
    w.add_token_merges(MERGES)
    w.add_unk_token_id(0)
    w.add_pad_token_id(1)
    w.add_bos_token_id(2)
    w.add_eos_token_id(3)
    w.add_chat_template(CHATML)

    for hf_name, p in model.named_parameters():           # a tied head shares the embedding: not listed, not written
        stem, suffix = hf_name.rsplit(".", 1)
        name = names.get_name(stem)
        if name is None:
            raise KeyError(f"gguf has no {arch} tensor name for {hf_name}")
        t = p.detach().float().numpy().copy()
        if arch == "llama" and name.endswith((".attn_q", ".attn_k")):
            t = interleave(t, heads if name.endswith(".attn_q") else kv_heads)
        if arch == "gemma3" and hf_name.endswith("norm.weight"):
            t = t + np.float32(1.0)
        if not any(d in name for d in drop):
            w.add_tensor(f"{name}.{suffix}", t)
    for name, t in extra.items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
