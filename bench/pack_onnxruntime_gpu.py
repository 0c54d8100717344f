#!/usr/bin/env python3
"""Shrink the onnxruntime-gpu wheel for one GPU generation, so that it can be carried to a machine that
receives at most 64 MiB per command (the lent H200: docs/GPU.md, "Bringing onnxruntime-gpu to the H200").

The wheel's CUDA provider library embeds GPU code for many architectures in its ELF section `.nv_fatbin`:
a run of fatbin containers (magic 0xBA55ED50), each holding entries (a header giving the kind, PTX or ELF
cubin, the payload size and the sm architecture, then the payload). Every payload the target GPU cannot use
is overwritten with zeros in place (sizes and offsets unchanged, so the library loads as before) and the
zeros compress away when the wheel is zipped again:

  * a container with a cubin for the kept architecture (sm_90) keeps only that cubin;
  * a container without one keeps the newest PTX the kept architecture can JIT (arch <= 90), if any;
    this is code the GPU could otherwise not run, so it must stay;
  * everything else (cubins for other architectures, PTX beside a kept cubin) is zeroed.

Then the wheel's RECORD is rewritten with the new hashes and the wheel re-zipped with maximum deflate, under
the same file name in an ignored folder (.device/wheels/). Never commit it.

  python bench/pack_onnxruntime_gpu.py                     # 1.31.1 for CPython 3.12, sm_90
  python bench/pack_onnxruntime_gpu.py --python 3.11       # the build this machine can import (a CPU test)
  python bench/pack_onnxruntime_gpu.py --split-mib 50      # also cut it into numbered chunks
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import struct
import subprocess
import sys
import time
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from steerguard.runtime.manifest import sha256_of

REPO = Path(__file__).resolve().parents[1]
DOWNLOADS = Path.home() / ".cache" / "steerguard" / "device"
OUT = REPO / ".device" / "wheels"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
CUDA_13_LIBS = ("libcublas.so.13", "libcudart.so.13")
MIB = 1 << 20

FATBIN_MAGIC = 0xBA55ED50
KIND_PTX, KIND_ELF = 1, 2
KIND_NAMES = {KIND_PTX: "PTX", KIND_ELF: "ELF"}
CONTAINER = struct.Struct("<IHHQ")           # magic, version, header size, size of the entries after it
ENTRY = struct.Struct("<HHIQIIHHIIIQ")       # kind, ?, header size, payload size, compressed size, ?,
                                             # minor, major, arch, name offset, name length, flags


class PackError(Exception):
    """A one-line reason the wheel or library cannot be packed."""


# --- ELF --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Section:
    name: str
    offset: int
    size: int
    link: int


def elf_sections(data: bytes | bytearray, what: str = "file") -> list[Section]:
    """The section headers of a little-endian ELF64 file."""
    if len(data) < 64 or data[:4] != b"\x7fELF":
        raise PackError(f"{what} is not an ELF file")
    if data[4] != 2 or data[5] != 1:
        raise PackError(f"{what} is not a little-endian 64-bit ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    if shoff + shnum * shentsize > len(data) or shstrndx >= shnum:
        raise PackError(f"{what}: section headers lie outside the file")
    raw = [struct.unpack_from("<IIQQQQI", data, shoff + i * shentsize) for i in range(shnum)]
    names_at = raw[shstrndx][4]
    return [Section(_c_string(data, names_at + r[0]), r[4], r[5], r[6]) for r in raw]


def _c_string(data: bytes | bytearray, at: int) -> str:
    end = data.index(b"\0", at)
    return bytes(data[at:end]).decode("ascii", "replace")


def find_section(data: bytes | bytearray, name: str, what: str = "file") -> Section:
    for s in elf_sections(data, what):
        if s.name == name:
            if s.offset + s.size > len(data):
                raise PackError(f"{what}: section {name} runs past the end of the file")
            return s
    raise PackError(f"{what} has no {name} section")


def needed_libraries(data: bytes | bytearray, what: str = "file") -> list[str]:
    """DT_NEEDED entries of the dynamic section: the shared libraries the loader must find."""
    sections = elf_sections(data, what)
    dynamic = next((s for s in sections if s.name == ".dynamic"), None)
    if dynamic is None:
        return []
    strings = sections[dynamic.link].offset
    needed = []
    for at in range(dynamic.offset, dynamic.offset + dynamic.size, 16):
        tag, value = struct.unpack_from("<qQ", data, at)
        if tag == 0:
            break
        if tag == 1:
            needed.append(_c_string(data, strings + value))
    return needed


# --- fatbin -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    offset: int          # of the entry header, in the file
    header_size: int
    kind: int
    arch: int
    size: int            # payload bytes after the header
    flags: int

    @property
    def payload(self) -> slice:
        start = self.offset + self.header_size
        return slice(start, start + self.size)

    @property
    def label(self) -> str:
        return f"{KIND_NAMES.get(self.kind, f'kind{self.kind}')} sm_{self.arch}"


@dataclass
class Container:
    offset: int
    end: int             # one past its last entry's payload
    entries: list[Entry] = field(default_factory=list)


def fatbin_containers(data: bytes | bytearray, what: str = "file") -> list[Container]:
    """Walk `.nv_fatbin`: containers back to back (zero padding allowed between them)."""
    section = find_section(data, ".nv_fatbin", what)
    pos, end = section.offset, section.offset + section.size
    containers = []
    while pos < end:
        if data[pos] == 0:               # alignment padding
            pos += 1
            continue
        containers.append(_read_container(data, pos, end, what))
        pos = containers[-1].end
    if not containers:
        raise PackError(f"{what}: .nv_fatbin holds no fatbin container")
    return containers


def _read_container(data: bytes | bytearray, pos: int, end: int, what: str) -> Container:
    if pos + CONTAINER.size > end:
        raise PackError(f"{what}: truncated fatbin container at offset {pos:#x}")
    magic, _version, header_size, body = CONTAINER.unpack_from(data, pos)
    if magic != FATBIN_MAGIC:
        raise PackError(f"{what}: no fatbin magic at offset {pos:#x} (found {magic:#010x})")
    at, stop = pos + header_size, pos + header_size + body
    container = Container(pos, stop)
    if stop > end:
        raise PackError(f"{what}: fatbin container at {pos:#x} runs past .nv_fatbin")
    while at < stop:
        entry = _read_entry(data, at, stop, what)
        container.entries.append(entry)
        at = entry.payload.stop
    if at != stop:
        raise PackError(f"{what}: fatbin entries at {pos:#x} overrun their container")
    return container


def _read_entry(data: bytes | bytearray, at: int, stop: int, what: str) -> Entry:
    if at + ENTRY.size > stop:
        raise PackError(f"{what}: truncated fatbin entry header at offset {at:#x}")
    kind, _, header_size, size, _, _, _, _, arch, _, _, flags = ENTRY.unpack_from(data, at)
    if header_size < ENTRY.size or at + header_size + size > stop:
        raise PackError(f"{what}: malformed fatbin entry at offset {at:#x}")
    return Entry(at, header_size, kind, arch, size, flags)


def entries_to_keep(container: Container, arch: int) -> set[Entry]:
    """What a GPU of `arch` can run from this container: its cubin, else the newest PTX it can JIT."""
    cubins = {e for e in container.entries if e.kind == KIND_ELF and e.arch == arch}
    if cubins:
        return cubins
    ptx = [e for e in container.entries if e.kind == KIND_PTX and e.arch <= arch]
    return {max(ptx, key=lambda e: e.arch)} if ptx else set()


@dataclass
class BlankReport:
    before: Counter = field(default_factory=Counter)        # label -> entries
    kept: Counter = field(default_factory=Counter)
    bytes_before: Counter = field(default_factory=Counter)
    bytes_blanked: Counter = field(default_factory=Counter)
    containers: int = 0
    unusable: int = 0        # containers with nothing the kept architecture can run (all blanked)
    ptx_kept: int = 0        # containers whose only usable code is PTX

    def add(self, other: "BlankReport") -> None:
        for name in ("before", "kept", "bytes_before", "bytes_blanked"):
            getattr(self, name).update(getattr(other, name))
        self.containers += other.containers
        self.unusable += other.unusable
        self.ptx_kept += other.ptx_kept


def blank_fatbin(data: bytearray, arch: int = 90, what: str = "file") -> BlankReport:
    """Zero, in place, every payload in `.nv_fatbin` a GPU of `arch` cannot use; the size never changes."""
    report = BlankReport()
    for container in fatbin_containers(data, what):
        keep = entries_to_keep(container, arch)
        report.containers += 1
        report.unusable += not keep
        report.ptx_kept += any(e.kind == KIND_PTX for e in keep)
        for e in container.entries:
            report.before[e.label] += 1
            report.bytes_before[e.label] += e.size
            if e in keep:
                report.kept[e.label] += 1
            else:
                data[e.payload] = bytes(e.size)
                report.bytes_blanked[e.label] += e.size
    return report


def blank_file(path: Path, arch: int = 90) -> BlankReport:
    """`blank_fatbin` on a file on disk (rewritten in place, same size)."""
    data = bytearray(path.read_bytes())
    report = blank_fatbin(data, arch, str(path))
    path.write_bytes(data)
    return report


# --- wheel ------------------------------------------------------------------------------------------------

def download(version: str, python: str, dest: Path = DOWNLOADS) -> Path:
    """The onnxruntime-gpu wheel for CPython `python` on x86-64 Linux, fetched once with pip."""
    tag = "cp" + python.replace(".", "")
    found = sorted(dest.glob(f"onnxruntime_gpu-{version}-{tag}-{tag}-*x86_64.whl"))
    if found:
        return found[-1]
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--python-version", python, "--implementation", "cp", "-d", str(dest)]
    cmd += [arg for p in PLATFORMS for arg in ("--platform", p)]
    if subprocess.run(cmd + [f"onnxruntime-gpu=={version}"], capture_output=True).returncode != 0:
        raise PackError(f"pip could not download onnxruntime-gpu=={version} for Python {python}")
    found = sorted(dest.glob(f"onnxruntime_gpu-{version}-{tag}-{tag}-*x86_64.whl"))
    if not found:
        raise PackError(f"pip downloaded no onnxruntime-gpu {version} wheel for {tag} into {dest}")
    return found[-1]


def is_shared_library(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return base.endswith(".so") or ".so." in base


def check_cuda_13(zf: zipfile.ZipFile, wheel: Path) -> list[str]:
    """The CUDA provider's needed libraries, refusing a build that is not for CUDA 13."""
    member = next((n for n in zf.namelist() if n.endswith("/libonnxruntime_providers_cuda.so")), None)
    if member is None:
        raise PackError(f"{wheel.name} has no libonnxruntime_providers_cuda.so (not an onnxruntime-gpu wheel?)")
    needed = needed_libraries(zf.read(member), member)
    missing = [lib for lib in CUDA_13_LIBS if lib not in needed]
    if missing:
        raise PackError(f"{wheel.name}: its CUDA provider does not link {', '.join(missing)}; not a CUDA 13 build")
    return needed


def record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def repack(wheel: Path, out: Path, arch: int) -> BlankReport:
    """Write `out`: `wheel` with every fatbin blanked for `arch`, a fresh RECORD, deflate level 9."""
    total, records = BlankReport(), []
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        check_cuda_13(src, wheel)
        record_name = next((n for n in src.namelist() if n.endswith(".dist-info/RECORD")), None)
        if record_name is None:
            raise PackError(f"{wheel.name} has no .dist-info/RECORD")
        for info in src.infolist():
            if info.filename == record_name:
                continue
            data = src.read(info)
            if is_shared_library(info.filename) and _has_fatbin(data):
                buf = bytearray(data)
                total.add(blank_fatbin(buf, arch, info.filename))
                data = bytes(buf)
            dst.writestr(_copy_info(info), data)
            records.append(record_line(info.filename, data))
        records.append(f"{record_name},,")
        dst.writestr(_copy_info(src.getinfo(record_name)), "\n".join(records) + "\n")
    partial.replace(out)
    return total


def _has_fatbin(data: bytes) -> bool:
    try:
        return any(s.name == ".nv_fatbin" for s in elf_sections(data))
    except PackError:
        return False


def _copy_info(info: zipfile.ZipInfo) -> zipfile.ZipInfo:
    copy = zipfile.ZipInfo(info.filename, info.date_time)
    copy.external_attr = info.external_attr
    copy.compress_type = zipfile.ZIP_DEFLATED
    return copy


def split_file(path: Path, chunk_bytes: int, dest: Path | None = None) -> list[Path]:
    """Cut `path` into `NAME.001`, `NAME.002`, ... of at most `chunk_bytes` each (in `dest`, default beside it)."""
    if chunk_bytes <= 0:
        raise PackError("the chunk size must be positive")
    dest = dest or path.parent
    dest.mkdir(parents=True, exist_ok=True)
    chunks = []
    with open(path, "rb") as f:
        while piece := f.read(chunk_bytes):
            chunks.append(dest / f"{path.name}.{len(chunks) + 1:03d}")
            chunks[-1].write_bytes(piece)
    return chunks


# --- report -----------------------------------------------------------------------------------------------

def print_table(report: BlankReport, wheel: Path, out: Path, seconds: float, arch: int) -> None:
    print("| entry | entries before | kept | MB before | MB blanked |\n|---|---|---|---|---|")
    for label in sorted(report.before, key=lambda s: (s.split()[0], int(s.split("_")[1]))):
        print(f"| {label} | {report.before[label]} | {report.kept[label]} | "
              f"{report.bytes_before[label] / 1e6:.1f} | {report.bytes_blanked[label] / 1e6:.1f} |")
    blanked = sum(report.bytes_blanked.values())
    print(f"\ncontainers: {report.containers}; with nothing sm_{arch} can run (blanked whole): {report.unusable}; "
          f"kept for their PTX alone: {report.ptx_kept}")
    print(f"bytes blanked: {blanked:,} ({blanked / MIB:.1f} MiB)")
    print(f"wheel: {wheel.stat().st_size / MIB:.1f} MiB -> {out.stat().st_size / MIB:.1f} MiB ({out}) "
          f"in {seconds:.0f} s")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", default="1.31.1", help="onnxruntime-gpu version (a CUDA 13 build; default 1.31.1)")
    p.add_argument("--python", default="3.12", help="CPython version of the wheel (the H200 has 3.12)")
    p.add_argument("--wheel", type=Path, help="repack this wheel instead of downloading one")
    p.add_argument("--arch", type=int, default=90, help="the GPU architecture to keep, as sm_NN (default 90)")
    p.add_argument("--out", type=Path, default=OUT, help=f"folder for the repacked wheel (default {OUT})")
    p.add_argument("--split-mib", type=float, help="also cut the repacked wheel into chunks of this many MiB")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.wheel is not None and not args.wheel.is_file():
            raise PackError(f"{args.wheel} does not exist")
        wheel = args.wheel or download(args.version, args.python)
        out = args.out / wheel.name
        start = time.perf_counter()
        report = repack(wheel, out, args.arch)
        print_table(report, wheel, out, time.perf_counter() - start, args.arch)
        if args.split_mib:
            chunks = split_file(out, int(args.split_mib * MIB), args.out / "chunks")
            print(f"{len(chunks)} chunks of at most {args.split_mib} MiB in {args.out / 'chunks'}; "
                  f"sha256 of the whole: {sha256_of(out)}")
    except zipfile.BadZipFile:
        print(f"pack_onnxruntime_gpu: {args.wheel} is not a wheel (not a zip file)", file=sys.stderr)
        return 1
    except (PackError, OSError) as e:
        print(f"pack_onnxruntime_gpu: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
