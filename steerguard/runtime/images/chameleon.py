"""Chameleon images: the VQ tokenizer's pixel input, the `<image>` prompt expansion, and the codebook-to-token map.

Mirrors, for one image, the Hugging Face transformers 5.x Chameleon pipeline:

* `ChameleonImageProcessor` (PIL backend, `image_processing_pil_chameleon.py`, built on the shared
  `PilBackend` + `image_transforms` helpers), in this order:
    1. convert to RGB: an image with an alpha band, or with a `transparency` entry in its info (palette
       or grayscale PNGs with tRNS), is first converted to RGBA and alpha-composited onto opaque white;
       any other mode is plainly converted to RGB;
    2. resize so the shortest edge is `size["shortest_edge"]` (the long edge is truncated, not rounded),
       with Pillow's LANCZOS filter on the uint8 RGB image (`longest_edge` caps and fixed height + width
       sizes follow HF's rules too);
    3. centre crop to `crop_size` (a side that is too small is zero-padded first, the extra pixel of an
       odd padding going before the image);
    4. rescale: float64 multiply by `rescale_factor` (0.0078, not 1/255), then cast to float32;
    5. normalise: (x - mean) / std in float32 (Chameleon's mean = std = 1, so pixels land in [-1, 0.99]).
  The output is `pixel_values` of shape (1, 3, H, W), float32, as the processor returns for one image.
* `ChameleonProcessor.replace_image_token`: each `<image>` in the prompt becomes
  `<racm3:break>` + `<image>` * image_seq_length + `<eoss>` (see `image_prompt_tokens`).
* `ChameleonImageVocabularyMapping.img2bpe` (`modeling_chameleon.py`): VQ codebook index -> LM token id
  (see `bpe_token_map`).

Differences from Hugging Face:

* When torchvision is installed, `ChameleonImageProcessor` is the torchvision backend instead. It resizes
  with torchvision's own antialiased LANCZOS (or falls back to BICUBIC before torchvision 0.27), pads an odd
  crop with the extra pixel after the image, and fuses rescale + normalise. This module reproduces the PIL
  backend exactly (Pillow does the resize in both), not the torchvision one: against that backend the
  resized pixels may differ by a few uint8 levels (not measured here: torchvision is not installed).
  `processor_config` records the exporter's backend as `hf_backend`.
* If `do_rescale` and `do_normalize` are both off, HF returns uint8 pixels; here they are always float32.
* `bpe_token_map` refuses a vocabulary whose image tokens leave gaps or repeat codebook indices. HF fills gaps
  with token id 0 and lets the highest token id win on a repeat; neither happens with real Chameleon vocabularies.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import SteerguardError
from . import Pixels

if TYPE_CHECKING:
    from PIL import Image

# Pillow is imported where it is used (as in `load_image`), so importing this module never needs it.

# HF defaults, used when the exporter is given an image processor with no ChameleonProcessor around it.
DEFAULT_IMAGE_SEQ_LENGTH = 1024
DEFAULT_IMAGE_TOKEN = "<image>"
DEFAULT_IMAGE_START_TOKEN = "<racm3:break>"
DEFAULT_IMAGE_END_TOKEN = "<eoss>"

IMAGE_TOKEN_PREFIX = "IMGIMG"

# Pillow's integer filter codes, which is what HF's PILImageResampling holds.
_PIL_FILTER_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_SIZE_KEYS = ("height", "width", "shortest_edge", "longest_edge", "max_height", "max_width")


# ---------------------------------------------------------------------------------------------- export


def processor_config(image_processor: Any, model_config: Any = None) -> dict:
    """Everything `preprocess` and the prompt builder need, as a JSON-serialisable dict.

    `image_processor` is a transformers `ChameleonImageProcessor`, or a `ChameleonProcessor` (then its
    `image_processor`, `image_seq_length` and image/start/end tokens are used). `model_config` is an optional
    `ChameleonConfig`: from its `vq_config` the VQ latent grid and codebook size are recorded and checked
    against the crop size and `image_seq_length`. Only attributes are read; nothing is imported.
    """
    processor = image_processor if hasattr(image_processor, "image_processor") else None
    ip = processor.image_processor if processor is not None else image_processor

    crop_size = _size_dict(getattr(ip, "crop_size", None))
    config: dict[str, Any] = {
        "family": "chameleon",
        "hf_backend": str(getattr(ip, "backend", "pil")),
        "do_convert_rgb": bool(_attr(ip, "do_convert_rgb", True)),
        "do_resize": bool(_attr(ip, "do_resize", True)),
        "size": _size_dict(getattr(ip, "size", None)),
        "resample": _filter_name(getattr(ip, "resample", None)),
        "do_center_crop": bool(_attr(ip, "do_center_crop", True)),
        "crop_size": crop_size,
        "do_rescale": bool(_attr(ip, "do_rescale", True)),
        "rescale_factor": float(_attr(ip, "rescale_factor", 1 / 255)),
        "do_normalize": bool(_attr(ip, "do_normalize", True)),
        "image_mean": _per_channel(getattr(ip, "image_mean", None), 0.0),
        "image_std": _per_channel(getattr(ip, "image_std", None), 1.0),
        "image_seq_length": int(_attr(processor, "image_seq_length", DEFAULT_IMAGE_SEQ_LENGTH)),
        "image_token": str(_attr(processor, "image_token", DEFAULT_IMAGE_TOKEN)),
        "image_start_token": str(_attr(processor, "image_start_token", DEFAULT_IMAGE_START_TOKEN)),
        "image_end_token": str(_attr(processor, "image_end_token", DEFAULT_IMAGE_END_TOKEN)),
    }
    _check_size(config)

    vq_config = getattr(model_config, "vq_config", None) if model_config is not None else None
    if vq_config is not None:
        config.update(_vq_facts(vq_config, crop_size, config, from_processor=processor is not None))
    return config


def _attr(obj: Any, name: str, default: Any) -> Any:
    value = getattr(obj, name, None) if obj is not None else None
    return default if value is None else value


def _size_dict(size: Any) -> dict[str, int]:
    """A transformers SizeDict, plain dict or int as {key: int} with only the keys that are set."""
    if size is None:
        return {}
    if isinstance(size, int):
        return {"shortest_edge": size}
    get = size.get if isinstance(size, Mapping) else (lambda k: getattr(size, k, None))
    return {k: int(get(k)) for k in _SIZE_KEYS if get(k) is not None}


def _filter_name(resample: Any) -> str:
    if resample is None:
        return "bilinear"  # what HF's resize uses when no filter is set
    value = getattr(resample, "value", resample)
    if isinstance(value, str):  # a torchvision InterpolationMode
        return value.lower()
    try:
        return _PIL_FILTER_NAMES[int(value)]
    except (KeyError, TypeError, ValueError):
        raise SteerguardError(f"chameleon image processor: unknown resample filter {resample!r}") from None


def _per_channel(values: Any, default: float) -> list[float]:
    if values is None:
        return [default] * 3
    if isinstance(values, (int, float)):
        return [float(values)] * 3
    return [float(v) for v in values]


def _check_size(config: dict) -> None:
    size, crop = config["size"], config["crop_size"]
    resizable = "shortest_edge" in size or ("height" in size and "width" in size)
    if config["do_resize"] and not resizable:
        raise SteerguardError(f"chameleon image processor: size {size} is not supported "
                              "(need shortest_edge, optionally with longest_edge, or height and width)")
    if config["do_center_crop"] and not ("height" in crop and "width" in crop):
        raise SteerguardError(f"chameleon image processor: crop_size {crop} needs height and width")


def _vq_facts(vq_config: Any, crop_size: dict, config: dict, from_processor: bool) -> dict:
    """The VQ encoder's latent grid for the crop, and its codebook size.

    The encoder has len(channel_multiplier) levels with a stride-2 downsample between consecutive ones; each
    pads one pixel right/bottom and uses a 3x3 kernel, so a side n becomes n // 2.
    """
    levels = len(_attr(vq_config, "channel_multiplier", (1, 1, 2, 2, 4)))
    height = crop_size.get("height", int(_attr(vq_config, "resolution", 512)))
    width = crop_size.get("width", int(_attr(vq_config, "resolution", 512)))
    for _ in range(levels - 1):
        height, width = height // 2, width // 2
    tokens = height * width
    if from_processor and tokens != config["image_seq_length"]:
        raise SteerguardError(f"chameleon: the processor expands <image> to {config['image_seq_length']} tokens "
                              f"but the VQ encoder makes {tokens} ({height}x{width}) from a "
                              f"{crop_size} crop; the model could not fill the prompt")
    facts: dict[str, Any] = {"vq_grid": [height, width],
                             "codebook_size": int(_attr(vq_config, "num_embeddings", 8192))}
    if not from_processor:
        facts["image_seq_length"] = tokens
    return facts


# ---------------------------------------------------------------------------------------------- prompt


def image_token_count(config: dict) -> int:
    """Placeholder tokens one image fills: `image_seq_length` copies of the image token (1024 for Chameleon 7B/30B).

    The model replaces exactly these with the image's VQ tokens mapped through `bpe_token_map`. The processor
    also wraps them in one start and one end sentinel (`image_prompt_tokens`), so the image's whole span in
    the prompt is `image_token_count(config) + 2` tokens.
    """
    return int(config["image_seq_length"])


def image_prompt_tokens(config: dict) -> tuple[str, str, str]:
    """(start, placeholder, end) tokens of the `<image>` expansion: by default
    ("<racm3:break>", "<image>", "<eoss>"), from the tokenizer's boi/image/eoi tokens when it defines them.

    `ChameleonProcessor` rewrites each `<image>` in the text as
    start + placeholder * image_token_count(config) + end; it also appends the tokenizer's sep token to each
    prompt unless `return_for_text_completion=True`.
    """
    return config["image_start_token"], config["image_token"], config["image_end_token"]


def expand_image_placeholder(config: dict) -> str:
    """The text that replaces one `<image>` in a prompt, as `ChameleonProcessor` builds it."""
    start, placeholder, end = image_prompt_tokens(config)
    return start + placeholder * image_token_count(config) + end


# ---------------------------------------------------------------------------------------------- pixels


def preprocess(image: Image.Image, config: dict) -> Pixels:
    """One PIL image as the VQ tokenizer's input: pixel_values (1, 3, H, W) float32, like HF for one image.

    Give the image as read (not already converted to RGB): transparent pixels become white only here.
    """
    rgb = _to_rgb(image) if config.get("do_convert_rgb", True) else _require_rgb(image)
    if config.get("do_resize", True):
        height, width = resize_output_size(rgb.height, rgb.width, config["size"])
        rgb = rgb.resize((width, height), resample=_pil_filter(config.get("resample", "bilinear")))
    pixels = np.asarray(rgb, dtype=np.uint8)  # (H, W, 3)
    if config.get("do_center_crop", True):
        pixels = center_crop(pixels, config["crop_size"]["height"], config["crop_size"]["width"])
    values = _rescale_and_normalize(pixels, config)
    pixel_values = np.ascontiguousarray(values.transpose(2, 0, 1)[None])
    return Pixels(pixel_values=pixel_values, num_image_tokens=image_token_count(config))


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparency composited onto white (a plain RGBA -> RGB convert would keep hidden colours)."""
    from PIL import Image

    transparent = "A" in image.getbands() or image.info.get("transparency") is not None
    if not transparent:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _require_rgb(image: Image.Image) -> Image.Image:
    if image.mode != "RGB":
        raise SteerguardError(f"chameleon: do_convert_rgb is off but the image is {image.mode}, not RGB")
    return image


def _pil_filter(name: str) -> Image.Resampling:
    from PIL import Image

    try:
        return Image.Resampling[name.upper()]
    except KeyError:
        raise SteerguardError(f"chameleon: resample filter {name!r} is not one Pillow has") from None


def resize_output_size(height: int, width: int, size: dict) -> tuple[int, int]:
    """(height, width) after HF's resize for a `size` dict (shortest_edge[, longest_edge] or height + width)."""
    if "shortest_edge" in size and "longest_edge" in size:
        return _shortest_edge_capped(height, width, size["shortest_edge"], size["longest_edge"])
    if "shortest_edge" in size:
        return _shortest_edge(height, width, size["shortest_edge"])
    if "height" in size and "width" in size:
        return size["height"], size["width"]
    raise SteerguardError(f"chameleon: cannot resize to {size}")


def _shortest_edge(height: int, width: int, target: int) -> tuple[int, int]:
    """Short side -> target, long side scaled and truncated (torchvision's rule, which HF follows)."""
    if width <= height:
        return int(target * height / width), target
    return target, int(target * width / height)


def _shortest_edge_capped(height: int, width: int, shortest: int, longest: int) -> tuple[int, int]:
    """HF's `get_size_with_aspect_ratio`: shortest edge, lowered when the long edge would pass `longest`."""
    short, long = min(height, width), max(height, width)
    raw_short = None
    if long / short * shortest > longest:
        raw_short = longest * short / long
        shortest = int(round(raw_short))
    if short == shortest:
        return height, width
    scale_from = raw_short if raw_short is not None else shortest
    if width < height:
        return int(scale_from * height / width), shortest
    return shortest, int(scale_from * width / height)


def center_crop(pixels: np.ndarray, crop_height: int, crop_width: int) -> np.ndarray:
    """Centre crop of an (H, W, C) array; a side shorter than the crop is zero-padded, odd extra before."""
    (src_top, dst_top, rows), (src_left, dst_left, cols) = (
        _crop_axis(pixels.shape[0], crop_height), _crop_axis(pixels.shape[1], crop_width))
    out = np.zeros((crop_height, crop_width) + pixels.shape[2:], dtype=pixels.dtype)
    out[dst_top:dst_top + rows, dst_left:dst_left + cols] = pixels[src_top:src_top + rows, src_left:src_left + cols]
    return out


def _crop_axis(length: int, crop: int) -> tuple[int, int, int]:
    """(source start, destination start, count) along one axis."""
    if length >= crop:
        return (length - crop) // 2, 0, crop
    return 0, math.ceil((crop - length) / 2), length


def _rescale_and_normalize(pixels: np.ndarray, config: dict) -> np.ndarray:
    """HF's order and precision: rescale in float64 then cast to float32; normalise in float32."""
    values = pixels
    if config.get("do_rescale", True):
        values = (values.astype(np.float64) * config["rescale_factor"]).astype(np.float32)
    values = values.astype(np.float32)
    if config.get("do_normalize", True):
        mean = np.asarray(config["image_mean"], dtype=np.float32)
        std = np.asarray(config["image_std"], dtype=np.float32)
        values = (values - mean) / std
    return values


# ---------------------------------------------------------------------------------------------- tokens


def bpe_token_map(vocabulary_map: Mapping[str, int], codebook_size: int | None = None) -> np.ndarray:
    """VQ codebook index -> LM token id, as an int64 array indexed by codebook index (HF's `img2bpe`).

    `vocabulary_map` is the tokenizer vocabulary (token -> id; `ChameleonConfig.vocabulary_map`). Every token
    whose name starts with "IMGIMG" stands for one codebook entry: the characters between that prefix and the
    final character (a "Z" terminator) spell the index in decimal, with the letters A..J as the digits 0..9
    ("IMGIMGBAZ" -> 10, "IMGIMGAZ" -> 0); any other character is taken as it is. The indices must cover
    0..N-1 exactly once (and N must equal `codebook_size` when given).
    """
    token_ids = np.full(len(vocabulary_map), -1, dtype=np.int64)
    found = 0
    for name, token_id in vocabulary_map.items():
        if not name.startswith(IMAGE_TOKEN_PREFIX):
            continue
        index = _codebook_index(name)
        if not 0 <= index < len(token_ids):
            raise SteerguardError(f"chameleon vocabulary: {name} names codebook index {index}, outside the vocabulary")
        if token_ids[index] != -1:
            raise SteerguardError(f"chameleon vocabulary: codebook index {index} has two tokens "
                                  f"(ids {token_ids[index]} and {token_id})")
        token_ids[index] = int(token_id)
        found += 1
    if found == 0:
        raise SteerguardError(f"chameleon vocabulary: no {IMAGE_TOKEN_PREFIX}...Z image tokens; "
                              "is this a Chameleon tokenizer?")
    token_ids = token_ids[:found]
    if (token_ids == -1).any():
        missing = int(np.flatnonzero(token_ids == -1)[0])
        raise SteerguardError(f"chameleon vocabulary: {found} image tokens but codebook index {missing} has none")
    if codebook_size is not None and found != codebook_size:
        raise SteerguardError(f"chameleon vocabulary: {found} image tokens for a codebook of {codebook_size}")
    return token_ids


def _codebook_index(name: str) -> int:
    digits = "".join(_letter_digit(c) for c in name[len(IMAGE_TOKEN_PREFIX):-1])
    try:
        return int(digits)
    except ValueError:
        raise SteerguardError(f"chameleon vocabulary: cannot read a codebook index from {name!r}") from None


def _letter_digit(char: str) -> str:
    return str(ord(char) - ord("A")) if "A" <= char <= "J" else char
