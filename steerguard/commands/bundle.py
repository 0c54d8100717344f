"""Bundle commands: export (needs the export extra), and run, chat, inspect, bench, build-trt (lean
runtime only)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..errors import SteerguardError
from .options import (answer_guard_options, backend_options, chat_template_kwargs_option, decision, describe_point,
                      load_bundle, operating_point_option,
                      operating_point_table, sampling_options, torch_threads)


@click.command()
@click.argument("model", default="demo")
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), required=True,
              help="Bundle folder to write (written atomically).")
@click.option("--guard", "guard_dir", type=click.Path(path_type=Path), default=None,
              help="Reuse a guard from `steerguard calibrate` (default: calibrate now with the shipped data).")
@click.option("--unguarded", is_flag=True, help="Export the model unsplit, with no guard (a speed baseline).")
@click.option("--precision", default="fp32", show_default=True, metavar="fp32|fp16|int8|int4",
              help="Weights of the decoder and head engines: fp32; int8 or int4 (weight-only, for CPUs); fp16 (GPUs).")
@click.option("--block-size", type=int, default=32, show_default=True, help="int8/int4 quantization block size.")
@click.option("--head-block-size", type=int, default=None,
              help="Block size of the head's int4/int8 weights (default: 128 at int4, where it makes the head "
                   "a third faster on CPUs; else --block-size).")
@click.option("--pre-precision", default=None, metavar="fp32|int8|int4",
              help="Weights of the pre engine (the layers the prober reads); default: --precision, but int8 "
                   "for an int4 bundle, which keeps the guard's decisions.")
@click.option("--prober-precision", type=click.Choice(["int8", "fp32"]), default="int8", show_default=True)
@click.option("--context", type=int, default=None, help="Longest sequence the bundle serves (default: the model's).")
@chat_template_kwargs_option
def export(model, out, guard_dir, unguarded, precision, block_size, head_block_size, pre_precision,
           prober_precision, context, chat_template_kwargs):
    """Export MODEL as a bundle: the engine chain split at the guard's layer with the prober (and the answer
    guard's prober) fused into the `pre` engine, the heads, tokenizer, chat template and a manifest pinning
    every file. MODEL is a Hugging Face folder, a .gguf file, a model id in the local HF cache, or a named
    model fetched once into ~/.cache/steerguard: 'demo' (SmolLM2-135M-Instruct), 'reference'
    (Qwen2.5-Coder-0.5B-Instruct) or 'gemma3-270m' (Gemma 3 270M, the pretrained base model)."""
    torch_threads()
    from ..export.bundle import export_bundle
    from ..export.calibrate import CalibrationConfig, CalibrationData, calibrate
    from ..export.guard import Guard
    from ..export.models import load_model, set_chat_template_kwargs

    if out.exists() and not (out / "manifest.json").exists() and any(out.iterdir()):
        raise SteerguardError(f"{out} exists and is not a bundle; choose another folder")
    if guard_dir and unguarded:
        raise SteerguardError("--guard and --unguarded exclude each other")
    from ..export.quantize import check_precision

    check_precision(precision, block_size)
    if head_block_size:
        check_precision(precision, head_block_size)
    if pre_precision:
        check_precision(pre_precision, block_size)
    guard = Guard.load(guard_dir) if guard_dir else None
    if guard is not None and guard.calibration.get("chat_template_kwargs", {}) != chat_template_kwargs:
        raise SteerguardError(f"{guard_dir} was calibrated with --chat-template-kwargs "
                              f"{json.dumps(guard.calibration.get('chat_template_kwargs', {}))}: export with the same")
    lm = load_model(model)
    set_chat_template_kwargs(lm, chat_template_kwargs)
    if guard is None and not unguarded:
        click.echo("no --guard given: calibrating one with the shipped data first", err=True)
        guard = calibrate(lm, CalibrationData.default(), CalibrationConfig())
        guard.calibration["chat_template_kwargs"] = chat_template_kwargs
        guard.save(out.with_name(out.name + ".guard"))
        click.echo(f"guard saved to {out.with_name(out.name + '.guard')}", err=True)
    export_bundle(lm, guard, out, precision=precision, block_size=block_size, head_block_size=head_block_size,
                  prober_precision=prober_precision, context=context, engine_precision={"pre": pre_precision} if pre_precision else None)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    click.echo(f"bundle written to {out} ({size / 1e6:.0f} MB); try: steerguard run {out} -p \"Hello!\"")


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("-p", "--prompt", required=True, help="The user's request.")
@click.option("--image", "images", multiple=True, type=click.Path(path_type=Path),
              help="An image shown with the prompt (multimodal bundles; repeat for several if the model takes them).")
@click.option("--system", default=None, help="A system message.")
@sampling_options
@backend_options
@operating_point_option
@answer_guard_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object instead of streaming.")
def run(bundle, prompt, images, system, sampling, backend, fallback_cpu, operating_point, answer, as_json):
    """Answer PROMPT (with --image, about the image) with BUNDLE, streaming; ends with one line: risk,
    decision (at the threshold --operating-point picks), tokens/s. The guard judges the text and the images
    together."""
    model = load_bundle(bundle, backend, fallback_cpu, operating_point, answer)
    content = ([{"type": "image", "image": str(i)} for i in images] + [{"type": "text", "text": prompt}]
               if images else prompt)
    request = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    if as_json:
        r = model.generate(request, sampling)
        click.echo(json.dumps({"text": r.text, "risk": r.risk, "fired": r.fired, "split_layer": r.split_layer,
                               "tau": r.tau, "operating_point": r.operating_point, "finish_reason": r.finish_reason,
                               "prompt_tokens": r.prompt_tokens, "switch": r.switch, "switch_at": r.switch_at,
                               "answer_score": r.answer_score, "dropped_tokens": r.dropped_tokens,
                               "timings": r.timings}))
        return
    stream = model.stream(request, sampling)
    for piece in stream:
        click.echo(piece, nl=False)
    r = stream.result
    click.echo("")
    sys.stdout.flush()   # the answer's last line before the decision line on stderr
    tps = f"{r.timings['decode_tok_s']:.1f} tok/s" if r.timings["decode_tok_s"] else "-"
    click.echo(f"[{decision(model, r)} | layer {r.split_layer} | {len(r.token_ids)} tokens, {tps}, "
               f"first token {1000 * r.timings['first_token_s']:.0f} ms]", err=True)


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--system", default=None, help="A system message.")
@sampling_options
@backend_options
@operating_point_option
@answer_guard_options
def chat(bundle, system, sampling, backend, fallback_cpu, operating_point, answer):
    """Multi-turn chat in the terminal. The guard judges every user turn (with the conversation so
    far, at the threshold --operating-point picks; /point NAME|TAU changes it); /reset starts over, /quit or
    Ctrl-D leaves."""
    model = load_bundle(bundle, backend, fallback_cpu, operating_point, answer)
    history = [{"role": "system", "content": system}] if system else []
    guard = (f"guarded at layer {model.split_layer}, {describe_point(model.tau, model.operating_point)}"
             if model.guarded else "unguarded")
    click.echo(f"chatting with {model.manifest.model['name']} ({guard}); /quit to leave")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            click.echo("")
            return
        if line in ("/quit", "/exit"):
            return
        if line.startswith("/point"):
            from .options import OperatingPointType

            try:
                model.set_operating_point(OperatingPointType().convert(line[6:].strip() or None, None, None))
                click.echo(f"  [{describe_point(model.tau, model.operating_point)}]", err=True)
            except SteerguardError as e:
                click.echo(f"error: {e}", err=True)
            continue
        if line == "/reset":
            history = history[:1] if system else []
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        try:
            stream = model.stream(history, sampling)
            click.echo("bot> ", nl=False)
            for piece in stream:
                click.echo(piece, nl=False)
        except SteerguardError as e:     # e.g. the conversation outgrew the context: say so, keep the chat
            history.pop()
            click.echo(f"\nerror: {e}", err=True)
            continue
        r = stream.result
        click.echo("")
        click.echo(f"  [{decision(model, r)}]", err=True)
        history.append({"role": "assistant", "content": r.text})


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of every file.")
def inspect(bundle, no_verify):
    """Print BUNDLE's manifest: the model, the guard, the SAS curve and the engine chain."""
    from ..runtime.manifest import Manifest

    m = Manifest.load(bundle, verify=not no_verify)
    mod = m.model
    click.echo(f"bundle   {m.root}  (schema {m.data['schema']}, steerguard {m.data.get('steerguard_version')}, "
               f"{m.data.get('created')}; {'all sha256 verified' if not no_verify else 'not verified'})")
    click.echo(f"model    {mod['name']} ({mod['architecture']}): {mod['num_layers']} layers, d={mod['hidden_size']}, "
               f"V={mod['vocab_size']}, heads {mod['num_heads']}/{mod['num_kv_heads']} kv, context {mod['context']}")
    click.echo(f"         source {mod['source']}, sha256 {mod['sha256'][:16]}...")
    g = m.guard
    if g:
        pm = g.get("prober_metrics", {})
        click.echo(f"guard    split layer {g['split_layer']}, tau {g['tau']:.3f}, eps {g['eps']}, prober "
                   f"{g['feature']} token -> {g['prober_hidden']} -> 2 ({g['prober_precision']}), val AUROC "
                   f"{pm.get('val_auroc', float('nan')):.3f}")
        _print_operating_points(m)
        _print_answer_guard(m)
        click.echo("SAS")
        scores = g["sas"]["scores"]
        top = max(scores)
        for layer, score in zip(g["sas"]["layers"], scores):
            bar = "#" * max(0, round(40 * score / top)) if top > 0 else ""
            mark = "  <- split" if layer == g["split_layer"] else ""
            click.echo(f"  {layer:>3} {score:7.3f} {bar}{mark}")
    else:
        click.echo("guard    none (unguarded bundle)")
    v = m.data.get("vision")
    if v:
        click.echo(f"vision   {v['kind']}: images fill {v['image_token']!r} placeholders, at most {v.get('max_images', 1)} "
                   f"per request; preprocessing {json.dumps(v['preprocess'])[:120]}...")
    click.echo("engines")
    for e in m.engines:
        size = sum(m.path(f).stat().st_size for f in [e["file"], *e.get("data_files", [])])
        layers = f"layers {e['layers'][0]}-{e['layers'][1] - 1}" if "layers" in e else ""
        extra = f", prober {e['prober']}" if "prober" in e else ""
        click.echo(f"  {e['name']:<8} {e['role']:<8} {e['precision']:<5} {size / 1e6:8.1f} MB  {layers}{extra}  "
                   f"in: {_names(e['inputs'])}  out: {_names(e['outputs'])}")


def _print_answer_guard(m) -> None:
    """The answer guard's running score, default settings and operating points (FPR: benign answers switched)."""
    from ..runtime.model import operating_points_of

    a = m.guard.get("answer")
    if not a:
        click.echo("answer   none (exported without an answer guard)")
        return
    met = a.get("metrics", {})
    click.echo(f"answer   {'on' if a.get('enabled', True) else 'off'} by default (--answer-guard), score {a['score']} "
               f"of the per-token risk, hold {a.get('hold', 0)}, switch {a.get('switch', 'continue')}; trained on "
               f"{met.get('answers', '?')} answers ({met.get('complied', '?')} complying), val AUROC "
               f"{met.get('val_auroc', float('nan')):.3f}")
    click.echo("         operating points (--answer-operating-point; FPR = benign answers switched, TPR = complying "
               "answers switched, on held-out calibration answers)")
    for line in operating_point_table(operating_points_of(a), a.get("default_operating_point", "balanced")):
        click.echo("       " + line)


def _print_operating_points(m) -> None:
    """The guard's named thresholds (runtime/model.py: operating_points_of) and where the ROC plot is."""
    from ..runtime.model import operating_points_of

    g = m.guard
    points = operating_points_of(g)
    default = g.get("default_operating_point") or "balanced"
    if not g.get("operating_points"):
        click.echo(f"operating points  only balanced (tau {g['tau']:.3f}): this bundle's guard was calibrated "
                   "before operating points")
        return
    click.echo(f"operating points  (--operating-point NAME|TAU; default {default}; FPR/TPR on held-out calibration "
               "rows, fire rates on the shipped evaluation sets)")
    for line in operating_point_table(points, default):
        click.echo(line)
    roc = g.get("roc") or {}
    plot = m.path("report/roc.png")
    where = f"{plot}" if plot.exists() else "no plot in this bundle"
    if roc.get("fpr"):
        click.echo(f"ROC      AUROC {roc.get('auroc', float('nan')):.3f} on {roc.get('rows', '?')} held-out rows; "
                   f"{where}")


def _names(names: list[str]) -> str:
    """Collapse per-layer cache names: past_key_values.0..21.key/value."""
    plain = [n for n in names if not n.startswith(("past_key_values.", "present."))]
    cache = len(names) - len(plain)
    return ", ".join(plain) + (f" + {cache} cache tensors" if cache else "")


@click.command()
@click.argument("bundles", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--prompt-tokens", type=int, default=68, show_default=True)
@click.option("--new-tokens", type=int, default=128, show_default=True)
@click.option("--runs", type=int, default=5, show_default=True)
@click.option("--warmup", type=int, default=1, show_default=True)
@click.option("--refusal", is_flag=True, help="Time the refusal head path instead of the plain head.")
@backend_options
@click.option("--json", "as_json", is_flag=True)
def bench(bundles, prompt_tokens, new_tokens, runs, warmup, refusal, backend, fallback_cpu, as_json):
    """Time to first token, decode tokens/s (median of --runs after --warmup, greedy, exactly
    --new-tokens tokens), time in each engine, peak memory and achieved memory bandwidth. Several
    BUNDLES (e.g. one per precision) are measured one after another and compared side by side."""
    from dataclasses import asdict

    from ..runtime.bench import bench as run_bench, copy_bandwidth_gbs, decode_weight_bytes, prompt_of_length

    if runs < 1 or warmup < 0 or new_tokens < 2:
        raise SteerguardError("--runs must be >= 1, --warmup >= 0 and --new-tokens >= 2")
    copy = copy_bandwidth_gbs()
    rows = []
    for bundle in bundles:
        model = load_bundle(bundle, backend, fallback_cpu)
        ids = prompt_of_length(model, prompt_tokens)
        r = run_bench(model, ids, new_tokens, runs, warmup, steer=True if refusal else None)
        weights = decode_weight_bytes(model)
        rows.append((bundle, model, r, weights, weights * r.decode_tok_s / 1e9))
    if as_json:
        out = [{**asdict(r), "bundle": str(b), "precision": m.manifest.data.get("precision", "fp32"),
                "weight_bytes": w, "achieved_gbs": bw, "copy_gbs": copy} for b, m, r, w, bw in rows]
        click.echo(json.dumps(out[0] if len(out) == 1 else out))
        return
    first = rows[0][2]
    click.echo(f"{rows[0][1].manifest.model['name']} ({backend}, {first.prompt_tokens}-token prompt, {new_tokens} new "
               f"tokens, median of {runs}; machine copy bandwidth {copy:.1f} GB/s)")
    click.echo(f"  {'bundle':<28} {'precision':<9} {'first token':>11} {'decode':>12} {'vs first':>8} "
               f"{'MB/token':>9} {'bandwidth':>17}")
    for bundle, model, r, weights, bw in rows:
        click.echo(f"  {bundle.name[:28]:<28} {model.manifest.data.get('precision', 'fp32'):<9} "
                   f"{r.ttft_ms:8.1f} ms {r.decode_tok_s:7.1f} tok/s {r.decode_tok_s / first.decode_tok_s:7.2f}x "
                   f"{weights / 1e6:9.0f} {bw:6.1f} GB/s ({100 * bw / copy:3.0f}%)")
    for bundle, model, r, _, _ in rows:
        click.echo(f"  time per token in each engine, {bundle.name}: " +
                   ", ".join(f"{k} {v:.2f} ms" for k, v in r.engine_ms_per_token.items()))
    click.echo(f"  peak memory (RSS) of this process: {rows[-1][2].peak_rss_mb:.0f} MB"
               + (" (all bundles above; bench one bundle for its own figure)" if len(rows) > 1 else ""))


@click.command("build-trt")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Rebuild even when plans for this GPU exist.")
@click.option("--fp16/--no-fp16", default=True, show_default=True, help="Let TensorRT use fp16 kernels.")
@click.option("--max-batch", type=int, default=4, show_default=True, help="Largest batch the plans serve.")
@click.option("--max-len", type=int, default=2048, show_default=True, help="Longest prompt + answer the plans serve.")
def build_trt(bundle, force, fp16, max_batch, max_len):
    """Build TensorRT plans for BUNDLE's engines on this GPU (onnxruntime's TensorRT execution provider
    and its engine cache), with optimization profiles covering prefill and decode shapes, and store
    them under BUNDLE/trt/<gpu>_<compute capability>_<TensorRT version>/. Needs a GPU."""
    from ..engines.tensorrt import build_plans

    out = build_plans(bundle, force=force, fp16=fp16, max_batch=max_batch, max_len=max_len)
    click.echo(f"TensorRT plans written to {out}")
