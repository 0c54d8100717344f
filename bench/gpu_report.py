"""The device script's first and last stages (bench/device.sh).

    python bench/gpu_report.py env FILE                      # the machine and library versions, as JSON
    python bench/gpu_report.py report WORK_DIR OUT_DIR [--dry-run]

`report` reads WORK_DIR/<stage>.json for each stage of bench/device.sh (any may be
missing: that stage failed or was skipped, which WORK_DIR/stages.jsonl records) and writes OUT_DIR/gpu.json
and OUT_DIR/gpu.md: the issue's done-when checks first, then every table."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

STAGES = ("env", "export", "parity", "speed", "peer", "placement", "kv16_parity", "kv16_speed", "hostkv_speed")
# the optional stages, after the issue's: what each measures
EXTRAS = {"kv16_parity": "fp16 with an fp16 KV cache: parity", "kv16_speed": "fp16 with an fp16 KV cache: speed",
          "hostkv_speed": "fp32 with the KV cache in host memory (STEERGUARD_KV=host): speed"}


def load(work: Path) -> dict:
    data: dict = {"stages": []}
    for name in STAGES:
        path = work / f"{name}.json"
        if path.is_file():
            try:
                data[name] = json.loads(path.read_text())
            except ValueError as e:
                data[name] = {"error": f"unreadable {path.name}: {e}"}
    stages = work / "stages.jsonl"
    if stages.is_file():
        data["stages"] = [json.loads(line) for line in stages.read_text().splitlines() if line.strip()]
    return data


def pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def num(x: float | None, digits: int = 1) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def status(rc: int | str) -> str:
    return {0: "ok", 124: "timed out", 137: "killed at its time limit", "skipped": "skipped"}.get(rc, f"failed ({rc})")


def stage_lines(data: dict) -> list[str]:
    rows = [[s["stage"], status(s["rc"]), str(s["seconds"]), s.get("note", "")] for s in data["stages"]]
    return table(["stage", "status", "seconds", "note"], rows)


def parity_lines(p: dict) -> list[str]:
    if "error" in p:
        return [f"parity: {p['error']}"]
    ref = p["reference"]
    out = [f"{p['n']} prompts from the shipped eval sets, {p['new_tokens']} greedy tokens; reference: "
           f"`{Path(ref['bundle']).name}` on the CPU (fired on {ref.get('fired', '—')})", ""]
    rows = []
    for name, b in p["bundles"].items():
        if "error" in b:
            rows.append([name, b["error"][:120], "", "", "", ""])
            continue
        s, m = b["single"], b["batched"]
        rows.append([f"{name} on {p['backend']}", f"{pct(s.get('greedy_identical'))} of {s['n']}",
                     f"{pct(m.get('greedy_identical'))} of {m['n']} ({m['rows']} rows)",
                     num(s.get("first_divergence_median"), 0), num(s.get("risk_max_abs_diff"), 5),
                     f"{pct(s.get('decisions_agree'))}; eval sets {pct(b.get('eval_decisions_agree'))} of "
                     f"{b.get('eval_decisions_n')}"])
    return out + table(["bundle", "greedy identical (one request)", "greedy identical (batched)",
                        "first divergence (median token)", "max |risk diff|", "decisions agree"], rows)


def fire_lines(p: dict) -> list[str]:
    if "error" in p:
        return []
    cols = [("CPU fp32 (reference)", p["reference"].get("fire_rates", {}))]
    cols += [(f"{p['backend']} {n}", b.get("fire_rates", {})) for n, b in p["bundles"].items() if "error" not in b]
    rows = []
    for name in cols[0][1]:
        rows.append([name, str(cols[0][1][name]["n"])] + [pct(c.get(name, {}).get("fire_rate")) for _, c in cols])
    return table(["eval set", "prompts"] + [c for c, _ in cols], rows)


def speed_lines(s: dict, peer: dict | None) -> list[str]:
    out = [f"prompt {s.get('prompt_tokens', '—')} tokens, {s['new_tokens']} new tokens per row, greedy, median of "
           f"{s['runs']} runs; tok/s per row (aggregate = x batch); overhead = guarded decode time per token over "
           "unguarded", ""]
    rows = []
    for prec, rec in s["precisions"].items():
        if "error" in rec:
            rows.append([prec, "", rec["error"][:120], "", "", "", ""])
            continue
        for batch, r in rec["batches"].items():
            if "error" in r:
                rows.append([prec, batch, r["error"][:120], "", "", "", ""])
                continue
            g, u = r["guarded"], r["unguarded"]
            rows.append([prec, batch, f"{num(g['decode_tok_s'])} ({num(g['aggregate_tok_s'], 0)})",
                         f"{num(u['decode_tok_s'])} ({num(u['aggregate_tok_s'], 0)})", f"{num(r['guard_overhead_pct'], 2)}%",
                         num(g["ttft_ms"]), num(u["ttft_ms"])])
    for dtype, rec in (peer or {}).get("dtypes", {}).items():
        for batch, r in rec.items():
            if batch == "error" or "error" in (r if isinstance(r, dict) else {}):
                rows.append([f"transformers {dtype}", batch, str(r)[:120], "", "", "", ""])
                continue
            rows.append([f"transformers {dtype}", batch, f"{num(r['decode_tok_s'])} ({num(r['aggregate_tok_s'], 0)})",
                         "", "", num(r["ttft_ms"]), ""])
    return out + table(["precision", "batch", "guarded tok/s (aggregate)", "unguarded tok/s (aggregate)",
                        "guard overhead", "first token ms (guarded)", "first token ms (unguarded)"], rows)


def placement_lines(pl: dict) -> list[str]:
    rows = []
    for name, engines in pl.get("bundles", {}).items():
        if "error" in engines:
            rows.append([name, "", engines["error"][:120], "", ""])
            continue
        for engine, c in engines.items():
            rows.append([name, engine, ", ".join(f"{k.removesuffix('ExecutionProvider')} {v}" for k, v in c["providers"].items()),
                         ", ".join(f"{k} {v}" for k, v in c["cpu_ops"].items()) or "—", str(c["memcpy_nodes"])])
    return table(["bundle", "engine", "nodes per provider", "operators on the CPU", "copy nodes"], rows)


def checks(data: dict) -> list[tuple[str, bool | None, str]]:
    """The issue's done-when checks: (what, passed or None when not measured, the numbers)."""
    p, s, peer = data.get("parity", {}), data.get("speed", {}), data.get("peer", {})
    b = p.get("bundles", {})
    fp32 = b.get("fp32", {}).get("single", {})
    # decisions: the fp32 bundle's on every eval prompt scored (else the parity prompts); fp16's shown beside
    agree = {k: x.get("eval_decisions_agree", x.get("single", {}).get("decisions_agree")) for k, x in b.items()}
    out = [("greedy tokens identical to the CPU fp32 bundle >= 99% (fp32)",
            None if fp32.get("greedy_identical") is None else fp32["greedy_identical"] >= 0.99,
            pct(fp32.get("greedy_identical"))),
           ("guard decisions agree >= 99.5% (fp32)", None if agree.get("fp32") is None else agree["fp32"] >= 0.995,
            ", ".join(f"{k} {pct(v)} of {b[k].get('eval_decisions_n', '—')}" for k, v in agree.items()))]
    over = [(k, r["guard_overhead_pct"]) for k, v in s.get("precisions", {}).items()
            for bt, r in v.get("batches", {}).items() if bt == "1" and "guard_overhead_pct" in r]
    out.append(("guard overhead <= 2% of decode time (batch 1)", None if not over else max(o for _, o in over) <= 2,
                ", ".join(f"{k} {o:.2f}%" for k, o in over)))
    for prec in ("fp32", "fp16"):
        ours = s.get("precisions", {}).get(prec, {}).get("batches", {}).get("1", {}).get("guarded", {}).get("decode_tok_s")
        theirs = peer.get("dtypes", {}).get(prec, {}).get("1", {}).get("decode_tok_s")
        out.append((f"batch-1 decode tok/s >= transformers eager ({prec})",
                    None if ours is None or theirs is None else ours >= theirs, f"{num(ours)} vs {num(theirs)}"))
    largest = {k: max(v.get("batches", {}), key=int, default=None) for k, v in s.get("precisions", {}).items()}
    agg = {k: (b, s["precisions"][k]["batches"][b].get("guarded", {}).get("aggregate_tok_s")) for k, b in largest.items() if b}
    out.append(("largest batch's aggregate reported (64 on the GPU)", None if not any(v for _, v in agg.values()) else True,
                ", ".join(f"{k} batch {b}: {num(v, 0)} tok/s" for k, (b, v) in agg.items())))
    return out


def markdown(data: dict, dry: bool) -> str:
    env = data.get("env", {})
    head = "# steerguard on the GPU" + (" — dry run on the CPU" if dry else "")
    lines = [head, "", f"{env.get('date', '—')}; {env.get('gpu', 'no GPU')}; onnxruntime {env.get('onnxruntime', '—')} "
             f"({', '.join(env.get('providers', []))}); Python {env.get('python', '—')}; "
             f"torch {env.get('torch', '—')}, transformers {env.get('transformers', '—')}", ""]
    if dry:
        lines += ["Dry run: the CPU backend with onnxruntime-allocated (device) buffers stands in for CUDA, fp16 runs "
                  "on onnxruntime's CPU kernels, sizes are tiny. The numbers check the script, not a GPU.", ""]
    lines += ["## Done when", ""]
    lines += table(["check", "result", "numbers"],
                   [[w, {True: "pass", False: "FAIL", None: "not measured"}[ok], n] for w, ok, n in checks(data)])
    if "parity" in data:
        lines += ["", "## Parity with the CPU", ""] + parity_lines(data["parity"])
        lines += ["", "## Guard fire rates on the shipped eval sets", ""] + fire_lines(data["parity"])
    if "speed" in data and "precisions" in data["speed"]:
        lines += ["", "## Speed", ""] + speed_lines(data["speed"], data.get("peer"))
    for extra, title in EXTRAS.items():
        if extra in data:
            lines += ["", f"## {title}", ""]
            lines += parity_lines(data[extra]) if extra.endswith("parity") else speed_lines(data[extra], None)
    if "placement" in data:
        lines += ["", "## Where the nodes ran", ""] + placement_lines(data["placement"])
    if "export" in data:
        ex = data["export"]
        lines += ["", "## Bundles", "", f"model load {ex.get('load_s', '—')} s" +
                  (f"; {ex['guard_binding']}" if ex.get("guard_binding") else "") + (f"; {ex['error']}" if "error" in ex else ""), ""]
        lines += table(["bundle", "MB", "export s"], [[k, str(v.get("mb", "—")), str(v.get("seconds", v.get("error", "")))[:120]]
                                                      for k, v in ex.get("bundles", {}).items()])
    lines += ["", "## Stages", ""] + stage_lines(data)
    return "\n".join(lines) + "\n"


def environment() -> dict:
    """Date, GPU (nvidia-smi), Python, and the versions of onnxruntime (and its providers), torch, transformers."""
    env: dict = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "python": platform.python_version(),
                 "machine": f"{platform.machine()}, {platform.node()}"}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,compute_cap",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        env["gpu"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        env["gpu"] = f"no nvidia-smi ({type(e).__name__})"
    try:
        import onnxruntime as ort

        env["onnxruntime"] = f"{ort.__version__} ({Path(ort.__file__).parent})"
        env["providers"] = ort.get_available_providers()
    except ImportError as e:
        env["onnxruntime"] = f"not importable: {e}"
    for name in ("torch", "transformers", "numpy", "gguf"):
        try:
            env[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            env[name] = "absent"
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    en = sub.add_parser("env")
    en.add_argument("file", type=Path)
    rp = sub.add_parser("report")
    rp.add_argument("work", type=Path)
    rp.add_argument("out", type=Path)
    rp.add_argument("--dry-run", action="store_true")
    a = ap.parse_args(argv)
    if a.command == "env":
        env = environment()
        a.file.write_text(json.dumps(env, indent=1) + "\n")
        print(json.dumps(env))
        return 0
    data = load(a.work)
    data["dry_run"] = a.dry_run
    data["checks"] = [{"check": w, "passed": ok, "numbers": n} for w, ok, n in checks(data)]
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "gpu.json").write_text(json.dumps(data, indent=1) + "\n")
    md = markdown(data, a.dry_run)
    (a.out / "gpu.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
