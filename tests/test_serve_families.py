"""`steerguard serve` on a family of issue 24: a tiny random Gemma 3 model (built as tests/test_families.py
builds it) exported with a guard, served by the real server process and asked over HTTP with the openai
client: whole and streamed chat completions give the Python runtime's greedy answer."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
from openai import OpenAI  # noqa: E402

from serving import Server  # noqa: E402
from test_families import calibration_pairs, family_lm, prompts  # noqa: E402

from steerguard.runtime.model import GuardedModel  # noqa: E402
from steerguard.runtime.sampling import Sampling  # noqa: E402

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from steerguard.export.bundle import export_bundle
    from steerguard.export.calibrate import CalibrationConfig, CalibrationData, calibrate

    lm = family_lm("gemma3_text")
    cfg = CalibrationConfig(refusal_targets=16, refusal_epochs=2, max_per_source=40)
    guard = calibrate(lm, CalibrationData(pairs=calibration_pairs()), cfg, progress=False)
    return export_bundle(lm, guard, tmp_path_factory.mktemp("serve-gemma3") / "bundle", progress=False)


@pytest.fixture(scope="module")
def gm(bundle):
    return GuardedModel.load(bundle, threads=2)


@pytest.fixture(scope="module")
def client(bundle):
    with Server(bundle, "--max-batch", "2") as server:
        yield OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def chats() -> list[list[dict]]:
    first, second = prompts(2)
    return [[{"role": "user", "content": first}],
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": second}]]


def finish_reason(result) -> str:
    if result.fired or result.switch == "answer":    # the prompt guard, or the answer guard mid-stream
        return "content_filter"
    return "length" if result.finish_reason == "length" else "stop"


def test_a_new_family_serves_the_runtimes_greedy_answers(client, gm):
    """The server returns text, not ids: the same text, the same number of tokens, the same finish reason and
    guard decision as GuardedModel.generate, whole and streamed."""
    name = gm.manifest.model["name"]
    assert [m.id for m in client.models.list().data] == [name]
    for chat in chats():
        want = gm.generate(chat, Sampling(max_new_tokens=NEW_TOKENS))
        assert want.text and want.token_ids
        whole = client.chat.completions.create(model=name, messages=chat, max_tokens=NEW_TOKENS, temperature=0)
        assert whole.choices[0].message.content == want.text
        assert whole.usage.completion_tokens == len(want.token_ids)
        assert whole.usage.prompt_tokens == want.prompt_tokens
        assert whole.choices[0].finish_reason == finish_reason(want)
        assert whole.model_extra["guard"]["risk"] == want.risk and whole.model_extra["guard"]["fired"] == want.fired
        chunks = list(client.chat.completions.create(model=name, messages=chat, max_tokens=NEW_TOKENS, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
        assert chunks[-1].usage.completion_tokens == len(want.token_ids)
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
            [finish_reason(want)]
