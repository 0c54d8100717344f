"""Architectures described as data: where each family keeps its layers, norms, head and vision parts.

Adding a text-decoder family means adding one `Family` entry; a multimodal family adds a `VisionFamily`
naming its text decoder's place and its vision parts, not export code. `DecoderSpec.from_model` reads
the shapes and weights of a loaded transformers model into plain numpy, which is all the ONNX graph
builder sees."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np

from ..errors import SteerguardError


@dataclass(frozen=True)
class Family:
    """Parameter names of one decoder family, relative to its language model (`model.` in a causal LM);
    `{i}` is the layer index. `head` is a full name. A norm named None is absent from the layer."""
    layer: str = "layers.{i}."
    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    qkv: str | None = None     # one packed q/k/v projection instead of q, k, v (Phi-3)
    o: str = "self_attn.o_proj"
    gate: str = "mlp.gate_proj"
    up: str = "mlp.up_proj"
    gate_up: str | None = None  # one packed projection, gate rows first, instead of gate and up (Phi-3)
    down: str = "mlp.down_proj"
    attn_norm: str | None = "input_layernorm.weight"             # before attention
    mlp_norm: str | None = "post_attention_layernorm.weight"     # before the MLP
    attn_out_norm: str | None = None   # on attention's output, before the residual add (Gemma 3, OLMo 2)
    mlp_out_norm: str | None = None    # on the MLP's output, before the residual add
    final_norm: str = "norm.weight"
    embed: str = "embed_tokens.weight"
    head: str = "lm_head.weight"
    qkv_bias: bool = False
    qk_norm: str | None = None   # how queries and keys are normalised before rotary, if they are: a QK_NORMS key
    norm_offset: float = 0.0     # the RMSNorm gains are (offset + stored weight): Gemma stores w for 1 + w


# self_attn.{q,k}_norm: "head_layer" a LayerNorm of each head with its own gain and bias (Chameleon), "head_rms"
# an RMSNorm of each head sharing one gain (Qwen3, Gemma 3), "rms" an RMSNorm over the whole projection (OLMo 2)
QK_NORMS = ("head_layer", "head_rms", "rms")

FAMILIES: dict[str, Family] = {
    "llama": Family(),
    "mistral": Family(),
    "qwen2": Family(qkv_bias=True),
    "qwen2_vl_text": Family(qkv_bias=True),
    "chameleon": Family(qk_norm="head_layer"),
    "qwen3": Family(qk_norm="head_rms"),
    "smollm3": Family(),
    "granite": Family(),
    "olmo2": Family(qk_norm="rms", attn_norm=None, mlp_norm=None, attn_out_norm="post_attention_layernorm.weight",
                    mlp_out_norm="post_feedforward_layernorm.weight"),
    "gemma3_text": Family(qk_norm="head_rms", norm_offset=1.0, mlp_norm="pre_feedforward_layernorm.weight",
                          attn_out_norm="post_attention_layernorm.weight",
                          mlp_out_norm="post_feedforward_layernorm.weight"),
    "phi3": Family(qkv="self_attn.qkv_proj", gate_up="mlp.gate_up_proj"),
}

# the MLP gate activations the graph builder computes (config `hidden_act`, Gemma's `hidden_activation`)
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
# rotary types whose tables depend on the position only; `longrope` switches tables past its original context,
# so its export stops there
ROPE_TYPES = ("default", "linear", "llama3", "longrope")


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
    """One decoder layer: its weights, stored (in, out) so the graph computes x @ w (norm gains as the norm
    multiplies, offsets included), and how its attention places tokens."""
    attn_norm: np.ndarray | None   # None: the layer has no norm there (OLMo 2 normalises outputs instead)
    qkv: np.ndarray            # (d, (heads + 2 kv_heads) * head_dim): q, k, v packed
    qkv_bias: np.ndarray | None
    o: np.ndarray              # (heads * head_dim, d)
    mlp_norm: np.ndarray | None
    gate_up: np.ndarray        # (d, 2 * ff): gate, up packed
    down: np.ndarray           # (ff, d)
    q_norm: np.ndarray | None = None        # the family's qk_norm gain: (heads, head_dim), (head_dim,) or (heads * head_dim,)
    q_norm_bias: np.ndarray | None = None
    k_norm: np.ndarray | None = None
    k_norm_bias: np.ndarray | None = None
    attn_out_norm: np.ndarray | None = None
    mlp_out_norm: np.ndarray | None = None
    rotary: str | None = ""    # its tables' key in DecoderSpec.rotary; None: no rotary at all (SmolLM3's NoPE layers)
    window: int | None = None  # sliding-window attention: a token sees itself and the window - 1 tokens before it


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
    # rotary tables computed by the model's own rotary code, (context, rotary_dim / 2) each, by key: "" for a
    # model with one set, else the layer type's name (Gemma 3's local and global layers rotate differently);
    # rotary_dim < head_dim rotates only the first rotary_dim of each head (partial rotary)
    rotary: dict[str, tuple[np.ndarray, np.ndarray]]
    embed: np.ndarray          # (V, d)
    head: np.ndarray           # (V, d) the LM head (a copy when tied)
    final_norm: np.ndarray
    layers: list[LayerWeights] = field(default_factory=list)
    qk_norm: str | None = None   # a QK_NORMS key
    activation: str = "silu"     # of the MLP's gate: an ACTIVATIONS entry
    embed_scale: float = 1.0     # inputs_embeds = embed[ids] * embed_scale (Gemma's sqrt(d), Granite's multiplier)
    attn_scale: float | None = None     # of the attention's query-key products; None: 1 / sqrt(head_dim)
    logit_divisor: float = 1.0          # logits = head(h) / logit_divisor (Granite's logits_scaling)
    final_softcap: float | None = None  # then softcap * tanh(logits / softcap)
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
        fam = FAMILIES[arch]
        refuse = _refusal(model)
        act_field = "hidden_activation" if getattr(cfg, "hidden_activation", None) else "hidden_act"
        activation = getattr(cfg, act_field, "silu")
        if activation not in ACTIVATIONS:
            refuse(act_field, activation, f"supported: {', '.join(ACTIVATIONS)}")
        if getattr(cfg, "attn_logit_softcapping", None) is not None:
            # transformers' Gemma 3 stores it and never applies it: no export could match both it and the config
            refuse("attn_logit_softcapping", cfg.attn_logit_softcapping, "transformers does not apply it to this family")
        for flag in ("swin_norm", "mlp_bias", "attention_bias", "use_bidirectional_attention"):
            if getattr(cfg, flag, False) and not (flag == "attention_bias" and fam.qkv_bias):
                refuse(flag, getattr(cfg, flag))
        base = vision.text_base if vision else "model."
        sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
        heads, kv_heads, n = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        rope = _rope_parameters(cfg, refuse)
        context = _context(cfg, rope, context, refuse)
        layer_types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * n)
        for t in set(layer_types) - {"full_attention", "sliding_attention"}:
            refuse("layer_types", t, "full_attention and sliding_attention only")
        with torch.no_grad():
            rotary_emb = model.get_decoder().rotary_emb
            pos, x = torch.arange(context)[None], torch.zeros(1, dtype=torch.float32)
            by_type = set(rope) != {""}
            computed = {key: rotary_emb(x, pos, key) if by_type else rotary_emb(x, pos) for key in rope}
        # the module returns (1, context, rotary_dim) with both halves equal: the engines take one half
        rotary = {key: (cos[0, :, :cos.shape[-1] // 2].numpy().copy(), sin[0, :, :sin.shape[-1] // 2].numpy().copy())
                  for key, (cos, sin) in computed.items()}
        for cos, _ in rotary.values():
            if cos.shape[1] != head_dim // 2 and cos.shape[1] % 8:
                refuse("partial_rotary_factor", rope[next(iter(rope))].get("partial_rotary_factor"),
                       f"it rotates {2 * cos.shape[1]} of {head_dim} dims; onnxruntime's attention rotates multiples of 16")
        mrope = None
        if getattr(rotary_emb, "mrope_section", None):
            if getattr(rotary_emb, "attention_scaling", 1.0) != 1.0:
                raise SteerguardError(f"{arch}: scaled multimodal rotary embeddings are not supported")
            mrope = {"section": [int(x) for x in rotary_emb.mrope_section], "inv_freq": rotary_emb.inv_freq.tolist()}
        uses_rope = getattr(cfg, "no_rope_layers", None) or [1] * n   # SmolLM3's list: 1 where the layer rotates
        window = getattr(cfg, "sliding_window", None)
        windowed = layer_types if getattr(cfg, "layer_types", None) else ["sliding_attention" if window else ""] * n
        # HF lets a token see the `window` positions ending at itself; a window as long as the context is no window
        window = window if window and window < context else None
        # Granite scales what each layer adds to the residual stream: folded into the weights that produce it
        residual = np.float32(getattr(cfg, "residual_multiplier", 1.0))

        def w(name: str) -> np.ndarray:
            return sd[base + name]

        def norm(name: str | None, prefix: str = "") -> np.ndarray | None:
            """A norm's gain as the graph multiplies by it (Gemma's 1 + w), None for a norm the family lacks."""
            if name is None:
                return None
            return w(prefix + name) + np.float32(fam.norm_offset) if fam.norm_offset else w(prefix + name)

        def linear(p: str, packed: str | None, parts: tuple[str, ...]) -> np.ndarray:
            return w(p + packed + ".weight") if packed else np.concatenate([w(p + part + ".weight") for part in parts])

        layers = []
        for i in range(n):
            p = fam.layer.format(i=i)
            qkv = linear(p, fam.qkv, (fam.q, fam.k, fam.v))
            bias = (np.concatenate([w(p + fam.q + ".bias"), w(p + fam.k + ".bias"), w(p + fam.v + ".bias")])
                    if fam.qkv_bias else None)
            o, down = w(p + fam.o + ".weight").T, w(p + fam.down + ".weight").T
            if residual != 1:
                o, down = o * residual, down * residual
            qk = {}
            if fam.qk_norm == "head_layer":
                qk = {f"{name}{suffix}": w(f"{p}self_attn.{name}.{kind}") for name in ("q_norm", "k_norm")
                      for suffix, kind in (("", "weight"), ("_bias", "bias"))}
            elif fam.qk_norm:
                qk = {name: norm(f"self_attn.{name}.weight", p) for name in ("q_norm", "k_norm")}
            layers.append(LayerWeights(
                attn_norm=norm(fam.attn_norm, p), qkv=qkv.T.copy(), qkv_bias=bias, o=o.copy(),
                mlp_norm=norm(fam.mlp_norm, p),
                gate_up=linear(p, fam.gate_up, (fam.gate, fam.up)).T.copy(), down=down.copy(),
                attn_out_norm=norm(fam.attn_out_norm, p),
                mlp_out_norm=norm(fam.mlp_out_norm, p),
                rotary=(layer_types[i] if by_type else "") if uses_rope[i] else None,
                window=window if windowed[i] == "sliding_attention" else None, **qk))
        head = sd.get(fam.head, w(fam.embed))
        embeddings = model.get_input_embeddings()
        # Gemma multiplies by sqrt(d) cast to the weights' type; Granite by its embedding multiplier
        embed_scale = float(np.float32(float(getattr(embeddings, "embed_scale", 1.0))) *
                            np.float32(getattr(cfg, "embedding_multiplier", 1.0)))
        attn_scale = getattr(cfg, "attention_multiplier", None)
        if getattr(cfg, "query_pre_attn_scalar", None):
            attn_scale = cfg.query_pre_attn_scalar ** -0.5
        return cls(architecture=model.config.model_type, num_layers=n, hidden_size=cfg.hidden_size,
                   num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                   intermediate_size=cfg.intermediate_size, vocab_size=cfg.vocab_size, rms_eps=float(cfg.rms_norm_eps),
                   context=context, rotary=rotary, embed=w(fam.embed), head=head.copy(), final_norm=norm(fam.final_norm),
                   layers=layers, qk_norm=fam.qk_norm, activation=activation, embed_scale=embed_scale,
                   attn_scale=None if attn_scale is None else float(attn_scale),
                   logit_divisor=float(getattr(cfg, "logits_scaling", 1.0)),
                   final_softcap=getattr(cfg, "final_logit_softcapping", None), mrope=mrope,
                   suppressed_tokens=_suppressed_tokens(model))


def _refusal(model):
    """A function raising the one-line error for a config value the export does not support."""
    cfg = text_config(model.config)
    who = f"{cfg.model_type} model {cfg.name_or_path!r}" if getattr(cfg, "name_or_path", "") else f"{cfg.model_type} model"

    def refuse(field_name: str, value, note: str = "") -> None:
        raise SteerguardError(f"{who}: {field_name}={value!r} is not supported for export yet"
                              + (f" ({note})" if note else ""))
    return refuse


def _rope_parameters(cfg, refuse) -> dict[str, dict]:
    """The rotary settings by table key ("" for one set, else each layer type's), every type checked."""
    params = getattr(cfg, "rope_parameters", None) or {}
    by_type = params and all(isinstance(v, dict) for v in params.values())
    found = params if by_type else {"": params}
    for key, p in found.items():
        rope_type = p.get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            refuse(f"rope_parameters{f'[{key!r}]' if key else ''}.rope_type", rope_type,
                   f"supported: {', '.join(ROPE_TYPES)}")
    return found


def _context(cfg, rope: dict[str, dict], asked: int | None, refuse) -> int:
    """The context the engines' tables cover: what was asked, else the model's; `longrope` models stop at the
    context they were trained at, past which the model switches to its long rotary factors mid-sequence."""
    context = asked or getattr(cfg, "max_position_embeddings", 4096)
    for p in rope.values():
        if p.get("rope_type") != "longrope":
            continue
        original = p.get("original_max_position_embeddings") or getattr(cfg, "original_max_position_embeddings")
        if asked and asked > original:
            refuse("context", asked, f"longrope rotary is exported up to original_max_position_embeddings={original}")
        if context > original:
            print(f"steerguard: {cfg.model_type} uses longrope rotary scaling; the engines stop at its original context "
                  f"of {original} tokens (of {context})", file=sys.stderr)
            context = original
    return context


def _suppressed_tokens(model) -> list[int]:
    """Chameleon writes text only: its image tokens get the lowest logit (ChameleonForConditionalGeneration)."""
    mapping = getattr(model.get_decoder(), "vocabulary_mapping", None)
    return sorted(int(t) for t in mapping.image_tokens) if mapping is not None else []
