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
              lr: float = 3e-3, weight_decay: float = 1e-2, seed: int = 0) -> "Prober":
        """Full-batch AdamW on (weighted) cross-entropy. Deterministic for a given seed."""
        import torch

        if feature not in FEATURES:
            raise SteerguardError(f"unknown prober feature {feature!r}; choose one of {', '.join(FEATURES)}")
        if len(np.unique(y)) < 2:
            raise SteerguardError("the prober needs both harmful and benign examples")
        x = x.astype(np.float64)
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
        w1 = lin1.weight.detach().double().numpy().T       # (d, hidden)
        b1 = lin1.bias.detach().double().numpy()
        # fold standardisation: ((x - mu) / sd) @ w1 + b1 = x @ (w1 / sd) + (b1 - (mu / sd) @ w1)
        return cls(layer=layer, feature=feature,
                   w1=(w1 / sd[:, None]).astype(np.float32), b1=(b1 - (mu / sd) @ w1).astype(np.float32),
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


def auroc(risk: np.ndarray, y: np.ndarray) -> float:
    """Area under the ROC curve; NaN risks rank as most risky (the guard fails closed on them)."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y)
    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, np.nan_to_num(np.asarray(risk, np.float64), nan=1e9)))
