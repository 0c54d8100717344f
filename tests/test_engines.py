"""Backend selection and TensorRT plan bookkeeping: everything about GPUs that can be checked without one."""
import json

import pytest

from steerguard.engines import BACKENDS, resolve_backend
from steerguard.engines.plans import PlanKey, current_key, find_plans, write_index
from steerguard.errors import SteerguardError

H100 = PlanKey("NVIDIA H100 80GB HBM3", "9.0", "10.7.0")
ORIN = PlanKey("Orin", "8.7", "10.3.0")


def test_backend_selection():
    assert resolve_backend("cpu").providers == ("CPUExecutionProvider",)
    with pytest.raises(SteerguardError, match="unknown backend 'rocm'"):
        resolve_backend("rocm")
    with pytest.raises(SteerguardError, match="CUDAExecutionProvider.*steerguard\\[gpu\\]"):
        resolve_backend("cuda")
    with pytest.raises(SteerguardError, match="TensorrtExecutionProvider.*steerguard\\[tensorrt\\]"):
        resolve_backend("tensorrt")
    assert resolve_backend("cuda", fallback_to_cpu=True) is BACKENDS["cpu"]


def test_plan_key_names_a_folder_per_gpu_and_tensorrt_version():
    assert H100.folder == "NVIDIA-H100-80GB-HBM3_sm90_trt10.7.0"
    assert ORIN.folder != H100.folder and PlanKey("Orin", "8.7", "10.4.0").folder != ORIN.folder


def _plans(tmp_path, key, onnx_sha="abc"):
    folder = tmp_path / "trt" / key.folder
    folder.mkdir(parents=True)
    plan = folder / "pre.plan"
    plan.write_bytes(b"serialized engine bytes")
    write_index(folder, key, {"pre": (plan, onnx_sha)})
    return plan


def test_matching_plans_are_found(tmp_path):
    plan = _plans(tmp_path, H100)
    found = find_plans(tmp_path, H100, {"pre": "abc"})
    assert found.plans == {"pre": plan}


def test_no_plans_says_to_build_them(tmp_path):
    with pytest.raises(SteerguardError, match="no TensorRT plans for NVIDIA H100.*steerguard build-trt"):
        find_plans(tmp_path, H100, {"pre": "abc"})


def test_plans_for_another_gpu_or_tensorrt_are_never_loaded(tmp_path):
    _plans(tmp_path, ORIN)
    with pytest.raises(SteerguardError, match="plans exist only for Orin \\(compute 8.7\\), TensorRT 10.3.0"):
        find_plans(tmp_path, H100, {"pre": "abc"})
    with pytest.raises(SteerguardError, match="no TensorRT plans"):
        find_plans(tmp_path, PlanKey("Orin", "8.7", "10.4.0"), {"pre": "abc"})


def test_corrupt_or_stale_plans_are_refused(tmp_path):
    plan = _plans(tmp_path, H100)
    with pytest.raises(SteerguardError, match="built from another version of engine 'pre'"):
        find_plans(tmp_path, H100, {"pre": "new onnx"})
    plan.write_bytes(b"serialized engine bytez")
    with pytest.raises(SteerguardError, match="pre.plan: missing or corrupt TensorRT plan"):
        find_plans(tmp_path, H100, {"pre": "abc"})
    (plan.parent / "index.json").write_text("{not json")
    with pytest.raises(SteerguardError, match="corrupt plan index"):
        find_plans(tmp_path, H100, {"pre": "abc"})


def test_an_index_that_claims_another_key_is_refused(tmp_path):
    _plans(tmp_path, H100)
    index = tmp_path / "trt" / H100.folder / "index.json"
    data = json.loads(index.read_text())
    data["key"]["tensorrt"] = "10.0.0"
    index.write_text(json.dumps(data))
    with pytest.raises(SteerguardError, match="built for .*TensorRT 10.0.0, not"):
        find_plans(tmp_path, H100, {"pre": "abc"})


def test_missing_tensorrt_is_one_clear_error():
    pytest.importorskip("onnxruntime")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    with pytest.raises(SteerguardError, match="TensorRT is not installed: pip install 'steerguard\\[tensorrt\\]'"):
        current_key()
