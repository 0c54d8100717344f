"""steerguard's command line: the group, its global options and error handling; each command lives in
one module of `steerguard.commands` and is registered here. Errors print one line and exit non-zero;
--debug shows tracebacks."""

from __future__ import annotations

import os
import sys

import click

from .errors import SteerguardError


class Group(click.Group):
    """Turns SteerguardError (and a few expected failures) into one line and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SteerguardError as e:
            if ctx.params.get("debug"):
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.option("--threads", type=int, default=None, help="CPU threads for torch and onnxruntime (default: all cores).")
@click.version_option(package_name="steerguard")
def main(debug: bool, threads: int | None) -> None:
    """steerguard: AutoSteer safety guards for LLMs, deployable on-device.

    \b
    calibrate  find the safety-aware layer, train the prober and the refusal head
    export     calibrate (or reuse a guard) and write a bundle: the split ONNX engine chain
    run        answer a prompt with a bundle, streaming (lean runtime, no torch)
    chat       multi-turn terminal chat with a bundle; the guard judges every user turn
    serve      an OpenAI-compatible server for a bundle, continuous batching (the serve extra)
    inspect    print a bundle's manifest, SAS curve and engines
    bench      time to first token, decode tokens/s, time per engine, peak memory
    build-trt  TensorRT plans for a bundle on this GPU
    generate   answer a prompt through the guarded model (PyTorch reference path)
    eval       guarded vs unguarded attack success rate, false refusals, prober AUROC
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if threads:
        os.environ["STEERGUARD_THREADS"] = str(threads)


from .commands.bundle import bench, build_trt, chat, export, inspect, run  # noqa: E402
from .commands.guard import calibrate, eval_cmd, generate  # noqa: E402
from .commands.serve import serve  # noqa: E402

for command in (calibrate, export, run, chat, serve, inspect, bench, build_trt, generate, eval_cmd):
    main.add_command(command)
