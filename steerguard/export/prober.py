"""The safety prober: a d -> 64 -> 2 MLP on a split-point feature, risk = p(harmful).

Training needs torch; `risk` is plain numpy (the runtime computes the same thing inside the `pre`
engine). Input standardisation is folded into the first layer on export."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import SteerguardError

FEATURES = ("last", "mean")  # last prompt token, or mean over the user's tokens


@dataclass
class Prober:
    layer: int                  # reads h_layer (the split point)
    feature: str                # one of FEATURES
    w1: np.ndarray              # (d, hidden), standardisation folded in
    b1: np.ndarray              # (hidden,)
    w2: np.ndarray              # (hidden, 2)
    b2: np.ndarray              # (2,)
    tau: float = 0.5            # fire when risk >= tau
    metrics: dict = field(default_factory=dict)

    def risk(self, x: np.ndarray) -> np.ndarray:
        """p(harmful) for features `x` (n, d). Non-finite inputs give NaN (the guard fails closed on it)."""
        with np.errstate(over="ignore", invalid="ignore"):
            h = np.maximum(x.astype(np.float32) @ self.w1 + self.b1, 0)
            logits = h @ self.w2 + self.b2
            return 1.0 / (1.0 + np.exp(logits[:, 0] - logits[:, 1]))

    def fires(self, x: np.ndarray) -> np.ndarray:
        r = self.risk(x)
        return ~(r < self.tau)  # NaN counts as risky

    @classmethod
    def train(cls, x: np.ndarray, y: np.ndarray, layer: int, feature: str = "last",
              weights: np.ndarray | None = None, hidden: int = 64, epochs: int = 300,
              lr: float = 3e-3, weight_decay: float = 1e-2, seed: int = 0,
              subspace: np.ndarray | None = None, erase: np.ndarray | None = None) -> "Prober":
        """Full-batch AdamW on (weighted) cross-entropy. Deterministic for a given seed. With `subspace`
        (k, d orthonormal rows, see `pair_subspace`) the MLP reads only the features' coordinates in it;
        with `erase` (a d x d map, see `source_erasure`) it reads the features after that map. Both are
        folded into the first layer, so the exported prober keeps its d -> hidden shape."""
        import torch

        if feature not in FEATURES:
            raise SteerguardError(f"unknown prober feature {feature!r}; choose one of {', '.join(FEATURES)}")
        if len(np.unique(y)) < 2:
            raise SteerguardError("the prober needs both harmful and benign examples")
        x = x.astype(np.float64)
        centre = x.mean(0)
        proj = np.eye(x.shape[1]) if subspace is None else np.asarray(subspace, np.float64).T     # (d, m)
        if erase is not None:
            proj = np.asarray(erase, np.float64) @ proj
        x = (x - centre) @ proj
        mu, sd = x.mean(0), x.std(0) + 1e-6
        g = torch.Generator().manual_seed(seed)
        xt = torch.tensor((x - mu) / sd, dtype=torch.float32)
        yt = torch.tensor(y, dtype=torch.long)
        wt = torch.tensor(weights if weights is not None else np.ones(len(y)), dtype=torch.float32)
        wt = wt / wt.sum()
        d = x.shape[1]
        lin1, lin2 = torch.nn.Linear(d, hidden), torch.nn.Linear(hidden, 2)
        for lin in (lin1, lin2):
            torch.nn.init.normal_(lin.weight, std=(1 / lin.in_features) ** 0.5, generator=g)
            torch.nn.init.zeros_(lin.bias)
        params = [*lin1.parameters(), *lin2.parameters()]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        drop = torch.nn.Dropout(0.2)
        for _ in range(epochs):
            torch.manual_seed(seed + _)
            logits = lin2(drop(torch.relu(lin1(drop(xt)))))
            loss = (torch.nn.functional.cross_entropy(logits, yt, reduction="none") * wt).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        w1 = lin1.weight.detach().double().numpy().T       # (k, hidden)
        b1 = lin1.bias.detach().double().numpy()
        # fold projection and standardisation: (((x - c) @ P - mu) / sd) @ w1 + b1
        #   = x @ (P (w1 / sd)) + (b1 - ((c @ P + mu) / sd) @ w1)
        scaled = w1 / sd[:, None]
        return cls(layer=layer, feature=feature,
                   w1=(proj @ scaled).astype(np.float32), b1=(b1 - (centre @ proj + mu) @ scaled).astype(np.float32),
                   w2=lin2.weight.detach().numpy().T.copy(), b2=lin2.bias.detach().numpy().copy())

    def save(self, folder: Path) -> None:
        np.savez(folder / "prober.npz", w1=self.w1, b1=self.b1, w2=self.w2, b2=self.b2)
        (folder / "prober.json").write_text(json.dumps(
            {"layer": self.layer, "feature": self.feature, "tau": self.tau, "hidden": int(self.w1.shape[1]),
             "metrics": self.metrics}, indent=1))

    @classmethod
    def load(cls, folder: Path) -> "Prober":
        meta = json.loads((folder / "prober.json").read_text())
        with np.load(folder / "prober.npz") as w:
            return cls(layer=meta["layer"], feature=meta["feature"], tau=meta["tau"], metrics=meta["metrics"],
                       w1=w["w1"], b1=w["b1"], w2=w["w2"], b2=w["b2"])


def pair_subspace(harmful: np.ndarray, benign: np.ndarray, k: int) -> np.ndarray:
    """(k + 1, d) orthonormal rows spanning how matched pairs differ: the mean harmful-minus-benign
    direction and the top `k` principal directions of the pair differences. Pairs share their style and
    differ in intent, so a prober confined to this subspace cannot key on style (which source, which
    wrapper, which tone) the way one reading all d coordinates can."""
    diffs = np.asarray(harmful, np.float64) - np.asarray(benign, np.float64)
    mean = diffs.mean(0)
    _, sv, vt = np.linalg.svd(diffs - mean, full_matrices=False)
    vt = vt[:k][sv[:k] > 1e-6 * max(sv.max(initial=0.0), 1e-12)]   # only directions the pairs really vary in
    q, _ = np.linalg.qr(np.concatenate([mean[None] / np.linalg.norm(mean), vt]).T)
    return q.T


def source_erasure(x: np.ndarray, labels: np.ndarray, sources: np.ndarray, k: int) -> np.ndarray:
    """(d, d) map: standardise the features, then remove the `k` directions along which sources of the
    same class differ most (the spread of each source's mean around its class's mean of source means).
    Within a class every source means the same thing, so what tells them apart is style: the caption
    frame, the jailbreak wrapper, the imperative task. With it gone the prober cannot learn "this
    source's style means harmful" — the shortcut that fails on a source it has never seen."""
    x = np.asarray(x, np.float64)
    scale = 1.0 / (x.std(0) + 1e-6)
    z = (x - x.mean(0)) * scale
    spread = []
    for c in np.unique(labels):
        names = np.unique(sources[labels == c])
        if len(names) > 1:
            means = np.stack([z[(labels == c) & (sources == s)].mean(0) for s in names])
            spread.append(means - means.mean(0))
    if not spread or k <= 0:
        return np.diag(scale)
    _, sv, vt = np.linalg.svd(np.concatenate(spread), full_matrices=False)
    v = vt[:k][sv[:k] > 1e-6 * sv.max()]
    return np.diag(scale) @ (np.eye(len(scale)) - v.T @ v)


def auroc(risk: np.ndarray, y: np.ndarray) -> float:
    """Area under the ROC curve; NaN risks rank as most risky (the guard fails closed on them)."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y)
    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, np.nan_to_num(np.asarray(risk, np.float64), nan=1e9)))
