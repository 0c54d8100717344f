"""Calibration data: harmful/benign pairs, refusal targets and prompt sets, from the VLSafe format,
the shipped defaults, or the user's own JSONL / JSON / CSV / text files.

Every loader names the file and line of a malformed row."""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Iterator

from ..errors import SteerguardError, where


@dataclass(frozen=True)
class ImagePrompt:
    """A request that shows the model an image (a file path) with its text."""
    text: str
    image: str

    def strip(self) -> str:   # prompts are checked for emptiness by their text
        return self.text.strip()


Prompt = str | ImagePrompt


@dataclass(frozen=True)
class Pair:
    """A harmful request and a benign counterpart in the same style; `refusal` is a training target.
    With `image` (a file path) both requests are asked about that image."""
    harmful: str
    benign: str
    source: str
    refusal: str | None = None
    image: str | None = None

    def prompts(self) -> tuple[Prompt, Prompt]:
        if self.image is None:
            return self.harmful, self.benign
        return ImagePrompt(self.harmful, self.image), ImagePrompt(self.benign, self.image)


@dataclass
class PromptSet:
    """Labelled prompts from one source (label 1 = harmful, 0 = benign)."""
    source: str
    label: int
    prompts: list[str] = field(default_factory=list)

    def sample(self, n: int | None, seed: int = 0) -> "PromptSet":
        if n is None or n >= len(self.prompts):
            return self
        return PromptSet(self.source, self.label, random.Random(seed).sample(self.prompts, n))


def data_path(*parts: str) -> Path:
    """A file shipped inside the package (`steerguard/data/...`)."""
    return Path(str(resources.files("steerguard") / "data" / Path(*parts)))


# --- reading rows --------------------------------------------------------------------------

def read_rows(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, row dict) from .jsonl, .json (a list of objects), .csv or .txt files."""
    path = Path(path)
    if not path.is_file():
        raise SteerguardError(f"{path}: no such data file")
    suffix = path.suffix.lower()
    try:
        with open(path, encoding="utf-8") as f:
            if suffix == ".jsonl":
                for n, line in enumerate(f, 1):
                    if line.strip():
                        yield n, _json_object(line, path, n)
            elif suffix == ".json":
                rows = json.load(f)
                if not isinstance(rows, list):
                    raise SteerguardError(f"{path}: expected a JSON list of objects")
                for n, row in enumerate(rows, 1):
                    if not isinstance(row, dict):
                        raise SteerguardError(f"{where(path, n)}: item {n} is not an object")
                    yield n, row
            elif suffix == ".csv":
                for n, row in enumerate(csv.DictReader(f), 2):  # line 1 is the header
                    yield n, row
            elif suffix == ".txt":
                for n, line in enumerate(f, 1):
                    if line.strip():
                        yield n, {"text": line.rstrip("\n")}
            else:
                raise SteerguardError(f"{path}: unknown data format {suffix!r} (use .jsonl, .json, .csv or .txt)")
    except UnicodeDecodeError as e:
        raise SteerguardError(f"{path}: not UTF-8 text ({e.reason})") from e
    except json.JSONDecodeError as e:
        raise SteerguardError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e


def _json_object(line: str, path: Path, n: int) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise SteerguardError(f"{where(path, n)}: invalid JSON ({e.msg})") from e
    if not isinstance(row, dict):
        raise SteerguardError(f"{where(path, n)}: expected a JSON object")
    return row


def field_text(row: dict, key: str, path: Path, n: int, required: bool = True) -> str | None:
    """Read `key` from a row; `turns.0` style keys index into lists. Non-empty text or an error."""
    value: object = row
    for part in key.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            value = None
            break
    if value is None or (isinstance(value, str) and not value.strip()):
        if not required:
            return None
        raise SteerguardError(f"{where(path, n)}: missing or empty field {key!r}")
    if not isinstance(value, str):
        raise SteerguardError(f"{where(path, n)}: field {key!r} is not text")
    return value


# --- formats ---------------------------------------------------------------------------------

def with_caption(caption: str | None, query: str) -> str:
    """How a text-only model sees a visual question: the caption stands in for the image."""
    return f"Image: {caption.strip()}\n{query.strip()}" if caption else query.strip()


def query_of(prompt: str) -> str:
    """The request without its caption: two prompts asking the same query about different captions
    count as the same request when test data is deduplicated against calibration data."""
    return prompt.split("\n", 1)[1].strip() if prompt.startswith("Image: ") and "\n" in prompt else prompt.strip()


def drop_calibration_overlap(sets: list[PromptSet]) -> dict[str, int]:
    """Remove from `sets` (in place) every prompt whose query is in the shipped calibration data;
    return how many each set lost."""
    seen = {query_of(t) for p in default_pairs() for t in (p.harmful, p.benign)}
    seen |= {query_of(t) for s in default_benign() for t in s.prompts}
    dropped = {}
    for s in sets:
        before = len(s.prompts)
        s.prompts = [p for p in s.prompts if query_of(p) not in seen]
        dropped[s.source] = before - len(s.prompts)
    return dropped


def load_pairs(path: str | Path, harmful: str = "harmful", benign: str = "benign",
               refusal: str | None = "refusal", caption: str | None = None,
               source: str | None = None, image: str | None = None, image_root: str | Path | None = None,
               caption_for_missing_image: bool = False) -> list[Pair]:
    """Pairs from the user's own file; which column is which is an option. With `image` (a column of
    file paths, relative to `image_root` or the data file's folder) each pair is asked about its image;
    a missing image is an error naming the row, unless `caption_for_missing_image` puts the row's
    caption in its place as text."""
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    pairs = []
    for n, row in read_rows(path):
        cap = field_text(row, caption, path, n, required=False) if caption else None
        picture = _image_of(row, image, root, path, n, fallback=caption_for_missing_image and cap is not None)
        shown = None if picture else cap
        pairs.append(Pair(
            harmful=with_caption(shown, field_text(row, harmful, path, n)),
            benign=with_caption(shown, field_text(row, benign, path, n)),
            source=source or path.stem,
            refusal=field_text(row, refusal, path, n, required=False) if refusal else None,
            image=picture))
    return pairs


def _image_of(row: dict, column: str | None, root: Path, path: Path, n: int, fallback: bool) -> str | None:
    if not column:
        return None
    name = field_text(row, column, path, n)
    file = root / name
    if file.is_file():
        return str(file)
    if fallback:
        return None
    raise SteerguardError(f"{where(path, n)}: image {file} not found; fix the path (images are looked up "
                          "under --image-root) or use its caption as text instead (--caption-for-missing-image)")


def load_prompts(path: str | Path, label: int, column: str = "prompt", caption: str | None = None,
                 source: str | None = None) -> PromptSet:
    """One column of prompts (e.g. `instruction`, `turns.0`, `query`), optionally with a caption."""
    path = Path(path)
    column = "text" if path.suffix.lower() == ".txt" else column
    prompts = []
    for n, row in read_rows(path):
        cap = field_text(row, caption, path, n, required=False) if caption else None
        prompts.append(with_caption(cap, field_text(row, column, path, n)))
    return PromptSet(source or path.stem, label, prompts)


def load_vlsafe(folder: str | Path) -> list[Pair]:
    """VLSafe: `VLSafe_harmlessnss_alignment.jsonl` (caption, query, reference) zipped row by row
    with `vlsafe_convert_safe.jsonl` (safe_query, orig_query)."""
    folder = Path(folder)
    harmful_file = folder / "VLSafe_harmlessnss_alignment.jsonl"
    safe_file = folder / "vlsafe_convert_safe.jsonl"
    harmful_rows = list(read_rows(harmful_file))
    safe_rows = list(read_rows(safe_file))
    if len(harmful_rows) != len(safe_rows):
        raise SteerguardError(f"{safe_file}: {len(safe_rows)} rows, but {harmful_file} has {len(harmful_rows)}")
    pairs = []
    for (n, h), (m, s) in zip(harmful_rows, safe_rows):
        query = field_text(h, "query", harmful_file, n)
        if field_text(s, "orig_query", safe_file, m).strip() != query.strip():
            raise SteerguardError(f"{where(safe_file, m)}: orig_query does not match line {n} of {harmful_file.name}")
        caption = field_text(h, "caption", harmful_file, n)
        pairs.append(Pair(harmful=with_caption(caption, query),
                          benign=with_caption(caption, field_text(s, "safe_query", safe_file, m)),
                          source="vlsafe",
                          refusal=text_only_refusal(field_text(h, "reference", harmful_file, n))))
    return pairs


def text_only_refusal(reference: str) -> str:
    """Turn a VLSafe reference ("I appreciate your interest in the image of ... However, I must
    emphasize that I cannot ...") into a target that opens with the refusal and never mentions an
    image: drop the sentences about the image, start from the first sentence that refuses."""
    sentences = [s.strip() for s in reference.replace("\n", " ").split(". ") if s.strip()]
    refusing = ("cannot", "can't", "not able", "unable", "won't", "not provide", "not support")
    start = next((i for i, s in enumerate(sentences) if any(w in s.lower() for w in refusing)), 0)
    kept = [s for s in sentences[start:] if "image" not in s.lower() and "picture" not in s.lower()]
    body = ". ".join(kept).rstrip(".") + "." if kept else ""
    for lead in ("However, ", "However ", "Nevertheless, "):
        body = body[len(lead):] if body.startswith(lead) else body
    body = body.replace("I must emphasize that I cannot", "I can't").replace("I must emphasize that ", "")
    body = body[:1].upper() + body[1:]
    return f"I'm sorry, but I can't help with that. {body}".strip()


# --- the shipped defaults -----------------------------------------------------------------------

def default_pairs() -> list[Pair]:
    """Pairs shipped in the package: VLSafe (MIT, via AutoSteer) and the project's own contrast
    pairs (Apache-2.0), which differ in intent but not in style."""
    pairs = load_vlsafe(data_path("vlsafe"))
    for f in sorted(data_path("contrast").glob("*.jsonl")):     # pairs_a.jsonl -> source "contrast-a"
        pairs += [replace(p, refusal=judged_refusal(p.refusal))
                  for p in load_pairs(f, source="contrast-" + f.stem.split("_")[-1])]
    return pairs


def judged_refusal(text: str) -> str:
    """Refusal targets open with an apology the standard refusal judge recognises: a target such as
    "I won't write that." becomes "I'm sorry, but I won't write that." """
    from ..runtime.judge import opens_with_refusal

    if opens_with_refusal(text):
        return text
    first = text.split(maxsplit=1)[0] if text.split() else ""
    keep_case = first == "I" or first.startswith(("I'", "I’"))
    return "I'm sorry, but " + (text if keep_case else text[:1].lower() + text[1:])


def default_benign() -> list[PromptSet]:
    """Extra benign prompts shipped in the package: an Alpaca subset (CC BY-NC 4.0)."""
    return [load_prompts(data_path("alpaca", "alpaca_subset.jsonl"), 0, "instruction", source="alpaca")]


def public_sets() -> list[PromptSet]:
    """The licensed public prompt sets shipped in `data/public` (harmful requests of many hazards and
    phrasings, benign requests that only sound dangerous, ordinary requests), one PromptSet per file, named
    after it; provenance and licenses in `data/public/README.md`."""
    sets = []
    for f in sorted(data_path("public").glob("*/*.jsonl")):
        rows = [row for _, row in read_rows(f)]
        labels = {row.get("label") for row in rows}
        if len(labels) != 1 or labels - {0, 1}:
            raise SteerguardError(f"{f}: expected one label, 0 or 1, for every row; found {sorted(map(str, labels))}")
        sets.append(PromptSet(f.stem, labels.pop(), [field_text(row, "prompt", f, n) for n, row in enumerate(rows, 1)]))
    return sets


def evaluation_sets() -> list[PromptSet]:
    """The shipped evaluation sets, never calibrated on: held-out harmful requests, benign requests that sound
    dangerous, benign conversational requests (each named after its file)."""
    return [load_prompts(data_path("eval", f"{name}.jsonl"), label)
            for name, label in (("harmful_heldout", 1), ("sounds_dangerous", 0), ("benign_conversational", 0))]
