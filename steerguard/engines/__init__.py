"""Engine backends behind one small interface, so the runtime never cares which one runs a graph.

An `Engine` is one ONNX graph in an onnxruntime session on a chosen backend. The runtime feeds it
through `binding()` (onnxruntime I/O binding), which lets caches and activations stay in
preallocated buffers. Backends are data: a name, the execution providers it needs, and what to
install when they are missing."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from ..errors import SteerguardError


@dataclass(frozen=True)
class Backend:
    name: str
    providers: tuple[str, ...]
    install: str


BACKENDS: dict[str, Backend] = {
    "cpu": Backend("cpu", ("CPUExecutionProvider",), "pip install steerguard"),
    "cuda": Backend("cuda", ("CUDAExecutionProvider", "CPUExecutionProvider"), "pip install 'steerguard[gpu]'"),
    "tensorrt": Backend("tensorrt", ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
                        "pip install 'steerguard[tensorrt]'"),
}


def resolve_backend(name: str, fallback_to_cpu: bool = False) -> Backend:
    """The backend called `name`, checked against what this onnxruntime build offers."""
    if name not in BACKENDS:
        raise SteerguardError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    backend = BACKENDS[name]
    available = set(ort.get_available_providers())
    missing = [p for p in backend.providers[:1] if p not in available]
    if missing:
        if fallback_to_cpu:
            return BACKENDS["cpu"]
        raise SteerguardError(f"backend {name!r} needs onnxruntime's {missing[0]}, which this onnxruntime "
                              f"({ort.__version__}) does not have; {backend.install}, or use --backend cpu")
    return backend


def default_threads() -> int:
    """Intra-op threads: STEERGUARD_THREADS, else all cores."""
    value = os.environ.get("STEERGUARD_THREADS")
    return int(value) if value else (os.cpu_count() or 1)


_pool_threads: int | None = None   # size of the process-wide pool once made; -1 when sessions own theirs


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """Options for every onnxruntime session in a process that runs steerguard engines.

    By default all sessions share one process-wide intra-op pool, made when the first engine loads: the
    chain runs engines back to back, and per-session pools either spin against each other on a few cores
    or (spinning off) pay a wake-up per operator, 10-15% of decode speed on 2 cores. onnxruntime then
    requires every later session in the process to use it, hence this function for any other session an
    application makes. STEERGUARD_POOL=own gives each session its own pool instead (set it before loading)."""
    global _pool_threads
    threads = threads or default_threads()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if _pool_threads is None:
        _pool_threads = -1
        if os.environ.get("STEERGUARD_POOL", "shared") == "shared":
            try:
                from onnxruntime.capi import _pybind_state

                _pybind_state.set_global_thread_pool_sizes(threads, 1)
                _pool_threads = threads
            except Exception:   # not offered by this onnxruntime build, or a session already exists
                pass
    if _pool_threads > 0:
        opts.use_per_session_threads = False
    else:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


class Engine:
    """One ONNX graph loaded in an onnxruntime session."""

    def __init__(self, name: str, path: Path, backend: Backend, threads: int | None = None):
        self.name, self.path, self.backend = name, path, backend
        opts = session_options(threads)
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=list(backend.providers))
        except Exception as e:  # onnxruntime raises several private exception types
            raise SteerguardError(f"{path}: onnxruntime cannot load this engine ({str(e).splitlines()[0][:200]})") from e
        self.seconds = 0.0      # time spent in this engine, for `steerguard bench`
        self.calls = 0
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict, outputs: list[str] | None = None) -> dict:
        """Plain run: numpy in, numpy out."""
        names = outputs or self.output_names
        t = time.perf_counter()
        values = self.session.run(names, feeds)
        self._count(t)
        return dict(zip(names, values))

    def _count(self, start: float) -> None:
        self.seconds += time.perf_counter() - start
        self.calls += 1

    def binding(self) -> ort.IOBinding:
        return self.session.io_binding()

    def run_binding(self, binding: ort.IOBinding) -> None:
        t = time.perf_counter()
        self.session.run_with_iobinding(binding)
        self._count(t)
