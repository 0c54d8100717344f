"""Parity of every new decoder family's bundles (issue 24) on tiny random models built from their configs.

    python bench/families.py [--prompts 20] [--new-tokens 64] [--families qwen3 ...]
    python bench/families.py --real       # Gemma 3 270M's real weights (named model gemma3-270m), fp32, unguarded

Per family (tests/test_families.py builds the models and measures): a guard calibrated on the tiny model, bundles
at fp32 (fp32 prober), int8 and int4, with the demo model's byte-level BPE tokenizer so libsteerguard can load
them; on n prompts x new tokens: fp32 greedy tokens vs transformers' model.generate, the largest logit difference
over every step (teacher-forced on transformers' tokens), the fp32 prober's risk vs ReferenceGuard's, each
precision's guard decisions, and libsteerguard's guarded greedy answers vs the Python runtime's (fp32, int4).
Writes docs/families.json and the table in docs/MODELS.md (`--table` rewrites the table from the json alone).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))


def main() -> None:
    from test_families import FAMILIES

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--families", nargs="+", default=FAMILIES, choices=FAMILIES)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "families.json")
    ap.add_argument("--table", action="store_true", help="only rewrite docs/MODELS.md's table from --out")
    ap.add_argument("--real", action="store_true", help="Gemma 3 270M against transformers, into --real-out")
    ap.add_argument("--real-out", type=Path, default=ROOT / "docs" / "families_gemma3_270m.json")
    a = ap.parse_args()
    if a.table:
        return write_table(json.loads(a.out.read_text()), MODELS)
    if a.real:
        return real_gemma3(a.real_out)

    import torch
    from speed import machine
    from test_capi import bpe_tokenizer, build
    from test_families import FamilyExport, family_config, measure

    from steerguard.runtime.native import NativeLibrary

    torch.set_num_threads(2)
    native = NativeLibrary.load(build("c-families", "-DCMAKE_BUILD_TYPE=Release") / "libsteerguard.so")
    command = " ".join(["python bench/families.py", f"--prompts {a.prompts}", f"--new-tokens {a.new_tokens}"] +
                       (["--families", *a.families] if a.families != FAMILIES else []))
    # each family's row replaces that family's in --out as soon as it is measured; other families' rows stay
    data = json.loads(a.out.read_text()) if a.out.exists() else {"rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = bpe_tokenizer("qwen2", Path(tmp) / "tokenizer")
        for family in a.families:
            export = FamilyExport(family, Path(tmp) / family, tokenizer=tokenizer)
            r = measure(export, a.prompts, a.new_tokens, native=native)
            config = family_config(family, len(tokenizer)).to_dict()
            date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
            row = {**dataclasses.asdict(r), "split_layer": export.guard.split_layer, "tau": export.guard.prober.tau,
                   "config": {k: v for k, v in config.items() if k in CONFIG_KEYS}, "date": date,
                   "machine": machine(), "command": command}
            print(json.dumps(row), flush=True)
            data["rows"] = [x for x in data["rows"] if x["family"] != family] + [row]
            data["rows"].sort(key=lambda x: FAMILIES.index(x["family"]))
            a.out.write_text(json.dumps(data, indent=1))
    write_table(data, MODELS)


def real_gemma3(out: Path, new_tokens: int = 48, long_new_tokens: int = 24) -> None:
    """Gemma 3 270M (its Q4_K_M GGUF dequantized to fp32) exported unguarded at fp32: greedy tokens and every
    step's logits against transformers on four short prompts and one longer than its 512-token sliding window."""
    import time

    import numpy as np
    import torch
    from speed import machine
    from test_families import bundle_logits

    from steerguard.export.bundle import export_bundle
    from steerguard.export.hidden import chat_ids
    from steerguard.export.models import load_model
    from steerguard.runtime.model import GuardedModel
    from steerguard.runtime.sampling import Sampling

    torch.set_num_threads(2)
    lm = load_model("gemma3-270m")
    long_prompt = "Summarise this document in one sentence:\n\n" + (ROOT / "docs" / "RUNTIME.md").read_text()[:3000]
    cases = [(p, new_tokens) for p in ["What is the capital of France?", "Write a short poem about the sea.",
                                       "Explain photosynthesis in simple terms.",
                                       "How do I kill a Python process that hangs?"]] + [(long_prompt, long_new_tokens)]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        gm = GuardedModel.load(export_bundle(lm, None, Path(tmp) / "plain", context=1024, progress=False), threads=2)
        export_s = time.perf_counter() - t0
        rows = []
        for prompt, n in cases:
            ids = chat_ids(lm.tokenizer, prompt)
            with torch.no_grad():
                hf = lm.model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                       output_logits=True, return_dict_in_generate=True, pad_token_id=0)
            tokens, logits = hf.sequences[0, len(ids):].tolist(), torch.cat(hf.logits).numpy()
            ours = gm.generate(prompt, Sampling(max_new_tokens=n, ignore_eos=True)).token_ids
            rows.append({"prompt": prompt[:60], "prompt_tokens": len(ids), "new_tokens": n, "identical": ours == tokens,
                         "max_logit_diff": float(np.abs(bundle_logits(gm, ids, tokens) - logits).max()),
                         "max_abs_logit": float(np.abs(logits).max())})
            print(json.dumps(rows[-1]), flush=True)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out.write_text(json.dumps({"date": date, "machine": machine(), "command": "python bench/families.py --real",
                               "export_s": export_s, "rows": rows}, indent=1))


MODELS = ROOT / "docs" / "MODELS.md"
BEGIN, END = "<!-- bench/families.py table -->", "<!-- end of table -->"
NAMES = {"qwen3": "Qwen3", "llama3": "Llama 3.2 (`llama3` rotary, tied head)", "granite": "Granite 3.x",
         "olmo2": "OLMo 2", "smollm3": "SmolLM3", "gemma3_text": "Gemma 3 text", "phi3": "Phi-3/3.5/Phi-4-mini"}
# whether the peers take the family, read from their public source (docs/MODELS.md says which revision)
PEERS = {"qwen3": ("yes", "yes"), "llama3": ("yes", "yes"), "granite": ("yes", "yes"), "olmo2": ("no", "yes"),
         "smollm3": ("yes", "yes"), "gemma3_text": ("yes", "yes"), "phi3": ("yes", "yes")}


def write_table(data: dict, path: Path) -> None:
    """The measured table (with the peers' columns) between the markers of docs/MODELS.md."""
    lines = ["| family | export fp32 / int8 / int4 | greedy identical (fp32) | max fp32 logit diff | max risk diff "
             "| guard fired fp32 / int8 / int4 | int8 / int4 decisions = fp32 | int8 / int4 logit corr. with fp32 "
             "| C tokens equal (fp32 / int4) | onnxruntime-genai builder | llama.cpp |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        n, f = r["prompts"], r["family"]
        genai, llama_cpp = PEERS[f]
        corr = " / ".join(f"{r['logit_corr'][k]:.3f}" for k in ("int8", "int4")) if r.get("logit_corr") else "-"
        lines.append(
            f"| {NAMES[f]} (`{r['config']['model_type']}`) | yes / yes / yes | {r['identical']}/{n} | {r['max_logit_diff']:.1e} "
            f"| {r['max_risk_diff']:.1e} | {r['fired']['fp32']} / {r['fired']['int8']} / {r['fired']['int4']} "
            f"| {r['agree']['int8']}/{n} / {r['agree']['int4']}/{n} | {corr} "
            f"| {r['c_identical']['fp32']}/{n} / {r['c_identical']['int4']}/{n} | {genai} | {llama_cpp} |")
    runs = sorted({(r["command"], r["machine"]) for r in data["rows"]})
    dates = sorted(r["date"] for r in data["rows"])
    said = "; ".join(f"`{command}`" for command, _ in runs)
    table = "\n".join([BEGIN, f"{said}, {dates[0]} to {dates[-1]}; {runs[0][1]}.", "", *lines, END])
    text = path.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    path.write_text(text[:start] + table + text[end:])


# what each tiny config sets apart (the rest: hidden 64, 4 layers, 4 heads / 2 KV heads, the BPE vocabulary)
CONFIG_KEYS = ("model_type", "head_dim", "num_attention_heads", "num_key_value_heads", "tie_word_embeddings",
               "rope_parameters", "layer_types", "sliding_window", "no_rope_layers", "query_pre_attn_scalar",
               "final_logit_softcapping", "embedding_multiplier", "residual_multiplier", "attention_multiplier",
               "logits_scaling", "max_position_embeddings", "original_max_position_embeddings", "hidden_act",
               "hidden_activation")


if __name__ == "__main__":
    main()
