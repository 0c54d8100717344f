"""The chat template as text pieces (for the C library): derived from the template, checked against it,
and refused for templates that are not plain pieces."""
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


@pytest.mark.parametrize("template", [TRIMS, NUMBERS_TURNS])
def test_templates_that_are_not_plain_pieces_get_none(template):
    assert chat_pieces(renderer(template)) is None
