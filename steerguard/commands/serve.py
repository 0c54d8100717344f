"""`steerguard serve`: a bundle behind an OpenAI-compatible HTTP API (the serve extra)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from ..errors import SteerguardError
from .options import answer_guard_options, backend_options, describe_point, operating_point_option


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but the loopback exposes the model to the network.")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--max-batch", type=int, default=8, show_default=True,
              help="Requests decoded together (continuous batching); each holds one row of the KV cache.")
@click.option("--max-queue", type=int, default=64, show_default=True,
              help="Requests waiting for a row; past it the server answers 429 with Retry-After.")
@click.option("--prefill-tokens", type=int, default=64, show_default=True,
              help="Prompt tokens prefilled together at one token boundary (one request always goes, however "
                   "long): more admits a burst sooner, fewer keeps the running answers' pauses short.")
@click.option("--no-prefix-cache", is_flag=True,
              help="Prefill every prompt whole instead of reusing the KV of the chat template's opening.")
@click.option("--max-len", type=int, default=None,
              help="Tokens per request, prompt + answer (default: the model's context, at most 4096).")
@click.option("--api-key", default=None, envvar="STEERGUARD_API_KEY",
              help="Require 'Authorization: Bearer KEY' on every endpoint but /health (or set STEERGUARD_API_KEY).")
@click.option("--model-name", default=None, help="The model id clients send (default: the bundle's model name).")
@click.option("--image-root", type=click.Path(path_type=Path, file_okay=False, exists=True), default=None,
              help="Folder local image paths may be read from (multimodal bundles); without it only data: URLs.")
@click.option("--max-body-mb", type=float, default=16, show_default=True, help="Largest request body.")
@click.option("--max-image-mb", type=float, default=8, show_default=True, help="Largest image, encoded.")
@click.option("--log-requests", is_flag=True, help="Log every request (uvicorn's access log).")
@backend_options
@operating_point_option
@answer_guard_options
def serve(bundle, host, port, max_batch, max_queue, prefill_tokens, no_prefix_cache, max_len, api_key, model_name, image_root, max_body_mb,
          max_image_mb, log_requests, backend, fallback_cpu, operating_point, answer):
    """Serve BUNDLE through the OpenAI API: /v1/chat/completions (streaming too), /v1/completions,
    /v1/moderations (the guard's prober alone), /v1/models and /health. Each answer carries the guard's
    risk and decision in a `guard` field; a refused request ends with finish_reason "content_filter".
    --operating-point sets the guard's threshold; a request may ask for another with the extension field
    `operating_point` (a name or a tau). The answer guard (--answer-guard) watches each answer as it is
    written; an answer it switches to the refusal head also ends with finish_reason "content_filter"."""
    from ..serve import serve as run_server

    if max_batch < 1 or max_queue < 0 or prefill_tokens < 1 or (max_len is not None and max_len < 2) or max_body_mb <= 0 \
            or max_image_mb <= 0 or not 0 <= port < 65536:
        raise SteerguardError("--max-batch and --prefill-tokens must be >= 1, --max-queue >= 0, --max-len >= 2, the size limits > 0 "
                              "and --port in 0-65535")
    if api_key is not None and not api_key.strip():
        raise SteerguardError("--api-key is empty")

    def ready(model, batcher, config):
        guard = (f"guarded at layer {model.split_layer}, {describe_point(model.tau, model.operating_point)}"
                 if model.guarded else "unguarded")
        auth = "API key required" if config.api_key else "no API key"
        click.echo(f"serving {config.model_name} ({guard}) on http://{host}:{port}/v1 — {max_batch} rows of "
                   f"{batcher.max_len} tokens, queue {max_queue}, {auth}; Ctrl-C stops", err=True)

    threads = int(os.environ["STEERGUARD_THREADS"]) if os.environ.get("STEERGUARD_THREADS") else None
    run_server(bundle, host=host, port=port, max_batch=max_batch, max_queue=max_queue, max_len=max_len,
               prefill_tokens=prefill_tokens, prefix_cache=not no_prefix_cache,
               api_key=api_key, model_name=model_name, image_root=image_root, max_body_mb=max_body_mb,
               max_image_mb=max_image_mb, backend=backend, threads=threads, fallback_to_cpu=fallback_cpu,
               log_requests=log_requests, on_ready=ready, operating_point=operating_point, answer=answer)
