"""Images through the server and the batcher, on a tiny Qwen2-VL bundle (3-D rotary positions: a request
with an image decodes alone, text requests around it still batch): data: URLs and paths inside
--image-root give the runtime's own answers; paths outside it, remote URLs, oversized and broken images
are 4xx."""
import base64
import io
import json
import os
import threading

import numpy as np
import pytest
from openai import OpenAI
from PIL import Image

from serving import Server
from steerguard.runtime.batching import ContinuousBatcher
from steerguard.runtime.model import GuardedModel
from steerguard.runtime.sampling import Sampling
from test_multimodal import QUESTION, TinyMultimodal, picture


@pytest.fixture(scope="module")
def vl(tmp_path_factory):
    return TinyMultimodal("qwen2_vl", tmp_path_factory.mktemp("qwen2_vl"))


@pytest.fixture(scope="module")
def gm(vl):
    return GuardedModel.load(vl.bundle, threads=2)


def ask(image):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]


def openai_ask(url):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": QUESTION}]}]


def data_url(path):
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def test_image_and_text_requests_share_the_batcher(vl, gm):
    s = Sampling(max_new_tokens=8)
    image = Image.open(vl.wide)
    jobs = [ask(image), [{"role": "user", "content": QUESTION}], ask(image), [{"role": "user", "content": "hello"}]]
    results = [None] * len(jobs)
    batcher = ContinuousBatcher(gm, max_batch=4)
    try:
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, batcher.generate(jobs[i], s, timeout=120)))
                   for i in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        batcher.close()
    for job, got in zip(jobs, results):
        assert got.token_ids == gm.generate(job, s).token_ids


def test_images_by_data_url_and_by_path_inside_the_image_root(vl, gm, tmp_path):
    inside = tmp_path / "root"
    inside.mkdir()
    (inside / "pic.png").write_bytes(vl.wide.read_bytes())
    secret = picture(tmp_path / "secret.png", 40, 40, 3)
    os.symlink(secret, inside / "escape.png")
    want = gm.generate(ask(str(vl.wide)), Sampling(max_new_tokens=8))
    name = gm.manifest.model["name"]
    with Server(vl.bundle, "--image-root", str(inside), "--max-image-mb", "0.05") as s:
        c = OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        for url in (data_url(vl.wide), "pic.png", str(inside / "pic.png"), f"file://{inside / 'pic.png'}"):
            r = c.chat.completions.create(model=name, messages=openai_ask(url), max_tokens=8)
            assert r.choices[0].message.content == want.text and r.model_extra["guard"]["risk"] == want.risk, url
        big = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(big, "PNG")
        bad = {"../secret.png": "outside", str(secret): "outside", "escape.png": "outside",
               "missing.png": "no such", "http://example.com/a.png": "remote",
               "data:image/png;base64," + base64.b64encode(b"not a png").decode(): "cannot be read",
               "data:image/png;base64," + base64.b64encode(big.getvalue()).decode(): "larger than"}
        for url, words in bad.items():
            status, _, raw = s.raw("POST", "/v1/chat/completions",
                                   json.dumps({"model": name, "messages": openai_ask(url), "max_tokens": 4}).encode())
            error = json.loads(raw)["error"]
            assert status == 400 and words in error["message"] and error["param"] == "messages.0.content.0.image_url.url"
        m = c.moderations.create(model=name, input=[{"type": "image_url", "image_url": {"url": data_url(vl.wide)}},
                                                    {"type": "text", "text": QUESTION}])
        assert m.results[0].model_extra["guard"]["risk"] == pytest.approx(gm.score(ask(str(vl.wide))), abs=0)
