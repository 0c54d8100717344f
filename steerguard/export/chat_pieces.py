"""The chat template as text pieces, for runtimes without a Jinja engine (the C library).

Most chat templates render each message as `open[role] + content + close[role]`, after a fixed head
(a BOS token, a default system prompt) and before the generation prompt. `chat_pieces` finds those
pieces by rendering conversations whose contents are sentinels, then checks them against the real
template on conversations of every shape a client sends. A few named rules cover templates that are
not plain pieces (Gemma's, for one):

- `"trim": true`: every content is stripped of white space at both ends, as Jinja's `trim` does
  (Python's `str.strip()`), except a folded system prompt (next rule), which goes in as it is;
- `"system": "fold"` with `"system_separator"`: the system message has no turn of its own; its content
  and the separator open the first message after it (the bundle then has no `head_system` and no
  `close.system`, so a library that predates the rule refuses to chat rather than render it wrongly);
- `"alternate": true`: the template refuses conversations whose turns (after the system message) do not
  alternate user, assistant, user, ...; the runtime refuses them too.

A template that still does not fit (one that rewrites contents, numbers turns, ...) gets no pieces, and
the C library says so when asked to chat."""

from __future__ import annotations

from typing import Callable

Render = Callable[[list[dict], bool], str]   # (messages, add_generation_prompt) -> text

# a private-use character: no template emits it, and it is not white space, so `trim` keeps it
_MARK = "\ue000sg{}\ue000"
_PAD = " \n\t"


def chat_pieces(render: Render) -> dict | None:
    """{"head", "open": {role: text}, "close": {role: text}, "generation_prompt"} plus, without the fold
    rule, "head_system" and close["system"], and the rules above where the template needs them; or None
    when the template is not of that form."""
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
    """What the C library renders (csrc/src/text.c: render_chat), written once here so the check above and
    the tests use the C library's rule. Raises ValueError where the pieces' rules refuse the roles."""
    trim = str.strip if pieces.get("trim") else str
    fold = pieces.get("system") == "fold"
    out, rest, prefix = [], messages, ""
    if messages and messages[0]["role"] == "system":
        rest = messages[1:]
        if fold:
            out.append(pieces["head"])
            prefix = messages[0]["content"] + pieces["system_separator"]
        else:
            out.append(pieces["head_system"] + trim(messages[0]["content"]) + pieces["close"]["system"])
    else:
        out.append(pieces["head"])
    if pieces.get("alternate"):
        _check_alternation(rest)
    for i, m in enumerate(rest):
        opening = pieces["open"][m["role"]] + (prefix if i == 0 else "")
        out.append(opening + trim(m["content"]) + pieces["close"][m["role"]])
    if add_generation_prompt:
        out.append(pieces["generation_prompt"])
    return "".join(out)


def _check_alternation(messages: list[dict]) -> None:
    for i, m in enumerate(messages):
        if m["role"] != ("user" if i % 2 == 0 else "assistant"):
            raise ValueError(f"message {i}: role '{m['role']}'; this chat template needs user and assistant "
                             "turns to alternate, starting with user")


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
    with_prompt = render([{"role": "user", "content": m[0]}], True)
    without = render([{"role": "user", "content": m[0]}], False)
    generation_prompt = _suffix_after(with_prompt, without)
    s0, s1, _ = _split(render([{"role": "system", "content": m[0]}, {"role": "user", "content": m[1]}], False), 2)
    if s0 == head + user_open:      # the system prompt opens the first user turn
        pieces = {"head": head, "generation_prompt": generation_prompt,
                  "open": {"user": user_open, "assistant": assistant_open},
                  "close": {"user": user_close, "assistant": assistant_close},
                  "system": "fold", "system_separator": s1}
    else:   # plain pieces, keys in the order earlier exports wrote them (their manifests stay byte for byte)
        pieces = {"head": head, "head_system": s0, "generation_prompt": generation_prompt,
                  "open": {"user": user_open, "assistant": assistant_open},
                  "close": {"system": _prefix_before(s1, user_open), "user": user_close, "assistant": assistant_close}}
    padded = _PAD + m[0] + _PAD
    if padded not in render([{"role": "user", "content": padded}], False):
        pieces["trim"] = True
    if all(_refuses(render, messages) for messages in _not_alternating()):
        pieces["alternate"] = True
    return pieces


def _refuses(render: Render, messages: list[dict]) -> bool:
    try:
        render(messages, True)
    except Exception:   # the template's raise_exception, whatever error type the renderer wraps it in
        return True
    return False


def _not_alternating() -> list[list[dict]]:
    u, a = {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}
    return [[u, u], [a, u], [{"role": "system", "content": "s"}, a, u], [u, a, a, u]]


def _checks() -> list[list[dict]]:
    edge = " spaces and\nnew lines \n"
    wide = "\u3000\u00a0 wide\u2003white\u2028space\x1f \n"
    return [
        [{"role": "user", "content": "Hello!"}],
        [{"role": "user", "content": edge}],
        [{"role": "user", "content": wide}],
        [{"role": "user", "content": "Grüße, 世界 🙂"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
        [{"role": "system", "content": edge}, {"role": "user", "content": "a"},
         {"role": "assistant", "content": edge}, {"role": "user", "content": ""}],
        [{"role": "system", "content": wide}, {"role": "user", "content": edge},
         {"role": "assistant", "content": wide}, {"role": "user", "content": edge}],
    ]
