"""Weight precision of the exported engines, with onnxruntime's own quantizer.

int8 and int4 are weight-only: every MatMul with a constant weight becomes a MatMulNBits (blocks of
`block_size` weights along the input dimension, symmetric, one fp32 scale per block), computed with
int8 activations inside the kernel (accuracy level 4) — the same kernels onnxruntime-genai uses.
The prober's nodes are left alone (the prober is int8 by its own scheme), and activations stay fp32,
so the split-point state the prober reads keeps full precision. fp16 converts the whole graph for GPUs."""

from __future__ import annotations

import logging

import onnx

from ..errors import SteerguardError

PRECISIONS = ("fp32", "fp16", "int8", "int4")
PROBER_SCOPE = "prober/"


def check_precision(precision: str, block_size: int) -> None:
    if precision not in PRECISIONS:
        raise SteerguardError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if block_size < 16 or block_size & (block_size - 1):
        raise SteerguardError(f"block size must be a power of two >= 16, got {block_size}")


def quantize(model: onnx.ModelProto, precision: str, block_size: int = 32) -> onnx.ModelProto:
    """`model` with its weights at `precision` (fp32 returns it unchanged)."""
    if precision == "fp32":
        return model
    if precision == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16
        from onnxruntime.transformers.onnx_model import OnnxModel

        # keep the graph's inputs and outputs fp32 so the runtime feeds every precision alike
        half = OnnxModel(convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True))
        half.topological_sort()   # the converter appends its input casts at the end
        return half.model
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    prober = [n.name for n in model.graph.node if n.name.startswith(PROBER_SCOPE)]
    quiet = logging.getLogger("onnxruntime.quantization")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        q = MatMulNBitsQuantizer(model, bits=8 if precision == "int8" else 4, block_size=block_size,
                                 is_symmetric=True, accuracy_level=4, nodes_to_exclude=prober)
        q.process()
    finally:
        quiet.setLevel(level)
    out = q.model.model
    left = [n.name for n in out.graph.node if n.op_type == "MatMul" and not n.name.startswith(PROBER_SCOPE)
            and any(i.name == n.input[1] for i in out.graph.initializer)]
    if left:
        raise SteerguardError(f"the quantizer left {len(left)} weight MatMuls at fp32 (e.g. {left[0]})")
    return out
