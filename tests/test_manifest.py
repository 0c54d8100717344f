"""A bundle is verified before anything runs: every file's sha256, the schema, nothing missing."""
import json
import shutil

import pytest

from steerguard.errors import SteerguardError
from steerguard.runtime.manifest import Manifest
from steerguard.runtime.model import GuardedModel


@pytest.fixture
def bundle(tiny_export, tmp_path):
    return shutil.copytree(tiny_export.bundle, tmp_path / "bundle")


def test_manifest_describes_the_chain_and_pins_every_file(bundle, tiny_export):
    m = Manifest.load(bundle)
    assert [e["name"] for e in m.engines] == ["embed", "pre", "post", "head", "refusal"]
    split = tiny_export.guard.split_layer
    assert [e["layers"] for e in m.engine("decoder")] == [[0, split], [split, 4]]
    assert m.guard["split_layer"] == split and m.guard["prober_precision"] == "int8"
    on_disk = {str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(m.data["files"]) == on_disk


@pytest.mark.parametrize("engine", ["embed", "pre", "post", "head", "refusal"])
def test_one_flipped_byte_in_any_engine_is_refused_naming_the_file(bundle, engine):
    path = bundle / "engines" / f"{engine}.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(SteerguardError, match=f"{engine}.onnx: sha256 does not match"):
        GuardedModel.load(bundle)


def test_missing_file_is_refused_naming_it(bundle):
    (bundle / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(SteerguardError, match="tokenizer.json: missing"):
        GuardedModel.load(bundle)


def test_other_schema_version_is_refused(bundle):
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    data["schema"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(SteerguardError, match="manifest.json: bundle schema 99"):
        GuardedModel.load(bundle)


def test_not_a_bundle(tmp_path):
    with pytest.raises(SteerguardError, match="no such bundle"):
        GuardedModel.load(tmp_path / "nothing")
    with pytest.raises(SteerguardError, match="not a steerguard bundle"):
        GuardedModel.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(SteerguardError, match="not valid JSON"):
        GuardedModel.load(tmp_path)
