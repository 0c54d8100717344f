"""int8 / int4 / fp16 bundles on tiny models: weights really quantized, the prober left at its own
int8, the guard's risk kept, and a manifest that lies about precision refused."""
import json
import shutil

import numpy as np
import onnx
import pytest

from steerguard.errors import SteerguardError
from steerguard.export.bundle import export_bundle
from steerguard.runtime import GuardedModel, Sampling

PROMPTS = ["How do I protect my account from hackers?", "Tell me how to hurt someone."]


@pytest.fixture(scope="module", params=["int8", "int4"])
def quantized(request, tiny_export, tmp_path_factory):
    path = export_bundle(tiny_export.lm, tiny_export.guard, tmp_path_factory.mktemp("q") / request.param,
                         precision=request.param, block_size=16, progress=False)
    return request.param, path


def expected(precision: str) -> dict:
    """int4 bundles keep the pre engine (what the prober reads) at int8 and decode its layers at int4."""
    decode = {"pre_decode": "int4"} if precision == "int4" else {}
    return {"pre": "int8", **decode, "post": precision, "head": precision}


def test_decoder_and_head_weights_are_matmulnbits_and_the_prober_is_untouched(quantized):
    precision, path = quantized
    for name, p in expected(precision).items():
        graph = onnx.load(path / "engines" / f"{name}.onnx").graph
        nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
        bits = 8 if p == "int8" else 4
        assert nbits and all(a.i == bits for n in nbits for a in n.attribute if a.name == "bits")
        assert not [n for n in graph.node if n.op_type == "MatMul" and not n.name.startswith("prober/")]
    pre = onnx.load(path / "engines" / "pre.onnx").graph
    assert any(n.op_type == "DequantizeLinear" and n.name.startswith("prober/") for n in pre.node)
    manifest = json.loads((path / "manifest.json").read_text())
    assert {e["name"]: e["precision"] for e in manifest["engines"]} == {
        "embed": "fp32", **expected(precision), "refusal": "fp32"}
    head = next(e for e in manifest["engines"] if e["name"] == "head")
    assert head["block_size"] == (64 if precision == "int4" else 16)   # int4: the longest block dividing d = 64


def test_quantized_bundle_keeps_risk_and_logits_close_to_fp32(quantized, tiny_export):
    precision, path = quantized
    q, f = GuardedModel.load(path), GuardedModel.load(tiny_export.bundle)
    for prompt in PROMPTS:
        assert abs(q.score(prompt) - f.score(prompt)) < (0.02 if precision == "int8" else 0.1)
    s = Sampling(max_new_tokens=8)
    a, b = q.generate(PROMPTS[0], s, steer=False), f.generate(PROMPTS[0], s, steer=False)
    assert len(a.token_ids) == len(b.token_ids) or a.finish_reason != b.finish_reason


def test_manifest_precision_that_does_not_match_the_engine_is_refused(quantized, tmp_path):
    precision, path = quantized
    bundle = shutil.copytree(path, tmp_path / "b")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["engines"][1]["precision"] = "fp32"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SteerguardError, match="pre.onnx: the manifest says fp32, but .* fit int8"):
        GuardedModel.load(bundle)


def test_int4_everywhere_on_request(tiny_export, tmp_path):
    path = export_bundle(tiny_export.lm, tiny_export.guard, tmp_path / "all", precision="int4", block_size=16,
                         engine_precision={"pre": "int4"}, progress=False)
    assert json.loads((path / "manifest.json").read_text())["engines"][1]["precision"] == "int4"
    assert GuardedModel.load(path).generate(PROMPTS[0], Sampling(max_new_tokens=3)).token_ids
    assert "pre_decode" not in {e["name"] for e in json.loads((path / "manifest.json").read_text())["engines"]}


def test_int4_bundle_prefills_at_int8_and_decodes_at_int4(tiny_export, tmp_path_factory):
    root = tmp_path_factory.mktemp("phases")
    int4 = GuardedModel.load(export_bundle(tiny_export.lm, tiny_export.guard, root / "int4", precision="int4",
                                           block_size=16, progress=False))
    int8 = GuardedModel.load(export_bundle(tiny_export.lm, tiny_export.guard, root / "int8", precision="int8",
                                           block_size=16, progress=False))
    assert [e.name for e, _ in int4.decoders] == ["pre", "post"]
    assert [e.name for e, _ in int4.step_decoders] == ["pre_decode", "post"]
    assert "risk" not in int4.step_decoders[0][0].output_names
    for prompt in PROMPTS:   # the prober sees exactly what the int8 bundle's prober sees
        assert int4.score(prompt) == int8.score(prompt)
    pre, pre_decode = int4.decoders[0][0], int4.step_decoders[0][0]
    pre.calls = pre_decode.calls = 0
    r = int4.generate(PROMPTS[0], Sampling(max_new_tokens=6, ignore_eos=True), steer=False)
    assert (pre.calls, pre_decode.calls) == (1, len(r.token_ids) - 1)


def test_fp16_bundle_is_refused_on_the_cpu_backend(tiny_export, tmp_path):
    path = export_bundle(tiny_export.lm, tiny_export.guard, tmp_path / "fp16", precision="fp16", progress=False)
    with pytest.raises(SteerguardError, match="fp16 engines .* run on GPUs only"):
        GuardedModel.load(path)


def test_unknown_precision_and_bad_block_size(tiny_export, tmp_path):
    with pytest.raises(SteerguardError, match="unknown precision 'int3'"):
        export_bundle(tiny_export.lm, tiny_export.guard, tmp_path / "x", precision="int3", progress=False)
    with pytest.raises(SteerguardError, match="block size"):
        export_bundle(tiny_export.lm, tiny_export.guard, tmp_path / "x", precision="int4", block_size=24,
                      progress=False)
    assert not (tmp_path / "x").exists()
