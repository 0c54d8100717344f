"""bench/pack_onnxruntime_gpu.py on small synthetic ELF files with a `.nv_fatbin` section (no download):
payloads sm_90 cannot use are zeroed, sm_90 cubins (and PTX that is a container's only usable code) stay,
the file keeps its size, the wheel's RECORD matches, and bad input is one clear line."""

import base64
import hashlib
import importlib.util
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "pack_onnxruntime_gpu.py"
spec = importlib.util.spec_from_file_location("pack_onnxruntime_gpu", SCRIPT)
pack = sys.modules["pack_onnxruntime_gpu"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pack)

PTX, ELF = pack.KIND_PTX, pack.KIND_ELF


def entry(kind: int, arch: int, payload: bytes) -> bytes:
    header = pack.ENTRY.pack(kind, 0x101, 64, len(payload), len(payload), 0, 8, 1, arch, 0, 0, 0x11)
    return header.ljust(64, b"\0") + payload


def container(*entries: bytes) -> bytes:
    body = b"".join(entries)
    return pack.CONTAINER.pack(pack.FATBIN_MAGIC, 1, 16, len(body)) + body


def elf(sections: dict[str, bytes], needed: tuple[str, ...] = ()) -> bytes:
    """A little-endian ELF64 shared object holding `sections` (and a .dynamic naming `needed`)."""
    if needed:
        dynstr = b"\0" + b"".join(n.encode() + b"\0" for n in needed)
        offsets = [dynstr.index(n.encode() + b"\0") for n in needed]
        sections = {".dynstr": dynstr, ".dynamic": b"".join(struct.pack("<qQ", 1, o) for o in offsets)
                    + struct.pack("<qQ", 0, 0), **sections}
    names = ["", ".shstrtab", *sections]
    shstrtab = b"\0".join(n.encode() for n in names) + b"\0"
    blobs, pos, placed = [shstrtab, *sections.values()], 64, []
    for blob in blobs:
        pos = (pos + 7) // 8 * 8
        placed.append(pos)
        pos += len(blob)
    shoff = (pos + 7) // 8 * 8
    out = bytearray(shoff + 64 * len(names))
    out[:16] = b"\x7fELF\x02\x01\x01" + bytes(9)
    struct.pack_into("<HHIQQQIHHHHHH", out, 16, 3, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, len(names), 1)
    for blob, at in zip(blobs, placed):
        out[at:at + len(blob)] = blob
    for i, (name, blob, at) in enumerate(zip(names[1:], blobs, placed), start=1):
        link = names.index(".dynstr") if name == ".dynamic" else 0
        struct.pack_into("<IIQQQQIIQQ", out, shoff + 64 * i, shstrtab.index(name.encode() + b"\0"),
                         1, 2, 0, at, len(blob), link, 0, 8, 0)
    return bytes(out)


def payload(tag: int, n: int = 96) -> bytes:
    return bytes([tag]) * n


FATBIN = (container(entry(ELF, 80, payload(1)), entry(ELF, 90, payload(2)), entry(PTX, 90, payload(3)),
                    entry(ELF, 120, payload(4)))
          + bytes(8)                                                      # alignment padding
          + container(entry(ELF, 80, payload(5)), entry(PTX, 80, payload(6)), entry(PTX, 86, payload(7)),
                      entry(PTX, 100, payload(8)))
          + container(entry(ELF, 120, payload(9))))


def payload_at(data: bytes, tag: int) -> bytes:
    """The 96 bytes where payload `tag` was written in `data`'s .nv_fatbin."""
    at = pack.find_section(data, ".nv_fatbin").offset + FATBIN.index(payload(tag))
    return data[at:at + 96]


def test_walker_reads_every_container_and_entry():
    data = elf({".text": b"\x90" * 40, ".nv_fatbin": FATBIN})
    containers = pack.fatbin_containers(data)
    assert [[e.label for e in c.entries] for c in containers] == [
        ["ELF sm_80", "ELF sm_90", "PTX sm_90", "ELF sm_120"],
        ["ELF sm_80", "PTX sm_80", "PTX sm_86", "PTX sm_100"],
        ["ELF sm_120"]]


def test_blanks_what_sm90_cannot_use_in_place(tmp_path):
    original = elf({".text": b"\x90" * 40, ".nv_fatbin": FATBIN})
    path = tmp_path / "libonnxruntime_providers_cuda.so"
    path.write_bytes(original)
    report = pack.blank_file(path)
    after = path.read_bytes()
    assert len(after) == len(original)
    assert payload_at(after, 2) == payload(2)              # the sm_90 cubin is untouched
    assert payload_at(after, 7) == payload(7)              # the only code sm_90 can run there: PTX sm_86
    for tag in (1, 3, 4, 5, 6, 8, 9):
        assert payload_at(after, tag) == bytes(96), tag
    changed = [i for i, (a, b) in enumerate(zip(original, after)) if a != b]
    assert len(changed) == 7 * 96                          # headers, padding and other sections unchanged
    assert report.containers == 3 and report.unusable == 1 and report.ptx_kept == 1
    assert report.kept == {"ELF sm_90": 1, "PTX sm_86": 1}
    assert sum(report.bytes_blanked.values()) == 7 * 96


def test_file_without_fatbin_is_a_clear_error(tmp_path):
    path = tmp_path / "libplain.so"
    path.write_bytes(elf({".text": b"\x90" * 40}))
    with pytest.raises(pack.PackError, match=r"libplain.so has no \.nv_fatbin section"):
        pack.blank_file(path)
    path.write_bytes(b"not an elf file at all" * 4)
    with pytest.raises(pack.PackError, match="is not an ELF file"):
        pack.blank_file(path)


def test_corrupt_container_is_refused():
    broken = bytearray(FATBIN)
    struct.pack_into("<I", broken, 0, 0xDEADBEEF)
    with pytest.raises(pack.PackError, match="no fatbin magic at offset"):
        pack.fatbin_containers(elf({".nv_fatbin": bytes(broken)}))


def fake_wheel(path: Path, needed: tuple[str, ...]) -> None:
    lib = elf({".nv_fatbin": FATBIN}, needed=needed)
    files = {"onnxruntime/__init__.py": b"__version__ = '0'\n",
             "onnxruntime/capi/libonnxruntime_providers_cuda.so": lib}
    record = "".join(f"{n},,\n" for n in files) + "onnxruntime_gpu-0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr("onnxruntime_gpu-0.dist-info/RECORD", record)


def test_repack_blanks_the_provider_and_rewrites_record(tmp_path):
    wheel, out = tmp_path / "in.whl", tmp_path / "out" / "in.whl"
    fake_wheel(wheel, ("libcublasLt.so.13", "libcublas.so.13", "libcudart.so.13"))
    report = pack.repack(wheel, out, 90)
    assert report.kept == {"ELF sm_90": 1, "PTX sm_86": 1}
    with zipfile.ZipFile(out) as z:
        lib = z.read("onnxruntime/capi/libonnxruntime_providers_cuda.so")
        assert payload_at(lib, 2) == payload(2) and payload_at(lib, 1) == bytes(96)
        record = z.read("onnxruntime_gpu-0.dist-info/RECORD").decode().splitlines()
        for line in record[:-1]:
            name, digest, size = line.split(",")
            data = z.read(name)
            assert digest == "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert int(size) == len(data)
        assert record[-1] == "onnxruntime_gpu-0.dist-info/RECORD,,"
        assert all(i.compress_type == zipfile.ZIP_DEFLATED for i in z.infolist())


def test_a_build_for_cuda_12_is_refused(tmp_path):
    wheel = tmp_path / "in.whl"
    fake_wheel(wheel, ("libcublas.so.12", "libcudart.so.12"))
    with pytest.raises(pack.PackError, match="not a CUDA 13 build"):
        pack.repack(wheel, tmp_path / "out.whl", 90)


def test_split_file_cuts_numbered_chunks(tmp_path):
    src = tmp_path / "blob.bin"
    src.write_bytes(bytes(range(256)) * 10)
    chunks = pack.split_file(src, 1000, tmp_path / "chunks")
    assert [c.name for c in chunks] == ["blob.bin.001", "blob.bin.002", "blob.bin.003"]
    assert b"".join(c.read_bytes() for c in chunks) == src.read_bytes()


def test_command_line_error_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--wheel", str(tmp_path / "missing.whl")],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"pack_onnxruntime_gpu: {tmp_path / 'missing.whl'} does not exist"]
