"""libsteerguard (the C library in csrc/) from Python through ctypes: for applications that want the C
runtime's answers in-process, and for the tests and benchmarks that hold it to the Python runtime.

    lib = NativeLibrary.load()          # the one `pip install` built into steerguard/lib/, or give a path
    with lib.model("runs/demo-bundle", threads=2) as m:
        print(m.generate([{"role": "user", "content": "Hi"}], max_new_tokens=32).text)
"""

from __future__ import annotations

import ctypes as C
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ..errors import SteerguardError

FINISH_REASONS = ("stop", "stop_string", "length")
SWITCH_REASONS = (None, "prompt", "answer")      # sg_switch_reason, as GenerationResult.switch names them
ANSWER_SWITCHES = ("continue", "restart")       # sg_answer_switch
CANCELLED = 7
PACKAGE = Path(__file__).resolve().parents[1]
NOT_BUILT = ("this steerguard was installed without libsteerguard (its build needs a C compiler and the -dev "
             "packages that `bash csrc/install-deps.sh` installs; then reinstall steerguard), or build it with "
             "`cmake -S csrc -B build/c && cmake --build build/c` and pass its path")


def library_path() -> Path:
    """The libsteerguard that `pip install` built into the package (steerguard/lib/)."""
    return PACKAGE / "lib" / "libsteerguard.so"


def include_dir() -> Path:
    """The folder holding steerguard.h, for C programs built against the packaged library."""
    return PACKAGE / "include"


def _load_onnxruntime_globally() -> None:
    """Make this environment's onnxruntime the one libsteerguard finds (it looks for OrtGetApiBase in the
    process before searching the library path): the onnxruntime wheel ships libonnxruntime.so.1.X.Y."""
    import onnxruntime

    found = sorted((Path(onnxruntime.__file__).parent / "capi").glob("libonnxruntime.so*"))
    if found:
        C.CDLL(str(found[0]), mode=C.RTLD_GLOBAL)


class _LoadOptions(C.Structure):
    _fields_ = [("threads", C.c_int32), ("verify_hashes", C.c_int32)]


class _Message(C.Structure):
    _fields_ = [("role", C.c_char_p), ("content", C.c_char_p)]


class _Tokens(C.Structure):
    _fields_ = [("ids", C.POINTER(C.c_int32)), ("count", C.c_size_t)]


class _Sampling(C.Structure):
    _fields_ = [("max_new_tokens", C.c_int32), ("temperature", C.c_float), ("top_k", C.c_int32),
                ("top_p", C.c_float), ("seed", C.c_uint64), ("stop", C.POINTER(C.c_char_p)),
                ("n_stop", C.c_size_t), ("ignore_eos", C.c_int32)]


class _Result(C.Structure):
    _fields_ = [("text", C.c_void_p), ("text_length", C.c_size_t), ("token_ids", C.POINTER(C.c_int32)), ("n_tokens", C.c_size_t),
                ("prompt_tokens", C.c_size_t), ("risk", C.c_float), ("fired", C.c_int32),
                ("split_layer", C.c_int32), ("finish_reason", C.c_int), ("prefill_seconds", C.c_double),
                ("first_token_seconds", C.c_double), ("decode_seconds", C.c_double), ("tau", C.c_float),
                ("switch_reason", C.c_int), ("switch_at", C.c_int32), ("answer_score", C.c_float),
                ("dropped_tokens", C.c_int32)]


class _AnswerGuardInfo(C.Structure):
    _fields_ = [("available", C.c_int32), ("enabled", C.c_int32), ("tau", C.c_float), ("operating_point", C.c_char_p),
                ("hold", C.c_int32), ("switch_mode", C.c_int), ("score", C.c_char_p),
                ("n_operating_points", C.c_int32)]


class _ModelInfo(C.Structure):
    _fields_ = [("name", C.c_char_p), ("precision", C.c_char_p), ("num_layers", C.c_int32), ("vocab_size", C.c_int32),
                ("context", C.c_int32), ("guarded", C.c_int32), ("split_layer", C.c_int32), ("tau", C.c_float),
                ("operating_point", C.c_char_p), ("n_operating_points", C.c_int32)]


_Callback = C.CFUNCTYPE(C.c_int, C.c_int32, C.POINTER(C.c_char), C.c_size_t, C.c_void_p)


class NativeError(SteerguardError):
    """A failed libsteerguard call: `status` is its sg_status name."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class NativeResult:
    text: str
    token_ids: list[int]
    risk: float
    fired: bool
    split_layer: int
    finish_reason: str
    prompt_tokens: int
    prefill_s: float
    first_token_s: float
    decode_s: float
    tau: float                  # the threshold the request was judged at (NaN when unguarded)
    switch: str | None = None           # why the refusal head answers: "prompt", "answer", or None
    switch_at: int | None = None        # index in token_ids where the refusal head's tokens begin
    answer_score: float | None = None   # the answer guard's running score at the switch, else its highest (None:
                                        # not watched, or never judged)
    dropped_tokens: int = 0             # held-back tokens the answer guard dropped when it switched


class NativeLibrary:
    def __init__(self, lib: C.CDLL):
        self.lib = lib
        lib.sg_last_error.restype = C.c_char_p
        lib.sg_status_name.restype = C.c_char_p
        lib.sg_version.restype = C.c_char_p
        lib.sg_model_load.argtypes = [C.c_char_p, C.POINTER(_LoadOptions), C.POINTER(C.c_void_p)]
        lib.sg_model_free.argtypes = [C.c_void_p]
        lib.sg_tokenize.argtypes = [C.c_void_p, C.c_char_p, C.c_size_t, C.POINTER(_Tokens)]
        lib.sg_encode_chat.argtypes = [C.c_void_p, C.POINTER(_Message), C.c_size_t, C.POINTER(_Tokens)]
        lib.sg_tokens_free.argtypes = [C.POINTER(_Tokens)]
        lib.sg_detokenize.argtypes = [C.c_void_p, C.POINTER(C.c_int32), C.c_size_t, C.POINTER(C.c_void_p),
                                      C.POINTER(C.c_size_t)]
        lib.sg_string_free.argtypes = [C.c_void_p]
        lib.sg_generate.argtypes = [C.c_void_p, C.POINTER(_Message), C.c_size_t, C.POINTER(_Sampling), _Callback,
                                    C.c_void_p, C.POINTER(_Result)]
        lib.sg_generate_ids.argtypes = [C.c_void_p, C.POINTER(C.c_int32), C.c_size_t, C.POINTER(_Sampling), _Callback,
                                        C.c_void_p, C.POINTER(_Result)]
        lib.sg_result_free.argtypes = [C.POINTER(_Result)]
        lib.sg_score.argtypes = [C.c_void_p, C.POINTER(_Message), C.c_size_t, C.POINTER(C.c_float),
                                 C.POINTER(C.c_int32)]
        lib.sg_model_info_get.argtypes = [C.c_void_p, C.POINTER(_ModelInfo)]
        lib.sg_model_set_operating_point.argtypes = [C.c_void_p, C.c_char_p]
        lib.sg_model_set_tau.argtypes = [C.c_void_p, C.c_float]
        lib.sg_model_operating_point_get.argtypes = [C.c_void_p, C.c_int32, C.POINTER(C.c_char_p),
                                                     C.POINTER(C.c_float)]
        lib.sg_model_answer_guard_get.argtypes = [C.c_void_p, C.POINTER(_AnswerGuardInfo)]
        lib.sg_model_set_answer_guard.argtypes = [C.c_void_p, C.c_int32]
        lib.sg_model_set_answer_operating_point.argtypes = [C.c_void_p, C.c_char_p]
        lib.sg_model_set_answer_tau.argtypes = [C.c_void_p, C.c_float]
        lib.sg_model_set_answer_hold.argtypes = [C.c_void_p, C.c_int32]
        lib.sg_model_set_answer_switch.argtypes = [C.c_void_p, C.c_int]
        lib.sg_model_answer_operating_point_get.argtypes = [C.c_void_p, C.c_int32, C.POINTER(C.c_char_p),
                                                            C.POINTER(C.c_float)]

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> "NativeLibrary":
        """Load libsteerguard: `path`, else the packaged one (library_path())."""
        if path is None and not library_path().exists():
            raise SteerguardError(f"{library_path()} does not exist: {NOT_BUILT}")
        path = path or library_path()
        _load_onnxruntime_globally()
        try:
            found = cls(C.CDLL(str(path)))
        except OSError as e:
            raise SteerguardError(f"{path}: cannot load libsteerguard ({e}); {NOT_BUILT}") from e
        from .. import __version__

        if found.version != __version__:    # its structs may differ from the ones declared here
            raise SteerguardError(f"{path} is libsteerguard {found.version}, not this package's {__version__}; "
                                  f"{NOT_BUILT}")
        return found

    @property
    def version(self) -> str:
        return self.lib.sg_version().decode()

    def check(self, status: int) -> None:
        if status:
            raise NativeError(self.lib.sg_status_name(status).decode(), self.lib.sg_last_error().decode(errors="replace"))

    def model(self, bundle: str | Path, threads: int = 0, verify: bool = True) -> "NativeModel":
        handle = C.c_void_p()
        self.check(self.lib.sg_model_load(str(bundle).encode(), C.byref(_LoadOptions(threads, int(verify))),
                                          C.byref(handle)))
        return NativeModel(self, handle)


def _messages(messages: Sequence[dict]) -> tuple[C.Array, list]:
    encoded = [(m["role"].encode(), m["content"].encode() if isinstance(m["content"], str) else m["content"])
               for m in messages]
    return (_Message * max(len(encoded), 1))(*[_Message(r, c) for r, c in encoded]), encoded


class NativeModel:
    """A bundle loaded by libsteerguard; free it with close() or a with-block."""

    def __init__(self, lib: NativeLibrary, handle: C.c_void_p):
        self.native, self.handle = lib, handle

    def close(self) -> None:
        if self.handle:
            self.native.lib.sg_model_free(self.handle)
            self.handle = None

    def __enter__(self) -> "NativeModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _take_tokens(self, tokens: _Tokens) -> list[int]:
        ids = [tokens.ids[i] for i in range(tokens.count)]
        self.native.lib.sg_tokens_free(C.byref(tokens))
        return ids

    def tokenize(self, text: str | bytes) -> list[int]:
        data = text.encode() if isinstance(text, str) else text
        tokens = _Tokens()
        self.native.check(self.native.lib.sg_tokenize(self.handle, data, len(data), C.byref(tokens)))
        return self._take_tokens(tokens)

    def encode_chat(self, messages: Sequence[dict]) -> list[int]:
        array, _keep = _messages(messages)
        tokens = _Tokens()
        self.native.check(self.native.lib.sg_encode_chat(self.handle, array, len(messages), C.byref(tokens)))
        return self._take_tokens(tokens)

    def detokenize(self, ids: Sequence[int]) -> str:
        out, length = C.c_void_p(), C.c_size_t()
        array = (C.c_int32 * max(len(ids), 1))(*ids)
        self.native.check(self.native.lib.sg_detokenize(self.handle, array, len(ids), C.byref(out), C.byref(length)))
        text = C.string_at(out.value, length.value).decode()
        self.native.lib.sg_string_free(out)
        return text

    def info(self) -> dict:
        """sg_model_info: name, precision, layers, vocabulary, context, guarded, split layer, the current tau and
        its operating point's name (None for an explicit tau)."""
        out = _ModelInfo()
        self.native.check(self.native.lib.sg_model_info_get(self.handle, C.byref(out)))
        info = {name: getattr(out, name) for name, _ in _ModelInfo._fields_}
        for key in ("name", "precision", "operating_point"):
            info[key] = info[key].decode() if info[key] is not None else None
        info["guarded"] = bool(info["guarded"])
        return info

    @property
    def operating_points(self) -> dict[str, float]:
        """The bundle's named thresholds, lowest tau first: name -> tau."""
        out = {}
        for i in range(self.info()["n_operating_points"]):
            name, tau = C.c_char_p(), C.c_float()
            self.native.check(self.native.lib.sg_model_operating_point_get(self.handle, i, C.byref(name), C.byref(tau)))
            out[name.value.decode()] = tau.value
        return out

    def set_operating_point(self, point: str | float) -> None:
        """Judge later calls at a named threshold (sg_model_set_operating_point) or an explicit tau in [0, 1]
        (sg_model_set_tau)."""
        lib = self.native.lib
        if isinstance(point, str):
            self.native.check(lib.sg_model_set_operating_point(self.handle, point.encode()))
        else:
            self.native.check(lib.sg_model_set_tau(self.handle, float(point)))

    # ---- the answer guard ------------------------------------------------------------------------------
    @property
    def answer_guard(self) -> dict:
        """sg_model_answer_guard_get: available, enabled, tau, operating_point (None for an explicit tau), hold,
        switch ("continue" or "restart"), score (the running score, e.g. "window:8"), n_operating_points."""
        out = _AnswerGuardInfo()
        self.native.check(self.native.lib.sg_model_answer_guard_get(self.handle, C.byref(out)))
        info = {name: getattr(out, name) for name, _ in _AnswerGuardInfo._fields_}
        for key in ("operating_point", "score"):
            info[key] = info[key].decode() if info[key] is not None else None
        info["available"], info["enabled"] = bool(info["available"]), bool(info["enabled"])
        info["switch"] = ANSWER_SWITCHES[info.pop("switch_mode")]
        return info

    @property
    def answer_points(self) -> dict[str, float]:
        """The answer guard's named thresholds, lowest tau first: name -> tau ({} without an answer guard)."""
        out = {}
        for i in range(self.answer_guard["n_operating_points"]):
            name, tau = C.c_char_p(), C.c_float()
            self.native.check(self.native.lib.sg_model_answer_operating_point_get(self.handle, i, C.byref(name),
                                                                                  C.byref(tau)))
            out[name.value.decode()] = tau.value
        return out

    def set_answer_guard(self, enabled: bool | None = None, operating_point: str | float | None = None,
                         hold: int | None = None, switch: str | int | None = None) -> dict:
        """As GuardedModel.set_answer_guard: turn the answer guard on or off, pick its threshold (a name or a tau
        in [0, 1]), the tokens it holds back, and how it switches ("continue" or "restart"; an int is passed to
        the library as the sg_answer_switch value); None keeps a setting. A refused setting (NativeError) leaves
        every setting as it was. Returns the new settings (`answer_guard`)."""
        lib, before = self.native.lib, self.answer_guard
        if isinstance(switch, str):
            if switch not in ANSWER_SWITCHES:
                raise SteerguardError(f"the answer guard switches by continue or restart, not {switch!r}")
            switch = ANSWER_SWITCHES.index(switch)
        try:
            if isinstance(operating_point, str):
                self.native.check(lib.sg_model_set_answer_operating_point(self.handle, operating_point.encode()))
            elif operating_point is not None:
                if isinstance(operating_point, bool):
                    raise SteerguardError(f"an operating point is a name or a tau between 0 and 1, not {operating_point!r}")
                self.native.check(lib.sg_model_set_answer_tau(self.handle, float(operating_point)))
            if hold is not None:
                if isinstance(hold, bool) or int(hold) != hold:
                    raise SteerguardError(f"hold is a number of tokens (0 or more), not {hold!r}")
                self.native.check(lib.sg_model_set_answer_hold(self.handle, min(max(int(hold), -1), 2**31 - 1)))
            if switch is not None:
                self.native.check(lib.sg_model_set_answer_switch(self.handle, int(switch)))
            if enabled is not None:
                self.native.check(lib.sg_model_set_answer_guard(self.handle, int(bool(enabled))))
        except SteerguardError:
            if before["available"]:      # put back what was set before the refused one
                if before["operating_point"] is not None:
                    lib.sg_model_set_answer_operating_point(self.handle, before["operating_point"].encode())
                else:
                    lib.sg_model_set_answer_tau(self.handle, before["tau"])
                lib.sg_model_set_answer_hold(self.handle, before["hold"])
                lib.sg_model_set_answer_switch(self.handle, ANSWER_SWITCHES.index(before["switch"]))
                lib.sg_model_set_answer_guard(self.handle, int(before["enabled"]))
            raise
        return self.answer_guard

    def score(self, messages: Sequence[dict]) -> tuple[float, bool]:
        array, _keep = _messages(messages)
        risk, fired = C.c_float(), C.c_int32()
        self.native.check(self.native.lib.sg_score(self.handle, array, len(messages), C.byref(risk), C.byref(fired)))
        return risk.value, bool(fired.value)

    def generate(self, request: Sequence[dict] | Sequence[int], max_new_tokens: int = 128, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop: Sequence[str] = (), ignore_eos: bool = False,
                 on_token: Callable[[int, str], bool | None] | None = None) -> NativeResult:
        """Answer chat messages (dicts) or chat-formatted token ids; `on_token(token, piece)` returning
        True cancels."""
        stops = (C.c_char_p * max(len(stop), 1))(*[s.encode() for s in stop])
        sampling = _Sampling(max_new_tokens, temperature, top_k, top_p, seed, stops if stop else None, len(stop),
                             int(ignore_eos))

        def callback(token, piece, length, _user):
            return 1 if on_token(token, C.string_at(piece, length).decode(errors="replace")) else 0

        cb = _Callback(callback) if on_token else _Callback()
        result = _Result()
        lib = self.native.lib
        if request and all(isinstance(t, int) for t in request):
            ids = (C.c_int32 * len(request))(*request)
            status = lib.sg_generate_ids(self.handle, ids, len(request), C.byref(sampling), cb, None, C.byref(result))
        else:
            array, _keep = _messages(request)
            status = lib.sg_generate(self.handle, array, len(request), C.byref(sampling), cb, None, C.byref(result))
        self.native.check(status)
        out = NativeResult(
            text=C.string_at(result.text, result.text_length).decode(), token_ids=[result.token_ids[i] for i in range(result.n_tokens)],
            risk=result.risk, fired=bool(result.fired), split_layer=result.split_layer,
            finish_reason=FINISH_REASONS[result.finish_reason], prompt_tokens=result.prompt_tokens,
            prefill_s=result.prefill_seconds, first_token_s=result.first_token_seconds, decode_s=result.decode_seconds,
            tau=result.tau, switch=SWITCH_REASONS[result.switch_reason],
            switch_at=result.switch_at if result.switch_at >= 0 else None,
            answer_score=None if result.answer_score != result.answer_score else result.answer_score,
            dropped_tokens=result.dropped_tokens)
        lib.sg_result_free(C.byref(result))
        return out
