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


def extract(model: str, layer: int, per_source: int, threads: int) -> None:
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
    answers = generate_answers(lm, prompts, layer, 48, 64, progress=f"answers ({len(prompts)} prompts)")
    lengths = np.array([len(s) for s in answers.states])
    np.savez(folder / f"answers_l{layer}.npz", rows=rows, lengths=lengths,
             states=np.concatenate(answers.states).astype(np.float16), refused=answers.refused(),
             texts=np.array(json.dumps(answers.texts)))
    print(f"{len(prompts)} answers, {lengths.sum()} token states, {time.time() - t0:.0f} s -> {folder}")


def study(model: str, layer: int, out: Path, variants: list[str]) -> dict:
    global ANSWER_FPR, AnswerProber, score_answers
    from steerguard.export.answer_guard import ANSWER_FPR, AnswerProber, score_answers

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
    results = {"model": model, "layer": layer, "answers": int(len(rows)), "machine": platform.node(),
               "date": time.strftime("%Y-%m-%d"), "base_complied": {}, "variants": {}}
    for u in sorted(set(unit[label == 1])):
        results["base_complied"][u] = float(complied[(unit == u) & (label == 1)].mean())
    for variant in variants:
        results["variants"][variant] = run_variant(st, prompt_x, calibrated, rows, label, source, unit, val,
                                                   complied, states, variant)
        print(json.dumps(summary(results["variants"][variant]) | {"variant": variant}))
    results["examples"] = {u: texts[int(np.nonzero(unit == u)[0][0])][:200] for u in sorted(set(unit))}
    out.write_text(json.dumps(results, indent=1))
    return results


def run_variant(st, prompt_x, calibrated, rows, label, source, unit, val, complied, states, variant: str) -> dict:
    score_kind = variant
    held: dict = {}
    units = sorted(set(st.unit[calibrated]))

    def train(keep_prompts: np.ndarray, keep_answers: np.ndarray):
        t = keep_prompts & ~st.val
        w = source_balanced_weights(st.label[t], st.source[t])
        f = fit_logistic(prompt_x[t], st.label[t], w, 0.05, st.source[t], 4)
        v = keep_prompts & st.val
        tau = tau_at(f(prompt_x[v]), st.label[v], st.source[v], FPR_POINTS["balanced"])
        ta, va = keep_answers & ~val, keep_answers & val
        ap = AnswerProber.train([states[i] for i in np.nonzero(ta)[0]], complied[ta], source[ta])
        a_val = score_answers(ap, [states[i] for i in np.nonzero(va)[0]], score_kind)
        a_tau = tau_at(a_val, complied[va].astype(int), source[va], ANSWER_FPR["balanced"])
        return f, tau, ap, a_tau

    def read(f, tau, ap, a_tau, mask_answers) -> dict:
        idx = np.nonzero(mask_answers)[0]
        p_fire = f(prompt_x[rows[idx]]) >= tau
        a_score = score_answers(ap, [states[i] for i in idx], score_kind)
        a_fire = a_score >= a_tau
        y = label[idx]
        entry = {"label": int(y[0]) if len(set(y)) == 1 else "mixed", "n": int(len(idx))}
        if (y == 1).any():
            h = y == 1
            entry["asr_prompt_guard"] = float((complied[idx][h] & ~p_fire[h]).mean())
            entry["asr_both"] = float((complied[idx][h] & ~p_fire[h] & ~a_fire[h]).mean())
            entry["answer_auroc_on_complied"] = auroc(a_score[h], complied[idx][h].astype(int)) \
                if 0 < complied[idx][h].sum() < h.sum() else None
        if (y == 0).any():
            b = y == 0
            entry["refused_prompt_guard"] = float(p_fire[b].mean())
            entry["refused_both"] = float((p_fire[b] | a_fire[b]).mean())
        entry["_scores"] = (a_score, complied[idx], y)
        return entry

    for u in units:
        f, tau, ap, a_tau = train(calibrated & (st.unit != u), (unit != u) & np.isin(unit, units))
        held[u] = read(f, tau, ap, a_tau, unit == u)
    f, tau, ap, a_tau = train(calibrated, np.isin(unit, units))
    never = {u: read(f, tau, ap, a_tau, unit == u) for u in sorted(set(unit) - set(units))}
    scores = [e.pop("_scores") for e in list(held.values()) + list(never.values())]
    s = np.concatenate([x[0] for x in scores])
    c = np.concatenate([x[1] for x in scores]).astype(int)
    return {"score": variant, "held_out": held, "never_calibrated": never,
            "answer_auroc_complied_vs_rest": auroc(s, c), "answer_tpr_at_1": tpr_at_fpr(s, c, 0.01)}


def summary(r: dict) -> dict:
    both = {**r["held_out"], **r["never_calibrated"]}
    harm = {u: (e["asr_prompt_guard"], e["asr_both"]) for u, e in both.items() if "asr_both" in e and e["label"] == 1}
    ordinary = {u: e["refused_both"] for u, e in both.items() if e["label"] == 0 and u in ORDINARY}
    sounds = {u: e["refused_both"] for u, e in both.items() if e["label"] == 0 and u not in ORDINARY}
    worst_p = max(harm.items(), key=lambda kv: kv[1][0])
    worst_b = max(harm.items(), key=lambda kv: kv[1][1])
    return {"worst_asr_prompt_guard": worst_p, "worst_asr_both": worst_b,
            "worst_ordinary_refused": max(ordinary.items(), key=lambda kv: kv[1]),
            "worst_sounds_dangerous_refused": max(sounds.items(), key=lambda kv: kv[1]),
            "auroc": r["answer_auroc_complied_vs_rest"], "tpr_at_1": r["answer_tpr_at_1"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=["extract", "study"])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--layer", type=int, default=17, help="the split layer (the demo bundle's: 17)")
    ap.add_argument("--per-source", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--variant", action="append", help="running score: window:N, decay:F, mean (default: several)")
    a = ap.parse_args()
    if a.phase == "extract":
        extract(a.model, a.layer, a.per_source, a.threads)
    else:
        study(a.model, a.layer, a.out or Path(f"docs/answer_guard_{a.model}.json"),
              a.variant or ["window:8", "window:4", "window:16", "decay:0.9", "decay:0.7"])


if __name__ == "__main__":
    main()
