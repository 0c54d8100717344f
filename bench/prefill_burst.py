"""What a burst of N waiting prompts costs to prefill, the runtime alone (no HTTP): one by one whole (the
batcher before prefix reuse), all in one padded batched run (`GuardedModel.prefill_batch`), and one by
one from the chat template prefix's KV (`PrefixKV`, what `ContinuousBatcher` does by default). The
prompts are bench/serve_load.py's, cycled; each way runs --repeats times, the ways taking turns, and the
median is reported, with one lone whole prefill for scale.

    python bench/prefill_burst.py runs/serve-demo/int4 runs/serve-demo/fp32 --burst 16"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

from steerguard.runtime.model import GuardedModel, KVCache, Prompt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import PROMPTS  # noqa: E402


def ways(model: GuardedModel, prompts: list[Prompt], cache: KVCache) -> dict[str, Callable[[], None]]:
    prefix = model.prefix_kv(model.tokenizer.prompt_prefix, cache.max_len)

    def whole_one_by_one() -> None:
        for row, p in enumerate(prompts):
            model.prefill(p, cache, row)

    def batched() -> None:
        model.prefill_batch(prompts, cache, 0)

    def from_prefix_one_by_one() -> None:
        for row, p in enumerate(prompts):
            model.prefill(p, cache, row, prefix=prefix)

    return {"whole, one by one": whole_one_by_one, "whole, one batched run": batched,
            "from the template prefix, one by one": from_prefix_one_by_one}


def measure(bundle: Path, burst: int, repeats: int, threads: int) -> list[str]:
    model = GuardedModel.load(bundle, threads=threads)
    prompts = [model.prepare(PROMPTS[i % len(PROMPTS)]) for i in range(burst)]
    cache = KVCache(range(model.num_layers), burst, model.kv_heads, 256, model.head_dim)
    runs = ways(model, prompts, cache)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    lone = []
    for _ in range(5):
        t0 = time.perf_counter()
        model.prefill(prompts[0], cache, 0)
        lone.append(time.perf_counter() - t0)
    reused = len(model.tokenizer.prompt_prefix)
    lengths = sorted({len(p.ids) for p in prompts})
    lines = [f"| {bundle.name} | lone prefill ({len(prompts[0].ids)} tokens) | 1 | "
             f"{1000 * statistics.median(lone):.0f} | {1000 * statistics.median(lone):.0f} |"]
    for name, ts in times.items():
        total = statistics.median(ts)
        lines.append(f"| {bundle.name} | {name} | {burst} | {1000 * total:.0f} | {1000 * total / burst:.0f} |")
    print(f"{bundle}: prompts of {lengths[0]}-{lengths[-1]} tokens, template prefix {reused} tokens",
          file=sys.stderr)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="+", type=Path)
    ap.add_argument("--burst", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    print("| bundle | prefill | prompts | total ms | ms per prompt |\n|---|---|---|---|---|")
    for bundle in args.bundles:
        print("\n".join(measure(bundle, args.burst, args.repeats, args.threads)), flush=True)


if __name__ == "__main__":
    main()
