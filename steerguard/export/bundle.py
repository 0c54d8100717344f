"""Write a bundle: the engine chain, the tokenizer and chat template, a report, and a manifest that
describes the chain as data and pins every file by sha256.

    bundle/
      manifest.json
      engines/{vision,embed,pre,post,head,refusal}.onnx (+ .onnx.data; vision in multimodal bundles only)
      tokenizer/tokenizer.json, tokenizer_config.json, chat_template.jinja
      report/sas.json, sas.png, guard.json
"""

from __future__ import annotations

import datetime
import json
import shutil
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .. import __version__
from ..errors import SteerguardError
from ..runtime.chat import ChatTokenizer
from ..runtime.manifest import MANIFEST, SCHEMA
from .chat_pieces import chat_pieces
from .arch import DecoderSpec
from .answer_guard import answer_manifest
from .guard import Guard
from .prober import ENGINE_FEATURES
from .models import LoadedModel, sha256_file
from .quantize import check_precision, quantize
from .onnx_graph import (ProberWeights, decoder_engine, embed_engine, head_engine, past_names, present_names,
                         refusal_engine, save_engine)
from .refusal import end_of_turn_ids
from .vision import vision_engine, vision_family, vision_manifest

PROBER_PRECISIONS = ("int8", "fp32")


def export_bundle(lm: LoadedModel, guard: Guard | None, out: str | Path, *, precision: str = "fp32",
                  block_size: int = 32, head_block_size: int | None = None, prober_precision: str = "int8",
                  context: int | None = None,
                  engine_precision: dict[str, str] | None = None, progress: bool = True) -> Path:
    """Export `lm` split at the guard's layer (or unsplit and unguarded when `guard` is None), the
    decoder and head engines' weights at `precision` (`engine_precision` overrides it per engine name,
    e.g. {"pre": "int8"}), in blocks of `block_size` (the head: `head_block_size`; by default at int4 the
    largest of 128, 64, ... that divides the hidden size, since onnxruntime's kernel spends a third less
    time on a 49k-row head with blocks of 64 than of 32). Written to `out.partial` and renamed at the
    end, so `out` never holds a half-written bundle."""
    check_precision(precision, block_size)
    if head_block_size is not None:
        check_precision(precision, head_block_size)
    if precision == "int4" and engine_precision is None:
        # int4 weights in the layers before the split move h_l* enough to flip 21% of the prober's
        # decisions (docs/precision.md): the prompt goes through them at int8 (99.7% agreement), the
        # generated tokens at int4 (a `pre_decode` engine)
        engine_precision = {"pre": "int8"}
    for p in (engine_precision or {}).values():
        check_precision(p, block_size)
    if prober_precision not in PROBER_PRECISIONS:
        raise SteerguardError(f"unknown prober precision {prober_precision!r}; choose int8 or fp32")
    if guard is not None:
        guard.check_model(lm)
        if guard.prober.feature not in ENGINE_FEATURES:
            raise SteerguardError(f"the engine computes the prober on the last token, the post-instruction tokens or every token; this "
                                  f"guard reads {guard.prober.feature!r}: recalibrate with the default feature")
    spec = DecoderSpec.from_model(lm.model, context)
    if spec.head_dim % 16:
        raise SteerguardError(f"head_dim {spec.head_dim} is not a multiple of 16, which onnxruntime's fused "
                              "attention needs; this model cannot be exported yet")
    if head_block_size is None:
        head_block_size = _long_head_blocks(spec.hidden_size, block_size) if precision == "int4" else block_size
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "engines").mkdir(parents=True)

    n = spec.num_layers
    chain: list[tuple[str, str, object, dict]] = [("embed", "embed", lambda: embed_engine(spec), {})]
    if guard is None:
        chain.append(("decoder", "decoder",
                      lambda: decoder_engine(spec, 0, n, final_norm=True, name="decoder"), {"layers": [0, n]}))
    else:
        l_star = guard.split_layer
        p = guard.prober
        prober = ProberWeights(p.w1, p.b1, p.w2, p.b2, precision=prober_precision,
                               per_token=p.per_token or p.feature == "last", span=p.span)
        a = guard.answer.prober if guard.answer is not None else None
        # fp32: its two columns are tiny, and an int8 copy changes how onnxruntime fuses the prompt prober's
        # int8 weights (the prompt's risk moved by 1e-2 on a tiny model), which must stay as it was
        answer = None if a is None else ProberWeights(a.w1, a.b1, a.w2, a.b2, precision="fp32", per_token=True)
        split_decode = (engine_precision or {}).get("pre", precision) != precision
        # the answer prober reads the generated tokens' states: it sits in the engine that decodes them
        chain.append(("pre", "decoder", lambda: decoder_engine(spec, 0, l_star, final_norm=False, prober=prober,
                                                               answer_prober=None if split_decode else answer,
                                                               name="pre"), {"layers": [0, l_star], "prober": prober_precision}))
        if split_decode:
            # the prober reads the prompt's state at the pre engine's precision; the tokens after it need no
            # prober and run these layers at the bundle's precision
            chain[-1][3]["phase"] = "prefill"
            chain.append(("pre_decode", "decoder", lambda: decoder_engine(spec, 0, l_star, final_norm=False,
                                                                          answer_prober=answer, name="pre_decode"),
                          {"layers": [0, l_star], "phase": "decode"}))
        chain.append(("post", "decoder", lambda: decoder_engine(spec, l_star, n, final_norm=True, name="post"),
                      {"layers": [l_star, n]}))
    chain.append(("head", "head", lambda: head_engine(spec), {}))
    vision = vision_manifest(lm.model, lm.processor) if vision_family(lm.model) else None
    if vision is not None:
        chain.insert(0, ("vision", "vision", lambda: vision_engine(lm.model), {}))
    if guard is not None:
        chain.append(("refusal", "refusal", lambda: refusal_engine(guard.refusal.transform), {}))

    engines = []
    for name, role, build, extra in tqdm(chain, desc=f"export engines ({precision})", unit="engine",
                                         disable=not progress):
        model = build()
        weights, other = _weight_counts(model)
        this = (engine_precision or {}).get(name, precision if role in ("decoder", "head") else "fp32")
        block = head_block_size if role == "head" else block_size
        model = quantize(model, this, block)
        files = save_engine(model, tmp / "engines" / f"{name}.onnx")
        if this in ("int8", "int4"):
            extra = {**extra, "block_size": block}
        engines.append({"name": name, "role": role, "file": f"engines/{name}.onnx", "precision": this,
                        "matmul_weights": weights, "other_weights": other,
                        "inputs": [i.name for i in model.graph.input], "outputs": [o.name for o in model.graph.output],
                        "data_files": [f"engines/{f.name}" for f in files[1:]], **extra})
        del model

    _write_tokenizer(lm, tmp / "tokenizer")
    if guard is not None:
        (tmp / "report").mkdir()
        guard.sas.save(tmp / "report")
        guard.sas.plot(tmp / "report" / "sas.png", guard.split_layer)
        roc = guard.prober.roc or {}
        if roc.get("fpr"):    # the held-out ROC calibration recorded, its operating points marked
            from .operating import plot_roc

            plot_roc(roc["fpr"], roc["tpr"], guard.prober.operating_points, tmp / "report" / "roc.png",
                     f"prober ROC, {roc.get('rows', '?')} held-out rows", roc.get("auroc"))

    manifest = {
        "format": "steerguard-bundle", "schema": SCHEMA, "steerguard_version": __version__, "precision": precision,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": lm.name, "source": lm.source, "sha256": lm.sha256, "architecture": spec.architecture,
                  "num_layers": n, "hidden_size": spec.hidden_size, "vocab_size": spec.vocab_size,
                  "num_heads": spec.num_heads, "num_kv_heads": spec.num_kv_heads, "head_dim": spec.head_dim,
                  "context": spec.context, "mrope": spec.mrope},
        "guard": None if guard is None else {
            "split_layer": guard.split_layer, "tau": guard.prober.tau, "eps": guard.refusal.eps,
            "feature": guard.prober.feature, "span": guard.prober.span, "prober_precision": prober_precision,
            "prober_hidden": int(guard.prober.w1.shape[1]), "prober_metrics": guard.prober.metrics,
            "sas": {"layers": guard.sas.layers, "scores": guard.sas.scores, "num_pairs": guard.sas.num_pairs},
            "calibration": guard.calibration, "metrics": guard.metrics,
            # named thresholds (tau = balanced's); the runtime and the C library let users pick one
            "operating_points": guard.prober.operating_points, "default_operating_point": "balanced",
            "roc": guard.prober.roc,
            "answer": None if guard.answer is None else answer_manifest(guard.answer)},
        "engines": engines,
        "vision": vision,
        "cache": {"inputs": list(past_names("{i}")), "outputs": list(present_names("{i}")),
                  "layout": "batch, kv_heads, sequence, head_dim", "shared_buffer": True},
        "tokenizer": {"file": "tokenizer/tokenizer.json", "config": "tokenizer/tokenizer_config.json",
                      "chat_template": "tokenizer/chat_template.jinja",
                      "chat_pieces": _template_pieces(tmp / "tokenizer")},
        "generation": {"stop_token_ids": end_of_turn_ids(lm.tokenizer), "max_new_tokens": 256, "temperature": 0.0},
    }
    manifest["files"] = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _long_head_blocks(hidden_size: int, block_size: int) -> int:
    """The longest block up to 128 that divides the hidden size (so nothing is padded), at least `block_size`."""
    b = 128
    while b > block_size and hidden_size % b:
        b //= 2
    return b


def _weight_counts(model) -> tuple[int, int]:
    """(weights of MatMuls the quantizer converts, all other constants): what the runtime's precision check
    needs to predict an engine's size."""
    from .quantize import PROBER_SCOPE

    inits = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    matmul = {n.input[1] for n in model.graph.node
              if n.op_type == "MatMul" and n.input[1] in inits and not n.name.startswith(PROBER_SCOPE)}
    w = sum(inits[k] for k in matmul)
    return w, sum(inits.values()) - w


def _template_pieces(folder: Path) -> dict | None:
    """The chat template as text pieces for the C library, checked against the runtime's own renderer."""
    tok = ChatTokenizer(folder / "tokenizer.json", folder / "tokenizer_config.json", folder / "chat_template.jinja")
    return chat_pieces(tok.render)


def _write_tokenizer(lm: LoadedModel, folder: Path) -> None:
    tok = lm.tokenizer
    folder.mkdir(parents=True)
    tok.save_pretrained(folder)
    template = tok.chat_template
    (folder / "chat_template.jinja").write_text(template)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update({k: getattr(tok, k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")
                   if getattr(tok, k, None) is not None})
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    for extra in folder.iterdir():
        if extra.name not in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            extra.unlink()
