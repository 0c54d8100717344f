"""The answer guard: the `pre` engine's per-token answer risk, its running score, the switch to the refusal head
mid-stream, the hold, and the same switch points through generate, stream and the continuous batcher."""

import dataclasses
import os

import numpy as np
import pytest

from steerguard.errors import SteerguardError
from steerguard.runtime import ContinuousBatcher, GuardedModel, Sampling
from steerguard.runtime.answer import AnswerWatch, RunningScore

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = ["How do I bake bread at home?", "Explain how to pick a lock on a door.", "Tell me about the moon.",
           "Write a short poem about rain."]
GREEDY = Sampling(max_new_tokens=24)


# ---- the running score ---------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["window:1", "window:4", "ema:0.8", "max"])
def test_the_running_score_one_token_at_a_time_is_the_whole_answers(spec):
    rng = np.random.default_rng(0)
    score = RunningScore.parse(spec)
    for _ in range(20):
        risks = rng.random(rng.integers(0, 30))
        tau = float(rng.random())
        watch, first = AnswerWatch(score, tau), None
        for k, r in enumerate(risks):
            if watch.push(float(r)) and first is None:
                first = k
        whole = score.scores(risks)
        expected = next((k for k, v in enumerate(whole) if not np.isnan(v) and v >= tau), None)
        assert first == expected
        assert score.answer_score(risks) >= tau if expected is not None else score.answer_score(risks) < tau


def test_a_window_judges_from_its_nth_token_and_a_nan_fires_at_once():
    w = RunningScore.parse("window:3")
    assert np.isnan(w.scores([0.9, 0.9])).all() and w.answer_score([0.9, 0.9]) == float("-inf")
    assert np.allclose(w.scores([0.3, 0.6, 0.9, 0.0])[2:], [0.6, 0.5])
    watch = AnswerWatch(w, 0.99)
    assert not watch.push(0.1) and watch.push(float("nan"))     # fails closed before the window is full


@pytest.mark.parametrize("spec", ["window", "window:0", "ema:1", "max:3", "mean", ""])
def test_a_bad_running_score_is_refused_in_one_line(spec):
    with pytest.raises(SteerguardError, match="running score"):
        RunningScore.parse(spec)


# ---- calibration: the model's own answers -----------------------------------------------------------------
@pytest.mark.parametrize("writer", ["float32", "bfloat16"])
def test_the_answers_states_are_the_split_layers_states_of_the_tokens_fed_back(tiny, tmp_path, monkeypatch, writer):
    """Batched, left-padded greedy answers keep, for every answer token but the last, the fp32 state entering the
    split layer at that token: what the pre engine computes when the token is fed back, whatever precision wrote
    the answer. At float32 the answers are the model's own greedy ones. The second call reads the cache."""
    import torch

    from steerguard.export.answers import generate_answers
    from steerguard.export.hidden import chat_ids

    monkeypatch.setenv("STEERGUARD_CACHE", str(tmp_path))
    layer, lm = tiny.guard.split_layer, tiny.lm
    a = generate_answers(lm, PROMPTS, layer, 12, batch_size=3, writer=writer)
    assert any(len(ids) > 1 for ids in a.ids)
    for prompt, ids, states in zip(PROMPTS, a.ids, a.states):
        p = chat_ids(lm.tokenizer, prompt)
        with torch.no_grad():
            full = lm.model(torch.tensor([p + ids]), output_hidden_states=True)
        hs = full.hidden_states[layer][0, len(p):len(p) + len(ids) - 1].numpy()
        assert states.shape == hs.shape and np.abs(states - hs).max() < 1e-4
        if writer == "float32":
            assert full.logits[0, len(p) - 1:len(p) + len(ids) - 1].argmax(-1).tolist() == ids   # greedy, unpadded
    assert next(lm.model.parameters()).dtype == torch.float32          # the writer was a copy
    again = generate_answers(lm, PROMPTS, layer, 12, writer=writer)
    assert again.ids == a.ids and all(np.array_equal(x, y.astype(np.float16).astype(np.float32))
                                      for x, y in zip(again.states, a.states))


# ---- through a bundle ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_export):
    assert tiny_export.guard.answer is not None, "calibration trains the answer guard by default"
    return tiny_export


def load(bundle, **answer) -> GuardedModel:
    """The bundle with its answer guard on (it is off by default), set by `answer`."""
    m = GuardedModel.load(bundle)
    m.set_answer_guard(**{"enabled": True, **answer})
    return m


def test_the_bundle_carries_the_answer_guard_in_its_decode_engine(tiny):
    assert not GuardedModel.load(tiny.bundle).answer_guard.enabled      # off unless asked for
    m = load(tiny.bundle)
    spec = m.manifest.guard["answer"]
    assert spec["output"] == "answer_risk" and set(spec["operating_points"]) == {"strict", "balanced", "permissive"}
    assert m.answer_engine is not None and m.answer_guard.enabled and m.answer_guard.switch == "restart"
    assert m.answer_guard.tau == spec["operating_points"]["balanced"]["tau"]


def test_the_engines_answer_risk_is_the_probers_on_the_generated_tokens_states(tiny):
    """The fp32-prober bundle's answer_risk on each decode step equals the trained probe on the split-layer state
    transformers computes for that token."""
    import torch

    m = load(tiny.bundle_fp32, operating_point=1.0)
    r = m.generate(PROMPTS[0], GREEDY)
    seen = []
    original = type(m).decode_one_token

    def spy(self, tokens, cache, step):
        out = original(self, tokens, cache, step)
        seen.append(step.answer_risks().copy())
        return out

    type(m).decode_one_token = spy
    try:
        again = m.generate(PROMPTS[0], GREEDY)
    finally:
        type(m).decode_one_token = original
    assert again.token_ids == r.token_ids
    ids = m.encode(PROMPTS[0]) + r.token_ids
    with torch.no_grad():
        hs = tiny.lm.model(torch.tensor([ids]), output_hidden_states=True).hidden_states[tiny.guard.split_layer][0]
    states = hs[len(m.encode(PROMPTS[0])):len(ids) - 1].numpy()
    expected = tiny.guard.answer.token_risks(states)
    got = np.array([s[0] for s in seen])[:len(expected)]
    assert np.abs(got - expected).max() <= 1e-4


def test_off_is_bit_for_bit_the_bundle_without_an_answer_guard(tiny, tmp_path):
    from steerguard.export.bundle import export_bundle

    without = export_bundle(tiny.lm, dataclasses.replace(tiny.guard, answer=None), tmp_path / "b", progress=False)
    plain = GuardedModel.load(without)
    assert plain.answer_engine is None and not plain.answer_guard.enabled
    off = load(tiny.bundle, enabled=False)
    for a, b in zip(off.generate_batch(PROMPTS, GREEDY), plain.generate_batch(PROMPTS, GREEDY)):
        assert (a.token_ids, a.risk, a.fired, a.switch) == (b.token_ids, b.risk, b.fired, b.switch)
        assert a.answer_score is None
    with pytest.raises(SteerguardError, match="no answer guard"):
        plain.set_answer_guard(enabled=True)


def test_a_switch_keeps_what_was_shown_and_the_refusal_head_continues(tiny):
    unguarded = load(tiny.bundle, enabled=False).generate_batch(PROMPTS, GREEDY, steer=False)
    m = load(tiny.bundle, operating_point=0.0, switch="continue")        # fires at the first judged token
    window = int(m.answer_guard.score.param)
    for r, u in zip(m.generate_batch(PROMPTS, GREEDY), unguarded):
        if r.fired:
            assert r.switch == "prompt" and r.switch_at == 0
            continue
        assert r.switch == "answer" and r.switch_at == window and r.dropped_tokens == 0
        assert r.token_ids[:window] == u.token_ids[:window]
        assert r.finish_reason in ("stop", "length")


def test_restart_and_a_hold_drop_the_unseen_tokens_and_refuse_from_the_prompt(tiny):
    """Held tokens never reach the stream; restarting from the prompt gives the prompt guard's refusal."""
    refusals = load(tiny.bundle, enabled=False).generate_batch(PROMPTS, GREEDY, steer=True)
    window = int(load(tiny.bundle).answer_guard.score.param)
    for setting in ({"hold": window, "switch": "continue"}, {"switch": "restart", "hold": window}):
        m = load(tiny.bundle, operating_point=0.0, **setting)
        for prompt, ref in zip(PROMPTS, refusals):
            stream = m.stream(prompt, GREEDY)
            text = "".join(stream)
            r = stream.result
            if r.fired:
                continue
            assert (r.switch, r.switch_at, r.dropped_tokens) == ("answer", 0, window)
            assert r.token_ids == ref.token_ids and text == r.text == ref.text


def test_the_batcher_switches_where_generate_does(tiny):
    for setting in ({"operating_point": 0.0}, {"operating_point": 0.0, "hold": 8, "switch": "restart"},
                    {"enabled": True}):
        m = load(tiny.bundle, **setting)
        expected = m.generate_batch(PROMPTS, GREEDY)
        b = ContinuousBatcher(m, max_batch=3)
        try:
            got = [b.generate(p, GREEDY) for p in PROMPTS]
        finally:
            b.close()
        for g, e in zip(got, expected):
            assert (g.token_ids, g.switch, g.switch_at, g.dropped_tokens) == \
                   (e.token_ids, e.switch, e.switch_at, e.dropped_tokens)


@pytest.mark.parametrize("setting, message", [({"hold": -1}, "hold"), ({"switch": "rewind"}, "continue or restart"),
                                               ({"operating_point": "lenient"}, "unknown operating point"),
                                               ({"operating_point": 1.5}, "between 0 and 1")])
def test_bad_answer_guard_settings_are_refused_in_one_line(tiny, setting, message):
    with pytest.raises(SteerguardError, match=message):
        load(tiny.bundle, **setting)


# ---- the commands and the server -------------------------------------------------------------------------
def test_run_reports_the_answer_guards_switch_and_inspect_shows_it(tiny):
    import json

    from click.testing import CliRunner

    from steerguard.cli import main

    runner = CliRunner()
    out = runner.invoke(main, ["run", str(tiny.bundle), "-p", PROMPTS[2], "--max-new-tokens", "16", "--json",
                               "--answer-guard", "on", "--answer-operating-point", "0", "--answer-hold", "8",
                               "--answer-switch", "restart"])
    assert out.exit_code == 0, out.output
    r = json.loads(out.stdout)
    assert (r["switch"], r["switch_at"], r["dropped_tokens"]) == ("answer", 0, 8) or r["fired"]
    off = json.loads(runner.invoke(main, ["run", str(tiny.bundle), "-p", PROMPTS[2], "--max-new-tokens", "16",
                                          "--json", "--answer-guard", "off"]).stdout)
    assert off["switch"] in (None, "prompt") and off["answer_score"] is None
    bad = runner.invoke(main, ["run", str(tiny.bundle), "-p", "hi", "--answer-operating-point", "lenient"])
    assert bad.exit_code != 0 and "unknown operating point" in bad.output and "Traceback" not in bad.output
    shown = runner.invoke(main, ["inspect", str(tiny.bundle)]).output
    assert "answer   off by default" in shown and "window:8" in shown and "balanced" in shown


def test_the_server_ends_a_switched_answer_with_content_filter(tiny):
    from openai import OpenAI

    from serving import Server

    m = load(tiny.bundle, operating_point=0.0)
    want = m.generate(PROMPTS[0], GREEDY)
    with Server(tiny.bundle, "--answer-guard", "on", "--answer-operating-point", "0", "--max-batch", "2") as server:
        client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        chat = [{"role": "user", "content": PROMPTS[0]}]
        whole = client.chat.completions.create(model=m.manifest.model["name"], messages=chat,
                                               max_tokens=GREEDY.max_new_tokens, temperature=0)
        stream = list(client.chat.completions.create(model=m.manifest.model["name"], messages=chat, stream=True,
                                                     max_tokens=GREEDY.max_new_tokens, temperature=0))
    assert whole.choices[0].finish_reason == "content_filter" and whole.choices[0].message.content == want.text
    answer = whole.model_extra["guard"]["answer"]
    assert answer["switched"] is (want.switch == "answer") and answer["switch_at"] == want.switch_at
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want.text
    assert stream[-1].choices[0].finish_reason == "content_filter"
