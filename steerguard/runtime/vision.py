"""Images into prompt embeddings: preprocess (runtime.images), run the bundle's `vision` engine, pack its
outputs the way the model does, and expand each image's placeholder token in the prompt to as many
positions as the image has embeddings. The packed rows replace the placeholder rows of the embedding
engine's output at prefill, so everything after it (the prober included) sees the image."""

from __future__ import annotations

import math
from importlib import import_module

import numpy as np

from ..engines import Engine
from ..errors import SteerguardError
from .images import Pixels, load_image


class VisionEncoder:
    def __init__(self, spec: dict, engine: Engine):
        self.kind, self.engine = spec["kind"], engine
        self.image_token_id = int(spec["image_token_id"])
        self.max_images = int(spec.get("max_images", 1))
        self.config = spec["preprocess"]
        self.images = import_module(f"{__package__}.images.{self.kind}")
        self.pack, self.feeds = PACKERS[self.kind], FEEDS[self.kind]
        self.spec = spec

    def prepare(self, image) -> Pixels:
        """Read (a path) and preprocess one image; nothing runs yet."""
        if not hasattr(image, "convert"):
            image = load_image(image)
        return self.images.preprocess(image, self.config)

    def embed(self, pixels: Pixels) -> np.ndarray:
        """Run the vision engine on one preprocessed image: what fills its placeholders in the prompt, rows
        (num_image_tokens, d) of embeddings, or (num_image_tokens,) token ids (Chameleon's VQ tokens)."""
        outputs = self.engine.run(self.feeds(pixels, self.spec))
        rows = self.pack(outputs, pixels, self.config)
        if len(rows) != pixels.num_image_tokens:
            raise SteerguardError(f"the vision engine gave {len(rows)} image embeddings where the preprocessing "
                                  f"expects {pixels.num_image_tokens}; the bundle is inconsistent, re-export it")
        return rows if rows.dtype == np.int64 else rows.astype(np.float32)

    def expand(self, ids: list[int], images: list[Pixels]) -> list[int]:
        """`ids` with each image placeholder repeated once per embedding row of its image."""
        slots = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if len(slots) != len(images):
            raise SteerguardError(f"the prompt has {len(slots)} image placeholder(s) for {len(images)} image(s); "
                                  "give one image per image part of the messages, and no placeholder in the text")
        opening = [self.spec["image_start_token_id"]] if "image_start_token_id" in self.spec else []
        closing = [self.spec["image_end_token_id"]] if "image_end_token_id" in self.spec else []
        out, start = [], 0
        for slot, image in zip(slots, images):
            out += ids[start:slot] + opening + [self.image_token_id] * image.num_image_tokens + closing
            start = slot + 1
        return out + ids[start:]


    def positions(self, ids: list[int], images: list[Pixels]) -> tuple[np.ndarray, int]:
        """(3, len(ids)) rotary positions of a prompt with these images and the offset of the tokens
        after it (Qwen2-VL's multimodal rotary)."""
        return self.images.mrope_position_ids(
            np.asarray(ids), [p.extra["image_grid_thw"] for p in images], self.image_token_id,
            self.spec["vision_start_token_id"], self.spec["spatial_merge_size"])


# ---- feeding the vision engine --------------------------------------------------------------------

def qwen2_vl_patch_positions(grid_thw, merge: int) -> np.ndarray:
    """(t*h*w, 2) (row, column) of every patch in the order the preprocessing flattened them: m x m
    merge blocks one after another, row-major inside and across blocks, repeated for each frame."""
    t, h, w = (int(v) for v in grid_thw)
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    blocks = (h // merge, merge, w // merge, merge)
    rows = rows.reshape(blocks).transpose(0, 2, 1, 3).reshape(-1)
    cols = cols.reshape(blocks).transpose(0, 2, 1, 3).reshape(-1)
    return np.tile(np.stack([rows, cols], -1), (t, 1)).astype(np.int64)


FEEDS = {
    "llava_onevision": lambda pixels, spec: {"pixel_values": pixels.pixel_values},
    "chameleon": lambda pixels, spec: {"pixel_values": pixels.pixel_values},
    "vit_patches": lambda pixels, spec: {"pixel_values": pixels.pixel_values},
    "qwen2_vl": lambda pixels, spec: {"pixel_values": pixels.pixel_values, "patch_positions": qwen2_vl_patch_positions(
        pixels.extra["image_grid_thw"], spec["spatial_merge_size"])},
}


# ---- packing: the tower's outputs -> the rows the language model reads ----------------------------

def pack_llava_onevision(outputs: dict, pixels: Pixels, config: dict) -> np.ndarray:
    """The base tile's features, then the tile grid's features laid out as one large feature map, cropped
    to the image's aspect ratio (the padding removed), shrunk when larger than `anyres_max_N` tiles
    allow, with a newline vector closing every row (LlavaOnevisionModel.pack_image_features)."""
    feats, newline = outputs["image_features"], outputs["image_newline"]
    side = int(math.isqrt(feats.shape[1]))
    d = feats.shape[-1]
    base, tiles = feats[0], feats[1:]
    if not len(tiles):
        return np.concatenate([base, newline[None]])
    height, width = (int(v) for v in pixels.extra["image_sizes"])
    rows, cols = grid_shape(height, width, config)
    grid = tiles.reshape(rows, cols, side, side, d).transpose(0, 2, 1, 3, 4).reshape(rows * side, cols * side, d)
    grid = unpad(grid, height, width)
    h, w = grid.shape[:2]
    max_tiles = int(str(config.get("vision_aspect_ratio", "anyres_max_9")).removeprefix("anyres_max_"))
    ratio = math.sqrt(h * w / (max_tiles * side * side))
    if ratio > 1.1:
        grid = resize_bilinear(grid, int(h // ratio), int(w // ratio))
    grid = np.concatenate([grid, np.broadcast_to(newline, (grid.shape[0], 1, d))], axis=1)
    return np.concatenate([base, grid.reshape(-1, d)])


def grid_shape(height: int, width: int, config: dict) -> tuple[int, int]:
    """(rows, cols) of tiles the preprocessing cut an image of this size into."""
    from .images.llava_onevision import select_best_resolution

    tile = config["tile_size"]
    best_h, best_w = select_best_resolution((height, width), config["image_grid_pinpoints"])
    return best_h // tile, best_w // tile


def unpad(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """Drop the rows or columns that only cover the letterbox padding of an (height, width) image."""
    cur_h, cur_w = grid.shape[:2]
    if width / height > cur_w / cur_h:
        new_h = int(round(height * (cur_w / width), 7))
        pad = (cur_h - new_h) // 2
        return grid[pad:cur_h - pad]
    new_w = int(round(width * (cur_h / height), 7))
    pad = (cur_w - new_w) // 2
    return grid[:, pad:cur_w - pad]


def resize_bilinear(grid: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear resize of an (H, W, C) map with half-pixel centres, no antialiasing (torch's
    interpolate(mode="bilinear", align_corners=False))."""
    def axis(n_in: int, n_out: int):
        x = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0)
        lo = np.minimum(np.floor(x).astype(int), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (x - lo)[:, None]

    y0, y1, fy = axis(grid.shape[0], out_h)
    x0, x1, fx = axis(grid.shape[1], out_w)
    rows = grid[y0] * (1 - fy[..., None]) + grid[y1] * fy[..., None]
    return rows[:, x0] * (1 - fx) + rows[:, x1] * fx


PACKERS = {"llava_onevision": pack_llava_onevision,
           "qwen2_vl": lambda outputs, pixels, config: outputs["image_features"],
           "chameleon": lambda outputs, pixels, config: outputs["image_token_ids"][0].astype(np.int64),
           "vit_patches": lambda outputs, pixels, config: outputs["image_features"][0]}
