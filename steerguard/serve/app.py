"""The OpenAI-compatible app: /v1/chat/completions, /v1/completions, /v1/moderations, /v1/models and
/health over one GuardedModel and its ContinuousBatcher.

Every answer carries the guard's decision in an extra `guard` field (risk, tau, operating_point, fired,
split_layer): the server judges at its `--operating-point`, a request may ask for another (an extension
field `operating_point`: a name or a tau in [0, 1]);
when the guard fired the answer came from the refusal head and its finish_reason is "content_filter"; so does an
answer the answer guard switched to the refusal head mid-stream (`guard.answer` says after which token).
Errors are OpenAI's shape with the right status; nothing a client sends produces a 500."""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import SteerguardError
from ..runtime.batching import Admitted, ContinuousBatcher, Failed, Finished, Piece, QueueFull, Scored
from ..runtime.model import GenerationResult, GuardedModel, Prompt
from ..runtime.sampling import Sampling
from .errors import APIError
from .messages import ImageLimits, read_image, runtime_messages
from .schemas import (ChatCompletionRequest, CompletionRequest, ImagePart, ModerationRequest, _Generation, parse)
from .transport import ClientGone, DisconnectWatch, EventPipe, EventStreamResponse, read_json, sse

log = logging.getLogger("steerguard.serve")


@dataclass
class ServeConfig:
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 16 * 1024 * 1024
    images: ImageLimits = field(default_factory=ImageLimits)


class Service:
    """The endpoints' logic over one model and its batcher."""

    def __init__(self, model: GuardedModel, batcher: ContinuousBatcher, config: ServeConfig):
        self.model, self.batcher, self.config = model, batcher, config
        self.created = int(time.time())
        gen = model.manifest.data.get("generation", {})
        self.default_temperature = float(gen.get("temperature", 1.0))
        self.default_max_tokens = int(gen.get("max_new_tokens", 256))

    # ---- GET ----------------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        b = self.batcher
        return JSONResponse({"status": "ok", "model": self.config.model_name, "rows_in_use": b.active,
                             "max_batch": b.max_batch, "queued": b.queued, "max_queue": b.max_queue,
                             "served": b.served, "guarded": self.model.guarded})

    def model_card(self) -> dict:
        m = self.model
        return {"id": self.config.model_name, "object": "model", "created": self.created, "owned_by": "steerguard",
                "max_model_len": self.batcher.max_len,
                "guard": {"tau": m.tau, "operating_point": m.operating_point, "split_layer": m.split_layer,
                          "operating_points": {k: p["tau"] for k, p in m.operating_points.items()},
                          "answer": {"enabled": m.answer_guard.enabled, "tau": m.answer_guard.tau,
                                     "operating_point": m.answer_guard.operating_point, "hold": m.answer_guard.hold,
                                     "switch": m.answer_guard.switch, "score": str(m.answer_guard.score)}
                          if m.answer_guard.score is not None else None}
                if m.guarded else None}

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    async def one_model(self, request: Request) -> Response:
        self._check_model(request.path_params["model"], "model")
        return JSONResponse(self.model_card())

    # ---- POST: generation -----------------------------------------------------------------------------
    async def chat_completions(self, request: Request) -> Response:
        req = parse(ChatCompletionRequest, await read_json(request, self.config.max_body_bytes))
        self._check_model(req.model, "model")

        def prepare() -> Prompt:
            messages = runtime_messages(req.messages, self.config.images, self.model.vision is not None)
            return self.model.prepare(messages)

        prompt = await self._prepare(prepare, "messages")
        return await self._generate(request, req, prompt, chat=True)

    async def completions(self, request: Request) -> Response:
        req = parse(CompletionRequest, await read_json(request, self.config.max_body_bytes))
        self._check_model(req.model, "model")
        raw = req.single_prompt()
        if isinstance(raw, str) and not raw:
            raise APIError(400, "prompt: the prompt is empty", param="prompt", code="invalid_value")
        vocab = self.model.manifest.model["vocab_size"]
        if isinstance(raw, list) and max(raw) >= vocab:
            raise APIError(400, f"prompt: token ids must be below the vocabulary size {vocab}", param="prompt",
                           code="invalid_value")

        def prepare() -> Prompt:    # no chat template: the text as the tokenizer encodes it
            ids = raw if isinstance(raw, list) else self.model.tokenizer.tokenizer.encode(raw).ids
            if not ids:
                raise SteerguardError("the prompt is empty")
            return self.model.prepare(ids)

        prompt = await self._prepare(prepare, "prompt")
        return await self._generate(request, req, prompt, chat=False)

    async def _prepare(self, work, param: str) -> Prompt:
        """Tokenize (and read images) off the event loop; a runtime error is the client's 400."""
        try:
            return await asyncio.get_running_loop().run_in_executor(None, work)
        except SteerguardError as e:
            raise APIError(400, str(e), param=param, code="invalid_value") from None

    def _sampling(self, req: _Generation, prompt: Prompt) -> Sampling:
        n, room = len(prompt.ids), self.batcher.max_len - len(prompt.ids)
        limit, name = req.token_limit()
        if room < 1:
            raise APIError(400, f"This model's maximum context length is {self.batcher.max_len} tokens. However, "
                           f"your prompt is {n} tokens, leaving no room for an answer. Please reduce the length "
                           "of the prompt.", param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
                           code="context_length_exceeded")
        if limit is None:
            limit = min(self.default_max_tokens, room)
        elif limit < 1:
            raise APIError(400, f"{name}: must be at least 1, got {limit}", param=name, code="invalid_value")
        elif limit > room:
            raise APIError(400, f"This model's maximum context length is {self.batcher.max_len} tokens. However, "
                           f"you requested {n + limit} tokens ({n} in the prompt, {limit} in the completion). "
                           f"Please reduce the prompt or {name}.", param=name, code="context_length_exceeded")
        seed = 0 if req.seed is None else req.seed % 2**64
        temperature = self.default_temperature if req.temperature is None else req.temperature
        return Sampling(max_new_tokens=limit, temperature=temperature,
                        top_p=1.0 if req.top_p is None else req.top_p, seed=seed, stop=req.stop_strings(),
                        ignore_eos=req.ignore_eos)

    def _operating_point(self, value: str | float | None) -> str | float | None:
        """The request's `operating_point`, checked: a bad one is a 400 naming the field."""
        try:
            self.model.resolve_operating_point(value)
        except SteerguardError as e:
            raise APIError(400, f"operating_point: {e}", param="operating_point", code="invalid_value") from None
        return value

    async def _generate(self, request: Request, req: _Generation, prompt: Prompt, chat: bool) -> Response:
        sampling = self._sampling(req, prompt)
        point = self._operating_point(req.operating_point)
        pipe = EventPipe(asyncio.get_running_loop())
        try:
            ticket = self.batcher.submit(prompt, sampling, pipe, operating_point=point)
        except QueueFull as e:
            raise APIError(429, f"The server is busy: {e}", code="rate_limit_exceeded",
                           headers={"Retry-After": str(e.retry_after_s)}) from None
        except SteerguardError as e:
            raise APIError(400, str(e), code="invalid_value") from None
        answer = Answer(self, chat, req.model)
        watch = DisconnectWatch(request.receive)
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return EventStreamResponse(answer.stream(pipe, usage), watch, ticket.cancel)
        try:
            result = await watch.within(_collect(pipe))
        except ClientGone:
            return Response(status_code=499)
        finally:
            ticket.cancel()      # no-op once finished; frees the row if the client left
            watch.close()
        return JSONResponse(answer.complete(result))

    # ---- POST: moderation ---------------------------------------------------------------------------------
    async def moderations(self, request: Request) -> Response:
        req = parse(ModerationRequest, await read_json(request, self.config.max_body_bytes))
        if req.model is not None:
            self._check_model(req.model, "model")
        if not self.model.guarded:
            raise APIError(400, "this bundle has no guard, so it has nothing to moderate with", param="model",
                           code="moderation_unavailable")
        point = self._operating_point(req.operating_point)
        if isinstance(req.input, str) or isinstance(req.input[0], str):
            texts = [req.input] if isinstance(req.input, str) else req.input
            if any(not t.strip() for t in texts):
                raise APIError(400, "input: every text must hold more than whitespace", param="input")
            jobs = [lambda t=t: self.model.prepare([{"role": "user", "content": t}]) for t in texts]
        else:
            jobs = [lambda: self.model.prepare(self._multimodal_input(req.input))]
        scored = []
        for job in jobs:   # one prefill up to the prober each, queued like any request
            scored.append(await self._score(request, await self._prepare(job, "input"), point))
        results = []
        for s in scored:
            risk = _finite(s.risk)
            results.append({"flagged": s.fired, "categories": {"harmful": s.fired},
                            "category_scores": {"harmful": risk if risk is not None else 1.0},
                            "category_applied_input_types": {"harmful": ["text"]},
                            "guard": self.guard_info(s.risk, s.fired, s.tau, s.operating_point)})
        return JSONResponse({"id": f"modr-{uuid.uuid4().hex}", "model": self.config.model_name, "results": results})

    def _multimodal_input(self, parts: list) -> list[dict]:
        if any(isinstance(p, ImagePart) for p in parts) and self.model.vision is None:
            raise APIError(400, "this model reads text only; remove the image_url parts", param="input",
                           code="image_not_supported")
        content = [{"type": "text", "text": p.text} if not isinstance(p, ImagePart) else
                   {"type": "image", "image": read_image(p.image_url.url, self.config.images, f"input.{i}.image_url.url")}
                   for i, p in enumerate(parts)]
        if self.model.vision is None:
            content = "\n".join(p["text"] for p in content)
        return [{"role": "user", "content": content}]

    async def _score(self, request: Request, prompt: Prompt, point: str | float | None = None) -> Scored:
        pipe = EventPipe(asyncio.get_running_loop())
        try:
            ticket = self.batcher.submit_score(prompt, pipe, point)
        except QueueFull as e:
            raise APIError(429, f"The server is busy: {e}", code="rate_limit_exceeded",
                           headers={"Retry-After": str(e.retry_after_s)}) from None
        except SteerguardError as e:
            raise APIError(400, str(e), param="input", code="invalid_value") from None
        watch = DisconnectWatch(request.receive)
        try:
            event = await watch.within(pipe.next())
        except ClientGone:
            ticket.cancel()
            raise
        finally:
            watch.close()
        if isinstance(event, Failed):
            raise _failure(event.error)
        return event

    # ---- shared -----------------------------------------------------------------------------------------
    def _check_model(self, name: str, param: str) -> None:
        if name != self.config.model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves "
                           f"'{self.config.model_name}'", param=param, code="model_not_found")

    def guard_info(self, risk: float | None, fired: bool, tau: float | None, operating_point: str | None,
                   result: GenerationResult | None = None) -> dict:
        """The guard's decision as answers carry it: the threshold it was taken at and that threshold's name
        (null for an explicit tau); with a finished `result`, what the answer guard did (`answer`: null when it
        did not watch this answer)."""
        info = {"risk": _finite(risk), "tau": tau, "operating_point": operating_point, "fired": bool(fired),
                "split_layer": self.model.split_layer}
        if result is not None:
            watched = result.switch == "answer" or result.answer_score is not None
            info["answer"] = {"switched": result.switch == "answer", "switch_at": result.switch_at if
                              result.switch == "answer" else None, "score": _finite(result.answer_score),
                              "tau": self.model.answer_guard.tau, "dropped_tokens": result.dropped_tokens} \
                if watched else None
        return info


class Answer:
    """One generation's response objects: the whole answer, or its server-sent events."""

    def __init__(self, service: Service, chat: bool, model_name: str):
        self.service, self.chat = service, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created, self.model = int(time.time()), model_name

    def _envelope(self, obj: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices, **extra}

    @staticmethod
    def finish_reason(result: GenerationResult) -> str:
        if result.fired or result.switch == "answer":
            return "content_filter"
        return "length" if result.finish_reason == "length" else "stop"

    @staticmethod
    def usage(result: GenerationResult) -> dict:
        return {"prompt_tokens": result.prompt_tokens, "completion_tokens": len(result.token_ids),
                "total_tokens": result.prompt_tokens + len(result.token_ids)}

    def complete(self, result: GenerationResult) -> dict:
        guard = self.service.guard_info(result.risk, result.fired, result.tau, result.operating_point, result)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": result.text, "refusal": None},
                      "logprobs": None, "finish_reason": self.finish_reason(result)}
            return self._envelope("chat.completion", [choice], usage=self.usage(result), guard=guard)
        choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": self.finish_reason(result)}
        return self._envelope("text_completion", [choice], usage=self.usage(result), guard=guard)

    def _chunk(self, delta: str | None, finish: str | None = None, role: bool = False, **extra) -> dict:
        if self.chat:
            d = {"role": "assistant", "content": ""} if role else {} if delta is None else {"content": delta}
            return self._envelope("chat.completion.chunk",
                                  [{"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}], **extra)
        return self._envelope("text_completion",
                              [{"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}], **extra)

    async def stream(self, pipe: EventPipe, include_usage: bool) -> AsyncIterator[bytes]:
        """Events: the opening chunk once the guard has decided (with its decision), one chunk per text
        piece, the closing chunk with finish_reason, the usage chunk when asked for, then [DONE]."""
        usage_none = {"usage": None} if include_usage else {}
        while True:
            event = await pipe.next()
            if isinstance(event, Admitted):
                guard = self.service.guard_info(event.risk, event.fired, event.tau, event.operating_point)
                if self.chat:
                    yield sse(self._chunk(None, role=True, guard=guard, **usage_none))
            elif isinstance(event, Piece):
                yield sse(self._chunk(event.text, **usage_none))
            elif isinstance(event, Finished):
                r = event.result
                guard = self.service.guard_info(r.risk, r.fired, r.tau, r.operating_point, r)
                yield sse(self._chunk(None, self.finish_reason(r), guard=guard, **usage_none))
                if include_usage:
                    yield sse(self._envelope("chat.completion.chunk" if self.chat else "text_completion", [],
                                             usage=self.usage(r)))
                break
            elif isinstance(event, Failed):
                err = _failure(event.error)
                yield sse(err.body())
                break
        yield sse("[DONE]")


async def _collect(pipe: EventPipe) -> GenerationResult:
    while True:
        event = await pipe.next()
        if isinstance(event, Finished):
            return event.result
        elif isinstance(event, Failed):
            raise _failure(event.error)


def _failure(error: Exception) -> APIError:
    """A request the batcher could not run: the runtime's own message as a 400, anything else a 500
    without details (logged here)."""
    if isinstance(error, SteerguardError):
        return APIError(400, str(error), code="invalid_value")
    log.error("generation failed", exc_info=error)
    return APIError(500, "The server could not complete this request.", code="internal_error")


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


class APIKeyCheck:
    """Every path but /health needs `Authorization: Bearer KEY`, compared in constant time."""

    def __init__(self, app: ASGIApp, key: str):
        self.app, self.key = app, key.encode("utf-8")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            auth = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                missing = not auth
                err = APIError(401, "You didn't provide an API key: send it as 'Authorization: Bearer KEY'" if missing
                               else "Incorrect API key provided.", code="invalid_api_key",
                               headers={"WWW-Authenticate": "Bearer"})
                await err.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _api_error(request: Request, exc: APIError) -> Response:
    return exc.response()


async def _http_error(request: Request, exc: HTTPException) -> Response:
    message = {404: f"Unknown request URL: {request.method} {request.url.path}",
               405: f"Method {request.method} is not allowed for {request.url.path}"}.get(exc.status_code, exc.detail)
    return APIError(exc.status_code, message, code="unknown_url" if exc.status_code == 404 else None,
                    headers=exc.headers).response()


async def _client_gone(request: Request, exc: ClientGone) -> Response:
    return Response(status_code=499)    # nobody reads it: the client has left


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.error("unexpected error", exc_info=exc)
    return APIError(500, "The server had an error while processing your request.", code="internal_error").response()


def create_app(model: GuardedModel, batcher: ContinuousBatcher, config: ServeConfig) -> ASGIApp:
    """The ASGI app serving `model` through `batcher`."""
    s = Service(model, batcher, config)
    routes = [Route("/health", s.health, methods=["GET"]),
              Route("/v1/models", s.models, methods=["GET"]),
              Route("/v1/models/{model:path}", s.one_model, methods=["GET"]),
              Route("/v1/chat/completions", s.chat_completions, methods=["POST"]),
              Route("/v1/completions", s.completions, methods=["POST"]),
              Route("/v1/moderations", s.moderations, methods=["POST"])]
    app = Starlette(routes=routes, exception_handlers={APIError: _api_error, HTTPException: _http_error,
                                                       ClientGone: _client_gone, Exception: _unexpected})
    app.state.service = s
    return APIKeyCheck(app, config.api_key) if config.api_key else app
