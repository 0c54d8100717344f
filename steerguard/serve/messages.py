"""OpenAI chat messages -> the runtime's messages, images read under the server's limits.

An image arrives as an `image_url` part: a `data:` URL (base64), or a local path (or `file://` URL) that
must lie inside the folder the server was started with (`--image-root`; without one, paths are
refused). Remote URLs are never fetched. Every image is bounded in bytes and in pixels before it is
decoded."""

from __future__ import annotations

import base64
import binascii
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from .errors import APIError
from .schemas import ChatMessage, ImagePart, TextPart


@dataclass(frozen=True)
class ImageLimits:
    root: Path | None = None            # local image paths are readable only inside this folder
    max_bytes: int = 8 * 1024 * 1024
    max_pixels: int = 4096 * 4096


def runtime_messages(messages: list[ChatMessage], limits: ImageLimits, reads_images: bool) -> list[dict]:
    """Each message as {"role", "content"}: text, or (with images) a list of text and image parts."""
    out = []
    for i, m in enumerate(messages):
        role = "system" if m.role == "developer" else m.role
        if isinstance(m.content, str):
            out.append({"role": role, "content": m.content})
            continue
        if not any(isinstance(p, ImagePart) for p in m.content):
            out.append({"role": role, "content": "\n".join(p.text for p in m.content)})
            continue
        if not reads_images:
            raise APIError(400, "this model reads text only; remove the image_url parts",
                           param=f"messages.{i}.content", code="image_not_supported")
        parts = []
        for j, p in enumerate(m.content):
            if isinstance(p, TextPart):
                parts.append({"type": "text", "text": p.text})
            else:
                parts.append({"type": "image", "image": read_image(p.image_url.url, limits,
                                                                   f"messages.{i}.content.{j}.image_url.url")})
        out.append({"role": role, "content": parts})
    return out


def read_image(url: str, limits: ImageLimits, param: str):
    """A PIL image from a data: URL or an allowed local path; a 400 naming `param` otherwise."""
    if url.startswith("data:"):
        data = _data_url_bytes(url, limits, param)
    elif url.startswith(("http://", "https://")):
        raise APIError(400, "remote image URLs are not fetched; send the image as a data: URL",
                       param=param, code="invalid_image_url")
    else:
        data = _local_image_bytes(url, limits, param)
    return _decode(data, limits, param)


def _data_url_bytes(url: str, limits: ImageLimits, param: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise APIError(400, "an image data URL must look like data:image/png;base64,...", param=param,
                       code="invalid_image_url")
    if len(payload) > limits.max_bytes * 4 // 3 + 4:
        raise APIError(400, f"the image is larger than {limits.max_bytes} bytes", param=param, code="image_too_large")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, "the image data URL is not valid base64", param=param, code="invalid_image_url") from None


def _local_image_bytes(url: str, limits: ImageLimits, param: str) -> bytes:
    if limits.root is None:
        raise APIError(400, "local image paths are disabled on this server (start it with --image-root DIR); "
                       "send the image as a data: URL", param=param, code="invalid_image_url")
    path = unquote(urlparse(url).path) if url.startswith("file://") else url
    if "\x00" in path:
        raise APIError(400, "the image path is not valid", param=param, code="invalid_image_url")
    root = limits.root.resolve()
    target = (root / path).resolve()      # an absolute path stays itself; symlinks and '..' are followed
    if not target.is_relative_to(root):
        raise APIError(400, "the image path is outside the folder this server reads images from", param=param,
                       code="invalid_image_url")
    try:
        if not target.is_file():
            raise APIError(400, "no such image file", param=param, code="invalid_image_url")
        if target.stat().st_size > limits.max_bytes:
            raise APIError(400, f"the image is larger than {limits.max_bytes} bytes", param=param,
                           code="image_too_large")
        with open(target, "rb", opener=lambda p, flags: os.open(p, flags | getattr(os, "O_NOFOLLOW", 0))) as f:
            return f.read(limits.max_bytes + 1)
    except OSError:
        raise APIError(400, "the image file cannot be read", param=param, code="invalid_image_url") from None


def _decode(data: bytes, limits: ImageLimits, param: str):
    from PIL import Image

    if len(data) > limits.max_bytes:
        raise APIError(400, f"the image is larger than {limits.max_bytes} bytes", param=param, code="image_too_large")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > limits.max_pixels:
                raise APIError(400, f"the image is {w}x{h} pixels, more than {limits.max_pixels}", param=param,
                               code="image_too_large")
            im.load()
            return im
    except APIError:
        raise
    except Exception:    # Pillow raises many types for damaged or hostile files
        raise APIError(400, "the image cannot be read (PNG, JPEG, WebP, ...)", param=param,
                       code="invalid_image") from None
