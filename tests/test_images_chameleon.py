"""steerguard.runtime.images.chameleon against transformers' Chameleon image processor, processor and VQ mapping."""
import json

import numpy as np
import pytest
from PIL import Image

from steerguard.errors import SteerguardError
from steerguard.runtime.images import chameleon

TOLERANCE = 1e-2
SIZES = {
    "default": {},
    "small": dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
    "padded": dict(size={"shortest_edge": 24}, crop_size={"height": 32, "width": 40}),  # crop larger: zero padding
}
MODES = ("RGB", "RGBA", "L", "LA", "P", "P-transparent")
SHAPES = ((37, 53), (300, 120), (64, 64), (21, 27))  # (height, width): wide, tall, square, smaller than the crop


def synthetic_image(height: int, width: int, mode: str, seed: int = 0) -> Image.Image:
    """Gradients plus noise; RGBA/LA get an alpha with fully transparent, partial and opaque pixels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    gradient = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1),
                         (xx + yy) * 255 // max(height + width - 2, 1)], axis=-1)
    rgb = np.clip(gradient + rng.integers(-40, 41, (height, width, 3)), 0, 255).astype(np.uint8)
    alpha = np.where((xx // 7 + yy // 5) % 3 == 0, 0, xx * 255 // max(width - 1, 1)).astype(np.uint8)
    if mode == "RGB":
        return Image.fromarray(rgb)
    if mode == "RGBA":
        return Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    if mode == "L":
        return Image.fromarray(rgb).convert("L")
    if mode == "LA":
        return Image.fromarray(np.dstack([rgb[..., 0], alpha]), "LA")
    palette = Image.fromarray(rgb).quantize(16)
    if mode == "P-transparent":
        palette.info["transparency"] = 3  # palette entry 3 is see-through, as in a PNG with tRNS
    return palette


@pytest.fixture(scope="module")
def processors():
    from transformers import ChameleonImageProcessor

    return {name: ChameleonImageProcessor(**kwargs) for name, kwargs in SIZES.items()}


def hf_pixels(image_processor, image: Image.Image) -> np.ndarray:
    return np.asarray(image_processor(images=[image], return_tensors="np")["pixel_values"])


@pytest.mark.parametrize("size_name", list(SIZES))
@pytest.mark.parametrize("mode", MODES)
def test_pixels_match_hf(processors, size_name, mode):
    image_processor = processors[size_name]
    config = chameleon.processor_config(image_processor)
    shapes = SHAPES if size_name != "default" else ((300, 120), (600, 900))  # keep 512-px cases few
    for height, width in shapes:
        image = synthetic_image(height, width, mode, seed=height * width)
        expected = hf_pixels(image_processor, image)
        pixels = chameleon.preprocess(image, config)
        assert pixels.pixel_values.dtype == np.float32
        assert pixels.pixel_values.shape == expected.shape, (height, width)
        diff = float(np.abs(pixels.pixel_values - expected).max())
        assert diff <= TOLERANCE, f"{size_name} {mode} {height}x{width}: max |diff| {diff}"
        assert pixels.num_image_tokens == chameleon.image_token_count(config)


@pytest.mark.parametrize("kwargs", [
    dict(size={"shortest_edge": 32, "longest_edge": 40}, crop_size={"height": 32, "width": 32}),
    dict(size={"height": 30, "width": 44}, crop_size={"height": 32, "width": 32}),
    dict(size=40, do_center_crop=False),  # an int size means shortest_edge; no crop keeps the aspect ratio
], ids=["capped-long-edge", "fixed-size", "no-crop"])
def test_other_size_rules_match_hf(kwargs):
    from transformers import ChameleonImageProcessor

    image_processor = ChameleonImageProcessor(**kwargs)
    config = chameleon.processor_config(image_processor)
    for height, width in SHAPES + ((32, 90),):
        image = synthetic_image(height, width, "RGBA", seed=height + width)
        expected = hf_pixels(image_processor, image)
        pixels = chameleon.preprocess(image, config).pixel_values
        assert pixels.shape == expected.shape, (height, width)
        assert float(np.abs(pixels - expected).max()) <= TOLERANCE, (height, width)


def test_transparency_becomes_white(processors):
    """A fully transparent image is white, whatever colour its hidden pixels have (HF's blend onto white)."""
    config = chameleon.processor_config(processors["small"])
    hidden = np.zeros((40, 50, 4), dtype=np.uint8)
    hidden[..., 0] = 200
    pixels = chameleon.preprocess(Image.fromarray(hidden, "RGBA"), config).pixel_values
    white = np.float32(np.float32(255 * 0.0078) - 1.0)
    np.testing.assert_allclose(pixels, white, atol=1e-6)


def test_config_is_json_and_has_the_defaults(processors):
    config = chameleon.processor_config(processors["default"])
    assert json.loads(json.dumps(config)) == config
    assert config["size"] == {"shortest_edge": 512}
    assert config["crop_size"] == {"height": 512, "width": 512}
    assert config["resample"] == "lanczos"
    assert config["rescale_factor"] == pytest.approx(0.0078)
    assert config["image_mean"] == config["image_std"] == [1.0, 1.0, 1.0]
    assert chameleon.image_token_count(config) == 1024
    assert chameleon.image_prompt_tokens(config) == ("<racm3:break>", "<image>", "<eoss>")


def chameleon_processor(image_processor, image_seq_length: int):
    from conftest import tiny_tokenizer
    from transformers import ChameleonProcessor

    tokenizer = tiny_tokenizer(["hello world a photo of a cat"])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<racm3:break>", "<eoss>"],
                                  "sep_token": "<reserved08706>"})
    return ChameleonProcessor(image_processor, tokenizer, image_seq_length=image_seq_length)


def test_prompt_expansion_matches_chameleon_processor(processors):
    processor = chameleon_processor(processors["small"], image_seq_length=4)
    config = chameleon.processor_config(processor)
    image = synthetic_image(40, 50, "RGB")
    text = "hello <image> world"
    out = processor(images=[image], text=text, return_for_text_completion=True, return_tensors="np")

    ours = processor.tokenizer(text.replace("<image>", chameleon.expand_image_placeholder(config)))["input_ids"]
    assert list(out["input_ids"][0]) == list(ours)
    start, placeholder, end = chameleon.image_prompt_tokens(config)
    tokens = processor.tokenizer.convert_ids_to_tokens(list(out["input_ids"][0]))
    assert tokens.count(placeholder) == chameleon.image_token_count(config) == 4
    assert tokens[tokens.index(start) + 1 + 4] == end
    np.testing.assert_allclose(chameleon.preprocess(image, config).pixel_values, out["pixel_values"], atol=TOLERANCE)


def tiny_chameleon_config():
    from transformers import ChameleonConfig

    vq = dict(embed_dim=4, num_embeddings=16, latent_channels=4, resolution=32, base_channels=32,
              channel_multiplier=[1, 1, 1], num_res_blocks=1, attn_resolutions=[])
    return ChameleonConfig(vq_config=vq, vocabulary_map={"<image>": 5})


def test_vq_grid_matches_the_vq_encoder(processors):
    import torch
    from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAE

    model_config = tiny_chameleon_config()
    config = chameleon.processor_config(processors["padded"], model_config)  # 32x40 crop, two downsamples
    vqvae = ChameleonVQVAE(model_config.vq_config).eval()
    pixels = chameleon.preprocess(synthetic_image(30, 45, "RGB"), config).pixel_values
    with torch.no_grad():
        codes = vqvae.encode(torch.from_numpy(pixels)).image_tokens
    assert config["vq_grid"] == [8, 10]
    assert config["codebook_size"] == 16
    assert chameleon.image_token_count(config) == codes.numel() == 80


def test_vq_grid_must_agree_with_the_processor(processors):
    model_config = tiny_chameleon_config()
    ok = chameleon.processor_config(chameleon_processor(processors["small"], 64), model_config)
    assert ok["image_seq_length"] == 64 and ok["vq_grid"] == [8, 8]
    with pytest.raises(SteerguardError, match="VQ encoder makes 64"):
        chameleon.processor_config(chameleon_processor(processors["small"], 1024), model_config)


def image_token_name(index: int) -> str:
    """Chameleon's spelling: decimal digits written as the letters A..J, between IMGIMG and Z."""
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(index)) + "Z"


def fake_vocabulary(codebook: int = 16, seed: int = 0) -> dict[str, int]:
    specials = ["<s>", "</s>", "<pad>", "<image>", "<racm3:break>", "<eoss>", "hello", "IMG", "world"]
    names = specials + [image_token_name(i) for i in range(codebook)]
    ids = np.random.default_rng(seed).permutation(len(names) + 7)[:len(names)]  # shuffled, with holes
    return {name: int(i) for name, i in zip(names, ids)}


@pytest.mark.parametrize("codebook", [16, 123])
def test_bpe_token_map_matches_hf(codebook):
    from transformers.models.chameleon.modeling_chameleon import ChameleonImageVocabularyMapping

    vocabulary = fake_vocabulary(codebook)
    hf = ChameleonImageVocabularyMapping(vocabulary)
    ours = chameleon.bpe_token_map(vocabulary, codebook_size=codebook)
    assert ours.dtype == np.int64 and ours.shape == (codebook,)
    assert {i: int(t) for i, t in enumerate(ours)} == hf.img2bpe
    np.testing.assert_array_equal(ours, hf.img2bpe_mapping_tensor.numpy())
    assert ours[10] == vocabulary["IMGIMGBAZ"]


def test_bpe_token_map_refuses_broken_vocabularies():
    vocabulary = fake_vocabulary(16)
    with pytest.raises(SteerguardError, match="no IMGIMG"):
        chameleon.bpe_token_map({k: v for k, v in vocabulary.items() if not k.startswith("IMGIMG")})
    with pytest.raises(SteerguardError, match="index 3 has none"):
        chameleon.bpe_token_map({k: v for k, v in vocabulary.items() if k != image_token_name(3)})
    with pytest.raises(SteerguardError, match="two tokens"):
        chameleon.bpe_token_map({**vocabulary, "IMGIMGAADZ": 998})  # "AAD" is 003, index 3 again
    with pytest.raises(SteerguardError, match="codebook of 32"):
        chameleon.bpe_token_map(vocabulary, codebook_size=32)
