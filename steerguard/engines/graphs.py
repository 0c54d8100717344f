"""Two one-operator ONNX graphs the runtime runs next to a bundle's engines when its tensors live on a
device: `argmax` (greedy tokens from logits that stay on the device) and `select` (each row from one of
two tensors: the refusal head's rows for requests the guard fired on, the plain ones for the others).

The lean runtime has no `onnx` package, so the ModelProto bytes are written here directly in protobuf's
wire format (field numbers from onnx.proto3); onnxruntime loads them like any model file."""

from __future__ import annotations

import numpy as np

OPSET = 13
IR_VERSION = 8
_ELEM = {np.dtype(np.float32): 1, np.dtype(np.float16): 10, np.dtype(np.int64): 7, np.dtype(np.bool_): 9}


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _bytes(field: int, value: bytes | str) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def _value_info(name: str, dtype: np.dtype, dims: list[int | str]) -> bytes:
    shape = b"".join(_bytes(1, _int(1, d) if isinstance(d, int) else _bytes(2, d)) for d in dims)
    tensor = _int(1, _ELEM[np.dtype(dtype)]) + _bytes(2, shape)
    return _bytes(1, name) + _bytes(2, _bytes(1, tensor))        # ValueInfoProto{name, TypeProto{tensor_type}}


def _node(op: str, inputs: list[str], outputs: list[str], ints: dict[str, int] | None = None) -> bytes:
    attrs = b"".join(_bytes(5, _bytes(1, k) + _int(3, v) + _int(20, 2)) for k, v in (ints or {}).items())  # type INT
    return b"".join(_bytes(1, i) for i in inputs) + b"".join(_bytes(2, o) for o in outputs) + _bytes(4, op) + attrs


def _model(name: str, node: bytes, inputs: list[bytes], outputs: list[bytes]) -> bytes:
    graph = _bytes(1, node) + _bytes(2, name) + b"".join(_bytes(11, i) for i in inputs) + \
        b"".join(_bytes(12, o) for o in outputs)
    opset = _bytes(1, "") + _int(2, OPSET)
    return _int(1, IR_VERSION) + _bytes(2, "steerguard") + _bytes(7, graph) + _bytes(8, opset)


def argmax_graph(dtype: np.dtype) -> bytes:
    """`token` (batch,) int64 = the index of the largest of each row of `logits` (batch, vocab); ties take
    the first, as numpy's argmax does."""
    return _model("argmax", _node("ArgMax", ["logits"], ["token"], {"axis": 1, "keepdims": 0}),
                  [_value_info("logits", dtype, ["batch", "vocab"])], [_value_info("token", np.int64, ["batch"])])


def select_graph(dtype: np.dtype) -> bytes:
    """`out` (batch, d) = row i of `a` where `pick[i]` is true, else row i of `b`."""
    return _model("select", _node("Where", ["pick", "a", "b"], ["out"]),
                  [_value_info("pick", np.bool_, ["batch", 1]), _value_info("a", dtype, ["batch", "d"]),
                   _value_info("b", dtype, ["batch", "d"])],
                  [_value_info("out", dtype, ["batch", "d"])])
