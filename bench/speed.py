"""Decode speed of the guarded engine chain against the same model unsplit and unguarded, and against
what users would pick instead, all in one run on the same prompt ids.

    python bench/speed.py [--guard runs/final-guard] [--runs 5] [--threads 2] [--new-tokens 128]

Writes docs/bench_speed.md and docs/bench_speed.json. Peers come from bench/peers (set them up with
`bash bench/peers/setup.sh`); a peer whose venv is missing is reported as skipped.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("STEERGUARD_CACHE", Path.home() / ".cache" / "steerguard"))
PEERS = CACHE / "peers"
BUNDLES = CACHE / "bench"


def ensure_bundles(guard_dir: Path | None) -> dict[str, Path]:
    """The demo model exported guarded (split, int8 prober) at fp32, int8 and int4, and unguarded
    (one decoder engine) at fp32."""
    paths = {"guarded": BUNDLES / "demo-guarded", "unsplit": BUNDLES / "demo-unsplit",
             "int8": BUNDLES / "demo-guarded-int8", "int4": BUNDLES / "demo-guarded-int4-pre8",
             "int4-all": BUNDLES / "demo-guarded-int4-all"}
    if all((p / "manifest.json").exists() for p in paths.values()):
        return paths
    from steerguard.export.bundle import export_bundle
    from steerguard.export.calibrate import CalibrationConfig, CalibrationData, calibrate
    from steerguard.export.guard import Guard
    from steerguard.export.models import load_model

    lm = load_model("demo")
    if guard_dir and guard_dir.exists():
        guard = Guard.load(guard_dir)
    else:   # speed does not depend on what the guard learned: a small calibration will do
        guard = calibrate(lm, CalibrationData.default(), CalibrationConfig(max_per_source=60, refusal_targets=60))
    export_bundle(lm, guard, paths["guarded"])
    export_bundle(lm, None, paths["unsplit"])
    for precision in ("int8", "int4"):   # int4: the default, pre engine at int8
        export_bundle(lm, guard, paths[precision], precision=precision, block_size=32)
    export_bundle(lm, guard, paths["int4-all"], precision="int4", block_size=32, engine_precision={"pre": "int4"})
    return paths


GUARDED = "steerguard guarded chain fp32 (split at the guard's layer, int8 prober)"
UNSPLIT = "steerguard same model unsplit, unguarded, fp32"
GENAI = "onnxruntime-genai fp32"
INT8 = "steerguard guarded chain int8 (MatMulNBits, block 32)"
INT4 = "steerguard guarded chain int4 (the default: prompt through the layers before the split at int8, decode at int4)"
INT4_ALL = "steerguard guarded chain int4 in every engine (guard decisions shift)"
GENAI_INT4 = "onnxruntime-genai int4 (block 32)"
LLAMACPP = "llama.cpp Q4_1 GGUF (llama-cpp-python)"


def run_json(cmd: list[str], env: dict | None = None) -> dict:
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def ours(bundle: Path, a: argparse.Namespace, refusal: bool = False) -> dict:
    cmd = [sys.executable, "-m", "steerguard", "--threads", str(a.threads), "bench", str(bundle), "--json",
           "--runs", str(a.runs), "--warmup", "1", "--new-tokens", str(a.new_tokens),
           "--prompt-tokens", str(a.prompt_tokens)] + (["--refusal"] if refusal else [])
    return run_json(cmd)


def peer(name: str, python: Path, script: str, ids_file: Path, a: argparse.Namespace, *extra: str) -> dict:
    if not python.exists():
        return {"error": f"skipped: {python} missing (bash bench/peers/setup.sh)"}
    return run_json([str(python), str(ROOT / "bench" / "peers" / script), "--ids-file", str(ids_file),
                     "--runs", str(a.runs), "--warmup", "1", "--new-tokens", str(a.new_tokens),
                     "--threads", str(a.threads), *extra])


def paired_with_peer(bundle: Path, peer_args: tuple, a: argparse.Namespace) -> float:
    """Median ratio of decode speed, ours / peer, over alternating single runs in fresh processes."""
    ratios = []
    for _ in range(a.peer_pairs):
        mine = ours(bundle, argparse.Namespace(**{**vars(a), "runs": 1}))
        other = peer(*peer_args[:4], argparse.Namespace(**{**vars(a), "runs": 1}), *peer_args[4:])
        if "error" in mine or "error" in other:
            return float("nan")
        ratios.append(mine["decode_tok_s"] / other["decode_tok_s"])
    print(f"paired with the peer: {[round(r, 3) for r in ratios]}", flush=True)
    return statistics.median(ratios)


def paired(guarded: Path, unsplit: Path, ids: list[int], a: argparse.Namespace) -> tuple[dict, dict, dict]:
    """Alternate single runs of the two bundles (order flipped each pair) after a warm-up of each."""
    from steerguard.runtime import GuardedModel
    from steerguard.runtime.bench import bench, decode_weight_bytes

    models = {"g": GuardedModel.load(guarded, threads=a.threads), "u": GuardedModel.load(unsplit, threads=a.threads)}
    runs: dict[str, list] = {"g": [], "u": []}
    for m in models.values():
        bench(m, ids, a.new_tokens, runs=1, warmup=1)
    for i in range(a.pairs):
        for k in (("g", "u") if i % 2 == 0 else ("u", "g")):
            r = bench(models[k], ids, a.new_tokens, runs=1, warmup=0)
            runs[k].append({"decode_tok_s": r.decode_tok_s, "ttft_ms": r.ttft_ms})
    out = {}
    for k, m in models.items():
        out[k] = {"decode_tok_s": statistics.median(x["decode_tok_s"] for x in runs[k]),
                  "ttft_ms": statistics.median(x["ttft_ms"] for x in runs[k]), "runs": runs[k],
                  "weight_bytes": decode_weight_bytes(m)}
    ratio = {"decode": statistics.median(g["decode_tok_s"] / u["decode_tok_s"] for g, u in zip(runs["g"], runs["u"])),
             "ttft": statistics.median(g["ttft_ms"] / u["ttft_ms"] for g, u in zip(runs["g"], runs["u"]))}
    print(f"paired: guarded {out['g']['decode_tok_s']:.1f}, unsplit {out['u']['decode_tok_s']:.1f} tok/s; "
          f"median pair ratio decode {ratio['decode']:.3f}, first token {ratio['ttft']:.3f}", flush=True)
    return out["g"], out["u"], ratio


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--guard", type=Path, default=ROOT / "runs" / "final-guard")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--pairs", type=int, default=15, help="alternating guarded/unsplit runs")
    ap.add_argument("--peer-pairs", type=int, default=9, help="alternating int4 / onnxruntime-genai int4 runs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=68)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "bench_speed")
    a = ap.parse_args()

    bundles = ensure_bundles(a.guard)
    from steerguard.runtime.bench import copy_bandwidth_gbs, decode_weight_bytes, prompt_of_length
    from steerguard.runtime.model import GuardedModel

    gm = GuardedModel.load(bundles["guarded"], verify=False)
    ids = prompt_of_length(gm, a.prompt_tokens)
    weights = decode_weight_bytes(gm)
    del gm
    ids_file = BUNDLES / "bench_ids.json"
    ids_file.write_text(json.dumps(ids))

    rows: list[tuple[str, dict]] = []

    def add(name: str, result: dict) -> None:
        rows.append((name, result))
        shown = (f"{result['decode_tok_s']:.1f} tok/s, first token {result['ttft_ms']:.0f} ms"
                 if "error" not in result else result["error"])
        print(f"{name:<42} {shown}", flush=True)

    # the guard's overhead is a few percent, far less than this machine's drift between phases (tens of
    # seconds long, up to 30%): time the two bundles in one process, alternating single runs, and take
    # the median of the adjacent-pair ratios
    g_runs, u_runs, ratio = paired(bundles["guarded"], bundles["unsplit"], ids, a)
    add(GUARDED, g_runs)
    add(UNSPLIT, u_runs)
    add("steerguard guarded chain, refusal head path", ours(bundles["guarded"], a, refusal=True))
    genai_fp32 = ("genai", PEERS / "genai/bin/python", "genai_peer.py", ids_file)
    add(GENAI, peer(*genai_fp32, a))
    add("optimum ORTModelForCausalLM fp32", peer("optimum", PEERS / "optimum/bin/python", "optimum_peer.py",
                                                ids_file, a))
    add("transformers eager (sdpa) fp32", peer("hf", Path(sys.executable), "hf_peer.py", ids_file, a))
    add(INT8, ours(bundles["int8"], a))
    add(INT4, ours(bundles["int4"], a))
    add(INT4_ALL, ours(bundles["int4-all"], a))
    genai_int4 = ("genai", PEERS / "genai/bin/python", "genai_peer.py", ids_file, "--model", str(PEERS / "genai-int4"))
    add(GENAI_INT4, peer(*genai_int4[:4], a, *genai_int4[4:]))
    add(LLAMACPP, peer("llamacpp", PEERS / "llamacpp/bin/python", "llamacpp_peer.py", ids_file, a))
    copy = copy_bandwidth_gbs()

    by = dict(rows)
    ratios = {}
    ratios["decode guarded / unsplit (median of adjacent pairs)"] = ratio["decode"]
    ratios["first token guarded / unsplit (median of adjacent pairs)"] = ratio["ttft"]
    ratios[f"decode int4 / onnxruntime-genai int4 (median of {a.peer_pairs} alternating process pairs)"] = \
        paired_with_peer(bundles["int4"], genai_int4, a)
    ratios[f"decode guarded fp32 / onnxruntime-genai fp32 (median of {a.peer_pairs} alternating process pairs)"] = \
        paired_with_peer(bundles["guarded"], genai_fp32, a)
    for label, mine, other, key in [("decode guarded / onnxruntime-genai fp32", GUARDED, GENAI, "decode_tok_s"),
                                    ("decode int8 / fp32 (guarded)", INT8, GUARDED, "decode_tok_s"),
                                    ("decode int4 / fp32 (guarded)", INT4, GUARDED, "decode_tok_s"),
                                    ("decode int4 / onnxruntime-genai int4", INT4, GENAI_INT4, "decode_tok_s"),
                                    ("decode int4 / llama.cpp Q4_1", INT4, LLAMACPP, "decode_tok_s"),
                                    ("decode int4-everywhere / fp32 (guarded)", INT4_ALL, GUARDED, "decode_tok_s"),
                                    ("decode int4-everywhere / onnxruntime-genai int4", INT4_ALL, GENAI_INT4,
                                     "decode_tok_s")]:
        if "error" not in by[mine] and "error" not in by[other]:
            ratios[label] = by[mine][key] / by[other][key]
    if "error" not in by[INT4]:
        ratios["int4 achieved bandwidth / copy bandwidth"] = by[INT4]["achieved_gbs"] / copy
    guarded = by[GUARDED]
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    lines = ["# Decode speed — demo model (SmolLM2-135M-Instruct)", "",
             f"`python bench/speed.py --runs {a.runs} --pairs {a.pairs} --threads {a.threads}` on {date}; {machine()}.",
             f"{len(ids)}-token prompt (same ids for every runner), {a.new_tokens} new tokens, greedy, batch 1, "
             f"{a.threads} threads, median of {a.runs} runs after 1 warm-up (steerguard's guarded and unsplit "
             f"bundles: {a.pairs} alternating runs in one process; their ratio is the median of adjacent pairs, "
             "since this machine's speed drifts by up to 30% between phases tens of seconds long; likewise "
             "steerguard against onnxruntime-genai: alternating single runs in fresh processes, the median of "
             "the pairs' ratios — the table's rows, minutes apart, are not comparable to a few percent). "
             f"Copy bandwidth {copy:.1f} GB/s; "
             f"fp32 reads {weights / 1e6:.0f} MB of weights per token, so its floor is {copy * 1e9 / weights:.0f} "
             "tok/s. Achieved bandwidth = the weight bytes a bundle reads per token x tokens/s (it can exceed the "
             "copy figure: a copy reads and writes, decoding only reads).", "",
             "| runner | decode tok/s | time to first token | achieved bandwidth |", "|---|---|---|---|"]
    for name, r in rows:
        if "error" in r:
            lines.append(f"| {name} | {r['error']} | | |")
        elif "weight_bytes" not in r:   # a peer: its own bytes per token are not ours to state
            lines.append(f"| {name} | {r['decode_tok_s']:.1f} | {r['ttft_ms']:.1f} ms | — |")
        else:
            bw = r["weight_bytes"] * r["decode_tok_s"] / 1e9
            lines.append(f"| {name} | {r['decode_tok_s']:.1f} | {r['ttft_ms']:.1f} ms | {bw:.1f} GB/s "
                         f"({100 * bw / copy:.0f}% of copy; {r['weight_bytes'] / 1e6:.0f} MB/token) |")
    lines += ["", *(f"- {k}: **{v:.3f}**" for k, v in ratios.items()), ""]
    if "engine_ms_per_token" in guarded:
        lines.append("Time per token in each engine (guarded chain): " +
                     ", ".join(f"{k} {v:.2f} ms" for k, v in guarded["engine_ms_per_token"].items()))
        lines.append(f"Peak memory of the guarded chain's process (RSS): {guarded['peak_rss_mb']:.0f} MB")
    text = "\n".join(lines) + "\n"
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".md").write_text(text)
    a.out.with_suffix(".json").write_text(json.dumps({"date": date, "machine": machine(), "copy_gbs": copy,
                                                      "weight_bytes": weights, "prompt_ids": ids,
                                                      "ratios": ratios, "rows": dict(rows)}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
