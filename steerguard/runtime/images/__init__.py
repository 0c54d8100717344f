"""Images for multimodal bundles: read a file into RGB with one clear error, and turn it into the pixel
arrays a family's vision engine takes, from the preprocessing the manifest records (numpy and Pillow
only: no transformers at run time). One module per family:

    llava_onevision   any-resolution tiles + the base image (SigLIP normalisation)
    qwen2_vl          smart resize to a multiple of patch x merge, flattened temporal patches + grid_thw
    chameleon         resize + centre crop to 512, the VQ tokenizer's input

Each family module has `processor_config(image_processor) -> dict` (run at export; duck-typed, it only
reads attributes of the transformers image processor it is given) and `preprocess(image, config) ->
Pixels`, plus `image_token_count(...)`: how many placeholder tokens the prompt needs for that image."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...errors import SteerguardError


@dataclass
class Pixels:
    """One image ready for its vision engine."""
    pixel_values: np.ndarray                    # float32, the layout the family's vision engine takes
    num_image_tokens: int                       # placeholder tokens this image fills in the prompt
    extra: dict = field(default_factory=dict)   # family-specific arrays (image_sizes, image_grid_thw, ...)


def load_image(path: str | Path):
    """The image at `path` as a PIL image in its own mode (each family's preprocessing converts it the way
    the model's processor does, e.g. transparency onto white), or one line saying why it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise SteerguardError(f"{p}: no such image file")
    try:
        with Image.open(p) as im:
            im.load()
            return im
    except UnidentifiedImageError:
        raise SteerguardError(f"{p}: not an image Pillow can read (PNG, JPEG, WebP, ...)") from None
    except (OSError, ValueError) as e:
        raise SteerguardError(f"{p}: the image is damaged or truncated ({e})") from None
