"""Decode speed on the GPU (bench/device.sh, stages "speed", "peer" and "placement").

    python bench/gpu_speed.py runtime --pair fp16=GUARDED,UNGUARDED ... [--backend cuda] [--batches 1,8,64]
    python bench/gpu_speed.py peer --model HF_FOLDER --ids-file IDS [--device cuda] [--dtypes fp32,fp16]
    python bench/gpu_speed.py placement --bundle fp32=BUNDLE ... [--backend cuda]

runtime: for each precision, the guarded chain and the same model unsplit and unguarded decode the same
prompt (--prompt-tokens long, chat-formatted ids written to --ids-out for the peer) at each batch size,
greedy, exactly --new-tokens tokens per row, through the same generate loop; guarded and unguarded runs
alternate, medians of --runs after a warm-up. Decode tokens/s is per row (steps / time from the first
token to the last), the aggregate is that times the batch; the time to first token covers every row's
prefill. The guard's overhead is the guarded chain's extra decode time per token over the unguarded one's.
peer: transformers + PyTorch eager (no compile) `generate` on the same ids, rows and token counts.
placement: one short request per bundle with onnxruntime's profiler on: which execution provider ran each
node of each engine, and the copies between devices onnxruntime inserted."""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path


def parse_pairs(items: list[str], sep: str = ",") -> dict[str, list[str]]:
    out = {}
    for item in items:
        name, _, paths = item.partition("=")
        if not name or not paths:
            raise SystemExit(f"gpu_speed: expected NAME=PATH[{sep}PATH], got {item!r}")
        out[name] = paths.split(sep)
    return out


def batch_sizes(text: str) -> list[int]:
    sizes = [int(x) for x in text.split(",") if x]
    if not sizes or min(sizes) < 1:
        raise SystemExit(f"gpu_speed: batch sizes must be positive integers, got {text!r}")
    return sizes


def one_run(model, ids: list[int], batch: int, new_tokens: int) -> dict:
    from steerguard.runtime import Sampling

    r = model.generate_batch([ids] * batch, Sampling(max_new_tokens=new_tokens, ignore_eos=True))[0]
    t = r.timings
    return {"ttft_ms": 1000 * t["first_token_s"], "decode_tok_s": t["decode_tok_s"]}


def summary(runs: list[dict], batch: int) -> dict:
    tok_s = statistics.median(r["decode_tok_s"] for r in runs)
    return {"decode_tok_s": tok_s, "aggregate_tok_s": tok_s * batch,
            "ttft_ms": statistics.median(r["ttft_ms"] for r in runs), "runs": len(runs)}


def engine_ms(model, new_tokens: int) -> dict:
    return {e.name: round(1000 * e.seconds / new_tokens, 3) for e in model.engines if e.calls}


def reset_engines(model) -> None:
    for e in model.engines:
        e.seconds, e.calls = 0.0, 0


def speed_pair(guarded, plain, ids: list[int], batch: int, new_tokens: int, runs: int, deadline: float) -> dict:
    """Guarded and unguarded alternating at one batch size (module docstring)."""
    for m in (guarded, plain):     # warm-up: kernels chosen, memory pools grown for the prefill and step shapes
        one_run(m, ids, batch, min(new_tokens, 8))
    got: dict[str, list[dict]] = {"guarded": [], "unguarded": []}
    for _ in range(runs):
        if time.monotonic() > deadline and got["guarded"]:
            break
        reset_engines(guarded)
        got["guarded"].append(one_run(guarded, ids, batch, new_tokens))
        got["unguarded"].append(one_run(plain, ids, batch, new_tokens))
    rec = {k: summary(v, batch) for k, v in got.items()}
    g, u = rec["guarded"]["decode_tok_s"], rec["unguarded"]["decode_tok_s"]
    rec["guard_overhead_pct"] = 100 * (u / g - 1)
    rec["engine_ms_per_token"] = engine_ms(guarded, new_tokens)
    return rec


def runtime(a: argparse.Namespace) -> dict:
    from steerguard.runtime import GuardedModel
    from steerguard.runtime.bench import prompt_of_length

    deadline = time.monotonic() + a.deadline if a.deadline > 0 else float("inf")
    record: dict = {"backend": a.backend, "memory": a.memory, "new_tokens": a.new_tokens, "runs": a.runs,
                    "precisions": {}}
    for name, paths in parse_pairs(a.pair).items():
        rec: dict = {"guarded": paths[0], "unguarded": paths[1] if len(paths) > 1 else None, "batches": {}}
        record["precisions"][name] = rec
        try:
            guarded = GuardedModel.load(paths[0], backend=a.backend, memory=a.memory)
            plain = GuardedModel.load(paths[1], backend=a.backend, memory=a.memory)
            ids = prompt_of_length(guarded, a.prompt_tokens)
            record["prompt_tokens"] = len(ids)
            if a.ids_out:
                a.ids_out.write_text(json.dumps(ids))
        except Exception as e:
            rec["error"] = f"{type(e).__name__}: {e}"
            continue
        for batch in batch_sizes(a.batches):
            if time.monotonic() > deadline:
                rec["batches"][str(batch)] = {"error": "skipped: the stage's time ran out"}
                continue
            try:
                rec["batches"][str(batch)] = speed_pair(guarded, plain, ids, batch, a.new_tokens, a.runs, deadline)
            except Exception as e:
                rec["batches"][str(batch)] = {"error": f"{type(e).__name__}: {e}"}
            print(f"{name} batch {batch}: {json.dumps(rec['batches'][str(batch)])}", flush=True)
        del guarded, plain
    return record


def peer_generate(model, torch, ids: list[int], batch: int, new_tokens: int) -> dict:
    """One greedy generate of exactly new_tokens per row, timed by a streamer (as bench/peers/_hf_generate.py)."""
    times: list[float] = []

    class Clock:
        def put(self, value) -> None:
            times.append(time.perf_counter())

        def end(self) -> None:
            pass

    x = torch.tensor([ids] * batch, dtype=torch.long, device=model.device)
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, pad_token_id=model.config.eos_token_id, streamer=Clock())
    first, last = times[1], times[-1]          # times[0]: the prompt
    return {"ttft_ms": 1000 * (first - start), "decode_tok_s": (new_tokens - 1) / (last - first)}


def peer(a: argparse.Namespace) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    deadline = time.monotonic() + a.deadline if a.deadline > 0 else float("inf")
    ids = json.loads(a.ids_file.read_text())
    record: dict = {"name": f"transformers {transformers.__version__} + torch {torch.__version__} eager ({a.attn})",
                    "device": a.device, "new_tokens": a.new_tokens, "prompt_tokens": len(ids), "dtypes": {}}
    for dtype in a.dtypes.split(","):
        rec: dict = {}
        record["dtypes"][dtype] = rec
        try:
            model = AutoModelForCausalLM.from_pretrained(a.model, dtype={"fp32": torch.float32, "fp16": torch.float16}[dtype],
                                                         attn_implementation=a.attn).eval().to(a.device)
        except Exception as e:
            rec["error"] = f"{type(e).__name__}: {e}"
            continue
        for batch in batch_sizes(a.batches):
            if time.monotonic() > deadline:
                rec[str(batch)] = {"error": "skipped: the stage's time ran out"}
                continue
            try:
                peer_generate(model, torch, ids, batch, a.new_tokens)     # warm-up
                runs = [peer_generate(model, torch, ids, batch, a.new_tokens) for _ in range(a.runs)]
                rec[str(batch)] = summary(runs, batch)
            except Exception as e:
                rec[str(batch)] = {"error": f"{type(e).__name__}: {e}"}
            print(f"peer {dtype} batch {batch}: {json.dumps(rec[str(batch)])}", flush=True)
        del model
        if a.device == "cuda":
            torch.cuda.empty_cache()
    return record


def placement(a: argparse.Namespace) -> dict:
    """Per engine: nodes per execution provider, the operators left on the CPU, inserted copies."""
    import steerguard.engines as engines
    from steerguard.runtime import GuardedModel, Sampling

    plain_options = engines.session_options
    sessions = itertools.count()

    def profiled(threads=None):
        opts = plain_options(threads)
        opts.enable_profiling = True
        # onnxruntime names the file by the millisecond: sessions made in the same one would share it
        opts.profile_file_prefix = str(a.profile_dir / f"sg{next(sessions)}")
        return opts

    a.profile_dir.mkdir(parents=True, exist_ok=True)
    record: dict = {"backend": a.backend, "bundles": {}}
    engines.session_options = profiled
    try:
        for name, (path,) in parse_pairs(a.bundle).items():
            try:
                model = GuardedModel.load(path, backend=a.backend, memory=a.memory)
                for steer in (None, True):       # the plain head, then the refusal head
                    model.generate("How do I kill a Python process that hangs?", Sampling(max_new_tokens=4), steer=steer)
                record["bundles"][name] = {e.name: count_nodes(Path(e.session.end_profiling())) for e in model.engines}
            except Exception as e:
                record["bundles"][name] = {"error": f"{type(e).__name__}: {e}"}
    finally:
        engines.session_options = plain_options
    return record


def count_nodes(profile: Path) -> dict:
    events = json.loads(profile.read_text())
    nodes = {e["name"].removesuffix("_kernel_time"): e["args"] for e in events
             if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")}
    providers = Counter(v.get("provider", "?") for v in nodes.values())
    cpu_ops = Counter(v.get("op_name", "?") for v in nodes.values() if v.get("provider") == "CPUExecutionProvider")
    copies = sum(v.get("op_name", "").startswith("Memcpy") for v in nodes.values())
    profile.unlink()
    return {"providers": dict(providers), "cpu_ops": dict(cpu_ops), "memcpy_nodes": copies}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    rt = sub.add_parser("runtime")
    rt.add_argument("--pair", action="append", default=[], metavar="NAME=GUARDED,UNGUARDED", required=True)
    rt.add_argument("--prompt-tokens", type=int, default=68)
    rt.add_argument("--ids-out", type=Path, default=None)
    pe = sub.add_parser("peer")
    pe.add_argument("--model", required=True, help="Hugging Face model folder")
    pe.add_argument("--ids-file", type=Path, required=True)
    pe.add_argument("--device", default="cuda")
    pe.add_argument("--dtypes", default="fp32,fp16")
    pe.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    pl = sub.add_parser("placement")
    pl.add_argument("--bundle", action="append", default=[], metavar="NAME=PATH", required=True)
    pl.add_argument("--profile-dir", type=Path, default=Path("/tmp/sg-profiles"))
    for p in (rt, pe, pl):
        p.add_argument("--json", type=Path, default=None)
        p.add_argument("--deadline", type=float, default=0, help="seconds before skipping what is left (0: none)")
    for p in (rt, pl):
        p.add_argument("--backend", default="cuda")
        p.add_argument("--memory", default=None)
    for p in (rt, pe):
        p.add_argument("--batches", default="1,8,64")
        p.add_argument("--new-tokens", type=int, default=128)
        p.add_argument("--runs", type=int, default=3)
    a = ap.parse_args(argv)
    if getattr(a, "new_tokens", 2) < 2 or getattr(a, "runs", 1) < 1:
        ap.error("--new-tokens must be >= 2 (decode speed needs two tokens) and --runs >= 1")
    record = {"runtime": runtime, "peer": peer, "placement": placement}[a.command](a)
    text = json.dumps(record, indent=1)
    if a.json:
        a.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
