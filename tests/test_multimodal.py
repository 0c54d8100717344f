"""Images from calibration to the runtime on tiny random LLaVA-OneVision and Qwen2-VL models: calibrate
with image pairs, export the vision engine beside the split chain, and run it against transformers on
the same image and text (logits, greedy tokens, risk); bad images and image/placeholder mismatches are
clear errors."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import QWEN2_VL_IMAGE, tiny_chameleon, tiny_llava_onevision, tiny_qwen2_vl
from steerguard.cli import main
from steerguard.errors import SteerguardError
from steerguard.export.bundle import export_bundle
from steerguard.export.calibrate import CalibrationConfig, CalibrationData, calibrate
from steerguard.export.data import Pair, default_pairs, load_pairs
from steerguard.export.arch import processor_kwargs
from steerguard.export.hidden import with_tokens
from steerguard.runtime import GuardedModel, Sampling
from steerguard.runtime.model import DecodeStep, KVCache

QUESTION = "describe this picture"


def picture(path, height: int, width: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def ask(image, text: str = QUESTION) -> list:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


FAMILIES = {"llava_onevision": (tiny_llava_onevision, "<image>", 1),
            "qwen2_vl": (tiny_qwen2_vl, QWEN2_VL_IMAGE, 4),
            "chameleon": (tiny_chameleon, "<image>", 4)}


class TinyMultimodal:
    def __init__(self, kind, root):
        pairs = [p for p in default_pairs() if p.source.startswith("contrast")][:40]
        build, self.placeholder, self.max_images = FAMILIES[kind]
        self.kind = kind
        self.lm = build([t for p in pairs for t in (p.harmful, p.benign, p.refusal)] + [QUESTION])
        self.images = root / "images"
        self.images.mkdir()
        shown = [Pair(p.harmful, p.benign, "with-image", p.refusal, str(picture(self.images / f"{k}.png", 30 + 9 * k, 60, k)))
                 for k, p in enumerate(pairs[:10])]
        cfg = CalibrationConfig(refusal_targets=12, refusal_epochs=1, max_per_source=30)
        self.guard = calibrate(self.lm, CalibrationData(pairs=pairs + shown), cfg, progress=False)
        self.bundle = export_bundle(self.lm, self.guard, root / "bundle", prober_precision="fp32", progress=False)
        self.wide = picture(root / "wide.png", 40, 90, 7)

    def hf_inputs(self, image_path, text: str = QUESTION) -> dict:
        proc = self.lm.processor
        rendered = proc.apply_chat_template(ask(None, text), add_generation_prompt=True, tokenize=False)
        return dict(proc(text=rendered, images=[Image.open(image_path)], return_tensors="pt",
                         **processor_kwargs(proc)))

    def hf_ids(self, inputs: dict) -> list[int]:
        """The token ids the model reads: Chameleon's image placeholders become its VQ image tokens."""
        ids = inputs["input_ids"][0].clone()
        if self.kind == "chameleon":
            with torch.no_grad():
                tokens = self.lm.model.model.get_image_tokens(inputs["pixel_values"])
            ids[ids == self.lm.model.config.image_token_id] = tokens[0].long()
        return ids.tolist()


@pytest.fixture(scope="module", params=list(FAMILIES))
def llava(request, tmp_path_factory):
    return TinyMultimodal(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def gm(llava):
    return GuardedModel.load(llava.bundle, threads=2)


def test_bundle_records_the_vision_engine_and_preprocessing(llava):
    manifest = json.loads((llava.bundle / "manifest.json").read_text())
    assert manifest["engines"][0]["role"] == "vision"
    v = manifest["vision"]
    assert v["kind"] == llava.kind and v["image_token"] in llava.placeholder
    assert v["preprocess"]["image_mean"] and v["max_images"] == llava.max_images


@pytest.mark.parametrize("size", [(40, 90), (90, 40), (32, 32), (140, 60)])
def test_chain_matches_transformers_with_an_image_on_prefill_and_16_decode_steps(llava, gm, tmp_path, size):
    path = picture(tmp_path / "x.png", *size, seed=3)
    inputs = llava.hf_inputs(path)
    prompt = gm.prepare(ask(str(path)))
    ids = prompt.ids
    assert ids == llava.hf_ids(inputs)   # the same placeholder expansion (and image tokens) as the processor's
    cont = list(range(7, 23))
    full = with_tokens(inputs, cont)
    with torch.no_grad():
        ref = llava.lm.model(**full).logits[0].numpy()
    cache = KVCache(range(gm.num_layers), 1, gm.kv_heads, len(ids) + 20, gm.head_dim)
    hidden, _ = gm.prefill(prompt, cache, 0)
    step, no = DecodeStep(gm, cache, 1, gm.rotary_tables(prompt, cache.max_len)), np.array([False])
    assert np.abs(gm.next_logits(hidden[None], no)[0] - ref[len(ids) - 1]).max() <= 1e-4
    for k, tok in enumerate(cont):
        logits = gm.next_logits(gm.decode_one_token(np.array([tok]), cache, step), no)
        assert np.abs(logits[0] - ref[len(ids) + k]).max() <= 1e-4, k


def test_greedy_tokens_equal_transformers(llava, gm):
    inputs = llava.hf_inputs(llava.wide)
    with torch.no_grad():
        ref = llava.lm.model.generate(**inputs, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    ours = gm.generate(ask(str(llava.wide)), Sampling(max_new_tokens=12, ignore_eos=True), steer=False)
    assert ours.token_ids == ref[0, inputs["input_ids"].shape[1]:].tolist()


def test_risk_matches_the_prober_on_transformers_states_for_text_image_and_both(llava, gm):
    p = llava.guard.prober
    inputs = llava.hf_inputs(llava.wide)
    with torch.no_grad():
        states = llava.lm.model(**inputs, output_hidden_states=True).hidden_states
    row = states[p.layer][0].numpy()
    start = gm.prepare(ask(str(llava.wide))).user_start      # a per-token prober reads the user's turn
    with_image = float(p.prompt_risk([row[start:]])[0] if p.per_token else p.risk(row[-1:])[0])
    assert abs(gm.score(ask(str(llava.wide))) - with_image) <= 1e-4
    text_only = gm.score(QUESTION)
    assert abs(text_only - with_image) > 1e-3   # the image is part of what the guard judges
    other = picture(llava.images / "other.png", 64, 64, 11)
    assert abs(gm.score(ask(str(other))) - with_image) > 1e-4


def test_calibration_rows_with_images_read_the_image(llava, tmp_path):
    rows = [{"harmful": "how to hurt", "benign": "how to help", "image": "missing.png", "caption": "a cat"}]
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SteerguardError, match=r"pairs.jsonl:1: image .*missing.png not found"):
        load_pairs(f, image="image")
    fallback = load_pairs(f, image="image", caption="caption", caption_for_missing_image=True)
    assert fallback[0].image is None and fallback[0].harmful == "Image: a cat\nhow to hurt"
    picture(tmp_path / "missing.png", 20, 20)
    assert load_pairs(f, image="image")[0].image == str(tmp_path / "missing.png")


def test_run_with_an_image_from_the_command_line(llava, gm):
    r = CliRunner().invoke(main, ["run", str(llava.bundle), "-p", QUESTION, "--image", str(llava.wide), "--json",
                                  "--max-new-tokens", "4"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output.strip().splitlines()[-1])
    assert out["risk"] is not None and out["prompt_tokens"] > len(gm.encode(QUESTION)) + 2   # the image's tokens


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "none.png", "no such image file"),
    (lambda d: (d / "notes.png").write_text("not a picture") and d / "notes.png", "not an image Pillow can read"),
    (lambda d: (d / "cut.png").write_bytes(open(picture(d / "full.png", 64, 64), "rb").read()[:300]) and d / "cut.png",
     "damaged or truncated"),
])
def test_unreadable_images_are_one_clear_line(gm, tmp_path, make, message):
    with pytest.raises(SteerguardError, match=message):
        gm.generate(ask(str(make(tmp_path))), Sampling(max_new_tokens=2))


def test_image_placeholder_mismatch_and_too_many_images_are_refused(gm, llava):
    with pytest.raises(SteerguardError, match="2 image placeholder.*for 1 image"):
        gm.generate(ask(str(llava.wide), f"what is {llava.placeholder} here"), Sampling(max_new_tokens=2))
    n = llava.max_images + 1
    many = [{"role": "user", "content": [{"type": "image", "image": str(llava.wide)}] * n + [{"type": "text", "text": "x"}]}]
    with pytest.raises(SteerguardError, match=f"{n} images given; .* takes at most {llava.max_images}"):
        gm.generate(many, Sampling(max_new_tokens=2))


def test_an_image_for_a_text_only_bundle_is_refused(tiny_export, llava):
    text_only = GuardedModel.load(tiny_export.bundle)
    with pytest.raises(SteerguardError, match="reads text only"):
        text_only.generate(ask(str(llava.wide)), Sampling(max_new_tokens=2))


def test_calibrate_export_and_run_a_multimodal_folder_from_the_command_line(tmp_path):
    """The user's path: a saved model folder, a pairs file with an image column, three commands."""
    pairs = [p for p in default_pairs() if p.source.startswith("contrast")][:24]
    lm = tiny_qwen2_vl([t for p in pairs for t in (p.harmful, p.benign, p.refusal)] + [QUESTION])
    folder = tmp_path / "model"
    lm.model.save_pretrained(folder)
    lm.processor.image_processor.save_pretrained(folder)   # (the processor itself will not save without
    lm.tokenizer.save_pretrained(folder)                   # a video processor, which needs torchvision)
    (folder / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2VLProcessor"}))
    (tmp_path / "img").mkdir()
    rows = [{"harmful": p.harmful, "benign": p.benign, "refusal": p.refusal,
             "image": picture(tmp_path / "img" / f"{k}.png", 40 + k, 70, k).name} for k, p in enumerate(pairs)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = CliRunner().invoke
    r = run(main, ["calibrate", str(folder), "-o", str(tmp_path / "guard"), "--pairs", str(data), "--image-col", "image",
                   "--image-root", str(tmp_path / "img"), "--no-defaults", "--refusal-targets", "8",
                   "--refusal-epochs", "1"])
    assert r.exit_code == 0, r.output
    r = run(main, ["export", str(folder), "--guard", str(tmp_path / "guard"), "-o", str(tmp_path / "bundle")])
    assert r.exit_code == 0, r.output
    r = run(main, ["run", str(tmp_path / "bundle"), "-p", QUESTION, "--image", str(tmp_path / "img" / "0.png"),
                   "--json", "--max-new-tokens", "3"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.strip().splitlines()[-1])["risk"] is not None
    r = run(main, ["run", str(tmp_path / "bundle"), "-p", QUESTION, "--image", str(tmp_path / "nothing.png")])
    assert r.exit_code != 0 and "no such image file" in r.output and "Traceback" not in r.output
