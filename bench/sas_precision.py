"""Does SAS pick the same split layer when its pass runs at bfloat16? `calibrate` runs the SAS pairs through every
layer of a bfloat16 copy of the model where the CPU multiplies bfloat16 natively (export/cpu.py); this runs the
same pairs at both precisions and prints each one's time and its three best layers.

    python bench/sas_precision.py demo reference gemma3-270m [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import random
import time

import numpy as np


def compare(model: str) -> None:
    import torch

    from steerguard.export.calibrate import CalibrationConfig, CalibrationData, CalibrationTable
    from steerguard.export.cpu import cast_copy
    from steerguard.export.hidden import extract_hidden_states
    from steerguard.export.models import load_model
    from steerguard.export.sas import SASResult

    lm = load_model(model)
    cfg = CalibrationConfig()
    table = CalibrationTable.build(CalibrationData.default(), cfg)
    rows = table.sas_pairs(cfg.sas_pairs_per_source, random.Random(cfg.seed + 3))     # what calibrate draws
    prompts = [table.texts[i + side] for i in rows for side in (0, 1)]
    for dtype in (torch.float32, torch.bfloat16):
        t = time.perf_counter()
        hs = extract_hidden_states(cast_copy(lm.model, dtype), lm.tokenizer, prompts, cfg.batch_size)
        seconds = time.perf_counter() - t
        sas = SASResult.compute(hs.last[0::2], hs.last[1::2])
        top = np.argsort(sas.scores)[::-1][:3]
        best = ", ".join(f"{sas.layers[i]} ({sas.scores[i]:.4f})" for i in top)
        print(f"| {model} | {str(dtype).removeprefix('torch.')} | {len(prompts)} | {seconds:.0f} s | "
              f"{sas.best_layer} | {best} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    print(f"{platform.node()}, {time.strftime('%Y-%m-%d %H:%M')}, {a.threads} threads\n")
    print("| model | SAS pass | prompts | time | split layer | three best layers (SAS) |\n|---|---|---|---|---|---|")
    for m in a.models:
        compare(m)


if __name__ == "__main__":
    main()
