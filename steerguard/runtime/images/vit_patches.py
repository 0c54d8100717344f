"""A plain ViT's input: the image letterboxed into a square (aspect kept, centred on black), resized with
Pillow, rescaled and normalised. Used by bundles whose vision engine is a stand-alone ONNX image encoder
joined to a text model through a projector (`steerguard.export.stitch`); every image fills a fixed
number of prompt positions, one per patch."""

from __future__ import annotations

import numpy as np

from . import Pixels


def processor_config(size: int, mean, std, num_patches: int, resample: str = "bicubic") -> dict:
    return {"size": int(size), "image_mean": [float(x) for x in mean], "image_std": [float(x) for x in std],
            "num_patches": int(num_patches), "resample": resample, "rescale_factor": 1 / 255}


def preprocess(image, config: dict) -> Pixels:
    from PIL import Image

    rgb = image if image.mode == "RGB" else image.convert("RGB")
    size = config["size"]
    scale = size / max(rgb.size)
    w, h = max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))
    canvas = Image.new("RGB", (size, size))
    canvas.paste(rgb.resize((w, h), Image.Resampling[config["resample"].upper()]), ((size - w) // 2, (size - h) // 2))
    x = np.asarray(canvas, np.float32) * np.float32(config["rescale_factor"])
    x = (x - np.asarray(config["image_mean"], np.float32)) / np.asarray(config["image_std"], np.float32)
    return Pixels(np.ascontiguousarray(x.transpose(2, 0, 1)[None]), image_token_count(config))


def image_token_count(config: dict) -> int:
    return config["num_patches"]
