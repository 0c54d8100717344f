"""Load on `steerguard serve`: N concurrent streaming clients (the official `openai` client, asyncio), each
asking for exactly --new-tokens tokens, at several concurrency levels, per target.

A target is one of our bundles (a fresh `steerguard serve` per round; `--server-variant` adds the same bundle
with other server options), another OpenAI-compatible server the bench starts itself each round
(`--peer-cmd NAME=COMMAND`, `{port}` in COMMAND), or one already running (`--peer NAME=URL`). With
`--rounds R` the targets take turns R times (a machine that drifts between phases then drifts for all of
them alike) and the report gives each number's median over the rounds.

Reports per level: aggregate decode tokens/s (all completion tokens / wall time of the level), p50/p95
time to first token (request sent -> first content chunk), how many requests got all their tokens, the
server's peak resident memory (VmHWM, for servers the bench started) and its memory after the level.

    python bench/serve_load.py runs/serve-demo/int4 runs/serve-demo/fp32 --out docs/serve_load

Our server gets `ignore_eos`; peers get `--peer-body` (e.g. a logit_bias that bans the end-of-turn
token, for servers without `ignore_eos`). The client runs on the same machine as the servers and takes
CPU from them (2 cores here): the numbers are what one machine serving itself gets."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, ContextManager, Iterator

from openai import AsyncOpenAI

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from serving import Server, free_port  # noqa: E402

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


async def one_request(client: AsyncOpenAI, model: str, prompt: str, new_tokens: int, body: dict) -> dict:
    t0 = time.perf_counter()
    first, usage_tokens, chunks = None, None, 0
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=new_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body=body)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            chunks += 1
            first = first or time.perf_counter()
        if chunk.usage:
            usage_tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    # a server that sends no usage chunk: one content chunk per token (llama-cpp-python streams so)
    tokens = usage_tokens if usage_tokens is not None else chunks
    return {"ttft_s": (first or end) - t0, "total_s": end - t0, "tokens": tokens}


async def level(url: str, model: str, clients: int, requests_each: int, new_tokens: int, body: dict) -> dict:
    client = AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=3600)

    async def worker(i: int) -> list[dict]:
        return [await one_request(client, model, PROMPTS[(i + k) % len(PROMPTS)], new_tokens, body)
                for k in range(requests_each)]

    t0 = time.perf_counter()
    results = [r for rs in await asyncio.gather(*(worker(i) for i in range(clients))) for r in rs]
    wall = time.perf_counter() - t0
    await client.close()
    ttft = [r["ttft_s"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": len(results), "completion_tokens": tokens, "wall_s": wall,
            "complete": sum(r["tokens"] >= new_tokens for r in results),
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


@dataclass
class Target:
    """Something to measure: `start()` is a context manager that yields (url, pid or None) of a running server."""
    name: str
    start: Callable[[], ContextManager[tuple[str, int | None]]]
    body: dict = field(default_factory=dict)
    levels: list[int] | None = None   # concurrency levels, if not the bench's


@contextlib.contextmanager
def our_server(bundle: Path, args: list[str], threads: int) -> Iterator[tuple[str, int | None]]:
    with Server(bundle, *args, threads=threads) as s:
        yield s.url, s.proc.pid


@contextlib.contextmanager
def started_peer(command: str, log: Path | None) -> Iterator[tuple[str, int | None]]:
    """Run `command` ({port} filled in) until it answers GET /v1/models; stop it afterwards."""
    port = free_port()
    out = open(log, "a") if log else subprocess.DEVNULL
    proc = subprocess.Popen(shlex.split(command.format(port=port)), stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"{command!r} exited or did not answer within 180 s")
            try:
                urllib.request.urlopen(url + "/v1/models", timeout=5).read()
                break
            except (OSError, urllib.error.URLError):
                time.sleep(0.2)
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def running_peer(url: str) -> Iterator[tuple[str, int | None]]:
    yield url, None


def model_id(url: str) -> str:
    with urllib.request.urlopen(url + "/v1/models") as r:
        return json.loads(r.read())["data"][0]["id"]


def run_target(target: Target, levels: list[int], args, round_no: int) -> list[dict]:
    levels = target.levels or levels
    rows = []
    load_before = os.getloadavg()[0]   # another job on the machine shows here
    with target.start() as (url, pid):
        model = model_id(url)
        asyncio.run(level(url, model, 1, 1, 8, target.body))     # warm-up
        for c in levels:
            r = asyncio.run(level(url, model, c, max(1, args.requests // c), args.new_tokens, target.body))
            if pid:
                r.update(proc_memory_mb(pid))
            r.update(target=target.name, round=round_no, loadavg_1m_before=load_before)
            rows.append(r)
            print(f"  [{round_no}] {target.name:<22} {c:>3} clients: {r['aggregate_tok_s']:7.1f} tok/s aggregate, "
                  f"{r['per_client_tok_s']:6.1f} per client, first token p50 {r['ttft_p50_ms']:7.0f} ms "
                  f"p95 {r['ttft_p95_ms']:7.0f} ms, {r['complete']}/{r['requests']} complete, "
                  f"peak RSS {r.get('peak_rss_mb') or float('nan'):6.0f} MB", flush=True)
    return rows


MEDIAN_KEYS = ("aggregate_tok_s", "per_client_tok_s", "ttft_p50_ms", "ttft_p95_ms", "peak_rss_mb", "wall_s")


def medians(rows: list[dict]) -> list[dict]:
    """One row per (target, clients): each number's median over the rounds, in the order first seen."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["target"], r["clients"]), []).append(r)
    out = []
    for (target, clients), rs in groups.items():
        m = {"target": target, "clients": clients, "rounds": len(rs), "requests": rs[0]["requests"],
             "complete": sum(r["complete"] for r in rs), "requests_all_rounds": sum(r["requests"] for r in rs)}
        for k in MEDIAN_KEYS:
            values = [r[k] for r in rs if r.get(k) is not None]
            m[k] = statistics.median(values) if values else None
        m["aggregate_tok_s_range"] = [min(r["aggregate_tok_s"] for r in rs), max(r["aggregate_tok_s"] for r in rs)]
        out.append(m)
    return out


def markdown(rows: list[dict], args, started: str) -> str:
    lines = ["# `steerguard serve` under load\n",
             f"Made by `python bench/serve_load.py {' '.join(shlex.quote(a) for a in sys.argv[1:])}` on "
             f"{platform.machine()} ({platform.processor() or 'cpu'}), started {started}: {args.threads} threads per "
             f"server, {args.new_tokens} new tokens per request, greedy, streaming clients (official `openai` "
             f"client, asyncio) on the same machine, {args.rounds} round(s) with the targets taking turns; "
             "each number is the median over the rounds (aggregate tok/s: the range in brackets).\n",
             "| target | clients | requests | aggregate tok/s | vs 1 client | per-client tok/s | TTFT p50 ms | "
             "TTFT p95 ms | p95 vs 1 client | complete | peak RSS MB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    base = {}
    for r in medians(rows):
        b = base.setdefault(r["target"], r)
        lo, hi = r["aggregate_tok_s_range"]
        rss = f"{r['peak_rss_mb']:.0f}" if r["peak_rss_mb"] else "-"
        lines.append(f"| {r['target']} | {r['clients']} | {r['requests']} | {r['aggregate_tok_s']:.1f} [{lo:.0f}-{hi:.0f}] | "
                     f"{r['aggregate_tok_s'] / b['aggregate_tok_s']:.2f}x | {r['per_client_tok_s']:.1f} | "
                     f"{r['ttft_p50_ms']:.0f} | {r['ttft_p95_ms']:.0f} | {r['ttft_p95_ms'] / b['ttft_p95_ms']:.1f}x | "
                     f"{r['complete']}/{r['requests_all_rounds']} | {rss} |")
    return "\n".join(lines) + "\n"


def targets_from(args) -> list[Target]:
    ours = {"ignore_eos": True}
    peer_body = json.loads(args.peer_body) if args.peer_body else {}
    peer_levels = [int(c) for c in args.peer_concurrency.split(",")] if args.peer_concurrency else None
    targets = []
    for bundle in args.bundles:
        base = ["--max-batch", str(args.max_batch or max(args.levels)), "--max-queue", str(4 * max(args.levels)),
                "--max-len", str(args.max_len)]
        targets.append(Target(bundle.name, lambda b=bundle, a=base: our_server(b, a, args.threads), ours))
        for variant in args.server_variant:
            suffix, _, extra = variant.partition("=")
            targets.append(Target(bundle.name + suffix,
                                  lambda b=bundle, a=base + shlex.split(extra): our_server(b, a, args.threads), ours))
    for peer in args.peer_cmd:
        name, _, command = peer.partition("=")
        targets.append(Target(name, lambda c=command: started_peer(c, args.peer_log), peer_body,
                              None if name in args.all_levels else peer_levels))
    for peer in args.peer:
        name, _, url = peer.partition("=")
        targets.append(Target(name, lambda u=url: running_peer(u), peer_body,
                              None if name in args.all_levels else peer_levels))
    return targets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="*", type=Path)
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--requests", type=int, default=4, help="Requests per level (at least one per client).")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-batch", type=int, default=None, help="Server rows (default: the highest concurrency).")
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--server-variant", action="append", default=[], metavar="SUFFIX=ARGS",
                    help="Also measure each bundle served with these extra `steerguard serve` options, as NAME+SUFFIX.")
    ap.add_argument("--peer-cmd", action="append", default=[], metavar="NAME=COMMAND",
                    help="Another OpenAI-compatible server the bench starts each round ({port} in COMMAND).")
    ap.add_argument("--peer", action="append", default=[], metavar="NAME=URL",
                    help="Another OpenAI-compatible server already running (its model id is read from /v1/models).")
    ap.add_argument("--peer-body", default=None, help="JSON merged into every request to a peer.")
    ap.add_argument("--peer-log", type=Path, default=None, help="Append the started peers' output here.")
    ap.add_argument("--peer-concurrency", default=None,
                    help="Levels for the peers (default --concurrency): a server that answers one request at a time "
                         "takes 64 x a request's time at 64 clients.")
    ap.add_argument("--all-levels", action="append", default=[], metavar="NAME",
                    help="A peer that runs every --concurrency level despite --peer-concurrency.")
    ap.add_argument("--rounds", type=int, default=1, help="Times the targets take turns.")
    ap.add_argument("--out", type=Path, default=None, help="Write OUT.json and OUT.md.")
    args = ap.parse_args()
    args.levels = [int(c) for c in args.concurrency.split(",")]
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rows = []
    for round_no in range(1, args.rounds + 1):
        for target in targets_from(args):
            rows += run_target(target, args.levels, args, round_no)
            if args.out:   # what is done so far survives an interrupted run
                write(args, rows, started)
    if args.out:
        write(args, rows, started)


def write(args, rows: list[dict], started: str) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": sys.argv, "started": started, "machine": platform.machine(), "processor": platform.processor(),
            "python": platform.python_version()}
    args.out.with_suffix(".json").write_text(json.dumps({**meta, "medians": medians(rows), "rows": rows}, indent=1))
    args.out.with_suffix(".md").write_text(markdown(rows, args, started))


if __name__ == "__main__":
    main()
