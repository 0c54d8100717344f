"""Operating points on the export side: the threshold at a false-fire rate, the ROC plot with the named thresholds marked (a bundle's
report/roc.png, from calibration's held-out ROC) and the points read on an evaluation run's own risks
(`steerguard eval`). The runtime reads the table itself from the manifest (runtime/model.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

MARKERS = {"strict": "v", "balanced": "o", "permissive": "^"}


def plot_roc(fpr: Sequence[float], tpr: Sequence[float], points: dict[str, dict], path: Path, title: str,
             auroc: float | None = None, chosen: float | None = None) -> Path:
    """A ROC curve with each operating point (name -> {"tau", "fpr", "tpr"}) marked and labelled; `chosen`,
    a tau that is none of them, is marked as well (its "fpr"/"tpr" in points["(chosen)"])."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 4.0), dpi=120)
    if len(fpr):
        ax.plot(fpr, tpr, lw=1.5, label=f"AUROC {auroc:.3f}" if auroc is not None and auroc == auroc else None)
    ax.plot([0, 1], [0, 1], color="0.7", ls=":")
    for name, p in points.items():
        if p.get("fpr") is None or p.get("tpr") is None:
            continue
        ax.plot([p["fpr"]], [p["tpr"]], MARKERS.get(name, "s"), ms=7,
                label=f"{name}: tau {p['tau']:.3f} (FPR {100 * p['fpr']:.1f}%, TPR {100 * p['tpr']:.1f}%)")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("false fire rate (benign)")
    ax.set_ylabel("fire rate on harmful")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def points_on_run(results, points: dict[str, dict]) -> dict[str, dict]:
    """Each operating point (name -> {"tau", "fpr"?, "tpr"?}) read on an evaluation run: its fire rate on every
    set and the pooled false fire rate (benign sets) and catch rate (harmful sets), NaN risks firing; beside
    them the held-out FPR/TPR calibration recorded for it (None for an explicit tau)."""
    out = {}
    for name, p in points.items():
        tau = p["tau"]
        fired = {r.source: ~(np.asarray(r.risk) < tau) for r in results}
        benign = [f for r in results if not r.label for f in fired[r.source]]
        harmful = [f for r in results if r.label for f in fired[r.source]]
        out[name] = {"tau": float(tau), "fpr": float(np.mean(benign)) if benign else None,
                     "tpr": float(np.mean(harmful)) if harmful else None,
                     "fire_rates": {s: float(f.mean()) for s, f in fired.items() if len(f)},
                     "held_out_fpr": p.get("fpr"), "held_out_tpr": p.get("tpr")}
    return out


def tau_at_fpr(risk: np.ndarray, labels: np.ndarray, sources: np.ndarray, fpr: float) -> float:
    """The lowest threshold at which the benign sources' mean fire rate (`risk >= tau`) is at most `fpr`: a
    large benign source cannot hide a small one's false fires. NaN risks count as firing."""
    risk = np.nan_to_num(np.asarray(risk, np.float64), nan=np.inf)
    benign = [np.sort(risk[(labels == 0) & (sources == s)]) for s in np.unique(sources[labels == 0])]
    if not benign:
        return 0.5
    candidates = np.unique(np.concatenate([risk[np.isfinite(risk)], [0.0, 1.0]]))
    rates = np.mean([len(b) - np.searchsorted(b, candidates, "left") for b in benign] /
                    np.array([len(b) for b in benign])[:, None], axis=0)
    ok = np.nonzero(rates <= fpr)[0]
    return float(candidates[ok[0]]) if len(ok) else float(np.nextafter(np.float32(1.0), np.float32(2.0)))
