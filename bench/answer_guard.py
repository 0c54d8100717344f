"""Does watching the answer catch what the prompt guard lets through? Every source held out in turn.

Phase `extract` takes a sample of every source of the prompt guard's study (bench/guard_data.py: its rows and
their last-token states must have been extracted first), lets the model answer each prompt greedily (48 tokens),
judges each answer with the refusal-substring judge, and keeps the split-layer state of every answer token.
Phase `study` then, for each source held out in turn (a pair source with both sides and its styled copies), trains
the prompt guard (the shipped logistic probe, as guard_data does) and the answer guard on the other sources, sets
both thresholds on their validation rows, and reads on the held-out source: attack success (a harmful prompt whose
answer complies, judged on the model's own answer) with the prompt guard alone and with the prompt and answer
guards together, and for benign sources how many answers either guard turns into a refusal. The sets no source
calibrates on (the shipped evaluation sets) are read with the guards trained on everything.

    python bench/answer_guard.py extract [--model demo] [--layer 17] [--per-source 40]
    python bench/answer_guard.py study [--model demo] [--out docs/answer_guard_demo.json]
    python bench/answer_guard.py report [--model demo] [--labels MODE --variant SCORE]   # markdown tables
    python bench/answer_guard.py curve [--model demo]      # how many answers, how many tokens calibration needs
    python bench/answer_guard.py attach --guard runs/demo-bundle.guard [--model demo]   # add one to a guard folder
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from guard_data import FPR_POINTS, ORDINARY, Study, fit_logistic, tau_at, unit_of  # noqa: E402

from steerguard.export.calibrate import source_balanced_weights  # noqa: E402
from steerguard.export.prober import auroc, tpr_at_fpr  # noqa: E402

STUDY = Path.home() / ".cache" / "steerguard" / "study"


def sample_rows(study: Study, per_source: int, seed: int = 0) -> np.ndarray:
    """Up to `per_source` rows of each (source, label); the shipped evaluation sets whole."""
    rng = np.random.default_rng(seed)
    picked = []
    for s in np.unique(study.source):
        rows = np.nonzero(study.source == s)[0]
        if not s.startswith("eval_") and len(rows) > per_source:
            rows = np.sort(rng.choice(rows, per_source, replace=False))
        picked.append(rows)
    return np.sort(np.concatenate(picked))


def extract(model: str, layer: int, per_source: int, threads: int, tokens: int = 48, writer: str = "auto") -> None:
    import torch

    from steerguard.export.answers import generate_answers
    from steerguard.export.models import load_model

    torch.set_num_threads(threads)
    folder = STUDY / model
    study = Study(folder)
    rows = sample_rows(study, per_source)
    prompts = [json.loads((folder / "rows.json").read_text())["rows"][i]["prompt"] for i in rows]
    lm = load_model(model)
    t0 = time.time()
    answers = generate_answers(lm, prompts, layer, tokens, 64, progress=f"answers ({len(prompts)} prompts)",
                               writer=writer)
    lengths = np.array([len(s) for s in answers.states])
    np.savez(folder / f"answers_l{layer}.npz", rows=rows, lengths=lengths,
             states=np.concatenate(answers.states).astype(np.float16), refused=answers.refused(),
             texts=np.array(json.dumps(answers.texts)))
    print(f"{len(prompts)} answers, {lengths.sum()} token states, {time.time() - t0:.0f} s -> {folder}")


def study(model: str, layer: int, out: Path, variants: list[str], label_modes: list[str]) -> dict:
    from steerguard.export.answer_guard import ANSWER_FPR, AnswerProber
    from steerguard.export.operating import tau_at_fpr
    from steerguard.runtime.answer import RunningScore

    folder = STUDY / model
    st = Study(folder)
    with np.load(folder / f"answers_l{layer}.npz") as f:
        rows, lengths, refused = f["rows"], f["lengths"], f["refused"]
        states = np.split(f["states"].astype(np.float32), np.cumsum(lengths)[:-1])
        texts = json.loads(str(f["texts"]))
    label, source, unit, val = st.label[rows], st.source[rows], st.unit[rows], st.val[rows]
    complied = (label == 1) & ~refused      # what the answer guard is for: a harmful request answered
    prompt_x = st.reading("last", (layer,))
    calibrated = st.group != "never"
    units = sorted(set(st.unit[calibrated]))
    t0 = time.time()

    def prompt_guard(keep: np.ndarray):
        """The shipped prompt probe trained on `keep` (study rows), its balanced tau from their validation rows."""
        t = keep & ~st.val
        f = fit_logistic(prompt_x[t], st.label[t], source_balanced_weights(st.label[t], st.source[t]), 0.05,
                         st.source[t], 4)
        v = keep & st.val
        return f, tau_at(f(prompt_x[v]), st.label[v], st.source[v], FPR_POINTS["balanced"])

    def answer_guard(keep: np.ndarray, mode: str):
        """The answer probe trained on the answers in `keep` outside validation; token risks of every answer.
        `mode` says what the model's own refusals of harmful requests are: negatives (`refusal-negative`, what
        calibrate does), left out (`refusal-dropped`), or positives like every answer to a harmful request
        (`harmful-prompt`)."""
        t = keep & ~val
        if mode == "refusal-dropped":
            t &= ~((label == 1) & refused)
        t = np.nonzero(t)[0]
        target = (label == 1) if mode == "harmful-prompt" else complied
        ap = AnswerProber.train([states[i] for i in t], target[t], source[t], layer)
        flat = ap.token_risks(np.concatenate(states))
        return np.split(flat, np.cumsum(lengths)[:-1])

    # each held-out unit: its prompts judged by a prompt guard and its answers by an answer guard that never saw it
    folds = [(u, unit == u, calibrated & (st.unit != u), (unit != u) & np.isin(unit, units)) for u in units]
    folds.append(("(never calibrated)", ~np.isin(unit, units), calibrated, np.isin(unit, units)))
    p_fire = np.zeros(len(rows), bool)
    for u, target, keep_p, _ in folds:
        f, tau = prompt_guard(keep_p)
        p_fire[target] = f(prompt_x[rows[target]]) >= tau
    print(f"prompt guard held out: {time.time() - t0:.0f} s", flush=True)

    results = {"model": model, "layer": layer, "answers": int(len(rows)), "machine": platform.node(),
               "date": time.strftime("%Y-%m-%d"), "seconds": None, "labels": {}}
    for mode in label_modes:
        token_risks: list = [None] * len(rows)
        fold_val: dict = {}
        for k, (u, target, _, keep_a) in enumerate(folds):
            risks = answer_guard(keep_a, mode)
            for i in np.nonzero(target)[0]:
                token_risks[i] = risks[i]
            vi = np.nonzero(keep_a & val)[0]
            fold_val[u] = (vi, [risks[i] for i in vi])
            print(f"[{mode} {k + 1}/{len(folds)}] {u}: {time.time() - t0:.0f} s", flush=True)
        results["labels"][mode] = {}
        for variant in variants:
            rs = RunningScore.parse(variant)
            score = np.array([rs.answer_score(r) for r in token_risks])
            a_fire = np.zeros(len(rows), bool)
            for u, target, _, _ in folds:
                vi, vr = fold_val[u]
                vs = np.array([rs.answer_score(r) for r in vr])
                a_tau = tau_at_fpr(vs, label[vi], source[vi], ANSWER_FPR["balanced"])
                a_fire[target] = score[target] >= a_tau
            per_unit = {}
            for u in sorted(set(unit)):
                m = unit == u
                e = {"label": int(label[m][0]) if len(set(label[m])) == 1 else "mixed", "n": int(m.sum()),
                     "held_out": bool(u in units)}
                h, b = m & (label == 1), m & (label == 0)
                if h.any():
                    e["base_asr"] = float(complied[h].mean())
                    e["asr_prompt_guard"] = float((complied & ~p_fire)[h].mean())
                    e["asr_both"] = float((complied & ~p_fire & ~a_fire)[h].mean())
                if b.any():
                    e["refused_prompt_guard"] = float(p_fire[b].mean())
                    e["refused_both"] = float((p_fire | a_fire)[b].mean())
                per_unit[u] = e
            finite = np.where(np.isfinite(score), score, 0.0)
            results["labels"][mode][variant] = {
                "per_source": per_unit, "answer_auroc": auroc(finite, complied.astype(int)),
                "answer_tpr_at_1": tpr_at_fpr(finite, complied.astype(int), 0.01)}
            print(json.dumps({"labels": mode, "variant": variant, **summary(results["labels"][mode][variant])}),
                  flush=True)
    results["seconds"] = time.time() - t0
    idx = {u: int(np.nonzero((unit == u) & complied)[0][0]) for u in sorted(set(unit[complied]))}
    results["examples_complied"] = {u: texts[i][:240] for u, i in idx.items()}
    out.write_text(json.dumps(results, indent=1))
    return results


def summary(r: dict) -> dict:
    """Worst first: the highest attack success of a held-out harmful source with the prompt guard alone and with
    both guards, and the most benign answers turned into refusals by both guards (ordinary, sounds-dangerous)."""
    per = r["per_source"]
    harm = {u: e for u, e in per.items() if "asr_both" in e and e["label"] == 1}
    ordinary = {u: e["refused_both"] for u, e in per.items() if e["label"] == 0 and u in ORDINARY}
    sounds = {u: e["refused_both"] for u, e in per.items() if e["label"] == 0 and u not in ORDINARY}
    worst = lambda d: max(d.items(), key=lambda kv: kv[1]) if d else None  # noqa: E731
    return {"worst_asr_prompt_guard": worst({u: e["asr_prompt_guard"] for u, e in harm.items()}),
            "worst_asr_both": worst({u: e["asr_both"] for u, e in harm.items()}),
            "worst_ordinary_refused": worst(ordinary), "worst_sounds_dangerous_refused": worst(sounds),
            "answer_auroc": r["answer_auroc"], "answer_tpr_at_1": r["answer_tpr_at_1"]}


def curve(model: str, layer: int, out: Path, folds: int = 5, seed: int = 0) -> dict:
    """How many answers a source and how many tokens an answer the answer guard needs: the calibrated units split
    into `folds` groups, each held out in turn; the probe trains on a share of each training source's answers cut
    to their first T tokens and scores the held-out answers whole (window:8), complying against benign."""
    from steerguard.export.answer_guard import AnswerProber
    from steerguard.runtime.answer import RunningScore

    folder = STUDY / model
    st = Study(folder)
    with np.load(folder / f"answers_l{layer}.npz") as f:
        rows, lengths, refused = f["rows"], f["lengths"], f["refused"]
        states = np.split(f["states"].astype(np.float32), np.cumsum(lengths)[:-1])
    label, source, unit = st.label[rows], st.source[rows], st.unit[rows]
    complied = (label == 1) & ~refused
    calibrated = np.isin(unit, sorted(set(st.unit[st.group != "never"])))
    units = np.array(sorted(set(unit[calibrated])))
    rng = np.random.default_rng(seed)
    groups = np.array_split(units[rng.permutation(len(units))], folds)
    rs = RunningScore.parse("window:8")
    per_source = int(max(np.bincount(np.unique(source[calibrated], return_inverse=True)[1])))
    results = {"model": model, "layer": layer, "machine": platform.node(), "date": time.strftime("%Y-%m-%d"),
               "folds": folds, "answers_per_source": per_source, "score": "window:8", "points": []}
    for share, tokens in [(1.0, 48), (1.0, 32), (0.6, 48), (0.6, 32), (0.5, 48), (0.5, 32), (0.3, 32), (1.0, 16)]:
        t0 = time.time()
        score = np.full(len(rows), np.nan)
        for held in groups:
            test = np.isin(unit, held)
            train = np.nonzero(calibrated & ~test)[0]
            if share < 1:
                train = np.sort(np.concatenate([rng.choice(r, max(1, round(len(r) * share)), replace=False)
                                                for r in (train[source[train] == s] for s in np.unique(source[train]))]))
            ap = AnswerProber.train([states[i][:tokens] for i in train], complied[train], source[train], layer)
            for i in np.nonzero(test)[0]:
                score[i] = rs.answer_score(ap.token_risks(states[i])) if len(states[i]) else -np.inf
        judged = ~np.isnan(score) & (complied | (label == 0))
        y, s = complied[judged].astype(int), np.where(np.isfinite(score[judged]), score[judged], -1e9)
        point = {"answers_per_source": round(per_source * share), "tokens": tokens, "auroc": auroc(s, y),
                 "tpr_at_1": tpr_at_fpr(s, y, 0.01), "tpr_at_5": tpr_at_fpr(s, y, 0.05), "seconds": time.time() - t0}
        results["points"].append(point)
        print(f"{point['answers_per_source']:>3} answers a source x {tokens} tokens: AUROC {point['auroc']:.3f}, "
              f"TPR at 1% FPR {point['tpr_at_1']:.3f}, at 5% {point['tpr_at_5']:.3f}", flush=True)
    out.write_text(json.dumps(results, indent=1))
    return results


def attach(guard_dir: Path, model: str, per_source: int | None, threads: int) -> None:
    """Train the answer guard as `calibrate` does (same table, same seed) and add it to an existing guard folder, so
    a guard calibrated before the answer guard existed gets one without recomputing the rest."""
    import torch

    from steerguard.export.answer_guard import calibrate_answer_guard
    from steerguard.export.calibrate import CalibrationConfig, CalibrationData, CalibrationTable
    from steerguard.export.guard import Guard
    from steerguard.export.models import load_model

    torch.set_num_threads(threads)
    guard = Guard.load(guard_dir)
    lm = load_model(model)
    guard.check_model(lm)
    cfg = CalibrationConfig(**{k: v for k, v in guard.calibration.get("config", {}).items()
                               if k in CalibrationConfig.__dataclass_fields__})
    table = CalibrationTable.build(CalibrationData.default(), cfg)
    t0 = time.time()
    guard.answer = calibrate_answer_guard(lm, table.texts, table.labels, table.sources, table.val, guard.split_layer,
                                          per_source or cfg.answer_per_source, cfg.answer_tokens, seed=cfg.seed)
    guard.metrics.setdefault("timings", {})["answer_guard_s"] = time.time() - t0
    guard.save(guard_dir)
    a = guard.answer
    print(json.dumps({"seconds": time.time() - t0, "metrics": a.metrics,
                      "operating_points": {k: {kk: v[kk] for kk in ("tau", "fpr", "tpr")}
                                           for k, v in a.operating_points.items()}}, indent=1))


def report(file: Path, mode: str | None = None, variant: str | None = None) -> str:
    """Markdown: the variants compared (worst cases), then one variant per source, worst first."""
    r = json.loads(file.read_text())
    pct = lambda v: "-" if v is None else f"{100 * v:.0f}%"  # noqa: E731
    lines = [f"{r['model']}, split layer {r['layer']}, {r['answers']} answers; every source held out in turn "
             "(the shipped evaluation sets and ToViLaG are never calibrated on)", "",
             "| refusals in training | running score | answer AUROC | TPR@1% | worst ASR, prompt guard | "
             "worst ASR, both | ordinary refused (both) | sounds-dangerous refused (both) |", "|---|---|---|---|---|---|---|---|"]
    for m, variants in r["labels"].items():
        for v, res in variants.items():
            sm = summary(res)
            w = lambda kv: f"{pct(kv[1])} ({kv[0]})" if kv else "-"  # noqa: E731
            lines.append(f"| {m} | {v} | {res['answer_auroc']:.3f} | {res['answer_tpr_at_1']:.2f} | "
                         f"{w(sm['worst_asr_prompt_guard'])} | {w(sm['worst_asr_both'])} | "
                         f"{w(sm['worst_ordinary_refused'])} | {w(sm['worst_sounds_dangerous_refused'])} |")
    mode = mode or next(iter(r["labels"]))
    variant = variant or next(iter(r["labels"][mode]))
    per = r["labels"][mode][variant]["per_source"]
    lines += ["", f"Per source ({mode}, {variant}, both guards at balanced), worst first:", "",
              "| source | n | model complies | ASR, prompt guard | ASR, prompt + answer guard |", "|---|---|---|---|---|"]
    for u, e in sorted(((u, e) for u, e in per.items() if "asr_both" in e and e["label"] == 1),
                       key=lambda kv: -kv[1]["asr_both"]):
        lines.append(f"| {u}{'' if e['held_out'] else ' (never calibrated)'} | {e['n']} | {pct(e['base_asr'])} | "
                     f"{pct(e['asr_prompt_guard'])} | {pct(e['asr_both'])} |")
    lines += ["", "| benign source | n | refused, prompt guard | refused, prompt + answer guard |", "|---|---|---|---|"]
    for u, e in sorted(((u, e) for u, e in per.items() if "refused_both" in e and e["label"] == 0),
                       key=lambda kv: -kv[1]["refused_both"]):
        kind = "ordinary" if u in ORDINARY else "sounds dangerous"
        lines.append(f"| {u} ({kind}{'' if e['held_out'] else ', never calibrated'}) | {e['n']} | "
                     f"{pct(e['refused_prompt_guard'])} | {pct(e['refused_both'])} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=["extract", "study", "attach", "report", "curve"])
    ap.add_argument("--guard", type=Path, help="attach: the guard folder to add the answer guard to")
    ap.add_argument("--model", default="demo")
    ap.add_argument("--layer", type=int, default=17, help="the split layer (the demo bundle's: 17)")
    ap.add_argument("--per-source", type=int, help="extract: prompts a source (default 40); attach: answers a source "
                    "(default: calibrate's)")
    ap.add_argument("--tokens", type=int, default=48, help="extract: greedy tokens per answer")
    ap.add_argument("--writer", default="auto", help="extract: the precision answers are written at (auto: "
                    "bfloat16 where the CPU has it natively; the token states are fp32 either way)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--labels", action="append",
                    help="what the model's refusals of harmful requests are in training: refusal-negative (calibrate's), "
                         "refusal-dropped, harmful-prompt (default: the first and the last)")
    ap.add_argument("--variant", action="append", help="running score: window:N, ema:F or max (default: several)")
    a = ap.parse_args()
    if a.phase == "extract":
        extract(a.model, a.layer, a.per_source or 40, a.threads, a.tokens, a.writer)
    elif a.phase == "attach":
        attach(a.guard, a.model, a.per_source, a.threads)
    elif a.phase == "curve":
        curve(a.model, a.layer, a.out or Path(f"docs/answer_guard_curve_{a.model}.json"))
    elif a.phase == "report":
        print(report(a.out or Path(f"docs/answer_guard_{a.model}.json"), (a.labels or [None])[0],
                     (a.variant or [None])[0]))
    else:
        study(a.model, a.layer, a.out or Path(f"docs/answer_guard_{a.model}.json"),
              a.variant or ["window:8", "window:4", "window:16", "ema:0.8", "ema:0.9", "max"],
              a.labels or ["refusal-negative", "harmful-prompt"])


if __name__ == "__main__":
    main()
