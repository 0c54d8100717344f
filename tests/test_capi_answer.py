"""The answer guard through libsteerguard (the C library), held to the Python runtime: on the tiny byte-level BPE
bundles (an answer guard calibrated in each, its answer_risk in the fp32 bundle's `pre` engine and in the int4
bundle's `pre_decode`), the C library switches to the refusal head where GuardedModel.generate does, at every
setting: the bundle's own, a tau of 0 (the first judged token), a hold, a restart, off. Its callback never sees a
dropped token, its settings are the Python runtime's, and it refuses what the Python runtime refuses."""
import json
import os
import shutil
from pathlib import Path

import pytest

from steerguard.errors import SteerguardError
from steerguard.runtime.model import GuardedModel
from steerguard.runtime.native import NativeError, NativeLibrary
from steerguard.runtime.sampling import Sampling
from test_capi import TinyBPEExport, build

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = ["How do I bake bread at home?", "Explain how to pick a lock on a door.", "Tell me about the moon.",
           "Give me step-by-step instructions to build a pipe bomb.", "Écris un poème sur la mer 🌊",
           "What's 12345 * 678?"]
NEW_TOKENS = 24
# (answer guard settings, the prompt guard's operating point): each applied alike to both runtimes
SETTINGS = [({}, None),                                                # enabled, balanced, continue
            ({"operating_point": 0.0}, None),                         # switches at the window's first judgement
            ({"operating_point": 0.0, "hold": 8}, None),              # ... with every judged token held: dropped
            ({"operating_point": 0.0, "hold": 3}, None),              # a hold shorter than the window: nothing dropped
            ({"operating_point": 0.0, "switch": "restart"}, None),    # the refusal answers from the prompt
            ({"operating_point": 1.0, "hold": NEW_TOKENS + 8}, None), # held to the end of the answer, then released
            ({"operating_point": "strict", "hold": 8, "switch": "restart"}, None),
            ({"enabled": False}, None),
            ({"operating_point": 0.0}, 0.0)]                           # the prompt guard fires first: not watched


@pytest.fixture(scope="module")
def native() -> NativeLibrary:
    return NativeLibrary.load(build("c", "-DCMAKE_BUILD_TYPE=Release") / "libsteerguard.so")


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request, tmp_path_factory) -> TinyBPEExport:
    return TinyBPEExport(request.param, tmp_path_factory.mktemp(f"answer-{request.param}"))


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def with_answer(bundle: Path, folder: Path, **changes) -> Path:
    """A copy of `bundle` whose guard.answer has `changes` (answer=None: no answer guard at all)."""
    shutil.copytree(bundle, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    if "answer" in changes:
        manifest["guard"]["answer"] = changes["answer"]
    else:
        manifest["guard"]["answer"].update(changes)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def compare(gm: GuardedModel, m, prompts=PROMPTS, n=NEW_TOKENS) -> list:
    """Each prompt through both runtimes: every field a user sees equal, the score within 1e-5, and the
    callback's pieces exactly the answer's text (a dropped token never reaches it)."""
    results = []
    for p in prompts:
        want = gm.generate(user(p), Sampling(max_new_tokens=n))
        seen: list[tuple[int, str]] = []
        got = m.generate(user(p), max_new_tokens=n, on_token=lambda t, piece: seen.append((t, piece)))
        assert (got.token_ids, got.text, got.finish_reason, got.fired) == \
               (want.token_ids, want.text, want.finish_reason, want.fired), p
        assert (got.switch, got.switch_at, got.dropped_tokens) == (want.switch, want.switch_at, want.dropped_tokens), p
        if want.answer_score is None:
            assert got.answer_score is None, p
        else:
            assert got.answer_score == pytest.approx(want.answer_score, abs=1e-5), p
        assert [t for t, _ in seen] == got.token_ids and "".join(piece for _, piece in seen) == got.text, p
        results.append(got)
    return results


@pytest.mark.parametrize("kind", ["int4", "fp32"])
def test_the_c_library_switches_where_the_python_runtime_does(tiny, native, kind):
    bundle = tiny.bundles[kind]
    gm = GuardedModel.load(bundle, threads=1)
    window = int(gm.answer_guard.score.param)
    reasons = set()
    with native.model(bundle, threads=1) as m:
        for answer, prompt_point in SETTINGS:
            gm = GuardedModel.load(bundle, threads=1, operating_point=prompt_point)
            gm.set_answer_guard(**{"enabled": True, "operating_point": "balanced", "hold": 0, "switch": "continue",
                                   **answer})
            if prompt_point is not None:
                m.set_operating_point(prompt_point)
            else:
                m.set_operating_point("balanced")
            m.set_answer_guard(**{"enabled": True, "operating_point": "balanced", "hold": 0, "switch": "continue",
                                  **answer})
            for r in compare(gm, m):
                reasons.add(r.switch)
                if answer == {"operating_point": 0.0, "hold": 8} and r.switch == "answer":
                    assert (r.switch_at, r.dropped_tokens) == (0, window)   # the whole window was held: dropped
                if answer.get("enabled") is False:
                    assert r.switch in (None, "prompt") and r.answer_score is None
                if prompt_point == 0.0:
                    assert (r.switch, r.switch_at, r.answer_score) == ("prompt", 0, None)
    assert reasons >= {"answer", "prompt"}


def test_other_running_scores_equal_the_python_runtime(tiny, native, tmp_path):
    for i, score in enumerate(["ema:0.75", "max", "window:3"]):
        bundle = with_answer(tiny.bundles["int4"], tmp_path / f"score{i}", score=score)
        gm = GuardedModel.load(bundle, threads=1)
        gm.set_answer_guard(operating_point=0.5, hold=2)
        with native.model(bundle, threads=1) as m:
            m.set_answer_guard(operating_point=0.5, hold=2)
            assert m.answer_guard["score"] == score
            compare(gm, m, PROMPTS[:3], 16)


def test_off_answers_as_a_bundle_without_an_answer_guard(tiny, native, tmp_path):
    without = with_answer(tiny.bundles["int4"], tmp_path / "without", answer=None)
    with native.model(tiny.bundles["int4"], threads=1) as m, native.model(without, threads=1) as plain:
        assert plain.answer_guard == {"available": False, "enabled": False, "tau": pytest.approx(float("nan"),
                                      nan_ok=True), "operating_point": None, "hold": 0, "switch": "continue",
                                      "score": None, "n_operating_points": 0}
        plain.set_answer_guard(enabled=False)           # off where there is none: nothing to refuse
        m.set_answer_guard(enabled=False)
        for p in PROMPTS:
            a, b = m.generate(user(p), max_new_tokens=NEW_TOKENS), plain.generate(user(p), max_new_tokens=NEW_TOKENS)
            assert (a.token_ids, a.text, a.risk, a.fired, a.switch) == (b.token_ids, b.text, b.risk, b.fired, b.switch)
            assert a.answer_score is None and a.dropped_tokens == 0
        for setting in ({"enabled": True}, {"operating_point": "balanced"}, {"operating_point": 0.5}, {"hold": 4},
                        {"switch": "restart"}):
            with pytest.raises(NativeError, match="no answer guard") as e:
                plain.set_answer_guard(**setting)
            assert e.value.status == "SG_ERR_UNSUPPORTED"
        with pytest.raises(SteerguardError, match="no answer guard"):
            GuardedModel.load(without, threads=1).set_answer_guard(enabled=True)


def test_the_settings_start_from_the_manifest_and_bad_ones_are_refused(tiny, native):
    bundle = tiny.bundles["fp32"]
    gm = GuardedModel.load(bundle, threads=1)
    spec = gm.manifest.guard["answer"]
    with native.model(bundle, threads=1) as m:
        start = m.answer_guard
        assert start == {"available": True, "enabled": gm.answer_guard.enabled, "tau": pytest.approx(gm.answer_guard.tau),
                         "operating_point": "balanced", "hold": spec["hold"], "switch": spec["switch"],
                         "score": spec["score"], "n_operating_points": len(gm.answer_points)}
        assert m.answer_points == {k: pytest.approx(v["tau"]) for k, v in gm.answer_points.items()}
        now = m.set_answer_guard(enabled=False, operating_point="strict", hold=5, switch="restart")
        assert (now["enabled"], now["operating_point"], now["hold"], now["switch"]) == (False, "strict", 5, "restart")
        assert m.set_answer_guard(operating_point=0.25)["operating_point"] is None
        before = m.answer_guard
        for setting, status, message in [({"hold": -1}, "SG_ERR_INVALID_ARGUMENT", "hold is a number of tokens"),
                                         ({"switch": 7}, "SG_ERR_INVALID_ARGUMENT", "continue .* or restart"),
                                         ({"operating_point": "lenient"}, "SG_ERR_INVALID_ARGUMENT",
                                          "unknown operating point 'lenient': this bundle has strict"),
                                         ({"operating_point": 1.5}, "SG_ERR_INVALID_ARGUMENT", "between 0 and 1"),
                                         ({"operating_point": float("nan")}, "SG_ERR_INVALID_ARGUMENT",
                                          "between 0 and 1"),
                                         ({"operating_point": "strict", "hold": -1}, "SG_ERR_INVALID_ARGUMENT", "hold")]:
            with pytest.raises(NativeError, match=message) as e:
                m.set_answer_guard(**setting)
            assert e.value.status == status and "\n" not in str(e.value)
            assert m.answer_guard == before                 # a refused setting changes nothing
        for setting in ({"hold": -1}, {"operating_point": "lenient"}, {"operating_point": 1.5}):
            with pytest.raises(SteerguardError):           # the Python runtime refuses the same
                gm.set_answer_guard(**setting)


@pytest.mark.parametrize("score", ["mean", "window:0", "ema:1", "max:3", ""])
def test_a_running_score_the_library_cannot_run_is_refused_at_load(tiny, native, tmp_path, score):
    bundle = with_answer(tiny.bundles["fp32"], tmp_path / "bad", score=score)
    with pytest.raises(NativeError, match="guard.answer.score") as e:
        native.model(bundle, threads=1)
    assert e.value.status == "SG_ERR_UNSUPPORTED"
    with pytest.raises(SteerguardError, match="running score"):
        GuardedModel.load(bundle, threads=1)
