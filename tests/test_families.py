"""The decoder families beyond Llama/Qwen2 (issue 24), each a tiny random model built here from its transformers
config: exported at fp32, int8 and int4 with a guard calibrated on it, held to transformers (greedy tokens and
every step's logits), the prober's risk held to the PyTorch reference guard, and every config value the export
does not implement refused in one line. bench/families.py measures the same on more prompts (docs/MODELS.md)."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from conftest import tiny_tokenizer  # noqa: E402

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, pad_token_id=1, bos_token_id=2, eos_token_id=3)   # tiny_tokenizer's ids


def family_config(family: str, vocab_size: int, **overrides):
    """A tiny config of `family` exercising what sets it apart (scalings, windows, rotary types, norms)."""
    import transformers as tf

    common = dict(COMMON, vocab_size=vocab_size, **overrides)
    if family == "qwen3":
        return tf.Qwen3Config(**{"head_dim": 16, **common})
    if family == "llama3":     # Llama 3.2: tied head, llama3 rotary scaling, generation well past its original context
        return tf.LlamaConfig(**{"tie_word_embeddings": True, "rope_parameters": {
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}, **common})
    if family == "granite":
        return tf.GraniteConfig(**{"embedding_multiplier": 12.0, "residual_multiplier": 0.22,
                                   "attention_multiplier": 0.15, "logits_scaling": 4.0, "tie_word_embeddings": True,
                                   **common})
    if family == "olmo2":
        return tf.Olmo2Config(**common)
    if family == "smollm3":    # every second layer without rotary
        return tf.SmolLM3Config(**{"no_rope_layer_interval": 2, **common})
    if family == "gemma3_text":   # windows shorter than the prompts; the global layer's own rotary (linear-scaled)
        return tf.Gemma3TextConfig(**{
            "head_dim": 16, "query_pre_attn_scalar": 24, "sliding_window": 8,
            "layer_types": ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
            "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0}},
            "final_logit_softcapping": 3.0, **common})
    if family == "phi3":       # Phi-4-mini: partial rotary, longrope, tied head (heads of 32: 16 rotary dims)
        common.update(num_attention_heads=2, num_key_value_heads=1)
        rotary = 8
        return tf.Phi3Config(**{"tie_word_embeddings": True, "original_max_position_embeddings": 256,
                                "rope_parameters": {
                                    "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                    "short_factor": list(np.linspace(1.0, 2.0, rotary)),
                                    "long_factor": list(np.linspace(1.0, 8.0, rotary)),
                                    "original_max_position_embeddings": 256}, **{**common, "max_position_embeddings": 1024}})
    raise KeyError(family)


FAMILIES = ["qwen3", "llama3", "granite", "olmo2", "smollm3", "gemma3_text", "phi3"]


def family_model(family: str, vocab_size: int, seed: int = 0, **overrides):
    """The tiny random model, every norm gain moved off its initial value (ones, or Gemma's zeros) so a gain
    applied wrongly shows."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(family, vocab_size, **overrides)).eval()
    with torch.no_grad():
        for name, w in model.named_parameters():
            if "norm" in name:
                w.add_(torch.randn_like(w) * 0.2)
    return model


def family_lm(family: str, tokenizer=None, seed: int = 0):
    from steerguard.export.models import LoadedModel

    tok = tokenizer or family_tokenizer()
    return LoadedModel(model=family_model(family, len(tok), seed), tokenizer=tok, source=f"tiny-{family}",
                       name=f"tiny-{family}", sha256=f"{family}-sha")


def calibration_pairs():
    from steerguard.export.data import default_pairs

    return [p for p in default_pairs() if p.source.startswith("contrast")][:40]


def family_tokenizer():
    return tiny_tokenizer([t for p in calibration_pairs() for t in (p.harmful, p.benign, p.refusal)])


def prompts(n: int) -> list[str]:
    """n prompts of the calibration pairs' words (the tiny tokenizer knows them), harmful and benign mixed."""
    pairs = calibration_pairs()
    return [(pairs[i // 2].harmful if i % 2 else pairs[i // 2].benign) for i in range(n)]


@dataclass
class FamilyResult:
    family: str
    prompts: int
    new_tokens: int
    identical: int = 0                 # prompts whose fp32 greedy tokens equal model.generate's
    max_logit_diff: float = 0.0        # over every step of every prompt, fp32 bundle vs transformers
    max_risk_diff: float = 0.0         # fp32 prober vs ReferenceGuard
    fired: dict = field(default_factory=dict)        # precision -> prompts the guard fired on
    agree: dict = field(default_factory=dict)        # precision -> prompts whose decision equals fp32's
    same_tokens: dict = field(default_factory=dict)  # precision -> prompts whose plain greedy tokens equal fp32's
    c_identical: dict = field(default_factory=dict)  # precision -> prompts libsteerguard answers as GuardedModel
    logit_corr: dict = field(default_factory=dict)   # precision -> lowest correlation of its logits with fp32's
    seconds: float = 0.0


class FamilyExport:
    """A tiny family model, a guard calibrated on it, and its bundles: fp32 (fp32 prober), int8, int4."""

    def __init__(self, family: str, root: Path, tokenizer=None):
        from steerguard.export.bundle import export_bundle
        from steerguard.export.calibrate import CalibrationConfig, CalibrationData, calibrate

        self.family = family
        self.lm = family_lm(family, tokenizer)
        cfg = CalibrationConfig(refusal_targets=16, refusal_epochs=2, max_per_source=40)
        self.guard = calibrate(self.lm, CalibrationData(pairs=calibration_pairs()), cfg, progress=False)
        self.bundles = {"fp32": export_bundle(self.lm, self.guard, root / "fp32", prober_precision="fp32",
                                              progress=False),
                        "int8": export_bundle(self.lm, self.guard, root / "int8", precision="int8", progress=False),
                        "int4": export_bundle(self.lm, self.guard, root / "int4", precision="int4", progress=False)}


def bundle_logits(gm, ids: list[int], forced: list[int]) -> np.ndarray:
    """The plain head's logits before each of `forced` tokens (teacher-forced), from the bundle's engines."""
    from steerguard.runtime.model import DecodeStep

    cache = gm.new_cache(range(gm.num_layers), 1, len(ids) + len(forced))
    hidden, _ = gm.prefill(gm.prepare(list(ids)), cache, 0)
    plain = np.array([False])
    rows = [gm.next_logits(hidden[None], plain)[0].copy()]
    step = DecodeStep(gm, cache, 1)
    for token in forced[:-1]:
        gm.decode_one_token(np.array([token]), cache, step)
        rows.append(step.logits(plain)[0].copy())
    return np.stack(rows)


def measure(export: FamilyExport, n_prompts: int, new_tokens: int, native=None) -> FamilyResult:
    """Parity of the family's bundles with transformers and the reference guard on n prompts; with `native` (a
    NativeLibrary) also libsteerguard's guarded greedy answers against the Python runtime's."""
    import torch

    from steerguard.export.hidden import chat_ids
    from steerguard.export.reference import ReferenceGuard
    from steerguard.runtime.model import GuardedModel
    from steerguard.runtime.sampling import Sampling

    t0 = time.perf_counter()
    lm, result = export.lm, FamilyResult(export.family, n_prompts, new_tokens)
    models = {k: GuardedModel.load(b, threads=2) for k, b in export.bundles.items()}
    reference = ReferenceGuard(lm, export.guard)
    greedy = Sampling(max_new_tokens=new_tokens, ignore_eos=True)
    decisions: dict[str, list[bool]] = {k: [] for k in models}
    plain_tokens: dict[str, list[list[int]]] = {k: [] for k in models}
    texts = prompts(n_prompts)
    for prompt in texts:
        ids = chat_ids(lm.tokenizer, prompt)
        with torch.no_grad():
            hf = lm.model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                   do_sample=False, output_logits=True, return_dict_in_generate=True,
                                   pad_token_id=0)
        hf_tokens = hf.sequences[0, len(ids):].tolist()
        hf_logits = torch.cat(hf.logits).float().numpy()
        ours = bundle_logits(models["fp32"], ids, hf_tokens)
        result.max_logit_diff = max(result.max_logit_diff, float(np.abs(ours - hf_logits).max()))
        for k in ("int8", "int4"):   # the same steps through the quantized engines
            corr = float(np.corrcoef(bundle_logits(models[k], ids, hf_tokens).ravel(), ours.ravel())[0, 1])
            result.logit_corr[k] = min(result.logit_corr.get(k, 1.0), corr)
        for k, gm in models.items():
            out = gm.generate_batch([prompt], greedy, steer=False)[0]
            plain_tokens[k].append(out.token_ids)
            decisions[k].append(gm.decide(gm.score(prompt)))
        result.identical += plain_tokens["fp32"][-1] == hf_tokens
        ref_risk = reference.generate(prompt, Sampling(max_new_tokens=1)).risk
        result.max_risk_diff = max(result.max_risk_diff, abs(models["fp32"].score(prompt) - ref_risk))
    for k in models:
        result.fired[k] = int(sum(decisions[k]))
        result.agree[k] = int(sum(a == b for a, b in zip(decisions[k], decisions["fp32"])))
        result.same_tokens[k] = int(sum(a == b for a, b in zip(plain_tokens[k], plain_tokens["fp32"])))
    if native is not None:
        for k in ("fp32", "int4"):
            with native.model(export.bundles[k], threads=2) as m:
                result.c_identical[k] = 0
                for prompt in texts:
                    chat = [{"role": "user", "content": prompt}]
                    want = models[k].generate(chat, greedy)
                    got = m.generate(chat, max_new_tokens=new_tokens, ignore_eos=True)
                    result.c_identical[k] += (got.token_ids, got.fired) == (want.token_ids, want.fired)
    result.seconds = time.perf_counter() - t0
    return result


# ---- the tests --------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=FAMILIES)
def family_export(request, tmp_path_factory) -> FamilyExport:
    return FamilyExport(request.param, tmp_path_factory.mktemp(f"family-{request.param}"))


def test_bundles_answer_as_transformers_and_the_reference_guard(family_export):
    """fp32: greedy tokens equal model.generate's, every step's logits within 1e-3, the prober's risk within
    1e-4 of the PyTorch reference guard's; int8 and int4 bundles run, decide, and their logits follow fp32's (a
    random model's near-flat logits let quantization flip its argmaxes, so their tokens are not compared)."""
    r = measure(family_export, n_prompts=2, new_tokens=64)
    assert r.identical == r.prompts, r
    assert r.max_logit_diff <= 1e-3, r
    assert r.max_risk_diff <= 1e-4, r
    assert set(r.fired) == {"fp32", "int8", "int4"}
    assert r.logit_corr["int8"] >= 0.99 and r.logit_corr["int4"] >= 0.9, r


def test_the_c_library_answers_as_the_python_runtime(tmp_path):
    """libsteerguard runs a new family's engines (Qwen3's per-head norms inside the packed projection) with a
    byte-level BPE tokenizer: the Python runtime's tokens, risks and decisions."""
    import shutil

    from test_capi import PROMPTS, bpe_tokenizer, build, user

    from steerguard.runtime.model import GuardedModel
    from steerguard.runtime.native import NativeLibrary
    from steerguard.runtime.sampling import Sampling

    if shutil.which("cmake") is None:
        pytest.skip("no cmake to build libsteerguard with")
    native = NativeLibrary.load(build("c-families", "-DCMAKE_BUILD_TYPE=Release") / "libsteerguard.so")
    export = FamilyExport("qwen3", tmp_path, tokenizer=bpe_tokenizer("qwen2", tmp_path / "tokenizer"))
    for kind in ("fp32", "int4"):
        gm = GuardedModel.load(export.bundles[kind], threads=2)
        with native.model(export.bundles[kind], threads=2) as m:
            for p in PROMPTS[:4]:
                want = gm.generate(user(p), Sampling(max_new_tokens=16))
                got = m.generate(user(p), max_new_tokens=16)
                assert (got.token_ids, got.text, got.fired) == (want.token_ids, want.text, want.fired)
                assert abs(got.risk - want.risk) <= 1e-5


REFUSALS = [   # (family, config overrides, what the one-line error names)
    ("qwen3", {"attention_bias": True}, "attention_bias=True"),
    ("granite", {"mlp_bias": True}, "mlp_bias=True"),
    ("olmo2", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ("llama3", {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}},
     "rope_type='dynamic'"),
    ("smollm3", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0,
                                     "original_max_position_embeddings": 64}}, "rope_type='yarn'"),
    ("gemma3_text", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping=50.0"),
    ("gemma3_text", {"use_bidirectional_attention": True}, "use_bidirectional_attention=True"),
    ("phi3", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75}},
     "partial_rotary_factor=0.75"),
]


@pytest.mark.parametrize("family,overrides,named", REFUSALS, ids=[f"{f}-{n.split('=')[0]}" for f, _, n in REFUSALS])
def test_unsupported_config_values_are_refused_in_one_line(family, overrides, named):
    from steerguard.errors import SteerguardError
    from steerguard.export.arch import DecoderSpec

    model = family_model(family, 64, **overrides)
    with pytest.raises(SteerguardError) as e:
        DecoderSpec.from_model(model)
    message = str(e.value)
    assert "\n" not in message and named in message and message.startswith(model.config.model_type)


def test_longrope_stops_at_the_original_context_and_says_so(capsys):
    from steerguard.errors import SteerguardError
    from steerguard.export.arch import DecoderSpec

    model = family_model("phi3", 64)
    assert DecoderSpec.from_model(model).context == 256
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1 and "longrope" in said[0] and "256" in said[0]
    with pytest.raises(SteerguardError, match="context=512 is not supported.*original_max_position_embeddings=256"):
        DecoderSpec.from_model(model, context=512)


def test_an_unknown_family_is_refused_with_the_supported_list():
    import torch
    from transformers import AutoModelForCausalLM, PhiConfig

    from steerguard.errors import SteerguardError
    from steerguard.export.arch import DecoderSpec

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(PhiConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                                                       num_hidden_layers=2, num_attention_heads=4))
    with pytest.raises(SteerguardError, match="architecture 'phi' is not supported.*gemma3_text.*qwen3"):
        DecoderSpec.from_model(model)


def test_the_families_engines_carry_their_options_and_existing_ones_do_not():
    """New features are graph options that are off by default: a Llama engine has one rotary table and no
    window or logit scaling; Gemma 3's has both tables, windows on its local layers, GELU."""
    from steerguard.export.arch import DecoderSpec
    from onnx import numpy_helper

    from steerguard.export.onnx_graph import decoder_engine, embed_engine, head_engine

    def attention(m):
        return {n.name: {a.name: a for a in n.attribute} for n in m.graph.node if n.op_type == "GroupQueryAttention"}

    llama = DecoderSpec.from_model(family_model("llama3", 64, rope_parameters={"rope_type": "default",
                                                                               "rope_theta": 10000.0}))
    m = decoder_engine(llama, 0, 4, final_norm=True)
    assert all("local_window_size" not in a and a["do_rotary"].i == 1 for a in attention(m).values())
    assert {t.name for t in m.graph.initializer if "_cache" in t.name} == {"cos_cache", "sin_cache"}
    assert [n.op_type for n in head_engine(llama).graph.node] == ["MatMul"]
    gemma = DecoderSpec.from_model(family_model("gemma3_text", 64))
    m = decoder_engine(gemma, 0, 4, final_norm=True)
    windows = {k: a["local_window_size"].i if "local_window_size" in a else None for k, a in attention(m).items()}
    assert windows == {"layers.0/attention": 8, "layers.1/attention": 8, "layers.2/attention": None,
                       "layers.3/attention": 8}
    assert {t.name for t in m.graph.initializer if "_cache" in t.name} == {
        "cos_cache.sliding_attention", "sin_cache.sliding_attention", "cos_cache.full_attention",
        "sin_cache.full_attention"}
    assert "Gelu" in {n.op_type for n in m.graph.node}
    assert [n.op_type for n in head_engine(gemma).graph.node] == ["MatMul", "Div", "Tanh", "Mul"]
    table = numpy_helper.to_array(embed_engine(gemma).graph.initializer[0])
    np.testing.assert_array_equal(table, gemma.embed * np.float32(8.0))    # sqrt(64), as transformers multiplies
    smol = DecoderSpec.from_model(family_model("smollm3", 64))
    rotary = {k: a["do_rotary"].i for k, a in attention(decoder_engine(smol, 0, 4, final_norm=True)).items()}
    assert list(rotary.values()) == [1, 0, 1, 0]
