"""One pass of a model over every prompt the guard study needs, with every candidate feature kept on disk.

For each prompt (chat template, generation prompt) it keeps, at every layer (float16):
  post   (n, S, N+1, d)  the S post-instruction template tokens (`<|im_end|>\\n<|im_start|>assistant\\n`)
  umean  (n, N+1, d)     the mean over the user's tokens
  pilot  (n, K, N+1, d)  the first K greedy answer tokens (SafeSwitch's pilot tokens), and their ids
and every user token's state at a few layers (`tokens-L{l}`, flat, with `lengths`).

    python bench/guard_features.py --model reference [--per-source 150] [--held-out 200]

The prompts are the default calibration table, the held-out sources of bench/loso.py and the shipped
never-calibrated eval sets; `rows.json` names each prompt's source, label and role.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loso import held_out_sources, never_calibrated_sets  # noqa: E402

from steerguard.export.calibrate import CalibrationConfig, CalibrationData, CalibrationTable  # noqa: E402
from steerguard.export.hidden import chat_ids, template_prefix_len, template_suffix_len  # noqa: E402
from steerguard.export.models import cache_dir, load_model  # noqa: E402


def study_rows(per_source: int, held_out: int, seed: int = 0) -> list[dict]:
    table = CalibrationTable.build(CalibrationData.default(), CalibrationConfig(max_per_source=per_source, seed=seed))
    rows = [{"text": t, "label": int(y), "source": str(s), "role": "calibration", "val": bool(v)}
            for t, y, s, v in zip(table.texts, table.labels, table.sources, table.val)]
    for s in held_out_sources(held_out, seed):
        rows += [{"text": t, "label": s.label, "source": s.source, "role": "held_out"} for t in s.prompts]
    for s in never_calibrated_sets():
        rows += [{"text": t, "label": s.label, "source": s.source, "role": "never_calibrated"} for t in s.prompts]
    return rows


@torch.inference_mode()
def extract(lm, rows: list[dict], folder: Path, pilot: int, token_layers: list[int], batch: int) -> None:
    tok, model = lm.tokenizer, lm.model
    n_layers, d = lm.num_layers, lm.hidden_size
    prefix, suffix = template_prefix_len(tok), template_suffix_len(tok)
    ids = [chat_ids(tok, r["text"]) for r in rows]
    n = len(ids)
    mm = lambda name, shape: np.lib.format.open_memmap(folder / f"{name}.npy", "w+", np.float16, shape)  # noqa: E731
    post, umean, pil = mm("post", (n, suffix, n_layers + 1, d)), mm("umean", (n, n_layers + 1, d)), \
        mm("pilot", (n, pilot, n_layers + 1, d))
    pilot_ids = np.zeros((n, pilot + 1), np.int64)
    lengths = np.array([len(x) - prefix - suffix for x in ids])
    flat = {l: mm(f"tokens-L{l}", (int(lengths.sum()), d)) for l in token_layers}
    starts = np.concatenate([[0], np.cumsum(lengths)])
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    order = np.argsort([len(x) for x in ids], kind="stable")
    for k in tqdm(range(0, n, batch), desc="prompts", unit="batch"):
        idx = order[k:k + batch]
        width = max(len(ids[i]) for i in idx)
        input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for r, i in enumerate(idx):       # left padding: every prompt ends at the last column
            input_ids[r, width - len(ids[i]):] = torch.tensor(ids[i])
            mask[r, width - len(ids[i]):] = 1
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=pilot + 1, min_new_tokens=pilot + 1,
                             do_sample=False, output_hidden_states=True, return_dict_in_generate=True, pad_token_id=pad)
        prompt_states = torch.stack(out.hidden_states[0], 2).float()          # (b, T, N+1, d)
        post[idx] = prompt_states[:, width - suffix:].numpy().astype(np.float16)
        pil[idx] = torch.cat([torch.stack(s, 2) for s in out.hidden_states[1:pilot + 1]], 1).float().numpy().astype(np.float16)
        pilot_ids[idx] = out.sequences[:, width:].numpy()
        for r, i in enumerate(idx):
            user = prompt_states[r, width - len(ids[i]) + prefix: width - suffix]
            umean[i] = user.mean(0).numpy().astype(np.float16)
            for l in token_layers:
                flat[l][starts[i]:starts[i + 1]] = user[:, l].numpy().astype(np.float16)
    for a in (post, umean, pil, *flat.values()):
        a.flush()
    np.save(folder / "pilot_ids.npy", pilot_ids)
    np.save(folder / "lengths.npy", lengths)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="reference")
    ap.add_argument("--per-source", type=int, default=150)
    ap.add_argument("--held-out", type=int, default=200)
    ap.add_argument("--pilot", type=int, default=4)
    ap.add_argument("--token-layers", default="8,12,16")
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(2)
    lm = load_model(args.model)
    rows = study_rows(args.per_source, args.held_out)
    key = hashlib.sha256(json.dumps([lm.sha256, rows, args.pilot, args.token_layers]).encode()).hexdigest()[:12]
    folder = cache_dir() / "features" / f"{lm.name}-{key}"
    if (folder / "done").exists():
        print(folder)
        return
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "rows.json").write_text(json.dumps(rows))
    t = time.time()
    extract(lm, rows, folder, args.pilot, [int(x) for x in args.token_layers.split(",")], args.batch)
    (folder / "done").write_text(json.dumps({"seconds": time.time() - t, "model": lm.name, "n": len(rows)}))
    print(folder, f"{time.time() - t:.0f} s")


if __name__ == "__main__":
    main()
