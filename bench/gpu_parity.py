"""Bundles on the GPU against the fp32 bundle on the CPU: greedy tokens, risks and guard decisions on prompts
from the shipped eval sets, and the guard's fire rates on those sets (bench/device.sh, stage "parity").

    python bench/gpu_parity.py --reference FP32_BUNDLE --bundle fp32=FP32_BUNDLE --bundle fp16=FP16_BUNDLE \\
        [--backend cuda] [--memory device] [--n 100] [--new-tokens 48] [--fire-per-set 0] [--json FILE]

The reference runs on the CPU backend with numpy buffers (the path every CPU result in docs/ comes from);
each --bundle runs on --backend, one request at a time, then in batches of --batch rows. The n prompts are
spread over the three eval sets in proportion to their sizes; fire rates score every prompt of each set
(--fire-per-set caps that). A bundle that fails to load or run is recorded and the others go on;
--deadline (seconds) stops early with the counts so far."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

SETS = ("harmful_heldout", "sounds_dangerous", "benign_conversational")


def eval_sets(per_set: int = 0) -> dict[str, list[str]]:
    """The shipped eval sets' prompts (the first `per_set` of each when > 0)."""
    from steerguard.export.data import data_path, load_prompts

    sets = {}
    for name in SETS:
        rows = load_prompts(data_path("eval", f"{name}.jsonl"), int(name == "harmful_heldout")).prompts
        sets[name] = rows[:per_set] if per_set > 0 else rows
    return sets


def parity_prompts(n: int) -> list[str]:
    """n prompts spread over the eval sets in proportion to their sizes, evenly strided within each."""
    sets = eval_sets()
    total = sum(len(v) for v in sets.values())
    counts = {k: round(n * len(v) / total) for k, v in sets.items()}
    counts[SETS[0]] += n - sum(counts.values())
    out = []
    for name, rows in sets.items():
        k = max(0, min(counts[name], len(rows)))
        out += [rows[i * len(rows) // k] for i in range(k)] if k else []
    return out


def answers(model, prompts: list[str], new_tokens: int, batch: int, deadline: float) -> list:
    """Greedy results, one request at a time (batch 1) or `batch` rows at once; stops at the deadline."""
    from steerguard.runtime import Sampling

    s = Sampling(max_new_tokens=new_tokens)
    out = []
    for i in range(0, len(prompts), batch):
        if time.monotonic() > deadline:
            break
        chunk = prompts[i:i + batch]
        out += [model.generate(chunk[0], s)] if len(chunk) == 1 else model.generate_batch(chunk, s)
    return out


def compare(reference: list, got: list) -> dict:
    """Agreement of `got` with the reference's first len(got) results."""
    pairs = list(zip(reference, got))
    if not pairs:
        return {"n": 0}
    diverge = [next((i for i, (a, b) in enumerate(zip(x.token_ids, y.token_ids)) if a != b),
                    min(len(x.token_ids), len(y.token_ids))) for x, y in pairs if x.token_ids != y.token_ids]
    risks = [abs(x.risk - y.risk) for x, y in pairs if x.risk is not None and y.risk is not None]
    return {"n": len(pairs), "greedy_identical": sum(x.token_ids == y.token_ids for x, y in pairs) / len(pairs),
            "first_divergence_median": statistics.median(diverge) if diverge else None,
            "risk_max_abs_diff": max(risks) if risks else None,
            "decisions_agree": sum(x.fired == y.fired for x, y in pairs) / len(pairs),
            "fired": sum(y.fired for _, y in pairs), "reference_fired": sum(x.fired for x, _ in pairs)}


def fire_rates(model, sets: dict[str, list[str]], deadline: float) -> tuple[dict, dict[str, list[bool]]]:
    """Per set: the share of prompts the guard fires on (and how many were scored); the decisions."""
    rates, decisions = {}, {}
    for name, prompts in sets.items():
        fired = []
        for p in prompts:
            if time.monotonic() > deadline:
                break
            fired.append(model.decide(model.score(p)))
        decisions[name] = fired
        rates[name] = {"n": len(fired), "fire_rate": sum(fired) / len(fired) if fired else None}
    return rates, decisions


def measure(name: str, path: str, a: argparse.Namespace, reference: list, ref_decisions: dict,
            prompts: list[str], sets: dict, deadline: float) -> dict:
    from steerguard.runtime import GuardedModel

    t = time.perf_counter()
    model = GuardedModel.load(path, backend=a.backend, memory=a.memory)
    rec: dict = {"bundle": path, "load_s": round(time.perf_counter() - t, 1), "memory": repr(model.memory)}
    t = time.perf_counter()
    rec["single"] = compare(reference, answers(model, prompts, a.new_tokens, 1, deadline))
    rec["batched"] = compare(reference, answers(model, prompts, a.new_tokens, a.batch, deadline))
    rec["batched"]["rows"] = a.batch
    rec["generate_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    rec["fire_rates"], decisions = fire_rates(model, sets, deadline)
    agree = [x == y for k in sets for x, y in zip(ref_decisions[k], decisions[k])]
    rec["eval_decisions_agree"] = sum(agree) / len(agree) if agree else None
    rec["eval_decisions_n"] = len(agree)
    rec["score_s"] = round(time.perf_counter() - t, 1)
    return rec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", required=True, help="the fp32 bundle, run on the CPU")
    ap.add_argument("--bundle", action="append", default=[], metavar="NAME=PATH", help="a bundle to hold to it")
    ap.add_argument("--backend", default="cuda")
    ap.add_argument("--memory", default=None, help="host or device (default: the backend's)")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--batch", type=int, default=25, help="rows per batch in the batched pass")
    ap.add_argument("--fire-per-set", type=int, default=0, help="score at most this many prompts per set (0: all)")
    ap.add_argument("--deadline", type=float, default=0, help="seconds before stopping early (0: none)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    bundles = dict(b.split("=", 1) for b in a.bundle if "=" in b)
    if len(bundles) != len(a.bundle) or a.n < 1 or a.new_tokens < 1 or a.batch < 1:
        ap.error("give each --bundle as NAME=PATH, and --n, --new-tokens, --batch >= 1")
    deadline = time.monotonic() + a.deadline if a.deadline > 0 else float("inf")

    from steerguard.runtime import GuardedModel

    prompts, sets = parity_prompts(a.n), eval_sets(a.fire_per_set)
    record: dict = {"backend": a.backend, "memory": a.memory, "n": len(prompts), "new_tokens": a.new_tokens,
                    "reference": {"bundle": a.reference, "backend": "cpu", "memory": "host"}, "bundles": {}}
    t = time.perf_counter()
    try:
        ref_model = GuardedModel.load(a.reference, backend="cpu", memory="host")
        # batched rows on the CPU are token for token the single-request answers (tests/test_runtime_model.py)
        reference = answers(ref_model, prompts, a.new_tokens, a.batch, deadline)
        record["reference"]["fire_rates"], ref_decisions = fire_rates(ref_model, sets, deadline)
        record["reference"]["fired"] = sum(r.fired for r in reference)
        record["reference"]["seconds"] = round(time.perf_counter() - t, 1)
        del ref_model
    except Exception as e:
        record["error"] = f"reference: {type(e).__name__}: {e}"
        return finish(record, a.json, 1)
    for name, path in bundles.items():
        try:
            record["bundles"][name] = measure(name, path, a, reference, ref_decisions, prompts, sets, deadline)
        except Exception as e:
            record["bundles"][name] = {"bundle": path, "error": f"{type(e).__name__}: {e}"}
        print(f"{name}: {json.dumps(record['bundles'][name])}", flush=True)
    return finish(record, a.json, 0)


def finish(record: dict, path: Path | None, code: int) -> int:
    if path:
        path.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "bundles"}))
    return code


if __name__ == "__main__":
    sys.exit(main())
