"""Engine backends behind one small interface, so the runtime never cares which one runs a graph.

An `Engine` is one ONNX graph in an onnxruntime session on a chosen backend. The runtime feeds it
through `binding()` (onnxruntime I/O binding), which lets caches and activations stay in
preallocated buffers on the backend's device (`memory.py`). Backends are data: a name, the execution
providers it needs, the device their tensors live on, and what to install when they are missing."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..errors import SteerguardError
from .memory import HOST, Buffer, HostMemory, Memory, OrtMemory, memory_for


@dataclass(frozen=True)
class Backend:
    name: str
    providers: tuple[str, ...]
    install: str
    device: str = "cpu"     # where its tensors live: "cpu" or "cuda"

    def session_providers(self) -> list:
        """The providers as onnxruntime takes them, with their options."""
        return [(p, PROVIDER_OPTIONS[p]) if p in PROVIDER_OPTIONS else p for p in self.providers]


# fp32 engines compute in fp32 on the GPU too: the CUDA provider would otherwise round MatMul inputs to TF32
# (10-bit mantissas), and greedy answers would drift from the CPU's
PROVIDER_OPTIONS = {"CUDAExecutionProvider": {"use_tf32": "0"}}
BACKENDS: dict[str, Backend] = {
    "cpu": Backend("cpu", ("CPUExecutionProvider",), "pip install steerguard"),
    "cuda": Backend("cuda", ("CUDAExecutionProvider", "CPUExecutionProvider"), "pip install 'steerguard[gpu]'", "cuda"),
    "tensorrt": Backend("tensorrt", ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
                        "pip install 'steerguard[tensorrt]'", "cuda"),
}
# onnxruntime's tensor types as numpy's
DTYPES = {"tensor(float)": np.dtype(np.float32), "tensor(float16)": np.dtype(np.float16),
          "tensor(int64)": np.dtype(np.int64), "tensor(int32)": np.dtype(np.int32), "tensor(bool)": np.dtype(np.bool_)}


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
    if backend.device == "cuda":
        _preload_cuda_libraries()
    return backend


def _preload_cuda_libraries() -> None:
    """Load the CUDA and cuDNN libraries from the nvidia-* wheels, where onnxruntime-gpu looks for them only
    when asked (or when torch was imported first); a no-op where they are on the loader's path already."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception:   # the session's own error names what is missing
            pass


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
    """One ONNX graph loaded in an onnxruntime session: a file, or a model's bytes (`graphs.py`)."""

    def __init__(self, name: str, path: Path | bytes, backend: Backend, threads: int | None = None):
        self.name, self.path, self.backend = name, path, backend
        opts = session_options(threads)
        model = path if isinstance(path, bytes) else str(path)
        where = f"engine {name}" if isinstance(path, bytes) else str(path)
        try:
            self.session = ort.InferenceSession(model, opts, providers=backend.session_providers())
        except Exception as e:  # onnxruntime raises several private exception types
            raise SteerguardError(f"{where}: onnxruntime cannot load this engine ({str(e).splitlines()[0][:200]})") from e
        self.seconds = 0.0      # time spent in this engine, for `steerguard bench`
        self.calls = 0
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._types = {v.name: v.type for v in [*self.session.get_inputs(), *self.session.get_outputs()]}
        self._ranks = {v.name: len(v.shape) for v in self.session.get_outputs()}

    def dtype(self, name: str) -> np.dtype:
        """The element type of input or output `name`."""
        kind = self._types[name]
        if kind not in DTYPES:
            raise SteerguardError(f"engine {self.name}: {name} has type {kind}, which the runtime does not bind")
        return DTYPES[kind]

    def rank(self, output: str) -> int:
        """How many dimensions `output` has."""
        return self._ranks[output]

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


__all__ = ["BACKENDS", "DTYPES", "HOST", "PROVIDER_OPTIONS", "Backend", "Buffer", "Engine", "HostMemory", "Memory", "OrtMemory",
           "default_threads", "memory_for", "resolve_backend", "session_options"]
