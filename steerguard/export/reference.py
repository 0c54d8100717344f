"""Guarded generation in PyTorch: the oracle the ONNX runtime is tested against.

prefill -> prober reads h_{l*} -> decide -> decode every token through the plain head, or through
the refusal transform when the guard fired. When it does not fire the model is untouched, so greedy
output is token-for-token the unguarded model's."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..errors import SteerguardError
from ..runtime.sampling import Sampling
from .guard import Guard
from .hidden import chat_ids, template_prefix_len
from .refusal import end_of_turn_ids


@dataclass
class GuardedOutput:
    text: str
    token_ids: list[int]
    risk: float | None           # None when generated without a guard
    fired: bool
    split_layer: int | None
    timings: dict = field(default_factory=dict)


def sample(logits: torch.Tensor, s: Sampling, generator: torch.Generator) -> int:
    """Next token from one row of logits: greedy, or temperature / top-k / top-p sampling."""
    if s.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / s.temperature
    if s.top_k:
        kth = torch.topk(logits, min(s.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    if s.top_p < 1:
        sorted_p, order = torch.sort(probs, descending=True)
        drop = torch.cumsum(sorted_p, -1) - sorted_p > s.top_p
        probs[order[drop]] = 0
        probs /= probs.sum()
    return int(torch.multinomial(probs, 1, generator=generator))


class ReferenceGuard:
    """The guarded model in PyTorch. `guard=None` gives the unguarded model through the same loop."""

    def __init__(self, lm, guard: Guard | None):
        self.lm, self.guard = lm, guard
        self.decoder = lm.model.get_decoder()
        self.head = lm.model.get_output_embeddings()
        self.stop_ids = set(end_of_turn_ids(lm.tokenizer))
        self.prefix_len = template_prefix_len(lm.tokenizer)
        self.context = getattr(lm.text_config, "max_position_embeddings", 1 << 30)
        if guard is not None:
            guard.check_model(lm)
            self.transform = torch.from_numpy(guard.refusal.transform)

    def risk(self, hidden_states, length: int) -> float:
        p = self.guard.prober
        h = hidden_states[p.layer][0]
        if p.per_token:
            return float(p.prompt_risk([h[self.prefix_len:length].float().numpy()])[0])
        start = {"last": length - 1, "post": length - p.span, "mean": self.prefix_len}[p.feature]
        feature = h[start:length].mean(0)
        return float(p.risk(feature.float().numpy()[None])[0])

    @torch.inference_mode()
    def generate(self, prompt: str, sampling: Sampling | None = None) -> GuardedOutput:
        s = sampling or Sampling()
        s.check()
        if not prompt.strip():
            raise SteerguardError("the prompt is empty")
        ids = chat_ids(self.lm.tokenizer, prompt)
        if len(ids) + s.max_new_tokens > self.context:
            raise SteerguardError(f"prompt ({len(ids)} tokens) + max_new_tokens ({s.max_new_tokens}) exceeds "
                                  f"the model's context of {self.context} tokens; shorten the prompt")
        t0 = time.perf_counter()
        out = self.decoder(input_ids=torch.tensor([ids]), use_cache=True,
                           output_hidden_states=self.guard is not None)
        risk, fired = None, False
        if self.guard is not None:
            risk = self.risk(out.hidden_states, len(ids))
            fired = not risk < self.guard.prober.tau      # NaN fails closed
        g = torch.Generator().manual_seed(s.seed)
        tokens: list[int] = []
        cache, h = out.cache, out.last_hidden_state[0, -1]
        t_first = None
        while True:
            logits = self.head(h @ self.transform if fired else h)
            if fired and not tokens:      # a refusal is never empty: it cannot end the turn at once
                logits[list(self.stop_ids)] = float("-inf")
            token = sample(logits, s, g)
            t_first = t_first or time.perf_counter()
            if token in self.stop_ids:
                break
            tokens.append(token)
            if len(tokens) >= s.max_new_tokens:
                break
            out = self.decoder(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True)
            cache, h = out.cache, out.last_hidden_state[0, -1]
        t_end = time.perf_counter()
        return GuardedOutput(
            text=self.lm.tokenizer.decode(tokens, skip_special_tokens=True), token_ids=tokens, risk=risk,
            fired=fired, split_layer=self.guard.split_layer if self.guard else None,
            timings={"first_token_s": t_first - t0, "total_s": t_end - t0, "new_tokens": len(tokens)})
