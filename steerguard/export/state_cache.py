"""Hidden states on disk, keyed by model, prompts and layers: a second calibration, an eval or a LOSO run
on the same model and data reuses the forward passes instead of repeating them (on a 0.5B model on two
cores they are most of an hour)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

import torch

from .cpu import cast_copy, compute_dtype
from .data import ImagePrompt
from .hidden import HiddenStates, extract_hidden_states, split_rows
from .models import cache_dir

FORMAT = 1   # bump when what extraction computes changes


def _prompt_key(p) -> list:
    if isinstance(p, ImagePrompt):   # an image is known by its path, size and modification time
        stat = os.stat(p.image) if os.path.exists(p.image) else None
        return [p.text, p.image, stat and stat.st_size, stat and stat.st_mtime_ns]
    return [p]


def model_fingerprint(lm) -> str:
    """The weights' source hash plus a strided sample of every parameter and the chat template: two models
    that share a source label (a test's tiny models, a fine-tune saved over its base) never share states."""
    h = hashlib.sha256(lm.sha256.encode())
    for name, param in lm.model.state_dict().items():
        flat = param.detach().reshape(-1)
        h.update(f"{name}{tuple(param.shape)}".encode())
        h.update(flat[:: max(1, flat.numel() // 256)].float().numpy().tobytes())
    h.update(str(getattr(lm.tokenizer, "chat_template", "")).encode())
    h.update(str(len(lm.tokenizer)).encode())
    return h.hexdigest()


def state_key(fingerprint: str, prompts: Sequence, upto: int | None, tokens_at: int | None) -> str:
    h = hashlib.sha256(json.dumps([FORMAT, fingerprint, upto, tokens_at]).encode())
    for p in prompts:
        h.update(json.dumps(_prompt_key(p)).encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def state_path(lm, prompts: Sequence, upto: int | None, tokens_at: int | None, fingerprint: str | None = None) -> Path:
    key = state_key(fingerprint or model_fingerprint(lm), prompts, upto, tokens_at)
    return cache_dir() / "hidden" / f"{lm.name}-{key}.npz"


def cached_hidden_states(lm, prompts: Sequence, batch_size: int = 16, progress: bool | str = False,
                         upto: int | None = None, tokens_at: int | None = None, use_cache: bool = True,
                         precision: str = "float32") -> HiddenStates:
    """`extract_hidden_states` for a loaded model, read from the cache when these exact prompts went through
    the same model up to the same layer before, else computed and stored. `precision` (see cpu.compute_dtype)
    runs a copy of the model at bfloat16 where that is asked for and native."""
    dtype = compute_dtype(precision)
    hs_of = lambda: extract_hidden_states(cast_copy(lm.model, dtype), lm.tokenizer, prompts, batch_size,  # noqa: E731
                                          progress, processor=lm.processor, upto=upto, tokens_at=tokens_at)
    if not use_cache:
        return hs_of()
    fingerprint = model_fingerprint(lm) + ("" if dtype == torch.float32 else f"-{dtype}")
    path = state_path(lm, prompts, upto, tokens_at, fingerprint)
    # an entry that also kept the token states at `upto` holds everything a pass without them computes
    candidates = [path] + ([state_path(lm, prompts, upto, upto, fingerprint)]
                           if tokens_at is None and upto is not None else [])
    for found in (c for c in candidates if c.exists()):
        try:
            return _load(found)
        except (OSError, ValueError, KeyError):   # a damaged entry is recomputed
            found.unlink(missing_ok=True)
    hs = hs_of()
    _save(hs, path, upto)
    return hs


def _save(hs: HiddenStates, path: Path, upto: int | None) -> None:
    """Only the layer that was filled in when extraction stopped at `upto`; token states as one flat array."""
    arrays = {}
    for f in dataclasses.fields(hs):
        value = getattr(hs, f.name)
        if f.name == "tokens" and value is not None:
            arrays["tokens"] = np.concatenate(list(value)) if len(value) else np.zeros((0, hs.last.shape[2]), np.float32)
            arrays["token_lengths"] = np.array([len(t) for t in value])
        elif isinstance(value, np.ndarray) and value.ndim == 3 and upto is not None:
            arrays[f.name] = value[:, upto]
            arrays[f"{f.name}__layers"] = np.array([value.shape[1], upto])
        elif isinstance(value, np.ndarray):
            arrays[f.name] = value
        elif value is not None:
            arrays[f.name] = np.array(value)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.stem + ".partial.npz")
    np.savez(partial, **arrays)
    partial.replace(path)


def _load(path: Path) -> HiddenStates:
    with np.load(path) as z:
        values = {}
        for f in dataclasses.fields(HiddenStates):
            if f.name == "tokens":
                values["tokens"] = split_rows(z["tokens"], z["token_lengths"]) if "tokens" in z else None
            elif f"{f.name}__layers" in z:   # one layer stored: the others are zeros, as extraction leaves them
                n_layers, layer = z[f"{f.name}__layers"]
                row = z[f.name]
                full = np.zeros((len(row), int(n_layers), row.shape[1]), row.dtype)
                full[:, int(layer)] = row
                values[f.name] = full
            elif f.name in z:
                value = z[f.name]
                values[f.name] = value.item() if value.ndim == 0 else value
    return HiddenStates(**values)
