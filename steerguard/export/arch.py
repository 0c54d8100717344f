"""Decoder architectures described as data: where each family keeps its layers, norms and head.

Adding a text-decoder family means adding one `Family` entry, not export code. `DecoderSpec.from_model`
reads the shapes and weights of a loaded transformers model into plain numpy, which is all the ONNX
graph builder sees."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import SteerguardError


@dataclass(frozen=True)
class Family:
    """Parameter names of one decoder family; `{i}` is the layer index."""
    layer: str = "model.layers.{i}."
    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    gate: str = "mlp.gate_proj"
    up: str = "mlp.up_proj"
    down: str = "mlp.down_proj"
    attn_norm: str = "input_layernorm.weight"
    mlp_norm: str = "post_attention_layernorm.weight"
    final_norm: str = "model.norm.weight"
    embed: str = "model.embed_tokens.weight"
    head: str = "lm_head.weight"
    qkv_bias: bool = False


FAMILIES: dict[str, Family] = {
    "llama": Family(),
    "mistral": Family(),
    "qwen2": Family(qkv_bias=True),
}


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

    @classmethod
    def from_model(cls, model, context: int | None = None) -> "DecoderSpec":
        import torch

        cfg = model.config
        arch = cfg.model_type
        if arch not in FAMILIES:
            raise SteerguardError(f"architecture {arch!r} is not supported for export yet "
                                  f"(supported: {', '.join(sorted(FAMILIES))})")
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise SteerguardError(f"{arch}: hidden_act {cfg.hidden_act!r} is not supported (silu only)")
        fam = FAMILIES[arch]
        sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
        heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        context = context or getattr(cfg, "max_position_embeddings", 4096)
        with torch.no_grad():
            rotary = model.model.rotary_emb
            pos = torch.arange(context)[None]
            cos, sin = rotary(torch.zeros(1, dtype=torch.float32), pos)
        half = head_dim // 2

        def w(name: str) -> np.ndarray:
            return sd[name]

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
                down=w(p + fam.down + ".weight").T.copy()))
        head = sd.get(fam.head, sd[fam.embed])
        return cls(architecture=arch, num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size,
                   num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                   intermediate_size=cfg.intermediate_size, vocab_size=cfg.vocab_size, rms_eps=float(cfg.rms_norm_eps),
                   context=context, cos=cos[0, :, :half].numpy().copy(), sin=sin[0, :, :half].numpy().copy(),
                   embed=sd[fam.embed], head=head.copy(), final_norm=w(fam.final_norm), layers=layers)
