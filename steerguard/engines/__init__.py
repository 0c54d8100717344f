"""Engine backends behind one small interface, so the runtime never cares which one runs a graph.

An `Engine` is one ONNX graph in an onnxruntime session on a chosen backend. The runtime feeds it
through `binding()` (onnxruntime I/O binding), which lets caches and activations stay in
preallocated buffers. Backends are data: a name, the execution providers it needs, and what to
install when they are missing."""

from __future__ import annotations

import os
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


class Engine:
    """One ONNX graph loaded in an onnxruntime session."""

    def __init__(self, name: str, path: Path, backend: Backend, threads: int | None = None):
        self.name, self.path, self.backend = name, path, backend
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or default_threads()
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # The chain runs engines back to back: a session whose threads spin after its run would steal
        # the cores the next engine needs.
        opts.add_session_config_entry("session.intra_op.allow_spinning", os.environ.get("STEERGUARD_SPIN", "0"))
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=list(backend.providers))
        except Exception as e:  # onnxruntime raises several private exception types
            raise SteerguardError(f"{path}: onnxruntime cannot load this engine ({str(e).splitlines()[0][:200]})") from e
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict, outputs: list[str] | None = None) -> dict:
        """Plain run: numpy in, numpy out."""
        names = outputs or self.output_names
        return dict(zip(names, self.session.run(names, feeds)))

    def binding(self) -> ort.IOBinding:
        return self.session.io_binding()

    def run_binding(self, binding: ort.IOBinding) -> None:
        self.session.run_with_iobinding(binding)
