"""Export the bundles the GPU run measures from one load of the model (bench/device.sh, stage "export").

    python bench/gpu_export.py --guard GUARD --out DIR [--model demo] [--variants fp32,fp16,...] [--json FILE]

Variants (each a folder DIR/<variant>; one that fails is recorded and the others still run):
  fp32, fp16               the guarded chain (fp16: onnxruntime's converter, inputs and outputs kept fp32)
  fp32-plain, fp16-plain   the same model unsplit and unguarded: the baseline for the guard's overhead
  fp16-kv16                fp16 with the KV cache in fp16 at the engines' inputs and outputs: the export keeps
                           the cache fp32 there, so on the GPU every step casts each layer's whole cache to fp16
                           and back and the attention cannot update it in place; this variant measures that cost

`--model demo` on the device reads the demo GGUF from STEERGUARD_CACHE (bench/device_carry.py puts it there).
The guard refuses a model whose weights hash differs from the one it was calibrated on; when the demo model
is rebuilt from a GGUF whose sha256 is the named model's own, a different hash can only come from how this
machine's libraries wrote the converted folder, so the guard is bound to it and the JSON says so."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

VARIANTS = ("fp32", "fp16", "fp32-plain", "fp16-plain", "fp16-kv16")


def fp16_kv_quantize(model, precision: str, block_size: int = 32):
    """export.quantize for fp16 that keeps the inputs and outputs fp32 except the KV cache's."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    if precision != "fp16":      # the engines an fp16 bundle keeps at fp32 (embed, refusal)
        return model
    keep = [v.name for v in [*model.graph.input, *model.graph.output]
            if not v.name.startswith(("past_key_values.", "present."))]
    half = OnnxModel(convert_float_to_float16(model, keep_io_types=keep, disable_shape_infer=True))
    half.topological_sort()
    return half.model


def export_variant(lm, guard, variant: str, out: Path) -> Path:
    """One variant's bundle in `out`."""
    import steerguard.export.bundle as bundle

    precision = variant.split("-")[0]
    saved = bundle.quantize
    if variant == "fp16-kv16":
        bundle.quantize = fp16_kv_quantize
    try:
        return bundle.export_bundle(lm, None if variant.endswith("-plain") else guard, out, precision=precision,
                                    progress=False)
    finally:
        bundle.quantize = saved


def bind_guard(lm, guard, model: str) -> str | None:
    """Bind the guard to a named model rebuilt here from its own GGUF (module docstring); None when the
    hashes agree or the GGUF is not a named model's."""
    from steerguard.export.models import NAMED_MODELS, cache_dir, sha256_file

    if lm.sha256 == guard.model["sha256"]:
        return None
    gguf = Path(model) if model.endswith(".gguf") else (
        cache_dir() / "downloads" / NAMED_MODELS[model].gguf if model in NAMED_MODELS else None)
    digest = sha256_file(gguf) if gguf is not None and gguf.is_file() else None
    named = next((m for m in NAMED_MODELS.values() if m.sha256 == digest), None)
    if named is None or named.display != guard.model["name"]:
        return None      # not the guard's model: export_bundle refuses it with its own error
    note = (f"the model here hashed {lm.sha256[:12]}..., the guard's {guard.model['sha256'][:12]}...; its GGUF has "
            f"{named.display}'s sha256, so the guard was bound to this conversion")
    lm.sha256 = guard.model["sha256"]
    return note


def hf_folder(lm, model: str, out: Path) -> str:
    """A Hugging Face folder of the model for the transformers peer: the named model's converted folder, or
    one written here."""
    from steerguard.export.models import NAMED_MODELS, named_model_dir

    if model in NAMED_MODELS:
        return str(named_model_dir(model))
    if Path(model).is_dir():
        return model
    lm.model.save_pretrained(out)
    lm.tokenizer.save_pretrained(out)
    return str(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--guard", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--variants", default=",".join(VARIANTS[:4]), help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    variants = [v for v in a.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")

    from steerguard.export.guard import Guard
    from steerguard.export.models import load_model

    record: dict = {"model": a.model, "guard": str(a.guard), "bundles": {}}
    t = time.perf_counter()
    try:
        guard = Guard.load(a.guard)
        lm = load_model(a.model)
        record["guard_binding"] = bind_guard(lm, guard, a.model)
        record["hf_folder"] = hf_folder(lm, a.model, a.out / "hf-model")
    except Exception as e:     # recorded, not raised: the device script goes on to write its report
        record["error"] = f"{type(e).__name__}: {e}"
        return _finish(record, a.json, 1)
    record["load_s"] = round(time.perf_counter() - t, 1)
    for variant in variants:
        out = a.out / variant
        t = time.perf_counter()
        try:
            export_variant(lm, guard, variant, out)
            size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
            record["bundles"][variant] = {"path": str(out), "seconds": round(time.perf_counter() - t, 1),
                                          "mb": round(size / 1e6)}
        except Exception as e:
            record["bundles"][variant] = {"path": str(out), "error": f"{type(e).__name__}: {e}"}
        print(f"{variant}: {record['bundles'][variant]}", flush=True)
    return _finish(record, a.json, 0 if all("error" not in b for b in record["bundles"].values()) else 1)


def _finish(record: dict, path: Path | None, code: int) -> int:
    text = json.dumps(record, indent=1)
    if path:
        path.write_text(text + "\n")
    print(text)
    return code


if __name__ == "__main__":
    sys.exit(main())
