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


def backend_options(f):
    """--backend and --fallback-cpu, passed on as `backend` and `fallback_cpu`."""
    f = click.option("--fallback-cpu", is_flag=True, help="Run on the CPU when the backend is not available here.")(f)
    return click.option("--backend", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu",
                        show_default=True, help="Where the engines run.")(f)


def load_bundle(bundle: Path, backend: str = "cpu", fallback_cpu: bool = False):
    from ..runtime.model import GuardedModel

    model = GuardedModel.load(bundle, backend=backend, fallback_to_cpu=fallback_cpu)
    if model.backend != backend:
        click.echo(f"note: {backend} is not available here; running on the cpu (--fallback-cpu)", err=True)
    return model


def decision(model, result) -> str:
    """The guard's decision on one answer, as the run and chat commands print it."""
    if result.risk is None:
        return "unguarded"
    verdict = "REFUSAL HEAD" if result.fired else "pass"
    return f"risk {result.risk:.3f} (tau {model.tau:.3f}) -> {verdict}"


def torch_threads() -> None:
    import torch

    n = os.environ.get("STEERGUARD_THREADS")
    if n:
        torch.set_num_threads(int(n))


def check_output(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise SteerguardError(f"{out} exists and is not a folder")
