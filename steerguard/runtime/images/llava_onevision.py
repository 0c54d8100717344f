"""LLaVA-OneVision image preprocessing in numpy and Pillow, and the number of `<image>` tokens per image.

Mirrors, for ONE image (the single-image "anyres" path), transformers 5.x:
  - `LlavaOnevisionImageProcessorPil` (image_processing_pil_llava_onevision.py): pick the best grid
    pinpoint, resize into it keeping the aspect ratio, zero-pad it centred, cut it into square tiles, put
    the whole image resized to `size` first, resize every tile to `size`, rescale, normalise, channel-first;
  - `LlavaOnevisionProcessor._get_number_of_features` (processing_llava_onevision.py): base-tile features,
    plus the unpadded grid of tile features with one newline per row, shrunk when it exceeds
    `anyres_max_N` tiles, minus one when the vision features drop a CLS token ("default" strategy).
    It equals what `LlavaOnevisionModel.pack_image_features` packs when `size` is the vision tower's
    image size (checked in the tests against a tiny model).

Against the PIL backend (what `LlavaOnevisionImageProcessor` gives when torchvision is not installed)
the pixels are identical: same Pillow resize of the same uint8 image, zero padding, float64 rescale then
float32 normalise, transparency laid on white. The torchvision backend (the default when torchvision is
installed) resizes the uint8 tensor with torch's antialiased bicubic instead, whose fixed-point rounding
differs from Pillow's: measured with torchvision 0.28 / torch 2.13 CPU, up to 2 grey levels on about
0.1-0.25% of values, i.e. a max normalised difference of 0.028 with the CLIP std, 0.016 with SigLIP's
0.5. Matching it would mean reimplementing torch's integer kernel in numpy; Pillow is the reference
here, as it was for the original LLaVA-OneVision preprocessing.

Not mirrored (refused at export instead): `do_center_crop` (no LLaVA-OneVision checkpoint sets it), and
`do_resize=False` with tiles not already of `size` (HF cannot stack those either). Multi-image prompts
(HF's pad-to-square path, `num_image_tokens + 1` tokens each) are not covered: one image per prompt."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from ...errors import SteerguardError
from . import Pixels

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

# What LlavaOnevisionConfig and LlavaOnevisionProcessor default to (SigLIP so400m at 384 px, patch 14).
DEFAULT_VISION_IMAGE_SIZE = 384
DEFAULT_VISION_PATCH_SIZE = 14
DEFAULT_SELECT_STRATEGY = "full"
DEFAULT_ASPECT_RATIO = "anyres_max_9"
ASPECT_RATIO_PREFIX = "anyres_max_"


# ---------------------------------------------------------------- export time: read the HF objects

def processor_config(image_processor, model_config=None) -> dict:
    """Everything `preprocess` and `image_token_count` need, as plain JSON values.

    `image_processor` is a transformers LlavaOnevisionImageProcessor (either backend), or the whole
    LlavaOnevisionProcessor, whose own `num_image_tokens`, `vision_feature_select_strategy` and
    `vision_aspect_ratio` then take precedence over `model_config`'s. Without either, the
    LlavaOnevisionConfig defaults apply. Only attributes are read: transformers is not imported."""
    processor = image_processor if hasattr(image_processor, "image_processor") else None
    image_processor = processor.image_processor if processor is not None else image_processor

    size = _height_width(image_processor.size)
    tile_size = _tile_size(image_processor, size)
    _refuse_unmirrored_settings(image_processor, size, tile_size)
    pinpoints = [[int(h), int(w)] for h, w in image_processor.image_grid_pinpoints]
    vision = _vision_settings(processor, model_config, pinpoints)

    do_rescale = bool(getattr(image_processor, "do_rescale", True))
    do_normalize = bool(getattr(image_processor, "do_normalize", True))
    return {
        "family": "llava_onevision",
        "size": list(size),
        "tile_size": tile_size,
        "resample": _resample_name(image_processor.resample),
        # A switched-off step is folded into neutral values, so the runtime always does the same arithmetic.
        "rescale_factor": float(image_processor.rescale_factor) if do_rescale else 1.0,
        "image_mean": _per_channel(image_processor.image_mean) if do_normalize else [0.0, 0.0, 0.0],
        "image_std": _per_channel(image_processor.image_std) if do_normalize else [1.0, 1.0, 1.0],
        "image_grid_pinpoints": pinpoints,
        "do_pad": bool(getattr(image_processor, "do_pad", True)),  # pads num_patches across a batch only
        **vision,
        "reference_backend": str(getattr(image_processor, "backend", "pil")),
    }


def _field(obj, name: str):
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def _height_width(size) -> tuple[int, int]:
    height, width = _field(size, "height"), _field(size, "width")
    if height and width:
        return int(height), int(width)
    shortest_edge = _field(size, "shortest_edge")
    if shortest_edge:
        return int(shortest_edge), int(shortest_edge)
    raise SteerguardError(f"LLaVA-OneVision image processor: cannot read a size from {size!r}")


def _tile_size(image_processor, size: tuple[int, int]) -> int:
    crop_size = getattr(image_processor, "crop_size", None)
    crop_height = _field(crop_size, "height") if crop_size else None
    return int(crop_height) if crop_height else size[0]


def _refuse_unmirrored_settings(image_processor, size: tuple[int, int], tile_size: int) -> None:
    if getattr(image_processor, "do_center_crop", None):
        raise SteerguardError("LLaVA-OneVision image processor: do_center_crop=True is not supported")
    if getattr(image_processor, "do_resize", True) is False and size != (tile_size, tile_size):
        raise SteerguardError(f"LLaVA-OneVision image processor: do_resize=False needs tiles of size {size}, "
                              f"not {tile_size}")


def _resample_name(resample) -> str:
    from PIL import Image

    if resample is None:
        return "bilinear"  # what the HF backends use when none is set
    value = getattr(resample, "value", resample)
    if isinstance(value, str):  # a torchvision InterpolationMode
        return value.lower()
    return Image.Resampling(int(value)).name.lower()


def _per_channel(values) -> list[float]:
    if isinstance(values, (int, float)):
        return [float(values)] * 3
    return [float(v) for v in values]


def _vision_settings(processor, model_config, pinpoints: list[list[int]]) -> dict:
    vision_config = getattr(model_config, "vision_config", None)
    image_size = int(getattr(vision_config, "image_size", DEFAULT_VISION_IMAGE_SIZE))
    patch_size = int(getattr(vision_config, "patch_size", DEFAULT_VISION_PATCH_SIZE))
    model_pinpoints = getattr(model_config, "image_grid_pinpoints", None)
    if model_pinpoints is not None and [[int(h), int(w)] for h, w in model_pinpoints] != pinpoints:
        raise SteerguardError("LLaVA-OneVision: the image processor's image_grid_pinpoints differ from the model "
                              "config's; the prompt's image tokens would not match the image features")

    def setting(name: str, default):
        for source in (processor, model_config):
            value = getattr(source, name, None)
            if value is not None:
                return value
        return default

    features_per_tile = setting("num_image_tokens", (image_size // patch_size) ** 2)
    vision_aspect_ratio = str(setting("vision_aspect_ratio", DEFAULT_ASPECT_RATIO))
    _max_tiles(vision_aspect_ratio)  # fail at export, not at run time
    return {
        "vision_image_size": image_size,
        "vision_patch_size": patch_size,
        "features_per_tile": int(features_per_tile),
        "vision_feature_select_strategy": str(setting("vision_feature_select_strategy", DEFAULT_SELECT_STRATEGY)),
        "vision_aspect_ratio": vision_aspect_ratio,
    }


# ---------------------------------------------------------------- run time: pixels

def preprocess(image: PILImage, config: dict) -> Pixels:
    """`image` (PIL) as HF's `pixel_values[0]`: (1 + tiles, 3, H, W) float32, the whole image first.

    `extra["image_sizes"]` is HF's `image_sizes[0]`: the original (height, width), int64."""
    rgb = _to_rgb(image)
    width, height = rgb.size
    tiles = [_resize(rgb, config["size"], config)] + _grid_tiles(rgb, config)
    pixel_values = np.stack([_normalise(tile, config) for tile in tiles])
    return Pixels(pixel_values=pixel_values,
                  num_image_tokens=image_token_count(height, width, config),
                  extra={"image_sizes": np.array([height, width], dtype=np.int64)})


def _to_rgb(image: PILImage) -> PILImage:
    """RGB as HF's do_convert_rgb makes it: anything transparent is laid on white first."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def _grid_tiles(rgb: PILImage, config: dict) -> list[np.ndarray]:
    """The image fitted into its best pinpoint, zero-padded to it, cut into tiles, row by row."""
    target = select_best_resolution((rgb.height, rgb.width), config["image_grid_pinpoints"])
    fitted = _resize(rgb, _fit_inside((rgb.height, rgb.width), target), config)
    canvas = _pad_centred(fitted, target)
    side = config["tile_size"]
    tiles = [canvas[top:top + side, left:left + side]
             for top in range(0, target[0], side) for left in range(0, target[1], side)]
    return [_resize(tile, config["size"], config) for tile in tiles]


def select_best_resolution(original_size: tuple[int, int], pinpoints) -> tuple[int, int]:
    """The (height, width) pinpoint that keeps the most of the image's pixels, then wastes the fewest."""
    original_height, original_width = original_size
    best, best_kept, best_wasted = None, 0, math.inf
    for height, width in pinpoints:
        scale = min(width / original_width, height / original_height)
        kept = min(int(original_width * scale) * int(original_height * scale), original_width * original_height)
        wasted = width * height - kept
        if kept > best_kept or (kept == best_kept and wasted < best_wasted):
            best, best_kept, best_wasted = (height, width), kept, wasted
    return best


def _fit_inside(original_size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the image scaled to touch `target` on one side, rounded up, never past it."""
    original_height, original_width = original_size
    target_height, target_width = target
    scale_width, scale_height = target_width / original_width, target_height / original_height
    if scale_width < scale_height:
        return min(math.ceil(original_height * scale_width), target_height), target_width
    return target_height, min(math.ceil(original_width * scale_height), target_width)


def _pad_centred(image: np.ndarray, target: tuple[int, int]) -> np.ndarray:
    """Zero (black) borders around `image` (H, W, 3), the odd pixel going to the bottom/right."""
    top, left = (target[0] - image.shape[0]) // 2, (target[1] - image.shape[1]) // 2
    canvas = np.zeros((target[0], target[1], image.shape[2]), dtype=image.dtype)
    canvas[top:top + image.shape[0], left:left + image.shape[1]] = image
    return canvas


def _resize(image: PILImage | np.ndarray, size, config: dict) -> np.ndarray:
    """`image` (PIL or uint8 HWC array) resized by Pillow to (height, width) `size`, as uint8 HWC."""
    from PIL import Image

    height, width = size
    if isinstance(image, np.ndarray):
        if image.shape[:2] == (height, width):
            return image
        image = Image.fromarray(np.ascontiguousarray(image))
    resample = Image.Resampling[config["resample"].upper()]
    return np.asarray(image.resize((width, height), resample=resample))


def _normalise(tile: np.ndarray, config: dict) -> np.ndarray:
    """uint8 HWC -> float32 CHW, rescaled in float64 then normalised in float32 as HF does."""
    rescaled = (tile.astype(np.float64) * config["rescale_factor"]).astype(np.float32)
    mean = np.asarray(config["image_mean"], dtype=np.float32)
    std = np.asarray(config["image_std"], dtype=np.float32)
    return np.ascontiguousarray(((rescaled - mean) / std).transpose(2, 0, 1))


# ---------------------------------------------------------------- run time: token count

def image_token_count(orig_height: int, orig_width: int, config: dict) -> int:
    """How many `<image>` tokens HF's LlavaOnevisionProcessor expands one image of this size into."""
    features_per_tile = config["features_per_tile"]
    tile_side = int(math.sqrt(features_per_tile))  # vision features per tile side
    best_height, best_width = select_best_resolution((orig_height, orig_width), config["image_grid_pinpoints"])
    tile_height, tile_width = config["size"]
    grid_height = tile_side * (best_height // tile_height)
    grid_width = tile_side * (best_width // tile_width)
    rows, columns = _unpadded_grid(orig_height, orig_width, grid_height, grid_width)

    max_tiles = _max_tiles(config["vision_aspect_ratio"])
    shrink = math.sqrt(rows * columns / (max_tiles * tile_side ** 2))
    if shrink > 1.1:  # the model interpolates the feature grid down to about max_tiles tiles
        rows, columns = int(rows // shrink), int(columns // shrink)

    count = features_per_tile + rows * columns + rows  # base tile, grid, one newline per row
    if config["vision_feature_select_strategy"] == "default":
        count -= 1
    return count


def _unpadded_grid(orig_height: int, orig_width: int, grid_height: int, grid_width: int) -> tuple[int, int]:
    """The feature grid less the rows or columns that only saw the zero padding."""
    if orig_width / orig_height > grid_width / grid_height:
        content_height = int(round(orig_height * (grid_width / orig_width), 7))
        return grid_height - 2 * ((grid_height - content_height) // 2), grid_width
    content_width = int(round(orig_width * (grid_height / orig_height), 7))
    return grid_height, grid_width - 2 * ((grid_width - content_width) // 2)


def _max_tiles(vision_aspect_ratio: str) -> int:
    count = vision_aspect_ratio.removeprefix(ASPECT_RATIO_PREFIX)
    if not vision_aspect_ratio.startswith(ASPECT_RATIO_PREFIX) or not count.isdigit():
        raise SteerguardError(f"LLaVA-OneVision: vision_aspect_ratio {vision_aspect_ratio!r} is not "
                              f"'{ASPECT_RATIO_PREFIX}N'")
    return int(count)
