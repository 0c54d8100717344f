"""Chat messages -> token ids through the model's own chat template (jinja2) and `tokenizers`,
rendering the way transformers' `apply_chat_template` does; and token ids -> text, incrementally."""

from __future__ import annotations

import datetime
import functools
import itertools
import json
from pathlib import Path
from typing import Callable

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from ..errors import SteerguardError

Message = dict  # {"role": "user" | "assistant" | "system", "content": str or a list of parts}
# a part: {"type": "text", "text": str} or {"type": "image", "image": path or PIL image} (multimodal bundles)


def _raise(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class ChatTokenizer:
    def __init__(self, tokenizer_file: Path, config_file: Path, template_file: Path):
        try:
            self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
            self.config = json.loads(Path(config_file).read_text())
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[jinja2.ext.loopcontrols])
            env.filters["tojson"] = _tojson
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
            self.template = env.from_string(Path(template_file).read_text())
        except (OSError, ValueError, jinja2.TemplateError) as e:
            raise SteerguardError(f"{tokenizer_file.parent}: cannot read the tokenizer or chat template ({e})") from e
        self.special = {k: self.config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")
                        if isinstance(self.config.get(k), str)}

    def render(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or not _is_content(m.get("content")):
                raise SteerguardError("each chat message needs a 'role' and a 'content': a text, or a list of "
                                      "{'type': 'text', 'text': ...} and {'type': 'image', ...} parts")
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        **self.special)
        except jinja2.TemplateError as e:
            raise SteerguardError(f"the chat template rejected these messages: {e}") from e

    def encode_chat(self, messages: list[Message]) -> list[int]:
        return self.tokenizer.encode(self.render(messages), add_special_tokens=False).ids

    def encode_prompt(self, prompt: str) -> list[int]:
        return self.encode_chat([{"role": "user", "content": prompt}])

    def user_turn_start(self, messages: list[Message]) -> int:
        """Index of the token where the last user message's content begins (0 without one): where two
        encodings that differ only in that content part ways."""
        users = [i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"]
        if not users:
            return 0

        def encode(content: str) -> list[int]:
            probe = list(messages)
            probe[users[-1]] = {"role": "user", "content": content}
            return self.encode_chat(probe)
        return content_start(encode)

    @functools.cached_property
    def prompt_prefix(self) -> list[int]:
        """The token ids the chat template puts before a one-message chat's content."""
        one = [{"role": "user", "content": ""}]
        return self.encode_chat(one)[:self.user_turn_start(one)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def content_start(encode: Callable[[str], list[int]]) -> int:
    """Where a message's content begins in `encode(content)`: the shortest common prefix of a few probe
    contents' encodings (one pair alone can share a first token, an unknown word in a small vocabulary)."""
    probes = [encode(c) for c in ("", "alpha", "omega beta")]
    return min(next((k for k, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
               for x, y in itertools.combinations(probes, 2))


def content_end(encode: Callable[[str], list[int]]) -> int:
    """How many tokens the template puts after a message's content in `encode(content)` (end of turn, the
    assistant header of the generation prompt): the shortest common suffix of the probe encodings."""
    probes = [encode(c) for c in ("", "alpha", "omega beta")]
    return min(next((k for k, (u, v) in enumerate(zip(reversed(x), reversed(y))) if u != v), min(len(x), len(y)))
               for x, y in itertools.combinations(probes, 2))


def _is_content(content) -> bool:
    if isinstance(content, str):
        return True
    return isinstance(content, list) and all(
        isinstance(p, dict) and (p.get("type") == "image" or (p.get("type") == "text" and isinstance(p.get("text"), str)))
        for p in content)


class TextStream:
    """Turns a growing list of token ids into text pieces, holding back a piece that ends inside a
    multi-byte character (the tokenizer decodes it as U+FFFD until the next token completes it)."""

    def __init__(self, tok: ChatTokenizer):
        self.tok, self.ids, self.emitted = tok, [], 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self.emitted = text[self.emitted:], len(text)
        return piece
