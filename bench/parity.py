"""Parity of the exported engine chain with the PyTorch reference on the demo model.

    python bench/parity.py [--guard runs/final-guard] [--n 100] [--new-tokens 48]

n VLSafe test prompts (caption + query) and n benign Alpaca prompts (seeded samples from ../shared/data):
greedy tokens of the fp32 bundle vs ReferenceGuard (the guard on, so fired prompts go through the refusal
head on both sides), |risk_onnx - risk_torch| with the fp32 prober, and the int8 prober's decisions vs
fp32's. Writes docs/parity.md and docs/parity.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from speed import BUNDLES, ensure_bundles, machine  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--guard", type=Path, default=ROOT / "runs" / "final-guard")
    ap.add_argument("--n", type=int, default=100, help="prompts per set")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "parity")
    a = ap.parse_args()

    import torch

    from steerguard.export.bundle import export_bundle
    from steerguard.export.data import load_prompts
    from steerguard.export.guard import Guard
    from steerguard.export.models import load_model
    from steerguard.export.reference import ReferenceGuard
    from steerguard.runtime.model import GuardedModel
    from steerguard.runtime.sampling import Sampling

    torch.set_num_threads(2)
    int8_bundle = ensure_bundles(a.guard)["guarded"]
    fp32_bundle = BUNDLES / "demo-guarded-fp32"
    lm = load_model("demo")
    guard = Guard.load(a.guard)
    if not (fp32_bundle / "manifest.json").exists():
        export_bundle(lm, guard, fp32_bundle, prober_precision="fp32")
    sets = [load_prompts(SHARED / "vlsafe" / "examine_sampled_500_VLSafe.jsonl", 1, "query", "caption").sample(a.n),
            load_prompts(SHARED / "benign" / "alpaca_harmless_train.json", 0, "instruction").sample(a.n)]

    ref = ReferenceGuard(lm, guard)
    fp32, int8 = GuardedModel.load(fp32_bundle, threads=2), GuardedModel.load(int8_bundle, threads=2)
    s = Sampling(max_new_tokens=a.new_tokens)
    rows = []
    for ps in sets:
        for prompt in tqdm(ps.prompts, desc=ps.source):
            r = ref.generate(prompt, s)
            o = fp32.generate(prompt, s)
            q_risk = int8.score(prompt)
            same = r.token_ids == o.token_ids
            first_diff = next((i for i, (x, y) in enumerate(zip(r.token_ids, o.token_ids)) if x != y),
                              min(len(r.token_ids), len(o.token_ids)))
            rows.append({"set": ps.source, "prompt": prompt, "identical": same, "first_difference": None if same
                         else first_diff, "risk_torch": r.risk, "risk_onnx": o.risk, "risk_int8": q_risk,
                         "fired_torch": r.fired, "fired_onnx": o.fired, "fired_int8": int8.decide(q_risk)})
    identical = np.mean([x["identical"] for x in rows])
    risk_diff = max(abs(x["risk_onnx"] - x["risk_torch"]) for x in rows)
    agree = np.mean([x["fired_int8"] == x["fired_onnx"] for x in rows])
    int8_diff = max(abs(x["risk_int8"] - x["risk_onnx"]) for x in rows)
    fired = np.mean([x["fired_onnx"] for x in rows])
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    text = "\n".join([
        "# Parity: exported engine chain vs the PyTorch reference (demo model)", "",
        f"`python bench/parity.py --n {a.n} --new-tokens {a.new_tokens}` on {date}; {machine()}.",
        f"{len(rows)} prompts ({a.n} VLSafe test caption+query, {a.n} Alpaca), greedy, {a.new_tokens} new tokens, "
        f"guard on (it fired on {100 * fired:.0f}% of them; those decode through the refusal head on both sides).", "",
        "| check | result | target |", "|---|---|---|",
        f"| greedy tokens identical, fp32 bundle vs reference | {100 * identical:.1f}% | >= 99% |",
        f"| max abs risk difference, fp32 prober | {risk_diff:.2e} | <= 1e-3 |",
        f"| int8 prober decision agrees with fp32 | {100 * agree:.1f}% | >= 99.5% |",
        f"| max abs risk difference, int8 vs fp32 prober | {int8_diff:.2e} | |", "",
        "Prompts whose tokens differ (first differing position): " +
        (", ".join(f"{x['set']} @{x['first_difference']}" for x in rows if not x["identical"]) or "none"), ""])
    a.out.with_suffix(".md").write_text(text)
    a.out.with_suffix(".json").write_text(json.dumps({"date": date, "rows": rows}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
