"""TensorRT plans stored in a bundle, keyed by the GPU, its compute capability and the TensorRT version.

A plan is only valid for the exact GPU model and TensorRT build that made it. `bundle/trt/` holds one
folder per key with the plans and an `index.json` recording each plan's engine, source ONNX sha256
and plan sha256. `find_plans` returns the plans for the running device or says exactly why there are
none: never built, built for another GPU or TensorRT version (listed), built from other ONNX files,
or corrupt (sha256 mismatch)."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import SteerguardError
from ..runtime.manifest import sha256_of

INDEX = "index.json"


@dataclass(frozen=True)
class PlanKey:
    gpu: str                 # e.g. "NVIDIA H100 80GB HBM3", "Orin"
    compute_capability: str  # e.g. "9.0", "8.7"
    tensorrt: str            # e.g. "10.7.0"

    @property
    def folder(self) -> str:
        gpu = re.sub(r"[^A-Za-z0-9]+", "-", self.gpu).strip("-")
        return f"{gpu}_sm{self.compute_capability.replace('.', '')}_trt{self.tensorrt}"

    def describe(self) -> str:
        return f"{self.gpu} (compute {self.compute_capability}), TensorRT {self.tensorrt}"


@dataclass
class PlanSet:
    key: PlanKey
    folder: Path
    plans: dict[str, Path]   # engine name -> plan file


def write_index(folder: Path, key: PlanKey, plans: dict[str, tuple[Path, str]]) -> None:
    """Record `plans` (engine name -> (plan file, sha256 of the ONNX it was built from)) under `folder`."""
    entries = {name: {"file": p.name, "sha256": sha256_of(p), "onnx_sha256": onnx_sha}
               for name, (p, onnx_sha) in plans.items()}
    (folder / INDEX).write_text(json.dumps({"key": asdict(key), "plans": entries}, indent=1))


def find_plans(bundle: Path, key: PlanKey, onnx_sha256: dict[str, str]) -> PlanSet:
    """The plans for `key`, every one verified; a SteerguardError saying why when they cannot be used."""
    trt = bundle / "trt"
    folder = trt / key.folder
    index = folder / INDEX
    if not index.exists():
        others = []
        for i in sorted(trt.glob(f"*/{INDEX}")) if trt.is_dir() else []:
            try:
                others.append(PlanKey(**json.loads(i.read_text())["key"]).describe())
            except (ValueError, KeyError, TypeError):
                others.append(f"{i.parent.name} (unreadable index)")
        where = f"; plans exist only for {', '.join(others)}" if others else ""
        raise SteerguardError(f"{bundle}: no TensorRT plans for {key.describe()}{where}; "
                              f"build them on this device with `steerguard build-trt {bundle}`")
    try:
        data = json.loads(index.read_text())
        recorded = PlanKey(**data["key"])
        entries = data["plans"]
    except (ValueError, KeyError, TypeError) as e:
        raise SteerguardError(f"{index}: corrupt plan index ({e}); rebuild with `steerguard build-trt --force`") from e
    if recorded != key:
        raise SteerguardError(f"{index}: plans were built for {recorded.describe()}, not {key.describe()}; "
                              "rebuild with `steerguard build-trt --force`")
    plans = {}
    for name, e in entries.items():
        p = folder / e["file"]
        if name not in onnx_sha256 or e.get("onnx_sha256") != onnx_sha256[name]:
            raise SteerguardError(f"{p}: built from another version of engine {name!r}; "
                                  "rebuild with `steerguard build-trt --force`")
        if not p.is_file() or sha256_of(p) != e.get("sha256"):
            raise SteerguardError(f"{p}: missing or corrupt TensorRT plan (sha256 mismatch); "
                                  "rebuild with `steerguard build-trt --force`")
        plans[name] = p
    return PlanSet(key, folder, plans)


def current_key() -> PlanKey:
    """The running GPU and TensorRT, or a clear error naming what is missing."""
    try:
        import tensorrt
    except ImportError as e:
        raise SteerguardError("TensorRT is not installed: pip install 'steerguard[tensorrt]' (on Jetson, use "
                              "JetPack's TensorRT Python wheel)") from e
    try:
        from cuda.bindings import runtime as cudart   # cuda-python
    except ImportError:
        try:
            from cuda import cudart
        except ImportError as e:
            raise SteerguardError("cuda-python is not installed: pip install 'steerguard[tensorrt]'") from e
    err, props = cudart.cudaGetDeviceProperties(0)
    if int(err) != 0:
        raise SteerguardError(f"no CUDA GPU available (cudaGetDeviceProperties: error {int(err)})")
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return PlanKey(name.strip("\x00").strip(), f"{props.major}.{props.minor}", tensorrt.__version__)
