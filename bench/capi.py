"""libsteerguard (the C library) against the Python runtime on real bundles, in one run:

1. Same answers: on 200 shipped prompts (100 harmful, 100 benign) the C library's greedy token ids, risks and
   guard decisions against GuardedModel's, for each bundle given (fp32 and int4).
2. Same tokens: its tokenizer against `tokenizers` on the test corpus (tests/test_capi.py: shipped data,
   this repository's code and docs, synthetic emoji / mixed-script / whitespace strings) for the real
   tokenizer of each bundle given and of the reference model's bundle if present.
3. Lean and fast: the C example's binary and library size; for each bundle, alternating fresh processes of
   the C library (csrc/tests/capi_bench.c) and of the Python runtime on the same prompt ids: start-up (process
   start to model loaded), peak RSS, time to first token and decode tokens/s at batch 1, 128 new tokens;
   onnxruntime-genai on the same model when its peer venv exists (bench/peers/setup.sh genai).

    python bench/capi.py --bundle fp32=runs/demo-fp32 --bundle int4=runs/demo-int4 [--out docs/capi]
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
PEERS = Path(os.environ.get("STEERGUARD_CACHE", Path.home() / ".cache" / "steerguard")) / "peers"
PYTHON_WORKER = """
import json, sys, time
t0 = time.perf_counter()
from steerguard.runtime import GuardedModel
from steerguard.runtime.sampling import Sampling
bundle, threads, new, runs, ids = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5])
m = GuardedModel.load(bundle, threads=threads)
load_s = time.perf_counter() - t0
out = []
for _ in range(runs):
    r = m.generate(ids, Sampling(max_new_tokens=new, ignore_eos=True))
    out.append({"ttft_ms": 1000 * r.timings["first_token_s"], "decode_tok_s": r.timings["decode_tok_s"],
                "tokens": len(r.token_ids), "fired": r.fired})
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"load_s": load_s, "runs": out, "peak_rss_mb": int(hwm.split()[1]) / 1024}))
"""


def parity_prompts(n: int) -> list[dict]:
    data = ROOT / "steerguard" / "data" / "eval"

    def rows(name: str) -> list[str]:
        return [json.loads(line)["prompt"] for line in (data / name).read_text().splitlines()]

    harmful, sounds, chat = rows("harmful_heldout.jsonl"), rows("sounds_dangerous.jsonl"), rows("benign_conversational.jsonl")
    half = n // 2
    picked = [(p, 1) for p in harmful[:half]] + [(p, 0) for p in (sounds[:half // 2] + chat[:half - half // 2])]
    return [{"prompt": p, "harmful": label} for p, label in picked]


def answers_parity(lib, bundle: Path, prompts: list[dict], new_tokens: int, threads: int) -> dict:
    from steerguard.runtime.model import GuardedModel
    from steerguard.runtime.sampling import Sampling

    gm = GuardedModel.load(bundle, threads=threads)
    same_ids = same_decision = same_text = fired = 0
    risk_diffs = []
    with lib.model(bundle, threads=threads) as m:
        for row in prompts:
            chat = [{"role": "user", "content": row["prompt"]}]
            want = gm.generate(chat, Sampling(max_new_tokens=new_tokens))
            got = m.generate(chat, max_new_tokens=new_tokens)
            same_ids += got.token_ids == want.token_ids
            same_text += got.text == want.text
            same_decision += got.fired == want.fired
            fired += want.fired
            if want.risk is not None:
                risk_diffs.append(abs(got.risk - want.risk))
    n = len(prompts)
    return {"prompts": n, "new_tokens": new_tokens, "same_token_ids": same_ids, "same_text": same_text,
            "same_decision": same_decision, "max_risk_diff": max(risk_diffs) if risk_diffs else None,
            "fired": fired}


def tokenizer_parity(lib, bundle: Path) -> dict:
    from test_capi import tokenizer_corpus
    from tokenizers import Tokenizer

    reference = Tokenizer.from_file(str(bundle / "tokenizer" / "tokenizer.json"))
    corpus = tokenizer_corpus()
    t0 = time.perf_counter()
    with lib.model(bundle, threads=1) as m:
        mismatches = [s for s in corpus if m.tokenize(s) != reference.encode(s, add_special_tokens=False).ids]
    return {"strings": len(corpus), "mismatches": len(mismatches), "examples": mismatches[:3],
            "seconds": round(time.perf_counter() - t0, 1)}


def run_c(binary: Path, bundle: Path, ids: list[int], threads: int, new: int, runs: int) -> dict:
    t0 = time.perf_counter()
    out = subprocess.run([str(binary), str(bundle), str(threads), str(new), str(runs), *map(str, ids)],
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    result["process_s"] = time.perf_counter() - t0
    return result


def run_python(bundle: Path, ids: list[int], threads: int, new: int, runs: int) -> dict:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", PYTHON_WORKER, str(bundle), str(threads), str(new), str(runs),
                          json.dumps(ids)], capture_output=True, text=True, check=True, cwd=ROOT)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - t0
    return result


def run_genai(model: Path, ids: list[int], threads: int, new: int, runs: int) -> dict | None:
    python = PEERS / "genai" / "bin" / "python"
    if not python.exists() or not model.exists():
        return None
    ids_file = Path("/tmp/steerguard-capi-ids.json")
    ids_file.write_text(json.dumps(ids))
    out = subprocess.run([str(python), str(ROOT / "bench" / "peers" / "genai_peer.py"), "--ids-file", str(ids_file), "--model",
                          str(model), "--threads", str(threads), "--new-tokens", str(new), "--runs", str(runs),
                          "--warmup", "1"], capture_output=True, text=True, cwd=ROOT / "bench" / "peers")
    if out.returncode:
        print(out.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_of(results: list[dict], key: str) -> float:
    """The median over processes of each process's median run (its first run warms up and is dropped)."""
    return statistics.median(statistics.median(r[key] for r in res["runs"][1:]) for res in results)


def speed(binary: Path, bundle: Path, ids: list[int], threads: int, new: int, pairs: int, runs: int,
          genai: Path | None) -> dict:
    c, py, peer = [], [], []
    for i in range(pairs):
        order = (("c", "py") if i % 2 == 0 else ("py", "c"))
        for who in order:
            if who == "c":
                c.append(run_c(binary, bundle, ids, threads, new, runs))
            else:
                py.append(run_python(bundle, ids, threads, new, runs))
        if genai is not None:
            got = run_genai(genai, ids, threads, new, runs)
            if got:
                peer.append(got)
    out = {"pairs": pairs, "runs_per_process": runs}
    for name, res in (("c", c), ("python", py)):
        out[name] = {"decode_tok_s": median_of(res, "decode_tok_s"), "ttft_ms": median_of(res, "ttft_ms"),
                     "load_s": statistics.median(r["load_s"] for r in res),
                     "process_s": statistics.median(r["process_s"] for r in res),
                     "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in res)}
    out["c_over_python"] = {
        "decode": statistics.median(statistics.median(r["decode_tok_s"] for r in a["runs"][1:]) /
                                    statistics.median(r["decode_tok_s"] for r in b["runs"][1:]) for a, b in zip(c, py)),
        "ttft": statistics.median(statistics.median(r["ttft_ms"] for r in a["runs"][1:]) /
                                  statistics.median(r["ttft_ms"] for r in b["runs"][1:]) for a, b in zip(c, py))}
    if peer:
        out["onnxruntime-genai"] = {"decode_tok_s": statistics.median(p["decode_tok_s"] for p in peer),
                                    "ttft_ms": statistics.median(p["ttft_ms"] for p in peer), "processes": len(peer)}
    return out


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores"


def markdown(report: dict) -> str:
    made = "; ".join(f"{part}: `{m['command']}` ({m['date']})" for part, m in report["made_by"].items())
    lines = ["# libsteerguard vs the Python runtime", "", f"On {report['machine']}. Made by: {made}.", "",
             "## Same answers (greedy, chat-formatted shipped prompts: 100 harmful, 100 benign)", "",
             "| bundle | prompts | new tokens | same token ids | same text | same decision | max risk difference |",
             "|---|---|---|---|---|---|---|"]
    for name, p in report["answers"].items():
        diff = "-" if p["max_risk_diff"] is None else f"{p['max_risk_diff']:.2e}"
        lines.append(f"| {name} | {p['prompts']} | {p['new_tokens']} | {p['same_token_ids']} | {p['same_text']} | "
                     f"{p['same_decision']} | {diff} |")
    lines += ["", "## Same tokens (against `tokenizers`)", "", "| tokenizer | strings | mismatches |", "|---|---|---|"]
    for name, t in report["tokenizers"].items():
        lines.append(f"| {name} | {t['strings']} | {t['mismatches']} |")
    s = report["size"]
    lines += ["", "## Lean and fast (batch 1, 128 new tokens, 2 threads; medians over alternating fresh processes)", "",
              f"Binary: `chat` {s['chat_kb']:.0f} KB + `libsteerguard.so` {s['lib_kb']:.0f} KB "
              f"(+ onnxruntime's {s['onnxruntime_mb']:.0f} MB library, which the Python runtime loads too).", "",
              "| bundle | runtime | start-up s (load) | process s | peak RSS MB | first token ms | decode tok/s |",
              "|---|---|---|---|---|---|---|"]
    for name, sp in report["speed"].items():
        for who in ("c", "python"):
            r = sp[who]
            lines.append(f"| {name} | {'C library' if who == 'c' else 'Python runtime'} | {r['load_s']:.2f} | "
                         f"{r['process_s']:.2f} | {r['peak_rss_mb']:.0f} | {r['ttft_ms']:.1f} | {r['decode_tok_s']:.1f} |")
        if "onnxruntime-genai" in sp:
            g = sp["onnxruntime-genai"]
            lines.append(f"| {name} | onnxruntime-genai | | | | {g['ttft_ms']:.1f} | {g['decode_tok_s']:.1f} |")
        ratio = sp["c_over_python"]
        lines.append(f"| {name} | C / Python (median of paired processes) | | | | {ratio['ttft']:.3f} | "
                     f"{ratio['decode']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", action="append", required=True, help="NAME=FOLDER, e.g. fp32=runs/demo-fp32")
    ap.add_argument("--genai", action="append", default=[], help="NAME=FOLDER of an onnxruntime-genai model for bundle NAME")
    ap.add_argument("--reference", type=Path, default=ROOT / "runs" / "ref-int8", help="a reference-model bundle (tokenizer)")
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--parity-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "capi")
    ap.add_argument("--parts", default="answers,tokenizers,speed",
                    help="what to run; the other parts are kept from the --out JSON of an earlier run")
    a = ap.parse_args()
    bundles = {k: Path(v) for k, v in (b.split("=", 1) for b in a.bundle)}
    genai = {k: Path(v) for k, v in (g.split("=", 1) for g in a.genai)}

    from steerguard.runtime.model import GuardedModel
    from steerguard.runtime.native import NativeLibrary
    from test_capi import build

    out = build("c", "-DCMAKE_BUILD_TYPE=Release")
    lib = NativeLibrary.load(out / "libsteerguard.so")
    parts = set(a.parts.split(","))
    earlier = json.loads(a.out.with_suffix(".json").read_text()) if a.out.with_suffix(".json").exists() else {}
    if set(parts) != {"answers", "tokenizers", "speed"} and "made_by" not in earlier:
        ap.error(f"--parts {a.parts} keeps the other parts from {a.out.with_suffix('.json')}, which has none")
    command = " ".join(["python", "bench/capi.py", *sys.argv[1:]])
    today = datetime.date.today().isoformat()
    report = {"machine": machine(),
              "made_by": {part: ({"command": command, "date": today} if part in parts else earlier["made_by"][part])
                          for part in ("answers", "tokenizers", "speed")},
              **{part: {} if part in parts else earlier.get(part, {}) for part in ("answers", "tokenizers", "speed")}}
    prompts = parity_prompts(a.prompts)
    for name, bundle in bundles.items() if "answers" in parts else ():
        report["answers"][name] = answers_parity(lib, bundle, prompts, a.parity_tokens, a.threads)
        print(name, "answers", report["answers"][name], flush=True)
    tokenizer_bundles = {GuardedModel.load(next(iter(bundles.values()))).manifest.model["name"]: next(iter(bundles.values()))}
    if a.reference.exists():
        tokenizer_bundles["Qwen2.5-Coder-0.5B-Instruct (reference)"] = a.reference
    for name, bundle in tokenizer_bundles.items() if "tokenizers" in parts else ():
        report["tokenizers"][name] = tokenizer_parity(lib, bundle)
        print(name, "tokenizer", report["tokenizers"][name], flush=True)
    ort_lib = next((Path(__import__("onnxruntime").__file__).parent / "capi").glob("libonnxruntime.so*"))
    report["size"] = {"chat_kb": (out / "chat").stat().st_size / 1024,
                      "lib_kb": (out / "libsteerguard.so").resolve().stat().st_size / 1024,
                      "onnxruntime_mb": ort_lib.stat().st_size / 1e6}
    ids = GuardedModel.load(next(iter(bundles.values()))).encode([{"role": "user", "content": "Write a short story about a lighthouse keeper."}])
    for name, bundle in bundles.items() if "speed" in parts else ():
        report["speed"][name] = speed(out / "capi_bench", bundle, ids, a.threads, a.new_tokens, a.pairs, a.runs,
                                      genai.get(name))
        print(name, "speed", json.dumps(report["speed"][name]), flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    a.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
