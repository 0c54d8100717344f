import numpy as np
import pytest

from conftest import tiny_model, tiny_tokenizer
from steerguard.export.models import LoadedModel
from steerguard.export.state_cache import cached_hidden_states, state_path

PROMPTS = ["short one", "a somewhat longer prompt about safety and protecting accounts", "mid length here"]


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STEERGUARD_CACHE", str(tmp_path))
    return tmp_path


def tiny_lm(seed: int = 0) -> LoadedModel:
    tok = tiny_tokenizer(PROMPTS + ["other words entirely"])
    return LoadedModel(model=tiny_model("qwen2", len(tok), seed=seed), tokenizer=tok, source="tiny", name="tiny",
                       sha256="same-label")


@pytest.mark.parametrize("upto,tokens_at", [(None, None), (2, 2), (2, None)])
def test_a_second_extraction_reads_the_same_states_from_disk(cache, upto, tokens_at):
    lm = tiny_lm()
    first = cached_hidden_states(lm, PROMPTS, batch_size=2, upto=upto, tokens_at=tokens_at)
    path = state_path(lm, PROMPTS, upto, tokens_at)
    assert path.exists() and path.parent == cache / "hidden"
    again = cached_hidden_states(lm, PROMPTS, batch_size=2, upto=upto, tokens_at=tokens_at)
    np.testing.assert_array_equal(again.last, first.last)
    np.testing.assert_array_equal(again.mean, first.mean)
    np.testing.assert_array_equal(again.lengths, first.lengths)
    assert again.tokens_layer == first.tokens_layer
    if tokens_at is not None:
        for a, b in zip(again.tokens, first.tokens):
            np.testing.assert_array_equal(a, b)


def test_other_prompts_layers_or_weights_get_their_own_entry(cache):
    lm = tiny_lm()
    keys = {state_path(lm, PROMPTS, 2, None), state_path(lm, PROMPTS[:2], 2, None), state_path(lm, PROMPTS, 3, None),
            state_path(tiny_lm(seed=1), PROMPTS, 2, None)}   # same source label, other weights
    assert len(keys) == 4


def test_a_damaged_entry_is_recomputed(cache):
    lm = tiny_lm()
    first = cached_hidden_states(lm, PROMPTS, upto=2)
    state_path(lm, PROMPTS, 2, None).write_bytes(b"not an npz")
    again = cached_hidden_states(lm, PROMPTS, upto=2)
    np.testing.assert_allclose(again.last[:, 2], first.last[:, 2], atol=1e-6)


def test_a_pass_without_token_states_reuses_one_that_kept_them(cache):
    """Calibrating a last-token or post-instruction prober after a per-token one reads the same entry."""
    lm = tiny_lm()
    with_tokens = cached_hidden_states(lm, PROMPTS, upto=2, tokens_at=2)
    without = cached_hidden_states(lm, PROMPTS, upto=2)
    assert not state_path(lm, PROMPTS, 2, None).exists()
    np.testing.assert_array_equal(without.post[:, 2], with_tokens.post[:, 2])
