"""Load on `steerguard serve`: N concurrent streaming clients (the official `openai` client, asyncio), each
asking for exactly --new-tokens tokens (`ignore_eos`), at several concurrency levels, per bundle.

Reports per level: aggregate decode tokens/s (all completion tokens / wall time of the level), p50/p95
time to first token (request sent -> first content chunk), the server's peak resident memory (VmHWM)
and its memory after the level. Optionally drives any other OpenAI-compatible server already running
(--peer URL, e.g. llama-cpp-python's) with the same load generator.

    python bench/serve_load.py runs/serve-demo/int4 runs/serve-demo/fp32 --out docs/serve_load

The client runs on the same machine as the server and takes CPU from it (2 cores here): the numbers are
what one machine serving itself gets."""
from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from pathlib import Path

from openai import AsyncOpenAI

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from serving import Server  # noqa: E402

PROMPTS = ["Write a long story about a lighthouse keeper who finds a message in a bottle.",
           "Explain in detail how a refrigerator works, step by step.",
           "Describe the history of the printing press and its effects on Europe.",
           "Give me a detailed plan for learning to play the guitar in three months.",
           "What are the main differences between Python and JavaScript? Explain with examples.",
           "Tell me about the water cycle and why it matters for agriculture."]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def one_request(client: AsyncOpenAI, model: str, prompt: str, new_tokens: int) -> dict:
    t0 = time.perf_counter()
    first, tokens = None, 0
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=new_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter()
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    return {"ttft_s": (first or end) - t0, "total_s": end - t0, "tokens": tokens}


async def level(url: str, model: str, clients: int, requests_each: int, new_tokens: int) -> dict:
    client = AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=3600)

    async def worker(i: int) -> list[dict]:
        return [await one_request(client, model, PROMPTS[(i + k) % len(PROMPTS)], new_tokens)
                for k in range(requests_each)]

    t0 = time.perf_counter()
    results = [r for rs in await asyncio.gather(*(worker(i) for i in range(clients))) for r in rs]
    wall = time.perf_counter() - t0
    await client.close()
    ttft = [r["ttft_s"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": len(results), "completion_tokens": tokens, "wall_s": wall,
            "aggregate_tok_s": tokens / wall, "ttft_p50_ms": 1000 * statistics.median(ttft),
            "ttft_p95_ms": 1000 * percentile(ttft, 0.95),
            "per_client_tok_s": statistics.median(r["tokens"] / r["total_s"] for r in results)}


def proc_memory_mb(pid: int) -> dict:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            fields[key] = int(value.split()[0]) / 1024
    return {"peak_rss_mb": fields.get("VmHWM"), "rss_mb": fields.get("VmRSS")}


def run_target(name: str, url: str, model: str, levels: list[int], args, pid: int | None) -> list[dict]:
    asyncio.run(level(url, model, 1, 1, 8))     # warm-up
    rows = []
    for c in levels:
        r = asyncio.run(level(url, model, c, max(1, args.requests // c), args.new_tokens))
        if pid:
            r.update(proc_memory_mb(pid))
        r["target"] = name
        rows.append(r)
        print(f"  {name:<14} {c:>3} clients: {r['aggregate_tok_s']:7.1f} tok/s aggregate, "
              f"{r['per_client_tok_s']:6.1f} per client, first token p50 {r['ttft_p50_ms']:7.0f} ms "
              f"p95 {r['ttft_p95_ms']:7.0f} ms, peak RSS {r.get('peak_rss_mb') or float('nan'):6.0f} MB", flush=True)
    return rows


def markdown(rows: list[dict], args) -> str:
    lines = [f"# `steerguard serve` under load\n",
             f"Made by `python bench/serve_load.py {' '.join(sys.argv[1:])}` on {platform.machine()}, "
             f"{args.threads} onnxruntime threads, {args.new_tokens} new tokens per request (ignore_eos), greedy, "
             "streaming clients (official `openai` client, asyncio) on the same machine.\n",
             "| target | clients | requests | aggregate tok/s | vs 1 client | per-client tok/s | TTFT p50 ms | "
             "TTFT p95 ms | p95 vs 1 client | peak RSS MB |", "|---|---|---|---|---|---|---|---|---|---|"]
    base = {}
    for r in rows:
        b = base.setdefault(r["target"], r)
        lines.append(f"| {r['target']} | {r['clients']} | {r['requests']} | {r['aggregate_tok_s']:.1f} | "
                     f"{r['aggregate_tok_s'] / b['aggregate_tok_s']:.2f}x | {r['per_client_tok_s']:.1f} | "
                     f"{r['ttft_p50_ms']:.0f} | {r['ttft_p95_ms']:.0f} | {r['ttft_p95_ms'] / b['ttft_p95_ms']:.1f}x | "
                     f"{r['peak_rss_mb'] or float('nan'):.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="*", type=Path)
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--requests", type=int, default=4, help="Requests per level (at least one per client).")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-batch", type=int, default=None, help="Server rows (default: the highest concurrency).")
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--peer", action="append", default=[], metavar="NAME=URL",
                    help="Another OpenAI-compatible server already running (its model id is read from /v1/models).")
    ap.add_argument("--out", type=Path, default=None, help="Write OUT.json and OUT.md.")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    rows = []
    for bundle in args.bundles:
        max_batch = args.max_batch or max(levels)
        with Server(bundle, "--max-batch", str(max_batch), "--max-queue", str(4 * max(levels)), "--max-len",
                    str(args.max_len), threads=args.threads) as s:
            model = json.loads(s.raw("GET", "/v1/models")[2])["data"][0]["id"]
            rows += run_target(bundle.name, s.url, model, levels, args, s.proc.pid)
    for peer in args.peer:
        name, _, url = peer.partition("=")
        import urllib.request

        with urllib.request.urlopen(url + "/v1/models") as r:
            model = json.loads(r.read())["data"][0]["id"]
        rows += run_target(name, url, model, levels, args, None)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps({"command": sys.argv, "rows": rows}, indent=1))
        args.out.with_suffix(".md").write_text(markdown(rows, args))


if __name__ == "__main__":
    main()
