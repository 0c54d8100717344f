"""`steerguard eval`: guarded vs unguarded on harmful and benign prompt sets.

ASR = share of harmful prompts answered without a refusal string; false refusals = share of benign
prompts on which the guard fired; the base model's own refusals are reported apart. Where the guard
does not fire, the guarded answer is the unguarded one by construction (tested token for token), so
each prompt is generated once unguarded and once more only when the guard fires."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..runtime.judge import is_refusal, opens_with_refusal
from .data import PromptSet
from .guard import Guard
from .hidden import chat_ids
from .prober import auroc, tpr_at_fpr
from .refusal import end_of_turn_ids
from .state_cache import cached_hidden_states


def guard_risks(lm, guard: Guard, prompts: Sequence[str], batch_size: int = 16, progress=False) -> np.ndarray:
    """The prober's risk for each prompt, from batched prefill hidden states."""
    p = guard.prober
    hs = cached_hidden_states(lm, prompts, batch_size, progress, upto=p.layer,
                              tokens_at=p.layer if p.per_token else None)
    return p.prompt_risk(hs.feature(p.feature, p.layer))


@contextlib.contextmanager
def refusal_lm_head(model, transform: np.ndarray):
    """Swap in the refusal head as an LM head with weight W R^T ((h R) W^T = h (W R^T)^T), so batched
    `generate` can run it; the shared embedding is untouched and restored on exit."""
    original = model.lm_head
    weight = original.weight.detach() @ torch.from_numpy(transform).T
    head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    head.weight = torch.nn.Parameter(weight, requires_grad=False)
    model.lm_head = head
    try:
        yield model
    finally:
        model.lm_head = original


@torch.inference_mode()
def generate_batch(lm, prompts: Sequence[str], max_new_tokens: int = 64, batch_size: int = 16,
                   progress: bool | str = False) -> list[str]:
    """Greedy answers for many prompts, left-padded batches through `model.generate`."""
    tok = lm.tokenizer
    ids = [chat_ids(tok, p) for p in prompts]
    order = np.argsort([len(x) for x in ids], kind="stable")
    answers = [""] * len(ids)
    stop = end_of_turn_ids(tok)
    bar = tqdm(total=len(ids), desc=progress if isinstance(progress, str) else "generate", disable=not progress)
    for start in range(0, len(ids), batch_size):
        batch = order[start:start + batch_size]
        width = max(len(ids[i]) for i in batch)
        input_ids = torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, i in enumerate(batch):
            input_ids[row, width - len(ids[i]):] = torch.tensor(ids[i])
            mask[row, width - len(ids[i]):] = 1
        out = lm.model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                do_sample=False, eos_token_id=stop, pad_token_id=tok.pad_token_id)
        for row, i in enumerate(batch):
            answers[i] = tok.decode(out[row, width:], skip_special_tokens=True).strip()
        bar.update(len(batch))
    bar.close()
    return answers


@dataclass
class SetResult:
    source: str
    label: int
    prompts: list[str]
    risk: np.ndarray
    fired: np.ndarray
    unguarded: list[str]
    guarded: list[str]
    generated: bool = True
    switched: np.ndarray | None = None     # the answer guard switched the answer to the refusal head (None: off)

    def summary(self) -> dict:
        base_refused = np.array([is_refusal(a) for a in self.unguarded])
        guard_refused = np.array([is_refusal(a) for a in self.guarded])
        out = {"source": self.source, "kind": "harmful" if self.label else "benign", "n": len(self.prompts),
               "fire_rate": float(self.fired.mean()),
               "unguarded_refusal_rate": float(base_refused.mean()) if self.generated else None}
        if self.switched is not None:
            out["answer_switch_rate"] = float(self.switched.mean())
            out["refused_by_either_guard"] = float((self.fired | self.switched).mean())
        if self.label and self.generated:
            out["asr_unguarded"] = float(1 - base_refused.mean())
            out["asr_guarded"] = float(1 - guard_refused.mean())
            refusals = [a for a, f in zip(self.guarded, self.fired) if f]
            out["refusals_open_with_refusal"] = float(np.mean([opens_with_refusal(a) for a in refusals])) \
                if refusals else None
        else:
            out["false_refusal_rate"] = float(self.fired.mean())
        return out


class TorchRunner:
    """Scores and answers through transformers (the reference path)."""

    def __init__(self, lm, guard: Guard):
        self.lm, self.guard = lm, guard

    def risks(self, prompts: Sequence[str], batch_size: int = 16, progress=False) -> np.ndarray:
        return guard_risks(self.lm, self.guard, prompts, batch_size, progress)

    def answers(self, prompts: Sequence[str], steer: bool, max_new_tokens: int, batch_size: int = 16,
                progress=False) -> list[str]:
        if not steer:
            return generate_batch(self.lm, prompts, max_new_tokens, batch_size, progress)
        with refusal_lm_head(self.lm.model, self.guard.refusal.transform):
            return generate_batch(self.lm, prompts, max_new_tokens, batch_size, progress)


class BundleRunner:
    """Scores and answers through an exported bundle's engine chain (the lean runtime)."""

    def __init__(self, model):
        self.model = model

    def risks(self, prompts: Sequence[str], batch_size: int = 16, progress=False) -> np.ndarray:
        return np.array([self.model.score(p) for p in tqdm(prompts, desc=progress or "risk", disable=not progress)])

    def answers(self, prompts: Sequence[str], steer: bool, max_new_tokens: int, batch_size: int = 8,
                progress=False) -> list[str]:
        from ..runtime.sampling import Sampling

        out: list[str] = []
        s = Sampling(max_new_tokens=max_new_tokens)
        for i in tqdm(range(0, len(prompts), batch_size), desc=progress or "generate", disable=not progress):
            out += [r.text.strip() for r in self.model.generate_batch(prompts[i:i + batch_size], s, steer=steer)]
        return out

    @property
    def watches_answers(self) -> bool:
        return self.model.answer_guard.enabled

    def watched_answers(self, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 8,
                        progress=False) -> list[tuple[str, bool]]:
        """(answer, switched by the answer guard) for prompts the prompt guard passed."""
        from ..runtime.sampling import Sampling

        out: list[tuple[str, bool]] = []
        s = Sampling(max_new_tokens=max_new_tokens)
        for i in tqdm(range(0, len(prompts), batch_size), desc=progress or "watched", disable=not progress):
            out += [(r.text.strip(), r.switch == "answer") for r in self.model.generate_batch(prompts[i:i + batch_size], s)]
        return out


def evaluate(runner: TorchRunner | BundleRunner, tau: float, sets: Sequence[PromptSet], max_new_tokens: int = 64,
             generate: bool = True, progress: bool = True) -> list[SetResult]:
    results = []
    for s in sets:
        risk = runner.risks(s.prompts, progress=progress and f"risk {s.source}")
        fired = ~(risk < tau)
        unguarded = guarded = [""] * len(s.prompts)
        if generate:
            unguarded = runner.answers(s.prompts, False, max_new_tokens, progress=progress and f"unguarded {s.source}")
            guarded = list(unguarded)
            hit = [i for i in range(len(s.prompts)) if fired[i]]
            if hit:
                refusals = runner.answers([s.prompts[i] for i in hit], True, max_new_tokens,
                                          progress=progress and f"guarded {s.source}")
                for i, a in zip(hit, refusals):
                    guarded[i] = a
        switched = None
        if generate and getattr(runner, "watches_answers", False):
            # where the prompt guard passed, the answer guard may still switch the answer mid-stream
            switched = np.zeros(len(s.prompts), bool)
            passed = [i for i in range(len(s.prompts)) if not fired[i]]
            for i, (text, switch) in zip(passed, runner.watched_answers([s.prompts[i] for i in passed], max_new_tokens,
                                                                       progress=progress and f"watched {s.source}")):
                guarded[i], switched[i] = text, switch
        results.append(SetResult(s.source, s.label, s.prompts, risk, fired, unguarded, guarded, generate, switched))
    return results


def write_report(results: Sequence[SetResult], model_name: str, split_layer: int, tau: float, out: Path,
                 meta: dict, points: dict | None = None) -> dict:
    """eval.json (every prompt), summary table, report.md with risk histograms and the ROC curve; with
    `points` (name -> {"tau", held-out "fpr"/"tpr"}) each operating point read on this run, marked on the ROC."""
    from .operating import points_on_run

    out.mkdir(parents=True, exist_ok=True)
    run_points = points_on_run(results, points) if points else {}
    risk = np.concatenate([r.risk for r in results])
    labels = np.concatenate([np.full(len(r.risk), r.label) for r in results])
    sets = sorted((r.summary() for r in results), key=_worst_first)
    summary = {"model": model_name, "split_layer": split_layer, "tau": tau, "prober_auroc": auroc(risk, labels),
               "prober_tpr_at_1pct_fpr": tpr_at_fpr(risk, labels, 0.01), "sets": sets,
               "operating_points": run_points, **meta}
    rows = [{"source": r.source, "label": r.label, "prompt": p, "risk": float(k), "fired": bool(f),
             "answer_switched": None if r.switched is None else bool(r.switched[j]), "unguarded": u, "guarded": g}
            for r in results for j, (p, k, f, u, g) in enumerate(zip(r.prompts, r.risk, r.fired, r.unguarded, r.guarded))]
    (out / "eval.json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    _plots(results, tau, out, run_points)
    (out / "report.md").write_text(markdown_report(summary))
    return summary


def _worst_first(s: dict) -> tuple:
    """Harmful sets the guard catches least, then benign sets it fires on most."""
    return (s["kind"] != "harmful", s["fire_rate"] if s["kind"] == "harmful" else -s["fire_rate"])


def markdown_report(summary: dict) -> str:
    pooled = summary["prober_auroc"]
    tpr = summary.get("prober_tpr_at_1pct_fpr")
    lines = [f"# steerguard eval — {summary['model']}", "",
             f"split layer {summary['split_layer']}, tau {summary['tau']:.3f}"
             + (f" ({summary['operating_point']})" if summary.get("operating_point") else "")
             + ", prober AUROC (all sets pooled) "
             + (f"**{pooled:.3f}**, catch rate at 1% false fires {tpr:.2f}" if pooled == pooled
                else "— (needs harmful and benign sets)") + "; sets worst first", "",
             "| set | kind | n | guard fires | answer guard switches | ASR unguarded | ASR guarded | "
             "refusals open with refusal | base model refuses |", "|---|---|---|---|---|---|---|---|---|"]
    pct = lambda v: "—" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    for s in summary["sets"]:
        lines.append(f"| {s['source']} | {s['kind']} | {s['n']} | {pct(s['fire_rate'])} | "
                     f"{pct(s.get('answer_switch_rate'))} | {pct(s.get('asr_unguarded'))} | {pct(s.get('asr_guarded'))} | "
                     f"{pct(s.get('refusals_open_with_refusal'))} | {pct(s['unguarded_refusal_rate'])} |")
    if summary.get("operating_points"):
        lines += ["", "Operating points on this run (held out: what calibration recorded for the same tau)", "",
                  "| point | tau | false fires (benign) | catches (harmful) | held-out FPR | held-out TPR |",
                  "|---|---|---|---|---|---|"]
        for name, p in summary["operating_points"].items():
            chosen = p["tau"] == summary["tau"] and name in (summary.get("operating_point"), "explicit")
            lines.append(f"| {f'**{name}** (this run)' if chosen else name} | {p['tau']:.3f} | {pct(p['fpr'])} | {pct(p['tpr'])} | "
                         f"{pct(p.get('held_out_fpr'))} | {pct(p.get('held_out_tpr'))} |")
    lines += ["", "![risk histograms](risk_hist.png) ![ROC](roc.png)", ""]
    return "\n".join(lines)


def _plots(results: Sequence[SetResult], tau: float, out: Path, points: dict | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fig, ax = plt.subplots(figsize=(6.5, 3.5), dpi=120)
    bins = np.linspace(0, 1, 41)
    for r in results:
        ax.hist(np.nan_to_num(r.risk, nan=1.0), bins=bins, histtype="step", lw=1.4,
                label=f"{r.source} ({'harmful' if r.label else 'benign'})")
    ax.axvline(tau, color="k", ls="--", lw=1, label=f"tau {tau:.2f}")
    ax.set_yscale("log")
    ax.set_xlabel("risk")
    ax.set_ylabel("prompts")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "risk_hist.png")
    plt.close(fig)

    risk = np.nan_to_num(np.concatenate([r.risk for r in results]), nan=1.0)
    labels = np.concatenate([np.full(len(r.risk), r.label) for r in results])
    from .operating import plot_roc

    fpr, tpr = roc_curve(labels, risk)[:2] if len(np.unique(labels)) == 2 else ([], [])
    plot_roc(fpr, tpr, points or {}, out / "roc.png", "prober ROC (this run)", auroc(risk, labels))

