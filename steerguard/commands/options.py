"""What several commands share: sampling and backend options, loading a bundle, the decision line."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import click

from ..errors import SteerguardError


def sampling_options(f):
    """--max-new-tokens, --temperature, --top-k, --top-p, --seed, --stop -> one `sampling` argument."""
    opts = [click.option("--max-new-tokens", type=int, default=128, show_default=True),
            click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy."),
            click.option("--top-k", type=int, default=0, show_default=True, help="0 = off."),
            click.option("--top-p", type=float, default=1.0, show_default=True),
            click.option("--seed", type=int, default=0, show_default=True),
            click.option("--stop", multiple=True, help="Stop string (repeatable); not included in the answer.")]

    def wrapper(*args, max_new_tokens, temperature, top_k, top_p, seed, stop, **kw):
        from ..runtime.sampling import Sampling

        sampling = Sampling(max_new_tokens, temperature, top_k, top_p, seed, tuple(stop))
        sampling.check()
        return f(*args, sampling=sampling, **kw)

    functools.update_wrapper(wrapper, f)   # keeps the click options already attached to f
    for opt in reversed(opts):
        wrapper = opt(wrapper)
    return wrapper


class OperatingPointType(click.ParamType):
    """NAME or TAU: a number is an explicit tau (checked against [0, 1] when the bundle loads), else a name."""
    name = "NAME|TAU"

    def convert(self, value, param, ctx):
        if not isinstance(value, str):
            return value
        try:
            return float(value)
        except ValueError:
            return value


OPERATING_POINT_HELP = ("The guard's threshold: strict (fires most: the lowest tau), balanced (the calibrated tau, "
                        "the default), permissive (fires least: the highest tau), or a tau between 0 and 1. "
                        "`steerguard inspect BUNDLE` shows each one's false and true fire rates.")


def operating_point_option(f):
    """--operating-point NAME|TAU, passed on as `operating_point` (None: the bundle's default)."""
    return click.option("--operating-point", "operating_point", type=OperatingPointType(), default=None,
                        help=OPERATING_POINT_HELP)(f)


ANSWER_GUARD_HELP = ("Watch the answer as it is written and switch it to the refusal head when its running risk "
                     "crosses the answer guard's threshold (default: what the bundle says, off in bundles exported "
                     "now; `steerguard inspect` shows it).")


def answer_guard_options(f):
    """--answer-guard on|off, --answer-operating-point, --answer-hold, --answer-switch -> one `answer` dict of
    the settings given (GuardedModel.set_answer_guard's arguments)."""
    opts = [click.option("--answer-guard", "answer_guard", type=click.Choice(["on", "off"]), default=None,
                         help=ANSWER_GUARD_HELP),
            click.option("--answer-operating-point", type=OperatingPointType(), default=None,
                         help="The answer guard's threshold: strict, balanced (default), permissive, or a tau."),
            click.option("--answer-hold", type=click.IntRange(min=0), default=None,
                         help="Keep the first N answer tokens back until the answer guard has seen them (a "
                              "switch then drops them); 0 streams at once (the default)."),
            click.option("--answer-switch", type=click.Choice(["continue", "restart"]), default=None,
                         help="On a switch the refusal head answers from the prompt (restart: what the bundle says "
                              "unless exported before it), or carries on after what was shown (continue).")]

    def wrapper(*args, answer_guard, answer_operating_point, answer_hold, answer_switch, **kw):
        answer = {"enabled": None if answer_guard is None else answer_guard == "on",
                  "operating_point": answer_operating_point, "hold": answer_hold, "switch": answer_switch}
        return f(*args, answer={k: v for k, v in answer.items() if v is not None}, **kw)

    functools.update_wrapper(wrapper, f)
    for opt in reversed(opts):
        wrapper = opt(wrapper)
    return wrapper


def chat_template_kwargs_option(f):
    """--chat-template-kwargs JSON -> `chat_template_kwargs` (a dict, empty when not given)."""
    def parse(ctx, param, value):
        if value is None:
            return {}
        import json

        try:
            parsed = json.loads(value)
        except ValueError as e:
            raise click.BadParameter(f"not JSON ({e.msg}); e.g. '{{\"enable_thinking\": false}}'") from None
        if not isinstance(parsed, dict):
            raise click.BadParameter("give a JSON object, e.g. '{\"enable_thinking\": false}'")
        return parsed

    return click.option("--chat-template-kwargs", "chat_template_kwargs", default=None, callback=parse,
                        metavar="JSON",
                        help="Variables for the model's chat template, fixed for calibration and in the bundle, e.g. "
                             "'{\"enable_thinking\": false}' for Qwen3 (default: what the template does without them).")(f)


def backend_options(f):
    """--backend and --fallback-cpu, passed on as `backend` and `fallback_cpu`."""
    f = click.option("--fallback-cpu", is_flag=True, help="Run on the CPU when the backend is not available here.")(f)
    return click.option("--backend", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu",
                        show_default=True, help="Where the engines run.")(f)


def load_bundle(bundle: Path, backend: str = "cpu", fallback_cpu: bool = False, operating_point=None,
                answer: dict | None = None):
    from ..runtime.model import GuardedModel

    model = GuardedModel.load(bundle, backend=backend, fallback_to_cpu=fallback_cpu, operating_point=operating_point)
    if answer:
        model.set_answer_guard(**answer)
    if model.backend != backend:
        click.echo(f"note: {backend} is not available here; running on the cpu (--fallback-cpu)", err=True)
    return model


def decision(model, result) -> str:
    """The guard's decision on one answer, as the run and chat commands print it."""
    if result.risk is None:
        return "unguarded"
    verdict = "REFUSAL HEAD" if result.fired else "pass"
    tau = model.tau if result.tau is None else result.tau
    point = f", {result.operating_point}" if result.operating_point else ""
    line = f"risk {result.risk:.3f} (tau {tau:.3f}{point}) -> {verdict}"
    if result.switch == "answer":
        dropped = f", {result.dropped_tokens} held tokens dropped" if result.dropped_tokens else ""
        line += (f"; answer guard switched to the REFUSAL HEAD after token {result.switch_at} "
                 f"(score {result.answer_score:.3f} >= {model.answer_guard.tau:.3f}{dropped})")
    elif result.answer_score is not None:
        line += f"; answer guard {result.answer_score:.3f} < {model.answer_guard.tau:.3f}"
    return line


def describe_point(tau: float | None, name: str | None) -> str:
    """'tau 0.412 (strict)', or 'tau 0.300' for an explicit one."""
    return f"tau {tau:.3f}" + (f" ({name})" if name else "")


def operating_point_table(points: dict, default: str | None, tau: float | None = None,
                          name: str | None = None) -> list[str]:
    """The operating points as lines: each one's tau, held-out FPR/TPR and fire rates on the shipped
    evaluation sets (as calibration recorded them), the chosen one marked."""
    pct = lambda v: f"{100 * v:5.1f}%" if isinstance(v, (int, float)) else "     -"  # noqa: E731
    sets = list(dict.fromkeys(k for p in points.values() for k in (p.get("fire_rates") or {})))
    shipped = [k for k in sets if not k.startswith("validation:")]    # calibration's own rows are in FPR/TPR
    sets = shipped or sets
    lines = [f"  {'':2}{'name':<11} {'tau':>6} {'FPR':>6} {'TPR':>6}" + "".join(f" {s[:22]:>22}" for s in sets)]
    for key, p in points.items():
        mark = "->" if key == name else "  "
        extra = " (default)" if key == default else ""
        rates = p.get("fire_rates") or {}
        lines.append(f"  {mark}{key:<11} {p['tau']:6.3f} {pct(p.get('fpr'))} {pct(p.get('tpr'))}"
                     + "".join(f" {pct(rates.get(s)):>22}" for s in sets) + extra)
    if name is None and tau is not None:
        lines.append(f"  ->{'(explicit)':<11} {tau:6.3f}")
    return lines


def torch_threads() -> None:
    import torch

    n = os.environ.get("STEERGUARD_THREADS")
    if n:
        torch.set_num_threads(int(n))


def check_output(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise SteerguardError(f"{out} exists and is not a folder")
