"""Between the batcher's worker thread and the event loop, and between the loop and the client: events
handed over thread-safely, the request body read within its bound, and a server-sent event stream that
notices a client's disconnect while it waits (so the request's row is freed at once, not at the next
token it fails to send)."""

from __future__ import annotations

import asyncio
import json
from typing import AsyncIterator, Awaitable, Callable, TypeVar

from starlette.requests import ClientDisconnect, Request
from starlette.types import Receive, Scope, Send

from ..runtime.batching import Event
from .errors import APIError

T = TypeVar("T")


class ClientGone(Exception):
    """The client closed the connection before its answer was complete."""


class EventPipe:
    """A batcher listener that hands each event to the event loop's queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._queue: asyncio.Queue[Event] = asyncio.Queue()

    def __call__(self, event: Event) -> None:   # on the worker thread
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:      # the loop is closed: the server is stopping
            pass

    async def next(self) -> Event:
        return await self._queue.get()


class DisconnectWatch:
    """Completes when the client disconnects; start it only after the request body has been read."""

    def __init__(self, receive: Receive):
        self._task = asyncio.ensure_future(self._watch(receive))

    @staticmethod
    async def _watch(receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    async def within(self, awaitable: Awaitable[T]) -> T:
        """`awaitable`'s result, or ClientGone if the client leaves first."""
        task = asyncio.ensure_future(awaitable)
        done, _ = await asyncio.wait({task, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        await asyncio.wait({task})     # let it unwind before anyone closes what it was awaiting
        raise ClientGone()

    def close(self) -> None:
        self._task.cancel()


async def read_json(request: Request, limit: int) -> object:
    """The body as JSON, at most `limit` bytes, UTF-8, no NaN/Infinity, no lone surrogates; else 400/413."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientGone() from None
    try:
        text = b"".join(chunks).decode("utf-8")
        body = json.loads(text, parse_constant=_no_constant)
        json.dumps(body, ensure_ascii=False).encode("utf-8")    # lone surrogates ("\ud800") fail here
    except (UnicodeError, ValueError, RecursionError):
        raise APIError(400, "We could not parse the JSON body of your request: it must be one JSON object in "
                       "UTF-8", code="invalid_json") from None
    return body


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def sse(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode("utf-8")


class EventStreamResponse:
    """An ASGI text/event-stream response fed by an async iterator of encoded events. When the client
    disconnects, the iteration stops at once and `on_close` runs."""

    def __init__(self, events: AsyncIterator[bytes], watch: DisconnectWatch, on_close: Callable[[], None]):
        self.events, self.watch, self.on_close = events, watch, on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                    (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]})
            while True:
                try:
                    chunk = await self.watch.within(anext(self.events))
                except StopAsyncIteration:
                    break
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except (ClientGone, OSError):
            pass
        finally:
            self.watch.close()
            self.on_close()
            await self.events.aclose()
