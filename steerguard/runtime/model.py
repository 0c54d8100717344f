"""The guarded model: run a bundle's engine chain, judge each request at prefill, switch to the
refusal head when the prober fires.

The loop reads top to bottom: `prefill` one prompt into its row of the KV cache (the `pre` engine
returns the risk with the split-point state) -> `decide` -> `decode_one_token` for all rows at once
-> `step_tokens` through the plain or refusal head, then `sample` (or an argmax on the device). The KV
cache is one preallocated buffer per layer that onnxruntime updates in place; nothing is concatenated
per step."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generator, Iterator, Sequence

import numpy as np
import onnxruntime as ort

from ..engines import Buffer, Engine, Memory, resolve_backend
from ..engines.graphs import argmax_graph, select_graph
from ..engines.memory import HOST, memory_for
from ..errors import SteerguardError
from .answer import AnswerWatch, RunningScore
from .chat import ChatTokenizer, Message, TextStream
from .manifest import Manifest
from .sampling import Sampling, sample
from .vision import VisionEncoder

Request = str | Sequence[Message] | Sequence[int]   # a prompt, chat messages, or chat-formatted token ids
OperatingPoint = str | float | None                  # a named threshold of the bundle, an explicit tau, or the default
DEFAULT_OPERATING_POINT = "balanced"
# what the names calibration records mean (manifest guard.operating_points)
OPERATING_POINT_MEANINGS = {"strict": "fires most (lowest tau)", "balanced": "the calibrated tau (default)",
                            "permissive": "fires least (highest tau)"}


def operating_points_of(guard: dict | None) -> dict[str, dict]:
    """The bundle's named thresholds: name -> {"tau", and where calibration recorded them "fpr", "tpr",
    "fire_rates"}, strictest first. A bundle exported before operating points has only "balanced", its tau."""
    if not guard:
        return {}
    points = guard.get("operating_points") or {}
    table = {name: dict(p) for name, p in points.items() if isinstance(p, dict) and _is_tau(p.get("tau"))}
    if not table:
        table = {DEFAULT_OPERATING_POINT: {"tau": float(guard["tau"])}}
    return dict(sorted(table.items(), key=lambda kv: kv[1]["tau"]))


def resolve_operating_point(points: dict[str, dict], point: str | float) -> tuple[float, str | None]:
    """(tau, name) of `point` in a table from `operating_points_of`: a name, or an explicit tau in [0, 1]
    (name None). Anything else: a one-line SteerguardError saying what is available."""
    if isinstance(point, str):
        if point in points:
            return float(points[point]["tau"]), point
        names = ", ".join(points)
        if set(points) == {DEFAULT_OPERATING_POINT} and point in OPERATING_POINT_MEANINGS:
            raise SteerguardError(f"this bundle's guard has no operating points (calibrated before them): only "
                                  f"{names} (tau {points[DEFAULT_OPERATING_POINT]['tau']:.3f}) is available, or "
                                  "give a tau between 0 and 1")
        raise SteerguardError(f"unknown operating point {point!r}: this bundle has {names}, or give a tau "
                              "between 0 and 1")
    if isinstance(point, bool) or not isinstance(point, (int, float, np.floating, np.integer)):
        raise SteerguardError(f"an operating point is a name or a tau between 0 and 1, not {point!r}")
    if not (np.isfinite(point) and 0 <= point <= 1):
        raise SteerguardError(f"tau must be between 0 and 1, got {point}")
    return float(point), None


def _is_tau(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and bool(np.isfinite(x))


@dataclass
class Prompt:
    """A request ready for prefill: token ids (image placeholders expanded), the rows that replace the
    placeholders' embeddings, and for 3-D rotary models (Qwen2-VL) each token's (t, h, w) position."""
    ids: list[int]
    image_rows: np.ndarray | None = None
    positions: np.ndarray | None = None    # (3, len(ids)) int64
    position_delta: int = 0                # added to the positions of the tokens generated after it
    user_start: int = 0                    # where the last user turn's content begins (what a per-token prober reads)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    risk: float | None          # None for an unguarded bundle
    fired: bool
    split_layer: int | None
    finish_reason: str          # "stop" (end of turn), "stop_string", or "length"
    prompt_tokens: int
    timings: dict = field(default_factory=dict)
    tau: float | None = None            # the threshold this request was judged at (None: unguarded)
    operating_point: str | None = None  # its name ("strict", "balanced", ...), None for an explicit tau
    switch: str | None = None           # why the refusal head answers: "prompt" (the prompt guard), "answer", or None
    switch_at: int | None = None        # index in token_ids where the refusal head's tokens begin
    answer_score: float | None = None   # the answer guard's running score at the switch, else its highest (None: off)
    dropped_tokens: int = 0             # held-back tokens the answer guard dropped when it switched


@dataclass(frozen=True)
class AnswerGuard:
    """How the answer guard runs: on or off, the threshold its running score switches at, how many of the
    first generated tokens it holds back from the stream until it has seen them, and how it switches:
    `continue` (the refusal head carries on after what was shown, with the KV cache kept) or `restart` (the
    refusal head answers from the prompt's KV, as a prompt-guard refusal does)."""
    enabled: bool = False
    tau: float | None = None
    operating_point: str | None = None
    hold: int = 0
    switch: str = "continue"
    score: RunningScore | None = None


class KVCache:
    """One (batch, kv_heads, max_len, head_dim) buffer per layer for keys and one for values, shared by
    each engine's `past_key_values.{i}` input and `present.{i}` output, in `memory` (numpy arrays by
    default; a device's memory for a model on a GPU)."""

    def __init__(self, layers: range, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 memory: Memory = HOST, dtype: np.dtype = np.dtype(np.float32)):
        shape = (batch, kv_heads, max_len, head_dim)
        self.memory, self.max_len = memory, max_len
        self.tensors = {(i, kind): memory.zeros(shape, dtype) for i in layers for kind in ("key", "value")}
        self.lengths = np.zeros(batch, np.int64)

    @property
    def buffers(self) -> dict[tuple[int, str], np.ndarray]:
        """The buffers as numpy arrays: themselves in host memory, copies from a device."""
        return {k: t.numpy() for k, t in self.tensors.items()}

    def first_rows(self, n: int) -> "KVCache":
        """The first n rows, sharing this cache's memory (a contiguous view of each buffer)."""
        view = object.__new__(KVCache)
        view.memory, view.max_len = self.memory, self.max_len
        view.tensors = {k: t.rows(0, n) for k, t in self.tensors.items()}
        view.lengths = self.lengths[:n]
        return view

    def copy_positions(self, row: int, src: "KVCache", src_row: int, n: int) -> None:
        """The first n positions of `src`'s row `src_row` into row `row`, for every layer this cache holds."""
        memory = src.memory if self.memory.host else self.memory     # a device's copy reaches host memory too
        for key, t in self.tensors.items():
            memory.copy_positions(t, row, src.tensors[key], src_row, n)

    def bind(self, binding: ort.IOBinding, layers: range, rows: slice | None = None) -> None:
        """Bind the layers' buffers (or a block of consecutive rows, a contiguous view) as past and present."""
        for i in layers:
            for kind in ("key", "value"):
                t = self.tensors[(i, kind)]
                if rows is not None:
                    t = t.rows(rows.start, rows.stop)
                t.bind_input(binding, f"past_key_values.{i}.{kind}")
                t.bind_output(binding, f"present.{i}.{kind}")


class GuardedModel:
    """A loaded bundle. Thread-safe: each call keeps its own cache and bindings."""

    def __init__(self, manifest: Manifest, backend: str = "cpu", threads: int | None = None,
                 fallback_to_cpu: bool = False, memory: str | None = None):
        self.manifest = manifest
        m = manifest.model
        self.num_layers, self.hidden_size = m["num_layers"], m["hidden_size"]
        self.kv_heads, self.head_dim, self.context = m["num_kv_heads"], m["head_dim"], m["context"]
        be = resolve_backend(backend, fallback_to_cpu)
        self.backend = be.name
        # where the KV cache and the activations between engines live (engines/memory.py)
        self.memory = memory_for(be.device, memory or os.environ.get("STEERGUARD_MEMORY") or None)
        self.kv_memory = self._kv_memory(os.environ.get("STEERGUARD_KV") or "device")
        half = [e["name"] for e in manifest.engines if e.get("precision") == "fp16"]
        # onnxruntime's CPU kernels run fp16 graphs, slowly: allowed only for tests and the GPU script's dry run
        if half and be.name == "cpu" and os.environ.get("STEERGUARD_FP16_ON_CPU") != "1":
            raise SteerguardError(f"{manifest.root}: fp16 engines ({', '.join(half)}) run on GPUs only; use "
                                  "--backend cuda or tensorrt, or export with --precision fp32, int8 or int4")

        loaded: dict[str, Engine] = {}

        def load(e: dict) -> Engine:
            if e["name"] not in loaded:
                loaded[e["name"]] = Engine(e["name"], manifest.path(e["file"]), be, threads)
            return loaded[e["name"]]

        self.embed = load(_one(manifest, "embed"))
        # the prompt and the tokens after it may run different engines for the same layers: an int4 bundle
        # prefills the layers before the split at int8 (what the prober reads) and decodes them at int4
        self.decoders = [(load(e), range(*e["layers"])) for e in manifest.engine("decoder", "prefill")]
        self.step_decoders = [(load(e), range(*e["layers"])) for e in manifest.engine("decoder", "decode")]
        if any("attention_mask" in e.input_names for e, _ in self.decoders + self.step_decoders):
            raise SteerguardError(f"{manifest.root} was exported by an older steerguard (its engines take an "
                                  "attention mask); export it again")
        for phase, chain in (("prefill", self.decoders), ("decode", self.step_decoders)):
            if [i for _, layers in chain for i in layers] != list(range(self.num_layers)):
                raise SteerguardError(f"{manifest.root}: the {phase} engines do not cover layers 0-{self.num_layers - 1} "
                                      "in order; the manifest is damaged, re-export the bundle")
        self.head = load(_one(manifest, "head"))
        self.mrope = m.get("mrope")
        vision = manifest.data.get("vision")
        self.vision = VisionEncoder(vision, load(_one(manifest, "vision"))) if vision else None
        refusal = manifest.engine("refusal")
        self.refusal = load(refusal[0]) if refusal else None
        guard = manifest.guard
        self.operating_points = operating_points_of(guard)
        self.default_operating_point = (guard or {}).get("default_operating_point") or DEFAULT_OPERATING_POINT
        if self.default_operating_point not in self.operating_points:
            self.default_operating_point = None     # an old bundle's "balanced" is its tau, whatever it says
        self.set_operating_point(None)
        self.split_layer = guard["split_layer"] if guard else None
        # a `max` prober scores every token; the request's risk is the highest over the last user turn
        self.risk_per_token = bool(guard) and guard.get("feature") == "max"
        self.risk_engine = next((eng for eng, _ in self.decoders if "risk" in eng.output_names), None)
        # a (batch, sequence) risk (every `max` prober; `last` probers since they were exported so) lets prompts
        # of different lengths prefill together: each row's risk is read at its own last position
        self.risk_per_position = self.risk_engine is not None and self.risk_engine.rank("risk") == 2
        answer = (guard or {}).get("answer")
        self.answer_engine = next((eng for eng, _ in self.step_decoders if "answer_risk" in eng.output_names), None)
        if answer and self.answer_engine is None:
            raise SteerguardError(f"{manifest.root}: the manifest has an answer guard but no engine computes "
                                  "answer_risk; re-export the bundle")
        self.answer_points = operating_points_of(answer)
        self.answer_guard = AnswerGuard()
        if answer:
            self.answer_guard = AnswerGuard(bool(answer.get("enabled", True)), *self._answer_tau("balanced"),
                                            int(answer.get("hold", 0)), answer.get("switch", "continue"),
                                            RunningScore.parse(answer["score"]))
        if guard and (self.risk_engine is None or self.refusal is None):
            raise SteerguardError(f"{manifest.root}: the manifest has a guard but the engines lack the prober "
                                  "or the refusal head; re-export the bundle")
        t = manifest.data["tokenizer"]
        self.tokenizer = ChatTokenizer(manifest.path(t["file"]), manifest.path(t["config"]),
                                       manifest.path(t["chat_template"]))
        self.stop_ids = set(manifest.data["generation"]["stop_token_ids"])
        self.kv_dtype = self._kv_dtype()
        self.hidden_dtype = self.head.dtype("hidden")
        # greedy tokens from logits that stay on the device, and the refusal rows mixed in there
        self.argmax = None if self.memory.host else Engine("argmax", argmax_graph(self.head.dtype("logits")), be, threads)
        self.select = Engine("select", select_graph(self.hidden_dtype), be, threads) if self.refusal else None

    @classmethod
    def load(cls, bundle: str | Path, backend: str = "cpu", threads: int | None = None,
             verify: bool = True, fallback_to_cpu: bool = False, memory: str | None = None,
             operating_point: OperatingPoint = None) -> "GuardedModel":
        """Load a bundle after checking its manifest and every file's sha256. A backend this machine
        cannot run is an error, unless `fallback_to_cpu` asks for the CPU instead. `memory` ("host" or
        "device", default STEERGUARD_MEMORY, else host on the CPU and device on GPUs) says where the KV
        cache and activations live; "device" on the CPU runs the GPUs' code path with onnxruntime's CPU memory.
        `operating_point` picks the guard's threshold: a name from `operating_points` ("strict",
        "balanced", "permissive") or an explicit tau in [0, 1]; default the bundle's ("balanced")."""
        manifest = Manifest.load(bundle, verify=verify)
        model = cls(manifest, backend, threads, fallback_to_cpu, memory)
        if operating_point is not None:
            model.set_operating_point(operating_point)
        return model

    # ---- the guard's threshold ----------------------------------------------------------------------
    # (tau, name) in one attribute, replaced whole: a call in another thread reads one threshold or the other
    @property
    def tau(self) -> float | None:
        """The threshold the guard fires at (risk >= tau, or a non-finite risk) unless a call asks for another."""
        return self._threshold[0]

    @tau.setter
    def tau(self, value: float | None) -> None:
        self._threshold = (None if value is None else float(value), None)   # explicit: no name

    @property
    def operating_point(self) -> str | None:
        """The name of the current threshold ("strict", "balanced", ...), None for an explicit tau."""
        return self._threshold[1]

    def resolve_operating_point(self, point: OperatingPoint) -> tuple[float | None, str | None]:
        """(tau, name) for `point`: None is this model's current choice, a string a name from
        `operating_points`, a number an explicit tau in [0, 1]. Anything else: a one-line SteerguardError."""
        if point is None:
            return self._threshold
        if not self.guarded:
            raise SteerguardError("this bundle has no guard, so it has no operating point to choose")
        return resolve_operating_point(self.operating_points, point)

    def set_operating_point(self, point: OperatingPoint) -> None:
        """Make `point` (a name or a tau in [0, 1]; None: the bundle's default) this model's threshold."""
        if point is None:      # the bundle's own: guard.tau, named when it is the default point's
            guard, default = self.manifest.guard, self.default_operating_point
            tau = float(guard["tau"]) if guard else None
            named = guard and default and float(self.operating_points[default]["tau"]) == tau
            self._threshold = (tau, default if named else None)
            return
        self._threshold = self.resolve_operating_point(point)

    # ---- the answer guard ------------------------------------------------------------------------------
    def set_answer_guard(self, enabled: bool | None = None, operating_point: OperatingPoint = None,
                         hold: int | None = None, switch: str | None = None) -> AnswerGuard:
        """Turn the answer guard on or off, pick its threshold (a name from `answer_points` or a tau in [0, 1]),
        how many first tokens it holds back, and how it switches (`continue` or `restart`); None keeps a
        setting. Returns the new settings (also `self.answer_guard`)."""
        a = self.answer_guard
        if a.score is None and (enabled or operating_point is not None):
            raise SteerguardError("this bundle has no answer guard (exported before it, or calibrated without "
                                  "one): export it again to watch answers")
        if hold is not None and (isinstance(hold, bool) or not isinstance(hold, (int, np.integer)) or hold < 0):
            raise SteerguardError(f"hold is a number of tokens (0 or more), not {hold!r}")
        if switch is not None and switch not in ("continue", "restart"):
            raise SteerguardError(f"the answer guard switches by continue or restart, not {switch!r}")
        tau, name = (a.tau, a.operating_point) if operating_point is None else self._answer_tau(operating_point)
        self.answer_guard = AnswerGuard(a.enabled if enabled is None else bool(enabled), tau, name,
                                        a.hold if hold is None else int(hold), switch or a.switch, a.score)
        return self.answer_guard

    def _answer_tau(self, point: str | float) -> tuple[float, str | None]:
        return resolve_operating_point(self.answer_points, point)

    def refusal_from_prompt(self, hidden: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
        """The first token of a refusal that restarts from the prompt: the refusal head on the prompt's last
        final hidden state (d,), never the end of the turn."""
        logits = self.next_logits(hidden[None], np.array([True]))
        logits[0, list(self.stop_ids)] = -np.inf
        return int(sample(logits[0], sampling, rng))

    def _kv_dtype(self) -> np.dtype:
        """The KV cache's element type, as the decoder engines declare their past inputs (one for all)."""
        found = {eng.dtype(n) for eng, _ in self.decoders + self.step_decoders for n in eng.input_names
                 if n.startswith("past_key_values.")}
        if len(found) != 1:
            raise SteerguardError(f"{self.manifest.root}: the engines' KV caches have types "
                                  f"{sorted(map(str, found)) or 'none'}; the runtime needs one type; re-export the bundle")
        return found.pop()

    def _kv_memory(self, where: str) -> Memory:
        """STEERGUARD_KV=host keeps the KV cache in numpy arrays while the activations stay on the device: for
        a GPU whose attention kernels run on the CPU provider (onnxruntime 1.31's CUDA provider has no fp32
        GroupQueryAttention), which would otherwise copy each layer's whole cache both ways every step."""
        if where not in ("host", "device"):
            raise SteerguardError(f"STEERGUARD_KV must be host or device, not {where!r}")
        return HOST if where == "host" else self.memory

    def new_cache(self, layers: range, batch: int, max_len: int) -> KVCache:
        """An empty KV cache for `layers` where this model keeps it."""
        return KVCache(layers, batch, self.kv_heads, max_len, self.head_dim, self.kv_memory, self.kv_dtype)

    @property
    def engines(self) -> list[Engine]:
        """Every distinct engine this model runs: the chain's, the heads', the vision tower's and the small
        device graphs (for timing and profiling)."""
        found = [self.embed, *(e for e, _ in self.decoders + self.step_decoders), self.head, self.refusal,
                 self.vision.engine if self.vision else None, self.argmax, self.select]
        return list({id(e): e for e in found if e is not None}.values())

    @property
    def guarded(self) -> bool:
        return self.tau is not None

    # ---- requests -> token ids ------------------------------------------------------------------
    def encode(self, request: Request) -> list[int]:
        """Chat-formatted token ids of a request (image placeholders expanded)."""
        return self.prepare(request).ids

    def prepare(self, request: Request) -> Prompt:
        """A request as a Prompt: its token ids and, when its messages carry images, the image rows
        (run through the vision engine) and rotary positions."""
        prompt = self._prepare(request)
        if self.mrope is not None and prompt.positions is None:
            prompt.positions = np.tile(np.arange(len(prompt.ids), dtype=np.int64), (3, 1))
        return prompt

    def _prepare(self, request: Request) -> Prompt:
        if isinstance(request, str):
            if not request.strip():
                raise SteerguardError("the prompt is empty")
            return Prompt(self.tokenizer.encode_prompt(request), user_start=len(self.tokenizer.prompt_prefix))
        if not request:
            raise SteerguardError("no chat messages given")
        if all(isinstance(t, (int, np.integer)) for t in request):
            ids = [int(t) for t in request]
            if min(ids) < 0 or max(ids) >= self.manifest.model["vocab_size"]:
                raise SteerguardError("token ids out of the vocabulary's range")
            prefix = self.tokenizer.prompt_prefix      # the span is known when the ids open like a one-turn chat
            opens = len(ids) > len(prefix) and ids[:len(prefix)] == prefix
            return Prompt(ids, user_start=len(prefix) if opens else 0)
        messages = list(request)
        if any(m.get("role") == "user" and isinstance(m.get("content"), str) and not m["content"].strip()
               for m in messages if isinstance(m, dict)):
            raise SteerguardError("the prompt is empty")
        images = [p.get("image") for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list)
                  for p in m["content"] if isinstance(p, dict) and p.get("type") == "image"]
        if not images:
            return Prompt(self.tokenizer.encode_chat(messages), user_start=self._user_start(messages))
        if self.vision is None:
            raise SteerguardError(f"this bundle's model ({self.manifest.model['name']}) reads text only; "
                                  "remove the image or export a multimodal model")
        if any(im is None for im in images):
            raise SteerguardError("an image part has no 'image' (a file path or a PIL image)")
        if len(images) > self.vision.max_images:
            raise SteerguardError(f"{len(images)} images given; this bundle's model ({self.manifest.model['name']}) "
                                  f"takes at most {self.vision.max_images} per request")
        pixels = [self.vision.prepare(im) for im in images]   # every image is read before anything runs
        text_messages = _without_pixels(messages, self.vision.spec.get("placeholder_text"))
        unexpanded = self.tokenizer.encode_chat(text_messages)
        user_start = self._user_start(text_messages)
        if self.vision.image_token_id in unexpanded[:user_start]:
            user_start = 0   # images in earlier turns move it; read the whole conversation instead
        ids = self.vision.expand(unexpanded, pixels)
        if len(ids) >= self.context:
            raise SteerguardError(f"{len(images)} image(s) and the text take {len(ids)} tokens, more than the "
                                  f"model's context of {self.context}: send fewer or smaller images")
        filled = np.concatenate([self.vision.embed(p) for p in pixels])
        if filled.dtype == np.int64:   # image tokens of the text vocabulary: they replace the placeholders
            ids = np.asarray(ids)
            ids[ids == self.vision.image_token_id] = filled
            prompt = Prompt(ids.tolist(), user_start=user_start)
        else:
            prompt = Prompt(ids, filled, user_start=user_start)
        if self.mrope is not None:
            prompt.positions, prompt.position_delta = self.vision.positions(ids, pixels)
        return prompt

    def _user_start(self, messages: list) -> int:
        """Where the last user message begins; only a per-token prober needs it (three extra encodings)."""
        return self.tokenizer.user_turn_start(messages) if self.risk_per_token else 0

    def rotary_tables(self, prompt: Prompt, length: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(cos, sin), (length, head_dim / 2): row i rotates the token at sequence index i — the prompt's
        3-D positions, then the generated tokens' (i + delta) in all three (Qwen2-VL's multimodal rotary)."""
        if self.mrope is None:
            return None
        n = len(prompt.ids)
        positions = np.empty((3, length), np.int64)
        positions[:, :n] = prompt.positions[:, :length]
        positions[:, n:] = np.arange(n, length) + prompt.position_delta
        inv_freq = np.asarray(self.mrope["inv_freq"], np.float64)
        component = np.repeat(np.arange(len(self.mrope["section"])) % 3, self.mrope["section"])
        angles = positions[component].T * inv_freq        # (length, half): slot j reads its section's axis
        return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)

    def _check_fits(self, ids: list[int], s: Sampling) -> None:
        if len(ids) + s.max_new_tokens > self.context:
            raise SteerguardError(f"the prompt is {len(ids)} tokens; with max_new_tokens {s.max_new_tokens} it "
                                  f"exceeds the model's context of {self.context} tokens: shorten it")

    # ---- the loop -------------------------------------------------------------------------------
    def prefill(self, prompt: Prompt | list[int], cache: KVCache, row: int, decoders: list | None = None,
                prefix: "PrefixKV | None" = None) -> tuple[np.ndarray, float | None]:
        """Run one prompt into row `row` of the cache; return its last final hidden state and its risk.
        A Prompt's image rows replace the embeddings of its image placeholder tokens. With `prefix`, the
        tokens the prompt shares with it are copied from its KV and only the rest is computed (same result)."""
        prompt = prompt if isinstance(prompt, Prompt) else self.prepare(list(prompt))
        ids = prompt.ids
        reused = prefix.reusable(prompt) if prefix is not None else 0
        if reused:
            prefix.copy_into(cache, row, reused)
        x = self._embed(np.array([ids[reused:]], np.int64))
        if prompt.image_rows is not None:
            x = x.numpy()
            x[0, np.asarray(ids) == self.vision.image_token_id] = prompt.image_rows
        cache.lengths[row] = len(ids)
        attention = AttentionInputs(np.array([len(ids)]), len(ids), self.rotary_tables(prompt, cache.max_len))
        values = self._run_prefill_chain(x, attention, cache, slice(row, row + 1), decoders)
        x = values["hidden"]
        return x[0, -1], self._prompt_risk(values.get("risk"), 0, prompt, reused)

    def prefill_batch(self, prompts: Sequence[Prompt], cache: KVCache, first_row: int
                      ) -> tuple[np.ndarray, list[float | None]]:
        """Prefill several prompts in one run of the engines into rows first_row, first_row + 1, ...: the
        prompts are padded at the end to the longest, and each row's attention stops at its own length, so
        every row gets what `prefill` gives it alone. Returns the last hidden states (B, d) and the risks.
        Needs `can_prefill_together`."""
        if not self.can_prefill_together(prompts):
            raise SteerguardError("these prompts cannot be prefilled in one batch (images, 3-D positions, or a "
                                  "prober that reads the last position of prompts of different lengths)")
        lengths = np.array([len(p.ids) for p in prompts])
        width = int(lengths.max())
        ids = np.zeros((len(prompts), width), np.int64)
        for i, p in enumerate(prompts):
            ids[i, :lengths[i]] = p.ids
        x = self._embed(ids)
        rows = slice(first_row, first_row + len(prompts))
        cache.lengths[rows] = lengths
        attention = AttentionInputs(lengths, width, self.rotary_tables(prompts[0], cache.max_len))
        values = self._run_prefill_chain(x, attention, cache, rows)
        last = values["hidden"][np.arange(len(prompts)), lengths - 1]
        return last, [self._prompt_risk(values.get("risk"), i, p, 0) for i, p in enumerate(prompts)]

    def can_prefill_together(self, prompts: Sequence[Prompt]) -> bool:
        """Whether `prefill_batch` may take these prompts: text only, plain positions, and a prober that
        reads each row's own positions (padding would move a last-position prober onto a pad)."""
        if any(p.image_rows is not None or not _plain_positions(p) for p in prompts):
            return False
        return not self.guarded or self.risk_per_position or len({len(p.ids) for p in prompts}) == 1

    def _embed(self, ids: np.ndarray) -> ort.OrtValue:
        """The embeddings of (B, S) token ids, left where the model's tensors live."""
        b = self.embed.binding()
        b.bind_cpu_input("input_ids", ids)
        b.bind_output("inputs_embeds", self.memory.device_type, self.memory.device_id)
        self.embed.run_binding(b)
        return b.get_outputs()[0]

    def _run_prefill_chain(self, x: np.ndarray | ort.OrtValue, attention: "AttentionInputs", cache: KVCache,
                           rows: slice, decoders: list | None = None) -> dict[str, np.ndarray]:
        """The prefill engines over `x` (B, S, d) into a contiguous block of cache rows: {"hidden", "risk"?}.
        The activations pass from engine to engine where the model's tensors live; only the final hidden
        states and the risk come back to the host."""
        found: dict[str, np.ndarray] = {}
        for engine, layers in decoders or self.decoders:
            b = engine.binding()
            if isinstance(x, np.ndarray):
                b.bind_cpu_input(engine.input_names[0], x)
            else:
                b.bind_ortvalue_input(engine.input_names[0], x)
            attention.bind(b)
            cache.bind(b, layers, rows)
            outs = [n for n in engine.output_names if not n.startswith("present.")]
            for n in outs:
                b.bind_output(n, self.memory.device_type, self.memory.device_id)
            engine.run_binding(b)
            # only the activations: copying every bound output would copy the whole KV cache too
            values = dict(zip(outs, b.get_outputs()[-len(outs):]))
            x = values.get("hidden_states", values.get("last_hidden_state"))
            if "risk" in values:
                found["risk"] = values["risk"].numpy()
        found["hidden"] = x if isinstance(x, np.ndarray) else x.numpy()
        return found

    def _prompt_risk(self, risk: np.ndarray | None, row: int, prompt: Prompt, reused: int) -> float | None:
        """A row's risk from the `pre` engine's output: for a per-token prober the highest over the last user
        turn (the output starts after the `reused` prefix positions and may run on into padding), else the row's."""
        if risk is None:
            return None
        r = risk[row]
        if not self.risk_per_position:
            return float(r)   # NaN stays NaN
        if not self.risk_per_token:
            return float(r[len(prompt.ids) - 1 - reused])
        return float(r[prompt.user_start - reused:len(prompt.ids) - reused].max())

    def prefix_kv(self, ids: Sequence[int], max_len: int) -> "PrefixKV":
        """The KV of a token prefix many prompts share (a chat template's opening), computed once."""
        ids = list(ids)
        cache = self.new_cache(range(self.num_layers), 1, len(ids))
        prompt = self.prepare(ids)
        x = self._embed(np.array([ids], np.int64))
        attention = AttentionInputs(np.array([len(ids)]), len(ids), self.rotary_tables(prompt, max_len))
        self._run_prefill_chain(x, attention, cache, slice(0, 1))
        return PrefixKV(self, ids, cache)

    def decide(self, risk: float | None, tau: float | None = None) -> bool:
        """Fire when risk >= tau (this model's, unless another is given); a non-finite risk fires too (the
        guard fails closed)."""
        tau = self.tau if tau is None else tau
        return self.guarded and not (risk is not None and np.isfinite(risk) and risk < tau)

    def decode_one_token(self, tokens: np.ndarray, cache: KVCache, step: "DecodeStep") -> np.ndarray | Buffer:
        """Append `tokens` (B,) to every row; return the final hidden states (B, d): a numpy view in host
        memory, else the device buffer (read it with `.numpy()`, a copy)."""
        cache.lengths += 1
        step.ids[:, 0] = tokens
        step.attention.advance(cache.lengths)
        self.embed.run_binding(step.embed_binding)
        for (engine, _), b in zip(self.step_decoders, step.bindings):
            engine.run_binding(b)
        return step.hidden.array if step.hidden.array is not None else step.hidden

    def next_logits(self, hidden: np.ndarray | Buffer, fired: np.ndarray) -> np.ndarray:
        """Logits (B, V) on the host from hidden states (B, d) through the plain head, or through the refusal
        transform for rows that fired. (A decode step's heads run through `step_tokens`, on its bindings.)"""
        hidden = np.ascontiguousarray(hidden.numpy() if isinstance(hidden, Buffer) else hidden, self.hidden_dtype)
        if fired.any():
            steered = self.refusal.run({"hidden": hidden})["steered"]
            hidden = np.where(fired[:, None], steered, hidden)
        return self.head.run({"hidden": hidden})["logits"]

    def step_tokens(self, step: "DecodeStep", fired: np.ndarray, samplings: Sequence[Sampling | None],
                    rngs: Sequence[np.random.Generator | None]) -> np.ndarray:
        """Each row's next token after a decode step (0 for rows whose sampling is None: finished). When
        every live row is greedy and the tensors are on a device, the argmax runs there and only the token
        ids come to the host; otherwise the logits do."""
        live = [i for i, s in enumerate(samplings) if s is not None]
        if step.tokens is not None and all(samplings[i].temperature == 0 for i in live):
            tokens = step.greedy(fired).copy()
            if len(live) < len(samplings):
                tokens[[i for i, s in enumerate(samplings) if s is None]] = 0
            return tokens
        logits = step.logits(fired)
        tokens = np.zeros(len(samplings), np.int64)
        for i in live:
            tokens[i] = sample(logits[i], samplings[i], rngs[i])
        return tokens

    # ---- public API -----------------------------------------------------------------------------
    def generate(self, request: Request, sampling: Sampling | None = None, steer: bool | None = None,
                 operating_point: OperatingPoint = None) -> GenerationResult:
        """Answer one prompt (or chat) through the guard (at `operating_point`: a name or a tau in [0, 1];
        default this model's)."""
        return self.generate_batch([request], sampling, steer, operating_point)[0]

    def score(self, request: Request) -> float:
        """The guard's risk for a request: runs the chain only up to the prober."""
        if not self.guarded:
            raise SteerguardError("this bundle has no guard to score with")
        prompt = self.prepare(request)
        self._check_fits(prompt.ids, Sampling(max_new_tokens=1))
        upto = [i for i, (eng, _) in enumerate(self.decoders) if eng is self.risk_engine][0] + 1
        cache = self.new_cache(range(self.decoders[upto - 1][1].stop), 1, len(prompt.ids))
        return self.prefill(prompt, cache, 0, self.decoders[:upto])[1]

    def generate_batch(self, requests: Sequence[Request], sampling: Sampling | None = None,
                       steer: bool | None = None,
                       operating_point: OperatingPoint | Sequence[OperatingPoint] = None) -> list[GenerationResult]:
        """Answer several requests together, each with its own guard decision (`steer` True or False
        forces the refusal or the plain head for every request, for evaluation). `operating_point`: one
        for every request, or a list with one per request (None: this model's)."""
        points = self._points_per_request(operating_point, len(requests))
        if self.mrope is not None and len(requests) > 1 and any(not isinstance(r, str) for r in requests):
            # 3-D rotary tables differ per request with images, and the engines take one table per batch
            return [self.generate_batch([r], sampling, steer, [p])[0] for r, p in zip(requests, points)]
        steps = self.decode_tokens(requests, sampling, steer, points)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def _points_per_request(self, point: OperatingPoint | Sequence[OperatingPoint], n: int
                            ) -> list[tuple[float | None, str | None]]:
        """(tau, name) for each of n requests, checked before anything runs."""
        points = list(point) if isinstance(point, (list, tuple)) else [point] * n
        if len(points) != n:
            raise SteerguardError(f"{len(points)} operating points for {n} requests; give one, or one per request")
        return [p if isinstance(p, tuple) else self.resolve_operating_point(p) for p in points]

    def decode_tokens(self, requests: Sequence[Request], sampling: Sampling | None = None,
                      steer: bool | None = None,
                      operating_point: OperatingPoint | Sequence[OperatingPoint] = None
                      ) -> Generator[tuple[int, int], None, list[GenerationResult]]:
        """Yield (row, token) as tokens are decoded; return the results."""
        s = sampling or Sampling()
        s.check()
        if not requests:
            raise SteerguardError("no prompts given")
        points = self._points_per_request(operating_point, len(requests))
        encoded = [self.prepare(r) for r in requests]
        prompts = [p.ids for p in encoded]
        for ids in prompts:
            self._check_fits(ids, s)
        batch = len(prompts)
        max_len = max(len(p) for p in prompts) + s.max_new_tokens
        cache = self.new_cache(range(self.num_layers), batch, max_len)
        rngs = [np.random.default_rng(s.seed) for _ in range(batch)]

        t0 = time.perf_counter()
        last_hidden = np.zeros((batch, self.hidden_size), self.hidden_dtype)
        risks: list[float | None] = []
        rotary = [self.rotary_tables(p, max_len) for p in encoded]
        if rotary[0] is not None and any(not np.array_equal(r[0], rotary[0][0]) for r in rotary):
            raise SteerguardError("these requests place their tokens differently (images): decode them one by one")
        for row, p in enumerate(encoded):
            last_hidden[row], risk = self.prefill(p, cache, row)
            risks.append(risk)
        fired = np.array([self.decide(r, tau) if steer is None else steer for r, (tau, _) in zip(risks, points)])
        if fired.any() and self.refusal is None:
            raise SteerguardError("this bundle has no refusal head")
        prefill_fired = fired.copy()      # `fired` also takes the rows the answer guard switches
        t_prefill = time.perf_counter()

        tokens: list[list[int]] = [[] for _ in range(batch)]
        reasons: list[str | None] = [None] * batch
        streams = [TextStream(self.tokenizer) for _ in range(batch)]
        texts = [""] * batch
        step = DecodeStep(self, cache, batch, rotary[0])
        ag = self.answer_guard
        watches = [AnswerWatch(ag.score, ag.tau) if ag.enabled and steer is None and not fired[r] else None
                   for r in range(batch)]
        switches = [SwitchRecord("prompt", 0) if fired[r] else None for r in range(batch)]
        released = [0] * batch          # tokens yielded so far; the rest are held until the answer guard saw them
        restarts: list[int] = []        # rows whose refusal starts from the prompt at the next token
        restarted = False
        t_first, n_steps = None, 0
        while True:
            if n_steps:
                nxt = self.step_tokens(step, fired, [None if reasons[r] else s for r in range(batch)], rngs)
            else:
                logits = self.next_logits(last_hidden, fired)
                if fired.any():     # a refusal is never empty: it cannot end the turn at once
                    logits[np.ix_(fired, list(self.stop_ids))] = -np.inf
                nxt = np.array([sample(logits[r], s, rngs[r]) for r in range(batch)])
            for r in restarts:
                nxt[r] = self.refusal_from_prompt(last_hidden[r], s, rngs[r])
            restarts = []
            t_first = t_first or time.perf_counter()
            for r in range(batch):
                if reasons[r] is not None:
                    continue
                tok = int(nxt[r])
                if tok in self.stop_ids and not s.ignore_eos:
                    reasons[r] = "stop"
                else:
                    tokens[r].append(tok)
                    if s.stop:
                        texts[r] += streams[r].push(tok)
                        if any(x in texts[r] for x in s.stop):
                            reasons[r] = "stop_string"
                    if reasons[r] is None and len(tokens[r]) >= s.max_new_tokens:
                        reasons[r] = "length"
                if reasons[r] is not None or watches[r] is None or len(watches[r].risks) >= ag.hold:
                    for t in tokens[r][released[r]:]:
                        yield r, t
                    released[r] = len(tokens[r])
            if all(reasons):
                break
            if restarted:   # a restarted row decodes longer than the others: finished rows stop advancing
                done = np.array([x is not None for x in reasons])
                cache.lengths[done] = np.minimum(cache.lengths[done], cache.max_len - 1)
            self.decode_one_token(nxt, cache, step)
            n_steps += 1
            watched = [r for r in range(batch) if watches[r] is not None and reasons[r] is None]
            answer_risks = step.answer_risks() if watched else None
            for r in watched:
                if not watches[r].push(float(answer_risks[r])):
                    continue
                # the answer guard fires: the held tokens are dropped, the refusal head takes the row
                dropped = len(tokens[r]) - released[r]
                switches[r] = SwitchRecord("answer", released[r], watches[r].value, dropped)
                watches[r], fired[r] = None, True
                del tokens[r][released[r]:]
                if dropped or ag.switch == "restart":
                    cache.lengths[r] = len(prompts[r])
                    restarts.append(r)
                    restarted = True
                if dropped and s.stop:
                    streams[r], texts[r] = TextStream(self.tokenizer), ""
                    for t in tokens[r]:
                        texts[r] += streams[r].push(t)
        t_end = time.perf_counter()

        results = []
        for r in range(batch):
            text = self.tokenizer.decode(tokens[r])
            if reasons[r] == "stop_string":
                text = text[:min(text.find(x) for x in s.stop if x in text)]
            decode_s = t_end - t_first
            results.append(GenerationResult(
                text=text, token_ids=tokens[r], risk=risks[r], fired=bool(prefill_fired[r]),
                split_layer=self.split_layer, finish_reason=reasons[r], prompt_tokens=len(prompts[r]),
                timings={"prefill_s": t_prefill - t0, "first_token_s": t_first - t0, "decode_s": decode_s,
                         "decode_steps": n_steps, "new_tokens": len(tokens[r]),
                         "per_token_ms": 1000 * decode_s / n_steps if n_steps else None,
                         "decode_tok_s": n_steps / decode_s if decode_s > 0 and n_steps else None},
                tau=points[r][0], operating_point=points[r][1],
                **switch_fields(switches[r], watches[r])))
        return results

    def stream(self, request: Request, sampling: Sampling | None = None,
               operating_point: OperatingPoint = None) -> "Stream":
        """Iterate over the answer's text pieces as they are decoded; `.result` holds the result after."""
        return Stream(self, request, sampling, operating_point)


@dataclass
class SwitchRecord:
    """Where and why a row's answer went to the refusal head."""
    reason: str             # "prompt" or "answer"
    at: int                 # tokens of the answer kept before the refusal's
    score: float | None = None
    dropped: int = 0


def switch_fields(switch: SwitchRecord | None, watch: AnswerWatch | None) -> dict:
    """A GenerationResult's switch, switch_at, answer_score and dropped_tokens from a row's switch record and, while
    it still watches, its answer guard (whose highest score is the answer's)."""
    if switch is None:
        return {"answer_score": watch.peak if watch is not None else None}
    return {"switch": switch.reason, "switch_at": switch.at, "dropped_tokens": switch.dropped,
            "answer_score": switch.score if switch.reason == "answer" else None}


class PrefixKV:
    """The KV cache of a token prefix that many prompts open with, computed once by the prefill engines.
    A prompt that opens with (part of) it gets those positions copied into its row, and its prefill
    computes only the tokens after them: the keys and values of a position depend only on the tokens up
    to it, so the result is the same as a whole prefill's."""

    def __init__(self, model: GuardedModel, ids: list[int], cache: KVCache):
        self.model, self.ids, self.cache = model, ids, cache
        guard = model.manifest.guard or {}
        self.span = 1 if model.risk_per_token else int(guard.get("span", 1) or 1)

    def reusable(self, prompt: Prompt) -> int:
        """How many leading tokens of `prompt` may come from this prefix: the shared ones, leaving at least
        one token (and every position the prober reads) to compute; 0 for images or 3-D positions."""
        if prompt.image_rows is not None or not _plain_positions(prompt):
            return 0
        shared = 0
        for a, b in zip(self.ids, prompt.ids):
            if a != b:
                break
            shared += 1
        limit = len(prompt.ids) - self.span
        if self.model.risk_per_token:
            limit = min(limit, prompt.user_start)
        return max(0, min(shared, limit))

    def copy_into(self, cache: KVCache, row: int, n: int) -> None:
        """The prefix's first n positions into `row`, for the layers `cache` holds."""
        cache.copy_positions(row, self.cache, 0, n)


class AttentionInputs:
    """Where the tokens of a run sit, bound to every decoder engine and updated in place: each row's
    length - 1, the width of the KV buffer (attention over the shared buffer reads each row's own length),
    and for 3-D rotary models the per-request rotary tables."""

    def __init__(self, lengths: np.ndarray, width: int, rotary: tuple[np.ndarray, np.ndarray] | None = None):
        self.seqlens = (np.asarray(lengths) - 1).astype(np.int32)
        self.total = np.array(width, np.int32)
        self.rotary = rotary

    def bind(self, binding: ort.IOBinding) -> None:
        binding.bind_cpu_input("seqlens_k", self.seqlens)
        binding.bind_cpu_input("total_sequence_length", self.total)
        if self.rotary is not None:
            binding.bind_cpu_input("rotary_cos", self.rotary[0])
            binding.bind_cpu_input("rotary_sin", self.rotary[1])

    def advance(self, lengths: np.ndarray) -> None:
        self.seqlens[:] = lengths - 1


class DecodeStep:
    """The I/O bindings of one decode step, made once per request and never rebound: token ids, activations
    and the attention's lengths live in preallocated buffers updated in place, the activations and the
    heads' inputs in the model's memory (on the device with a GPU). The heads' bindings are made when first
    needed: plain or refusal rows, and logits to the host or (greedy, on a device) only the argmax."""

    def __init__(self, model: GuardedModel, cache: KVCache, batch: int,
                 rotary: tuple[np.ndarray, np.ndarray] | None = None):
        self.model = model
        mem, d = model.memory, model.hidden_size
        self.ids = np.zeros((batch, 1), np.int64)
        self._answer_risk: Buffer | None = None
        self.attention = AttentionInputs(cache.lengths, cache.max_len, rotary)
        x = mem.zeros((batch, 1, d), model.embed.dtype("inputs_embeds"))
        self.embed_binding = model.embed.binding()
        self.embed_binding.bind_cpu_input("input_ids", self.ids)
        x.bind_output(self.embed_binding, "inputs_embeds")
        self.bindings: list[ort.IOBinding] = []
        self._keep = [x]
        for engine, layers in model.step_decoders:
            b = engine.binding()
            _check_dtype(engine, engine.input_names[0], x)
            x.bind_input(b, engine.input_names[0])
            self.attention.bind(b)
            cache.bind(b, layers)
            name = "last_hidden_state" if "last_hidden_state" in engine.output_names else "hidden_states"
            out = mem.zeros((batch, 1, d), engine.dtype(name))
            out.bind_output(b, name)
            if "risk" in engine.output_names:     # computed on every step, read only at prefill
                risk = mem.zeros((batch, 1) if model.risk_per_position else (batch,), engine.dtype("risk"))
                risk.bind_output(b, "risk")
                self._keep.append(risk)
            if "answer_risk" in engine.output_names:   # the generated token's risk, read by the answer guard
                self._answer_risk = mem.zeros((batch, 1), engine.dtype("answer_risk"))
                self._answer_risk.bind_output(b, "answer_risk")
            self.bindings.append(b)
            self._keep.append(out)
            x = out
        self.hidden = x.view((batch, d))       # the last engine's output: what the heads read
        _check_dtype(model.head, "hidden", self.hidden)
        self._logits_host = np.zeros((batch, model.manifest.model["vocab_size"]), model.head.dtype("logits"))
        # on a device, greedy decoding reads only the argmax of each row
        self.tokens = None if model.argmax is None else np.zeros(batch, np.int64)
        self._pick = np.zeros((batch, 1), np.bool_)            # the rows the refusal head answers
        self._sources: dict[str, Buffer] = {"hidden": self.hidden}
        self._refusal: ort.IOBinding | None = None
        self._select: ort.IOBinding | None = None
        self._argmax: ort.IOBinding | None = None
        self._logits_device: Buffer | None = None
        self._heads: dict[tuple[str, bool], ort.IOBinding] = {}

    def answer_risks(self) -> np.ndarray:
        """(B,) the answer prober's risk of the token each row just fed (on the host)."""
        a = self._answer_risk
        return (a.array if a.array is not None else a.numpy())[:, 0]

    def logits(self, fired: np.ndarray) -> np.ndarray:
        """(B, V) logits on the host after the step (the plain head, or the refusal one for rows that fired)."""
        self.model.head.run_binding(self._head(self._head_input(fired), on_host=True))
        return self._logits_host

    def greedy(self, fired: np.ndarray) -> np.ndarray:
        """(B,) greedy tokens, the argmax taken on the device (models whose memory is a device's)."""
        self.model.head.run_binding(self._head(self._head_input(fired), on_host=False))
        self.model.argmax.run_binding(self._argmax)
        return self.tokens

    def _head_input(self, fired: np.ndarray) -> str:
        """Run the refusal transform as the rows need it; say which buffer the head reads."""
        if not fired.any():
            return "hidden"
        if self._refusal is None:
            self._bind_refusal()
        self.model.refusal.run_binding(self._refusal)
        if fired.all():
            return "steered"
        self._pick[:, 0] = fired
        self.model.select.run_binding(self._select)
        return "mixed"

    def _bind_refusal(self) -> None:
        """hidden -> refusal -> steered; (pick, steered, hidden) -> select -> mixed."""
        m = self.model
        steered = self._sources["steered"] = m.memory.zeros(self.hidden.shape, m.refusal.dtype("steered"))
        mixed = self._sources["mixed"] = m.memory.zeros(self.hidden.shape, self.hidden.dtype)
        self._refusal = m.refusal.binding()
        self.hidden.bind_input(self._refusal, "hidden")
        steered.bind_output(self._refusal, "steered")
        self._select = m.select.binding()
        self._select.bind_cpu_input("pick", self._pick)
        steered.bind_input(self._select, "a")
        self.hidden.bind_input(self._select, "b")
        mixed.bind_output(self._select, "out")

    def _head(self, source: str, on_host: bool) -> ort.IOBinding:
        """The head reading `source`, writing its logits to the host or (for the argmax) to the device."""
        key = (source, on_host)
        if key not in self._heads:
            b = self.model.head.binding()
            self._sources[source].bind_input(b, "hidden")
            if on_host:
                HOST.wrap(self._logits_host).bind_output(b, "logits")
            else:
                self._device_logits().bind_output(b, "logits")
            self._heads[key] = b
        return self._heads[key]

    def _device_logits(self) -> Buffer:
        """One device buffer for the logits, which the argmax reads; the tokens come to the host."""
        if self._logits_device is None:
            m = self.model
            self._logits_device = m.memory.zeros(self._logits_host.shape, self._logits_host.dtype)
            self._argmax = m.argmax.binding()
            self._logits_device.bind_input(self._argmax, "logits")
            HOST.wrap(self.tokens).bind_output(self._argmax, "token")
        return self._logits_device


class Stream:
    """Text pieces of one answer as they are decoded. A piece that might begin a stop string is held
    back until it is clear; `.result` holds the GenerationResult once the iteration ends."""

    def __init__(self, model: GuardedModel, request: Request, sampling: Sampling | None,
                 operating_point: OperatingPoint = None):
        self.model, self.request, self.sampling = model, request, sampling or Sampling()
        self.point = model.resolve_operating_point(operating_point)   # a bad one fails here, not mid-iteration
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        text, sent = TextStream(self.model.tokenizer), 0
        shown = ""
        steps = self.model.decode_tokens([self.request], self.sampling, None, [self.point])
        while True:
            try:
                _, tok = next(steps)
            except StopIteration as done:
                self.result = done.value[0]
                break
            shown += text.push(tok)
            safe = len(shown) - _held_back(shown, self.sampling.stop)
            if safe > sent:
                yield shown[sent:safe]
                sent = safe
        if len(self.result.text) > sent:
            yield self.result.text[sent:]


def _plain_positions(prompt: Prompt) -> bool:
    """No 3-D rotary positions, or ones that are a plain count in all three (a text-only Qwen2-VL prompt)."""
    p = prompt.positions
    return p is None or np.array_equal(p, np.tile(np.arange(p.shape[1]), (3, 1)))


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of `text` could still grow into (or already hold) a stop string."""
    held = 0
    for stop in stops:
        at = text.find(stop)
        if at >= 0:
            held = max(held, len(text) - at)
            continue
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                held = max(held, k)
                break
    return held


def _without_pixels(messages: list, placeholder_text: str | None = None) -> list:
    """The messages with each image part reduced to {"type": "image"}, which is all a template renders;
    with `placeholder_text` (a text-only template), content lists become text with it in each image's place."""
    def content(parts: list):
        if placeholder_text is not None:
            return "".join(placeholder_text if p.get("type") == "image" else p["text"] for p in parts)
        return [{"type": "image"} if p.get("type") == "image" else p for p in parts]

    return [{**m, "content": content(m["content"])} if isinstance(m.get("content"), list) else m for m in messages]


def _check_dtype(engine: Engine, name: str, value: Buffer) -> None:
    if engine.dtype(name) != value.dtype:
        raise SteerguardError(f"engine {engine.name} takes {name} as {engine.dtype(name)} but the engine before it "
                              f"gives {value.dtype}; re-export the bundle")


def _one(manifest: Manifest, role: str) -> dict:
    found = manifest.engine(role)
    if len(found) != 1:
        raise SteerguardError(f"{manifest.root}: the manifest must list exactly one {role} engine")
    return found[0]
