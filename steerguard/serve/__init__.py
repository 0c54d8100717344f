"""`steerguard serve`: an OpenAI-compatible HTTP server over a bundle, with continuous batching and the
guard's decision in every answer. Needs the `serve` extra (starlette, uvicorn, pydantic); the lean
runtime does not."""

from __future__ import annotations

from pathlib import Path

from ..errors import SteerguardError


def _require_stack() -> None:
    try:
        import pydantic  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise SteerguardError(f"the server needs the serve extra ({e.name} is missing): "
                              "pip install 'steerguard[serve]'") from None


def serve(bundle: str | Path, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8,
          max_queue: int = 64, max_len: int | None = None, prefill_tokens: int = 64, prefix_cache: bool = True,
          api_key: str | None = None,
          model_name: str | None = None, image_root: Path | None = None, max_body_mb: float = 16,
          max_image_mb: float = 8, backend: str = "cpu", threads: int | None = None,
          fallback_to_cpu: bool = False, log_requests: bool = False, on_ready=None,
          operating_point: str | float | None = None, answer: dict | None = None) -> None:
    """Load `bundle` and serve it until interrupted, judging requests at `operating_point` unless they ask for
    another, with the answer guard set by `answer` (GuardedModel.set_answer_guard's arguments; default the
    bundle's). `on_ready(model, batcher, config)` runs before listening."""
    _require_stack()
    import uvicorn

    from ..runtime.batching import ContinuousBatcher
    from ..runtime.model import GuardedModel
    from .app import ServeConfig, create_app
    from .messages import ImageLimits

    model = GuardedModel.load(bundle, backend=backend, threads=threads, fallback_to_cpu=fallback_to_cpu,
                              operating_point=operating_point)
    if answer:
        model.set_answer_guard(**answer)
    batcher = ContinuousBatcher(model, max_batch=max_batch, max_queue=max_queue, max_len=max_len,
                                prefill_tokens=prefill_tokens, prefix_cache=prefix_cache)
    limits = ImageLimits(root=Path(image_root).resolve() if image_root else None,
                         max_bytes=int(max_image_mb * 1024 * 1024))
    config = ServeConfig(model_name=model_name or model.manifest.model["name"], api_key=api_key,
                         max_body_bytes=int(max_body_mb * 1024 * 1024), images=limits)
    app = create_app(model, batcher, config)
    if on_ready:
        on_ready(model, batcher, config)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info" if log_requests else "warning",
                    access_log=log_requests, timeout_graceful_shutdown=5)
    finally:
        batcher.close()
