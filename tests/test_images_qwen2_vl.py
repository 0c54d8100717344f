"""steerguard.runtime.images.qwen2_vl against transformers: pixel patches, grids, placeholder counts and M-RoPE
positions must be what Qwen2VLImageProcessor, Qwen2VLProcessor and Qwen2VLModel.get_rope_index produce."""
import json

import numpy as np
import pytest

from steerguard.errors import SteerguardError
from steerguard.runtime.images import qwen2_vl

SMALL = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 16)
SPECIALS = ["<unk>", "<pad>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
# Both processors use the same Pillow resize, so the pixels agree exactly; the bound only allows float noise.
ATOL = 1e-5


def synthetic(width: int, height: int, seed: int):
    """Gradients in each channel plus noise: smooth areas and sharp edges for the resize filter."""
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    base = np.stack([255 * x / max(width - 1, 1), 255 * y / max(height - 1, 1),
                     127 * (x + y) / max(width + height - 2, 1)], axis=-1)
    noisy = base + np.random.default_rng(seed).normal(0, 40, base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def hf_image_processor(**kwargs):
    # The Pillow backend explicitly: it is what `Qwen2VLImageProcessor` resolves to without torchvision, and
    # it stays the reference if torchvision gets installed (see the module docstring on the backends).
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(**kwargs)


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["describe this picture and that one please"],
                            trainers.WordLevelTrainer(special_tokens=SPECIALS))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   additional_special_tokens=SPECIALS[2:])


def hf_processor(tokenizer, **image_kwargs):
    from transformers import Qwen2VLProcessor

    class ImageOnlyProcessor(Qwen2VLProcessor):
        # Without torchvision transformers cannot resolve the video processor class to type-check it;
        # there is no video processor here, so skip that one check.
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return ImageOnlyProcessor(image_processor=hf_image_processor(**image_kwargs), tokenizer=tokenizer)


# (width, height, image processor kwargs, what smart_resize must do to the area)
CASES = [
    (64, 64, SMALL, "keep"),
    (300, 100, SMALL, "shrink"),
    (100, 300, SMALL, "shrink"),
    (30, 20, SMALL, "grow"),
    (1000, 700, SMALL, "shrink"),
    (57, 113, SMALL, "keep"),
    (30, 20, {}, "grow"),
    (200, 150, {}, "keep"),
    (1600, 900, {}, "shrink"),
]


@pytest.mark.parametrize("width,height,image_kwargs,change", CASES,
                         ids=[f"{w}x{h}-{'small' if kw else 'default'}" for w, h, kw, _ in CASES])
def test_preprocess_matches_hf(tokenizer, width, height, image_kwargs, change):
    image = synthetic(width, height, seed=width * 1000 + height)
    processor = hf_processor(tokenizer, **image_kwargs)
    hf = processor(text=[f"describe {IMAGE} this picture"], images=[image], return_tensors="np")
    ours = qwen2_vl.preprocess(image, qwen2_vl.processor_config(processor.image_processor))

    assert ours.pixel_values.dtype == np.float32
    assert ours.pixel_values.shape == hf["pixel_values"].shape
    assert ours.extra["image_grid_thw"].dtype == np.int64
    assert ours.extra["image_grid_thw"].tolist() == hf["image_grid_thw"][0].tolist()
    assert np.abs(ours.pixel_values - hf["pixel_values"]).max() <= ATOL
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert ours.num_image_tokens == int((hf["input_ids"][0] == image_pad).sum())

    _, grid_h, grid_w = ours.extra["image_grid_thw"].tolist()
    area, resized = width * height, grid_h * grid_w * 14 * 14
    assert {"keep": resized == pytest.approx(area, rel=0.5), "shrink": resized < area, "grow": resized > area}[change]


def test_processor_config_is_json_and_checks_the_model(tokenizer):
    from transformers import Qwen2VLConfig

    processor = hf_image_processor(**SMALL)
    config = qwen2_vl.processor_config(processor, tiny_config(len(tokenizer), tokenizer))
    assert json.loads(json.dumps(config)) == config
    assert (config["min_pixels"], config["max_pixels"]) == (56 * 56, 28 * 28 * 16)
    assert (config["patch_size"], config["temporal_patch_size"], config["merge_size"]) == (14, 2, 2)
    assert config["resample"] == 3 and config["rescale_factor"] == pytest.approx(1 / 255)
    assert config["image_token_id"] == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert config["vision_start_token_id"] == tokenizer.convert_tokens_to_ids("<|vision_start|>")

    mismatched = Qwen2VLConfig(vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, patch_size=16))
    with pytest.raises(SteerguardError, match="patch_size"):
        qwen2_vl.processor_config(processor, mismatched)


def test_preprocess_refuses_extreme_aspect_ratio():
    config = qwen2_vl.processor_config(hf_image_processor(**SMALL))
    with pytest.raises(SteerguardError, match="aspect ratio"):
        qwen2_vl.preprocess(synthetic(402, 2, seed=0), config)


# ---------------------------------------------------------------------------------------- M-RoPE

def tiny_config(vocab_size: int, tokenizer):
    from transformers import Qwen2VLConfig

    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in [
        ("vision_start_token_id", "<|vision_start|>"), ("image_token_id", "<|image_pad|>"),
        ("vision_end_token_id", "<|vision_end|>"), ("video_token_id", "<|video_pad|>")]}
    text = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]})
    vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2)
    return Qwen2VLConfig(text_config=text, vision_config=vision, **ids)


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    torch.manual_seed(0)
    return Qwen2VLForConditionalGeneration(tiny_config(len(tokenizer), tokenizer)).eval()


PROMPTS = {
    "text-only": ("describe this picture please", []),
    "one-image": (f"describe {IMAGE} this picture please", [(300, 100)]),
    "image-first": (f"{IMAGE} describe this", [(57, 113)]),
    "two-images": (f"describe {IMAGE} this and {IMAGE} that one", [(300, 100), (100, 300)]),
}


@pytest.mark.parametrize("name", list(PROMPTS))
def test_mrope_position_ids_match_get_rope_index(tokenizer, tiny_model, name):
    import torch

    text, sizes = PROMPTS[name]
    images = [synthetic(w, h, seed=i) for i, (w, h) in enumerate(sizes)] or None
    batch = hf_processor(tokenizer, **SMALL)(text=[text], images=images, return_tensors="np")
    input_ids = batch["input_ids"][0]
    grids = batch["image_grid_thw"].tolist() if images else []

    config = tiny_model.config
    ours, delta = qwen2_vl.mrope_position_ids(input_ids, grids, config.image_token_id,
                                              config.vision_start_token_id, config.vision_config.spatial_merge_size)
    with torch.no_grad():
        theirs, their_delta = tiny_model.model.get_rope_index(
            torch.from_numpy(batch["input_ids"]), torch.from_numpy(batch["mm_token_type_ids"]),
            image_grid_thw=torch.tensor(grids) if images else None)

    assert ours.dtype == np.int64 and ours.shape == (3, len(input_ids))
    assert ours.tolist() == theirs[:, 0].tolist()
    assert delta == int(their_delta[0, 0])
    if not images:
        assert delta == 0 and (ours == np.arange(len(input_ids))).all()


def test_mrope_position_ids_reject_mismatched_grids():
    start, pad, end = 2, 3, 4
    ids = np.array([7, start] + [pad] * 6 + [end, 8])
    with pytest.raises(SteerguardError, match="2 image grids"):
        qwen2_vl.mrope_position_ids(ids, [[1, 4, 6], [1, 4, 6]], pad, start, 2)
    with pytest.raises(SteerguardError, match="needs 8 image tokens"):
        qwen2_vl.mrope_position_ids(ids, [[1, 4, 8]], pad, start, 2)
    with pytest.raises(SteerguardError, match="outside"):
        qwen2_vl.mrope_position_ids(ids, [[1, 2, 4]], pad, start, 2)
