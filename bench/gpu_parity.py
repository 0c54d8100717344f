"""fp16 bundle on CUDA vs fp32 bundle on the CPU: greedy tokens and guard decisions (device script).

    python bench/gpu_parity.py --cpu BUNDLE_FP32 --gpu BUNDLE_FP16 [--n 50] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", type=Path, required=True)
    ap.add_argument("--gpu", type=Path, required=True)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()

    from steerguard.export.data import load_prompts
    from steerguard.runtime import GuardedModel, Sampling

    half = a.n // 2
    prompts = (load_prompts(SHARED / "vlsafe" / "examine_sampled_500_VLSafe.jsonl", 1, "query", "caption")
               .sample(half).prompts +
               load_prompts(SHARED / "benign" / "alpaca_harmless_train.json", 0, "instruction").sample(a.n - half).prompts)
    cpu, gpu = GuardedModel.load(a.cpu, backend="cpu"), GuardedModel.load(a.gpu, backend="cuda")
    s = Sampling(max_new_tokens=a.new_tokens)
    same = agree = 0
    for p in prompts:
        x, y = cpu.generate(p, s), gpu.generate(p, s)
        same += x.token_ids == y.token_ids
        agree += x.fired == y.fired
    result = {"n": len(prompts), "identical": same / len(prompts), "decisions_agree": agree / len(prompts)}
    if a.json:
        a.json.write_text(json.dumps(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
