"""Continuous batching: many requests share one KV cache and one decode step, joining and leaving the
running batch at token boundaries.

A worker thread owns the cache: `max_batch` rows, each `max_len` tokens wide. At every token boundary it
admits at most one waiting request (one prefill into the next free row, so a newcomer stalls the
others for at most one prefill), then runs one decode step over the rows in use. Each row keeps its
own sampling settings, random generator and guard decision; the refusal head steers only the rows
whose prober fired. The rows in use are always the first `n` of the cache (a finished request's row
is filled with the last row's tokens), so a decode step binds one contiguous view and computes
nothing for free rows. Greedy answers are token for token `GuardedModel.generate`'s.

Results reach the caller as events through a callback the worker calls: `Admitted` (the guard's
decision, after prefill), `Piece` (text safe to show: never part of a stop string), then `Finished`
or `Failed`. The callback must be quick and must not raise (a server hands the event to its event
loop). The queue of waiting requests is bounded: past it `submit` raises `QueueFull`."""

from __future__ import annotations

import collections
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Union

import numpy as np
import onnxruntime as ort

from ..errors import SteerguardError
from .chat import TextStream
from .model import DecodeStep, GenerationResult, GuardedModel, KVCache, Prompt, Request, _held_back
from .sampling import Sampling, sample


class QueueFull(SteerguardError):
    """The queue of waiting requests is full; `retry_after_s` estimates when a place frees up."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class Admitted:
    """The request was prefilled: the guard's decision."""
    risk: float | None
    fired: bool
    prompt_tokens: int


@dataclass
class Piece:
    """New answer text, safe to show (a possible stop string is held back until it is clear)."""
    text: str


@dataclass
class Finished:
    result: GenerationResult


@dataclass
class Failed:
    error: Exception


@dataclass
class Scored:
    """The answer to a `score` job: the guard's risk and decision, no row used."""
    risk: float
    fired: bool
    prompt_tokens: int


Event = Union[Admitted, Piece, Finished, Failed, Scored]
Listener = Callable[[Event], None]


@dataclass(eq=False)
class Ticket:
    """A submitted request. `cancel()` drops it at the next token boundary (or from the queue at once)."""
    id: int
    prompt: Prompt
    sampling: Sampling
    listener: Listener
    steer: bool | None = None
    score_only: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    done: bool = False

    def cancel(self) -> None:
        self.cancelled = True

    def emit(self, event: Event) -> None:
        if isinstance(event, (Finished, Failed, Scored)):
            self.done = True
        self.listener(event)

    @property
    def solo(self) -> bool:
        """3-D rotary positions that differ from a plain count (images in a Qwen2-VL request): the decode
        step takes one rotary table for the whole batch, so this request decodes alone."""
        p = self.prompt.positions
        return p is not None and not np.array_equal(p, np.tile(np.arange(p.shape[1]), (3, 1)))


@dataclass(eq=False)
class _Row:
    """A request in the running batch."""
    ticket: Ticket
    risk: float | None
    fired: bool
    rng: np.random.Generator
    admitted: float
    first_token: float | None = None
    tokens: list[int] = field(default_factory=list)
    next_token: int = 0
    steps: int = 0
    text: TextStream | None = None
    shown: str = ""
    sent: int = 0


class _CacheRows(KVCache):
    """The first `n` rows of a KVCache, sharing its memory (a contiguous view of each buffer)."""

    def __init__(self, cache: KVCache, n: int):
        self.max_len = cache.max_len
        self.buffers = {k: v[:n] for k, v in cache.buffers.items()}
        self.values = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in self.buffers.items()}
        self.lengths = cache.lengths[:n]


class ContinuousBatcher:
    """Serves requests through one GuardedModel with continuous batching (module docstring).

    `max_batch` rows of `max_len` tokens each (prompt + answer; default the smaller of the model's
    context and 4096); at most `max_queue` requests wait for a row. The cache is allocated once, zeroed
    lazily by the OS, so memory grows with the tokens actually held."""

    STEP_CACHE = 4   # decode-step bindings kept for recent batch sizes

    def __init__(self, model: GuardedModel, max_batch: int = 8, max_queue: int = 64, max_len: int | None = None):
        if max_batch < 1 or max_queue < 0:
            raise SteerguardError("max_batch must be >= 1 and max_queue >= 0")
        self.model = model
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_len = min(max_len or 4096, model.context)
        if self.max_len < 2:
            raise SteerguardError(f"max_len must be at least 2 tokens, got {self.max_len}")
        self.cache = KVCache(range(model.num_layers), max_batch, model.kv_heads, self.max_len, model.head_dim)
        self._rotary = model.rotary_tables(Prompt([0], positions=np.zeros((3, 1), np.int64)), self.max_len)
        self._steps: collections.OrderedDict[int, tuple[_CacheRows, DecodeStep]] = collections.OrderedDict()
        self._rows: list[_Row] = []
        self._waiting: collections.deque[Ticket] = collections.deque()
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._closed = False
        self.served = 0
        self.peak_rows = 0
        self._recent_s: collections.deque[float] = collections.deque(maxlen=32)   # request durations
        self._thread = threading.Thread(target=self._run, name="steerguard-batcher", daemon=True)
        self._thread.start()

    # ---- submitting ---------------------------------------------------------------------------------
    def prepare(self, request: Request | Prompt, sampling: Sampling) -> Prompt:
        """The request as a Prompt, checked to fit a row; raises SteerguardError otherwise."""
        sampling.check()
        prompt = request if isinstance(request, Prompt) else self.model.prepare(request)
        need = len(prompt.ids) + sampling.max_new_tokens
        if need > self.max_len:
            raise SteerguardError(f"the prompt is {len(prompt.ids)} tokens; with max_new_tokens "
                                  f"{sampling.max_new_tokens} it needs {need}, more than the {self.max_len} "
                                  "tokens a request may hold here: shorten it or ask for fewer tokens")
        return prompt

    def submit(self, request: Request | Prompt, sampling: Sampling | None, listener: Listener,
               steer: bool | None = None) -> Ticket:
        """Queue a request for generation; its events go to `listener` (called on the worker thread)."""
        s = sampling or Sampling()
        prompt = self.prepare(request, s)
        return self._enqueue(Ticket(next(self._ids), prompt, s, listener, steer))

    def submit_score(self, request: Request | Prompt, listener: Listener) -> Ticket:
        """Queue a guard-only job (prefill up to the prober); `listener` gets one Scored or Failed."""
        if not self.model.guarded:
            raise SteerguardError("this bundle has no guard to score with")
        s = Sampling(max_new_tokens=1)
        prompt = self.prepare(request, s)
        return self._enqueue(Ticket(next(self._ids), prompt, s, listener, score_only=True))

    def _enqueue(self, ticket: Ticket) -> Ticket:
        with self._cond:
            if self._closed:
                raise SteerguardError("the batcher is closed")
            if len(self._waiting) >= self.max_queue and (len(self._rows) >= self.max_batch or self._waiting):
                raise QueueFull(f"{len(self._waiting)} requests are already waiting for one of {self.max_batch} "
                                "rows; retry later", self.retry_after_s())
            self._waiting.append(ticket)
            self._cond.notify()
        return ticket

    def retry_after_s(self) -> int:
        """Seconds until a queued request would likely start: the recent mean request duration times the
        queue's length over the batch (at least 1)."""
        mean = sum(self._recent_s) / len(self._recent_s) if self._recent_s else 1.0
        return max(1, min(600, round(mean * (len(self._waiting) + 1) / self.max_batch)))

    # ---- blocking helpers (library use and tests) ----------------------------------------------------
    def generate(self, request: Request | Prompt, sampling: Sampling | None = None,
                 steer: bool | None = None, timeout: float | None = None) -> GenerationResult:
        """Submit and wait for the result."""
        done = threading.Event()
        box: list[Event] = []

        def listen(ev: Event) -> None:
            if isinstance(ev, (Finished, Failed)):
                box.append(ev)
                done.set()

        ticket = self.submit(request, sampling, listen, steer)
        if not done.wait(timeout):
            ticket.cancel()
            raise SteerguardError("timed out")
        if isinstance(box[0], Failed):
            raise box[0].error
        return box[0].result

    def score(self, request: Request | Prompt) -> Scored:
        done = threading.Event()
        box: list[Event] = []

        def listen(ev: Event) -> None:
            box.append(ev)
            done.set()

        self.submit_score(request, listen)
        done.wait()
        if isinstance(box[0], Failed):
            raise box[0].error
        return box[0]

    # ---- state ---------------------------------------------------------------------------------------
    @property
    def active(self) -> int:
        """Rows in use now."""
        return len(self._rows)

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker; requests still waiting or running get Failed."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)

    # ---- the worker ----------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._rows and not self._waiting:
                    self._cond.wait()
                if self._closed:
                    pending = list(self._waiting) + [r.ticket for r in self._rows]
                    self._waiting.clear()
                    self._rows.clear()
                    break
                ticket = self._next_admissible()
            try:
                if ticket is not None:
                    self._admit(ticket)
                self._drop_cancelled()
                if self._rows:
                    self._step()
            except Exception as e:   # a failed engine run: fail the rows it touched, keep serving
                for row in self._rows:
                    row.ticket.emit(Failed(e))
                self._rows.clear()
                self.cache.lengths[:] = 0
        for t in pending:
            t.emit(Failed(SteerguardError("the server is shutting down")))

    def _next_admissible(self) -> Ticket | None:
        """The first waiting request, if it may join now (called with the lock held)."""
        while self._waiting and self._waiting[0].cancelled:
            self._waiting.popleft()
        if not self._waiting:
            return None
        t = self._waiting[0]
        if not t.score_only:
            if len(self._rows) >= self.max_batch:
                return None
            if self._rows and (t.solo or self._rows[0].ticket.solo):
                return None
        return self._waiting.popleft()

    def _admit(self, t: Ticket) -> None:
        m = self.model
        if t.score_only:
            try:
                risk = self._score(t.prompt)
                t.emit(Scored(risk, m.decide(risk), len(t.prompt.ids)))
            except Exception as e:
                t.emit(Failed(e))
            return
        index = len(self._rows)
        try:
            hidden, risk = m.prefill(t.prompt, self.cache, index)
            fired = m.decide(risk) if t.steer is None else bool(t.steer)
            if fired and m.refusal is None:
                raise SteerguardError("this bundle has no refusal head")
            logits = m.next_logits(hidden[None], np.array([fired]))
        except Exception as e:
            t.emit(Failed(e))
            return
        if fired:     # a refusal is never empty: it cannot end the turn at once
            logits[0, list(m.stop_ids)] = -np.inf
        row = _Row(t, risk, fired, np.random.default_rng(t.sampling.seed), time.perf_counter(),
                   text=TextStream(m.tokenizer))
        self._rows.append(row)
        self.peak_rows = max(self.peak_rows, len(self._rows))
        t.emit(Admitted(risk, fired, len(t.prompt.ids)))
        if not self._accept(row, sample(logits[0], t.sampling, row.rng)):
            self._release(index)

    def _score(self, prompt: Prompt) -> float:
        """`GuardedModel.score` for a prepared prompt: the chain up to the prober, in a cache of its own."""
        m = self.model
        upto = next(i for i, (eng, _) in enumerate(m.decoders) if eng is m.risk_engine) + 1
        cache = KVCache(range(m.decoders[upto - 1][1].stop), 1, m.kv_heads, len(prompt.ids), m.head_dim)
        return m.prefill(prompt, cache, 0, m.decoders[:upto])[1]

    def _step(self) -> None:
        n = len(self._rows)
        view, step = self._step_for(n)
        tokens = np.array([r.next_token for r in self._rows], np.int64)
        hidden = self.model.decode_one_token(tokens, view, step)
        fired = np.array([r.fired for r in self._rows])
        logits = self.model.next_logits(hidden, fired, step)
        finished = []
        for i, row in enumerate(self._rows):
            row.steps += 1
            if not self._accept(row, sample(logits[i], row.ticket.sampling, row.rng)):
                finished.append(i)
        for i in reversed(finished):
            self._release(i)

    def _step_for(self, n: int) -> tuple[_CacheRows, DecodeStep]:
        """Decode-step bindings over the first n rows, made once per batch size and kept for a few."""
        solo = self._rows[0].ticket if n == 1 and self._rows[0].ticket.solo else None
        if solo is not None:   # its own rotary table; not kept
            view = _CacheRows(self.cache, 1)
            return view, DecodeStep(self.model, view, 1, self.model.rotary_tables(solo.prompt, self.max_len))
        if n in self._steps:
            self._steps.move_to_end(n)
        else:
            view = _CacheRows(self.cache, n)
            self._steps[n] = (view, DecodeStep(self.model, view, n, self._rotary))
            while len(self._steps) > self.STEP_CACHE:
                self._steps.popitem(last=False)
        return self._steps[n]

    def _accept(self, row: _Row, token: int) -> bool:
        """Take a row's next token as `decode_tokens` does; False when the request is finished."""
        s, m = row.ticket.sampling, self.model
        row.first_token = row.first_token or time.perf_counter()
        if row.ticket.cancelled:
            return False
        if token in m.stop_ids and not s.ignore_eos:
            return self._finish(row, "stop")
        row.tokens.append(token)
        row.shown += row.text.push(token)
        if s.stop and any(x in row.shown for x in s.stop):
            return self._finish(row, "stop_string")
        if len(row.tokens) >= s.max_new_tokens:
            return self._finish(row, "length")
        safe = len(row.shown) - _held_back(row.shown, s.stop)
        if safe > row.sent:
            row.ticket.emit(Piece(row.shown[row.sent:safe]))
            row.sent = safe
        row.next_token = token
        return True

    def _finish(self, row: _Row, reason: str) -> bool:
        s, m, t = row.ticket.sampling, self.model, row.ticket
        text = m.tokenizer.decode(row.tokens)
        if reason == "stop_string":
            text = text[:min(text.find(x) for x in s.stop if x in text)]
        if len(text) > row.sent:
            t.emit(Piece(text[row.sent:]))
        end = time.perf_counter()
        decode_s = end - row.first_token
        self._recent_s.append(end - t.submitted)
        self.served += 1
        t.emit(Finished(GenerationResult(
            text=text, token_ids=row.tokens, risk=row.risk, fired=row.fired, split_layer=m.split_layer,
            finish_reason=reason, prompt_tokens=len(t.prompt.ids),
            timings={"queued_s": row.admitted - t.submitted, "first_token_s": row.first_token - t.submitted,
                     "decode_s": decode_s, "decode_steps": row.steps, "new_tokens": len(row.tokens),
                     "decode_tok_s": row.steps / decode_s if decode_s > 0 and row.steps else None})))
        return False

    def _drop_cancelled(self) -> None:
        for i in reversed(range(len(self._rows))):
            if self._rows[i].ticket.cancelled:
                self._rows[i].ticket.done = True
                self._release(i)

    def _release(self, index: int) -> None:
        """Free row `index`: the last row's tokens move into it, so the rows in use stay the first n."""
        last = len(self._rows) - 1
        if index != last:
            n = int(self.cache.lengths[last])
            for buf in self.cache.buffers.values():
                buf[index, :, :n] = buf[last, :, :n]
            self.cache.lengths[index] = n
            self._rows[index] = self._rows[last]
        self.cache.lengths[last] = 0
        self._rows.pop()
