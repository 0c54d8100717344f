"""Timed greedy ``generate`` for any transformers-style model (HF or optimum ORT).

``min_new_tokens == max_new_tokens`` suppresses EOS, so exactly ``new_tokens``
tokens come out.  Token times come from a streamer: generate calls ``put`` once
with the prompt, then once per new token as soon as it has been chosen.
Import only after :func:`_common.parse_args` has set the thread variables.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from _common import Generate, Generation


class TokenClock:
    """Minimal streamer (duck-typed, as generate only calls put/end)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def make_generate(model: Any, eos_token_id: int) -> Generate:
    def generate(prompt: list[int], new_tokens: int) -> Generation:
        ids = torch.tensor([prompt], dtype=torch.long, device=model.device)
        clock = TokenClock()
        t_start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=eos_token_id,
                streamer=clock,
            )
        token_times = clock.times[1:]  # times[0] is the prompt
        return Generation(out[0, len(prompt) :].tolist(), t_start, token_times[0], token_times[-1])

    return generate
