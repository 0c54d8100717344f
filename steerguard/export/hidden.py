"""Hidden states at the last prompt token, every layer, in batches.

`h_l` is the residual stream entering decoder layer `l` (`h_0` = embeddings), read at the last token
of the chat-templated prompt with the generation prompt appended — exactly what the runtime's `pre`
engine sees at prefill."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm


def chat_ids(tokenizer, prompt: str, system: str | None = None) -> list[int]:
    """Token ids of `prompt` as a user turn, chat template applied, generation prompt added."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
    return list(ids)


def template_prefix_len(tokenizer) -> int:
    """Tokens the chat template puts before every user message (system prompt, role markers)."""
    a, b = chat_ids(tokenizer, "alpha"), chat_ids(tokenizer, "omega beta")
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@dataclass
class HiddenStates:
    """`last[i, l]` = h_l at prompt i's last token, for l = 0..N (index N has the final norm applied).
    `mean[i, l]` = h_l averaged over the tokens after the template prefix (user text + generation prompt)."""
    last: np.ndarray   # (n, N + 1, d) float32
    mean: np.ndarray   # (n, N + 1, d) float32
    lengths: np.ndarray  # (n,) prompt lengths in tokens

    def feature(self, kind: str, layer: int) -> np.ndarray:
        """The prober's input: `kind` "last" or "mean" (see prober.FEATURES) at `layer`, (n, d)."""
        return (self.last if kind == "last" else self.mean)[:, layer]


@torch.inference_mode()
def extract_hidden_states(model, tokenizer, prompts: Sequence[str], batch_size: int = 16,
                          progress: bool | str = False) -> HiddenStates:
    """Run the decoder (no LM head) over `prompts` in length-sorted, right-padded batches.
    Right padding keeps positions and the causal mask exact, so a batched state equals the
    state of the prompt run alone (up to float rounding)."""
    ids = [chat_ids(tokenizer, p) for p in prompts]
    prefix = template_prefix_len(tokenizer)
    order = np.argsort([len(x) for x in ids], kind="stable")
    cfg = model.config
    n_layers, d = cfg.num_hidden_layers, cfg.hidden_size
    last = np.zeros((len(ids), n_layers + 1, d), np.float32)
    mean = np.zeros_like(last)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    bar = tqdm(total=len(ids), desc=progress if isinstance(progress, str) else "hidden states",
               disable=not progress, unit="prompt")
    for start in range(0, len(ids), batch_size):
        batch = order[start:start + batch_size]
        lengths = [len(ids[i]) for i in batch]
        width = max(lengths)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            input_ids[row, :lengths[row]] = torch.tensor(ids[i])
            mask[row, :lengths[row]] = 1
        out = decoder(input_ids=input_ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        states = torch.stack(out.hidden_states, dim=1).float()          # (b, N+1, T, d)
        idx = torch.tensor(lengths) - 1
        last[batch] = states[torch.arange(len(batch)), :, idx].numpy()
        user = mask.clone()
        user[:, :prefix] = 0
        w = (user / user.sum(1, keepdim=True).clamp(min=1))[:, None, :, None]
        mean[batch] = (states * w).sum(2).numpy()
        bar.update(len(batch))
    bar.close()
    return HiddenStates(last=last, mean=mean, lengths=np.array([len(x) for x in ids]))
