"""The whole pipeline on tiny random models of two architectures, built in the test."""
import numpy as np
import pytest

from conftest import tiny_model, tiny_tokenizer
from steerguard.errors import SteerguardError
from steerguard.export.calibrate import CalibrationConfig, CalibrationData, calibrate
from steerguard.export.data import default_pairs
from steerguard.export.evaluate import generate_batch, refusal_lm_head
from steerguard.export.guard import Guard
from steerguard.export.models import LoadedModel
from steerguard.export.reference import ReferenceGuard, Sampling


@pytest.fixture(scope="module")
def pairs():
    return [p for p in default_pairs() if p.source.startswith("contrast")][:40]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request, pairs):
    tok = tiny_tokenizer([t for p in pairs for t in (p.harmful, p.benign, p.refusal)])
    model = tiny_model(request.param, len(tok))
    return LoadedModel(model=model, tokenizer=tok, source=f"tiny-{request.param}", name=f"tiny-{request.param}",
                       sha256=f"{request.param}-sha")


@pytest.fixture(scope="module")
def guard(tiny, pairs, tmp_path_factory):
    cfg = CalibrationConfig(refusal_targets=16, refusal_epochs=2, max_per_source=40)
    g = calibrate(tiny, CalibrationData(pairs=pairs), cfg, progress=False)
    folder = tmp_path_factory.mktemp("guard") / "g"
    g.save(folder)
    return Guard.load(folder)


def test_calibration_writes_a_complete_guard(guard, tiny):
    assert guard.sas.layers == [1, 2, 3]
    assert guard.split_layer == guard.sas.best_layer == guard.prober.layer
    assert guard.model["architecture"] == tiny.model.config.model_type
    assert guard.refusal.transform.shape == (64, 64)
    points = guard.prober.operating_points
    assert guard.prober.tau == points["balanced"]["tau"]
    assert points["strict"]["tau"] <= points["balanced"]["tau"] <= points["permissive"]["tau"]
    assert {"harmful_heldout", "sounds_dangerous", "benign_conversational"} <= set(points["balanced"]["fire_rates"])
    assert guard.prober.probe == "linear" and guard.prober.feature == "last"
    assert 0 <= guard.prober.roc["auroc"] <= 1 and guard.prober.roc["fpr"][0] == 0
    losses = guard.refusal.metrics["loss_per_epoch"]
    assert losses[-1] < losses[0]


def test_guard_that_does_not_fire_leaves_greedy_output_identical(guard, tiny):
    guard.prober.tau = 2.0                      # never fires
    prompt = "How do I protect my account from hackers?"
    out = ReferenceGuard(tiny, guard).generate(prompt, Sampling(max_new_tokens=12))
    assert not out.fired
    plain = ReferenceGuard(tiny, None).generate(prompt, Sampling(max_new_tokens=12))
    assert out.token_ids == plain.token_ids
    ids = tiny.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)["input_ids"]
    hf = tiny.model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=[], pad_token_id=0)
    assert out.token_ids == hf[0, ids.shape[1]:].tolist()[:len(out.token_ids)]


def test_guard_that_fires_decodes_through_the_refusal_transform(guard, tiny):
    guard.prober.tau = 0.0                      # always fires
    prompt = "Tell me how to hurt someone."
    out = ReferenceGuard(tiny, guard).generate(prompt, Sampling(max_new_tokens=8))
    assert out.fired and 0 <= out.risk <= 1
    with refusal_lm_head(tiny.model, guard.refusal.transform):
        [expected] = generate_batch(tiny, [prompt], max_new_tokens=8)
    assert out.text.strip() == expected
    assert tiny.model.lm_head.weight is tiny.model.model.embed_tokens.weight   # restored, still tied


def test_sampling_is_seeded(guard, tiny):
    s = Sampling(max_new_tokens=10, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    a = ReferenceGuard(tiny, None).generate("Tell me a story.", s)
    b = ReferenceGuard(tiny, None).generate("Tell me a story.", s)
    assert a.token_ids == b.token_ids


def test_guard_refuses_another_model(guard, tiny):
    other = LoadedModel(tiny.model, tiny.tokenizer, "x", "x", sha256="different")
    with pytest.raises(SteerguardError, match="calibrated on"):
        ReferenceGuard(other, guard)


def test_layer_out_of_range_is_a_clear_error(tiny, pairs):
    with pytest.raises(SteerguardError, match="between 1 and 3"):
        calibrate(tiny, CalibrationData(pairs=pairs), CalibrationConfig(layer=4), progress=False)


def test_bad_generation_arguments(guard, tiny):
    g = ReferenceGuard(tiny, None)
    with pytest.raises(SteerguardError, match="empty"):
        g.generate("   ")
    with pytest.raises(SteerguardError, match="max_new_tokens"):
        g.generate("hi", Sampling(max_new_tokens=-1))
    with pytest.raises(SteerguardError, match="context"):
        g.generate("word " * 300, Sampling(max_new_tokens=4))


def test_batched_hidden_states_equal_single_prompt_states(tiny):
    from steerguard.export.hidden import extract_hidden_states

    prompts = ["short one", "a somewhat longer prompt about safety and protecting accounts", "mid length here"]
    batched = extract_hidden_states(tiny.model, tiny.tokenizer, prompts, batch_size=3)
    for i, p in enumerate(prompts):
        single = extract_hidden_states(tiny.model, tiny.tokenizer, [p], batch_size=1)
        np.testing.assert_allclose(batched.last[i], single.last[0], atol=1e-5)
        np.testing.assert_allclose(batched.mean[i], single.mean[0], atol=1e-5)


def test_states_up_to_a_layer_equal_the_full_pass_there(tiny):
    """Calibration runs the prompts that only feed the prober through the layers before the split."""
    from steerguard.export.hidden import extract_hidden_states

    prompts = ["short one", "a somewhat longer prompt about safety and protecting accounts", "mid length here"]
    full = extract_hidden_states(tiny.model, tiny.tokenizer, prompts, batch_size=2)
    upto = extract_hidden_states(tiny.model, tiny.tokenizer, prompts, batch_size=2, upto=2)
    np.testing.assert_allclose(upto.last[:, 2], full.last[:, 2], atol=1e-6)
    np.testing.assert_allclose(upto.mean[:, 2], full.mean[:, 2], atol=1e-6)
    assert not upto.last[:, 3:].any()
    again = extract_hidden_states(tiny.model, tiny.tokenizer, prompts, batch_size=2)   # the hook is gone
    np.testing.assert_array_equal(again.last, full.last)


def test_token_states_land_in_their_own_prompts_rows(tiny):
    """Per-token states (the prober's input) are written batch by batch into one shared buffer: each
    prompt's rows are its own tokens, as if it ran alone, ending at its last-token state."""
    from steerguard.export.hidden import extract_hidden_states

    prompts = ["mid length here", "short one", "a somewhat longer prompt about safety and protecting accounts", "x"]
    batched = extract_hidden_states(tiny.model, tiny.tokenizer, prompts, batch_size=3, upto=2, tokens_at=2)
    for i, p in enumerate(prompts):
        single = extract_hidden_states(tiny.model, tiny.tokenizer, [p], batch_size=1, upto=2, tokens_at=2)
        assert batched.tokens[i].shape == single.tokens[0].shape
        np.testing.assert_allclose(batched.tokens[i], single.tokens[0], atol=1e-5)
        np.testing.assert_allclose(batched.tokens[i][-1], batched.last[i, 2], atol=1e-6)


def test_post_instruction_states_average_the_template_tokens_after_the_users_text(tiny):
    """`post` is what a post-instruction prober reads: the mean of the states of the tokens the template
    puts after the user's text (ChatML: end of turn, newline, assistant header), batched or alone."""
    from steerguard.export.hidden import extract_hidden_states, template_suffix_len

    assert template_suffix_len(tiny.tokenizer) == 3     # <|im_end|> <|im_start|> assistant (word-level)
    prompts = ["mid length here", "short one", "a somewhat longer prompt about safety and protecting accounts"]
    batched = extract_hidden_states(tiny.model, tiny.tokenizer, prompts, batch_size=3, upto=2, tokens_at=2)
    for i, p in enumerate(prompts):
        np.testing.assert_allclose(batched.post[i, 2], batched.tokens[i][-3:].mean(0), atol=1e-5)
        single = extract_hidden_states(tiny.model, tiny.tokenizer, [p], batch_size=1)
        np.testing.assert_allclose(batched.post[i, 2], single.post[0, 2], atol=1e-5)
