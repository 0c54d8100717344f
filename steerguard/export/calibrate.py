"""The calibration pipeline: hidden states -> SAS -> split layer -> prober (+ tau) -> refusal head."""

from __future__ import annotations

import random
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from ..errors import SteerguardError
from .answer_guard import calibrate_answer_guard
from .operating import tau_at_fpr
from .augment import augment_pairs
from .data import Pair, Prompt, PromptSet, default_benign, default_pairs, evaluation_sets, public_sets
from .guard import Guard
from .hidden import template_suffix_len
from .prober import (DEFAULT_ERASE_SOURCES, DEFAULT_FEATURE, DEFAULT_PROBE, TOKEN_FEATURES, Prober, auroc, pair_subspace,
                     source_erasure, tpr_at_fpr)
from .refusal import RefusalHead, closed_refusal
from .sas import MIN_PAIRS, SASResult
from .state_cache import cached_hidden_states


@dataclass
class CalibrationData:
    """Pairs (for SAS, the prober and refusal targets) plus extra labelled prompt sets."""
    pairs: list[Pair]
    extra: list[PromptSet] = field(default_factory=list)

    @classmethod
    def default(cls) -> "CalibrationData":
        """What ships in the package: the contrast and VLSafe pairs, the Alpaca subset and the licensed public
        prompt sets (data/public)."""
        return cls(pairs=default_pairs(), extra=default_benign() + public_sets())

    def check(self) -> None:
        """Fail before any model is loaded when the data cannot make a guard."""
        if len(self.pairs) < MIN_PAIRS:
            raise SteerguardError(f"calibration needs at least {MIN_PAIRS} harmful/benign pairs, "
                                  f"got {len(self.pairs)}")
        if not any(p.refusal for p in self.pairs):
            raise SteerguardError("no refusal targets in the calibration pairs (give a `refusal` column)")

    def sources(self) -> dict:
        counts: dict = defaultdict(int)
        for p in self.pairs:
            counts[f"pairs:{p.source}"] += 1
        for s in self.extra:
            counts[f"{'harmful' if s.label else 'benign'}:{s.source}"] += len(s.prompts)
        return dict(counts)


@dataclass
class CalibrationConfig:
    layer: int | None = None            # None: argmax SAS
    feature: str = DEFAULT_FEATURE      # prober input, see prober.FEATURES
    probe: str = DEFAULT_PROBE          # "linear" (logistic) or "mlp", see prober.PROBES
    c: float = 0.05                     # the logistic probe's inverse L2 strength (on standardised features)
    max_per_source: int = 400           # pairs / prompts drawn from each source (seeded)
    val_fraction: float = 0.2           # held back to calibrate tau and report metrics
    # the named thresholds: each the lowest tau whose mean false-fire rate over the benign sources' validation
    # rows stays at or under its rate; `balanced` is the default tau (max_fpr, when given, replaces its rate)
    operating_fpr: tuple = (("strict", 0.05), ("balanced", 0.02), ("permissive", 0.005))
    max_fpr: float | None = None
    styled_per_pair: int = 1            # style-augmented copies of each plain pair (see augment.py)
    refusal_targets: int = 300
    refusal_epochs: int = 8
    eps: float = 0.1
    seed: int = 0
    batch_size: int = 16
    pair_subspace: int | None = None    # k: the prober reads only the pairs' top-k difference directions
    erase_sources: int = DEFAULT_ERASE_SOURCES   # k: remove the top-k directions that tell same-class sources apart
    sas_pairs_per_source: int = 100     # training pairs per source that SAS runs through every layer
    cache_states: bool = True           # keep hidden states on disk (see state_cache) and reuse them
    evaluation_fire_rates: bool = True  # record each operating point's fire rate on the shipped evaluation sets
    answer_guard: bool = True           # also train the answer guard on the model's own answers (answer_guard.py)
    # held out on the demo model, 24 answers a source x 32 tokens train as good an answer guard as 40 x 48 at
    # 40% of the generation (docs/ANSWER_GUARD.md)
    answer_per_source: int = 24         # calibration prompts per source the model answers for it
    answer_tokens: int = 32             # greedy tokens per answer


def calibrate(lm, data: CalibrationData, cfg: CalibrationConfig | None = None, progress: bool = True) -> Guard:
    cfg = cfg or CalibrationConfig()
    data.check()
    timings = {}
    n_layers = lm.num_layers
    if cfg.layer is not None and not 1 <= cfg.layer <= n_layers - 1:
        raise SteerguardError(f"layer {cfg.layer} is out of range: {lm.name} has {n_layers} layers, "
                              f"so the split layer must be between 1 and {n_layers - 1}")
    table = CalibrationTable.build(data, cfg)
    pairs, texts, labels, sources, val = table.pairs, table.texts, table.labels, table.sources, table.val
    rng = random.Random(cfg.seed + 1)

    # SAS needs every layer, but a sample of the plain pairs pins it down (its argmax is the same with 100
    # or all 400 pairs per source, and at bfloat16: docs/MODELS.md); every prompt then runs only through the
    # layers before the split, at fp32, since the prober reads those states
    t = time.perf_counter()
    sas_rows = table.sas_pairs(cfg.sas_pairs_per_source, random.Random(cfg.seed + 3))
    hs = cached_hidden_states(lm, [texts[i + side] for i in sas_rows for side in (0, 1)], cfg.batch_size,
                              progress and "hidden states (SAS pairs, every layer)", use_cache=cfg.cache_states,
                              precision="auto" if lm.processor is None else "float32")
    sas = SASResult.compute(hs.last[0::2], hs.last[1::2])
    del hs
    layer = cfg.layer if cfg.layer is not None else sas.best_layer
    tokens = cfg.feature in TOKEN_FEATURES
    states = cached_hidden_states(lm, texts, cfg.batch_size, progress and f"hidden states (every prompt, up to layer {layer})",
                                  upto=layer, tokens_at=layer if tokens else None, use_cache=cfg.cache_states)
    timings["hidden_states_s"] = time.perf_counter() - t

    t = time.perf_counter()
    last, n = states.last[:, layer], 2 * len(pairs)
    pair_train = ~val[:n:2]
    prober = fit_prober(states.feature(cfg.feature, layer), labels, sources, val, layer, cfg,
                        pairs=(last[0:n:2][pair_train], last[1:n:2][pair_train]), last=last)
    if cfg.feature == "post":
        prober.span = template_suffix_len(lm.tokenizer)
    del states, last     # the token states can be gigabytes; the refusal head does not need them
    if cfg.evaluation_fire_rates:
        add_evaluation_fire_rates(prober, lm, cfg, progress)
    timings["prober_s"] = time.perf_counter() - t

    answer, metrics = None, {}
    if cfg.answer_guard and lm.processor is not None:
        metrics["answer_guard_skipped"] = "the answer guard is trained for text models only so far"
    elif cfg.answer_guard:
        t = time.perf_counter()
        try:
            answer = calibrate_answer_guard(lm, texts, labels, sources, val, layer, cfg.answer_per_source,
                                            cfg.answer_tokens, seed=cfg.seed, progress=progress,
                                            use_cache=cfg.cache_states)
        except SteerguardError as e:    # e.g. a model that refuses every harmful request itself: nothing to learn
            metrics["answer_guard_skipped"] = str(e)
            if progress:
                print(f"answer guard skipped: {e}")
        timings["answer_guard_s"] = time.perf_counter() - t

    t = time.perf_counter()
    targets = [p for p in pairs if p.refusal]
    targets = _per_source_sample(targets, cfg.refusal_targets // max(1, len({p.source for p in targets})), rng)
    refusal = RefusalHead.train(lm.model, lm.tokenizer, [p.prompts()[0] for p in targets],
                                [closed_refusal(p.refusal) for p in targets], eps=cfg.eps, epochs=cfg.refusal_epochs,
                                seed=cfg.seed,
                                progress=progress, processor=lm.processor)
    timings["refusal_s"] = time.perf_counter() - t

    text = lm.text_config
    return Guard(
        model={"name": lm.name, "source": lm.source, "sha256": lm.sha256, "architecture": lm.model.config.model_type,
               "num_layers": n_layers, "hidden_size": text.hidden_size, "vocab_size": text.vocab_size},
        split_layer=layer, sas=sas, prober=prober, refusal=refusal,
        calibration={"sources": data.sources(), "used": {"pairs": len(pairs), "prompts": len(texts),
                     "validation": int(val.sum()), "refusal_targets": len(targets)},
                     "config": cfg.__dict__},
        metrics={"timings": timings, **metrics}, answer=answer)


@dataclass
class CalibrationTable:
    """Every calibration prompt with its label, source and validation flag. Rows 0..2P-1 are the
    pairs, harmful then benign; source names end in + / - for the two sides of a pair source."""
    pairs: list[Pair]
    texts: list[Prompt]
    labels: np.ndarray
    sources: np.ndarray
    val: np.ndarray
    plain_pairs: int        # pairs[:plain_pairs] as given; the rest are their styled copies

    @classmethod
    def build(cls, data: CalibrationData, cfg: CalibrationConfig) -> "CalibrationTable":
        rng = random.Random(cfg.seed)
        pairs = _per_source_sample(data.pairs, cfg.max_per_source, rng)
        plain_pairs = len(pairs)
        if cfg.styled_per_pair:
            captions = [p.harmful.split("\n", 1)[0][len("Image: "):] for p in data.pairs
                        if p.harmful.startswith("Image: ")]
            plain = [p for p in pairs if not p.harmful.startswith("Image: ")]
            pairs += augment_pairs(plain, captions, cfg.styled_per_pair, cfg.seed)
        if len(pairs) < MIN_PAIRS:
            raise SteerguardError(f"calibration needs at least {MIN_PAIRS} harmful/benign pairs, got {len(pairs)}")
        texts, labels, sources = [], [], []
        for p in pairs:
            texts += list(p.prompts())
            labels += [1, 0]
            sources += [f"{p.source}+", f"{p.source}-"]
        for s in data.extra:
            s = s.sample(cfg.max_per_source, cfg.seed)
            texts += s.prompts
            labels += [s.label] * len(s.prompts)
            sources += [s.source] * len(s.prompts)
        val = _validation_mask(len(pairs), len(texts), cfg.val_fraction, rng)
        return cls(pairs, texts, np.array(labels), np.array(sources), val, plain_pairs)

    def sas_pairs(self, per_source: int, rng: random.Random) -> list[int]:
        """Rows of the harmful sides of up to `per_source` plain training pairs from each source (the
        benign side is the next row)."""
        by_source: dict = defaultdict(list)
        for k, p in enumerate(self.pairs[:self.plain_pairs]):
            if not self.val[2 * k]:
                by_source[p.source].append(2 * k)
        rows = [r for src in sorted(by_source) for r in
                (rng.sample(by_source[src], per_source) if len(by_source[src]) > per_source else by_source[src])]
        return sorted(rows)


def fit_prober(feats, labels: np.ndarray, sources: np.ndarray, val: np.ndarray, layer: int,
               cfg: CalibrationConfig, pairs: tuple[np.ndarray, np.ndarray] | None = None,
               last: np.ndarray | None = None) -> Prober:
    """Train on the prompts outside `val` (sources weighted equally), set the operating points on `val`, record
    metrics. `feats`: the prober's input per prompt (see HiddenStates.feature); `last`: their last-token states
    (default `feats`), from which the source-erasure map is computed; `pairs` (harmful, benign last-token
    states of the training pairs) span the MLP's subspace when `cfg.pair_subspace` asks for one. Both maps act
    on any state of the layer, so a per-token prober uses them as they are."""
    last = feats if last is None else last
    train = ~val
    weights = source_balanced_weights(labels[train], sources[train])
    erase = (source_erasure(last[train], labels[train], sources[train], cfg.erase_sources)
             if cfg.erase_sources else None)
    if cfg.probe == "linear":
        prober = Prober.train_linear(feats[train], labels[train], layer, cfg.feature, weights=weights, c=cfg.c,
                                     erase=erase)
    elif cfg.probe == "mlp":
        subspace = pair_subspace(*pairs, cfg.pair_subspace) if cfg.pair_subspace and pairs is not None else None
        prober = Prober.train(feats[train], labels[train], layer, cfg.feature, weights=weights, seed=cfg.seed,
                              subspace=subspace, erase=erase)
    else:
        raise SteerguardError(f"unknown probe {cfg.probe!r}; choose linear or mlp")
    risk = prober.prompt_risk(feats[val])
    rates = dict(cfg.operating_fpr)
    if cfg.max_fpr is not None:
        rates["balanced"] = cfg.max_fpr
    prober.operating_points = operating_points(risk, labels[val], sources[val], rates)
    prober.tau = prober.operating_points["balanced"]["tau"]
    prober.roc = roc_table(risk, labels[val])
    prober.metrics = prober_metrics(risk, labels[val], sources[val], prober.tau)
    return prober


def _per_source_sample(pairs: list[Pair], n: int, rng: random.Random) -> list[Pair]:
    by_source: dict = defaultdict(list)
    for p in pairs:
        by_source[p.source].append(p)
    out = []
    for src in sorted(by_source):
        rows = by_source[src]
        out += rng.sample(rows, n) if len(rows) > n else rows
    return out


def _validation_mask(n_pairs: int, n_total: int, fraction: float, rng: random.Random) -> np.ndarray:
    """Both sides of a pair land on the same side of the split, so validation pairs are unseen."""
    val = np.zeros(n_total, bool)
    pair_val = np.array([rng.random() < fraction for _ in range(n_pairs)])
    val[0:2 * n_pairs:2] = pair_val
    val[1:2 * n_pairs:2] = pair_val
    val[2 * n_pairs:] = [rng.random() < fraction for _ in range(n_total - 2 * n_pairs)]
    return val


def source_balanced_weights(labels: np.ndarray, sources: np.ndarray) -> np.ndarray:
    """Every source weighs the same within its class, and the two classes weigh the same: a large
    source cannot decide what 'harmful' looks like."""
    w = np.zeros(len(labels))
    for s in np.unique(sources):
        m = sources == s
        w[m] = 1.0 / m.sum()
    for c in (0, 1):
        w[labels == c] /= w[labels == c].sum()
    return w


def operating_points(risk: np.ndarray, labels: np.ndarray, sources: np.ndarray, rates: dict[str, float]) -> dict:
    """Named thresholds (see CalibrationConfig.operating_fpr) with what each gives on these held-back rows:
    mean benign false-fire rate (`fpr`), harmful catch rate (`tpr`), fire rate per source."""
    points = {}
    for name, rate in rates.items():
        tau = tau_at_fpr(risk, labels, sources, rate)
        fired = ~(risk < tau)
        points[name] = {"tau": tau, "target_fpr": rate,
                        "fpr": float(np.mean([fired[(labels == 0) & (sources == s)].mean()
                                              for s in np.unique(sources[labels == 0])])),
                        "tpr": float(fired[labels == 1].mean()),
                        "fire_rates": {"validation:" + str(s): float(fired[sources == s].mean()) for s in np.unique(sources)}}
    return points


def roc_table(risk: np.ndarray, labels: np.ndarray, points: int = 200) -> dict:
    """The ROC of held-back rows, thinned to about `points` points, with its AUROC and TPR at 1% FPR."""
    from sklearn.metrics import roc_curve

    fpr, tpr, tau = roc_curve(labels, np.nan_to_num(np.asarray(risk, np.float64), nan=1.0), drop_intermediate=True)
    keep = np.unique(np.linspace(0, len(fpr) - 1, min(points, len(fpr))).round().astype(int))
    return {"fpr": fpr[keep].round(5).tolist(), "tpr": tpr[keep].round(5).tolist(),
            "tau": np.clip(tau[keep], 0, 1).round(6).tolist(), "auroc": auroc(risk, labels),
            "tpr_at_1pct_fpr": tpr_at_fpr(risk, labels, 0.01), "rows": int(len(labels))}


def add_evaluation_fire_rates(prober: Prober, lm, cfg: "CalibrationConfig", progress: bool) -> None:
    """Score the shipped evaluation sets and record each operating point's fire rate on them."""
    sets = evaluation_sets()
    prompts = [p for s in sets for p in s.prompts]
    tokens = prober.feature in TOKEN_FEATURES
    states = cached_hidden_states(lm, prompts, cfg.batch_size, progress and "hidden states (evaluation sets)",
                                  upto=prober.layer, tokens_at=prober.layer if tokens else None,
                                  use_cache=cfg.cache_states)
    risk = prober.prompt_risk(states.feature(prober.feature, prober.layer))
    start = 0
    for s in sets:
        part = risk[start:start + len(s.prompts)]
        start += len(s.prompts)
        for point in prober.operating_points.values():
            point["fire_rates"][s.source] = float((~(part < point["tau"])).mean())


def prober_metrics(risk: np.ndarray, labels: np.ndarray, sources: np.ndarray, tau: float) -> dict:
    fired = ~(risk < tau)
    return {"val_accuracy": float((fired == labels.astype(bool)).mean()), "val_auroc": auroc(risk, labels),
            "tau": tau, "val_fire_rate": {s: float(fired[sources == s].mean()) for s in np.unique(sources)}}
