"""--chat-template-kwargs: template variables (Qwen3's `enable_thinking`) fixed at export, so the bundle's Jinja,
its chat pieces (what the C library renders) and calibration all read the conversation the same way."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from conftest import tiny_model, tiny_tokenizer  # noqa: E402
from steerguard.cli import main  # noqa: E402
from steerguard.export.chat_pieces import render_pieces  # noqa: E402
from steerguard.runtime import GuardedModel  # noqa: E402

# Qwen3's switch, in the shape its template has it: an empty thought block when thinking is off
THINKING = ("{%- for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{%- endfor %}"
            "{%- if add_generation_prompt %}<|im_start|>assistant\n"
            "{%- if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{%- endif %}"
            "{%- endif %}")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    tok = tiny_tokenizer(["Hello there, how are you?", "<think>", "</think>"], extra_specials=["<think>", "</think>"])
    tok.chat_template = THINKING
    out = tmp_path_factory.mktemp("thinking") / "model"
    tiny_model("llama", len(tok)).save_pretrained(out)
    tok.save_pretrained(out)
    return out, tok


def export(folder, out, *args):
    r = CliRunner().invoke(main, ["export", str(folder), "-o", str(out), "--unguarded", *args])
    assert r.exit_code == 0, r.output
    return GuardedModel.load(out)


def test_the_bundle_renders_what_the_template_renders_with_the_kwargs(folder, tmp_path):
    path, tok = folder
    chat = [{"role": "user", "content": "Hello there"}]
    off = export(path, tmp_path / "off", "--chat-template-kwargs", '{"enable_thinking": false}')
    default = export(path, tmp_path / "default")
    want = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False, enable_thinking=False)
    assert want.endswith("</think>")
    assert off.tokenizer.render(chat, True) == want
    assert default.tokenizer.render(chat, True) == tok.apply_chat_template(chat, add_generation_prompt=True,
                                                                            tokenize=False) != want
    pieces = off.manifest.data["tokenizer"]["chat_pieces"]
    assert pieces and render_pieces(pieces, chat) == want        # the C library's rendering, too


def test_a_guard_calibrated_with_other_kwargs_is_refused(folder, tmp_path, tiny_export):
    path, _ = folder
    tiny_export.guard.save(tmp_path / "guard")
    r = CliRunner().invoke(main, ["export", str(path), "-o", str(tmp_path / "b"), "--guard", str(tmp_path / "guard"),
                                  "--chat-template-kwargs", '{"enable_thinking": false}'])
    assert r.exit_code != 0 and "calibrated with --chat-template-kwargs {}" in r.output
    bad = CliRunner().invoke(main, ["export", str(path), "-o", str(tmp_path / "c"), "--unguarded",
                                    "--chat-template-kwargs", "enable_thinking=false"])
    assert bad.exit_code != 0 and "not JSON" in bad.output
    nested = CliRunner().invoke(main, ["export", str(path), "-o", str(tmp_path / "d"), "--unguarded",
                                       "--chat-template-kwargs", json.dumps({"tools": [1]})])
    assert nested.exit_code != 0 and "must be true, false, null, a number or a string" in nested.output
