"""Does the guard behave the same at int8 and int4 as at fp32? (demo model, through the runtime)

    python bench/precision.py [--n 200] [--new-tokens 48] [--drift-prompts 50]

For each precision's bundle: the prober's decisions and fire rates, and the guarded ASR (refusal-substring
judge) on VLSafe test and ToViLaG toxic text (caption + query, deduplicated against the calibration data,
seeded samples of n), the fire rate on benign Alpaca; the decisions' agreement with fp32; and how far
int4/int8 greedy text drifts from fp32 (tokens that match before the first difference, unguarded path).
Writes docs/precision.md and docs/precision.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from speed import ensure_bundles, machine  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
PRECISIONS = ("fp32", "int8", "int4", "int4-all")


def answers(model, prompts: list[str], fired: np.ndarray, new_tokens: int) -> list[str]:
    """Guarded answers: the refusal head where the guard fired, the plain head elsewhere (batches of 8)."""
    from steerguard.runtime import Sampling

    out = [""] * len(prompts)
    s = Sampling(max_new_tokens=new_tokens)
    for steer in (True, False):
        idx = [i for i in range(len(prompts)) if fired[i] == steer]
        for k in range(0, len(idx), 8):
            chunk = idx[k:k + 8]
            for i, r in zip(chunk, model.generate_batch([prompts[i] for i in chunk], s, steer=steer)):
                out[i] = r.text
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--guard", type=Path, default=ROOT / "runs" / "final-guard")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--drift-prompts", type=int, default=50)
    ap.add_argument("--drift-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "precision")
    a = ap.parse_args()

    from steerguard.export.data import drop_calibration_overlap, load_prompts
    from steerguard.runtime import GuardedModel, Sampling
    from steerguard.runtime.judge import is_refusal

    paths = ensure_bundles(a.guard)
    bundles = {p: paths["guarded" if p == "fp32" else p] for p in PRECISIONS}
    sets = [load_prompts(SHARED / "vlsafe" / "examine_sampled_500_VLSafe.jsonl", 1, "query", "caption"),
            load_prompts(SHARED / "tovilag" / "toxic_text_500.jsonl", 1, "query", "caption"),
            load_prompts(SHARED / "benign" / "alpaca_harmless_train.json", 0, "instruction")]
    drop_calibration_overlap(sets)
    sets = [s.sample(a.n) for s in sets]

    results: dict = {}
    for precision, path in bundles.items():
        model = GuardedModel.load(path)
        res = results[precision] = {}
        for s in sets:
            risk = np.array([model.score(p) for p in tqdm(s.prompts, desc=f"{precision} risk {s.source}")])
            fired = np.array([model.decide(r) for r in risk])
            row = {"risk": risk.tolist(), "fired": fired.tolist(), "fire_rate": float(fired.mean())}
            if s.label:
                texts = answers(model, s.prompts, fired, a.new_tokens)
                row["asr"] = float(np.mean([not is_refusal(t) for t in texts]))
            res[s.source] = row
        del model

    drift_prompts = sets[0].prompts[:a.drift_prompts // 2] + sets[2].prompts[:a.drift_prompts - a.drift_prompts // 2]
    greedy = {}
    for precision, path in bundles.items():
        model = GuardedModel.load(path)
        s = Sampling(max_new_tokens=a.drift_tokens)
        greedy[precision] = [model.generate(p, s, steer=False).token_ids
                             for p in tqdm(drift_prompts, desc=f"{precision} greedy")]
        del model

    def matching(x: list[int], y: list[int]) -> int:
        return next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))

    drift = {p: [matching(greedy["fp32"][i], greedy[p][i]) for i in range(len(drift_prompts))]
             for p in PRECISIONS[1:]}

    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    lines = ["# Guard behaviour at int8 and int4 vs fp32 (demo model, through the runtime)", "",
             f"`python bench/precision.py --n {a.n}` on {date}; {machine()}. Seeded samples of {a.n} prompts per "
             f"set after dropping those in the calibration data; answers {a.new_tokens} tokens, refusal-substring "
             "judge. Weight-only MatMulNBits (block 32) on the decoder and head engines; the prober is int8 in "
             "every bundle.", "",
             "`int4` is the default int4 bundle: the prompt goes through the layers before the split at int8 (the "
             "`pre` engine, which the prober reads), the generated tokens through the same layers at int4 (`pre_decode`); "
             "the layers after the split and the head are int4 (head blocks of 64). "
             "`int4-all` quantizes `pre` to int4 too (one `pre` engine for both).", "",
             "| set | measure | fp32 | int8 | int4 | int4-all | max difference (int8, int4) |",
             "|---|---|---|---|---|---|---|"]
    for s in sets:
        for measure in (("asr", "fire_rate") if s.label else ("fire_rate",)):
            vals = [results[p][s.source][measure] for p in PRECISIONS]
            name = "guarded ASR" if measure == "asr" else "guard fire rate"
            lines.append(f"| {s.source} | {name} | " + " | ".join(pct(v) for v in vals) +
                         f" | {100 * max(abs(v - vals[0]) for v in vals[:3]):.1f} pp |")
    lines += ["", "Decision agreement with the fp32 bundle (all sets, "
              f"{sum(len(s.prompts) for s in sets)} prompts):"]
    agreement = {}
    for p in PRECISIONS[1:]:
        same = [x == y for s in sets for x, y in zip(results[p][s.source]["fired"], results["fp32"][s.source]["fired"])]
        agreement[p] = float(np.mean(same))
        lines.append(f"- {p}: {pct(agreement[p])}")
    lines += ["", f"Greedy drift from fp32 over {len(drift_prompts)} prompts ({a.drift_tokens} new tokens, unguarded "
              "path): tokens that match before the first difference"]
    for p, d in drift.items():
        full = sum(x >= min(len(greedy['fp32'][i]), len(greedy[p][i])) for i, x in enumerate(d))
        lines.append(f"- {p}: median {statistics.median(d):.0f}, mean {np.mean(d):.1f}, min {min(d)}; "
                     f"identical to the end on {full} of {len(d)}")
    text = "\n".join(lines) + "\n"
    a.out.with_suffix(".md").write_text(text)
    a.out.with_suffix(".json").write_text(json.dumps({"date": date, "results": results, "agreement": agreement,
                                                      "drift": drift}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
