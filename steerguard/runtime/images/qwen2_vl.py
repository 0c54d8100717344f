"""Qwen2-VL images in numpy and Pillow: the runtime twin of three pieces of transformers.

    preprocess            Qwen2VLImageProcessor for one image (smart resize to a multiple of
                          patch_size * merge_size inside [min_pixels, max_pixels], rescale, normalise,
                          repeat the frame temporal_patch_size times, flatten into patches in HF's order)
    image_token_count     Qwen2VLProcessor: one image becomes t*h*w / merge_size**2 `<|image_pad|>` tokens
    mrope_position_ids    Qwen2VLModel.get_rope_index for one unpadded sequence with images (3-D M-RoPE)

Resize backend. transformers 5 has two Qwen2-VL image processors. `Qwen2VLImageProcessorPil` resizes the
uint8 RGB image with Pillow (`Image.resize`, BICUBIC, no reducing_gap), then rescales in float64, casts to
float32 and normalises in float32; that is what this module does, step for step, so it matches it
bit for bit. `Qwen2VLImageProcessor` is the torchvision backend when torchvision is installed (without
it, transformers falls back to the Pillow one). That one resizes the uint8 tensor with torchvision's
BICUBIC + antialias, which on CPU runs torch's native uint8 antialias kernel: the same filter as Pillow's
(cubic a=-0.5, support widened when shrinking) but other fixed-point weights, so about 0.2-0.5% of the
pixels land one grey level apart (about 0.015 after normalisation; measured with torch 2.13 against
Pillow 13). It also folds the 1/255 rescale into mean and std (float32 rounding, ~1e-7). Matching it
exactly would mean porting torch's uint8 kernel; Pillow is the reference here instead: it is what the
original Qwen2-VL preprocessing used, and the runtime must not depend on torch.

Alpha is composited onto white before resizing, as HF's convert_to_rgb does; `load_image` has already
converted to plain RGB, so this only matters for images handed in directly.

M-RoPE. transformers 5 finds images through the processor's mm_token_type_ids (runs of image tokens); here
an image starts after a vision-start token followed by an image token (as transformers 4 did) and must span
exactly its grid's t*h*w / merge_size**2 image tokens. For prompts built the processor's way the two agree;
anything else is refused with one line instead of being positioned silently.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ...errors import SteerguardError
from . import Pixels

# Pillow filter codes by name, for processors that carry a torchvision InterpolationMode instead.
_PIL_FILTERS = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
_MAX_ASPECT_RATIO = 200


# ---------------------------------------------------------------------------------------- export

def processor_config(image_processor: Any, model_config: Any = None) -> dict:
    """Everything `preprocess` needs, read from a transformers Qwen2-VL image processor (and, if given,
    the model config, which must agree on the patch geometry and supplies the vision token ids)."""
    min_pixels, max_pixels = _pixel_bounds(image_processor)
    config = {
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "patch_size": int(image_processor.patch_size),
        "temporal_patch_size": int(image_processor.temporal_patch_size),
        "merge_size": int(image_processor.merge_size),
        "do_resize": bool(getattr(image_processor, "do_resize", True)),
        "resample": _pil_filter_code(getattr(image_processor, "resample", 3)),
        "do_rescale": bool(getattr(image_processor, "do_rescale", True)),
        "rescale_factor": float(getattr(image_processor, "rescale_factor", 1 / 255)),
        "do_normalize": bool(getattr(image_processor, "do_normalize", True)),
        "image_mean": [float(v) for v in image_processor.image_mean],
        "image_std": [float(v) for v in image_processor.image_std],
    }
    if model_config is not None:
        _check_vision_geometry(config, model_config.vision_config)
        for key in ("image_token_id", "vision_start_token_id", "vision_end_token_id"):
            value = getattr(model_config, key, None)
            if value is not None:
                config[key] = int(value)
    return config


def _field(container: Any, key: str) -> Any:
    if container is None:
        return None
    if isinstance(container, dict):
        return container.get(key)
    return getattr(container, key, None)


def _pixel_bounds(image_processor: Any) -> tuple[int, int]:
    """(min_pixels, max_pixels): transformers 5 keeps them in size.shortest_edge / size.longest_edge,
    older versions in size["min_pixels"] / size["max_pixels"] or plain attributes."""
    size = getattr(image_processor, "size", None)
    bounds = []
    for new_key, old_key in (("shortest_edge", "min_pixels"), ("longest_edge", "max_pixels")):
        value = _field(size, new_key) or _field(size, old_key) or getattr(image_processor, old_key, None)
        if not value:
            raise SteerguardError(f"the Qwen2-VL image processor has no {old_key} (size={size!r})")
        bounds.append(int(value))
    return bounds[0], bounds[1]


def _pil_filter_code(resample: Any) -> int:
    if isinstance(resample, int):          # PILImageResampling is an IntEnum
        return int(resample)
    name = str(getattr(resample, "value", resample)).lower()
    if name not in _PIL_FILTERS:
        raise SteerguardError(f"unknown resample filter {resample!r} in the Qwen2-VL image processor")
    return _PIL_FILTERS[name]


def _check_vision_geometry(config: dict, vision_config: Any) -> None:
    pairs = (("patch_size", "patch_size"), ("temporal_patch_size", "temporal_patch_size"),
             ("merge_size", "spatial_merge_size"))
    for ours, theirs in pairs:
        value = getattr(vision_config, theirs, None)
        if value is not None and int(value) != config[ours]:
            raise SteerguardError(f"the image processor's {ours} is {config[ours]} but the model's vision "
                                  f"{theirs} is {value}: they must agree")


# ---------------------------------------------------------------------------------------- runtime

def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) both multiples of `factor`, with about the same aspect ratio and an area inside
    [min_pixels, max_pixels] (as HF's smart_resize)."""
    if max(height, width) / min(height, width) > _MAX_ASPECT_RATIO:
        raise SteerguardError(f"image is {width}x{height}: Qwen2-VL needs an aspect ratio under "
                              f"{_MAX_ASPECT_RATIO}:1")
    new_h = round(height / factor) * factor
    new_w = round(width / factor) * factor
    if new_h * new_w > max_pixels:
        shrink = math.sqrt(height * width / max_pixels)
        new_h = max(factor, math.floor(height / shrink / factor) * factor)
        new_w = max(factor, math.floor(width / shrink / factor) * factor)
    elif new_h * new_w < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        new_h = math.ceil(height * grow / factor) * factor
        new_w = math.ceil(width * grow / factor) * factor
    return new_h, new_w


def preprocess(image, config: dict) -> Pixels:
    """One PIL image as Qwen2-VL vision input: pixel_values (grid_t*grid_h*grid_w,
    channels*temporal_patch_size*patch_size**2) float32 in HF's order, extra["image_grid_thw"] = [t, h, w]."""
    rgb = _to_rgb(image)
    rgb = _resize(rgb, config)
    chw = _rescale_and_normalize(np.asarray(rgb).transpose(2, 0, 1), config)
    patches, grid_thw = _patchify(chw, config)
    return Pixels(pixel_values=patches, num_image_tokens=image_token_count(grid_thw, config),
                  extra={"image_grid_thw": grid_thw})


def image_token_count(grid_thw, config: dict) -> int:
    """How many `<|image_pad|>` tokens Qwen2VLProcessor puts in the prompt for an image of this grid."""
    t, h, w = (int(v) for v in np.asarray(grid_thw).reshape(3))
    return t * h * w // config["merge_size"] ** 2


def _to_rgb(image):
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _resize(rgb, config: dict):
    from PIL import Image

    factor = config["patch_size"] * config["merge_size"]
    if not config["do_resize"]:
        if rgb.height % factor or rgb.width % factor:
            raise SteerguardError(f"image is {rgb.width}x{rgb.height}; without resizing both sides must be "
                                  f"multiples of {factor}")
        return rgb
    height, width = smart_resize(rgb.height, rgb.width, factor, config["min_pixels"], config["max_pixels"])
    if (height, width) == (rgb.height, rgb.width):
        return rgb                          # Pillow returns a plain copy for a same-size resize anyway
    return rgb.resize((width, height), resample=Image.Resampling(config["resample"]))


def _rescale_and_normalize(chw: np.ndarray, config: dict) -> np.ndarray:
    # Same precision steps as HF: rescale in float64, cast to float32, normalise in float32.
    pixels = chw.astype(np.float32)
    if config["do_rescale"]:
        pixels = (chw.astype(np.float64) * config["rescale_factor"]).astype(np.float32)
    if config["do_normalize"]:
        mean = np.asarray(config["image_mean"], dtype=np.float32)[:, None, None]
        std = np.asarray(config["image_std"], dtype=np.float32)[:, None, None]
        pixels = (pixels - mean) / std
    return pixels


def _patchify(chw: np.ndarray, config: dict) -> tuple[np.ndarray, np.ndarray]:
    """Cut (C, H, W) into patch_size squares, ordered merge_size x merge_size block by block (row-major
    blocks, row-major inside a block), each patch flattened as (C, temporal, patch_row, patch_col) with the
    single frame repeated over the temporal axis."""
    patch, merge, temporal = config["patch_size"], config["merge_size"], config["temporal_patch_size"]
    channels, height, width = chw.shape
    grid_h, grid_w = height // patch, width // patch
    blocks = chw.reshape(channels, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
    # -> (block_row, block_col, row_in_block, col_in_block, channel, patch_row, patch_col)
    blocks = blocks.transpose(1, 4, 2, 5, 0, 3, 6)
    framed = np.broadcast_to(blocks[:, :, :, :, :, None], blocks.shape[:5] + (temporal,) + blocks.shape[5:])
    patches = np.ascontiguousarray(framed, dtype=np.float32).reshape(
        grid_h * grid_w, channels * temporal * patch * patch)
    return patches, np.array([1, grid_h, grid_w], dtype=np.int64)


# ---------------------------------------------------------------------------------------- M-RoPE

def mrope_position_ids(input_ids: np.ndarray, image_grid_thw: list, image_token_id: int,
                       vision_start_token_id: int, spatial_merge_size: int) -> tuple[np.ndarray, int]:
    """3-D rotary positions for one sequence (no padding, images only), as Qwen2VLModel.get_rope_index.

    Text tokens count up by one on all three rows. An image's tokens get (t, row, col) positions offset by
    the position where the image starts, and the text after it resumes at that start + max(rows, cols).
    Returns positions (3, seq_len) int64 and the delta (max position + 1 - seq_len) that decode steps add
    to their plain position."""
    ids = np.asarray(input_ids).reshape(-1)
    spans = _image_spans(ids, image_grid_thw, image_token_id, vision_start_token_id, spatial_merge_size)
    pieces, position, cursor = [], 0, 0
    for start, (t, rows, cols) in spans:
        pieces.append(_text_positions(start - cursor, position))
        position += start - cursor
        pieces.append(_image_positions(t, rows, cols, position))
        position += max(rows, cols)
        cursor = start + t * rows * cols
    pieces.append(_text_positions(len(ids) - cursor, position))
    positions = np.concatenate(pieces, axis=1)
    delta = int(positions.max()) + 1 - len(ids) if len(ids) else 0
    return positions, delta


def _image_spans(ids: np.ndarray, image_grid_thw: list, image_token_id: int, vision_start_token_id: int,
                 spatial_merge_size: int) -> list[tuple[int, tuple[int, int, int]]]:
    """(first token index, (t, rows, cols) in merged tokens) per image: an image starts right after a
    vision-start token that is followed by an image token, and the grids are taken in order."""
    after_start = np.flatnonzero((ids[:-1] == vision_start_token_id) & (ids[1:] == image_token_id)) + 1
    grids = [tuple(int(v) for v in np.asarray(g).reshape(3)) for g in image_grid_thw]
    if len(after_start) != len(grids):
        raise SteerguardError(f"the prompt has {len(after_start)} images but {len(grids)} image grids were given")
    spans = []
    for start, (t, h, w) in zip(after_start.tolist(), grids):
        merged = (t, h // spatial_merge_size, w // spatial_merge_size)
        length = merged[0] * merged[1] * merged[2]
        if start + length > len(ids) or not np.all(ids[start:start + length] == image_token_id):
            raise SteerguardError(f"the image at token {start} needs {length} image tokens for grid {[t, h, w]}")
        spans.append((start, merged))
    if sum(t * r * c for _, (t, r, c) in spans) != int(np.count_nonzero(ids == image_token_id)):
        raise SteerguardError("the prompt has image tokens outside the images' placeholder runs")
    return spans


def _text_positions(length: int, start: int) -> np.ndarray:
    return np.broadcast_to(np.arange(start, start + length, dtype=np.int64), (3, length))


def _image_positions(t: int, rows: int, cols: int, start: int) -> np.ndarray:
    frame, row, col = np.meshgrid(np.arange(t), np.arange(rows), np.arange(cols), indexing="ij")
    return np.stack([frame, row, col]).reshape(3, -1).astype(np.int64) + start
