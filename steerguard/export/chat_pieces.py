"""The chat template as plain text pieces, for runtimes without a Jinja engine (the C library).

Most chat templates render each message as `open[role] + content + close[role]`, after a fixed head
(a BOS token, a default system prompt) and before the generation prompt. `chat_pieces` finds those
pieces by rendering conversations whose contents are sentinels, then checks them against the real
template on conversations of every shape a client sends; a template that does not fit (one that trims
or rewrites contents, numbers turns, ...) gets no pieces, and the C library says so when asked to chat."""

from __future__ import annotations

from typing import Callable

Render = Callable[[list[dict], bool], str]   # (messages, add_generation_prompt) -> text

_MARK = "\x1fsg{}\x1f"   # a control character no template emits


def chat_pieces(render: Render) -> dict | None:
    """{"head", "head_system", "open": {role: text}, "close": {role: text}, "generation_prompt"}, or
    None when the template is not of that form."""
    try:
        pieces = _derive(render)
    except (ValueError, KeyError, IndexError):
        return None
    for messages in _checks():
        for add_generation_prompt in (True, False):
            if render_pieces(pieces, messages, add_generation_prompt) != render(messages, add_generation_prompt):
                return None
    return pieces


def render_pieces(pieces: dict, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """What the C library renders: the same concatenation, written once here so the check above and the
    tests use the C library's rule."""
    out = []
    rest = messages
    if messages and messages[0]["role"] == "system":
        out.append(pieces["head_system"] + messages[0]["content"] + pieces["close"]["system"])
        rest = messages[1:]
    else:
        out.append(pieces["head"])
    for m in rest:
        out.append(pieces["open"][m["role"]] + m["content"] + pieces["close"][m["role"]])
    if add_generation_prompt:
        out.append(pieces["generation_prompt"])
    return "".join(out)


def _split(text: str, n: int) -> list[str]:
    """The text around sentinels 0..n-1, which must appear once each and in order."""
    parts, rest = [], text
    for i in range(n):
        before, sep, rest = rest.partition(_MARK.format(i))
        if not sep:
            raise ValueError(f"sentinel {i} missing")
        parts.append(before)
    return [*parts, rest]


def _suffix_after(text: str, prefix: str) -> str:
    if not text.startswith(prefix):
        raise ValueError("pieces do not nest")
    return text[len(prefix):]


def _prefix_before(text: str, suffix: str) -> str:
    if not text.endswith(suffix):
        raise ValueError("pieces do not nest")
    return text[:len(text) - len(suffix)]


def _derive(render: Render) -> dict:
    m = [_MARK.format(i) for i in range(3)]
    t0, t1, t2, t3 = _split(render([{"role": "user", "content": m[0]}, {"role": "assistant", "content": m[1]},
                                    {"role": "user", "content": m[2]}], False), 3)
    user_close = t3
    assistant_open = _suffix_after(t1, user_close)
    _, _, assistant_close = _split(render([{"role": "user", "content": m[0]},
                                           {"role": "assistant", "content": m[1]}], False), 2)
    user_open = _suffix_after(t2, assistant_close)
    head = _prefix_before(t0, user_open)
    s0, s1, _ = _split(render([{"role": "system", "content": m[0]}, {"role": "user", "content": m[1]}], False), 2)
    system_close = _prefix_before(s1, user_open)
    with_prompt = render([{"role": "user", "content": m[0]}], True)
    without = render([{"role": "user", "content": m[0]}], False)
    generation_prompt = _suffix_after(with_prompt, without)
    return {"head": head, "head_system": s0, "generation_prompt": generation_prompt,
            "open": {"user": user_open, "assistant": assistant_open},
            "close": {"system": system_close, "user": user_close, "assistant": assistant_close}}


def _checks() -> list[list[dict]]:
    edge = " spaces and\nnew lines \n"
    return [
        [{"role": "user", "content": "Hello!"}],
        [{"role": "user", "content": edge}],
        [{"role": "user", "content": "Grüße, 世界 🙂"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
        [{"role": "system", "content": edge}, {"role": "user", "content": "a"},
         {"role": "assistant", "content": edge}, {"role": "user", "content": ""}],
    ]
