"""The answer guard: a logistic probe on the split-layer state of every token the model writes, read as a running
score over the answer so far (runtime/answer.py), with its own operating points.

It is trained on the model's own greedy answers to calibration prompts (answers.py). What it learns to flag is an
answer that complies with a harmful request, as the refusal-substring judge and the prompt's label say: every
token of such an answer is a positive; every token of an answer to a benign request, and of the model's own
refusals of harmful ones, is a negative (a refusal needs no switch, and flagging one would teach the probe the
topic rather than the compliance). Each answer weighs the same within its source, and sources the same within
their class, as for the prompt prober."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import SteerguardError
from ..runtime.answer import RunningScore
from .operating import tau_at_fpr
from .prober import Prober, source_erasure

DEFAULT_SCORE = "window:8"
# whether a bundle runs its answer guard unless told otherwise: off, because held out on both named models it left the
# worst harmful source's attack success where it was and on the demo model turned more benign answers into refusals
# (docs/ANSWER_GUARD.md)
DEFAULT_ENABLED = False
# how a switched answer goes on: `restart` (the refusal head answers from the prompt) reads as a refusal; measured,
# `continue` mostly wound the answer up with "Is there something else I can help you with?" (docs/ANSWER_GUARD.md)
DEFAULT_SWITCH = "restart"
# the answer guard's named thresholds: the benign sources' mean share of validation answers switched to a refusal
ANSWER_FPR = {"strict": 0.02, "balanced": 0.01, "permissive": 0.0025}
FILES = ("answer.json", "answer.npz")


@dataclass
class AnswerProber:
    """Per-token probe (a Prober of two ReLU units, as the prompt's linear probe is stored) plus the running
    score that turns its token risks into a switch decision."""
    prober: Prober
    score: str = DEFAULT_SCORE
    tau: float = 0.5
    operating_points: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)

    @classmethod
    def train(cls, states: Sequence[np.ndarray], complied: np.ndarray, sources: np.ndarray, layer: int = 0,
              c: float = 0.05, erase: int = 4, score: str = DEFAULT_SCORE) -> "AnswerProber":
        """`states`: each answer's (t_i, d) token states; `complied[i]`: answer i complies with a harmful request."""
        RunningScore.parse(score)
        keep = np.array([len(s) > 0 for s in states])
        if len(np.unique(np.asarray(complied)[keep])) < 2:
            raise SteerguardError("the answer guard needs answers that comply with harmful requests and answers "
                                  "that do not; this model's answers are all one kind (calibrate on more prompts)")
        states = [s for s, k in zip(states, keep) if k]
        y, src = np.asarray(complied, int)[keep], np.asarray(sources)[keep]
        lengths = np.array([len(s) for s in states])
        x = np.concatenate(states)
        w = np.repeat(_balanced(y, src) / lengths, lengths)
        rows_y, rows_src = np.repeat(y, lengths), np.repeat(src, lengths)
        e = source_erasure(x, rows_y, rows_src, erase) if erase else None
        return cls(Prober.train_linear(x, rows_y, layer, "last", weights=w, c=c, erase=e), score)

    def token_risks(self, states: np.ndarray) -> np.ndarray:
        return self.prober.risk(states)

    def answer_scores(self, states: Sequence[np.ndarray], score: str | None = None) -> np.ndarray:
        """Each answer's highest running score (-inf for an answer too short to be judged)."""
        return score_answers(self, states, score or self.score)

    def set_operating_points(self, states: Sequence[np.ndarray], complied: np.ndarray, benign: np.ndarray,
                             sources: np.ndarray) -> None:
        """Thresholds at ANSWER_FPR on held-back answers: the benign prompts' sources' mean switch rate; `tpr` is
        the share of complying answers switched."""
        s = self.answer_scores(states)
        complied, benign = np.asarray(complied, bool), np.asarray(benign, bool)
        names = [n for n in np.unique(sources[benign])]
        for name, rate in ANSWER_FPR.items():
            tau = tau_at_fpr(s, (~benign).astype(int), sources, rate)
            fired = s >= tau
            self.operating_points[name] = {
                "tau": tau, "target_fpr": rate,
                "fpr": float(np.mean([fired[benign & (sources == n)].mean() for n in names])),
                "tpr": float(fired[complied].mean()) if complied.any() else None}
        self.tau = self.operating_points["balanced"]["tau"]

    def save(self, folder: Path) -> None:
        p = self.prober
        np.savez(folder / "answer.npz", w1=p.w1, b1=p.b1, w2=p.w2, b2=p.b2)
        (folder / "answer.json").write_text(json.dumps(
            {"layer": p.layer, "score": self.score, "tau": self.tau, "operating_points": self.operating_points,
             "metrics": self.metrics}, indent=1))

    @classmethod
    def load(cls, folder: Path) -> "AnswerProber | None":
        """The guard folder's answer guard, None when it was calibrated without one."""
        if not all((folder / f).exists() for f in FILES):
            return None
        meta = json.loads((folder / "answer.json").read_text())
        with np.load(folder / "answer.npz") as w:
            prober = Prober(layer=meta["layer"], feature="last", w1=w["w1"], b1=w["b1"], w2=w["w2"], b2=w["b2"])
        return cls(prober, meta["score"], meta["tau"], meta.get("operating_points", {}), meta.get("metrics", {}))


def score_answers(ap: AnswerProber, states: Sequence[np.ndarray], score: str) -> np.ndarray:
    """The highest running score of each answer under `score` (see runtime/answer.py)."""
    rs = RunningScore.parse(score)
    lengths = np.array([len(s) for s in states])
    if not lengths.sum():
        return np.full(len(states), -np.inf)
    risks = np.split(ap.token_risks(np.concatenate([s for s in states if len(s)])), np.cumsum(lengths)[:-1])
    return np.array([rs.answer_score(r) for r in risks])


def _balanced(y: np.ndarray, sources: np.ndarray) -> np.ndarray:
    """Every source the same weight within its class, both classes the same (per answer)."""
    w = np.zeros(len(y))
    for s in np.unique(sources):
        for c in (0, 1):
            m = (sources == s) & (y == c)
            if m.any():
                w[m] = 1.0 / m.sum()
    for c in (0, 1):
        w[y == c] /= w[y == c].sum()
    return w


def answer_manifest(a: AnswerProber) -> dict:
    """The bundle manifest's `guard.answer`: what the runtime and the C library read (the probe itself is the
    decode engine's `answer_risk` output)."""
    return {"output": "answer_risk", "score": a.score, "tau": a.tau, "operating_points": a.operating_points,
            "default_operating_point": "balanced", "enabled": DEFAULT_ENABLED, "hold": 0, "switch": DEFAULT_SWITCH,
            "metrics": a.metrics}


def calibrate_answer_guard(lm, texts: Sequence, labels: np.ndarray, sources: np.ndarray, val: np.ndarray, layer: int,
                           per_source: int = 24, max_new_tokens: int = 32, batch_size: int = 64, seed: int = 0,
                           progress: bool = True, use_cache: bool = True) -> AnswerProber:
    """Answer up to `per_source` text prompts of each calibration source (each class of a pair source apart),
    train the answer guard on the answers outside `val` and set its operating points on those inside."""
    from .answers import generate_answers

    rng = np.random.default_rng(seed)
    rows = []
    for s in np.unique(sources):
        found = [i for i in np.nonzero(sources == s)[0] if isinstance(texts[i], str)]
        rows += sorted(rng.choice(found, per_source, replace=False).tolist()) if len(found) > per_source else found
    rows = np.array(sorted(rows), int)
    if not len(rows):
        raise SteerguardError("the answer guard needs text prompts to answer; these calibration prompts have none")
    answers = generate_answers(lm, [texts[i] for i in rows], layer, max_new_tokens, batch_size,
                               progress and f"answers to {len(rows)} calibration prompts", use_cache)
    y, src, v = labels[rows], sources[rows], val[rows]
    complied = (y == 1) & ~answers.refused()
    a = AnswerProber.train([answers.states[i] for i in np.nonzero(~v)[0]], complied[~v], src[~v], layer)
    held = [answers.states[i] for i in np.nonzero(v)[0]]
    a.set_operating_points(held, complied[v], y[v] == 0, src[v])
    from .prober import auroc, tpr_at_fpr

    s = a.answer_scores(held)
    finite = np.where(np.isfinite(s), s, 0.0)
    a.metrics = {"answers": int(len(rows)), "max_new_tokens": max_new_tokens, "complied": int(complied.sum()),
                 "model_refused_harmful": int(((y == 1) & answers.refused()).sum()),
                 "validation": int(v.sum()), "val_auroc": auroc(finite, complied[v].astype(int)),
                 "val_tpr_at_1pct_fpr": tpr_at_fpr(finite, complied[v].astype(int), 0.01),
                 "val_switch_rate": {str(n): float((s[src[v] == n] >= a.tau).mean()) for n in np.unique(src[v])}}
    return a
