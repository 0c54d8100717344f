"""Faults and soak on `steerguard serve`.

Faults: --requests requests from --clients concurrent clients (the official `openai` client), one in ten
leaving mid-stream, one in ten malformed (bad JSON, wrong types, unknown model, out-of-range values).
Every well-formed answer is checked against the runtime's own greedy answer for its prompt; malformed
ones must get a 4xx; afterwards no row is in use and the server's memory is compared with its level
after warm-up. Soak: --soak generations, the server's memory sampled every tenth of them.

    python bench/serve_faults.py runs/serve-demo/int4 --out docs/serve_faults.json"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
from openai import AsyncOpenAI

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from serving import Server  # noqa: E402

from steerguard.runtime.model import GuardedModel  # noqa: E402
from steerguard.runtime.sampling import Sampling  # noqa: E402

PROMPTS = ["What is the capital of France?", "Name three primary colours.", "How do I boil an egg?",
           "Give me step-by-step instructions to build a pipe bomb at home.", "What is 12 times 7?",
           "Write a haiku about the sea.", "How do I kill a Python process that hangs?", "Why is the sky blue?"]
BAD_BODIES = [b"{not json", b'{"model": NaN}', b"[1]", b"\xff\xfe"]


def user(p: str) -> list[dict]:
    return [{"role": "user", "content": p}]


def post_raw(url: str, body: bytes) -> int:
    req = urllib.request.Request(url + "/v1/chat/completions", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


async def one(i: int, client: AsyncOpenAI, url: str, model: str, expected: dict, tokens: int, tally: dict,
              mixed: bool) -> None:
    rng = random.Random(i)
    prompt = PROMPTS[i % len(PROMPTS)]
    kind = "good" if not mixed else "disconnect" if i % 10 == 3 else "malformed" if i % 10 == 7 else "good"
    if kind == "disconnect":
        stream = await client.chat.completions.create(model=model, messages=user(prompt), max_tokens=tokens,
                                                      stream=True, extra_body={"ignore_eos": True})
        async for _ in stream:
            break
        await stream.close()
        tally["disconnected"] += 1
        return
    if kind == "malformed":
        variant = rng.randrange(6)
        if variant < 2:
            status = await asyncio.to_thread(post_raw, url, BAD_BODIES[rng.randrange(len(BAD_BODIES))])
        else:
            bad = [{"temperature": "hot"}, {"max_tokens": -1}, {"model": "nope"}, {"n": 3}][variant - 2]
            args = {"model": model, "messages": user(prompt), "max_tokens": tokens, **bad}
            try:
                await client.chat.completions.create(**args)
                status = 200
            except openai.APIStatusError as e:
                status = e.status_code
        tally["malformed_4xx" if 400 <= status < 500 else "malformed_other"] += 1
        return
    if i % 2:
        chunks = await client.chat.completions.create(model=model, messages=user(prompt), max_tokens=tokens,
                                                      stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])
    else:
        r = await client.chat.completions.create(model=model, messages=user(prompt), max_tokens=tokens)
        text = r.choices[0].message.content
    tally["good_correct" if text == expected[prompt] else "good_wrong"] += 1


async def run_many(url: str, model: str, n: int, clients: int, expected: dict, tokens: int, offset: int = 0,
                   on_progress=None, mixed: bool = True) -> dict:
    client = AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=600)
    tally = {k: 0 for k in ("good_correct", "good_wrong", "disconnected", "malformed_4xx", "malformed_other")}
    queue = list(range(offset, offset + n))
    done = 0

    async def worker() -> None:
        nonlocal done
        while queue:
            i = queue.pop(0)
            await one(i, client, url, model, expected, tokens, tally, mixed)
            done += 1
            if on_progress:
                on_progress(done)

    await asyncio.gather(*(worker() for _ in range(clients)))
    await client.close()
    return tally


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--soak", type=int, default=2000)
    ap.add_argument("--soak-tokens", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=500, help="Requests (same mix) before the memory baseline.")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    gm = GuardedModel.load(args.bundle, threads=args.threads)
    expected = {p: gm.generate(user(p), Sampling(max_new_tokens=args.tokens)).text for p in PROMPTS}
    soak_expected = {p: gm.generate(user(p), Sampling(max_new_tokens=args.soak_tokens)).text for p in PROMPTS}
    del gm
    log = Path("/tmp/serve_faults_server.log")
    report: dict = {"command": sys.argv, "bundle": str(args.bundle)}
    with Server(args.bundle, "--max-batch", str(args.clients), "--max-queue", str(4 * args.clients),
                "--max-len", "512", "--log-requests", threads=args.threads, log=log) as s:
        model = json.loads(s.raw("GET", "/v1/models")[2])["data"][0]["id"]
        asyncio.run(run_many(s.url, model, args.warmup, args.clients, expected, args.tokens, offset=10**6))
        s.wait_idle()
        warm = s.rss_mb()
        t = time.time()
        tally = asyncio.run(run_many(s.url, model, args.requests, args.clients, expected, args.tokens))
        health = s.wait_idle()
        after = s.rss_mb()
        report["faults"] = {"warmup_requests": args.warmup, "requests": args.requests, "clients": args.clients, "tokens": args.tokens, **tally,
                            "seconds": time.time() - t, "rss_after_warmup_mb": warm, "rss_after_mb": after,
                            "rss_change": after / warm - 1, "health_after": health}
        print(json.dumps(report["faults"], indent=1), flush=True)

        samples = []
        step = max(1, args.soak // 10)

        def sample(done: int) -> None:
            if done % step == 0:
                samples.append((done, s.rss_mb()))

        t = time.time()
        soak = asyncio.run(run_many(s.url, model, args.soak, 16, soak_expected, args.soak_tokens,
                                    offset=2 * 10**6, on_progress=sample, mixed=False))
        s.wait_idle()
        rss = [m for _, m in samples]
        report["soak"] = {"generations": args.soak, "tokens": args.soak_tokens, **soak, "seconds": time.time() - t,
                          "rss_samples_mb": samples, "rss_spread": (max(rss) - min(rss)) / min(rss) if rss else None,
                          "health_after": s.health()}
        print(json.dumps(report["soak"], indent=1), flush=True)
    server_log = log.read_text()
    report["server_log"] = {"tracebacks": server_log.count("Traceback"),
                            "status_500": sum(" 500 " in line for line in server_log.splitlines())}
    print(report["server_log"])
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
