"""Continuous batching: many requests share one KV cache and one decode step, joining and leaving the
running batch at token boundaries.

A worker thread owns the cache: `max_batch` rows, each `max_len` tokens wide. At every token boundary it
admits the waiting requests whose prompts fit in one prefill's worth of tokens (`prefill_tokens`; always
at least one request, so a newcomer stalls the others for at most one prefill, or that many tokens),
then runs one decode step over the rows in use. Prompts that open with the chat template's fixed prefix
(its system prompt) reuse that prefix's KV, computed once, and compute only the rest; prompts that
cannot are prefilled together in one batched run of the engines. Each row keeps its
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

from ..errors import SteerguardError
from .chat import TextStream
from .answer import AnswerWatch
from .model import (DecodeStep, GenerationResult, GuardedModel, KVCache, OperatingPoint, PrefixKV, Prompt, Request,
                    SwitchRecord, _held_back, switch_fields)
from .sampling import Sampling, sample


class QueueFull(SteerguardError):
    """The queue of waiting requests is full; `retry_after_s` estimates when a place frees up."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class Admitted:
    """The request was prefilled: the guard's decision, at threshold `tau` (operating point `operating_point`,
    None for an explicit tau)."""
    risk: float | None
    fired: bool
    prompt_tokens: int
    tau: float | None = None
    operating_point: str | None = None


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
    tau: float | None = None
    operating_point: str | None = None


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
    tau: float | None = None                # the guard's threshold for this request
    operating_point: str | None = None
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
    prompt_hidden: np.ndarray | None = None     # the prompt's last final state: where a restarted refusal begins
    watch: AnswerWatch | None = None            # the answer guard, while it watches this row
    switch: SwitchRecord | None = None


class ContinuousBatcher:
    """Serves requests through one GuardedModel with continuous batching (module docstring).

    `max_batch` rows of `max_len` tokens each (prompt + answer; default the smaller of the model's
    context and 4096); at most `max_queue` requests wait for a row. The cache is allocated once, zeroed
    lazily by the OS, so memory grows with the tokens actually held. At a token boundary the requests
    admitted together compute at most `prefill_tokens` prompt tokens (or one request's, if it alone needs
    more); `prefix_cache` reuses the KV of the chat template's opening for every prompt that starts with it."""

    STEP_CACHE = 4   # decode-step bindings kept for recent batch sizes

    def __init__(self, model: GuardedModel, max_batch: int = 8, max_queue: int = 64, max_len: int | None = None,
                 prefill_tokens: int = 64, prefix_cache: bool = True):
        if max_batch < 1 or max_queue < 0 or prefill_tokens < 1:
            raise SteerguardError("max_batch and prefill_tokens must be >= 1 and max_queue >= 0")
        self.model = model
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_len = min(max_len or 4096, model.context)
        if self.max_len < 2:
            raise SteerguardError(f"max_len must be at least 2 tokens, got {self.max_len}")
        self.cache = model.new_cache(range(model.num_layers), max_batch, self.max_len)
        self._rotary = model.rotary_tables(Prompt([0], positions=np.zeros((3, 1), np.int64)), self.max_len)
        self.prefill_tokens = prefill_tokens
        self.prefix = self._template_prefix() if prefix_cache else None
        self._steps: collections.OrderedDict[int, tuple[KVCache, DecodeStep]] = collections.OrderedDict()
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

    def _template_prefix(self) -> PrefixKV | None:
        """The KV of the tokens the chat template puts before a one-message chat's content (for most
        templates a system prompt), when there are at least two of them."""
        ids = self.model.tokenizer.prompt_prefix
        if len(ids) < 2 or len(ids) >= self.max_len:
            return None
        return self.model.prefix_kv(ids, self.max_len)

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
               steer: bool | None = None, operating_point: OperatingPoint = None) -> Ticket:
        """Queue a request for generation; its events go to `listener` (called on the worker thread). The
        guard judges it at `operating_point` (a name or a tau in [0, 1]; default the model's), whatever the
        other rows of the batch use."""
        s = sampling or Sampling()
        tau, name = self.model.resolve_operating_point(operating_point)
        prompt = self.prepare(request, s)
        return self._enqueue(Ticket(next(self._ids), prompt, s, listener, steer, tau=tau, operating_point=name))

    def submit_score(self, request: Request | Prompt, listener: Listener,
                     operating_point: OperatingPoint = None) -> Ticket:
        """Queue a guard-only job (prefill up to the prober); `listener` gets one Scored or Failed."""
        if not self.model.guarded:
            raise SteerguardError("this bundle has no guard to score with")
        tau, name = self.model.resolve_operating_point(operating_point)
        s = Sampling(max_new_tokens=1)
        prompt = self.prepare(request, s)
        return self._enqueue(Ticket(next(self._ids), prompt, s, listener, score_only=True, tau=tau,
                                    operating_point=name))

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
                 steer: bool | None = None, timeout: float | None = None,
                 operating_point: OperatingPoint = None) -> GenerationResult:
        """Submit and wait for the result."""
        done = threading.Event()
        box: list[Event] = []

        def listen(ev: Event) -> None:
            if isinstance(ev, (Finished, Failed)):
                box.append(ev)
                done.set()

        ticket = self.submit(request, sampling, listen, steer, operating_point)
        if not done.wait(timeout):
            ticket.cancel()
            raise SteerguardError("timed out")
        if isinstance(box[0], Failed):
            raise box[0].error
        return box[0].result

    def score(self, request: Request | Prompt, operating_point: OperatingPoint = None) -> Scored:
        done = threading.Event()
        box: list[Event] = []

        def listen(ev: Event) -> None:
            box.append(ev)
            done.set()

        self.submit_score(request, listen, operating_point)
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
                group = self._next_group()
            try:
                if group:
                    self._admit(group)
                self._drop_cancelled()
                if self._rows:
                    self._step()
            except Exception as e:   # a failed engine run: fail the rows it touched, keep serving
                for t in [row.ticket for row in self._rows] + [t for t in group if not t.done]:
                    if not t.done:
                        t.emit(Failed(e))
                self._rows.clear()
                self.cache.lengths[:] = 0
        for t in pending:
            t.emit(Failed(SteerguardError("the server is shutting down")))

    def _next_group(self) -> list[Ticket]:
        """The waiting requests to admit at this boundary (called with the lock held): a score job alone, or
        requests in arrival order while rows are free and their prompts' computed tokens stay within
        `prefill_tokens` (the first one always goes, however long)."""
        while self._waiting and self._waiting[0].cancelled:
            self._waiting.popleft()
        if not self._waiting:
            return []
        if self._waiting[0].score_only:
            return [self._waiting.popleft()]
        group: list[Ticket] = []
        tokens = 0
        while self._waiting and not self._waiting[0].score_only:
            t = self._waiting[0]
            if t.cancelled:
                self._waiting.popleft()
                continue
            cost = self._prefill_cost(t.prompt)
            if group and tokens + cost > self.prefill_tokens:
                break
            if len(self._rows) + len(group) >= self.max_batch:
                break
            running = self._rows[0].ticket if self._rows else (group[0] if group else None)
            if running is not None and (t.solo or running.solo):
                break
            group.append(self._waiting.popleft())
            tokens += cost
        return group

    def _prefill_cost(self, prompt: Prompt) -> int:
        """The prompt tokens a prefill computes (those after the reused template prefix)."""
        return len(prompt.ids) - (self.prefix.reusable(prompt) if self.prefix is not None else 0)

    def _admit(self, group: list[Ticket]) -> None:
        if group[0].score_only:
            self._admit_score(group[0])
            return
        first = len(self._rows)
        admitted: list[tuple[int, Ticket, np.ndarray, float | None, bool]] = []
        for offset, (t, outcome) in enumerate(self._prefill_group(group, first)):
            if isinstance(outcome, Exception):
                t.emit(Failed(outcome))
                continue
            hidden, risk = outcome
            fired = self.model.decide(risk, t.tau) if t.steer is None else bool(t.steer)
            if fired and self.model.refusal is None:
                t.emit(Failed(SteerguardError("this bundle has no refusal head")))
                continue
            admitted.append((offset, t, hidden, risk, fired))
        self._close_gaps(first, [a[0] for a in admitted])
        if admitted:
            self._start_rows([a[1:] for a in admitted])

    def _prefill_group(self, group: list[Ticket], first: int
                       ) -> list[tuple[Ticket, tuple[np.ndarray, float | None] | Exception]]:
        """Prefill the group into rows first, first + 1, ... (in the returned order): prompts that cannot
        reuse the template prefix first, in one batched run when there are several and they allow it, then
        those that can, one by one (each computes only its own tokens)."""
        m = self.model
        whole = [t for t in group if self._prefill_cost(t.prompt) == len(t.prompt.ids)]
        ordered = whole + [t for t in group if t not in whole]
        out: list[tuple[Ticket, tuple[np.ndarray, float | None] | Exception]] = []
        if len(whole) > 1 and m.can_prefill_together([t.prompt for t in whole]):
            try:
                hidden, risks = m.prefill_batch([t.prompt for t in whole], self.cache, first)
                out = [(t, (hidden[i], risks[i])) for i, t in enumerate(whole)]
            except Exception as e:
                out = [(t, e) for t in whole]
        for t in ordered[len(out):]:
            try:
                out.append((t, m.prefill(t.prompt, self.cache, first + len(out), prefix=self.prefix)))
            except Exception as e:
                out.append((t, e))
        return out

    def _close_gaps(self, first: int, kept: list[int]) -> None:
        """After a failed prefill in a group: move the kept rows (offsets from `first`) to the front, in
        order, so the rows in use stay the first n; rows past them are free."""
        for to, offset in enumerate(kept):
            src, dst = first + offset, first + to
            if src != dst:
                n = int(self.cache.lengths[src])
                self.cache.copy_positions(dst, self.cache, src, n)
                self.cache.lengths[dst] = n
        self.cache.lengths[first + len(kept):] = 0

    def _start_rows(self, admitted: list[tuple[Ticket, np.ndarray, float | None, bool]]) -> None:
        """The admitted requests' first tokens (one head run for the group); their rows join the batch."""
        m = self.model
        fired = np.array([a[3] for a in admitted])
        logits = m.next_logits(np.stack([a[1] for a in admitted]), fired)
        logits[np.ix_(fired, list(m.stop_ids))] = -np.inf   # a refusal is never empty: it cannot end the turn at once
        first = len(self._rows)
        ag = m.answer_guard
        for t, hidden, risk, f in admitted:
            watch = AnswerWatch(ag.score, ag.tau) if ag.enabled and t.steer is None and not f else None
            self._rows.append(_Row(t, risk, f, np.random.default_rng(t.sampling.seed), time.perf_counter(),
                                   text=TextStream(m.tokenizer), prompt_hidden=hidden, watch=watch,
                                   switch=SwitchRecord("prompt", 0) if f else None))
            t.emit(Admitted(risk, f, len(t.prompt.ids), t.tau, t.operating_point))
        self.peak_rows = max(self.peak_rows, len(self._rows))
        done = [first + i for i, row in enumerate(self._rows[first:])
                if not self._accept(row, sample(logits[i], row.ticket.sampling, row.rng))]
        for index in reversed(done):
            self._release(index)

    def _admit_score(self, t: Ticket) -> None:
        try:
            risk = self._score(t.prompt)
            t.emit(Scored(risk, self.model.decide(risk, t.tau), len(t.prompt.ids), t.tau, t.operating_point))
        except Exception as e:
            t.emit(Failed(e))

    def _score(self, prompt: Prompt) -> float:
        """`GuardedModel.score` for a prepared prompt: the chain up to the prober, in a cache of its own."""
        m = self.model
        upto = next(i for i, (eng, _) in enumerate(m.decoders) if eng is m.risk_engine) + 1
        cache = m.new_cache(range(m.decoders[upto - 1][1].stop), 1, len(prompt.ids))
        return m.prefill(prompt, cache, 0, m.decoders[:upto])[1]

    def _step(self) -> None:
        n = len(self._rows)
        view, step = self._step_for(n)
        tokens = np.array([r.next_token for r in self._rows], np.int64)
        self.model.decode_one_token(tokens, view, step)
        restarts = self._watch_answers(step, view)
        fired = np.array([r.fired or r.switch is not None for r in self._rows])
        nxt = self.model.step_tokens(step, fired, [r.ticket.sampling for r in self._rows], [r.rng for r in self._rows])
        for i in restarts:
            row = self._rows[i]
            nxt[i] = self.model.refusal_from_prompt(row.prompt_hidden, row.ticket.sampling, row.rng)
        finished = []
        for i, row in enumerate(self._rows):
            row.steps += 1
            if not self._accept(row, int(nxt[i])):
                finished.append(i)
        for i in reversed(finished):
            self._release(i)

    def _watch_answers(self, step: DecodeStep, view: KVCache) -> list[int]:
        """Feed each watched row's token risk to its answer guard; switch the rows it fires on (as
        `GuardedModel.decode_tokens` does). Returns the rows whose refusal restarts from the prompt."""
        watched = [i for i, r in enumerate(self._rows) if r.watch is not None]
        if not watched:
            return []
        risks, restarts = step.answer_risks(), []
        mode = self.model.answer_guard.switch
        for i in watched:
            row = self._rows[i]
            if not row.watch.push(float(risks[i])):
                if len(row.watch.risks) == self.model.answer_guard.hold:
                    self._show(row)
                continue
            # shown already unless the hold covered it: the tokens the guard had seen before this one reach `hold`
            kept = len(row.tokens) if len(row.watch.risks) - 1 >= self.model.answer_guard.hold else 0
            dropped = len(row.tokens) - kept
            row.switch, row.watch = SwitchRecord("answer", kept, row.watch.value, dropped), None
            if dropped:
                del row.tokens[kept:]
                row.text, row.shown = TextStream(self.model.tokenizer), ""
                for t in row.tokens:
                    row.shown += row.text.push(t)
            if dropped or mode == "restart":
                view.lengths[i] = len(row.ticket.prompt.ids)
                restarts.append(i)
        return restarts

    def _holding(self, row: _Row) -> bool:
        """Whether the row's tokens are kept back: its answer guard has not yet seen the first `hold` of them."""
        return row.watch is not None and len(row.watch.risks) < self.model.answer_guard.hold

    def _show(self, row: _Row) -> None:
        """Emit the row's text that is safe to show (never part of a stop string, never held back)."""
        if self._holding(row):
            return
        s = row.ticket.sampling
        safe = len(row.shown) - _held_back(row.shown, s.stop)
        if safe > row.sent:
            row.ticket.emit(Piece(row.shown[row.sent:safe]))
            row.sent = safe

    def _step_for(self, n: int) -> tuple[KVCache, DecodeStep]:
        """Decode-step bindings over the first n rows, made once per batch size and kept for a few."""
        solo = self._rows[0].ticket if n == 1 and self._rows[0].ticket.solo else None
        if solo is not None:   # its own rotary table; not kept
            view = self.cache.first_rows(1)
            return view, DecodeStep(self.model, view, 1, self.model.rotary_tables(solo.prompt, self.max_len))
        if n in self._steps:
            self._steps.move_to_end(n)
        else:
            view = self.cache.first_rows(n)
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
        self._show(row)
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
            **switch_fields(row.switch, row.watch),
            timings={"queued_s": row.admitted - t.submitted, "first_token_s": row.first_token - t.submitted,
                     "decode_s": decode_s, "decode_steps": row.steps, "new_tokens": len(row.tokens),
                     "decode_tok_s": row.steps / decode_s if decode_s > 0 and row.steps else None},
            tau=t.tau, operating_point=t.operating_point)))
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
            self.cache.copy_positions(index, self.cache, last, n)
            self.cache.lengths[index] = n
            self._rows[index] = self._rows[last]
        self.cache.lengths[last] = 0
        self._rows.pop()
