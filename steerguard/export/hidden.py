"""Hidden states at the last prompt token, every layer, in batches.

`h_l` is the residual stream entering decoder layer `l` (`h_0` = embeddings), read at the last token
of the chat-templated prompt with the generation prompt appended — exactly what the runtime's `pre`
engine sees at prefill."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..runtime.chat import content_end, content_start
from .prober import TOKEN_FEATURES


def chat_ids(tokenizer, prompt: str, system: str | None = None) -> list[int]:
    """Token ids of `prompt` as a user turn, chat template applied, generation prompt added."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
    return list(ids)


def template_prefix_len(tokenizer) -> int:
    """Tokens the chat template puts before every user message (system prompt, role markers)."""
    return content_start(lambda content: chat_ids(tokenizer, content))


def template_suffix_len(tokenizer) -> int:
    """Tokens the chat template puts after every user message (end of turn, the assistant header): the
    post-instruction tokens, where an aligned model decides whether it will answer."""
    return content_end(lambda content: chat_ids(tokenizer, content))


@dataclass
class HiddenStates:
    """`last[i, l]` = h_l at prompt i's last token, for l = 0..N (index N has the final norm applied).
    `mean[i, l]` = h_l averaged over the tokens after the template prefix (user text + generation prompt).
    `post[i, l]` = h_l averaged over the post-instruction tokens (what the template puts after the user's
    text: end of turn, assistant header).
    `tokens[i]` = h_{tokens_layer} at each of those tokens, (t_i, d), when asked for."""
    last: np.ndarray   # (n, N + 1, d) float32
    mean: np.ndarray   # (n, N + 1, d) float32
    lengths: np.ndarray  # (n,) prompt lengths in tokens
    tokens: np.ndarray | None = None   # (n,) object array of (t_i, d) float32
    tokens_layer: int | None = None
    post: np.ndarray | None = None     # (n, N + 1, d) float32

    def feature(self, kind: str, layer: int) -> np.ndarray:
        """The prober's input at `layer` (see prober.FEATURES): (n, d) rows for "last" and "mean", the
        n per-token arrays for a token feature."""
        if kind in TOKEN_FEATURES:
            if self.tokens is None or self.tokens_layer != layer:
                raise ValueError(f"token states at layer {layer} were not extracted")
            return self.tokens
        return {"last": self.last, "mean": self.mean, "post": self.post}[kind][:, layer]


def image_inputs(processor, prompt, extra_ids: Sequence[int] = ()) -> dict:
    """The model's inputs for an image prompt as its own processor builds them (image placeholders
    expanded, pixel values, sizes / grids), with `extra_ids` appended to the token ids."""
    from ..runtime.images import load_image
    from .arch import processor_kwargs

    image = load_image(prompt.image)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt.text}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = dict(processor(text=text, images=[image], return_tensors="pt", **processor_kwargs(processor)))
    return with_tokens(inputs, extra_ids)


def with_tokens(inputs: dict, extra_ids: Sequence[int]) -> dict:
    """Processor outputs with text tokens appended (ids, mask, and the per-token modality types)."""
    if not extra_ids:
        return inputs
    n = len(extra_ids)
    out = {**inputs, "input_ids": torch.cat([inputs["input_ids"], torch.tensor([list(extra_ids)])], dim=1)}
    out["attention_mask"] = torch.ones_like(out["input_ids"])
    if "mm_token_type_ids" in inputs:   # 0 = text
        types = inputs["mm_token_type_ids"]
        out["mm_token_type_ids"] = torch.cat([types, torch.zeros((1, n), dtype=types.dtype)], dim=1)
    return out


class Reached(Exception):
    """Raised by the hook on layer `upto`: the states past it are not needed."""


@contextmanager
def stopping_before(decoder, layer: int | None) -> Iterator[list]:
    """While active, a forward pass stops at decoder layer `layer` (None: runs through) by raising
    `Reached`; the state entering that layer is appended to the yielded list."""
    reached: list = []
    if layer is None:
        yield reached
        return

    def stop(module, args, kwargs):
        reached.append(args[0] if args else kwargs["hidden_states"])
        raise Reached

    hook = decoder.layers[layer].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        yield reached
    finally:
        hook.remove()


@torch.inference_mode()
def extract_hidden_states(model, tokenizer, prompts: Sequence, batch_size: int = 16,
                          progress: bool | str = False, processor=None, upto: int | None = None,
                          tokens_at: int | None = None) -> HiddenStates:
    """Run the decoder (no LM head) over `prompts` in length-sorted, right-padded batches.
    Right padding keeps positions and the causal mask exact, so a batched state equals the
    state of the prompt run alone (up to float rounding). Image prompts (`data.ImagePrompt`) go one
    at a time through the whole multimodal model, as its processor prepares them. With `upto`, text
    prompts run only through the layers before it and only `h_upto` is filled in (the others stay 0).
    With `tokens_at`, the states of every token after the template prefix at that layer are kept too."""
    if upto is not None and tokens_at is not None and tokens_at != upto:
        raise ValueError("with `upto`, token states exist only at that layer")
    images = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if images and processor is None:
        from ..errors import SteerguardError

        raise SteerguardError("the calibration data has images, but this model reads text only")
    ids = [chat_ids(tokenizer, p) if isinstance(p, str) else [] for p in prompts]
    prefix, suffix = template_prefix_len(tokenizer), template_suffix_len(tokenizer)
    order = np.argsort([len(x) for x in ids], kind="stable")
    from .arch import text_config

    cfg = text_config(model.config)
    n_layers, d = cfg.num_hidden_layers, cfg.hidden_size
    # np.zeros maps its pages lazily (zeros_like would write them all): with `upto` only one layer's
    # rows are ever touched
    last = np.zeros((len(ids), n_layers + 1, d), np.float32)
    mean = np.zeros((len(ids), n_layers + 1, d), np.float32)
    post = np.zeros((len(ids), n_layers + 1, d), np.float32)
    tokens = None if tokens_at is None else _token_views(ids, prefix, d)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    bar = tqdm(total=len(ids), desc=progress if isinstance(progress, str) else "hidden states",
               disable=not progress, unit="prompt")
    for i in images:
        inputs = image_inputs(processor, prompts[i])
        ids[i] = inputs["input_ids"][0].tolist()
        states = torch.stack(model(**inputs, output_hidden_states=True, use_cache=False).hidden_states, 1)[0].float()
        last[i] = states[:, -1].numpy()
        mean[i] = states[:, prefix:].mean(1).numpy()
        post[i] = states[:, -suffix:].mean(1).numpy()
        if tokens is not None:
            tokens[i] = states[tokens_at, prefix:].numpy()
        bar.update(1)
    texts = [i for i in order if isinstance(prompts[i], str)]
    with stopping_before(decoder, upto if upto is not None and upto < n_layers else None) as reached:
        for start in range(0, len(texts), batch_size):
            _text_batch(decoder, ids, texts[start:start + batch_size], pad, (prefix, suffix), (last, mean, post), upto,
                        reached, tokens, tokens_at)
            bar.update(min(batch_size, len(texts) - start))
    bar.close()
    return HiddenStates(last=last, mean=mean, lengths=np.array([len(x) for x in ids]), tokens=tokens,
                        tokens_layer=tokens_at, post=post)


def split_rows(flat: np.ndarray, lengths) -> np.ndarray:
    """Consecutive rows of `flat` as one view per prompt, an (n,) object array of (t_i, d) arrays."""
    views = np.empty(len(lengths), object)
    for i, part in enumerate(np.split(flat, np.cumsum(lengths)[:-1]) if len(lengths) else []):
        views[i] = part
    return views


def _token_views(ids: list, prefix: int, d: int) -> np.ndarray:
    """One (t_i, d) view per prompt into a single float32 buffer for the user tokens of every text prompt
    (image prompts get their own array later). Thousands of separate arrays, allocated between the
    batches' large temporaries, would leave the allocator's heap fragmented at twice their size."""
    lengths = [max(len(x) - prefix, 0) for x in ids]
    return split_rows(np.empty((sum(lengths), d), np.float32), lengths)


def right_padded(sequences: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of token sequences padded on the right (a causal model's states at a position
    never see the padding after it)."""
    input_ids = torch.full((len(sequences), max(len(s) for s in sequences)), pad, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, s in enumerate(sequences):
        input_ids[row, :len(s)] = torch.tensor(s)
        mask[row, :len(s)] = 1
    return input_ids, mask


def _text_batch(decoder, ids: list, batch: Sequence[int], pad: int, template: tuple[int, int],
                pooled: tuple[np.ndarray, np.ndarray, np.ndarray], upto: int | None, reached: list,
                tokens: np.ndarray | None = None, tokens_at: int | None = None) -> None:
    """One right-padded batch of text prompts: fill the `pooled` (last, mean, post) rows (and `tokens`)
    of its prompts. `template`: the chat template's (prefix, suffix) lengths around the user's text."""
    (prefix, suffix), (last, mean, post) = template, pooled
    batch = np.array(batch)
    lengths = [len(ids[i]) for i in batch]
    input_ids, mask = right_padded([ids[i] for i in batch], pad)
    layers = slice(None)
    try:
        out = decoder(input_ids=input_ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        states = torch.stack(out.hidden_states, dim=1).float()          # (b, N+1, T, d)
    except Reached:
        states, layers = reached.pop()[:, None].float(), slice(upto, upto + 1)
    idx = torch.tensor(lengths) - 1
    last[batch, layers] = states[torch.arange(len(batch)), :, idx].numpy()
    user = mask.clone()
    user[:, :prefix] = 0
    w = (user / user.sum(1, keepdim=True).clamp(min=1))[:, None, :, None]
    mean[batch, layers] = (states * w).sum(2).numpy()
    ends = torch.tensor(lengths)[:, None] - torch.arange(suffix, 0, -1)      # (b, suffix) positions
    post[batch, layers] = states[torch.arange(len(batch))[:, None], :, ends].mean(1).numpy()
    if tokens is not None:
        at = states[:, tokens_at if layers == slice(None) else 0].numpy()     # (b, T, d)
        for row, i in enumerate(batch):
            tokens[i][:] = at[row, prefix:lengths[row]]
