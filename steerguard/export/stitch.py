"""Give a text bundle eyes: join a stand-alone ONNX image encoder (a ViT whose patch features are a
tensor inside its graph) to the bundle's language model through a linear projector, as LLaVA-style
models are built. The result is an ordinary multimodal bundle (`vision` engine, `vit_patches`
preprocessing, an image placeholder token): the runtime, the guard and `steerguard run --image` treat
it like any exported multimodal model.

The projector is an input here: training it (image-caption pairs, the language model frozen) is a
job for the user's own data; this module only assembles and pins the parts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import SteerguardError
from ..runtime.images.vit_patches import processor_config
from ..runtime.manifest import MANIFEST, sha256_of
from .onnx_graph import save_engine


def attach_vision(bundle: str | Path, encoder: str | Path, out: str | Path, *, features: str, projector: np.ndarray,
                  projector_bias: np.ndarray | None = None, skip_tokens: int = 1, size: int = 224,
                  mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), image_token: str = "<filename>") -> Path:
    """Write `out`: `bundle` plus a vision engine = `encoder` up to its tensor `features` (batch, tokens, e),
    the first `skip_tokens` tokens (CLS, registers) dropped, times `projector` (e, d) (+ bias). Each image
    takes the place of one `image_token` in the prompt, expanded to one position per patch."""
    bundle, out = Path(bundle), Path(out)
    manifest = json.loads((bundle / MANIFEST).read_text())
    d = manifest["model"]["hidden_size"]
    if projector.shape[1] != d:
        raise SteerguardError(f"the projector maps to {projector.shape[1]} dimensions; the model's hidden size is {d}")
    graph = _encoder_to_features(Path(encoder), features, projector, projector_bias, skip_tokens)
    tokens = _static_tokens(graph)

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(bundle, tmp)
    files = save_engine(graph, tmp / "engines" / "vision.onnx")
    token_id = _token_id(tmp, manifest, image_token)
    weights = sum(int(np.prod(t.dims)) for t in graph.graph.initializer)
    manifest["engines"].insert(0, {
        "name": "vision", "role": "vision", "file": "engines/vision.onnx", "precision": "fp32",
        "matmul_weights": 0, "other_weights": weights, "inputs": ["pixel_values"], "outputs": ["image_features"],
        "data_files": [f"engines/{f.name}" for f in files[1:]]})
    manifest["vision"] = {"kind": "vit_patches", "engine": "vision", "image_token_id": token_id,
                          "image_token": image_token, "max_images": 1, "placeholder_text": image_token,
                          "encoder": {"file": Path(encoder).name, "sha256": sha256_of(Path(encoder)),
                                      "features": features},
                          "preprocess": processor_config(size, mean, std, tokens)}
    manifest["files"] = {str(p.relative_to(tmp)): sha256_of(p) for p in sorted(tmp.rglob("*"))
                         if p.is_file() and p.name != MANIFEST}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _encoder_to_features(encoder: Path, features: str, w: np.ndarray, b: np.ndarray | None,
                         skip: int) -> onnx.ModelProto:
    model = onnx.load(str(encoder))
    if len(model.graph.input) != 1:
        raise SteerguardError(f"{encoder}: the encoder must take one image tensor")
    pixels = model.graph.input[0].name
    cut = _up_to(model, features)
    g = cut.graph
    g.initializer.extend([numpy_helper.from_array(w.astype(np.float32), "projector"),
                          numpy_helper.from_array(np.array([skip], np.int64), "skip_start"),
                          numpy_helper.from_array(np.array([1 << 30], np.int64), "skip_end"),
                          numpy_helper.from_array(np.array([1], np.int64), "token_axis")])
    g.node.extend([helper.make_node("Slice", [features, "skip_start", "skip_end", "token_axis"], ["patches"]),
                   helper.make_node("MatMul", ["patches", "projector"],
                                    ["image_features" if b is None else "projected"])])
    if b is not None:
        g.initializer.append(numpy_helper.from_array(b.astype(np.float32), "projector_bias"))
        g.node.append(helper.make_node("Add", ["projected", "projector_bias"], ["image_features"]))
    g.input[0].name = "pixel_values"
    for node in g.node:
        node.input[:] = ["pixel_values" if i == pixels else i for i in node.input]
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("image_features", onnx.TensorProto.FLOAT,
                                                  ["batch", "patches", w.shape[1]]))
    return cut


def _up_to(model: onnx.ModelProto, tensor: str) -> onnx.ModelProto:
    """The part of `model` that computes `tensor` (its nodes and constants only)."""
    needed, kept = {tensor}, []
    for node in reversed(model.graph.node):
        if needed.intersection(node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
            for attr in node.attribute:   # subgraphs (If/Loop) read outer names too
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    needed.update(i for n in sub.node for i in n.input if i)
    if not kept:
        raise SteerguardError(f"the encoder computes no tensor named {tensor!r}")
    graph = helper.make_graph(list(reversed(kept)), model.graph.name, list(model.graph.input), [],
                              [t for t in model.graph.initializer if t.name in needed])
    return helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)


def _static_tokens(model: onnx.ModelProto) -> int:
    """Patches per image, from the encoder's fixed input size (one run of shape inference)."""
    import onnxruntime as ort

    dims = [x.dim_value for x in model.graph.input[0].type.tensor_type.shape.dim]
    if not all(dims[1:]):
        raise SteerguardError("the encoder's input must have a fixed channels x height x width")
    from ..engines import session_options

    session = ort.InferenceSession(model.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
    return int(session.run(None, {"pixel_values": np.zeros([1, *dims[1:]], np.float32)})[0].shape[1])


def _token_id(bundle: Path, manifest: dict, token: str) -> int:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(bundle / manifest["tokenizer"]["file"]))
    token_id = tok.token_to_id(token)
    if token_id is None or tok.encode(token, add_special_tokens=False).ids != [token_id]:
        raise SteerguardError(f"{token!r} is not a single special token of this model's tokenizer; choose one that is")
    return int(token_id)
