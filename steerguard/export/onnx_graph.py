"""Build the engine chain as ONNX graphs straight from the decoder's weights.

Each decoder engine runs a contiguous range of layers with onnxruntime's fused kernels
(SkipSimplifiedLayerNormalization, GroupQueryAttention with rotary and a KV cache that is updated in
place when the runtime binds `past_key_values.{i}` and `present.{i}` to one buffer). The `pre` engine
also computes the prober on the last token of its output, so the guard costs one tiny MLP per request.

    embed   input_ids (B, S) int64                               -> inputs_embeds (B, S, d)
    pre     inputs_embeds, seqlens_k (B,), total_sequence_length, past [0, l*)
                                                                 -> hidden_states (B, S, d), risk (B,), present
    post    hidden_states, seqlens_k, total_sequence_length, past [l*, N)
                                                                 -> last_hidden_state (B, S, d) (final norm), present
    head    hidden (B, d)                                        -> logits (B, V)
    refusal hidden (B, d)                                        -> hidden (B, d) @ R
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .arch import DecoderSpec

OPSET = 23
MS = "com.microsoft"


def past_names(i: int | str) -> tuple[str, str]:
    return f"past_key_values.{i}.key", f"past_key_values.{i}.value"


def present_names(i: int | str) -> tuple[str, str]:
    return f"present.{i}.key", f"present.{i}.value"


class Graph:
    """A small helper over onnx.helper: unique value names, initializers, typed inputs and outputs."""

    def __init__(self, name: str):
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.scope = ""          # prefix of automatic node names (the prober's nodes: "prober/")
        self._n = 0
        self._consts: dict[str, np.ndarray] = {}

    def const(self, name: str, value: np.ndarray) -> str:
        """A named constant; asking again for a name already made returns it (shared shapes, ones, ...)."""
        value = np.asarray(value)   # (np.ascontiguousarray would turn a 0-d scalar into shape (1,))
        if name in self._consts:
            if not np.array_equal(self._consts[name], value):
                raise ValueError(f"two different constants named {name!r}")
            return name
        self._consts[name] = value
        self.inits.append(numpy_helper.from_array(value if value.flags.c_contiguous else value.copy(), name))
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", name: str | None = None,
           outputs: list[str] | None = None, **attrs) -> list[str]:
        self._n += 1
        base = name or f"{self.scope}{op_type}_{self._n}"
        outs = outputs or [f"{base}/out{j}" for j in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=base, domain=domain or None, **attrs))
        return outs

    def one(self, op_type: str, inputs: list[str], **kw) -> str:
        return self.op(op_type, inputs, **kw)[0]

    def input(self, name: str, elem: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem, shape))
        return name

    def output(self, name: str, elem: int, shape: list) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, elem, shape))

    def model(self) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                              producer_name="steerguard")
        m.ir_version = 10
        return m


@dataclass
class ProberWeights:
    """The prober as the `pre` engine computes it. With `int8`, w1 is stored as int8 with one scale per
    output column, after moving each input row's magnitude into an fp32 `row_scale` (the folded
    standardisation makes rows differ by orders of magnitude, which per-column scales alone would crush)."""
    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray
    precision: str = "int8"   # or "fp32"
    per_token: bool = False   # risk of every position (batch, sequence) instead of the last one's (batch,)
    span: int = 1             # else the MLP reads the mean of the last `span` positions (the template's)


def quantize_prober_w1(w1: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """w1 ~= diag(row_scale) @ (q * col_scale): int8 q, fp32 row and column scales."""
    row = np.abs(w1).max(1).astype(np.float32)
    row[row == 0] = 1.0
    unit = w1 / row[:, None]
    col = (np.abs(unit).max(0) / 127.0).astype(np.float32)
    col[col == 0] = 1.0
    q = np.clip(np.round(unit / col), -127, 127).astype(np.int8)
    return q, row, col


def dequantized_prober_w1(w1: np.ndarray) -> np.ndarray:
    q, row, col = quantize_prober_w1(w1)
    return (row[:, None] * (q.astype(np.float32) * col)).astype(np.float32)


def _prober(g: Graph, hidden: str, p: ProberWeights, output: str = "risk", scope: str = "prober/") -> str:
    """risk = sigmoid(l1 - l0) of the MLP on the last position (or on every position), NaN whenever that
    state is not finite. Few nodes: it runs on every decode step too, where its output is not needed."""
    g.scope = scope   # under "prober/": lets the weight quantizer leave these nodes alone
    # (B, T, d) for a per-token risk, else the last position or the mean of the last `span` (B, d); the MLP
    # broadcasts over either. On a decode step (T = 1) the slice is that one position; nobody reads its risk.
    if p.per_token:
        x = hidden
    elif p.span > 1:
        tail = g.one("Slice", [hidden, g.const(f"{scope}span_start", np.array([-p.span], np.int64)),
                               g.const(f"{scope}span_end", np.array([np.iinfo(np.int64).max], np.int64)),
                               g.const(f"{scope}span_axis", np.array([1], np.int64))])
        x = g.one("ReduceMean", [tail, g.const(f"{scope}span_axis", np.array([1], np.int64))], keepdims=0)
    else:
        x = g.one("Gather", [hidden, g.const(f"{scope}last", np.array(-1, np.int64))], axis=1)
    feature_axis = np.array([2 if p.per_token else 1], np.int64)
    if p.precision == "int8":
        q, row, col = quantize_prober_w1(p.w1)
        w1 = g.one("DequantizeLinear", [g.const(f"{scope}w1_int8", q), g.const(f"{scope}w1_scale", col)], axis=1)
        x1 = g.one("Mul", [x, g.const(f"{scope}row_scale", row)])
    else:
        w1, x1 = g.const(f"{scope}w1", p.w1.astype(np.float32)), x
    h = g.one("Relu", [g.one("Add", [g.one("MatMul", [x1, w1]), g.const(f"{scope}b1", p.b1.astype(np.float32))])])
    # l1 - l0 in one (hidden, 1) matmul; kept 2-D until the end (ORT mis-infers a 1-D MatMul + Add here)
    w2 = (p.w2[:, 1:] - p.w2[:, :1]).astype(np.float32)
    margin = g.one("Add", [g.one("MatMul", [h, g.const(f"{scope}w2_margin", w2)]),
                           g.const(f"{scope}b2_margin", np.array([p.b2[1] - p.b2[0]], np.float32))])   # (B, [T,] 1)
    # sum(x) * 0 is NaN exactly when x holds a NaN or an inf; Relu would otherwise turn a NaN into 0
    poison = g.one("Mul", [g.one("ReduceSum", [x, g.const(f"{scope}axes", feature_axis)], keepdims=1),
                           g.const(f"{scope}zero", np.array(0, np.float32))])
    g.op("Squeeze", [g.one("Sigmoid", [g.one("Add", [margin, poison])]), g.const(f"{scope}squeeze", feature_axis)],
         outputs=[output])
    g.scope = ""
    return output


def decoder_engine(spec: DecoderSpec, first: int, last: int, *, final_norm: bool,
                   prober: ProberWeights | None = None, answer_prober: ProberWeights | None = None,
                   name: str = "decoder") -> onnx.ModelProto:
    """Layers [first, last) with their KV cache; the input is the residual stream entering `first`. A `prober`
    adds the `risk` output, an `answer_prober` the `answer_risk` output (every position: on a decode step, the
    generated token's risk, which the answer guard reads)."""
    g = Graph(name)
    f32, d = TensorProto.FLOAT, spec.hidden_size
    kv_shape = ["batch", spec.num_kv_heads, "past_sequence_length", spec.head_dim]
    x = g.input("inputs_embeds" if first == 0 else "hidden_states", f32, ["batch", "sequence_length", d])
    # the attention's own length inputs, straight from the runtime (which knows them): deriving them from
    # an attention mask costs six small operators per engine per token
    seqlens = g.input("seqlens_k", TensorProto.INT32, ["batch"])                 # each row's length - 1
    total = g.input("total_sequence_length", TensorProto.INT32, [])             # the KV buffer's width
    tables = _rotary_tables(g, spec, [spec.layers[i].rotary for i in range(first, last)])
    eps = spec.rms_eps

    # the residual stream is `residual` + `pending` (the last sublayer's output, not added in yet): a norm in
    # front of the next sublayer adds and normalises in one fused operator
    stream = _Stream(g, x, eps)
    for i in range(first, last):
        L, p = spec.layers[i], f"layers.{i}/"
        normed = stream.enter(L.attn_norm, p + "attn_norm", p + "attn_residual")
        qkv = g.one("MatMul", [normed, g.const(p + "qkv", L.qkv)], name=p + "qkv")
        if L.qkv_bias is not None:
            qkv = g.one("Add", [qkv, g.const(p + "qkv_bias", L.qkv_bias)])
        if L.q_norm is not None:
            qkv = _qk_norms(g, qkv, L, spec, p)
        pk, pv = past_names(i)
        g.input(pk, f32, kv_shape)
        g.input(pv, f32, kv_shape)
        ok, ov = present_names(i)
        inputs = [qkv, "", "", pk, pv, seqlens, total]
        options = {}
        if L.window is not None:   # the same count as transformers' sliding_window (measured: tests/test_families.py)
            options["local_window_size"] = L.window
        attn = g.op("GroupQueryAttention", inputs + list(tables[L.rotary]) if L.rotary is not None else inputs,
                    outputs=[p + "attn", ok, ov], domain=MS, name=p + "attention",
                    num_heads=spec.num_heads, kv_num_heads=spec.num_kv_heads, do_rotary=int(L.rotary is not None),
                    rotary_interleaved=0, scale=float(spec.attn_scale or spec.head_dim ** -0.5), **options)[0]
        g.output(ok, f32, ["batch", spec.num_kv_heads, "total_sequence_length", spec.head_dim])
        g.output(ov, f32, ["batch", spec.num_kv_heads, "total_sequence_length", spec.head_dim])
        stream.leave(g.one("MatMul", [attn, g.const(p + "o", L.o)], name=p + "o"), L.attn_out_norm, p + "attn_out_norm")
        normed = stream.enter(L.mlp_norm, p + "mlp_norm", p + "mlp_residual")
        gate, up = g.op("Split", [g.one("MatMul", [normed, g.const(p + "gate_up", L.gate_up)], name=p + "gate_up")],
                        n_out=2, axis=-1, num_outputs=2)
        if spec.activation == "gelu_pytorch_tanh":
            act = g.one("Mul", [g.one("Gelu", [gate], approximate="tanh"), up])
        else:
            act = g.one("Mul", [g.one("Mul", [gate, g.one("Sigmoid", [gate])]), up])
        stream.leave(g.one("MatMul", [act, g.const(p + "down", L.down)], name=p + "down"), L.mlp_out_norm,
                     p + "mlp_out_norm")

    if final_norm:
        g.op("SkipSimplifiedLayerNormalization", [stream.pending, stream.residual, g.const("final_norm", spec.final_norm)],
             outputs=["last_hidden_state", "", "", ""], domain=MS, epsilon=eps, name="final_norm")
        g.output("last_hidden_state", f32, ["batch", "sequence_length", d])
    else:
        g.op("Add", [stream.residual, stream.pending], outputs=["hidden_states"], name="split_point")
        g.output("hidden_states", f32, ["batch", "sequence_length", d])
    if prober is not None:
        _prober(g, "hidden_states", prober)
        g.output("risk", f32, ["batch", "sequence_length"] if prober.per_token else ["batch"])
    if answer_prober is not None:
        _prober(g, "hidden_states", answer_prober, "answer_risk", "prober/answer/")
        g.output("answer_risk", f32, ["batch", "sequence_length"])
    return g.model()


class _Stream:
    """The residual stream through a decoder engine: `residual` plus the `pending` output of the last sublayer."""

    def __init__(self, g: Graph, x: str, eps: float):
        self.g, self.residual, self.pending, self.eps = g, x, None, eps

    def enter(self, gain: np.ndarray | None, name: str, add_name: str) -> str:
        """A sublayer's input: the stream, normalised by `gain` (its pre-norm) unless the family has none there."""
        g = self.g
        if gain is None:
            if self.pending is not None:
                self.residual = g.one("Add", [self.residual, self.pending], name=add_name)
                self.pending = None
            return self.residual
        if self.pending is None:
            return g.one("RMSNormalization", [self.residual, g.const(name, gain)], axis=-1, epsilon=self.eps, name=name)
        normed, _, _, self.residual = g.op("SkipSimplifiedLayerNormalization", [self.pending, self.residual,
                                                                              g.const(name, gain)],
                                           n_out=4, domain=MS, epsilon=self.eps, name=name)
        self.pending = None
        return normed

    def leave(self, out: str, gain: np.ndarray | None, name: str) -> None:
        """A sublayer's output joins the stream, normalised by `gain` first where the family has a post-norm."""
        if gain is not None:
            out = self.g.one("RMSNormalization", [out, self.g.const(name, gain)], axis=-1, epsilon=self.eps, name=name)
        self.pending = out


def _rotary_tables(g: Graph, spec: DecoderSpec, keys: list[str | None]) -> dict[str, tuple[str, str]]:
    """The (cos, sin) values each rotary key of these layers reads: constants, or for multimodal rotary the
    per-request inputs the runtime fills (row i rotates the token at sequence index i, 3-D positions)."""
    if spec.mrope:
        half = spec.head_dim // 2
        return {"": (g.input("rotary_cos", TensorProto.FLOAT, ["rotary_positions", half]),
                     g.input("rotary_sin", TensorProto.FLOAT, ["rotary_positions", half]))}
    tables = {}
    for key in dict.fromkeys([""] if set(spec.rotary) == {""} else keys):
        if key is not None:
            suffix = f".{key}" if key else ""
            cos, sin = spec.rotary[key]
            tables[key] = g.const("cos_cache" + suffix, cos), g.const("sin_cache" + suffix, sin)
    return tables


def _qk_norms(g: Graph, qkv: str, L, spec: DecoderSpec, p: str) -> str:
    """Normalise the queries and keys inside the packed projection, the family's way (arch.QK_NORMS)."""
    hd, heads, kv = spec.head_dim, spec.num_heads, spec.num_kv_heads
    q, k, v = g.op("Split", [qkv, g.const(p + "qkv_sizes", np.array([heads * hd, kv * hd, kv * hd], np.int64))],
                   n_out=3, axis=-1)
    if spec.qk_norm == "rms":        # over the whole projection (OLMo 2)
        return g.one("Concat", [g.one("RMSNormalization", [q, g.const(p + "q_norm", L.q_norm)], axis=-1,
                                      epsilon=spec.rms_eps, name=p + "q_norm"),
                                g.one("RMSNormalization", [k, g.const(p + "k_norm", L.k_norm)], axis=-1,
                                      epsilon=spec.rms_eps, name=p + "k_norm"), v], axis=-1)
    if spec.qk_norm == "head_layer":
        ones, zeros = g.const("head_norm_one", np.ones(hd, np.float32)), g.const("head_norm_zero", np.zeros(hd, np.float32))

    def norm(x: str, n: int, w: np.ndarray, b: np.ndarray | None, name: str) -> str:
        per_head = g.one("Reshape", [x, g.const(f"heads{n}", np.array([0, 0, n, hd], np.int64))])
        if spec.qk_norm == "head_rms":   # one gain for every head (Qwen3, Gemma 3)
            scaled = g.one("RMSNormalization", [per_head, g.const(p + name, w)], axis=-1, epsilon=spec.rms_eps,
                           name=p + name)
        else:                            # a LayerNorm with each head's own gain and bias (Chameleon)
            normed = g.one("LayerNormalization", [per_head, ones, zeros], axis=-1, epsilon=1e-5)
            scaled = g.one("Add", [g.one("Mul", [normed, g.const(p + name + "_w", w)]), g.const(p + name + "_b", b)])
        return g.one("Reshape", [scaled, g.const(f"flat{n}", np.array([0, 0, n * hd], np.int64))])

    return g.one("Concat", [norm(q, heads, L.q_norm, L.q_norm_bias, "q_norm"),
                            norm(k, kv, L.k_norm, L.k_norm_bias, "k_norm"), v], axis=-1)


def embed_engine(spec: DecoderSpec) -> onnx.ModelProto:
    g = Graph("embed")
    ids = g.input("input_ids", TensorProto.INT64, ["batch", "sequence_length"])
    # a scaled embedding (Gemma, Granite) multiplies each gathered row in float32: so does scaling the table
    table = spec.embed if spec.embed_scale == 1 else spec.embed * np.float32(spec.embed_scale)
    g.op("Gather", [g.const("embed_tokens", table), ids], outputs=["inputs_embeds"], axis=0)
    g.output("inputs_embeds", TensorProto.FLOAT, ["batch", "sequence_length", spec.hidden_size])
    return g.model()


def head_engine(spec: DecoderSpec) -> onnx.ModelProto:
    """The LM head with its own constant (d, V) weight, even when tied: quantizers need a constant MatMul weight.
    Then, where the model has them, its logit scaling and softcapping (as it computes them), and the floor of
    the tokens it never writes."""
    g = Graph("head")
    h = g.input("hidden", TensorProto.FLOAT, ["batch", spec.hidden_size])
    steps: list[tuple[str, list[str], str | None]] = [("MatMul", [g.const("lm_head", spec.head.T)], "lm_head")]
    if spec.logit_divisor != 1:
        steps.append(("Div", [g.const("logit_divisor", np.array(spec.logit_divisor, np.float32))], "logit_scaling"))
    if spec.final_softcap:
        cap = g.const("logit_softcap", np.array(spec.final_softcap, np.float32))
        steps += [("Div", [cap], None), ("Tanh", [], None), ("Mul", [cap], "logit_softcap")]
    if spec.suppressed_tokens:   # a logit of float32's lowest value: adding it leaves exactly that value
        floor = np.zeros(spec.vocab_size, np.float32)
        floor[spec.suppressed_tokens] = np.finfo(np.float32).min
        steps.append(("Add", [g.const("suppressed", floor)], "suppress"))
    x = h
    for j, (op, operands, name) in enumerate(steps):
        x = g.op(op, [x, *operands], name=name, outputs=["logits"] if j == len(steps) - 1 else None)[0]
    g.output("logits", TensorProto.FLOAT, ["batch", spec.vocab_size])
    return g.model()


def refusal_engine(transform: np.ndarray) -> onnx.ModelProto:
    """h -> h @ R; the refusal logits are then the plain head applied to it."""
    g = Graph("refusal")
    d = transform.shape[0]
    h = g.input("hidden", TensorProto.FLOAT, ["batch", d])
    g.op("MatMul", [h, g.const("refusal_transform", transform.astype(np.float32))], outputs=["steered"],
         name="refusal_transform")
    g.output("steered", TensorProto.FLOAT, ["batch", d])
    return g.model()


def save_engine(model: onnx.ModelProto, path: Path) -> list[Path]:
    """Write `path` (+ `path.data` with the weights when large), check it, return the files written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    big = sum(t.ByteSize() for t in model.graph.initializer) > 16 << 20
    data = path.with_name(path.name + ".data")
    if big:
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    else:
        onnx.save_model(model, path)
    onnx.checker.check_model(str(path))
    return [path, data] if big else [path]
