"""The bundle's manifest: read it, check its schema, and verify every file's sha256 before anything runs."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import SteerguardError

MANIFEST = "manifest.json"
SCHEMA = 1
PRECISIONS = ("fp32", "fp16", "int8", "int4")


def expected_engine_bytes(precision: str, matmul_weights: int, other_weights: int, block_size: int = 32) -> float:
    """Bytes an engine stores at `precision`: MatMul weights quantized in blocks with one fp32 scale
    each (int8/int4), everything else fp32 (fp16: all of it halved)."""
    per = {"fp32": 4.0, "fp16": 2.0, "int8": 1 + 4 / block_size, "int4": 0.5 + 4 / block_size}[precision]
    return matmul_weights * per + other_weights * (2.0 if precision == "fp16" else 4.0)


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class Manifest:
    root: Path
    data: dict

    @property
    def model(self) -> dict:
        return self.data["model"]

    @property
    def guard(self) -> dict | None:
        return self.data.get("guard")

    @property
    def engines(self) -> list[dict]:
        return self.data["engines"]

    def engine(self, role: str, phase: str | None = None) -> list[dict]:
        """Engines of `role`; with `phase` ("prefill" or "decode"), those that run in it (an engine
        without a phase runs in both)."""
        return [e for e in self.engines if e["role"] == role and (phase is None or e.get("phase", phase) == phase)]

    def path(self, rel: str) -> Path:
        return self.root / rel

    @classmethod
    def load(cls, folder: str | Path, verify: bool = True) -> "Manifest":
        root = Path(folder)
        if not root.is_dir():
            raise SteerguardError(f"{root}: no such bundle folder (make one with `steerguard export`)")
        path = root / MANIFEST
        if not path.exists():
            raise SteerguardError(f"{path}: missing; {root} is not a steerguard bundle")
        try:
            data = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise SteerguardError(f"{path}: not valid JSON ({e}); re-export the bundle") from e
        if not isinstance(data, dict) or data.get("format") != "steerguard-bundle":
            raise SteerguardError(f"{path}: not a steerguard bundle manifest")
        if data.get("schema") != SCHEMA:
            raise SteerguardError(f"{path}: bundle schema {data.get('schema')}, this steerguard reads schema "
                                  f"{SCHEMA}; re-export the bundle with this version")
        for key in ("model", "engines", "files", "tokenizer", "generation"):
            if key not in data:
                raise SteerguardError(f"{path}: no {key!r} entry; re-export the bundle")
        manifest = cls(root, data)
        manifest.check_files(verify)
        return manifest

    def check_files(self, verify_hashes: bool = True) -> None:
        """Every file the manifest names exists and has its recorded sha256."""
        files: dict = self.data["files"]
        for e in self.engines:
            for rel in [e["file"], *e.get("data_files", [])]:
                if rel not in files:
                    raise SteerguardError(f"{self.root / MANIFEST}: engine file {rel} has no recorded sha256")
        for rel, digest in files.items():
            p = self.root / rel
            if not p.is_file():
                raise SteerguardError(f"{p}: missing from the bundle; copy the whole bundle folder again")
            if verify_hashes and sha256_of(p) != digest:
                raise SteerguardError(f"{p}: sha256 does not match the manifest (corrupt or modified); "
                                      "copy the bundle again or re-export it")
        for e in self.engines:
            self.check_precision(e)

    def check_precision(self, e: dict) -> None:
        """The engine's size must fit the precision the manifest claims for it better than any other."""
        claimed = e.get("precision")
        if claimed not in PRECISIONS:
            raise SteerguardError(f"{self.root / MANIFEST}: engine {e['name']} has unknown precision {claimed!r}")
        if e["role"] not in ("decoder", "head") or not e.get("matmul_weights"):
            return
        size = sum((self.root / f).stat().st_size for f in [e["file"], *e.get("data_files", [])])
        bs = e.get("block_size", 32)
        looks = min(PRECISIONS, key=lambda p: abs(expected_engine_bytes(p, e["matmul_weights"],
                                                                         e["other_weights"], bs) - size))
        if looks != claimed:
            raise SteerguardError(f"{self.root / e['file']}: the manifest says {claimed}, but the engine's "
                                  f"{size / 1e6:.1f} MB fit {looks}; re-export the bundle")
