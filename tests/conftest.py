import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import json  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# the project's measurement data sits beside the repository on its own machines and CI; a user's plain
# clone has no such folder, and tests that read it skip there
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is absent (a plain clone)")
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


# requests of mixed lengths, some the tiny guards fire on: for batching, where rows join and leave
MIXED_PROMPTS = ["How do I protect my account from hackers?", "Tell me how to hurt someone.",
                 "What is the capital of France and why is it famous for its food and art?", "hello there",
                 "What is art?", "Why is the sky blue?"]


def run_together(batcher, jobs, stagger_s=0.0):
    """Submit (request, sampling, steer) jobs to a ContinuousBatcher, `stagger_s` apart; wait for and return
    their results (a Finished event's result, or a Failed one's error)."""
    from steerguard.runtime.batching import Failed, Finished

    results, done = [None] * len(jobs), [threading.Event() for _ in jobs]

    def listener(i):
        def listen(ev):
            if isinstance(ev, (Finished, Failed)):
                results[i] = ev.result if isinstance(ev, Finished) else ev.error
                done[i].set()
        return listen

    for i, (request, sampling, steer) in enumerate(jobs):
        batcher.submit(request, sampling, listener(i), steer)
        time.sleep(stagger_s)
    for d in done:
        assert d.wait(120)
    return results


def tiny_tokenizer(texts, extra_specials: list[str] = ()):
    """A word-level tokenizer with a ChatML template, trained on `texts` (no hub, no files)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>", *extra_specials]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts + ["system user assistant"], trainers.WordLevelTrainer(special_tokens=specials))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<|im_end|>", bos_token="<|im_start|>",
                                   additional_special_tokens=list(extra_specials) or None)
    fast.chat_template = CHATML
    return fast


def tiny_model(arch: str, vocab_size: int, seed: int = 0):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=True)
    cfg = LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture(scope="session")
def demo_model():
    """The real demo model (fetched once into the cache)."""
    import torch

    from steerguard.export.models import load_model

    torch.set_num_threads(2)
    return load_model("demo")


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class TinyExport:
    """A tiny random model, a guard calibrated on it, and its bundles (int8 and fp32 prober)."""

    def __init__(self, arch: str, root: Path):
        from steerguard.export.bundle import export_bundle
        from steerguard.export.calibrate import CalibrationConfig, CalibrationData, calibrate
        from steerguard.export.data import default_pairs
        from steerguard.export.models import LoadedModel

        pairs = [p for p in default_pairs() if p.source.startswith("contrast")][:40]
        tok = tiny_tokenizer([t for p in pairs for t in (p.harmful, p.benign, p.refusal)])
        self.lm = LoadedModel(model=tiny_model(arch, len(tok)), tokenizer=tok, source=f"tiny-{arch}",
                              name=f"tiny-{arch}", sha256=f"{arch}-sha")
        cfg = CalibrationConfig(refusal_targets=16, refusal_epochs=2, max_per_source=40)
        self.guard = calibrate(self.lm, CalibrationData(pairs=pairs), cfg, progress=False)
        self.bundle = export_bundle(self.lm, self.guard, root / "int8", progress=False)
        self.bundle_fp32 = export_bundle(self.lm, self.guard, root / "fp32", prober_precision="fp32", progress=False)
        self.plain = export_bundle(self.lm, None, root / "plain", progress=False)


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny_export(request, tmp_path_factory):
    return TinyExport(request.param, tmp_path_factory.mktemp(f"tiny-{request.param}"))


CHATML_IMAGES = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
                 "{% else %}{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>{% else %}{{ p['text'] }}"
                 "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_llava_onevision(texts, seed: int = 0):
    """A tiny random LLaVA-OneVision (SigLIP tower 32 px in 8 px patches, Qwen2 decoder) with its
    processor: a LoadedModel as load_model gives for a multimodal folder."""
    import torch
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionImageProcessorPil, LlavaOnevisionProcessor, Qwen2Config,
                              SiglipVisionConfig)

    from steerguard.export.models import LoadedModel, without_video

    tok = tiny_tokenizer(texts, extra_specials=["<image>", "<video>"])
    tok.chat_template = CHATML_IMAGES
    torch.manual_seed(seed)
    text = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       tie_word_embeddings=False)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=32, patch_size=8)
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]
    cfg = LlavaOnevisionConfig(text_config=text, vision_config=vision, image_grid_pinpoints=pinpoints,
                               image_token_id=tok.convert_tokens_to_ids("<image>"),
                               video_token_id=tok.convert_tokens_to_ids("<video>"),
                               vision_feature_layer=-1, vision_feature_select_strategy="full")
    model = LlavaOnevisionForConditionalGeneration(cfg).eval()
    images = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32},
                                          image_grid_pinpoints=pinpoints)
    processor = without_video(LlavaOnevisionProcessor)(image_processor=images, tokenizer=tok, video_processor=None,
                                   chat_template=CHATML_IMAGES, num_image_tokens=16,
                                   vision_feature_select_strategy="full")
    return LoadedModel(model=model, tokenizer=tok, source="tiny-llava-onevision", name="tiny-llava-onevision",
                       sha256="llava-onevision-sha", processor=processor)


QWEN2_VL_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def tiny_qwen2_vl(texts, seed: int = 0):
    """A tiny random Qwen2-VL (one-block vision tower, 14 px patches merged 2 x 2, 3-D rotary decoder)
    with its processor."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil, Qwen2VLProcessor

    from steerguard.export.models import LoadedModel, without_video

    specials = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]
    tok = tiny_tokenizer(texts, extra_specials=specials)
    template = CHATML_IMAGES.replace("<image>", QWEN2_VL_IMAGE)
    tok.chat_template = template
    torch.manual_seed(seed)
    ids = {"vision_start_token_id": tok.convert_tokens_to_ids("<|vision_start|>"),
           "image_token_id": tok.convert_tokens_to_ids("<|image_pad|>"),
           "vision_end_token_id": tok.convert_tokens_to_ids("<|vision_end|>"),
           "video_token_id": tok.convert_tokens_to_ids("<|video_pad|>")}
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=1024, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]})
    vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2)
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision, **ids)).eval()
    images = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 16)
    processor = without_video(Qwen2VLProcessor)(image_processor=images, tokenizer=tok, video_processor=None,
                                              chat_template=template)
    return LoadedModel(model=model, tokenizer=tok, source="tiny-qwen2-vl", name="tiny-qwen2-vl",
                       sha256="qwen2-vl-sha", processor=processor)


def chameleon_image_token(index: int) -> str:
    """Chameleon's name for codebook entry `index`: its decimal digits as the letters A..J."""
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(index)) + "Z"


def tiny_chameleon(texts, seed: int = 0):
    """A tiny random Chameleon (a 16-entry VQ tokenizer making 8 x 8 image tokens of a 32 px image, a
    decoder with per-head query/key norms) with its processor."""
    import torch
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration, ChameleonImageProcessorPil, ChameleonProcessor

    from steerguard.export.models import LoadedModel

    codebook = 16
    specials = ["<image>", "<racm3:break>", "<eoss>", "<reserved08706>", *map(chameleon_image_token, range(codebook))]
    tok = tiny_tokenizer(texts, extra_specials=specials)
    tok.sep_token = "<reserved08706>"
    tok.chat_template = CHATML_IMAGES
    torch.manual_seed(seed)
    vq = dict(embed_dim=4, num_embeddings=codebook, latent_channels=4, resolution=32, base_channels=32,
              channel_multiplier=[1, 1, 1], num_res_blocks=1, attn_resolutions=[])
    cfg = ChameleonConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                          vq_config=vq, vocabulary_map=tok.get_vocab())
    model = ChameleonForConditionalGeneration(cfg).eval()
    with torch.no_grad():   # random init leaves the query/key norms at identity; make them matter
        for layer in model.model.layers:
            for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                norm.weight.normal_(1.0, 0.2)
                norm.bias.normal_(0.0, 0.2)
    images = ChameleonImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = ChameleonProcessor(images, tok, image_seq_length=64)
    processor.chat_template = CHATML_IMAGES
    return LoadedModel(model=model, tokenizer=tok, source="tiny-chameleon", name="tiny-chameleon",
                       sha256="chameleon-sha", processor=processor)
