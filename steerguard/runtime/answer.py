"""The answer guard's running score: how the per-token risks of an answer (the `pre` engine's `answer_risk`
output, one per generated token) become one number that is compared with the answer guard's tau after
every token.

    window:N   the mean of the last N token risks, from the N-th token on (a short answer is never judged)
    ema:F      an exponential moving average from 0, s = F s + (1 - F) r, from the first token on
    max        the highest token risk so far (a decayed maximum's switch decision is the maximum's)

The switch fires the first time the score reaches tau (or is not finite: the guard fails closed)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import SteerguardError

SCORES = ("window", "ema", "max")


@dataclass(frozen=True)
class RunningScore:
    kind: str
    param: float = 0.0

    @classmethod
    def parse(cls, spec: str) -> "RunningScore":
        kind, _, value = spec.partition(":")
        try:
            if kind == "window" and int(value) >= 1:
                return cls(kind, int(value))
            if kind == "ema" and 0 <= float(value) < 1:
                return cls(kind, float(value))
            if kind == "max" and not value:
                return cls(kind)
        except ValueError:
            pass
        raise SteerguardError(f"unknown running score {spec!r}: use window:N (N >= 1), ema:F (0 <= F < 1) or max")

    def __str__(self) -> str:
        return self.kind if self.kind == "max" else f"{self.kind}:{self.param:g}"

    def scores(self, risks: np.ndarray) -> np.ndarray:
        """The score after each token of one answer (NaN where it is not yet judged); a non-finite risk makes
        every score from it on +inf."""
        r = np.asarray(risks, np.float64)
        bad = np.cumsum(~np.isfinite(r)) > 0
        r = np.where(np.isfinite(r), r, 0.0)
        if self.kind == "window":
            n = int(self.param)
            out = np.full(len(r), np.nan)
            if len(r) >= n:
                c = np.concatenate([[0.0], np.cumsum(r)])
                out[n - 1:] = (c[n:] - c[:-n]) / n
        elif self.kind == "ema":
            out, s = np.empty(len(r)), 0.0
            for k, x in enumerate(r):
                s = self.param * s + (1 - self.param) * x
                out[k] = s
        else:
            out = np.maximum.accumulate(r) if len(r) else r
        return np.where(bad, np.inf, out)

    def answer_score(self, risks: np.ndarray) -> float:
        """The highest score over the answer: it switches at tau exactly when this reaches tau. -inf when the
        answer is too short to be judged."""
        s = self.scores(risks)
        s = s[~np.isnan(s)]
        return float(s.max()) if len(s) else float("-inf")


class AnswerWatch:
    """One answer's running score, fed one token risk at a time (the runtime's side of `RunningScore.scores`)."""

    def __init__(self, score: RunningScore, tau: float):
        self.score, self.tau = score, tau
        self.risks: list[float] = []
        self.value: float | None = None     # the score after the last token (None: not judged yet)
        self.peak: float | None = None      # the highest score so far
        self._ema = 0.0
        self._max = float("-inf")

    def push(self, risk: float) -> bool:
        """Add the next token's risk; True when the answer must switch to the refusal head now."""
        self.risks.append(risk)
        if not np.isfinite(risk):
            self.value = self.peak = float("inf")
            return True
        s = self.score
        if s.kind == "window":
            n = int(s.param)
            if len(self.risks) < n:
                return False
            value = sum(self.risks[-n:]) / n     # summed in order, in double: as the C library does
        elif s.kind == "ema":
            self._ema = s.param * self._ema + (1 - s.param) * risk
            value = self._ema
        else:
            self._max = max(self._max, risk)
            value = self._max
        self.value, self.peak = value, value if self.peak is None else max(self.peak, value)
        return not value < self.tau
