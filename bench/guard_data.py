"""Which data and which prober make the default guard? Every source held out in turn, worst case first.

Phase `extract` runs the model once over every prompt of every source (the package's calibration data, the
calibration-only sets of `../shared/data`, the shipped evaluation sets) and keeps the last prompt token's state
and the mean of the post-instruction tokens at every layer (hidden states cached as `calibrate` caches them).
Phase `study` then, for each training pool x prober variant, holds out one source at a time (its calibration
rows leave with it; a pair source leaves with both sides and its styled copies), trains on the rest with the
rows `calibrate` would use, sets tau on validation rows, and scores the held-out source; the sets no pool ever
calibrates on (the shipped evaluation sets, ToViLaG) are scored by the probe trained on the whole pool.

    python bench/guard_data.py extract [--model demo] [--features DIR]
    python bench/guard_data.py study [--model demo] [--features DIR] [--out docs/guard_data_demo.json] [--variant ...]
    python bench/guard_data.py report [--model demo]      # the markdown tables of docs/guard_data_MODEL*.json

Pools: `previous` (what `calibrate` used before: pairs + Alpaca), `default` (+ the public sets shipped in the
package), `default+shared` (+ SORRY-Bench, TrustLLM, TriviaQA, OKTest, MaliciousInstruct, WizardLM from
`../shared/data`, which may not ship). Reported per pool and variant: the worst held-out harmful catch rate,
the worst benign false-fire rate (ordinary and sounds-dangerous apart), pooled held-out AUROC and TPR at 1%
FPR, and the word-matched twins (the contrast pairs of benign requests in dangerous words, `contrast-j`,
held out as a pair source, plus the shipped sounds-dangerous vs harmful evaluation sets) as F1 at <= 7% FPR.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from guard_study import f1_at_fpr  # noqa: E402

from steerguard.export.calibrate import (CalibrationConfig, CalibrationData, CalibrationTable,  # noqa: E402
                                         source_balanced_weights)
from steerguard.export.data import (PromptSet, data_path, default_benign, default_pairs, load_prompts,  # noqa: E402
                                    public_sets)
from steerguard.export.prober import auroc, tpr_at_fpr  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# a sample of what `calibrate` draws (400 of each): the study's forward passes fit a session on 2 shared cores
PER_SOURCE = 150        # prompts per prompt set (the shipped evaluation sets are scored whole)
PAIRS_PER_SOURCE = 200  # pairs per pair source


def shared_sets() -> list[PromptSet]:
    """Calibration-only sets: no license to ship them, so the default never needs them."""
    req, pub = SHARED / "requests", SHARED / "public"
    return [
        load_prompts(req / "sorry-bench-train.jsonl", 1, "turns.0", source="sorry_bench"),
        load_prompts(req / "trustllm-misuse-train.jsonl", 1, "turns.0", source="trustllm_misuse"),
        load_prompts(req / "trustllm-jailbreak-train.jsonl", 1, "turns.0", source="trustllm_jailbreak"),
        load_prompts(pub / "maliciousinstruct" / "MaliciousInstruct.txt", 1, source="maliciousinstruct"),
        load_prompts(req / "trivia_qa.jsonl", 0, "turns.0", source="trivia"),
        PromptSet("oktest", 0, [p.strip() for f in ("OKTest.csv", "OKTest_heldout.csv")
                                for p in load_prompts(pub / "oktest" / f, 0).prompts]),
        load_prompts(pub / "wizardlm" / "WizardLM_testset.jsonl", 0, "Instruction", source="wizardlm"),
    ]


def never_calibrated_sets() -> list[PromptSet]:
    ev = data_path("eval")
    return [load_prompts(ev / "harmful_heldout.jsonl", 1, source="eval_harmful"),
            load_prompts(ev / "sounds_dangerous.jsonl", 0, source="eval_sounds_dangerous"),
            load_prompts(ev / "benign_conversational.jsonl", 0, source="eval_conversational"),
            load_prompts(SHARED / "tovilag" / "toxic_text_500.jsonl", 1, "query", "caption", "tovilag")]


def rows_of_study(pairs_per_source: int = PAIRS_PER_SOURCE, per_source: int = PER_SOURCE) -> list[dict]:
    """Every prompt of the study with its source, label, group and (pairs) validation flag."""
    cfg = CalibrationConfig(max_per_source=pairs_per_source)
    table = CalibrationTable.build(CalibrationData(pairs=default_pairs(), extra=[]), cfg)
    rows = [{"prompt": t, "label": int(y), "source": str(s), "group": "pairs", "val": bool(v)}
            for t, y, s, v in zip(table.texts, table.labels, table.sources, table.val)]
    rng = np.random.default_rng(cfg.seed)
    for group, sets in (("alpaca", default_benign()), ("public", public_sets()), ("shared", shared_sets()),
                        ("never", never_calibrated_sets())):
        for s in sets:
            s = s.sample(per_source, cfg.seed) if not s.source.startswith("eval_") else s
            val = rng.random(len(s.prompts)) < cfg.val_fraction
            rows += [{"prompt": p, "label": s.label, "source": s.source, "group": group, "val": bool(v)}
                     for p, v in zip(s.prompts, val)]
    return rows


def extract(model: str, folder: Path, threads: int = 2, sizes: tuple[int, int] = (PAIRS_PER_SOURCE, PER_SOURCE)) -> None:
    import torch

    from steerguard.export.models import load_model
    from steerguard.export.state_cache import cached_hidden_states

    torch.set_num_threads(threads)
    lm = load_model(model)
    rows = rows_of_study(*sizes)
    folder.mkdir(parents=True, exist_ok=True)
    sources = list(dict.fromkeys(r["source"].rstrip("+-") for r in rows))
    n, layers = len(rows), lm.num_layers + 1
    last = np.lib.format.open_memmap(folder / "last.npy", "w+", np.float16, (n, layers, lm.hidden_size))
    post = np.lib.format.open_memmap(folder / "post.npy", "w+", np.float16, (n, layers, lm.hidden_size))
    t0 = time.time()
    for k, src in enumerate(sources):    # one cache entry per source: any pool reuses them
        idx = [i for i, r in enumerate(rows) if r["source"].rstrip("+-") == src]
        hs = cached_hidden_states(lm, [rows[i]["prompt"] for i in idx], 16,
                                  f"[{k + 1}/{len(sources)}] {src} ({len(idx)})")
        last[idx], post[idx] = hs.last.astype(np.float16), hs.post.astype(np.float16)
        del hs
    last.flush(), post.flush()
    (folder / "rows.json").write_text(json.dumps({"model": model, "rows": rows, "seconds": time.time() - t0}))
    print(f"{n} prompts, {len(sources)} sources, {time.time() - t0:.0f} s -> {folder}")


# --- the study -----------------------------------------------------------------------------------------

POOLS = {"previous": ("pairs", "alpaca"), "default": ("pairs", "alpaca", "public"),
         "default+shared": ("pairs", "alpaca", "public", "shared")}
ORDINARY = {"alpaca", "nq_open", "oasst", "trivia", "wizardlm", "eval_conversational"}
TWINS = "contrast-j"           # benign requests in dangerous words, each beside its harmful twin
FPR_POINTS = {"strict": 0.05, "balanced": 0.02, "permissive": 0.005}   # benign validation fire rate


def unit_of(source: str) -> str:
    """What leaves together when a source is held out: both sides of a pair source and its styled copies."""
    return source.rstrip("+-").removesuffix("-styled")


class Study:
    def __init__(self, folder: Path):
        meta = json.loads((folder / "rows.json").read_text())
        self.model, rows = meta["model"], meta["rows"]
        self.label = np.array([r["label"] for r in rows])
        self.source = np.array([r["source"] for r in rows])
        self.unit = np.array([unit_of(r["source"]) for r in rows])
        self.group = np.array([r["group"] for r in rows])
        self.val = np.array([r["val"] for r in rows])
        self.last = np.load(folder / "last.npy", mmap_mode="r")
        self.post = np.load(folder / "post.npy", mmap_mode="r")
        self._cache: dict = {}

    def reading(self, kind: str, layers: tuple[int, ...]) -> np.ndarray:
        key = (kind, layers)
        if key not in self._cache:
            arr = self.last if kind == "last" else self.post
            self._cache[key] = np.concatenate([np.asarray(arr[:, l], np.float32) for l in layers], 1)
        return self._cache[key]


def fit_logistic(x: np.ndarray, y: np.ndarray, w: np.ndarray, c: float, sources: np.ndarray, erase: int = 0):
    """The shipped linear probe (`Prober.train_linear`), scored as its margin."""
    from steerguard.export.prober import Prober, source_erasure

    e = source_erasure(x, y, sources, erase) if erase else None
    p = Prober.train_linear(x, y, 0, "last", weights=w, c=c, erase=e)
    return lambda v: np.asarray(v, np.float32) @ p.w1[:, 0] + p.b1[0]


def fit_mlp(x: np.ndarray, y: np.ndarray, w: np.ndarray, c: float, sources: np.ndarray, erase: int = 0):
    from steerguard.export.prober import Prober, source_erasure

    e = source_erasure(x, y, sources, erase) if erase else None
    p = Prober.train(x, y, 0, "last", weights=w, erase=e)
    return lambda v: np.log(np.clip(p.risk(v), 1e-7, 1)) - np.log(np.clip(1 - p.risk(v), 1e-7, 1))


def tau_at(score: np.ndarray, label: np.ndarray, source: np.ndarray, fpr: float) -> float:
    """The lowest threshold at which the benign sources' mean fire rate is at most `fpr`."""
    benign = [score[(label == 0) & (source == s)] for s in np.unique(source[label == 0])]
    candidates = np.unique(np.concatenate(benign))[::-1]
    rates = np.array([np.mean([(b >= t).mean() for b in benign]) for t in candidates[::-1]])[::-1]
    ok = np.nonzero(rates <= fpr)[0]
    return float(candidates[ok[-1]]) if len(ok) else float(candidates[0]) + 1e-6


def run_variant(st: Study, pool: str, reading: tuple, probe: str, c: float, only_public: bool = False) -> dict:
    x = st.reading(*reading)
    kind, _, erase = probe.partition("-erase")
    fit = {"logistic": fit_logistic, "mlp": fit_mlp}[kind]
    in_pool = np.isin(st.group, POOLS[pool.removesuffix("-nostyled")])
    if pool.endswith("-nostyled"):     # without the style-augmented copies of the pairs
        in_pool &= ~np.char.endswith(np.char.rstrip(st.source, "+-"), "-styled")
    units = sorted(set(st.unit[in_pool]))
    if only_public:     # a slow probe: hold out only the public sets and the twins
        units = [u for u in units if u == TWINS or (st.group[st.unit == u] == "public").all()]
    held: dict = {}
    pooled_s, pooled_y, pooled_fire = [], [], []

    def train(mask):
        train_rows = mask & ~st.val
        w = source_balanced_weights(st.label[train_rows], st.source[train_rows])
        f = fit(x[train_rows], st.label[train_rows], w, c, st.source[train_rows], int(erase or 0))
        val_rows = mask & st.val
        vs = f(x[val_rows])
        return f, {k: tau_at(vs, st.label[val_rows], st.source[val_rows], v) for k, v in FPR_POINTS.items()}

    for u in units:
        f, taus = train(in_pool & (st.unit != u))
        rows = in_pool & (st.unit == u)
        s = f(x[rows])
        y = st.label[rows]
        fired = s >= taus["balanced"]
        entry = {"label": "mixed" if len(set(y)) > 1 else int(y[0]), "n": int(rows.sum())}
        for lab in sorted(set(y)):
            entry[f"fire_{lab}"] = float(fired[y == lab].mean())
        if u == TWINS:
            entry["auroc"], entry["f1_at_7"] = auroc(s, y), f1_at_fpr(s, y, 0.07)
        held[u] = entry
        pooled_s.append(s), pooled_y.append(y), pooled_fire.append(fired)
    f, taus = train(in_pool)
    never = {}
    out_rows = ~in_pool
    s_out = f(x[out_rows])
    for u in sorted(set(st.unit[out_rows])):
        m = st.unit[out_rows] == u
        y = st.label[out_rows][m]
        never[u] = {"label": int(y[0]), "n": int(m.sum()),
                    **{k: float((s_out[m] >= t).mean()) for k, t in taus.items()}}
    ev = np.isin(st.unit[out_rows], ["eval_harmful", "eval_sounds_dangerous"])
    ps, py = np.concatenate(pooled_s), np.concatenate(pooled_y)
    all_s, all_y = np.concatenate([ps, s_out]), np.concatenate([py, st.label[out_rows]])
    return {"pool": pool, "reading": f"{reading[0]}@{'+'.join(map(str, reading[1]))}", "probe": probe, "c": c,
            "pooled_auroc": auroc(ps, py), "pooled_tpr_at_1": tpr_at_fpr(ps, py, 0.01),
            "all_heldout_auroc": auroc(all_s, all_y), "all_heldout_tpr_at_1": tpr_at_fpr(all_s, all_y, 0.01),
            "twins_f1_at_7": held.get(TWINS, {}).get("f1_at_7"),
            "eval_twins_f1_at_7": f1_at_fpr(s_out[ev], st.label[out_rows][ev], 0.07) if ev.any() else None,
            "held_out": held, "never_calibrated": never}


def summary(r: dict) -> dict:
    """Worst cases first: the lowest catch rate of a held-out harmful source, the highest false-fire rate of a
    held-out ordinary and sounds-dangerous source (LOSO and never-calibrated together, at `balanced`)."""
    harmful, ordinary, sounds = {}, {}, {}
    for u, e in r["held_out"].items():
        if e["label"] == 1:
            harmful[u] = e["fire_1"]
        elif e["label"] == 0:
            (ordinary if u in ORDINARY else sounds)[u] = e["fire_0"]
    for u, e in r["never_calibrated"].items():
        (harmful if e["label"] == 1 else ordinary if u in ORDINARY else sounds)[u] = e["balanced"]
    worst = lambda d, hi: (max if hi else min)(d.items(), key=lambda kv: kv[1]) if d else (None, float("nan"))  # noqa: E731
    return {"worst_harmful": worst(harmful, False), "worst_ordinary": worst(ordinary, True),
            "worst_sounds_dangerous": worst(sounds, True),
            "harmful_below_80": sorted(u for u, v in harmful.items() if v < 0.8)}


def study(folder: Path, out: Path, plan: list[tuple] | None = None, only_public: bool = False) -> list[dict]:
    st = Study(folder)
    results = []
    for pool, reading, probe, c in plan or default_plan(st):
        t = time.time()
        r = run_variant(st, pool, reading, probe, c, only_public)
        r["held_out_units"] = "public sets and twins" if only_public else "every source"
        r["summary"], r["seconds"] = summary(r), time.time() - t
        results.append(r)
        sm = r["summary"]
        print(f"{pool:15s} {r['reading']:14s} {probe:8s} C={c:<5} pooled {r['pooled_auroc']:.3f} "
              f"tpr@1 {r['pooled_tpr_at_1']:.2f} | all {r['all_heldout_auroc']:.3f}/{r['all_heldout_tpr_at_1']:.2f} | "
              f"twins {r['twins_f1_at_7'] or float('nan'):.2f}/{r['eval_twins_f1_at_7'] or float('nan'):.2f} | "
              f"worst harm {sm['worst_harmful'][0]} {sm['worst_harmful'][1]:.2f} ord {sm['worst_ordinary'][0]} "
              f"{sm['worst_ordinary'][1]:.3f} sd {sm['worst_sounds_dangerous'][0]} {sm['worst_sounds_dangerous'][1]:.3f} "
              f"({r['seconds']:.0f}s)", flush=True)
        out.write_text(json.dumps({"model": st.model, "machine": platform.node(), "date": time.strftime("%Y-%m-%d"),
                                   "fpr_points": FPR_POINTS, "results": results}, indent=1))
    return results


def default_plan(st: Study) -> list[tuple]:
    """The layer sweep of the default probe (every fourth layer from a third of the depth)."""
    n = st.last.shape[1] - 1
    return [("default", ("last", (l,)), "logistic", 0.05) for l in range(n // 3 + 2, n + 1, 4)]


def parse_plan(specs: list[str]) -> list[tuple]:
    """POOL/READING@L[+L...]/PROBE/C, e.g. `default/last@20/logistic-erase4/0.05`."""
    plan = []
    for spec in specs:
        pool, reading, probe, c = spec.split("/")
        kind, layers = reading.split("@")
        plan.append((pool, (kind, tuple(int(x) for x in layers.split("+"))), probe, float(c)))
    return plan


def report(files: list[Path]) -> str:
    """One markdown table of every variant in `files`, worst case first: the worst case is the lower of the
    worst held-out harmful catch rate and one minus the worst held-out benign false-fire rate."""
    rows = []
    for f in files:
        for r in json.loads(f.read_text())["results"]:
            sm = r["summary"]
            worst = min(sm["worst_harmful"][1], 1 - sm["worst_ordinary"][1], 1 - sm["worst_sounds_dangerous"][1])
            rows.append((worst, r, sm))
    lines = ["| pool | probe | worst case | worst harmful caught | worst ordinary fired | worst sounds-dangerous fired | "
             "pooled LOSO AUROC / TPR@1% | all held out AUROC / TPR@1% | twins F1@7% (LOSO / eval sets) | harmful sources < 80% |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for worst, r, sm in sorted(rows, key=lambda t: -t[0]):
        pct = lambda kv: f"{kv[1]:.0%} ({kv[0]})"  # noqa: E731
        lines.append(f"| {r['pool']} | {r['reading']} {r['probe']} C={r['c']} | {worst:.0%} | {pct(sm['worst_harmful'])} | "
                     f"{pct(sm['worst_ordinary'])} | {pct(sm['worst_sounds_dangerous'])} | "
                     f"{r['pooled_auroc']:.3f} / {r['pooled_tpr_at_1']:.2f} | {r['all_heldout_auroc']:.3f} / "
                     f"{r['all_heldout_tpr_at_1']:.2f} | {r['twins_f1_at_7'] or float('nan'):.2f} / "
                     f"{r['eval_twins_f1_at_7'] or float('nan'):.2f} | {len(sm['harmful_below_80'])} |")
    return "\n".join(lines)


def per_source(file: Path, variant: int = 0) -> str:
    """Every held-out source of one variant at `balanced`, worst first (harmful: caught; benign: fired)."""
    r = json.loads(file.read_text())["results"][variant]
    rows = [(u, e["label"], e.get("fire_1", e.get("fire_0")), e["n"], "left out of training in turn")
            for u, e in r["held_out"].items() if e["label"] != "mixed"]
    rows += [(u, e["label"], e["balanced"], e["n"], "never calibrated on") for u, e in r["never_calibrated"].items()]
    twins = r["held_out"].get(TWINS)
    key = lambda t: t[2] if t[1] == 1 else 1 - t[2]  # noqa: E731
    lines = ["| source | label | held out how | rows | fired at balanced |", "|---|---|---|---|---|"]
    lines += [f"| {u} | {'harmful' if y else 'benign'} | {how} | {n} | {rate:.1%} |"
              for u, y, rate, n, how in sorted(rows, key=key)]
    if twins:
        lines.append(f"| {TWINS} (word-matched twins) | both | left out of training in turn | {twins['n']} | "
                     f"harmful {twins['fire_1']:.1%}, benign {twins['fire_0']:.1%} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=["extract", "study", "report"])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--features", type=Path, default=None, help="default: ~/.cache/steerguard/study/MODEL")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 runs faster beside other jobs)")
    ap.add_argument("--only-public", action="store_true", help="hold out only the public sets and the twins (slow probes)")
    ap.add_argument("--pairs-per-source", type=int, default=PAIRS_PER_SOURCE)
    ap.add_argument("--per-source", type=int, default=PER_SOURCE)
    ap.add_argument("--variant", action="append", default=[],
                    help="POOL/READING@LAYERS/PROBE/C (e.g. default/last@20+24/logistic-erase4/0.05); repeatable; "
                         "default: the layer sweep of the default probe")
    args = ap.parse_args()
    from steerguard.export.models import cache_dir

    folder = args.features or cache_dir() / "study" / args.model
    if args.phase == "report":
        files = sorted(Path("docs").glob(f"guard_data_{args.model}*.json")) if args.out is None else [args.out]
        print(report(files))
        print()
        print(per_source(files[0]))
    elif args.phase == "extract":
        extract(args.model, folder, args.threads, (args.pairs_per_source, args.per_source))
    else:
        study(folder, args.out or Path(f"docs/guard_data_{args.model}.json"), parse_plan(args.variant) or None, args.only_public)


if __name__ == "__main__":
    main()
