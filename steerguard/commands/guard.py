"""The guard's commands on the PyTorch side (the export extra): calibrate, generate (the reference
guard) and eval (a guard on a model, or a bundle through the lean runtime)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import SteerguardError
from ..export.prober import DEFAULT_ERASE_SOURCES, DEFAULT_FEATURE, DEFAULT_PROBE, PROBES
from .options import (answer_guard_options, chat_template_kwargs_option, check_output, operating_point_option,
                      sampling_options, torch_threads)


@click.command()
@click.argument("model", default="demo")
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), required=True,
              help="Folder to write the guard to (written atomically).")
@click.option("--pairs", "pairs_files", multiple=True, type=click.Path(path_type=Path),
              help="Your own pairs file (.jsonl/.json/.csv); replaces the shipped pairs. Repeatable.")
@click.option("--harmful-col", default="harmful", show_default=True, help="Column of the harmful prompt.")
@click.option("--benign-col", default="benign", show_default=True, help="Column of the benign counterpart.")
@click.option("--refusal-col", default="refusal", show_default=True, help="Column of the refusal target.")
@click.option("--caption-col", default=None, help="Optional column with an image caption to prepend.")
@click.option("--image-col", default=None,
              help="Column with an image file per pair (multimodal models): both requests are asked about it.")
@click.option("--image-root", type=click.Path(path_type=Path), default=None,
              help="Folder the image paths are relative to (default: the pairs file's folder).")
@click.option("--caption-for-missing-image", is_flag=True,
              help="A row whose image file is missing uses its --caption-col text instead (default: an error).")
@click.option("--vlsafe", type=click.Path(path_type=Path), default=None,
              help="A VLSafe folder to use as pairs (alignment + convert_safe files).")
@click.option("--harmful", "harmful_files", multiple=True, help="Extra harmful prompts FILE[:COLUMN]. Repeatable.")
@click.option("--benign", "benign_files", multiple=True, help="Extra benign prompts FILE[:COLUMN]. Repeatable.")
@click.option("--no-defaults", is_flag=True, help="Do not add the shipped calibration data.")
@click.option("--layer", type=int, default=None, help="Split layer (default: argmax of SAS).")
@click.option("--feature", type=click.Choice(["max", "last", "post", "mean"]), default=DEFAULT_FEATURE,
              show_default=True,
              help="Prober input at the split layer: every token of the user's turn, scored one by one, the "
                   "highest risk counting (max); the last prompt token (last, the paper's prober); the mean over "
                   "the chat template's tokens after the user's text (post: end of turn and assistant header, "
                   "where an aligned model has read the whole request); or the mean over the user's tokens "
                   "(mean, not exportable).")
@click.option("--probe", type=click.Choice(PROBES), default=DEFAULT_PROBE, show_default=True,
              help="linear: logistic regression on the feature (stored as two ReLU units in the same engine); "
                   "mlp: the paper's d -> 64 -> 2 MLP.")
@click.option("--max-per-source", type=int, default=400, show_default=True, help="Rows drawn from each source.")
@click.option("--refusal-targets", type=int, default=300, show_default=True)
@click.option("--refusal-epochs", type=int, default=8, show_default=True)
@click.option("--pair-subspace", type=int, default=None,
              help="Confine the prober to the top-K directions in which the harmful/benign pairs differ "
                   "(less reliance on style; docs/RESULTS.md measures it).")
@click.option("--erase-sources", type=int, default=DEFAULT_ERASE_SOURCES, show_default=True,
              help="Remove the K directions along which calibration sources of the same class differ "
                   "(their style) before the prober reads the split-point state; 0 keeps them.")
@click.option("--answer-guard/--no-answer-guard", default=True, show_default=True,
              help="Also train the answer guard: a probe on the split-layer state of each token the model writes, "
                   "trained on the model's own greedy answers to calibration prompts (complying with a harmful "
                   "request or not).")
@click.option("--answer-per-source", type=int, default=24, show_default=True,
              help="Calibration prompts per source the model answers to train the answer guard.")
@click.option("--seed", type=int, default=0, show_default=True)
@chat_template_kwargs_option
def calibrate(model, out, pairs_files, harmful_col, benign_col, refusal_col, caption_col, image_col, image_root,
              caption_for_missing_image, vlsafe, harmful_files, benign_files, no_defaults, layer, feature,
              probe, max_per_source, refusal_targets, refusal_epochs, pair_subspace, erase_sources, answer_guard,
              answer_per_source, seed, chat_template_kwargs):
    """Calibrate a guard for MODEL: a Hugging Face model folder, a .gguf file, a model id in the
    local HF cache, or a named model fetched once into ~/.cache/steerguard: 'demo' (SmolLM2-135M-Instruct),
    'reference' (Qwen2.5-Coder-0.5B-Instruct) or 'gemma3-270m' (Gemma 3 270M, the pretrained base model).

    Writes the SAS curve (JSON + PNG), the prober, the refusal head, the answer guard and metrics to -o DIR.
    """
    torch_threads()
    from ..export.calibrate import CalibrationConfig, CalibrationData, calibrate as run
    from ..export.data import load_pairs, load_vlsafe
    from ..export.models import load_model, set_chat_template_kwargs

    data = CalibrationData.default() if not no_defaults else CalibrationData(pairs=[])
    if pairs_files:
        data.pairs = []  # the user's pairs replace the shipped ones; shipped benign extras stay
    for f in pairs_files:
        data.pairs += load_pairs(f, harmful_col, benign_col, refusal_col, caption_col, image=image_col,
                                 image_root=image_root, caption_for_missing_image=caption_for_missing_image)
    if vlsafe:
        data.pairs += load_vlsafe(vlsafe)
    data.extra += [_prompt_set(spec, 1) for spec in harmful_files] + [_prompt_set(spec, 0) for spec in benign_files]
    cfg = CalibrationConfig(layer=layer, feature=feature, probe=probe, max_per_source=max_per_source,
                            refusal_targets=refusal_targets, refusal_epochs=refusal_epochs, seed=seed,
                            pair_subspace=pair_subspace, erase_sources=erase_sources, answer_guard=answer_guard,
                            answer_per_source=answer_per_source)
    if answer_per_source < 1:
        raise SteerguardError("--answer-per-source must be at least 1 (or use --no-answer-guard)")
    check_output(out)
    data.check()
    lm = load_model(model)
    set_chat_template_kwargs(lm, chat_template_kwargs)
    guard = run(lm, data, cfg)
    guard.calibration["chat_template_kwargs"] = chat_template_kwargs
    guard.save(out)
    _print_summary(guard, out)


def _answer_summary(guard) -> str:
    a = guard.answer
    if a is None:
        return guard.metrics.get("answer_guard_skipped", "not trained (--no-answer-guard)")
    m, p = a.metrics, a.operating_points["balanced"]
    return (f"{a.score} over {m['answers']} answers ({m['complied']} complying), validation AUROC {m['val_auroc']:.3f}; "
            f"balanced tau {p['tau']:.3f} switches {p['fpr']:.1%} of benign answers, {p['tpr']:.1%} of complying ones")


def _prompt_set(spec: str, label: int):
    """FILE[:COLUMN[:CAPTION_COLUMN]], e.g. `vlsafe/examine_sampled_500_VLSafe.jsonl:query:caption`."""
    from ..export.data import load_prompts

    path, column, caption = (spec.split(":") + ["", ""])[:3] if not Path(spec).exists() else (spec, "", "")
    return load_prompts(path, label, column or "prompt", caption or None)


def _print_summary(guard, out: Path) -> None:
    m = guard.prober.metrics
    t = guard.metrics.get("timings", {})
    rows = [("model", guard.model["name"]),
            ("layers / hidden", f"{guard.model['num_layers']} / {guard.model['hidden_size']}"),
            ("split layer (argmax SAS)", f"{guard.split_layer}  (SAS {max(guard.sas.scores):.3f})"),
            ("prober", f"{guard.prober.probe} on the {guard.prober.feature} token(s) at layer {guard.prober.layer}"),
            ("validation accuracy / AUROC", f"{m['val_accuracy']:.3f} / {m['val_auroc']:.3f}"),
            *((f"tau {name}", f"{p['tau']:.4f}  (validation false fires {p['fpr']:.1%}, catches {p['tpr']:.1%}"
               + "".join(f"; {k} {v:.1%}" for k, v in p["fire_rates"].items() if ":" not in k) + ")")
              for name, p in guard.prober.operating_points.items()),
            ("refusal head", f"eps {guard.refusal.eps}, loss {guard.refusal.metrics['loss_per_epoch']}"),
            ("answer guard", _answer_summary(guard)),
            ("time", ", ".join(f"{k[:-2]} {v:.0f}s" for k, v in t.items())),
            ("written to", str(out))]
    width = max(len(k) for k, _ in rows)
    click.echo("")
    for k, v in rows:
        click.echo(f"  {k:<{width}}  {v}")


@click.command()
@click.argument("model", default="demo")
@click.option("--guard", "guard_dir", type=click.Path(path_type=Path), default=None,
              help="A guard folder from `steerguard calibrate` (omit to run the model unguarded).")
@click.option("-p", "--prompt", required=True, help="The user's request.")
@sampling_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def generate(model, guard_dir, prompt, sampling, as_json):
    """Answer PROMPT with MODEL through the guard (PyTorch reference path)."""
    torch_threads()
    from ..export.guard import Guard
    from ..export.models import load_model
    from ..export.reference import ReferenceGuard

    guard = Guard.load(guard_dir) if guard_dir else None
    lm = load_model(model)
    out = ReferenceGuard(lm, guard).generate(prompt, sampling)
    if as_json:
        click.echo(json.dumps({"text": out.text, "risk": out.risk, "fired": out.fired,
                               "split_layer": out.split_layer, "timings": out.timings}))
        return
    click.echo(out.text)
    if out.risk is None:
        decision = "unguarded"
    else:
        decision = f"risk {out.risk:.3f} (tau {guard.prober.tau:.3f}) -> " + ("REFUSAL HEAD" if out.fired else "pass")
    tps = out.timings["new_tokens"] / max(out.timings["total_s"] - out.timings["first_token_s"], 1e-9)
    click.echo(f"[{decision} | layer {out.split_layer} | {out.timings['new_tokens']} tokens, {tps:.1f} tok/s]", err=True)


@click.command("eval")
@click.argument("model", default="demo")
@click.option("--guard", "guard_dir", type=click.Path(path_type=Path), default=None,
              help="A guard folder (needed unless MODEL is a bundle).")
@click.option("--harmful", "harmful_files", multiple=True,
              help="Harmful prompts FILE[:COLUMN[:CAPTION_COLUMN]] (default column 'prompt'). Repeatable.")
@click.option("--benign", "benign_files", multiple=True, help="Benign prompts, same form. Repeatable.")
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), required=True,
              help="Folder for eval.json, report.md and the plots.")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--limit", type=int, default=None, help="At most this many prompts per file (seeded sample).")
@click.option("--risk-only", is_flag=True, help="Score the prober only; generate no answers.")
@click.option("--keep-overlap", is_flag=True, help="Keep prompts that also appear in the calibration data.")
@operating_point_option
@answer_guard_options
def eval_cmd(model, guard_dir, harmful_files, benign_files, out, max_new_tokens, limit, risk_only, keep_overlap,
             operating_point, answer):
    """Guarded vs unguarded ASR, false refusals and prober AUROC of a guard on MODEL (with --guard),
    or of a bundle from `steerguard export` (MODEL is the bundle folder; runs the engine chain).

    With no --harmful/--benign, uses the shipped evaluation sets (held-out harmful requests, benign
    questions that sound dangerous, benign conversational requests). The guard decides at
    --operating-point; the report reads every operating point on this run's risks (a table, and marked on
    roc.png)."""
    torch_threads()
    from ..export.data import drop_calibration_overlap, evaluation_sets
    from ..export.evaluate import BundleRunner, TorchRunner, evaluate, write_report
    from ..export.guard import Guard
    from ..export.models import load_model

    from ..runtime.model import operating_points_of, resolve_operating_point

    bundle = (Path(model) / "manifest.json").exists()
    if answer and not bundle:
        raise SteerguardError("the answer guard runs in exported bundles: give a bundle folder as MODEL")
    if not bundle and guard_dir is None:
        raise SteerguardError("give --guard DIR, or a bundle folder as MODEL")
    guard = Guard.load(guard_dir) if guard_dir and not bundle else None
    if guard is not None:     # the guard's own table; a bad choice fails before any model loads
        points = operating_points_of({"tau": guard.prober.tau, "operating_points": guard.prober.operating_points})
        named = "balanced" if points.get("balanced", {}).get("tau") == guard.prober.tau else None
        guard.prober.tau, point_name = resolve_operating_point(points, operating_point) \
            if operating_point is not None else (guard.prober.tau, named)
    sets = [_prompt_set(f, 1) for f in harmful_files] + [_prompt_set(f, 0) for f in benign_files]
    if not sets:
        sets = evaluation_sets()
    # drop first, then sample, so --limit counts prompts that are really held out
    dropped = {} if keep_overlap else drop_calibration_overlap(sets)
    for s in sets:
        if not s.prompts:
            raise SteerguardError(f"no prompts left in {s.source} after dropping those in the calibration data "
                                  "(use --keep-overlap to keep them)")
    sets = [s.sample(limit) for s in sets]
    if bundle:
        from ..runtime.model import GuardedModel

        gm = GuardedModel.load(model)
        if not gm.guarded:
            raise SteerguardError(f"{model} is an unguarded bundle; there is no guard to evaluate")
        gm.set_operating_point(operating_point)
        if answer:
            gm.set_answer_guard(**answer)
        runner, name, layer, tau = BundleRunner(gm), gm.manifest.model["name"], gm.split_layer, gm.tau
        points, point_name = gm.operating_points, gm.operating_point
    else:
        lm = load_model(model)
        guard.check_model(lm)
        runner, name, layer, tau = TorchRunner(lm, guard), guard.model["name"], guard.split_layer, guard.prober.tau
    points = dict(points)
    if point_name is None:
        points["explicit"] = {"tau": tau}
    results = evaluate(runner, tau, sets, max_new_tokens, generate=not risk_only)
    write_report(results, name, layer, tau, out, {"max_new_tokens": max_new_tokens, "runner": "bundle" if bundle
                                                  else "torch", "dropped_calibration_overlap": dropped,
                                                  "operating_point": point_name}, points)
    click.echo((out / "report.md").read_text())
