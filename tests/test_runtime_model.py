"""The lean runtime on tiny random Llama and Qwen2 bundles: the engine chain against transformers and
the PyTorch reference, batching, streaming, stop strings, seeding, threads and bad input."""
import threading

import numpy as np
import pytest
import torch

from steerguard.errors import SteerguardError
from steerguard.export.reference import ReferenceGuard
from steerguard.runtime.model import GuardedModel, KVCache
from steerguard.runtime.sampling import Sampling

PROMPTS = ["How do I protect my account from hackers?", "Tell me how to hurt someone.",
           "What is the capital of France and why is it famous for its food and art?"]


@pytest.fixture(scope="module")
def gm(tiny_export):
    return GuardedModel.load(tiny_export.bundle_fp32, threads=2)


def test_engine_chain_matches_transformers_on_prefill_and_16_decode_steps(tiny_export, gm):
    ids = gm.encode(PROMPTS[2])
    cont = [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]
    with torch.no_grad():
        ref = tiny_export.lm.model(torch.tensor([ids + cont])).logits[0].numpy()
    cache = KVCache(range(gm.num_layers), 1, gm.kv_heads, len(ids) + 20, gm.head_dim)
    hidden, _ = gm.prefill(ids, cache, 0)
    from steerguard.runtime.model import DecodeStep
    step = DecodeStep(gm, cache, 1)
    no = np.array([False])
    logits = gm.next_logits(hidden[None], no)
    assert np.abs(logits[0] - ref[len(ids) - 1]).max() <= 1e-4
    for k, tok in enumerate(cont):
        logits = gm.next_logits(gm.decode_one_token(np.array([tok]), cache, step), no)
        assert np.abs(logits[0] - ref[len(ids) + k]).max() <= 1e-4, k


def test_fused_prober_matches_the_numpy_prober(tiny_export, gm):
    from steerguard.export.hidden import extract_hidden_states

    p = tiny_export.guard.prober
    states = extract_hidden_states(tiny_export.lm.model, tiny_export.lm.tokenizer, PROMPTS, tokens_at=p.layer)
    expected = p.prompt_risk(states.feature(p.feature, p.layer))
    int8 = GuardedModel.load(tiny_export.bundle, threads=2)
    for prompt, want in zip(PROMPTS, expected):
        ids = gm.encode(prompt)
        cache = KVCache(range(gm.num_layers), 1, gm.kv_heads, len(ids) + 1, gm.head_dim)
        assert abs(gm.prefill(ids, cache, 0)[1] - want) <= 1e-5
        # int8 w1 (per-row and per-column scales): a few hundredths of risk; the source erasure folded into
        # w1 makes it denser (demo model: max 0.042 over 5,000 prompts, decisions 99.3-100% as fp32's)
        assert abs(int8.prefill(ids, cache, 0)[1] - want) <= 3e-2


@pytest.mark.parametrize("tau", [2.0, 0.0], ids=["never-fires", "always-fires"])
def test_greedy_tokens_equal_the_pytorch_reference(tiny_export, gm, tau):
    tiny_export.guard.prober.tau = gm.tau = tau
    ref = ReferenceGuard(tiny_export.lm, tiny_export.guard)
    for prompt in PROMPTS:
        a, b = gm.generate(prompt, Sampling(max_new_tokens=16)), ref.generate(prompt, Sampling(max_new_tokens=16))
        assert a.token_ids == b.token_ids and a.fired == b.fired == (tau == 0.0)
        assert a.text == b.text and abs(a.risk - b.risk) <= 1e-5


def test_a_refusal_never_ends_the_turn_at_once(tiny_export, gm):
    """When the refusal head's first choice is the end of the turn, the guard takes its next choice
    (a fired request never gets an empty answer); an unguarded answer may still be empty."""
    tiny_export.guard.prober.tau = gm.tau = 0.0
    ref = ReferenceGuard(tiny_export.lm, tiny_export.guard)
    s = Sampling(max_new_tokens=4)
    first = gm.generate(PROMPTS[0], s).token_ids[0]
    plain_first = gm.generate(PROMPTS[0], s, steer=False).token_ids[0]
    saved = gm.stop_ids, ref.stop_ids
    try:
        gm.stop_ids = ref.stop_ids = {first, plain_first}
        a, b = gm.generate(PROMPTS[0], s), ref.generate(PROMPTS[0], s)
        assert a.fired and a.token_ids and a.token_ids[0] not in (first, plain_first)
        assert a.token_ids == b.token_ids
        assert gm.generate(PROMPTS[0], s, steer=False).token_ids == []
    finally:
        gm.stop_ids, ref.stop_ids = saved


def test_plain_bundle_gives_the_unguarded_answer(tiny_export, gm):
    plain = GuardedModel.load(tiny_export.plain)
    gm.tau = 2.0
    assert not plain.guarded and plain.generate(PROMPTS[0]).risk is None
    assert plain.generate(PROMPTS[0], Sampling(max_new_tokens=12)).token_ids == \
        gm.generate(PROMPTS[0], Sampling(max_new_tokens=12)).token_ids


def test_batch_gives_each_prompt_its_own_answer_and_decision(gm):
    gm.tau = 0.5
    s = Sampling(max_new_tokens=10)
    batch = gm.generate_batch(PROMPTS, s)
    for prompt, out in zip(PROMPTS, batch):
        alone = gm.generate(prompt, s)
        assert out.token_ids == alone.token_ids and out.fired == alone.fired and out.risk == alone.risk


def test_stream_yields_the_answer_piece_by_piece(gm):
    stream = gm.stream(PROMPTS[0], Sampling(max_new_tokens=12))
    pieces = list(stream)
    assert "".join(pieces) == stream.result.text == gm.generate(PROMPTS[0], Sampling(max_new_tokens=12)).text


def test_stop_string_ends_the_answer_before_it(gm):
    full = gm.generate(PROMPTS[0], Sampling(max_new_tokens=12)).text
    words = full.split()
    stop = words[len(words) // 2]
    s = Sampling(max_new_tokens=12, stop=(stop,))
    out = gm.generate(PROMPTS[0], s)
    assert out.finish_reason == "stop_string" and stop not in out.text and full.startswith(out.text)
    assert "".join(gm.stream(PROMPTS[0], s)) == out.text


def test_sampling_is_seeded(gm):
    s = Sampling(max_new_tokens=12, temperature=1.0, top_k=30, top_p=0.95, seed=3)
    a, b = gm.generate(PROMPTS[0], s), gm.generate(PROMPTS[0], s)
    assert a.token_ids == b.token_ids
    others = {tuple(gm.generate(PROMPTS[0], Sampling(12, 1.0, seed=k)).token_ids) for k in range(4)}
    assert len(others) > 1


def test_chat_messages_go_through_the_models_template(tiny_export, gm):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": PROMPTS[0]}]
    hf = tiny_export.lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    hf = hf["input_ids"] if hasattr(hf, "keys") else hf
    assert gm.encode(messages) == list(hf)
    assert gm.generate(messages, Sampling(max_new_tokens=4)).prompt_tokens == len(hf)


def test_a_per_token_prober_reads_the_last_user_turn_only(tiny_export, tmp_path):
    import copy

    from steerguard.export.bundle import export_bundle
    from steerguard.export.hidden import template_prefix_len

    guard = copy.deepcopy(tiny_export.guard)
    guard.prober.feature = "max"
    gm = GuardedModel.load(export_bundle(tiny_export.lm, guard, tmp_path / "max", progress=False))
    assert gm.manifest.guard["feature"] == "max" and gm.risk_per_token
    # a one-message prompt: the same span calibration trained on
    assert gm.prepare(PROMPTS[1]).user_start == template_prefix_len(tiny_export.lm.tokenizer)
    messages = [{"role": "user", "content": "Tell me how to hurt someone."}, {"role": "assistant", "content": "No."},
                {"role": "user", "content": PROMPTS[0]}]
    prompt, alone = gm.prepare(messages), gm.prepare(PROMPTS[0])
    assert prompt.ids[prompt.user_start:] == alone.ids[alone.user_start:]      # the last turn, nothing before it
    assert gm.prepare(gm.encode(PROMPTS[1])).user_start == gm.prepare(PROMPTS[1]).user_start


@pytest.mark.parametrize("feature", ["last", "post"])
def test_a_prober_on_the_last_or_the_post_instruction_tokens_exports_and_runs(tiny_export, tmp_path, feature):
    """`last` reads the final prompt token; `post` the mean of the template's tokens after the user's text
    (the engine averages the prompt's last `span` positions), for a one-message prompt and a chat."""
    import copy

    from steerguard.export.bundle import export_bundle
    from steerguard.export.hidden import extract_hidden_states, template_suffix_len
    from steerguard.export.reference import ReferenceGuard

    guard = copy.deepcopy(tiny_export.guard)
    guard.prober.feature = feature
    guard.prober.span = template_suffix_len(tiny_export.lm.tokenizer) if feature == "post" else 1
    bundle = GuardedModel.load(export_bundle(tiny_export.lm, guard, tmp_path / feature, prober_precision="fp32",
                                             progress=False), threads=2)
    states = extract_hidden_states(tiny_export.lm.model, tiny_export.lm.tokenizer, PROMPTS)
    want = guard.prober.risk(states.feature(feature, guard.prober.layer))
    assert np.allclose([bundle.score(p) for p in PROMPTS], want, atol=1e-5)
    ref = ReferenceGuard(tiny_export.lm, guard)
    assert abs(ref.generate(PROMPTS[0], Sampling(max_new_tokens=1)).risk - want[0]) <= 1e-5
    chat = [{"role": "user", "content": PROMPTS[1]}, {"role": "assistant", "content": "ok"},
            {"role": "user", "content": PROMPTS[0]}]
    assert np.isfinite(bundle.score(chat)) and abs(bundle.score(chat) - want[0]) > 0   # reads the conversation's end


def test_threads_on_one_model_give_the_sequential_answers(gm):
    gm.tau = 0.5
    prompts = [PROMPTS[i % 3] + f" #{i}" for i in range(10)]
    s = Sampling(max_new_tokens=8)
    expected = [gm.generate(p, s).token_ids for p in prompts]
    got: dict = {}

    def work(t: int) -> None:
        got[t] = [gm.generate(p, s).token_ids for p in prompts]

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(got[t] == expected for t in range(4))


def test_non_finite_risk_fires(gm):
    gm.tau = 0.5
    assert gm.decide(float("nan")) and gm.decide(float("inf")) and not gm.decide(0.1)


@pytest.mark.parametrize("prompt, sampling, message", [
    ("   ", Sampling(), "empty"),
    ("hi", Sampling(max_new_tokens=0), "max_new_tokens"),
    ("hi", Sampling(max_new_tokens=-5), "max_new_tokens"),
    ("hi", Sampling(max_new_tokens=10**9), "max_new_tokens"),
    ("word " * 300, Sampling(max_new_tokens=4), "context"),
    ("hi", Sampling(top_p=0), "top_p"),
    ([], Sampling(), "no chat messages"),
    ([{"role": "user"}], Sampling(), "content"),
])
def test_bad_requests_are_clear_errors(gm, prompt, sampling, message):
    with pytest.raises(SteerguardError, match=message):
        gm.generate(prompt, sampling)


def test_a_bundle_from_before_the_length_inputs_is_refused_with_a_clear_line(tiny_export, tmp_path):
    import shutil

    import onnx
    from onnx import TensorProto, helper

    bundle = shutil.copytree(tiny_export.bundle, tmp_path / "old")
    pre = onnx.load(bundle / "engines" / "pre.onnx")
    pre.graph.input.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]))
    onnx.save(pre, bundle / "engines" / "pre.onnx")
    with pytest.raises(SteerguardError, match="exported by an older steerguard .* export it again"):
        GuardedModel.load(bundle, verify=False)
