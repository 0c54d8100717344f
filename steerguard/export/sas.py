"""Safety Awareness Score: how consistently a layer separates harmful from benign.

For pairs (a_i, b_i) and a layer l: v_i = h_l(a_i) - h_l(b_i); SAS(l) = mean over i<j of cos(v_i, v_j).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import SteerguardError

MIN_PAIRS = 8


def sas_score(diffs: np.ndarray) -> float:
    """Mean pairwise cosine similarity of the rows of `diffs` (n, d), over i<j."""
    n = len(diffs)
    if n < 2:
        raise SteerguardError(f"SAS needs at least 2 pairs, got {n}")
    norms = np.linalg.norm(diffs, axis=1, keepdims=True)
    unit = diffs / np.maximum(norms, 1e-12)
    # sum_{i<j} cos = (|sum u|^2 - sum |u|^2) / 2, in O(n d) instead of O(n^2 d)
    total = unit.sum(0)
    pair_sum = (total @ total - (unit * unit).sum()) / 2
    return float(pair_sum / (n * (n - 1) / 2))


@dataclass
class SASResult:
    """SAS for every candidate layer 1..N-1 (a split needs layers on both sides)."""
    layers: list[int]
    scores: list[float]
    num_pairs: int

    @property
    def best_layer(self) -> int:
        return self.layers[int(np.argmax(self.scores))]

    @classmethod
    def compute(cls, harmful_states: np.ndarray, benign_states: np.ndarray) -> "SASResult":
        """`*_states`: (n, N + 1, d) last-token states of the pairs' harmful and benign sides."""
        if harmful_states.shape != benign_states.shape:
            raise SteerguardError("SAS: harmful and benign sides must have the same number of pairs")
        n, num_states, _ = harmful_states.shape
        if n < MIN_PAIRS:
            raise SteerguardError(f"SAS needs at least {MIN_PAIRS} harmful/benign pairs, got {n}")
        diffs = harmful_states.astype(np.float64) - benign_states.astype(np.float64)
        layers = list(range(1, num_states - 1))
        return cls(layers=layers, scores=[sas_score(diffs[:, l]) for l in layers], num_pairs=n)

    def save(self, folder: Path) -> None:
        (folder / "sas.json").write_text(json.dumps({**asdict(self), "best_layer": self.best_layer}, indent=1))
        self.plot(folder / "sas.png")

    @classmethod
    def load(cls, folder: Path) -> "SASResult":
        d = json.loads((folder / "sas.json").read_text())
        return cls(layers=d["layers"], scores=d["scores"], num_pairs=d["num_pairs"])

    def plot(self, path: Path, split_layer: int | None = None) -> None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        split = split_layer if split_layer is not None else self.best_layer
        fig, ax = plt.subplots(figsize=(6, 3.2), dpi=120)
        ax.plot(self.layers, self.scores, marker="o", ms=3)
        ax.axvline(split, color="tab:red", ls="--", lw=1, label=f"split layer {split}")
        ax.set_xlabel("layer l (hidden state entering decoder layer l)")
        ax.set_ylabel("SAS")
        ax.set_title(f"Safety Awareness Score ({self.num_pairs} pairs)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
