"""The GPUs' code path on the CPU: with memory="device" the KV cache and the activations between engines are
OrtValues onnxruntime allocates (`ortvalue_from_shape_and_type`), bound by address, greedy tokens come from
an argmax graph and refusal rows are mixed in by a select graph, as on CUDA. On the tests' tiny bundles it
gives exactly the default (numpy) path's tokens, risks and decisions: alone, batched and continuously
batched, with the refusal head on some rows, and with a KV cache in fp16."""
import ctypes
import shutil

import numpy as np
import onnx
import pytest

from conftest import MIXED_PROMPTS as PROMPTS, run_together
from steerguard.engines import HOST, OrtMemory, memory_for
from steerguard.engines.graphs import argmax_graph, select_graph
from steerguard.errors import SteerguardError
from steerguard.runtime.batching import ContinuousBatcher
from steerguard.runtime.model import GuardedModel
from steerguard.runtime.sampling import Sampling



@pytest.fixture(scope="module")
def pair(tiny_export):
    """The same int8 bundle with numpy buffers and with onnxruntime's, a threshold that fires on some prompts."""
    host = GuardedModel.load(tiny_export.bundle, threads=2)
    device = GuardedModel.load(tiny_export.bundle, threads=2, memory="device")
    risks = sorted(host.score(p) for p in PROMPTS)
    host.tau = device.tau = (risks[2] + risks[3]) / 2
    return host, device


def same(a, b) -> bool:
    return (a.token_ids == b.token_ids and a.text == b.text and a.fired == b.fired and a.risk == b.risk
            and a.finish_reason == b.finish_reason)


def test_device_memory_is_allocated_by_onnxruntime(pair):
    host, device = pair
    assert host.memory is HOST and host.argmax is None
    assert isinstance(device.memory, OrtMemory) and device.memory.device_type == "cpu"
    cache = device.new_cache(range(device.num_layers), 2, 16)
    assert all(t.array is None for t in cache.tensors.values())
    assert all(not b.any() for b in cache.buffers.values())       # zeroed, read back as copies


def test_single_requests_give_the_default_paths_answers(pair):
    host, device = pair
    calls = device.argmax.calls
    fired = set()
    for prompt in PROMPTS:
        for steer in (None, True, False):
            a, b = (m.generate(prompt, Sampling(max_new_tokens=12), steer=steer) for m in (host, device))
            assert same(a, b), (prompt, steer)
            fired.add(a.fired)
    assert fired == {True, False} and device.argmax.calls > calls     # greedy tokens came from the device argmax
    s = Sampling(max_new_tokens=12, temperature=0.8, top_k=20, seed=3)  # sampling reads the logits on the host
    assert same(host.generate(PROMPTS[0], s), device.generate(PROMPTS[0], s))


def test_batched_rows_with_the_refusal_head_on_some_give_the_default_paths_answers(pair):
    host, device = pair
    a, b = (m.generate_batch(PROMPTS, Sampling(max_new_tokens=10)) for m in (host, device))
    assert 0 < sum(r.fired for r in a) < len(PROMPTS)
    assert all(same(x, y) for x, y in zip(a, b))
    assert device.select.calls > 0                  # the refusal rows were mixed in on the device
    assert all(same(x, host.generate(p, Sampling(max_new_tokens=10))) for x, p in zip(b, PROMPTS))


def run_batcher(model, jobs):
    batcher = ContinuousBatcher(model, max_batch=3, max_queue=16)
    try:
        results = run_together(batcher, jobs)
        assert batcher.peak_rows == 3 and batcher.prefix is not None
        return results, batcher
    finally:
        batcher.close()


def test_continuous_batching_rows_give_the_default_paths_answers(pair):
    """Rows join (from the template prefix's KV, copied on the device), leave (the last row moved into the
    freed one) and keep their own heads."""
    host, device = pair
    steers = [None, True, None, False, None, True]
    jobs = [(p, Sampling(max_new_tokens=24 - 3 * i), steer) for i, (p, steer) in enumerate(zip(PROMPTS, steers))]
    got, batcher = run_batcher(device, jobs)
    assert all(t.array is None for t in batcher.cache.tensors.values())
    for (prompt, sampling, steer), r in zip(jobs, got):
        assert same(r, host.generate(prompt, sampling, steer=steer)), prompt
    want, _ = run_batcher(host, jobs)
    assert all(same(x, y) for x, y in zip(got, want))


def test_kv_positions_copy_between_caches_of_different_widths():
    rng = np.random.default_rng(0)
    for memory in (HOST, OrtMemory("cpu")):
        src, dst = memory.zeros((2, 3, 7, 4), np.float32), memory.zeros((3, 3, 11, 4), np.float32)
        values = rng.standard_normal(src.shape).astype(np.float32)
        ctypes.memmove(src.ptr, values.ctypes.data, values.nbytes)
        memory.copy_positions(dst, 2, src, 1, 5)
        out = dst.numpy()
        assert np.array_equal(out[2, :, :5], values[1, :, :5]) and not out[2, :, 5:].any() and not out[:2].any()


def test_the_hand_written_graphs_are_valid_onnx_and_compute_like_numpy():
    import onnxruntime as ort

    from steerguard.engines import session_options

    rng = np.random.default_rng(1)
    for dtype in (np.float32, np.float16):
        for graph in (argmax_graph(np.dtype(dtype)), select_graph(np.dtype(dtype))):
            onnx.checker.check_model(onnx.load_from_string(graph), full_check=True)
        x = rng.standard_normal((4, 300)).astype(dtype)
        x[2, 10] = x[2, 20] = x[2].max() + 1         # a tie: the first index, as numpy's argmax
        s = ort.InferenceSession(argmax_graph(np.dtype(dtype)), session_options(), providers=["CPUExecutionProvider"])
        assert np.array_equal(s.run(None, {"logits": x})[0], x.argmax(1))
        pick = np.array([[True], [False], [True], [False]])
        s = ort.InferenceSession(select_graph(np.dtype(dtype)), session_options(), providers=["CPUExecutionProvider"])
        assert np.array_equal(s.run(None, {"pick": pick, "a": x, "b": -x})[0], np.where(pick, x, -x))


def fp16_kv_bundle(tiny_export, root):
    """The tiny model exported at fp16 with its KV cache in fp16 at the engines' inputs and outputs (the
    export keeps every input and output fp32, the cache included)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    import steerguard.export.bundle as bundle

    def quantize(model, precision, block_size=32):
        keep = [v.name for v in [*model.graph.input, *model.graph.output]
                if not v.name.startswith(("past_key_values.", "present."))]
        half = OnnxModel(convert_float_to_float16(model, keep_io_types=keep, disable_shape_infer=True))
        half.topological_sort()
        return half.model

    saved = bundle.quantize
    bundle.quantize = quantize
    try:
        return bundle.export_bundle(tiny_export.lm, tiny_export.guard, root, precision="fp16", progress=False)
    finally:
        bundle.quantize = saved


def test_a_kv_cache_in_fp16_is_allocated_as_the_engines_declare_it(tiny_export, tmp_path, monkeypatch):
    monkeypatch.setenv("STEERGUARD_FP16_ON_CPU", "1")
    path = fp16_kv_bundle(tiny_export, tmp_path / "fp16-kv")
    host, device = (GuardedModel.load(path, threads=2, memory=m) for m in ("host", "device"))
    assert host.kv_dtype == device.kv_dtype == np.float16 and host.hidden_dtype == np.float32
    risks = sorted(host.score(p) for p in PROMPTS[:3])
    host.tau = device.tau = (risks[0] + risks[1]) / 2
    a, b = (m.generate_batch(PROMPTS[:3], Sampling(max_new_tokens=8)) for m in (host, device))
    assert 0 < sum(r.fired for r in a) < 3 and all(same(x, y) for x, y in zip(a, b))
    got, _ = run_batcher(device, [(p, Sampling(max_new_tokens=8), None) for p in PROMPTS[:4]])
    assert all(same(r, host.generate(p, Sampling(max_new_tokens=8))) for r, p in zip(got, PROMPTS))
    shutil.rmtree(path)


def test_the_memory_is_chosen_by_name_and_environment(tiny_export, monkeypatch):
    assert memory_for("cpu", None) is HOST and isinstance(memory_for("cpu", "device"), OrtMemory)
    with pytest.raises(SteerguardError, match="memory 'host' is for the CPU"):
        memory_for("cuda", "host")
    monkeypatch.setenv("STEERGUARD_MEMORY", "device")
    assert isinstance(GuardedModel.load(tiny_export.plain, threads=2).memory, OrtMemory)
    monkeypatch.setenv("STEERGUARD_MEMORY", "gpu")
    with pytest.raises(SteerguardError, match="unknown memory 'gpu'"):
        GuardedModel.load(tiny_export.plain, threads=2)


def test_fp16_stays_refused_on_the_cpu_unless_asked(tiny_export, tmp_path, monkeypatch):
    monkeypatch.delenv("STEERGUARD_FP16_ON_CPU", raising=False)
    path = fp16_kv_bundle(tiny_export, tmp_path / "fp16")
    with pytest.raises(SteerguardError, match="run on GPUs only"):
        GuardedModel.load(path, threads=2)


def test_the_kv_cache_can_stay_in_host_memory_beside_device_activations(pair, monkeypatch):
    """STEERGUARD_KV=host (for attention the CPU provider runs): same answers, the cache in numpy arrays."""
    host, _ = pair
    monkeypatch.setenv("STEERGUARD_KV", "host")
    split = GuardedModel.load(host.manifest.root, threads=2, memory="device")
    split.tau = host.tau
    assert isinstance(split.memory, OrtMemory) and split.kv_memory is HOST
    a, b = (m.generate_batch(PROMPTS, Sampling(max_new_tokens=8)) for m in (host, split))
    assert all(same(x, y) for x, y in zip(a, b))
    got, batcher = run_batcher(split, [(p, Sampling(max_new_tokens=10), None) for p in PROMPTS[:4]])
    assert all(t.array is not None for t in batcher.cache.tensors.values())
    assert all(same(r, host.generate(p, Sampling(max_new_tokens=10))) for r, p in zip(got, PROMPTS))
    monkeypatch.setenv("STEERGUARD_KV", "gpu")
    with pytest.raises(SteerguardError, match="STEERGUARD_KV must be host or device"):
        GuardedModel.load(host.manifest.root, threads=2)


def test_cuda_copies_without_a_gpu_are_one_clear_error():
    """The CUDA runtime calls behind the device copies, reached through ctypes where libcudart is installed."""
    from steerguard.engines.memory import _CudaRuntime

    try:
        cuda = _CudaRuntime(0)
    except SteerguardError as e:
        assert "libcudart" in str(e)
        pytest.skip("no CUDA runtime library on this machine")
    with pytest.raises(SteerguardError, match=r"^CUDA cuda\w+ failed: .+ \(\d+\)$"):   # no GPU, or a null pointer
        cuda.copy_2d(0, 4, 0, 4, 4, 1)
