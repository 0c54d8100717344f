"""Architectures described as data: where each family keeps its layers, norms, head and vision parts.

Adding a text-decoder family means adding one `Family` entry; a multimodal family adds a `VisionFamily`
naming its text decoder's place and its vision parts, not export code. `DecoderSpec.from_model` reads
the shapes and weights of a loaded transformers model into plain numpy, which is all the ONNX graph
builder sees."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import SteerguardError


@dataclass(frozen=True)
class Family:
    """Parameter names of one decoder family, relative to its language model (`model.` in a causal LM);
    `{i}` is the layer index. `head` is a full name."""
    layer: str = "layers.{i}."
    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    gate: str = "mlp.gate_proj"
    up: str = "mlp.up_proj"
    down: str = "mlp.down_proj"
    attn_norm: str = "input_layernorm.weight"
    mlp_norm: str = "post_attention_layernorm.weight"
    final_norm: str = "norm.weight"
    embed: str = "embed_tokens.weight"
    head: str = "lm_head.weight"
    qkv_bias: bool = False
    qk_norm: bool = False      # per-head LayerNorm of queries and keys (Chameleon): self_attn.{q,k}_norm


FAMILIES: dict[str, Family] = {
    "llama": Family(),
    "mistral": Family(),
    "qwen2": Family(qkv_bias=True),
    "qwen2_vl_text": Family(qkv_bias=True),
    "chameleon": Family(qk_norm=True),
}


@dataclass(frozen=True)
class VisionFamily:
    """A multimodal model: its text decoder (any `Family`, found at `text_base`) and its vision parts.
    `kind` names the vision engine builder (export.vision) and the runtime's image preprocessing and
    feature packing (runtime.images); `image_token_id` is the config attribute holding the placeholder
    token's id; `max_images` the images one prompt may carry (LLaVA-OneVision tiles a single image but
    shows several as one square tile each, a path not mirrored yet)."""
    kind: str
    text_base: str = "model.language_model."
    image_token_id: str = "image_token_id"
    max_images: int = 1
    processor_kwargs: tuple = ()   # what the processor needs to build the prompt as the runtime does


VISION_FAMILIES: dict[str, VisionFamily] = {
    "llava_onevision": VisionFamily("llava_onevision"),
    "qwen2_vl": VisionFamily("qwen2_vl", max_images=4),
    # one model for text and images; images become discrete tokens of the text vocabulary
    "chameleon": VisionFamily("chameleon", text_base="model.", max_images=4,
                              processor_kwargs=(("return_for_text_completion", True),)),
}


def processor_kwargs(processor) -> dict:
    """Call options a family's processor needs to build prompts as the runtime does."""
    names = {c.__name__.lower() for c in type(processor).__mro__}
    for kind, family in VISION_FAMILIES.items():
        if f"{kind.replace('_', '')}processor" in names:
            return dict(family.processor_kwargs)
    return {}


def text_config(config):
    """The language model's config of a causal LM or a multimodal model."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


@dataclass
class LayerWeights:
    """One decoder layer, weights stored (in, out) so the graph computes x @ w."""
    attn_norm: np.ndarray
    qkv: np.ndarray            # (d, (heads + 2 kv_heads) * head_dim): q, k, v packed
    qkv_bias: np.ndarray | None
    o: np.ndarray              # (heads * head_dim, d)
    mlp_norm: np.ndarray
    gate_up: np.ndarray        # (d, 2 * ff): gate, up packed
    down: np.ndarray           # (ff, d)
    q_norm: np.ndarray | None = None        # (heads, head_dim) gain of each query head's LayerNorm
    q_norm_bias: np.ndarray | None = None
    k_norm: np.ndarray | None = None        # (kv_heads, head_dim)
    k_norm_bias: np.ndarray | None = None


@dataclass
class DecoderSpec:
    architecture: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_eps: float
    context: int
    cos: np.ndarray            # (context, head_dim / 2) rotary tables, computed by the model's own rotary code
    sin: np.ndarray
    embed: np.ndarray          # (V, d)
    head: np.ndarray           # (V, d) the LM head (a copy when tied)
    final_norm: np.ndarray
    layers: list[LayerWeights] = field(default_factory=list)
    # multimodal rotary (Qwen2-VL): the rotary tables become engine inputs the runtime fills per request
    mrope: dict | None = None    # {"section": [t, h, w] frequency counts, "inv_freq": [...]}
    # tokens the model never writes (Chameleon's image tokens, which only images put in the prompt)
    suppressed_tokens: list[int] = field(default_factory=list)

    @classmethod
    def from_model(cls, model, context: int | None = None) -> "DecoderSpec":
        import torch

        vision = VISION_FAMILIES.get(model.config.model_type)
        cfg = text_config(model.config)
        arch = cfg.model_type
        if arch not in FAMILIES:
            raise SteerguardError(f"architecture {model.config.model_type!r} is not supported for export yet "
                                  f"(supported: {', '.join(sorted([*FAMILIES, *VISION_FAMILIES]))})")
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise SteerguardError(f"{arch}: hidden_act {cfg.hidden_act!r} is not supported (silu only)")
        for flag in ("swin_norm", "mlp_bias", "attention_bias"):
            if getattr(cfg, flag, False) and not (flag == "attention_bias" and FAMILIES[arch].qkv_bias):
                raise SteerguardError(f"{arch}: {flag}=True is not supported for export yet")
        fam = FAMILIES[arch]
        base = vision.text_base if vision else "model."
        sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
        heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        context = context or getattr(cfg, "max_position_embeddings", 4096)
        with torch.no_grad():
            rotary = model.get_decoder().rotary_emb
            pos = torch.arange(context)[None]
            cos, sin = rotary(torch.zeros(1, dtype=torch.float32), pos)
        half = head_dim // 2
        mrope = None
        if getattr(rotary, "mrope_section", None):
            if getattr(rotary, "attention_scaling", 1.0) != 1.0:
                raise SteerguardError(f"{arch}: scaled multimodal rotary embeddings are not supported")
            mrope = {"section": [int(x) for x in rotary.mrope_section], "inv_freq": rotary.inv_freq.tolist()}

        def w(name: str) -> np.ndarray:
            return sd[base + name]

        layers = []
        for i in range(cfg.num_hidden_layers):
            p = fam.layer.format(i=i)
            qkv = np.concatenate([w(p + fam.q + ".weight"), w(p + fam.k + ".weight"), w(p + fam.v + ".weight")])
            bias = (np.concatenate([w(p + fam.q + ".bias"), w(p + fam.k + ".bias"), w(p + fam.v + ".bias")])
                    if fam.qkv_bias else None)
            layers.append(LayerWeights(
                attn_norm=w(p + fam.attn_norm), qkv=qkv.T.copy(), qkv_bias=bias, o=w(p + fam.o + ".weight").T.copy(),
                mlp_norm=w(p + fam.mlp_norm),
                gate_up=np.concatenate([w(p + fam.gate + ".weight"), w(p + fam.up + ".weight")]).T.copy(),
                down=w(p + fam.down + ".weight").T.copy(),
                **({f"{n}{suffix}": w(f"{p}self_attn.{n}.{kind}") for n in ("q_norm", "k_norm")
                    for suffix, kind in (("", "weight"), ("_bias", "bias"))} if fam.qk_norm else {})))
        head = sd.get(fam.head, w(fam.embed))
        return cls(architecture=model.config.model_type, num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size,
                   num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                   intermediate_size=cfg.intermediate_size, vocab_size=cfg.vocab_size, rms_eps=float(cfg.rms_norm_eps),
                   context=context, cos=cos[0, :, :half].numpy().copy(), sin=sin[0, :, :half].numpy().copy(),
                   embed=w(fam.embed), head=head.copy(), final_norm=w(fam.final_norm), layers=layers, mrope=mrope,
                   suppressed_tokens=_suppressed_tokens(model))


def _suppressed_tokens(model) -> list[int]:
    """Chameleon writes text only: its image tokens get the lowest logit (ChameleonForConditionalGeneration)."""
    mapping = getattr(model.get_decoder(), "vocabulary_mapping", None)
    return sorted(int(t) for t in mapping.image_tokens) if mapping is not None else []
