"""The safety prober on split-point states, risk = p(harmful): a logistic probe (the default) or a
d -> 64 -> 2 MLP (the paper's).

It reads the last prompt token's state (`last`, the paper's reading and the default), the mean of the
post-instruction tokens (`post`), or every token of the user's turn (`max`): the probe scores each token and the
prompt's risk is the highest token risk, trained as a multiple-instance classifier (a harmful prompt needs one
risky token, a benign prompt none).

Both probes have one exported form, `relu(x @ w1 + b1) @ w2 + b2`: a logistic probe `z = x.w + b` is stored
exactly as two ReLU units, `relu(z) - relu(-z) = z`, so the `pre` engine, the runtime and the C library run
either without knowing which it is. Training needs torch (MLP) or scikit-learn (logistic); `risk` is plain
numpy. Input standardisation is folded into the first layer on export."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import SteerguardError

# last prompt token, mean over the user's tokens, max risk over them, mean over the post-instruction tokens
FEATURES = ("last", "mean", "max", "post")
TOKEN_FEATURES = ("max",)                 # features read from every token of the user's turn
ENGINE_FEATURES = ("last", "max", "post")  # what the `pre` engine can compute
DEFAULT_FEATURE = "last"
PROBES = ("linear", "mlp")
DEFAULT_PROBE = "linear"
DEFAULT_ERASE_SOURCES = 4   # style directions removed before the probe reads (see source_erasure)


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
    span: int = 1               # `post`: how many final prompt tokens (the template's) the feature averages
    # named thresholds ("strict", "balanced" = tau, "permissive") with what each gives on held-out rows and
    # the shipped evaluation sets, and the held-out ROC they were read from (see calibrate.operating_points)
    operating_points: dict = field(default_factory=dict)
    roc: dict = field(default_factory=dict)

    def risk(self, x: np.ndarray) -> np.ndarray:
        """p(harmful) for features `x` (n, d). Non-finite inputs give NaN (the guard fails closed on it)."""
        with np.errstate(over="ignore", invalid="ignore"):
            h = np.maximum(np.asarray(x, np.float32) @ self.w1 + self.b1, 0)
            logits = h @ self.w2 + self.b2
            return 1.0 / (1.0 + np.exp(logits[:, 0] - logits[:, 1]))

    @property
    def per_token(self) -> bool:
        """Reads every token of the user's turn (its input per prompt is a (t_i, d) array)."""
        return self.feature in TOKEN_FEATURES

    def prompt_risk(self, x, chunk: int = 1024) -> np.ndarray:
        """p(harmful) per prompt: `risk` of its feature row, or for a token feature the highest risk among
        its tokens (`x`: a sequence of (t_i, d) arrays). NaN stays NaN."""
        if not self.per_token:
            return self.risk(x)
        lengths = np.array([len(t) for t in x])
        if (lengths == 0).any():
            raise SteerguardError("a prompt has no tokens for the prober to read")
        out = np.empty(len(x), np.float32)
        for k in range(0, len(x), chunk):     # a chunk of prompts at a time: no copy of every token state
            part = lengths[k:k + chunk]
            starts = np.concatenate([[0], np.cumsum(part)[:-1]])
            out[k:k + chunk] = np.maximum.reduceat(self.risk(np.concatenate(list(x[k:k + chunk]))), starts)
        return out

    def fires(self, x) -> np.ndarray:
        return ~(self.prompt_risk(x) < self.tau)  # NaN counts as risky

    @classmethod
    def train(cls, x, y: np.ndarray, layer: int, feature: str = "last",
              weights: np.ndarray | None = None, hidden: int = 64, epochs: int | None = None,
              lr: float = 3e-3, weight_decay: float = 1e-2, seed: int = 0,
              subspace: np.ndarray | None = None, erase: np.ndarray | None = None) -> "Prober":
        """AdamW on (weighted) cross-entropy, deterministic for a given seed: full batch on feature rows
        `x` (n, d) for 300 epochs, or for a token feature on the highest token margin of each prompt
        (`x`: n arrays (t_i, d)) in length-sorted minibatches for 10 epochs. With `subspace` (k, d
        orthonormal rows, see `pair_subspace`) the MLP reads only the features' coordinates in it;
        with `erase` (a d x d map, see `source_erasure`) it reads the features after that map. Both are
        folded into the first layer, so the exported prober keeps its d -> hidden shape."""
        import torch

        if feature not in FEATURES:
            raise SteerguardError(f"unknown prober feature {feature!r}; choose one of {', '.join(FEATURES)}")
        if len(np.unique(y)) < 2:
            raise SteerguardError("the prober needs both harmful and benign examples")
        tokens = feature in TOKEN_FEATURES
        # token states run to millions of rows: they are never concatenated whole; their statistics and
        # the standardised copy the minibatches hold are made a block of prompts at a time
        rows = [np.asarray(t, np.float32) for t in x] if tokens else [np.asarray(x, np.float64)]
        proj = np.eye(rows[0].shape[1]) if subspace is None else np.asarray(subspace, np.float64).T   # (d, m)
        if erase is not None:
            proj = np.asarray(erase, np.float64) @ proj
        centre, cov = _moments(rows)
        sd = np.sqrt(np.einsum("ij,ik,kj->j", proj, cov, proj)) + 1e-6     # column sd after the projection

        def standardise(v: np.ndarray) -> np.ndarray:
            return (((v - centre.astype(v.dtype)) @ proj.astype(v.dtype)) / sd.astype(v.dtype)).astype(np.float32)

        g = torch.Generator().manual_seed(seed)
        wt = torch.tensor(weights if weights is not None else np.ones(len(y)), dtype=torch.float32)
        wt = wt / wt.sum()
        d = proj.shape[1]
        lin1, lin2 = torch.nn.Linear(d, hidden), torch.nn.Linear(hidden, 2)
        for lin in (lin1, lin2):
            torch.nn.init.normal_(lin.weight, std=(1 / lin.in_features) ** 0.5, generator=g)
            torch.nn.init.zeros_(lin.bias)
        params = [*lin1.parameters(), *lin2.parameters()]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        drop = torch.nn.Dropout(0.2)
        mlp = lambda v: lin2(drop(torch.relu(lin1(drop(v)))))     # noqa: E731

        def step(loss):
            opt.zero_grad()
            loss.backward()
            opt.step()

        if tokens:
            batches = _padded_batches(rows, standardise, torch.tensor(y, dtype=torch.float32), wt * len(y))
            order = np.random.default_rng(seed)
            for epoch in range(epochs or 10):
                torch.manual_seed(seed + epoch)
                for i in order.permutation(len(batches)):
                    states, mask, yb, wb = batches[i]
                    margin = mlp(states).diff(dim=-1)[..., 0].masked_fill(~mask, float("-inf")).amax(1)
                    step((torch.nn.functional.binary_cross_entropy_with_logits(margin, yb, reduction="none")
                          * wb).sum() / len(y))
        else:
            xt, yt = torch.from_numpy(standardise(rows[0])), torch.tensor(y, dtype=torch.long)
            for epoch in range(epochs or 300):
                torch.manual_seed(seed + epoch)
                step((torch.nn.functional.cross_entropy(mlp(xt), yt, reduction="none") * wt).sum())
        w1 = lin1.weight.detach().double().numpy().T       # (k, hidden)
        b1 = lin1.bias.detach().double().numpy()
        # fold projection and standardisation: (((x - c) @ P) / sd) @ w1 + b1
        #   = x @ (P (w1 / sd)) + (b1 - ((c @ P) / sd) @ w1)
        scaled = w1 / sd[:, None]
        return cls(layer=layer, feature=feature,
                   w1=(proj @ scaled).astype(np.float32), b1=(b1 - (centre @ proj) @ scaled).astype(np.float32),
                   w2=lin2.weight.detach().numpy().T.copy(), b2=lin2.bias.detach().numpy().copy())

    @classmethod
    def train_linear(cls, x, y: np.ndarray, layer: int, feature: str = "last",
                     weights: np.ndarray | None = None, c: float = 0.05,
                     erase: np.ndarray | None = None) -> "Prober":
        """L2-regularised logistic regression (inverse strength `c`) on standardised feature rows `x` (n, d),
        (weighted) cross-entropy; deterministic. With `erase` (a d x d map, see `source_erasure`) it reads the
        features after that map. A token feature trains on every token of every prompt with the prompt's label
        (a harmful prompt's words are not all harmful, but its riskiest token is what `prompt_risk` reads)."""
        from sklearn.linear_model import LogisticRegression

        if feature not in FEATURES:
            raise SteerguardError(f"unknown prober feature {feature!r}; choose one of {', '.join(FEATURES)}")
        if len(np.unique(y)) < 2:
            raise SteerguardError("the prober needs both harmful and benign examples")
        w = np.ones(len(y)) if weights is None else np.asarray(weights, np.float64)
        if feature in TOKEN_FEATURES:
            lengths = np.array([len(t) for t in x])
            x, y, w = np.concatenate(list(x)), np.repeat(y, lengths), np.repeat(w / lengths, lengths)
        x = np.asarray(x, np.float64)
        proj = np.eye(x.shape[1]) if erase is None else np.asarray(erase, np.float64)
        z = x @ proj
        centre, sd = z.mean(0), z.std(0) + 1e-6
        lr = LogisticRegression(C=c, max_iter=1000, tol=1e-5).fit((z - centre) / sd, y, sample_weight=w * len(w) / w.sum())
        # z = ((x P - c) / sd) . a + b0  =  x . (P (a / sd)) + (b0 - c . (a / sd))
        a = lr.coef_[0] / sd
        direction, bias = proj @ a, float(lr.intercept_[0] - centre @ a)
        return cls(layer=layer, feature=feature,
                   w1=np.stack([direction, -direction], 1).astype(np.float32),
                   b1=np.array([bias, -bias], np.float32),
                   w2=np.array([[0.0, 1.0], [0.0, -1.0]], np.float32), b2=np.zeros(2, np.float32))

    @property
    def probe(self) -> str:
        """`linear` when the first layer is the two-unit form of a logistic probe, else `mlp`."""
        w1, b1, w2 = self.w1, self.b1, self.w2
        linear = (w1.shape[1] == 2 and np.array_equal(w1[:, 1], -w1[:, 0]) and b1[1] == -b1[0]
                  and np.array_equal(w2, np.array([[0, 1], [0, -1]], w2.dtype)) and not self.b2.any())
        return "linear" if linear else "mlp"

    def save(self, folder: Path) -> None:
        np.savez(folder / "prober.npz", w1=self.w1, b1=self.b1, w2=self.w2, b2=self.b2)
        (folder / "prober.json").write_text(json.dumps(
            {"layer": self.layer, "feature": self.feature, "tau": self.tau, "hidden": int(self.w1.shape[1]),
             "span": self.span, "metrics": self.metrics, "operating_points": self.operating_points,
             "roc": self.roc}, indent=1))

    @classmethod
    def load(cls, folder: Path) -> "Prober":
        meta = json.loads((folder / "prober.json").read_text())
        with np.load(folder / "prober.npz") as w:
            return cls(layer=meta["layer"], feature=meta["feature"], tau=meta["tau"], metrics=meta["metrics"],
                       w1=w["w1"], b1=w["b1"], w2=w["w2"], b2=w["b2"], span=meta.get("span", 1),
                       operating_points=meta.get("operating_points", {}), roc=meta.get("roc", {}))


def _blocks(rows: list[np.ndarray], size: int = 1 << 13):
    """The rows of consecutive arrays, concatenated into blocks of about `size` rows."""
    start, count = 0, 0
    for i, r in enumerate(rows):
        count += len(r)
        if count >= size:
            yield np.concatenate(rows[start:i + 1])
            start, count = i + 1, 0
    if start < len(rows):
        yield np.concatenate(rows[start:])


def _moments(rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Column means and covariance (float64) of all rows of `rows`, a block at a time."""
    n = sum(len(r) for r in rows)
    mean = sum(r.sum(0, dtype=np.float64) for r in rows) / n
    cov = np.zeros((len(mean), len(mean)))
    for block in _blocks(rows):
        c = block - mean.astype(block.dtype)
        cov += c.T @ c
    return mean, cov / n


def _padded_batches(rows: list[np.ndarray], standardise, y, w, size: int = 128) -> list[tuple]:
    """Prompts' token states, standardised, as right-padded (b, t, m) batches of similar length, with
    their token masks, labels and weights."""
    import torch

    lengths = np.array([len(r) for r in rows])
    order = np.argsort(lengths, kind="stable")
    batches = []
    for k in range(0, len(order), size):
        idx = order[k:k + size]
        states = standardise(np.concatenate([rows[i] for i in idx]))
        padded = np.zeros((len(idx), int(lengths[idx].max()), states.shape[1]), np.float32)
        mask = np.zeros(padded.shape[:2], bool)
        starts = np.concatenate([[0], np.cumsum(lengths[idx])])
        for r, i in enumerate(idx):
            padded[r, :lengths[i]] = states[starts[r]:starts[r + 1]]
            mask[r, :lengths[i]] = True
        index = torch.from_numpy(idx)
        batches.append((torch.from_numpy(padded), torch.from_numpy(mask), y[index], w[index]))
    return batches


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


def tpr_at_fpr(risk: np.ndarray, y: np.ndarray, fpr: float = 0.01) -> float:
    """Share of harmful prompts scored above all but `fpr` of the benign ones (the catch rate at a
    threshold that fires on at most `fpr` of benign prompts). NaN risks rank as most risky."""
    risk, y = np.nan_to_num(np.asarray(risk, np.float64), nan=1e9), np.asarray(y)
    if len(np.unique(y)) < 2:
        return float("nan")
    threshold = np.quantile(risk[y == 0], 1 - fpr, method="higher")
    return float((risk[y == 1] > threshold).mean())
