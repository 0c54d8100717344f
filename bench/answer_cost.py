"""What the answer guard costs: decode tokens/s and first-token time with it on and off, same bundle, alternating runs.

Each run answers the same benign prompt greedily for a fixed number of tokens (`ignore_eos`), with the answer guard
on at the bundle's balanced point (hold 0) or off; the pairs alternate so the machine's drift falls on both. A run
in which the answer guard switched would do different work: it is reported and left out.

    python bench/answer_cost.py BUNDLE [BUNDLE ...] [--runs 7] [--tokens 128] [--out docs/answer_guard_cost.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

from steerguard.runtime import GuardedModel, Sampling

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def measure(bundle: Path, runs: int, tokens: int, threads: int | None) -> dict:
    model = GuardedModel.load(bundle, threads=threads)
    if model.answer_guard.score is None:
        raise SystemExit(f"{bundle} has no answer guard: export it from a guard calibrated with one")
    s = Sampling(max_new_tokens=tokens, ignore_eos=True)
    model.set_answer_guard(enabled=True, hold=0)
    model.generate(PROMPT, s)      # warm up both paths once
    model.set_answer_guard(enabled=False)
    model.generate(PROMPT, s)
    seen: dict[str, dict[str, list[float]]] = {"on": {"tok_s": [], "first_ms": []}, "off": {"tok_s": [], "first_ms": []}}
    switched = 0
    for _ in range(runs):
        for setting in ("on", "off"):
            model.set_answer_guard(enabled=setting == "on")
            r = model.generate(PROMPT, s)
            if r.switch == "answer":
                switched += 1
                continue
            seen[setting]["tok_s"].append(r.timings["decode_tok_s"])
            seen[setting]["first_ms"].append(1000 * r.timings["first_token_s"])
    med = {k: {m: statistics.median(v) for m, v in d.items()} for k, d in seen.items()}
    pairs = [a / b for a, b in zip(seen["on"]["tok_s"], seen["off"]["tok_s"])]
    return {"bundle": str(bundle), "precision": model.manifest.data["precision"], "tokens": tokens, "runs": runs,
            "answer_score": str(model.answer_guard.score), "answer_tau": model.answer_guard.tau,
            "runs_switched": switched, "median": med,
            "decode_ratio_on_over_off": med["on"]["tok_s"] / med["off"]["tok_s"],
            "decode_ratio_median_of_pairs": statistics.median(pairs),
            "first_token_ratio_on_over_off": med["on"]["first_ms"] / med["off"]["first_ms"],
            "guard_work_us_per_token": guard_work_us(model), "raw": seen}


def guard_work_us(model: GuardedModel, tokens: int = 20000) -> float:
    """What the answer guard adds to a decode step on the host, timed alone: reading the step's answer risk and
    pushing it into the running score (the engines compute `answer_risk` whether the guard is on or off)."""
    from steerguard.runtime.answer import AnswerWatch

    watch = AnswerWatch(model.answer_guard.score, 2.0)     # a tau it never reaches
    risks = [0.1] * tokens
    t = time.perf_counter()
    for r in risks:
        watch.push(r)
    return 1e6 * (time.perf_counter() - t) / tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="+", type=Path)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("docs/answer_guard_cost.json"))
    a = ap.parse_args()
    rows = [measure(b, a.runs, a.tokens, a.threads) for b in a.bundles]
    meta = {"machine": platform.node(), "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M"),
            "command": "python bench/answer_cost.py " + " ".join(str(b) for b in a.bundles)
                       + f" --runs {a.runs} --tokens {a.tokens}"}
    a.out.write_text(json.dumps({**meta, "rows": rows}, indent=1))
    print("| bundle | precision | decode tok/s on | off | on / off (medians) | median of paired ratios | "
          "first token ms on | off | on / off | guard's host work per token |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        m = r["median"]
        print(f"| {Path(r['bundle']).name} | {r['precision']} | {m['on']['tok_s']:.1f} | {m['off']['tok_s']:.1f} | "
              f"{r['decode_ratio_on_over_off']:.3f} | {r['decode_ratio_median_of_pairs']:.3f} | "
              f"{m['on']['first_ms']:.1f} | {m['off']['first_ms']:.1f} | {r['first_token_ratio_on_over_off']:.3f} | "
              f"{r['guard_work_us_per_token']:.1f} us |")


if __name__ == "__main__":
    main()
