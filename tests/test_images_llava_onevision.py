"""steerguard.runtime.images.llava_onevision against transformers' LLaVA-OneVision processor and model."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from conftest import tiny_tokenizer  # noqa: E402
from steerguard.errors import SteerguardError  # noqa: E402
from steerguard.runtime.images.llava_onevision import image_token_count, preprocess, processor_config  # noqa: E402

PROMPT = "<image> describe this picture"
PIXEL_TOLERANCE = 1e-2
SMALL_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]
SIGLIP_NORM = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}

# name -> (image processor kwargs, processor kwargs); "defaults" is the HF class as it comes.
SETTINGS = {
    "small": ({"size": {"height": 32, "width": 32}, "image_grid_pinpoints": SMALL_PINPOINTS},
              {"num_image_tokens": 4, "vision_feature_select_strategy": "full"}),
    # 16 px tiles resized up to 32: the tile-resize path
    "small-crop16": ({"size": {"height": 32, "width": 32}, "crop_size": {"height": 16, "width": 16},
                      "image_grid_pinpoints": [[32, 32], [32, 64], [64, 32], [64, 64], [32, 96]]},
                     {"num_image_tokens": 4, "vision_feature_select_strategy": "full"}),
    # anyres_max_1: the feature grid is shrunk; "default" drops a CLS feature; bilinear; SigLIP mean/std
    "small-shrink": ({"size": {"height": 64, "width": 64}, "resample": 2, **SIGLIP_NORM,
                      "image_grid_pinpoints": [[64, 64], [64, 128], [128, 64], [128, 128], [64, 192]]},
                     {"num_image_tokens": 16, "vision_feature_select_strategy": "default",
                      "vision_aspect_ratio": "anyres_max_1"}),
    "defaults": ({}, {"num_image_tokens": 729, "vision_feature_select_strategy": "full"}),
    "defaults-siglip": (SIGLIP_NORM, {"num_image_tokens": 729, "vision_feature_select_strategy": "full"}),
}
SHAPES = {"square": (64, 64), "wide": (300, 100), "tall": (100, 300), "tiny": (10, 7), "odd": (257, 131),
          "large": (1000, 700)}  # (width, height)


def synthetic_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Gradients in R and G, half noise in B and over everything: smooth and sharp detail for the resizes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    gradients = np.stack([xx * 255 / max(width - 1, 1), yy * 255 / max(height - 1, 1),
                          np.full((height, width), 128.0)], axis=-1)
    noise = rng.integers(0, 256, (height, width, 3))
    return Image.fromarray((0.6 * gradients + 0.4 * noise).astype(np.uint8))


class _ImageOnlyProcessor:
    """Builds LlavaOnevisionProcessor without a video processor (that one needs torchvision)."""

    @staticmethod
    def build(image_processor, tokenizer, **kwargs):
        from transformers import LlavaOnevisionProcessor

        class ImageOnly(LlavaOnevisionProcessor):
            def check_argument_for_proper_class(self, argument_name, argument):
                if argument_name == "video_processor" and argument is None:
                    return None
                return super().check_argument_for_proper_class(argument_name, argument)

        return ImageOnly(image_processor=image_processor, tokenizer=tokenizer, **kwargs)


@pytest.fixture(scope="module")
def tokenizer():
    tok = tiny_tokenizer([PROMPT])
    tok.add_tokens(["<image>"], special_tokens=True)
    return tok


def hf_image_processor(**kwargs):
    # What `LlavaOnevisionImageProcessor` is without torchvision; named directly so the reference stays
    # the Pillow backend wherever the tests run (the torchvision one is compared separately below).
    from transformers import LlavaOnevisionImageProcessorPil

    return LlavaOnevisionImageProcessorPil(**kwargs)


@pytest.fixture(scope="module", params=list(SETTINGS))
def hf_processor(request, tokenizer):
    image_kwargs, processor_kwargs = SETTINGS[request.param]
    return _ImageOnlyProcessor.build(hf_image_processor(**image_kwargs), tokenizer, **processor_kwargs)


def hf_reference(processor, image: Image.Image) -> tuple[np.ndarray, np.ndarray, int]:
    out = processor(text=PROMPT, images=image, return_tensors="np")
    image_tokens = int((out["input_ids"] == processor.image_token_id).sum())
    return out["pixel_values"][0], out["image_sizes"][0], image_tokens


@pytest.mark.parametrize("shape", list(SHAPES))
def test_matches_hf_processor(hf_processor, shape):
    width, height = SHAPES[shape]
    image = synthetic_image(width, height)
    ref_pixels, ref_sizes, ref_tokens = hf_reference(hf_processor, image)

    pixels = preprocess(image, processor_config(hf_processor))

    assert pixels.pixel_values.dtype == np.float32
    assert pixels.pixel_values.shape == ref_pixels.shape
    max_diff = float(np.abs(pixels.pixel_values - ref_pixels).max())
    assert max_diff <= PIXEL_TOLERANCE, f"{shape}: max |ours - HF| = {max_diff}"
    np.testing.assert_array_equal(pixels.extra["image_sizes"], ref_sizes)
    assert pixels.num_image_tokens == ref_tokens
    assert image_token_count(height, width, processor_config(hf_processor)) == ref_tokens


@pytest.mark.parametrize("mode", ["RGBA", "L", "P"])
def test_non_rgb_images_convert_as_hf_does(mode):
    rgba = np.asarray(synthetic_image(40, 24).convert("RGBA")).copy()
    rgba[:, :20, 3] = np.linspace(0, 255, 24, dtype=np.uint8)[:, None]  # half the image partly transparent
    image = Image.fromarray(rgba).convert(mode) if mode != "RGBA" else Image.fromarray(rgba)
    image_processor = hf_image_processor(size={"height": 32, "width": 32}, image_grid_pinpoints=SMALL_PINPOINTS)
    reference = image_processor(image, return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(preprocess(image, processor_config(image_processor)).pixel_values, reference,
                               atol=PIXEL_TOLERANCE)


def test_token_count_over_many_sizes(tokenizer):
    """Only counts (no pixels compared): many aspect ratios, including ones that hit every rounding branch."""
    settings = [SETTINGS["small"], SETTINGS["small-shrink"], SETTINGS["defaults"]]
    rng = np.random.default_rng(1)
    sizes = [(int(w), int(h)) for w, h in rng.integers(1, 400, (12, 2))] + [(1, 300), (300, 1), (2304, 1)]
    for image_kwargs, processor_kwargs in settings:
        processor = _ImageOnlyProcessor.build(hf_image_processor(**image_kwargs), tokenizer, **processor_kwargs)
        config = processor_config(processor)
        for width, height in sizes:
            _, _, ref_tokens = hf_reference(processor, Image.new("RGB", (width, height)))
            assert image_token_count(height, width, config) == ref_tokens, (processor_kwargs, width, height)


def test_config_round_trips_through_json_and_drives_preprocess(hf_processor):
    config = processor_config(hf_processor)
    loaded = json.loads(json.dumps(config))
    assert loaded == config

    image = synthetic_image(*SHAPES["wide"])
    from_loaded, from_original = preprocess(image, loaded), preprocess(image, config)
    np.testing.assert_array_equal(from_loaded.pixel_values, from_original.pixel_values)
    assert from_loaded.num_image_tokens == from_original.num_image_tokens

    # The config really is what preprocess reads: another mean shifts every value.
    other = dict(loaded, image_mean=[m + 0.25 for m in loaded["image_mean"]])
    std = np.float32(loaded["image_std"])[:, None, None]
    np.testing.assert_allclose((from_loaded.pixel_values - preprocess(image, other).pixel_values) * std, 0.25,
                               atol=1e-5)


def test_config_keys_and_sources():
    from transformers import LlavaOnevisionConfig

    image_processor = hf_image_processor(size={"height": 32, "width": 32}, image_grid_pinpoints=SMALL_PINPOINTS)
    alone = processor_config(image_processor)
    assert alone["features_per_tile"] == 729 and alone["vision_aspect_ratio"] == "anyres_max_9"  # HF defaults
    assert alone["resample"] == "bicubic" and alone["size"] == [32, 32] and alone["tile_size"] == 32

    model_config = LlavaOnevisionConfig(vision_config={"model_type": "siglip_vision_model", "image_size": 32,
                                                       "patch_size": 16},
                                        image_grid_pinpoints=SMALL_PINPOINTS, vision_aspect_ratio="anyres_max_4",
                                        vision_feature_select_strategy="default")
    with_model = processor_config(image_processor, model_config)
    assert with_model["features_per_tile"] == 4 and with_model["vision_aspect_ratio"] == "anyres_max_4"
    assert with_model["vision_feature_select_strategy"] == "default"

    model_config.image_grid_pinpoints = [[64, 64]]
    with pytest.raises(SteerguardError, match="pinpoints"):
        processor_config(image_processor, model_config)
    with pytest.raises(SteerguardError, match="center_crop"):
        processor_config(hf_image_processor(do_center_crop=True))


def test_token_count_equals_model_feature_count():
    """The tiny HF model packs exactly as many features as `image_token_count` promises, from our pixels."""
    import torch
    from transformers import LlavaOnevisionConfig, LlavaOnevisionModel

    model_config = LlavaOnevisionConfig(
        vision_config={"model_type": "siglip_vision_model", "hidden_size": 16, "intermediate_size": 32,
                       "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 32, "patch_size": 16},
        text_config={"model_type": "qwen2", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 64},
        image_grid_pinpoints=SMALL_PINPOINTS, vision_aspect_ratio="anyres_max_2")
    torch.manual_seed(0)
    model = LlavaOnevisionModel(model_config).eval()
    config = processor_config(hf_image_processor(size={"height": 32, "width": 32},
                                                 image_grid_pinpoints=SMALL_PINPOINTS), model_config)
    for width, height in SHAPES.values():
        pixels = preprocess(synthetic_image(width, height), config)
        with torch.no_grad():
            features = model.get_image_features(pixel_values=torch.from_numpy(pixels.pixel_values[None]),
                                                image_sizes=torch.from_numpy(pixels.extra["image_sizes"][None]),
                                                vision_feature_select_strategy="full",
                                                vision_aspect_ratio="anyres_max_2").pooler_output
        assert features[0].shape[0] == pixels.num_image_tokens, (width, height)


def test_torchvision_backend_within_a_few_grey_levels():
    """HF's torchvision backend resizes with torch's antialiased bicubic, which rounds differently from Pillow."""
    from transformers.utils import is_torchvision_available

    if not is_torchvision_available():
        pytest.skip("torchvision is not installed")
    from transformers.models.llava_onevision.image_processing_llava_onevision import LlavaOnevisionImageProcessor

    image_processor = LlavaOnevisionImageProcessor()
    config = processor_config(image_processor)
    assert config["reference_backend"] == "torchvision"
    std = np.asarray(config["image_std"], dtype=np.float32)[:, None, None]
    for width, height in SHAPES.values():
        image = synthetic_image(width, height)
        reference = np.asarray(image_processor(image, return_tensors="np")["pixel_values"][0])
        grey_levels = np.abs(preprocess(image, config).pixel_values - reference) * std * 255
        assert grey_levels.max() <= 3.01 and (grey_levels > 0.5).mean() < 0.01, (width, height)
