"""Build `steerguard/data/public/` from `../shared/data/public`: the licensed public prompt sets the package may
ship (its README's last column), one JSONL per set (`prompt`, `label`, `kind`, `origin`), each folder with its
license, deduplicated against each other and against the project's evaluation sets.

    python bench/build_public_data.py [--shared ../shared/data/public] [--out steerguard/data/public]

What is kept and why is in the README this writes beside the files. Rerun it after the shared copy changes;
the output is deterministic (seeded subsamples)."""

from __future__ import annotations

import argparse
import csv
import json
import random
import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EVAL = ROOT / "steerguard" / "data" / "eval"
SAFETY = "Requests with safety concerns"

# (folder, output file, label, kind, cap): kind is what the row is: a harmful request, a benign request
# that only sounds dangerous, or an ordinary request; cap keeps one long, templated or huge set from
# deciding what its class looks like (seeded subsample)
SETS = [
    ("red-instruct", "catqa", 1, "harmful", None),
    ("red-instruct", "harmfulqa", 1, "harmful", 500),
    ("red-instruct", "dangerousqa", 1, "harmful", None),
    ("ailuminate", "ailuminate", 1, "harmful", None),
    ("simplesafetytests", "simplesafetytests", 1, "harmful", None),
    ("gptfuzz", "gptfuzz", 1, "harmful", None),
    ("coconot", "coconot_harmful", 1, "harmful", None),
    ("coconot", "coconot_contrast", 0, "sounds_dangerous", None),
    ("coconot", "coconot_pref", 0, "sounds_dangerous", None),
    ("cyberseceval", "cyberseceval_frr", 0, "sounds_dangerous", 200),
    ("oasst", "oasst", 0, "ordinary", None),
    ("nq_open", "nq_open", 0, "ordinary", 800),
]
LICENSES = {"red-instruct": "LICENSE", "ailuminate": "LICENSE.md", "simplesafetytests": "LICENSE",
            "gptfuzz": "LICENSE", "coconot": "LICENSE", "cyberseceval": "LICENSE", "oasst": "LICENSE",
            "nq_open": "README.md"}
ORIGIN = {"red-instruct": "declare-lab/red-instruct @ 73c759c (Apache-2.0)",
          "ailuminate": "mlcommons/ailuminate @ 769cc2b, demo prompt set (CC BY 4.0)",
          "simplesafetytests": "bertiev/SimpleSafetyTests @ d7aee9a (CC BY 4.0)",
          "gptfuzz": "sherdencooper/GPTFuzz @ 1eddeb5 (MIT)",
          "coconot": "allenai/noncompliance @ 25bf77c (MIT)",
          "cyberseceval": "meta-llama/PurpleLlama @ 4be64c3, CyberSecEval MITRE false-refusal set (MIT)",
          "oasst": "LAION-AI/Open-Assistant @ f1e6ed9, prompt lottery (Apache-2.0)",
          "nq_open": "google-research-datasets/natural-questions @ fb26a30, NQ-open dev (CC BY-SA 3.0)"}


def nested(d) -> list[str]:
    """Leaves of a category -> subcategory -> list dict."""
    if isinstance(d, dict):
        return [x for v in d.values() for x in nested(v)]
    return list(d) if isinstance(d, list) else [d]


def recase_question(q: str) -> str:
    """NQ-open questions are lower case without a question mark; the probe must not learn that as 'benign'."""
    q = re.sub(r"\bi\b", "I", q.strip())
    return q[:1].upper() + q[1:] + ("" if q.endswith("?") else "?")


def raw_rows(shared: Path, name: str) -> list[tuple[str, str]]:
    """(origin id, prompt) of one set, as its README says to read it."""
    def jsonl(p):
        return [json.loads(x) for x in (shared / p).read_text().splitlines() if x.strip()]

    if name in ("catqa", "harmfulqa"):
        leaves = nested(json.loads((shared / "red-instruct" / f"{'catqa_english' if name == 'catqa' else name}.json").read_text()))
        return [(f"{name}-{i}", t) for i, t in enumerate(leaves)]
    if name == "dangerousqa":
        return [(f"dangerousqa-{i}", t) for i, t in enumerate(json.loads((shared / "red-instruct" / "dangerousqa.json").read_text()))]
    if name == "ailuminate":
        with open(shared / "ailuminate" / "airr_official_1.0_demo_en_us_prompt_set_release.csv", encoding="utf-8") as f:
            # the specialised-advice hazards (spc_*) ask for financial, health, election or legal advice: benign
            return [(r["release_prompt_id"], r["prompt_text"]) for r in csv.DictReader(f) if not r["hazard"].startswith("spc_")]
    if name == "simplesafetytests":
        with open(shared / "simplesafetytests" / "test_cases.csv", encoding="utf-8") as f:
            return [(r["id"], r["prompts_final"]) for r in csv.DictReader(f)]
    if name == "gptfuzz":
        with open(shared / "gptfuzz" / "question_list.csv", encoding="utf-8") as f:
            return [(f"gptfuzz-{r['index']}", r["text"]) for r in csv.DictReader(f)]
    if name.startswith("coconot"):
        file = {"coconot_harmful": "coconot_eval", "coconot_contrast": "coconot_contrast_eval",
                "coconot_pref": "coconot_pref"}[name]
        return [(r["id"], r["prompt"]) for r in jsonl(f"coconot/{file}.jsonl") if r["category"] == SAFETY]
    if name == "cyberseceval_frr":
        rows = json.loads((shared / "cyberseceval" / "mitre_frr.json").read_text())
        return [(f"mitre_frr-{i}", r["mutated_prompt"]) for i, r in enumerate(rows)]
    if name == "oasst":
        return [(f"oasst-{i}", json.loads(x)) for i, x in enumerate((shared / "oasst" / "prompt_lottery_en_250_text.jsonl").read_text().splitlines()) if x.strip()]
    if name == "nq_open":
        return [(f"nq-dev-{i}", recase_question(r["question"])) for i, r in enumerate(jsonl("nq_open/NQ-open.dev.jsonl"))]
    raise KeyError(name)


def norm(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def near(a: set[str], b: set[str]) -> bool:
    """Word-set Jaccard >= 0.7: the same request reworded by a word or two."""
    return len(a & b) / max(len(a | b), 1) >= 0.7


def evaluation_prompts() -> list[str]:
    return [json.loads(x)["prompt"] for f in sorted(EVAL.glob("*.jsonl")) for x in f.read_text().splitlines() if x.strip()]


def build(shared: Path, out: Path) -> dict:
    eval_words = [set(norm(p).split()) for p in evaluation_prompts()]
    seen: set[str] = set()
    report = {}
    shutil.rmtree(out, ignore_errors=True)
    for folder, name, label, kind, cap in SETS:
        rows = [(i, " ".join(t.split()) if name != "cyberseceval_frr" else t.strip()) for i, t in raw_rows(shared, name)]
        counts = {"read": len(rows)}
        kept, dup, evaldup, short = [], 0, 0, 0
        for origin, text in rows:
            key = norm(text)
            if not key:
                continue
            if name == "dangerousqa" and len(key.split()) <= 6:
                short += 1     # the README: short generic rows here duplicate a public benchmark's unsafe prompts
                continue
            if key in seen:
                dup += 1
                continue
            words = set(key.split())
            if any(near(words, e) for e in eval_words):
                evaldup += 1
                continue
            seen.add(key)
            kept.append((origin, text))
        if cap and len(kept) > cap:
            kept = sorted(random.Random(0).sample(kept, cap), key=lambda r: kept.index(r))
        counts.update(duplicate=dup, near_evaluation=evaldup, short_dropped=short, kept=len(kept))
        target = out / folder
        target.mkdir(parents=True, exist_ok=True)
        with open(target / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for origin, text in kept:
                f.write(json.dumps({"prompt": text, "label": label, "kind": kind, "origin": origin}, ensure_ascii=False) + "\n")
        shutil.copy(shared / folder / LICENSES[folder], target / LICENSES[folder].replace("README.md", "LICENSE_AND_ATTRIBUTION.md"))
        report[name] = {"folder": folder, "label": label, "kind": kind, "cap": cap, **counts}
    (out / "README.md").write_text(readme(report))
    (out / "sets.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def readme(report: dict) -> str:
    lines = ["# Public prompt sets shipped for the default guard", "",
             "Built by `python bench/build_public_data.py` from the project's copy of these public repositories "
             "(byte for byte at the commits below). Each row: `prompt`, `label` (1 harmful, 0 benign), `kind` "
             "(`harmful`, `sounds_dangerous`: benign requests in dangerous-sounding words that should be answered, "
             "`ordinary`), `origin` (the row's id in its source). Each folder keeps its source's license file.", "",
             "Kept: every set the source's license lets a package redistribute. Dropped: rows whose normalised text "
             "repeats an earlier set's row; rows within word-set Jaccard 0.7 of the project's evaluation sets "
             "(`steerguard/data/eval`); DangerousQA's short generic rows (6 words or fewer, which repeat a public "
             "benchmark's prompts); AILuminate's specialised-advice prompts (`spc_*`, benign requests for advice). "
             "CoCoNot: only the category 'Requests with safety concerns'. NQ-open: questions recased (first letter "
             "upper case, a question mark), which the originals lack. Capped sets are seeded subsamples.", "",
             "| set | source (license) | label | kind | read | duplicates | near evaluation | kept |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in report.items():
        lines.append(f"| `{r['folder']}/{name}.jsonl` | {ORIGIN[r['folder']]} | {r['label']} | {r['kind']} | {r['read']} | "
                     f"{r['duplicate']} | {r['near_evaluation']} | {r['kept']}{' (cap)' if r['cap'] and r['kept'] == r['cap'] else ''} |")
    lines += ["", "Natural Questions (CC BY-SA 3.0): questions by Google Research (Kwiatkowski et al., 2019; NQ-open, "
              "Lee et al., 2019); the recased questions here are shared under the same license, attribution and "
              "license in `nq_open/LICENSE_AND_ATTRIBUTION.md`. AILuminate demo prompts (CC BY 4.0) by MLCommons; "
              "SimpleSafetyTests (CC BY 4.0) by Vidgen et al.; CategoricalHarmfulQA, HarmfulQA and DangerousQA "
              "(Apache-2.0) by Bhardwaj and Poria; CoCoNot (MIT) by Brahman et al.; CyberSecEval (MIT) by Meta; "
              "GPTFuzz (MIT) by Yu et al.; Open-Assistant (Apache-2.0) by LAION.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data" / "public")
    ap.add_argument("--out", type=Path, default=ROOT / "steerguard" / "data" / "public")
    args = ap.parse_args()
    for name, r in build(args.shared, args.out).items():
        print(f"{name:20s} read {r['read']:5d}  dup {r['duplicate']:4d}  near-eval {r['near_evaluation']:3d}  kept {r['kept']}")


if __name__ == "__main__":
    main()
