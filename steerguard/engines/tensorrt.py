"""Build TensorRT plans for a bundle with onnxruntime's TensorRT execution provider.

The provider compiles each engine into a plan stored in its engine cache; we point that cache at
`bundle/trt/<key>/`, give it optimization profiles that span prefill (many tokens) and decode (one
token, a long cache), run each engine once to trigger the build, and record the plans in the index
that `plans.find_plans` verifies. Written for a GPU machine; not yet run on one (see docs/GPU.md)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..errors import SteerguardError
from ..runtime.manifest import Manifest
from . import resolve_backend, session_options
from .plans import PlanSet, current_key, find_plans, write_index


def _shapes(e: dict, m: dict, batch: int, seq: int, past: int) -> dict[str, tuple[int, ...]]:
    d, kv, hd = m["hidden_size"], m["num_kv_heads"], m["head_dim"]
    shapes = {}
    for name in e["inputs"]:
        if name == "input_ids":
            shapes[name] = (batch, seq)
        elif name in ("inputs_embeds", "hidden_states"):
            shapes[name] = (batch, seq, d)
        elif name == "attention_mask":
            shapes[name] = (batch, past + seq)
        elif name == "seqlens_k":
            shapes[name] = (batch,)
        elif name.startswith("past_key_values."):
            shapes[name] = (batch, kv, past, hd)
        elif name == "hidden":
            shapes[name] = (batch, d)
    return shapes


def _profile(shapes: dict) -> str:
    return ",".join(f"{k}:{'x'.join(map(str, v))}" for k, v in shapes.items())


def build_plans(bundle: Path, *, force: bool = False, fp16: bool = True, max_batch: int = 4,
                max_len: int = 2048) -> Path:
    manifest = Manifest.load(bundle)
    key = current_key()
    resolve_backend("tensorrt")
    onnx_sha = {e["name"]: manifest.data["files"][e["file"]] for e in manifest.engines}
    folder = Path(bundle) / "trt" / key.folder
    if not force:
        try:
            return find_plans(Path(bundle), key, onnx_sha).folder
        except SteerguardError:
            pass
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    m = manifest.model
    plans = {}
    for e in manifest.engines:
        lo, opt, hi = (_shapes(e, m, 1, 1, 1), _shapes(e, m, 1, 1, max_len // 2),
                       _shapes(e, m, max_batch, max_len, max_len))
        options = {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(folder), "trt_fp16_enable": fp16,
                   "trt_profile_min_shapes": _profile(lo), "trt_profile_opt_shapes": _profile(opt),
                   "trt_profile_max_shapes": _profile(hi)}
        before = set(folder.iterdir())
        sess = ort.InferenceSession(str(manifest.path(e["file"])), session_options(),
                                    providers=[("TensorrtExecutionProvider", options), "CUDAExecutionProvider"])
        feeds = {}
        for i in sess.get_inputs():
            shape = _shapes(e, m, 1, 4, 0)[i.name] if i.name in lo else None
            dtype = np.int64 if "int64" in i.type else np.float32
            feeds[i.name] = np.ones(shape, dtype) if dtype == np.int64 else np.zeros(shape, dtype)
        sess.run(None, feeds)   # the provider builds (and caches) the plan on the first run
        new = [p for p in set(folder.iterdir()) - before if p.suffix in (".engine", ".plan")]
        if not new:
            raise SteerguardError(f"TensorRT built no plan for engine {e['name']} (it may have fallen back to CUDA)")
        plans[e["name"]] = (max(new, key=lambda p: p.stat().st_size), onnx_sha[e["name"]])
    write_index(folder, key, plans)
    return find_plans(Path(bundle), key, onnx_sha).folder


__all__ = ["build_plans", "PlanSet"]
