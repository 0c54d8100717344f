"""Gemma 3 270M on the CPU: steerguard's int4 bundle (guarded, and unguarded to show the guard's cost) beside
onnxruntime-genai's int4 export of the same weights and llama.cpp on the same Q4_K_M GGUF (issue 24).

    python bench/gemma_speed.py [--rounds 11] [--new-tokens 128] [--prompt-tokens 68] [--threads 2]

Every runner gets the same prompt ids (Gemma's chat template around a fixed request, as `steerguard bench`
builds it), batch 1, greedy, exactly --new-tokens new tokens (end of turn ignored). The runners alternate
(A B C D A B C D ...): each round starts every runner once in a fresh process, which warms up with one
generation and times the next. The table holds the medians over the rounds of decode tok/s and time to first
token, and each runner's decode speed against the guarded int4 bundle's as the median of the per-round
ratios (this machine's speed drifts between phases tens of seconds long; a round is a few seconds).

What it needs (built once, see docs/gemma_speed.md; a missing one is a skipped row, `--prepare` builds the
steerguard bundles and the genai export where they are missing):
- ~/.cache/steerguard/bench/gemma-int4 and gemma-int4-unguarded (steerguard export ... --precision int4)
- ~/.cache/steerguard/peers/genai venv and peers/genai-gemma-3-270m-int4 (its model builder)
- ~/.cache/steerguard/peers/llamacpp venv and the GGUF in ~/.cache/steerguard/downloads

Writes docs/gemma_speed.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import BUNDLES, PEERS, ROOT, machine, ours, peer  # noqa: E402  (bench/speed.py: the same drivers)

MODEL = "gemma3-270m"
GUARD = BUNDLES / "gemma-guard"
INT4 = BUNDLES / "gemma-int4"
INT4_UNGUARDED = BUNDLES / "gemma-int4-unguarded"
GENAI_INT4 = PEERS / "genai-gemma-3-270m-int4"
GENAI_LOG = PEERS / "genai-gemma-3-270m-int4.log"
GEMMA_WINDOW = 512   # onnxruntime-genai: its sliding-window attention needs a KV cache at least this long


def gguf_path() -> Path:
    from steerguard.export.models import NAMED_MODELS, cache_dir

    return cache_dir() / "downloads" / NAMED_MODELS[MODEL].gguf


def hf_folder() -> Path:
    from steerguard.export.models import named_model_dir

    return named_model_dir(MODEL)


def sh(cmd: list[str], log: Path | None = None) -> int:
    print("+ " + " ".join(cmd), flush=True)
    if log is None:
        return subprocess.run(cmd).returncode
    with open(log, "w") as f:
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode


def prepare(a: argparse.Namespace) -> None:
    """The small guard, the guarded and unguarded int4 bundles, and onnxruntime-genai's int4 export, where
    missing. The guard is calibrated on a small sample: decode speed does not depend on what it learned."""
    st = [sys.executable, "-m", "steerguard", "--threads", str(a.threads)]
    if not (INT4 / "manifest.json").exists():
        if not GUARD.exists():
            sh(st + ["calibrate", MODEL, "-o", str(GUARD), "--max-per-source", "30", "--refusal-targets", "30",
                     "--refusal-epochs", "1", "--no-answer-guard"])
        sh(st + ["export", MODEL, "--guard", str(GUARD), "-o", str(INT4), "--precision", "int4"])
    if not (INT4_UNGUARDED / "manifest.json").exists():
        sh(st + ["export", MODEL, "--unguarded", "-o", str(INT4_UNGUARDED), "--precision", "int4"])
    python = PEERS / "genai" / "bin" / "python"
    if python.exists() and not (GENAI_INT4 / "genai_config.json").exists():
        # as bench/peers/setup.sh builds the demo's genai-int4 (block 32, its default accuracy level), through
        # the shim that maps transformers 5's per-layer-type rotary settings to what the builder reads (the
        # builder as shipped stops with KeyError: 'rope_type'; bench/peers/genai_build_gemma3.py)
        rc = sh([str(python), str(ROOT / "bench" / "peers" / "genai_build_gemma3.py"), "-i", str(hf_folder()), "-o",
                 str(GENAI_INT4), "-p", "int4", "-e", "cpu", "-c", str(PEERS / "genai-build-cache"),
                 "--extra_options", "block_size=32"], log=GENAI_LOG)
        print(f"onnxruntime-genai builder exit {rc} (log: {GENAI_LOG})", flush=True)


def reference_tokens(ids: list[int], n: int, threads: int) -> list[int] | None:
    """Greedy tokens of the fp32 model (the Q4_K_M GGUF dequantized) in transformers, end of turn and EOS
    suppressed as the runners do; None where torch is not installed."""
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(hf_folder(), dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    suppress = sorted({1, 106, *(eos if isinstance(eos, list) else [eos] if eos is not None else [])})
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             suppress_tokens=suppress)
    return out[0, len(ids):].tolist()


def genai_status() -> str:
    """Why the genai row is missing: the builder's last error line, or the missing venv."""
    if not (PEERS / "genai" / "bin" / "python").exists():
        return f"skipped: {PEERS / 'genai'} missing (bash bench/peers/setup.sh genai)"
    if GENAI_LOG.exists():
        lines = [x for x in GENAI_LOG.read_text().splitlines() if x.strip()]
        errors = [x for x in lines if "Error" in x or "error" in x or "not supported" in x.lower()]
        return "builder failed: " + (errors or lines or ["(empty log)"])[-1].strip()[:300]
    return f"skipped: {GENAI_INT4} missing (python bench/gemma_speed.py --prepare)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=11, help="alternating rounds, one timed run per runner each")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=68)
    ap.add_argument("--prepare", action="store_true", help="build missing bundles and the genai export first")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "gemma_speed")
    a = ap.parse_args()
    if a.prepare:
        prepare(a)

    from steerguard.runtime.bench import prompt_of_length
    from steerguard.runtime.model import GuardedModel

    if not (INT4 / "manifest.json").exists():
        raise SystemExit(f"{INT4} missing: python bench/gemma_speed.py --prepare")
    gm = GuardedModel.load(INT4, verify=False)
    ids = prompt_of_length(gm, a.prompt_tokens)   # what `steerguard bench --prompt-tokens` feeds itself
    del gm
    BUNDLES.mkdir(parents=True, exist_ok=True)
    ids_file = BUNDLES / "gemma_bench_ids.json"
    ids_file.write_text(json.dumps(ids))
    one = argparse.Namespace(**{**vars(a), "runs": 1})   # each start: 1 warm-up, 1 timed run

    runners: list[tuple[str, str, object]] = [
        ("int4", "steerguard int4 bundle, guarded (prompt through the layers before the split at int8, decode int4)",
         lambda: ours(INT4, one))]
    if (INT4_UNGUARDED / "manifest.json").exists():
        runners.append(("int4-unguarded", "steerguard int4, unguarded (one decoder engine, no prober)",
                        lambda: ours(INT4_UNGUARDED, one)))
    skipped: dict[str, tuple[str, str]] = {}
    genai_label = "onnxruntime-genai int4 (its model builder + the Gemma 3 rotary shim, block 32)"
    if (GENAI_INT4 / "genai_config.json").exists():
        runners.append(("genai-int4", genai_label,
                        lambda: peer("genai", PEERS / "genai/bin/python", "genai_peer.py", ids_file, one,
                                     "--model", str(GENAI_INT4), "--name", "genai-gemma-int4",
                                     "--max-length", str(GEMMA_WINDOW))))
    else:
        skipped["genai-int4"] = (genai_label, genai_status())
    gguf = gguf_path()
    runners.append(("llamacpp", "llama.cpp, the same Q4_K_M GGUF (llama-cpp-python)",
                    lambda: peer("llamacpp", PEERS / "llamacpp/bin/python", "llamacpp_peer.py", ids_file, one,
                                 "--model", str(gguf))))

    load_at_start = os.getloadavg()
    if load_at_start[0] > 1.3:
        print(f"warning: load average {load_at_start[0]:.2f} at the start: other processes share the cores, "
              "these timings are not the machine's", flush=True)
    start = datetime.datetime.now(datetime.timezone.utc)
    runs: dict[str, list[dict]] = {k: [] for k, _, _ in runners}
    errors: dict[str, str] = {}
    extra: dict[str, dict] = {}
    for i in range(a.rounds):
        for key, _, run in runners:
            if key in errors:
                continue
            r = run()
            if "error" in r:
                errors[key] = r["error"]
                print(f"round {i + 1}: {key}: {r['error']}", flush=True)
                continue
            if r.get("prompt_tokens") != len(ids):
                raise SystemExit(f"{key} timed a {r.get('prompt_tokens')}-token prompt, not the {len(ids)} ids")
            runs[key].append({"decode_tok_s": r["decode_tok_s"], "ttft_ms": r["ttft_ms"]})
            extra[key] = {k: r[k] for k in ("versions", "first_tokens", "precision") if k in r}
            print(f"round {i + 1}: {key:<15} {r['decode_tok_s']:7.1f} tok/s, first token {r['ttft_ms']:6.1f} ms",
                  flush=True)
    end = datetime.datetime.now(datetime.timezone.utc)

    # greedy tokens against the fp32 model in transformers (the weights all three quantize), as a check that
    # every runner computes this model: how many of the first 16 new tokens equal the reference's, from the start
    from steerguard.runtime.sampling import Sampling

    for key, bundle in (("int4", INT4), ("int4-unguarded", INT4_UNGUARDED)):
        if key in extra:
            gm = GuardedModel.load(bundle, verify=False, threads=a.threads)
            r = gm.generate_batch([ids], Sampling(max_new_tokens=16, ignore_eos=True))[0]
            extra[key]["first_tokens"] = r.token_ids
            extra[key]["guard_fired"] = r.fired   # fired: the refusal head answered, another path than timed
            del gm
    reference = reference_tokens(ids, 16, a.threads)

    def agree(key: str) -> str:
        theirs = extra.get(key, {}).get("first_tokens")
        if not theirs or not reference:
            return "—"
        n = next((j for j, (x, y) in enumerate(zip(reference, theirs)) if x != y), min(len(theirs), 16))
        return f"{n}/{min(len(theirs), len(reference))}"

    base = runs["int4"]
    rows = {}
    for key, label, _ in runners:
        rs = runs[key]
        if not rs:
            rows[key] = {"label": label, "error": errors.get(key, "no runs")}
            continue
        n = min(len(rs), len(base))
        rows[key] = {"label": label, "decode_tok_s": statistics.median(x["decode_tok_s"] for x in rs),
                     "ttft_ms": statistics.median(x["ttft_ms"] for x in rs), "runs": rs,
                     "vs_int4": statistics.median(base[j]["decode_tok_s"] / rs[j]["decode_tok_s"] for j in range(n))
                     if n else None,
                     "first_tokens_agree": agree(key), **extra.get(key, {})}
    for key, (label, why) in skipped.items():
        rows[key] = {"label": label, "error": why}

    cmd = (f"python bench/gemma_speed.py --rounds {a.rounds} --new-tokens {a.new_tokens} "
           f"--prompt-tokens {a.prompt_tokens} --threads {a.threads}")
    lines = [f"`{cmd}`, {start:%Y-%m-%d %H:%M} to {end:%H:%M} UTC; {machine()}; load average "
             f"{load_at_start[0]:.2f} at the start.",
             f"Gemma 3 270M, {len(ids)}-token prompt (the same ids for every runner), {a.new_tokens} new tokens, "
             f"greedy, batch 1, {a.threads} threads; {a.rounds} alternating rounds, each runner in a fresh process "
             "(1 warm-up + 1 timed run) per round; medians over the rounds.", "",
             "| runner | decode tok/s | time to first token | guarded int4 / this, decode (median of per-round ratios) "
             "| first new tokens equal to transformers fp32's, from the start |",
             "|---|---|---|---|---|"]
    for key in [k for k, _, _ in runners] + list(skipped):
        r = rows[key]
        if "error" in r:
            lines.append(f"| {r['label']} | {r['error']} | | | |")
        else:
            ratio = "—" if key == "int4" else f"{r['vs_int4']:.3f}"
            lines.append(f"| {r['label']} | {r['decode_tok_s']:.1f} | {r['ttft_ms']:.1f} ms | {ratio} "
                         f"| {r['first_tokens_agree']} |")
    text = "\n".join(lines) + "\n"
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(
        {"command": cmd, "start": start.isoformat(timespec="seconds"), "end": end.isoformat(timespec="seconds"),
         "machine": machine(), "load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg(),
         "prompt_ids": ids, "new_tokens": a.new_tokens, "threads": a.threads, "rounds": a.rounds,
         "reference_first_tokens": reference, "gguf": str(gguf), "rows": rows}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
