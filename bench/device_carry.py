#!/usr/bin/env python3
"""Carry what a GPU run needs to the lent H200 (nothing can be downloaded there, one `run` call carries at
most 64 MiB of working tree) in a few consecutive calls, each unpacked into /tmp/sg by
bench/device_unpack.sh. docs/GPU.md, "Bringing onnxruntime-gpu to the H200", has the numbers.

What travels (each stream xz-compressed for the trip, wheels stored uncompressed inside first so xz sees
the raw bytes; cut into chunks across parts of at most --part-mib MiB together with the repository):
  * the onnxruntime-gpu wheel repacked for sm_90 by bench/pack_onnxruntime_gpu.py;
  * the demo model's GGUF (SmolLM2-135M-Instruct.Q4_1, sha256-checked), placed where `steerguard export demo`
    looks with STEERGUARD_CACHE=/tmp/sg/cache, so the export converts it and the guard's model hash matches;
  * the wheels the device lacks for `steerguard export` and the runtime (see `needs`);
  * the guard folder (default runs/serve-demo/guard), at /tmp/sg/guard.

  python bench/device_carry.py needs     # pyproject's requirements against the device's packages
  python bench/device_carry.py plan      # write .device/parts/part1..N (ignored; never commit them)
  python bench/device_carry.py calls     # the `run` calls a GPU session issues, in order
  python bench/device_carry.py smoke     # on the device after the last part: onnxruntime-gpu runs on CUDA
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from steerguard.runtime.manifest import sha256_of

REPO = Path(__file__).resolve().parents[1]
DEVICE_DIR = REPO / ".device"
PARTS = DEVICE_DIR / "parts"
DOWNLOADS = Path.home() / ".cache" / "steerguard" / "device"
MIB = 1 << 20
SG_ROOT = "/tmp/sg"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")

# The device's Python packages (KINDS.md of the device tool: the image's package list, versions where a
# session read them; None: present, version not read).
DEVICE_PACKAGES = {
    "numpy": "2.5.2", "onnxruntime": "1.30.0", "tokenizers": "0.23.2", "jinja2": None, "click": None,
    "tqdm": None, "pillow": None, "torch": "2.11.0", "transformers": "5.17.0", "accelerate": "1.15.0",
    "safetensors": "0.8.0", "matplotlib": None, "scikit-learn": None, "onnx": "1.23.1", "onnxscript": "0.7.2",
    "huggingface-hub": "1.33.0", "regex": None, "packaging": None, "pyyaml": None, "typer": None,
    "requests": None, "flatbuffers": None, "protobuf": None,
}
# Wheels carried beside the repacked onnxruntime-gpu, each at the version installed on this machine (the
# one the tests here ran with), and why.
CARRIED = {
    "transformers": "the export needs >=5.24 (pyproject: `cache=` replaced `past_key_values=`); the device has 5.17",
    "gguf": "the export reads the demo GGUF with it; the device has none",
    "regex": "transformers 5.24 needs regex>=2025.10.22 at import; the device's version was never read",
}
NOT_CARRIED = {
    "torch": "a CUDA torch is GBs; the export runs on the device's torch 2.11 (pyproject pins 2.13 only for this "
             "machine's CPU build)",
    "onnxruntime": "replaced by the repacked onnxruntime-gpu wheel (same module)",
}


class CarryError(Exception):
    """A one-line reason the parts cannot be made."""


# --- what the device lacks ----------------------------------------------------------------------------------

def project_requirements() -> list[str]:
    import tomllib   # Python 3.11+, like the device's 3.12; imported here so the module loads on 3.10

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return project["dependencies"] + project["optional-dependencies"]["export"]


def device_verdict(requirement: str) -> tuple[str, str, str]:
    """(name, what the device has, verdict) for one requirement string."""
    from packaging.requirements import Requirement

    req = Requirement(requirement)
    name = req.name.lower()
    has = DEVICE_PACKAGES[name] if name in DEVICE_PACKAGES else "absent"
    if name in NOT_CARRIED:
        return name, str(has), "not carried: " + NOT_CARRIED[name]
    if name in CARRIED:
        return name, str(has), "carried: " + CARRIED[name]
    if has == "absent":
        return name, has, "MISSING: add it to CARRIED"
    if has is None:
        return name, "present", "ok (version not read; any recent one meets this bound)"
    return name, has, "ok" if req.specifier.contains(has, prereleases=True) else "TOO OLD: add it to CARRIED"


def needs(_args: argparse.Namespace) -> int:
    print("| requirement | device has | verdict |\n|---|---|---|")
    required = set()
    for requirement in project_requirements():
        name, has, verdict = device_verdict(requirement)
        required.add(name)
        print(f"| {requirement} | {has} | {verdict} |")
    for name in sorted(set(CARRIED) - required):
        print(f"| {name} (needed by a carried wheel) | {DEVICE_PACKAGES.get(name) or 'present'} | "
              f"carried: {CARRIED[name]} |")
    return 0


# --- streams ------------------------------------------------------------------------------------------------

@dataclass
class Stream:
    name: str            # file name once unpacked on the device (a wheel keeps its wheel file name)
    action: str          # wheel | file | untar
    dest: str            # under SG_ROOT (file, untar), or "-" (wheel)
    transport: str       # path of the xz file here
    transport_sha256: str
    final_sha256: str    # of the decompressed file
    bytes: int           # transport bytes


def xz_file(src: Path, name: str, cache: Path, prepare=None) -> tuple[Path, str]:
    """`src` (or the variant of it that `prepare` writes) xz-compressed, kept in `cache` under the hash of
    what it holds so that a second plan reuses it. Returns (xz path, sha256 of what it holds)."""
    cache.mkdir(parents=True, exist_ok=True)
    plain = src
    if prepare is not None:
        plain = cache / f"{name}.plain"
        prepare(src, plain)
    final = sha256_of(plain)
    out = cache / f"{name}.{final[:16]}.xz"
    if not out.exists():
        started = time.perf_counter()
        partial = out.with_suffix(".partial")
        with open(plain, "rb") as f, lzma.open(partial, "wb", preset=9) as z:
            shutil.copyfileobj(f, z, 4 * MIB)
        partial.replace(out)
        print(f"  xz {name}: {plain.stat().st_size / MIB:.1f} -> {out.stat().st_size / MIB:.1f} MiB "
              f"in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    if plain != src:
        plain.unlink()
    return out, final


def stored_wheel(src: Path, out: Path) -> None:
    """The same wheel with every member stored uncompressed (pip installs it alike; xz compresses it far
    better), smallest first: onnxruntime's two ~30 MB builds of its core (libonnxruntime.so and the Python
    module) then lie side by side, inside xz's 64 MiB window, and the second costs little."""
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as b:
        for info in sorted(a.infolist(), key=lambda i: (i.file_size, i.filename)):
            copy = zipfile.ZipInfo(info.filename, info.date_time)
            copy.external_attr = info.external_attr
            b.writestr(copy, a.read(info))


def guard_tar(src: Path, out: Path) -> None:
    with tarfile.open(out, "w") as t:
        for p in sorted(src.iterdir()):
            t.add(p, arcname=p.name, recursive=False)


def stream(src: Path, action: str, dest: str, cache: Path, name: str | None = None, prepare=None) -> Stream:
    name = name or src.name
    transport, final = xz_file(src, name, cache, prepare)
    return Stream(name, action, dest, str(transport), sha256_of(transport), final, transport.stat().st_size)


def download_wheel(requirement: str, python: str) -> Path:
    DOWNLOADS.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version",
           python, "--implementation", "cp", "-d", str(DOWNLOADS), *[a for p in PLATFORMS for a in ("--platform", p)]]
    done = subprocess.run(cmd + [requirement], capture_output=True, text=True)
    name, version = requirement.split("==")
    wheels = [w for w in DOWNLOADS.glob(f"{name.replace('-', '_')}-{version}-*.whl") if _fits(w.name, python)]
    if done.returncode != 0 or not wheels:
        raise CarryError(f"pip could not download {requirement} for Python {python}")
    return wheels[0]


def _fits(wheel_name: str, python: str) -> bool:
    tag = wheel_name.split("-")[2]
    return tag.startswith("py3") or tag == "cp" + python.replace(".", "")


def carried_wheels(python: str) -> list[Path]:
    wheels = []
    for name in CARRIED:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            raise CarryError(f"{name} is not installed here; pip install -e '.[export]' first") from None
        wheels.append(download_wheel(f"{name}=={version}", python))
    return wheels


def ort_wheel(path: Path | None, python: str) -> Path:
    if path is not None:
        if not path.is_file():
            raise CarryError(f"{path} does not exist")
        return path
    tag = "cp" + python.replace(".", "")
    found = sorted((DEVICE_DIR / "wheels").glob(f"onnxruntime_gpu-*-{tag}-*.whl"))
    if not found:
        raise CarryError(f"no repacked onnxruntime-gpu wheel for {tag} in .device/wheels: "
                         f"run python bench/pack_onnxruntime_gpu.py --python {python}")
    return found[-1]


def demo_gguf(path: Path) -> Path:
    if not path.is_file():
        raise CarryError(f"{path} does not exist: run `steerguard export demo` once, or give --gguf")
    if sha256_of(path) != GGUF_SHA256:
        raise CarryError(f"{path} is not the demo GGUF (sha256 differs from {GGUF_SHA256[:12]}...)")
    return path


def build_streams(args: argparse.Namespace) -> list[Stream]:
    """Check every input first (compressing takes minutes), then compress each for the trip."""
    if not (args.guard / "guard.json").is_file():
        raise CarryError(f"{args.guard} is not a guard folder (no guard.json)")
    gguf, ort, wheels = demo_gguf(args.gguf), ort_wheel(args.wheel, args.python), carried_wheels(args.python)
    cache = transport_dir(args.out)
    streams = [stream(args.guard, "untar", "guard", cache, "guard.tar", prepare=guard_tar)]
    streams += [stream(w, "wheel", "-", cache, prepare=stored_wheel) for w in wheels]
    streams.append(stream(ort, "wheel", "-", cache, prepare=stored_wheel))
    streams.append(stream(gguf, "file", f"cache/downloads/{GGUF_NAME}", cache))
    prune_transport(streams, cache)
    return streams


def transport_dir(parts: Path) -> Path:
    """Where the xz streams of a plan writing `parts` are kept (.device/transport for .device/parts)."""
    return parts.parent / "transport"


def prune_transport(streams: list[Stream], cache: Path) -> None:
    """Drop compressed streams an earlier plan made that this one no longer carries."""
    keep = {Path(s.transport).name for s in streams}
    for stale in cache.glob("*.xz"):
        if stale.name not in keep:
            stale.unlink()


# --- parts --------------------------------------------------------------------------------------------------

def repo_travel_bytes() -> int:
    """What every call carries besides its part: tracked files and untracked files git does not ignore."""
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True).stdout.split(b"\0")
    paths = {REPO / os.fsdecode(p) for p in listed if p}
    return sum(p.lstat().st_size for p in paths if p.is_symlink() or p.is_file())


@dataclass
class Chunk:
    stream: str
    index: int           # 1-based
    start: int
    size: int


def fill_parts(streams: list[Stream], budget: int) -> list[list[Chunk]]:
    """Streams in order, cut wherever a part is full: the fewest parts for the total."""
    parts: list[list[Chunk]] = [[]]
    room = budget
    for s in streams:
        start, index = 0, 0
        while start < s.bytes:
            if room == 0:
                parts.append([])
                room = budget
            index += 1
            size = min(room, s.bytes - start)
            parts[-1].append(Chunk(s.name, index, start, size))
            start += size
            room -= size
    return parts


def chunk_file_name(chunk: Chunk) -> str:
    return f"{chunk.stream}.xz.{chunk.index:03d}"


def write_parts(parts: list[list[Chunk]], streams: list[Stream], out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    by_name = {s.name: s for s in streams}
    counts = {s.name: sum(c.stream == s.name for p in parts for c in p) for s in streams}
    table = "".join(f"{s.name} {counts[s.name]} {s.transport_sha256} {s.final_sha256} {s.action} {s.dest}\n"
                    for s in streams)
    for k, chunks in enumerate(parts, start=1):
        folder = out / f"part{k}"
        folder.mkdir(parents=True)
        sums = []
        for c in chunks:
            with open(by_name[c.stream].transport, "rb") as f:
                f.seek(c.start)
                data = f.read(c.size)
            (folder / chunk_file_name(c)).write_bytes(data)
            sums.append(f"{hashlib.sha256(data).hexdigest()}  {chunk_file_name(c)}\n")
        (folder / "SHA256SUMS").write_text("".join(sums))
        (folder / "STREAMS").write_text(table)
        (folder / "INFO").write_text(f"{k} {len(parts)}\n")


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir())


def plan(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    streams = build_streams(args)
    repo = repo_travel_bytes()
    budget = int(args.part_mib * MIB) - repo - 64 * 1024        # 64 KiB for the manifests
    if budget < 8 * MIB:
        raise CarryError(f"the repository alone carries {repo / MIB:.1f} MiB: too little room left under "
                         f"{args.part_mib} MiB")
    parts = fill_parts(streams, budget)
    write_parts(parts, streams, args.out)
    sizes = [folder_bytes(args.out / f"part{k}") for k in range(1, len(parts) + 1)]
    (args.out / "PLAN.json").write_text(json.dumps({
        "repo_bytes": repo, "part_limit_mib": args.part_mib, "parts": len(parts), "part_bytes": sizes,
        "streams": [asdict(s) for s in streams], "made": time.strftime("%Y-%m-%d %H:%M")}, indent=1) + "\n")
    print_plan(streams, parts, sizes, repo, time.perf_counter() - started)
    return 0


def print_plan(streams: list[Stream], parts: list[list[Chunk]], sizes: list[int], repo: int, seconds: float) -> None:
    print("| stream | unpacks to | xz MiB | chunks |\n|---|---|---|---|")
    for s in streams:
        where = "/tmp/sg/site (pip)" if s.action == "wheel" else f"/tmp/sg/{s.dest}"
        n = sum(c.stream == s.name for p in parts for c in p)
        print(f"| {s.name} | {where} | {s.bytes / MIB:.1f} | {n} |")
    print(f"\nrepository travelling with every call: {repo / MIB:.2f} MiB")
    for k, size in enumerate(sizes, start=1):
        print(f"part{k}: {size / MIB:.1f} MiB + repository = {(size + repo) / MIB:.1f} MiB")
    print(f"made in {seconds:.0f} s; next: python bench/device_carry.py calls")


# --- the calls ----------------------------------------------------------------------------------------------

def calls(args: argparse.Namespace) -> int:
    plan_file = args.out / "PLAN.json"
    if not plan_file.is_file():
        raise CarryError(f"no plan in {args.out}: run python bench/device_carry.py plan")
    info = json.loads(plan_file.read_text())
    repo, n = repo_travel_bytes(), info["parts"]
    sequence = []
    for k in range(1, n + 1):
        travel = (info["part_bytes"][k - 1] + repo) / MIB
        if travel > 64:
            raise CarryError(f"part{k} with today's repository is {travel:.1f} MiB, over the 64 MiB limit: plan again")
        command = f"bash bench/device_unpack.sh {k}"
        if k == n:
            command += f" && source {SG_ROOT}/env.sh && {args.then}"
        if len(command) > 2000:
            raise CarryError("the last command is over 2000 characters: shorten --then")
        carry = [carry_path(args.out / f"part{k}")]
        sequence.append({"command": command, "carry": carry, "timeout_s": 600 if k == n else 180,
                         "travels_mib": round(travel, 1)})
    if args.json:
        print(json.dumps(sequence, indent=1))
    else:
        print_calls(sequence)
    return 0


def carry_path(folder: Path) -> str:
    try:
        return str(folder.resolve().relative_to(REPO))
    except ValueError:
        raise CarryError(f"{folder} is outside the repository: `run` carries only paths inside it") from None


def print_calls(sequence: list[dict]) -> None:
    print(f"{len(sequence)} `run` calls, back to back (the machine goes back 30 s after each; a bare one "
          "makes device_unpack.sh stop with a line saying to start again at part 1):")
    for k, call in enumerate(sequence, start=1):
        print(f"  {k}. run(command={call['command']!r}, carry={call['carry']}, timeout_s={call['timeout_s']})"
              f"   # {call['travels_mib']} MiB travel")
    print("estimated device time for the transfers: a start of 60-120 s, then about 10-20 s a call to send and "
          "unpack a part, plus 5-10 s for the CUDA smoke test; the last command's own time on top")


# --- on the device ------------------------------------------------------------------------------------------

def smoke_model(path: Path) -> None:
    """fp32 MatMul + Add + LayerNormalization + Softmax, a Conv (cuDNN), and an fp16 MatMul between Casts."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = {"W": (64, 128), "b": (128,), "g": (128,), "K": (8, 1, 3, 3), "W16": (128, 32)}
    init = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32) * 0.1, n) for n, s in weights.items()]
    init[-1] = numpy_helper.from_array(numpy_helper.to_array(init[-1]).astype(np.float16), "W16")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "b"], ["a"]),
             helper.make_node("LayerNormalization", ["a", "g"], ["n"], axis=-1),
             helper.make_node("Softmax", ["n"], ["y"], axis=-1),
             helper.make_node("Cast", ["a"], ["a16"], to=TensorProto.FLOAT16),
             helper.make_node("MatMul", ["a16", "W16"], ["m16"]),
             helper.make_node("Cast", ["m16"], ["z"], to=TensorProto.FLOAT),
             helper.make_node("Conv", ["img", "K"], ["c"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "smoke",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, 64]),
                               helper.make_tensor_value_info("img", TensorProto.FLOAT, [2, 1, 32, 32])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "z", "c")],
                              init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


def run_smoke(path: Path, provider: str) -> list:
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    if provider != "CPUExecutionProvider":
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")   # every node on the GPU
    session = ort.InferenceSession(str(path), options, providers=[provider])
    if session.get_providers()[0] != provider:
        raise CarryError(f"the session fell back to {session.get_providers()} instead of {provider}")
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((16, 64)).astype(np.float32),
             "img": rng.standard_normal((2, 1, 32, 32)).astype(np.float32)}
    return session.run(None, feeds)


def smoke(args: argparse.Namespace) -> int:
    import numpy as np
    import onnxruntime as ort

    root = Path(os.environ.get("SG_ROOT", SG_ROOT))
    print(f"onnxruntime {ort.__version__} from {Path(ort.__file__).parent}")
    if root / "site" not in Path(ort.__file__).parents:
        raise CarryError(f"onnxruntime was imported from outside {root}/site: is PYTHONPATH set (source env.sh)?")
    import transformers

    importlib.import_module("gguf")          # the export's GGUF reader

    print(f"transformers {transformers.__version__} from {Path(transformers.__file__).parent}, "
          f"gguf {importlib.metadata.version('gguf')}, regex {importlib.metadata.version('regex')}")
    providers = ort.get_available_providers()
    print(f"available providers: {providers}")
    path = root / "smoke.onnx"
    smoke_model(path)
    cpu = run_smoke(path, "CPUExecutionProvider")
    if "CUDAExecutionProvider" not in providers:
        raise CarryError("this onnxruntime has no CUDAExecutionProvider")
    if args.cpu_only:
        print("smoke: CPU provider ran; CUDA skipped (--cpu-only)")
        return 0
    started = time.perf_counter()
    gpu = run_smoke(path, "CUDAExecutionProvider")
    diffs = [float(np.abs(a - b).max()) for a, b in zip(cpu, gpu)]
    print(f"CUDA session and run in {time.perf_counter() - started:.1f} s; max |CUDA - CPU| per output "
          f"(softmax, fp16 matmul, conv): {', '.join(f'{d:.2e}' for d in diffs)}")
    if max(diffs) > 2e-2:
        raise CarryError("CUDA results differ from the CPU's beyond fp16 rounding")
    print("smoke: ok, every node ran on CUDAExecutionProvider")
    return 0


# --- command line -------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("needs", help="pyproject's runtime and export requirements against the device's packages")
    pl = sub.add_parser("plan", help="write the parts under .device/parts")
    pl.add_argument("--wheel", type=Path, help="the repacked onnxruntime-gpu wheel (default: .device/wheels/*cp312*)")
    pl.add_argument("--gguf", type=Path, default=Path.home() / ".cache" / "steerguard" / "downloads" / GGUF_NAME,
                    help="the demo model's GGUF (default: where `steerguard export demo` keeps it)")
    pl.add_argument("--guard", type=Path, default=REPO / "runs" / "serve-demo" / "guard",
                    help="the guard folder to carry (default runs/serve-demo/guard)")
    pl.add_argument("--python", default="3.12", help="CPython version of the carried binary wheels (device: 3.12)")
    pl.add_argument("--part-mib", type=float, default=60.0,
                    help="most MiB one call carries, repository included (the limit is 64; default 60)")
    pl.add_argument("--out", type=Path, default=PARTS, help="where the parts go (default .device/parts)")
    ca = sub.add_parser("calls", help="print the `run` calls for the parts, in order")
    ca.add_argument("--out", type=Path, default=PARTS, help="where the parts are (default .device/parts)")
    ca.add_argument("--then", default="bash bench/device.sh",
                    help="what the last call runs once everything is in place (default: bash bench/device.sh)")
    ca.add_argument("--json", action="store_true", help="the calls as JSON")
    sm = sub.add_parser("smoke", help="on the device: onnxruntime-gpu from /tmp/sg/site runs a small graph on CUDA")
    sm.add_argument("--cpu-only", action="store_true", help="check the import and the CPU provider only")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    handlers = {"needs": needs, "plan": plan, "calls": calls, "smoke": smoke}
    try:
        return handlers[args.command](args)
    except (CarryError, OSError, ImportError, subprocess.CalledProcessError, zipfile.BadZipFile) as e:
        print(f"device_carry: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
