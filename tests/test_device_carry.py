"""bench/device_carry.py and bench/device_unpack.sh on tiny streams (no download, no GPU): parts are filled
in order and cut where full, and the unpack script rebuilds every stream byte for byte, checks sha256s,
refuses a part whose predecessors are missing or a corrupt chunk with one line, and writes env.sh."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("device_carry", REPO / "bench" / "device_carry.py")
carry = sys.modules["device_carry"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(carry)


def sizes(parts):
    return [[(c.stream, c.index, c.size) for c in p] for p in parts]


def test_parts_are_filled_in_order_and_cut_where_full():
    streams = [carry.Stream(n, "file", n, "", "", "", b) for n, b in (("a", 10), ("b", 25), ("c", 7))]
    assert sizes(carry.fill_parts(streams, 16)) == [
        [("a", 1, 10), ("b", 1, 6)], [("b", 2, 16)], [("b", 3, 3), ("c", 1, 7)]]


@pytest.fixture
def parts(tmp_path):
    cache = tmp_path / "transport"
    blob = tmp_path / "model.gguf"
    blob.write_bytes(os.urandom(3000))
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "guard.json").write_text('{"schema": 1}')
    (guard / "prober.npz").write_bytes(os.urandom(500))
    streams = [carry.stream(guard, "untar", "guard", cache, "guard.tar", prepare=carry.guard_tar),
               carry.stream(blob, "file", "cache/downloads/model.gguf", cache)]
    out = tmp_path / "parts"
    parts = carry.fill_parts(streams, 1200)
    carry.write_parts(parts, streams, out)
    return out, len(parts), blob, guard


def unpack(k, out, root, smoke="0"):
    env = dict(os.environ, SG_ROOT=str(root), SG_PARTS=str(out), SG_SMOKE=smoke, SG_PYTHON=sys.executable)
    return subprocess.run(["bash", str(REPO / "bench" / "device_unpack.sh"), str(k)], cwd=REPO, env=env,
                          capture_output=True, text=True)


def test_unpack_rebuilds_every_stream(parts, tmp_path):
    out, n, blob, guard = parts
    assert n >= 3
    root = tmp_path / "sg"
    for k in range(1, n + 1):
        r = unpack(k, out, root)
        assert r.returncode == 0, r.stderr
    assert (root / "cache" / "downloads" / "model.gguf").read_bytes() == blob.read_bytes()
    assert (root / "guard" / "prober.npz").read_bytes() == (guard / "prober.npz").read_bytes()
    env = (root / "env.sh").read_text()
    assert f"export STEERGUARD_CACHE={root}/cache" in env and f"export SG_GUARD={root}/guard" in env
    assert f'PYTHONPATH="{root}/site:$PWD' in env
    assert "all" in r.stdout and f"source {root}/env.sh" in r.stdout


def test_a_part_without_its_predecessors_is_one_line(parts, tmp_path):
    out, _, _, _ = parts
    r = unpack(2, out, tmp_path / "fresh")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"device_unpack: part 1 is not in {tmp_path / 'fresh'}: this machine is not the one that unpacked it "
        "(a fresh machine is bare); start again with part 1"]


def test_a_corrupt_chunk_is_refused(parts, tmp_path):
    out, _, _, _ = parts
    chunk = next((out / "part1").glob("*.xz.001"))
    chunk.write_bytes(b"x" + chunk.read_bytes()[1:])
    r = unpack(1, out, tmp_path / "sg")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"device_unpack: part 1: {chunk.name} failed its sha256 check"]


def test_bad_part_number_is_one_line(parts, tmp_path):
    out, _, _, _ = parts
    r = unpack("x", out, tmp_path / "sg")
    assert r.returncode == 1
    assert r.stderr.strip() == "device_unpack: usage: bash bench/device_unpack.sh PART (a part number: 1, 2, ...)"
