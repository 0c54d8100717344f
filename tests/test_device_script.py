"""bench/device.sh --dry-run end to end on a tiny model (the GPU run's script, on the CPU backend with
onnxruntime-allocated buffers): every stage runs, gpu.json and gpu.md hold every table, the device path's
answers equal the CPU reference's exactly, and a failing stage is recorded while the others go on."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_parity  # noqa: E402
import gpu_report  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model_and_guard(tmp_path_factory):
    """A tiny Llama saved as a Hugging Face folder, and a guard calibrated on it that names its hash."""
    from conftest import TinyExport
    from steerguard.export.models import _weights_sha256

    root = tmp_path_factory.mktemp("device-script")
    tiny = TinyExport("llama", root / "tiny")
    folder = root / "model"
    tiny.lm.model.save_pretrained(folder)
    tiny.lm.tokenizer.save_pretrained(folder)
    guard = copy.deepcopy(tiny.guard)
    guard.model["sha256"] = _weights_sha256(folder)
    guard.save(root / "guard")
    return folder, root / "guard"


def dry_run(tmp_path: Path, model: Path, guard: Path, **env) -> subprocess.CompletedProcess:
    env = {**os.environ, "MODEL": str(model), "GUARD": str(guard), "OUT": str(tmp_path / "out"),
           "WORK": str(tmp_path / "work"), "STEERGUARD_THREADS": "2", **env}
    return subprocess.run(["bash", "bench/device.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_the_dry_run_measures_every_stage_and_writes_the_report(tiny_model_and_guard, tmp_path):
    model, guard = tiny_model_and_guard
    done = dry_run(tmp_path, model, guard)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["device.log", "gpu.json", "gpu.md"]
    data = json.loads((out / "gpu.json").read_text())
    stages = {s["stage"]: s["rc"] for s in data["stages"]}
    assert stages == {s: 0 for s in ("env", "export", "parity", "speed", "peer", "placement", "kv16_parity",
                                     "kv16_speed", "hostkv_speed")}
    assert set(data["export"]["bundles"]) == {"fp32", "fp16", "fp32-plain", "fp16-plain", "fp16-kv16"}
    parity = data["parity"]["bundles"]
    # the device path on the CPU computes what the numpy path computes, to the bit
    assert parity["fp32"]["single"]["greedy_identical"] == parity["fp32"]["batched"]["greedy_identical"] == 1.0
    assert parity["fp32"]["single"]["risk_max_abs_diff"] == 0.0 and parity["fp32"]["eval_decisions_agree"] == 1.0
    assert parity["fp16"]["single"]["n"] == 6 and "fire_rates" in parity["fp16"]
    speed = data["speed"]["precisions"]
    assert set(speed) == {"fp32", "fp16"} and set(speed["fp32"]["batches"]) == {"1", "2", "4"}
    assert all(r["guarded"]["decode_tok_s"] > 0 and "guard_overhead_pct" in r for r in speed["fp16"]["batches"].values())
    assert set(data["peer"]["dtypes"]["fp32"]) == {"1", "2", "4"}
    placed = data["placement"]["bundles"]["fp32"]
    assert placed["pre"]["providers"] == {"CPUExecutionProvider": sum(placed["pre"]["cpu_ops"].values())}
    assert placed["refusal"]["providers"]        # the steered request ran the refusal engine
    md = (out / "gpu.md").read_text()
    for heading in ("## Done when", "## Parity with the CPU", "## Guard fire rates", "## Speed", "## Where the nodes ran",
                    "## fp16 with an fp16 KV cache: parity", "## fp32 with the KV cache in host memory", "## Stages"):
        assert heading in md, heading
    checks = {c["check"]: c["passed"] for c in data["checks"]}
    assert checks["greedy tokens identical to the CPU fp32 bundle >= 99% (fp32)"] is True
    assert "== " in (out / "device.log").read_text()


def test_a_failing_stage_is_recorded_and_the_report_still_comes(tiny_model_and_guard, tmp_path):
    model, _ = tiny_model_and_guard
    done = dry_run(tmp_path, model, tmp_path / "no-guard", BUDGET="200")
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads((tmp_path / "out" / "gpu.json").read_text())
    stages = {s["stage"]: s for s in data["stages"]}
    assert stages["export"]["rc"] == 1 and "error" in data["export"]
    assert stages["parity"]["rc"] == "skipped" and stages["speed"]["rc"] == "skipped"
    assert "not measured" in (tmp_path / "out" / "gpu.md").read_text()


def test_parity_prompts_spread_over_the_shipped_eval_sets():
    prompts = gpu_parity.parity_prompts(100)
    sets = gpu_parity.eval_sets()
    assert len(prompts) == len(set(prompts)) == 100
    counts = {k: sum(p in v for p in prompts) for k, v in sets.items()}
    assert counts == {"harmful_heldout": 40, "sounds_dangerous": 36, "benign_conversational": 24}


def test_the_checks_read_the_issues_targets():
    data = {"parity": {"bundles": {"fp32": {"single": {"greedy_identical": 0.99, "decisions_agree": 1.0},
                                            "eval_decisions_agree": 0.994, "eval_decisions_n": 500},
                                   "fp16": {"single": {"greedy_identical": 0.9, "decisions_agree": 0.99}}}},
            "speed": {"precisions": {"fp16": {"batches": {"1": {"guard_overhead_pct": 1.5, "guarded": {"decode_tok_s": 300}},
                                                          "64": {"guarded": {"aggregate_tok_s": 9000}}}}}},
            "peer": {"dtypes": {"fp16": {"1": {"decode_tok_s": 120}}}}}
    got = {w: ok for w, ok, _ in gpu_report.checks(data)}
    assert got["greedy tokens identical to the CPU fp32 bundle >= 99% (fp32)"] is True
    assert got["guard decisions agree >= 99.5% (fp32)"] is False      # 99.4% of the eval prompts falls short
    assert got["guard overhead <= 2% of decode time (batch 1)"] is True
    assert got["batch-1 decode tok/s >= transformers eager (fp16)"] is True
    assert got["batch-1 decode tok/s >= transformers eager (fp32)"] is None
    assert got["largest batch's aggregate reported (64 on the GPU)"] is True
