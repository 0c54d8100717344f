"""Decoding settings and the numpy sampler."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import SteerguardError

MAX_NEW_TOKENS_LIMIT = 1_000_000


@dataclass
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 0.0     # 0 = greedy
    top_k: int = 0               # 0 = off
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()   # stop strings (not included in the answer)
    ignore_eos: bool = False     # keep going past end-of-turn (benchmarks)

    def check(self) -> None:
        if not isinstance(self.max_new_tokens, int) or not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
            raise SteerguardError(f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS_LIMIT}, "
                                  f"got {self.max_new_tokens}")
        if not self.temperature >= 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise SteerguardError("temperature must be >= 0, top_p in (0, 1], top_k >= 0")


def sample(logits: np.ndarray, s: Sampling, rng: np.random.Generator) -> int:
    """Next token from one row of logits: greedy, or temperature / top-k / top-p sampling."""
    if s.temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / s.temperature
    if s.top_k:
        k = min(s.top_k, z.size)
        kth = np.partition(z, -k)[-k]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max())
    p /= p.sum()
    if s.top_p < 1:
        order = np.argsort(-p, kind="stable")
        sorted_p = p[order]
        drop = np.cumsum(sorted_p) - sorted_p > s.top_p
        p[order[drop]] = 0
        p /= p.sum()
    return int(rng.choice(p.size, p=p))
