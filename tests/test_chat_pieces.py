"""The chat template as text pieces (for the C library): derived from the template, checked against it,
with named rules for templates that trim contents, fold the system prompt or need alternating turns, and
refused for templates that still do not fit."""
import jinja2
import pytest

from conftest import CHATML
from steerguard.export.chat_pieces import chat_pieces, render_pieces

DEFAULT_SYSTEM = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are helpful.<|im_end|>\n"
                  "{% endif %}" + CHATML)
LLAMA3_LIKE = ("<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
               "{{ m['content'] }}<|eot_id|>{% endfor %}"
               "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
TRIMS = CHATML.replace("{{ m['content'] }}", "{{ m['content'] | trim }}")
NUMBERS_TURNS = CHATML.replace("{{ m['role'] }}\n", "{{ m['role'] }} {{ loop.index }}\n")
UPPER_CASES = CHATML.replace("{{ m['content'] }}", "{{ m['content'] | upper }}")
TRIMS_USERS_ONLY = CHATML.replace("{{ m['content'] }}", "{% if m['role'] == 'user' %}{{ m['content'] | trim }}"
                                  "{% else %}{{ m['content'] }}{% endif %}")
WHITE = [" lead", "trail \n", "\t both \r\n", "\u3000wide\u00a0", "\x1f sep \x1e", "in  side", "\u2028\u2029 x \u205f"]


def renderer(template: str):
    t = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(template)
    return lambda messages, add_generation_prompt: t.render(messages=messages,
                                                            add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("template", [CHATML, DEFAULT_SYSTEM, LLAMA3_LIKE])
def test_pieces_render_what_the_template_renders(template):
    render = renderer(template)
    pieces = chat_pieces(render)
    assert pieces is not None
    chats = [[{"role": "user", "content": "Grüße 🙂"}],
             [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"},
              {"role": "assistant", "content": " a1 \n"}, {"role": "user", "content": "u2"}]]
    for chat in chats:
        for gen in (True, False):
            assert render_pieces(pieces, chat, gen) == render(chat, gen)


def test_default_system_prompt_is_the_head():
    pieces = chat_pieces(renderer(DEFAULT_SYSTEM))
    assert pieces["head"] == "<|im_start|>system\nYou are helpful.<|im_end|>\n"
    assert pieces["head_system"] == "<|im_start|>system\n"
    assert pieces["generation_prompt"] == "<|im_start|>assistant\n"


def test_plain_templates_get_plain_pieces_and_no_rules():
    """Templates that were plain pieces before the rules came get the same pieces, in the same key order (so
    their bundles' manifests are unchanged byte for byte)."""
    for template in (CHATML, DEFAULT_SYSTEM, LLAMA3_LIKE):
        pieces = chat_pieces(renderer(template))
        assert list(pieces) == ["head", "head_system", "generation_prompt", "open", "close"]
        assert list(pieces["close"]) == ["system", "user", "assistant"]


def test_a_template_that_trims_gets_the_trim_rule_and_renders_what_jinja_renders():
    render = renderer(TRIMS)
    pieces = chat_pieces(render)
    assert pieces["trim"] is True and "system" not in pieces and "alternate" not in pieces
    for text in WHITE:
        chat = [{"role": "system", "content": text}, {"role": "user", "content": text},
                {"role": "assistant", "content": text}, {"role": "user", "content": "q" + text}]
        for gen in (True, False):
            assert render_pieces(pieces, chat, gen) == render(chat, gen)
    assert "<|im_start|>user\nwide<|im_end|>" in render_pieces(pieces, [{"role": "user", "content": WHITE[3]}])


@pytest.mark.parametrize("template", [NUMBERS_TURNS, UPPER_CASES, TRIMS_USERS_ONLY])
def test_templates_that_do_not_fit_the_pieces_and_rules_get_none(template):
    assert chat_pieces(renderer(template)) is None
