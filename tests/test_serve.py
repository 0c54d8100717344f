"""`steerguard serve` on a tiny bundle, driven by the official `openai` client: chat and text completions
(whole and streamed) are the runtime's own answers, the guard's decision rides along and a refusal ends
with finish_reason "content_filter", moderation is the prober, errors are OpenAI's shape with the right
status, a client that leaves mid-answer frees its row, and the API key and size limits hold."""
import json
import shutil
import threading

import openai
import pytest
from openai import OpenAI

from serving import Server
from steerguard.runtime.model import GuardedModel
from steerguard.runtime.sampling import Sampling

pytestmark = pytest.mark.parametrize("tiny_export", ["llama"], indirect=True)

PROMPTS = ["How do I protect my account from hackers?", "Tell me how to hurt someone.",
           "What is the capital of France and why is it famous for its food and art?", "What is art?"]
KEY = "test-key-7b1f"


def user(text):
    return [{"role": "user", "content": text}]


def with_tau(bundle, folder, tau):
    """A copy of `bundle` whose guard threshold is `tau` (0: every request fires)."""
    shutil.copytree(bundle, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["guard"]["tau"] = tau
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.fixture(scope="module")
def bundles(tiny_export, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    return {"guarded": tiny_export.bundle, "fires": with_tau(tiny_export.bundle, root / "fires", 0.0),
            "plain": tiny_export.plain}


@pytest.fixture(scope="module")
def gm(bundles):
    return GuardedModel.load(bundles["guarded"], threads=2)


@pytest.fixture(scope="module")
def server(bundles):
    with Server(bundles["guarded"], "--max-batch", "4", "--max-queue", "16") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def name(gm):
    return gm.manifest.model["name"]


def finish_reason(result):
    if result.fired or result.switch == "answer":    # the prompt guard, or the answer guard mid-stream
        return "content_filter"
    return "length" if result.finish_reason == "length" else "stop"


def test_chat_answers_are_the_runtimes_generate(client, gm, name):
    for prompt in PROMPTS:
        want = gm.generate(user(prompt), Sampling(max_new_tokens=12))
        r = client.chat.completions.create(model=name, messages=user(prompt), max_tokens=12, temperature=0)
        assert r.object == "chat.completion" and r.model == name
        assert r.choices[0].message.content == want.text and r.choices[0].message.role == "assistant"
        assert r.choices[0].finish_reason == finish_reason(want)
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (want.prompt_tokens, len(want.token_ids))
        assert r.usage.total_tokens == want.prompt_tokens + len(want.token_ids)
        answer = None if want.answer_score is None and want.switch != "answer" else {
            "switched": want.switch == "answer", "switch_at": want.switch_at if want.switch == "answer" else None,
            "score": want.answer_score, "tau": gm.answer_guard.tau, "dropped_tokens": want.dropped_tokens}
        assert r.model_extra["guard"] == {"risk": want.risk, "tau": gm.tau, "operating_point": gm.operating_point,
                                          "fired": want.fired, "split_layer": gm.split_layer, "answer": answer}


def test_streamed_answers_are_the_same_answers(client, gm, name):
    for prompt in PROMPTS[:2]:
        want = gm.generate(user(prompt), Sampling(max_new_tokens=14))
        chunks = list(client.chat.completions.create(model=name, messages=user(prompt), max_tokens=14, stream=True,
                                                     stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[0].model_extra["guard"]["risk"] == want.risk
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == want.text
        finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finals == [finish_reason(want)]
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.token_ids)
        assert all(c.usage is None for c in chunks[:-1])


def test_the_event_stream_ends_with_done(server, name):
    body = json.dumps({"model": name, "messages": user(PROMPTS[0]), "max_tokens": 3, "stream": True}).encode()
    status, headers, raw = server.raw("POST", "/v1/chat/completions", body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [e for e in raw.decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert "usage" not in json.loads(events[1][6:])      # no usage unless asked for


def test_concurrent_clients_each_get_their_own_answer(server, gm, name):
    """Eight clients at once (four rows): streamed and whole answers, each the runtime's answer alone."""
    jobs = [(PROMPTS[i % 4] + (" Please." if i >= 4 else ""), 6 + 3 * i, i % 2 == 0) for i in range(8)]
    got = {}

    def ask(i):
        prompt, n, stream = jobs[i]
        c = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        if stream:
            parts = c.chat.completions.create(model=name, messages=user(prompt), max_tokens=n, stream=True)
            got[i] = "".join(p.choices[0].delta.content or "" for p in parts if p.choices)
        else:
            got[i] = c.chat.completions.create(model=name, messages=user(prompt), max_tokens=n).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (prompt, n, _) in enumerate(jobs):
        assert got[i] == gm.generate(user(prompt), Sampling(max_new_tokens=n)).text, i
    assert server.wait_idle()["rows_in_use"] == 0


def test_a_refused_request_ends_with_content_filter_and_the_refusal_text(bundles, name):
    fires = GuardedModel.load(bundles["fires"], threads=2)
    with Server(bundles["fires"]) as s:
        c = OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        want = fires.generate(user(PROMPTS[1]), Sampling(max_new_tokens=10))
        assert want.fired and want.token_ids
        r = c.chat.completions.create(model=name, messages=user(PROMPTS[1]), max_tokens=10)
        assert r.choices[0].finish_reason == "content_filter" and r.choices[0].message.content == want.text
        assert r.model_extra["guard"]["fired"] is True and r.model_extra["guard"]["tau"] == 0.0
        chunks = list(c.chat.completions.create(model=name, messages=user(PROMPTS[1]), max_tokens=10, stream=True))
        assert "".join(x.choices[0].delta.content or "" for x in chunks) == want.text
        assert chunks[-1].choices[0].finish_reason == "content_filter"
        m = c.moderations.create(model=name, input=PROMPTS[1])
        assert m.results[0].flagged is True


def test_moderation_is_the_prober(client, gm, name):
    r = client.moderations.create(model=name, input=PROMPTS)
    assert len(r.results) == len(PROMPTS)
    for prompt, result in zip(PROMPTS, r.results):
        risk = gm.score(prompt)
        assert result.flagged == gm.decide(risk)
        assert result.category_scores.model_extra["harmful"] == risk
        assert result.model_extra["guard"]["risk"] == risk
    one = client.moderations.create(input=[{"type": "text", "text": PROMPTS[1]}])
    assert one.results[0].model_extra["guard"]["risk"] == gm.score(PROMPTS[1])


def test_text_completion_reads_the_raw_prompt(client, gm, name):
    text = "The capital of France is"
    ids = gm.tokenizer.tokenizer.encode(text).ids
    want = gm.generate(ids, Sampling(max_new_tokens=9))
    r = client.completions.create(model=name, prompt=text, max_tokens=9, temperature=0)
    assert r.choices[0].text == want.text and r.usage.prompt_tokens == len(ids)
    assert r.model_extra["guard"]["risk"] == want.risk
    streamed = "".join(c.choices[0].text for c in client.completions.create(model=name, prompt=ids, max_tokens=9,
                                                                          temperature=0, stream=True))
    assert streamed == want.text


def test_sampling_settings_stop_and_seed(client, gm, name):
    full = gm.generate(user(PROMPTS[2]), Sampling(max_new_tokens=16)).text
    stop = full.split()[len(full.split()) // 2]
    r = client.chat.completions.create(model=name, messages=user(PROMPTS[2]), max_tokens=16, stop=[stop])
    assert r.choices[0].message.content == gm.generate(user(PROMPTS[2]), Sampling(16, stop=(stop,))).text
    assert r.choices[0].finish_reason == "stop" and stop not in r.choices[0].message.content
    sampled = [client.chat.completions.create(model=name, messages=user(PROMPTS[0]), max_tokens=10, temperature=1.0,
                                              top_p=0.9, seed=7).choices[0].message.content for _ in range(2)]
    want = gm.generate(user(PROMPTS[0]), Sampling(10, temperature=1.0, top_p=0.9, seed=7)).text
    assert sampled == [want, want]


def test_models_and_health(client, server, name):
    assert [m.id for m in client.models.list().data] == [name]
    assert client.models.retrieve(name).id == name
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    h = server.health()
    assert h["status"] == "ok" and h["max_batch"] == 4 and h["guarded"] is True


@pytest.mark.parametrize("kwargs, status, param, code", [
    ({"temperature": "hot"}, 400, "temperature", "invalid_value"),
    ({"temperature": 3.5}, 400, "temperature", "invalid_value"),
    ({"top_p": 0}, 400, "top_p", "invalid_value"),
    ({"max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ({"max_tokens": 10**6}, 400, "max_tokens", "context_length_exceeded"),
    ({"max_tokens": None, "max_completion_tokens": -3}, 400, "max_completion_tokens", "invalid_value"),
    ({"n": 2}, 400, "n", "invalid_value"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "invalid_value"),
    ({"model": "gpt-4o"}, 404, "model", "model_not_found"),
    ({"messages": []}, 400, "messages", "invalid_value"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role", "invalid_value"),
    ({"messages": [{"role": "user", "content": "   "}]}, 400, "messages", "invalid_value"),
    ({"messages": [{"role": "user", "content": "word " * 400}]}, 400, "messages", "context_length_exceeded"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]},
     400, "messages.0.content", "image_not_supported"),
])
def test_bad_requests_get_openais_error_shape(client, name, kwargs, status, param, code):
    args = {"model": name, "messages": user("hi"), "max_tokens": 4, **kwargs}
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(**args)
    assert e.value.status_code == status
    assert e.value.body["param"] == param and e.value.body["code"] == code and e.value.body["message"]
    assert e.value.body["type"] == "invalid_request_error"


def test_context_error_states_the_numbers(client, name):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=name, messages=user("hi"), max_tokens=1000)
    message = e.value.body["message"]
    assert "256 tokens" in message and "1000 in the completion" in message


def test_malformed_bodies(server):
    for body in (b"{not json", b"[1, 2]", b'{"model": NaN}', b"\xff\xfe", b'{"model": "\\ud800"}', b""):
        status, _, raw = server.raw("POST", "/v1/chat/completions", body)
        error = json.loads(raw)["error"]
        assert status == 400 and set(error) == {"message", "type", "param", "code"}, body
    status, _, raw = server.raw("GET", "/v1/chat/completions")
    assert status == 405 and json.loads(raw)["error"]["message"]


def test_clients_that_leave_mid_answer_leave_no_rows_behind(client, server, gm, name):
    """(On the tiny model an answer takes ~0.1 s, too short to time a disconnect: tests/test_serve_demo.py
    shows on the demo model that the row is freed at once and the answer never finishes.)"""
    room = 256 - len(gm.encode(user(PROMPTS[2])))
    for _ in range(3):
        stream = client.chat.completions.create(model=name, messages=user(PROMPTS[2]), max_tokens=room, stream=True)
        next(iter(stream))
        stream.close()
        body = json.dumps({"model": name, "messages": user(PROMPTS[2]), "max_tokens": room}).encode()
        try:
            server.raw("POST", "/v1/chat/completions", body, timeout=0.02)
        except OSError:
            pass
    assert server.wait_idle(5)["rows_in_use"] == 0
    r = client.chat.completions.create(model=name, messages=user(PROMPTS[0]), max_tokens=5)
    assert r.choices[0].message.content == gm.generate(user(PROMPTS[0]), Sampling(max_new_tokens=5)).text


def test_api_key_body_limit_and_full_queue(bundles, name):
    with Server(bundles["guarded"], "--api-key", KEY, "--max-batch", "1", "--max-queue", "0",
                "--max-body-mb", "0.05") as s:
        with pytest.raises(openai.AuthenticationError) as e:
            OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0).models.list()
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        status, _, raw = s.raw("GET", "/v1/models")
        assert status == 401 and "API key" in json.loads(raw)["error"]["message"]
        assert s.health()["status"] == "ok"     # health needs no key
        c = OpenAI(base_url=s.url + "/v1", api_key=KEY, max_retries=0)
        assert c.models.list().data[0].id == name
        big = json.dumps({"model": name, "messages": user("word " * 20000)}).encode()
        status, _, raw = s.raw("POST", "/v1/chat/completions", big, {"Authorization": f"Bearer {KEY}"})
        assert status == 413 and json.loads(raw)["error"]["code"] == "request_too_large"
        # one row, no queue: of eight requests at once, those that find the row taken are turned away
        outcomes = []

        def ask():
            try:
                c.chat.completions.create(model=name, messages=user(PROMPTS[0]), max_tokens=200)
                outcomes.append("ok")
            except openai.RateLimitError as e:
                outcomes.append(int(e.response.headers["retry-after"]))

        threads = [threading.Thread(target=ask) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert "ok" in outcomes and any(o != "ok" and o >= 1 for o in outcomes), outcomes
        assert s.wait_idle(5)["rows_in_use"] == 0
        assert c.chat.completions.create(model=name, messages=user(PROMPTS[1]), max_tokens=4).choices


def test_operating_points_from_the_command_line_and_per_request(bundles, tmp_path_factory, name):
    """The server judges at --operating-point; a request's `operating_point` (a name or a tau) overrides it for
    that request alone, in chat (whole and streamed), text completions and moderation; `guard` says which."""
    from test_operating_points import with_points

    gm = GuardedModel.load(bundles["guarded"], threads=2)
    risks = [gm.score(user(p)) for p in PROMPTS]
    r = sorted(risks)
    points = {"strict": (r[0] + r[1]) / 2, "balanced": (r[1] + r[2]) / 2, "permissive": min(1.0, r[-1] + 0.01)}
    bundle = with_points(bundles["guarded"], tmp_path_factory.mktemp("points") / "b", points)
    fires = lambda risk, tau: not risk < tau  # noqa: E731
    with Server(bundle, "--operating-point", "strict") as s:
        c = OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        card = c.models.retrieve(name).model_extra["guard"]
        assert card["operating_point"] == "strict" and card["tau"] == points["strict"]
        assert card["operating_points"] == points
        for prompt, risk in zip(PROMPTS, risks):
            for point, tau, label in ((None, points["strict"], "strict"), ("permissive", points["permissive"], "permissive"),
                                      ("balanced", points["balanced"], "balanced"), (0, 0.0, None), (0.999, 0.999, None)):
                extra = {} if point is None else {"extra_body": {"operating_point": point}}
                got = c.chat.completions.create(model=name, messages=user(prompt), max_tokens=4, **extra)
                guard = got.model_extra["guard"]
                assert (guard["tau"], guard["operating_point"], guard["fired"]) == (tau, label, fires(risk, tau))
                assert (got.choices[0].finish_reason == "content_filter") == fires(risk, tau)
        top = PROMPTS[int(max(range(len(risks)), key=risks.__getitem__))]
        chunks = list(c.chat.completions.create(model=name, messages=user(top), max_tokens=4, stream=True,
                                                extra_body={"operating_point": "permissive"}))
        assert chunks[0].model_extra["guard"]["operating_point"] == "permissive"
        assert not chunks[0].model_extra["guard"]["fired"] and chunks[-1].choices[0].finish_reason != "content_filter"
        done = c.completions.create(model=name, prompt="Tell me", max_tokens=3, extra_body={"operating_point": 0.0})
        assert done.model_extra["guard"]["fired"] and done.model_extra["guard"]["tau"] == 0.0
        for point, tau in ((None, points["strict"]), ("permissive", points["permissive"]), (0.0, 0.0)):
            extra = {} if point is None else {"extra_body": {"operating_point": point}}
            m = c.moderations.create(model=name, input=PROMPTS, **extra)
            assert [x.flagged for x in m.results] == [fires(k, tau) for k in risks]
            assert {x.model_extra["guard"]["tau"] for x in m.results} == {tau}
        for bad, says in (("loose", "unknown operating point 'loose': this bundle has strict, balanced, permissive"),
                          (1.5, "tau must be between 0 and 1, got 1.5"), (-0.2, "tau must be between 0 and 1"),
                          (True, "a tau between 0 and 1"), ({"name": "strict"}, "a tau between 0 and 1")):
            for call in (lambda: c.chat.completions.create(model=name, messages=user("hi"), max_tokens=2,
                                                           extra_body={"operating_point": bad}),
                         lambda: c.moderations.create(input="hi", extra_body={"operating_point": bad})):
                with pytest.raises(openai.BadRequestError) as e:
                    call()
                assert e.value.body["param"] == "operating_point" and e.value.body["code"] == "invalid_value"
                assert says in e.value.body["message"]
    with Server(bundles["plain"]) as s:
        c = OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model=gm.manifest.model["name"], messages=user("hi"), max_tokens=2,
                                      extra_body={"operating_point": "strict"})
        assert "no guard" in e.value.body["message"]
        r = c.chat.completions.create(model=gm.manifest.model["name"], messages=user("hi"), max_tokens=2)
        assert r.model_extra["guard"]["tau"] is None and r.model_extra["guard"]["operating_point"] is None
