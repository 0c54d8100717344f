"""GGUF files of the families transformers reads as GGUF (issue 24): a tiny random model of each, built from its
transformers config by test_families' builders and written as an F32 GGUF the way llama.cpp's converter writes one
(gguf_tiny), loads through load_model with the config values that matter and the logits of the original. Where
transformers 5 reads such a file without something it states (rope scaling, head_dim, ...), load_model refuses it in
one line, and transformers' own load is shown to be a different model; an architecture transformers cannot read at
all is refused with the ones it can. Numbers: docs/gguf_families.md."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from gguf_tiny import SPECIALS, VOCAB_SIZE, write_gguf  # noqa: E402
from test_families import family_model  # noqa: E402

# Gemma 3 as a GGUF carries it: llama.cpp takes every 6th layer global, a local rotary base of 10000 and a query
# scale of 1/sqrt(head_dim), and no rope scaling on the small models (Gemma 3 270M, 1B)
GEMMA3 = {"num_hidden_layers": 6, "layer_types": None, "head_dim": 256, "query_pre_attn_scalar": 256,
          "final_logit_softcapping": None,
          "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                              "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}}
LLAMA32_PLAIN = {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}

LOADS = [   # (id, test_families family, overrides)
    ("qwen3", "qwen3", {"head_dim": 128}),          # the head_dim of every released Qwen3, which transformers assumes
    ("llama-tied", "llama3", LLAMA32_PLAIN),        # Llama 3.2's shape (tied head), without its rope scaling
    ("phi3", "phi3", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),   # no window, no longrope
    ("gemma3", "gemma3_text", GEMMA3),
]

REFUSED = [   # (id, family, overrides, what the one-line refusal names)
    ("llama3.2", "llama3", {}, "rope_freqs.weight, llama3 rope scaling (transformers: rope_type='default')"),
    ("qwen3-head_dim", "qwen3", {}, "attention.key_length=16 (transformers: head_dim=128)"),
    ("phi4-mini", "phi3", {}, "rope.dimension_count=16 (transformers: 32 rotary dims); rope_factors_long.weight, "
                              "longrope rope scaling (transformers: rope_type='default')"),
    ("phi3-window", "phi3", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "sliding_window": 16},
     "attention.sliding_window=16 (transformers: None)"),        # Phi-3-mini-4k's window of 2047, shortened
    ("gemma3-4b-rope", "gemma3_text",
     {**GEMMA3, "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                    "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0}}},
     "rope.scaling.type='linear' (transformers: rope_type='default')"),
    ("gemma3-softcap", "gemma3_text", {**GEMMA3, "final_logit_softcapping": 3.0},
     "final_logit_softcapping=3 (transformers: None)"),
    ("gemma3-head_dim", "gemma3_text", {**GEMMA3, "head_dim": 16, "query_pre_attn_scalar": 16},
     "attention scale 1/sqrt(16) (transformers: query_pre_attn_scalar=256)"),
]

CONFIG_VALUES = ["model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                 "tie_word_embeddings", "rope_parameters", "sliding_window", "layer_types", "query_pre_attn_scalar",
                 "final_logit_softcapping", "attn_logit_softcapping", "hidden_act", "hidden_activation",
                 "bos_token_id", "eos_token_id", "pad_token_id"]


def max_logit_diff(a, b) -> float:
    """Largest |logit| difference of two models over three 24-token sequences (longer than Gemma's window of 8)."""
    import torch

    ids = torch.randint(len(SPECIALS), VOCAB_SIZE, (3, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return float((a(ids).logits - b(ids).logits).abs().max())


def written(family: str, overrides: dict, path, architecture: str | None = None):
    original = family_model(family, VOCAB_SIZE, **overrides)
    return original, write_gguf(original, path, architecture)


@pytest.mark.parametrize("case,family,overrides", LOADS, ids=[c for c, *_ in LOADS])
def test_a_gguf_loads_as_the_model_it_was_written_from(case, family, overrides, tmp_path):
    from steerguard.export.arch import DecoderSpec
    from steerguard.export.models import load_model

    original, path = written(family, overrides, tmp_path / f"tiny-{case}.gguf")
    lm = load_model(path)
    got, want = lm.model.config, original.config
    for key in CONFIG_VALUES:
        assert getattr(got, key, None) == getattr(want, key, None), key
    assert got.rms_norm_eps == pytest.approx(want.rms_norm_eps, rel=1e-6)   # a float32 in the file
    weights = lm.model.state_dict()     # every weight, norms (Gemma's stored as 1 + w) and permuted rows included
    weight_diff = max(float((w - weights[k]).abs().max()) for k, w in original.state_dict().items())
    diff = max_logit_diff(original, lm.model)
    print(f"\n{case}: max |logit diff| {diff:.2e}, max |weight diff| {weight_diff:.2e}")
    assert weight_diff <= 1e-6 and diff <= 1e-4
    assert lm.tokenizer.chat_template and lm.tokenizer.vocab_size == VOCAB_SIZE
    DecoderSpec.from_model(lm.model)   # and steerguard exports it


@pytest.mark.parametrize("case,family,overrides,named", REFUSED, ids=[c for c, *_ in REFUSED])
def test_a_gguf_transformers_would_read_wrong_is_refused_in_one_line(case, family, overrides, named, tmp_path):
    """The refusal names the file, its architecture and what transformers leaves out; transformers' own load of the
    file is a different model (or none), so the refusal is not spurious."""
    import torch
    from transformers import AutoModelForCausalLM

    from steerguard.errors import SteerguardError
    from steerguard.export.models import load_model

    original, path = written(family, overrides, tmp_path / f"tiny-{case}.gguf")
    with pytest.raises(SteerguardError) as e:
        load_model(path)
    message = str(e.value)
    arch = original.config.model_type.removesuffix("_text")
    assert "\n" not in message and message.startswith(f"{path}: GGUF architecture {arch!r} states "), message
    assert named in message, message
    print(f"\n{case}: {message}")
    try:
        direct = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    except Exception as error:   # noqa: BLE001 - any failure is "not the model"
        print(f"\n{case}: transformers alone fails: {type(error).__name__}: {str(error).splitlines()[0][:120]}")
        return
    diff = max_logit_diff(original, direct)
    print(f"\n{case}: transformers alone loads it with max |logit diff| {diff:.2e}")
    assert diff > 1e-3


def test_a_gguf_without_some_of_the_weights_is_refused_not_left_as_initialized(tmp_path):
    """A Qwen3 GGUF from a converter that dropped the query norms: transformers loads it, norms at their initial
    ones; steerguard names the weights the file lacks."""
    from steerguard.errors import SteerguardError
    from steerguard.export.models import load_model

    original = family_model("qwen3", VOCAB_SIZE, head_dim=128)
    path = write_gguf(original, tmp_path / "tiny-qwen3-no-q-norm.gguf", drop=("attn_q_norm",))
    with pytest.raises(SteerguardError) as e:
        load_model(path)
    message = str(e.value)
    print(f"\nno-q-norm: {message}")
    assert "\n" not in message and message.startswith(
        f"{path}: GGUF architecture 'qwen3' has no tensor for 4 of the model's weights "
        "(model.layers.0.self_attn.q_norm.weight, model.layers.1.self_attn.q_norm.weight, "), message


UNREADABLE = [("granite", "granite"), ("olmo2", "olmo2"), ("smollm3", "smollm3"), ("llama3", "tinyllm")]


@pytest.mark.parametrize("family,architecture", UNREADABLE, ids=[a for _, a in UNREADABLE])
def test_an_architecture_transformers_cannot_read_is_refused_with_the_ones_it_can(family, architecture, tmp_path):
    from steerguard.errors import SteerguardError
    from steerguard.export.models import load_model

    _, path = written(family, {}, tmp_path / f"tiny-{architecture}.gguf", architecture)
    with pytest.raises(SteerguardError) as e:
        load_model(path)
    message = str(e.value)
    print(f"\n{architecture}: {message}")
    assert "\n" not in message and message.startswith(f"{path}: transformers "), message
    assert f"cannot read GGUF architecture {architecture!r}; it reads " in message
    assert all(a in message.split("it reads ")[1].split(", ") for a in ("llama", "qwen2", "qwen3", "phi3", "gemma3"))
