"""Hundreds of bad requests (wrong types and ranges in every field, broken encodings, oversized bodies,
bad images and paths, wrong routes and methods) all get a 4xx in OpenAI's error shape: never a 500,
never a traceback in the server's log; the server stays healthy and answers correctly afterwards."""
import base64
import json
import struct
import zlib

import pytest

from serving import Server
from steerguard.runtime.model import GuardedModel
from steerguard.runtime.sampling import Sampling

pytestmark = pytest.mark.parametrize("tiny_export", ["llama"], indirect=True)

MODEL = "tiny-llama"
GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "What is art?"}], "max_tokens": 4}


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (its data is one empty row): a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b""))


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def image_message(url):
    return [{"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


WRONG = {
    "model": [None, 1, [], {}, "", "gpt-4o", "tiny-llama ", True],
    "messages": [None, "hi", {}, [], [1], [None], [{}], [{"role": "user"}], [{"content": "hi"}],
                 [{"role": 1, "content": "x"}], [{"role": "tool", "content": "x"}], [{"role": "user", "content": 1}],
                 [{"role": "user", "content": None}], [{"role": "user", "content": {"text": "x"}}],
                 [{"role": "user", "content": ""}], [{"role": "user", "content": "  \n "}],
                 [{"role": "user", "content": [{"type": "video"}]}], [{"role": "user", "content": [{"type": "text"}]}],
                 [{"role": "user", "content": [{"type": "text", "text": 5}]}], [{"role": "user", "content": [1]}],
                 [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
                 [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 3}}]}],
                 [{"role": "user", "content": "word " * 300}], [{"role": "user", "content": "x", "name": 3}]],
    "max_tokens": ["1", 1.5, -1, 0, True, 10**20, [4], 300],
    "max_completion_tokens": ["1", 0, -5, 2.0, 10**9],
    "temperature": ["x", -1, 2.5, [], {}, True, 1e308 * 10],
    "top_p": [0, -0.1, 1.1, "a", False],
    "seed": ["x", 1.5, [1], True],
    "stop": [1, [1], [""], "", ["a"] * 5, {"a": 1}, [None]],
    "n": [0, 2, "1", 1.0],
    "stream": ["yes", 1, [], {}],
    "stream_options": ["x", 1, {"include_usage": "yes"}, {"include_usage": 1}],
    "logprobs": [True, "no"],
    "top_logprobs": [3],
    "tools": [[{"type": "function", "function": {"name": "f"}}], "x"],
    "tool_choice": ["auto", "required", 1],
    "response_format": [{"type": "json_object"}, "json", 1],
    "presence_penalty": [1, "0", -2],
    "frequency_penalty": [0.5, "x"],
    "user": [1, []],
}

IMAGE_URLS = ["http://example.com/cat.png", "https://example.com/cat.png", "file:///etc/passwd", "/etc/passwd",
              "../../etc/passwd", "data:", "data:image/png,notbase64", "data:image/png;base64,!!!!",
              data_url(b"not an image"), data_url(png_claiming(100000, 100000)), data_url(png_claiming(1, 1)[:30]),
              data_url(b"GIF89a" + b"\x00" * 20, "image/gif"), "", "data:image/png;base64," + "A" * 10]

COMPLETION_PROMPTS = [None, 1, [], [-1], [10**9], [[1], [2]], ["a", "b"], [1.5], {"a": 1}, "", [""], [[]], True]

MODERATION_INPUTS = [None, 1, [], [1], [""], "", "   ", [{"type": "image_url", "image_url": {"url": "x"}}],
                     ["a"] * 33, [{"type": "text"}], {"text": "x"}, [[1, 2]]]

RAW_BODIES = [b"", b"{", b"{not json", b"[1, 2]", b'"a string"', b"42", b"null", b"true", b'{"model": NaN}',
              b'{"model": Infinity}', b'{"max_tokens": 1e999}', b"\xff\xfe\x00", b"\xef\xbb\xbf{}",
              '{"model": "x"}'.encode("utf-16"), b'{"model": "\\ud800"}', b"[" * 100000 + b"]" * 100000,
              b'{"a": ' * 5000 + b"1" + b"}" * 5000, b"{}", b'{"messages": "x"}', b"\x00\x00\x00"]


def bad_requests():
    """(method, path, body) triples, every one of them malformed."""
    out = []
    for field, values in WRONG.items():
        for v in values:
            out.append(("POST", "/v1/chat/completions", json.dumps({**GOOD, field: v}).encode()))
    for field in ("model", "messages"):
        out.append(("POST", "/v1/chat/completions", json.dumps({k: v for k, v in GOOD.items() if k != field}).encode()))
    for url in IMAGE_URLS:
        out.append(("POST", "/v1/chat/completions", json.dumps({**GOOD, "messages": image_message(url)}).encode()))
    for p in COMPLETION_PROMPTS:
        out.append(("POST", "/v1/completions", json.dumps({"model": MODEL, "prompt": p, "max_tokens": 4}).encode()))
    for field, v in [("echo", True), ("best_of", 2), ("suffix", "x"), ("logprobs", 3), ("max_tokens", 0),
                     ("max_tokens", 10**6), ("temperature", "x"), ("model", "nope"), ("stream", "x")]:
        out.append(("POST", "/v1/completions", json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 4,
                                                           field: v}).encode()))
    for v in MODERATION_INPUTS:
        out.append(("POST", "/v1/moderations", json.dumps({"input": v}).encode()))
    out.append(("POST", "/v1/moderations", json.dumps({"input": "hi", "model": "nope"}).encode()))
    out.append(("POST", "/v1/moderations", json.dumps({"model": MODEL}).encode()))
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/moderations"):
        for body in RAW_BODIES:
            out.append(("POST", path, body))
        out.append(("GET", path, None))
        out.append(("PUT", path, b"{}"))
        out.append(("POST", path, b"{" + b" " * (300 * 1024) + b"}"))          # over the body limit
    for method, path in [("GET", "/"), ("GET", "/v1"), ("GET", "/v1/nothing"), ("POST", "/v1/models"),
                         ("DELETE", "/v1/models"), ("GET", "/v1/models/nope"), ("POST", "/health"),
                         ("GET", "/v1/chat/completions/x"), ("GET", "/%2e%2e/%2e%2e/etc/passwd"),
                         ("GET", "/v1/models/..%2f..%2fetc%2fpasswd"), ("POST", "/v1/embeddings")]:
        out.append((method, path, b"{}" if method != "GET" else None))
    return out


@pytest.fixture(scope="module")
def server(tiny_export, tmp_path_factory):
    log = tmp_path_factory.mktemp("fuzz") / "server.log"
    with Server(tiny_export.bundle, "--max-body-mb", "0.25", "--log-requests", log=log) as s:
        s.log_path = log
        yield s


def test_every_bad_request_gets_a_4xx_in_openais_shape(server, tiny_export):
    cases = bad_requests()
    assert len(cases) >= 200
    statuses = {}
    for method, path, body in cases:
        status, _, raw = server.raw(method, path, body)
        assert 400 <= status < 500, (status, method, path, body[:200] if body else body, raw[:300])
        error = json.loads(raw)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], (path, body[:200], raw)
        statuses[status] = statuses.get(status, 0) + 1
    assert set(statuses) >= {400, 404, 405, 413}, statuses
    health = server.wait_idle(5)
    assert health["status"] == "ok" and health["rows_in_use"] == 0
    status, _, raw = server.raw("POST", "/v1/chat/completions", json.dumps(GOOD).encode())
    gm = GuardedModel.load(tiny_export.bundle, threads=2)
    assert status == 200 and json.loads(raw)["choices"][0]["message"]["content"] == \
        gm.generate(GOOD["messages"], Sampling(max_new_tokens=4)).text
    log = server.log_path.read_text()
    assert "Traceback" not in log and " 500 " not in log, log[-3000:]
