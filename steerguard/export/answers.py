"""The model's own greedy answers to calibration prompts, and the split-layer state of every answer token:
what the answer guard (see answer_guard.py) is trained on.

The state of answer token k is the residual stream entering the split layer at k's position, which is what the
runtime's `pre` engine computes when k is fed back in on the next decode step. The last token of an answer is
never fed back, so an answer of n tokens has n - 1 states (the end-of-turn token is not part of the answer)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..runtime.judge import is_refusal
from .cpu import cast_copy, compute_dtype
from .hidden import Reached, chat_ids, right_padded, stopping_before
from .refusal import end_of_turn_ids
from .state_cache import model_fingerprint
from .models import cache_dir


@dataclass
class Answers:
    """Greedy answers, one per prompt: their token ids and text, and the split-layer states of their tokens."""
    ids: list[list[int]]
    texts: list[str]
    states: list[np.ndarray]     # (max(len(ids) - 1, 0), d) float32 each
    layer: int

    def refused(self) -> np.ndarray:
        """The refusal-substring judge on each answer (the same judge `steerguard eval` uses)."""
        return np.array([is_refusal(t) for t in self.texts])


def generate_answers(lm, prompts: Sequence[str], layer: int, max_new_tokens: int = 48, batch_size: int = 16,
                     progress: bool | str = False, use_cache: bool = True, writer: str = "auto") -> Answers:
    """Greedy answers of `lm` to text `prompts` (chat template applied) with their fp32 states at `layer`, cached
    on disk by model, prompts, layer, length and writer like the prompt states.

    `writer` is the precision the answers are written at: `float32`, `bfloat16`, or `auto` (bfloat16 where the CPU
    computes it natively: 1.5x faster on Gemma 3 270M; float32 elsewhere). The states are the fp32
    model's either way: one teacher-forced pass over prompt and answer, up to `layer`."""
    dtype = compute_dtype(writer)
    path = _answer_path(lm, prompts, layer, max_new_tokens, dtype)
    if use_cache and path.exists():
        return _load(path, layer)
    stops = set(end_of_turn_ids(lm.tokenizer))
    pad = lm.tokenizer.pad_token_id or 0
    encoded = [chat_ids(lm.tokenizer, p) for p in prompts]
    ids: list = [None] * len(prompts)
    states: list = [None] * len(prompts)
    label = progress if isinstance(progress, str) else "answers"
    model = cast_copy(lm.model, dtype)
    with tqdm(total=len(prompts), desc=label, unit="prompt", disable=not progress) as bar:
        for batch in _batches(encoded, batch_size, max_new_tokens):
            for i, a in zip(batch, _greedy(model, [encoded[i] for i in batch], max_new_tokens, stops, pad)):
                ids[i] = a
            bar.update(len(batch))
    del model
    fed = [e + a[:-1] for e, a in zip(encoded, ids)]     # the last answer token is never fed back
    with tqdm(total=len(prompts), desc="states of the answers", unit="answer", disable=not progress) as bar:
        for batch in _batches(fed, batch_size, 0):
            for i, h in zip(batch, _states_at(lm.model, [fed[i] for i in batch], layer, pad)):
                states[i] = h[len(encoded[i]):]
            bar.update(len(batch))
    texts = [lm.tokenizer.decode(a, skip_special_tokens=True) for a in ids]
    answers = Answers(ids, texts, states, layer)
    if use_cache:
        _save(answers, path)
    return answers


def _batches(encoded: list[list[int]], batch_size: int, max_new_tokens: int, budget: int = 1 << 14) -> list[list[int]]:
    """Length-sorted batches of at most `batch_size` prompts and about `budget` padded tokens (long prompts, such
    as jailbreak wrappers, go a few at a time)."""
    order = [int(i) for i in np.argsort([len(e) for e in encoded], kind="stable")]
    out, batch = [], []
    for i in order:
        width = len(encoded[i]) + max_new_tokens      # sorted: the newest prompt is the longest so far
        if batch and (len(batch) >= batch_size or (len(batch) + 1) * width > budget):
            out.append(batch)
            batch = []
        batch.append(i)
    return out + ([batch] if batch else [])


@torch.inference_mode()
def _greedy(model, encoded: list[list[int]], max_new_tokens: int, stops: set[int], pad: int) -> list[list[int]]:
    """One left-padded batch through `generate`; each row's answer up to its first end-of-turn token."""
    width = max(len(e) for e in encoded)
    input_ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=sorted(stops), pad_token_id=pad, temperature=None, top_p=None, top_k=None)
    rows = []
    for tokens in out[:, width:].tolist():
        rows.append(tokens[:next((k for k, t in enumerate(tokens) if t in stops), len(tokens))])
    return rows


@torch.inference_mode()
def _states_at(model, sequences: list[list[int]], layer: int, pad: int) -> list[np.ndarray]:
    """The fp32 state entering decoder layer `layer` at every position of each sequence (right-padded: a causal
    model's states do not see the padding after them), the pass stopped there."""
    input_ids, mask = right_padded(sequences, pad)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    with stopping_before(decoder, layer) as reached:
        try:
            decoder(input_ids=input_ids, attention_mask=mask, use_cache=False)
            raise RuntimeError(f"decoder layer {layer} was never reached")
        except Reached:
            h = reached.pop().float().numpy()
    return [np.ascontiguousarray(h[row, :len(s)], np.float32) for row, s in enumerate(sequences)]


def _answer_path(lm, prompts: Sequence[str], layer: int, max_new_tokens: int, dtype: "torch.dtype") -> Path:
    key = [model_fingerprint(lm), layer, max_new_tokens, list(prompts)] + ([] if dtype == torch.float32 else [str(dtype)])
    h = hashlib.sha256(json.dumps(key).encode())
    return cache_dir() / "answers" / f"{h.hexdigest()[:24]}.npz"


def _save(a: Answers, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lengths = np.array([len(s) for s in a.states])
    flat = np.concatenate(a.states) if lengths.sum() else np.zeros((0, 1), np.float32)
    tmp = path.with_suffix(".partial.npz")
    np.savez(tmp, states=flat.astype(np.float16), lengths=lengths,
             ids=np.array(json.dumps(a.ids)), texts=np.array(json.dumps(a.texts)))
    tmp.rename(path)


def _load(path: Path, layer: int) -> Answers:
    with np.load(path) as f:
        flat, lengths = f["states"].astype(np.float32), f["lengths"]
        ids, texts = json.loads(str(f["ids"])), json.loads(str(f["texts"]))
    states = np.split(flat, np.cumsum(lengths)[:-1]) if len(lengths) else []
    return Answers(ids, texts, list(states), layer)
