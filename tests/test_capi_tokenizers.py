"""libsteerguard's tokenizer beyond byte-level BPE, held to `tokenizers` (encode and decode) on the shared
corpus of tests/test_capi.py: SentencePiece-style BPE with byte fallback in the shapes Llama 2, Gemma and
newer Metaspace conversions write it (trained here, offline), the real Gemma 3 tokenizer when the named
model is in the cache, and the refusal, at load, of what the C library cannot reproduce.

The tokenizers ride in one tiny unguarded bundle: each test copies it and swaps its tokenizer.json (the
manifest's sha256 updated), so the C library loads exactly the file `tokenizers` reads."""
import hashlib
import json
import random
import shutil
import sys
from pathlib import Path

import pytest

from conftest import tiny_model, tiny_tokenizer
from test_capi import build, tokenizer_corpus
from steerguard.runtime.native import NativeError, NativeLibrary

BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
SPECIALS = ["<unk>", "<s>", "</s>"]


@pytest.fixture(scope="session")
def native() -> NativeLibrary:
    return NativeLibrary.load(build("c", "-DCMAKE_BUILD_TYPE=Release") / "libsteerguard.so")


@pytest.fixture(scope="session")
def carrier(tmp_path_factory) -> Path:
    """A tiny unguarded Llama bundle whose engines take ids up to 2047 (the trained tokenizers' range)."""
    from steerguard.export.bundle import export_bundle
    from steerguard.export.models import LoadedModel

    tok = tiny_tokenizer(["the carrier of other tokenizers"])
    lm = LoadedModel(model=tiny_model("llama", 2048), tokenizer=tok, source="carrier", name="carrier",
                     sha256="carrier")
    return export_bundle(lm, None, tmp_path_factory.mktemp("carrier") / "plain", progress=False)


def with_tokenizer(carrier: Path, spec: dict | str, folder: Path) -> Path:
    """A copy of the carrier bundle whose tokenizer.json is `spec`."""
    shutil.copytree(carrier, folder)
    target = folder / "tokenizer" / "tokenizer.json"
    target.write_text(spec if isinstance(spec, str) else json.dumps(spec))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["tokenizer/tokenizer.json"] = hashlib.sha256(target.read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def compare(native: NativeLibrary, bundle: Path, corpus: list[str], seed: int = 1) -> dict:
    """Encode every string and decode (whole encodings, and random id runs) in C and in `tokenizers`;
    returns the counts and the first mismatches."""
    from tokenizers import Tokenizer

    reference = Tokenizer.from_file(str(bundle / "tokenizer" / "tokenizer.json"))
    bad_encode, bad_decode, decoded = [], [], 0
    rng = random.Random(seed)
    with native.model(bundle, threads=1) as m:
        for i, s in enumerate(corpus):
            want = reference.encode(s, add_special_tokens=False).ids
            if m.tokenize(s) != want:
                bad_encode.append(s)
            if i % 10 == 0:
                decoded += 1
                if m.detokenize(want) != reference.decode(want, skip_special_tokens=True):
                    bad_decode.append(want)
        size = reference.get_vocab_size()
        for _ in range(2000):
            ids = [rng.randrange(size) for _ in range(rng.randint(1, 8))]
            decoded += 1
            if m.detokenize(ids) != reference.decode(ids, skip_special_tokens=True):
                bad_decode.append(ids)
    return {"strings": len(corpus), "encode_mismatches": len(bad_encode), "decoded": decoded,
            "decode_mismatches": len(bad_decode), "examples": [*bad_encode[:3], *bad_decode[:3]]}


# ---- a SentencePiece-style BPE trained here -----------------------------------------------------------

def train_sentencepiece_bpe(texts: list[str], vocab_size: int = 1200) -> dict:
    """A BPE with Llama 2's layout: special tokens, the 256 <0xHH> byte tokens, then the trained pieces
    (merged over `▁`-marked words), as tokenizer.json; the caller picks normalizer, pre-tokenizer and
    decoder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                                       show_progress=False, limit_alphabet=200))
    spec = json.loads(tok.to_str())
    trained = spec["model"]["vocab"]
    vocab = {t: i for i, t in enumerate(SPECIALS + BYTE_TOKENS)}
    for t, _ in sorted(trained.items(), key=lambda kv: kv[1]):
        vocab.setdefault(t, len(vocab))
    spec["model"]["vocab"] = vocab
    spec["added_tokens"] = [{"id": vocab[t], "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True} for t in SPECIALS]
    return spec


def with_added(spec: dict, *tokens) -> dict:
    """spec with more added tokens (AddedToken objects), given their ids the way `tokenizers` does (the
    vocabulary's id for a text it holds, else the next free one)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(json.dumps(spec))
    for t in tokens:
        (tok.add_special_tokens if t.special else tok.add_tokens)([t])
    return json.loads(tok.to_str())


def added(content: str, special: bool, normalized: bool = False, lstrip: bool = False, rstrip: bool = False,
          single_word: bool = False):
    from tokenizers import AddedToken

    return AddedToken(content, special=special, normalized=normalized, lstrip=lstrip, rstrip=rstrip,
                      single_word=single_word)


def replace(a: str, b: str) -> dict:
    return {"type": "Replace", "pattern": {"String": a}, "content": b}


SP_DECODER = [replace("▁", " "), {"type": "ByteFallback"}, {"type": "Fuse"}]


def sentencepiece_variant(base: dict, kind: str) -> dict:
    """The trained BPE in the shape one family's tokenizer.json has."""
    spec = json.loads(json.dumps(base))
    if kind == "llama2":      # Llama 2 / Phi-3 as transformers converts them (legacy): prefix and spaces normalized
        spec["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"},
                                                                  replace(" ", "▁")]}
        spec["pre_tokenizer"] = None
        spec["decoder"] = {"type": "Sequence", "decoders": [*SP_DECODER,
                                                            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    elif kind == "gemma":     # Gemma 3 from its GGUF: spaces normalized, no prefix, a Split that finds no space
        spec["normalizer"] = replace(" ", "▁")
        spec["pre_tokenizer"] = {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious",
                                 "invert": False}
        spec["decoder"] = {"type": "Sequence", "decoders": SP_DECODER}
        spec = with_added(spec, added("<start_of_turn>", True), added("<end_of_turn>", True), added("\n", False),
                          added("\n\n", False), added("▁▁", False, normalized=True),
                          added("<mask>", True, lstrip=True), added("[x]", False, rstrip=True))
    elif kind == "metaspace":  # newer conversions: a Metaspace pre-tokenizer prepends to the first piece only
        spec["normalizer"] = None
        spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": True}
        spec["decoder"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": True}
        spec = with_added(spec, added("<|im_start|>", True), added("<|im_end|>", True))
    elif kind == "unknown":   # no byte fallback: unknown characters, unfused; whole words found before merges
        # (a Strip with stop > 0 makes tokenizers 0.23 panic on texts shorter than stop, so none here)
        spec["model"].update(byte_fallback=False, fuse_unk=False, ignore_merges=True)
        spec["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "NFC"}]}
        spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": False}
        spec["decoder"] = {"type": "Sequence", "decoders": [*SP_DECODER,
                                                            {"type": "Strip", "content": " ", "start": 2, "stop": 0}]}
    else:
        raise ValueError(kind)
    return spec


def added_token_soup(n: int = 5000, seed: int = 7) -> list[str]:
    """Strings of added tokens, white space, byte-token look-alikes and words: where added tokens touch,
    overlap once widened by lstrip/rstrip, and start or end the text."""
    alphabet = ["<s>", "</s>", "<unk>", "<mask>", "[x]", "▁▁", "▁", " ", "  ", "\u00a0", "\n", "\n\n", "\t", "a",
                "hello", "é", "e\u0301", "日本", "🙂", "<start_of_turn>", "<end_of_turn>", "<|im_start|>", "<|im_end|>",
                "<0x41>", "x", "The", "\r\n", "ab", "1", "23", "<bos>", "<table>", "[multimodal]"]
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) for _ in range(n)]


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    return tokenizer_corpus() + added_token_soup()


@pytest.fixture(scope="session")
def trained(corpus) -> dict:
    return train_sentencepiece_bpe(corpus[:4000])


@pytest.mark.parametrize("kind", ["llama2", "gemma", "metaspace", "unknown"])
def test_sentencepiece_bpe_equals_tokenizers_on_the_corpus(native, carrier, trained, corpus, kind, tmp_path):
    bundle = with_tokenizer(carrier, sentencepiece_variant(trained, kind), tmp_path / kind)
    extra = ["  ", " a", "a ", "▁", "▁▁x", " ▁ ", "<mask>", "a <mask> b", "x[x]  y", "\n \n", "<start_of_turn>user\nhi",
             "<|im_start|>hi", "hi<|im_end|> there", "  leading", "<0x41>", "日本語🙂", "\u00e9e\u0301", "",
             # lstrip/rstrip take Unicode's white space, not only ASCII's
             "a\u00a0<mask>b", "a\u3000\u00a0 <mask>", "[x]\u00a0\u2028y", "[x]\u00a0\u00a0<mask>", "\u2029<mask>"]
    got = compare(native, bundle, corpus + extra)
    assert got["encode_mismatches"] == 0 and got["decode_mismatches"] == 0, got


@pytest.mark.parametrize("behavior", ["Removed", "Isolated", "MergedWithPrevious", "MergedWithNext", "Contiguous"])
def test_every_split_behaviour_then_metaspace_equals_tokenizers(native, carrier, trained, behavior, tmp_path):
    """Split by a string and by a regex, inverted or not, then Metaspace prepending to the first piece only:
    short strings of spaces, words and `▁`, where pieces start, end and vanish."""
    from tokenizers import Tokenizer

    rng = random.Random(3)
    alphabet = [" ", "  ", "a", "b", "▁", "x y", "\n", "é"]
    strings = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 10))) for _ in range(2000)]
    for i, (invert, pattern) in enumerate((inv, pat) for inv in (False, True)
                                          for pat in ({"String": " "}, {"Regex": "\\s+"})):
        spec = sentencepiece_variant(trained, "metaspace")
        spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": pattern, "behavior": behavior, "invert": invert},
            {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": True}]}
        bundle = with_tokenizer(carrier, spec, tmp_path / str(i))
        reference = Tokenizer.from_file(str(bundle / "tokenizer" / "tokenizer.json"))
        with native.model(bundle, threads=1) as m:
            bad = [t for t in strings if m.tokenize(t) != reference.encode(t, add_special_tokens=False).ids]
        assert not bad, (invert, pattern, bad[:3])


def test_the_trained_tokenizers_exercise_byte_fallback_and_unknowns(trained, corpus):
    """The corpus reaches the paths under test: characters outside the trained vocabulary (byte tokens),
    unknown tokens without byte fallback, and runs of byte tokens that are not UTF-8 when decoded."""
    from tokenizers import Tokenizer

    gemma = Tokenizer.from_str(json.dumps(sentencepiece_variant(trained, "gemma")))
    unknown = Tokenizer.from_str(json.dumps(sentencepiece_variant(trained, "unknown")))
    byte_ids = {gemma.token_to_id(t) for t in BYTE_TOKENS}
    assert sum(any(i in byte_ids for i in gemma.encode(s, add_special_tokens=False).ids) for s in corpus) > 1000
    assert sum(0 in unknown.encode(s, add_special_tokens=False).ids for s in corpus) > 1000
    assert gemma.decode([gemma.token_to_id("<0xE2>"), gemma.token_to_id("<0x82>")]) == "\ufffd\ufffd"


# ---- the real Gemma 3 tokenizer -------------------------------------------------------------------------

def gemma_tokenizer_json() -> Path | None:
    from steerguard.export.models import named_model_dir

    path = named_model_dir("gemma3-270m") / "tokenizer.json"
    return path if path.exists() else None


@pytest.mark.slow
@pytest.mark.skipif(gemma_tokenizer_json() is None,
                    reason="gemma3-270m is not fetched (steerguard.export.models.fetch_named_model('gemma3-270m'))")
def test_gemma3_tokenizer_equals_tokenizers_on_the_corpus(native, carrier, corpus, tmp_path):
    bundle = with_tokenizer(carrier, gemma_tokenizer_json().read_text(), tmp_path / "gemma3")
    extra = ["<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n", "\n" * 40, "<table><tr>",
             "<bos>x<eos>", "[multimodal]", "  two  spaces  "]
    got = compare(native, bundle, corpus + extra)
    assert got["encode_mismatches"] == 0 and got["decode_mismatches"] == 0, got


# ---- refusals ---------------------------------------------------------------------------------------------

def refusals(trained: dict) -> list[tuple[str, dict]]:
    """(what the message names, a tokenizer.json the C library cannot reproduce)."""
    base = sentencepiece_variant(trained, "gemma")

    def changed(**parts) -> dict:
        spec = json.loads(json.dumps(base))
        for key, value in parts.items():
            if key == "model":
                spec["model"].update(value)
            else:
                spec[key] = value
        return spec

    unigram = changed()
    unigram["model"] = {"type": "Unigram", "unk_id": 0, "vocab": [["<unk>", 0.0], ["a", -1.0]]}
    return [
        ("tokenizer model Unigram", unigram),
        ("normalizer Lowercase", changed(normalizer={"type": "Lowercase"})),
        ("normalizer Precompiled", changed(normalizer={"type": "Sequence", "normalizers": [
            {"type": "Precompiled", "precompiled_charsmap": ""}]})),
        ("normalizer Replace with a regex", changed(normalizer={"type": "Replace", "pattern": {"Regex": " +"},
                                                                "content": "▁"})),
        ("pre-tokenizer Whitespace", changed(pre_tokenizer={"type": "Whitespace"})),
        ("decoder WordPiece", changed(decoder={"type": "WordPiece", "prefix": "##", "cleanup": True})),
        ("no decoder", changed(decoder=None)),
        ("BPE dropout", changed(model={"dropout": 0.1})),
        ("continuing_subword_prefix", changed(model={"continuing_subword_prefix": "##"})),
        ("single_word", with_added(base, added("zz", False, single_word=True))),
    ]


def test_what_the_c_library_cannot_reproduce_is_refused_at_load_with_the_reason(native, carrier, trained, tmp_path):
    for i, (named, spec) in enumerate(refusals(trained)):
        bundle = with_tokenizer(carrier, spec, tmp_path / str(i))
        with pytest.raises(NativeError) as e:
            native.model(bundle, threads=1)
        assert e.value.status == "SG_ERR_UNSUPPORTED", (named, str(e.value))
        assert named in str(e.value) and "\n" not in str(e.value), (named, str(e.value))
    wordlevel = with_tokenizer(carrier, (carrier / "tokenizer" / "tokenizer.json").read_text(), tmp_path / "wl")
    with pytest.raises(NativeError, match="tokenizer model WordLevel; the C library runs BPE only"):
        native.model(wordlevel)


# ---- under AddressSanitizer, UndefinedBehaviorSanitizer and LeakSanitizer -----------------------------

SANITIZED_COMPARE = """
import json, sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from test_capi_tokenizers import added_token_soup, compare, tokenizer_corpus
from steerguard.runtime.native import NativeLibrary
lib = NativeLibrary.load(sys.argv[2])
corpus = tokenizer_corpus()
corpus = corpus[::5] + corpus[-3:] + added_token_soup(1000)   # every fifth string, the three long pieces
print(json.dumps({b: compare(lib, Path(b), corpus) for b in sys.argv[3:]}))
"""


def sanitizer_runtime() -> str:
    import subprocess

    libs = [subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
            for name in ("libasan.so", "libubsan.so")]
    if not all(Path(p).is_absolute() for p in libs):
        pytest.skip("gcc's libasan/libubsan not found")
    return ":".join(libs)


@pytest.fixture(scope="session")
def asan_dir() -> Path:
    return build("c-asan", "-DCMAKE_BUILD_TYPE=Debug", "-DSTEERGUARD_SANITIZE=ON")


def test_sentencepiece_tokenizers_under_sanitizers(carrier, trained, asan_dir, tmp_path):
    """The corpus through the sanitized library in a Python whose allocator ASan replaces (leak checks off:
    the interpreter's own allocations would drown them), then load/generate/free cycles in the C test
    program with LeakSanitizer on."""
    import os
    import subprocess

    from test_capi import run_checked

    bundles = [with_tokenizer(carrier, sentencepiece_variant(trained, k), tmp_path / k)
               for k in ("llama2", "gemma", "metaspace", "unknown")]
    if gemma_tokenizer_json() is not None:
        bundles.append(with_tokenizer(carrier, gemma_tokenizer_json().read_text(), tmp_path / "gemma3"))
    env = {**os.environ, "LD_PRELOAD": sanitizer_runtime(), "ASAN_OPTIONS": "detect_leaks=0",
           "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"}
    done = subprocess.run([sys.executable, "-c", SANITIZED_COMPARE, str(Path(__file__).parent),
                           str(asan_dir / "libsteerguard.so"), *map(str, bundles)],
                          capture_output=True, text=True, env=env, timeout=3000)
    assert done.returncode == 0 and "runtime error" not in done.stderr, done.stderr[-4000:]
    assert "Sanitizer" not in done.stderr, done.stderr[-4000:]
    for bundle, got in json.loads(done.stdout.splitlines()[-1]).items():
        assert got["encode_mismatches"] == 0 and got["decode_mismatches"] == 0, (bundle, got)
    for bundle in bundles[:2]:
        assert "50/50" in run_checked([asan_dir / "capi_test", "cycles", bundle, 50])


def main() -> None:
    """`python tests/test_capi_tokenizers.py [LIBRARY]`: the numbers of docs/capi_tokenizers.md, as a table."""
    import tempfile
    import time

    from test_capi import bpe_tokenizer

    lib = NativeLibrary.load(sys.argv[1] if len(sys.argv) > 1 else build("c", "-DCMAKE_BUILD_TYPE=Release")
                             / "libsteerguard.so")
    work = Path(tempfile.mkdtemp(prefix="capi-tokenizers-"))
    from steerguard.export.bundle import export_bundle
    from steerguard.export.models import LoadedModel

    tok = tiny_tokenizer(["the carrier of other tokenizers"])
    carrier_bundle = export_bundle(LoadedModel(model=tiny_model("llama", 2048), tokenizer=tok, source="carrier",
                                               name="carrier", sha256="carrier"), None, work / "carrier", progress=False)
    corpus = tokenizer_corpus() + added_token_soup()
    trained_spec = train_sentencepiece_bpe(corpus[:4000])
    for family in ("llama", "qwen2"):   # test_capi's two byte-level tokenizers
        bpe_tokenizer(family, work / family)
    specs = {"SmolLM2 (byte-level)": (work / "llama" / "tokenizer.json").read_text(),
             "Qwen2 shape (byte-level, NFC)": (work / "qwen2" / "tokenizer.json").read_text(),
             **{f"trained byte-fallback BPE, {k} shape": sentencepiece_variant(trained_spec, k)
                for k in ("llama2", "gemma", "metaspace", "unknown")}}
    if gemma_tokenizer_json() is not None:
        specs["Gemma 3 270M (from its GGUF)"] = gemma_tokenizer_json().read_text()
    print("| tokenizer | strings encoded | encode mismatches | sequences decoded | decode mismatches | seconds |")
    print("|---|---|---|---|---|---|")
    for i, (name, spec) in enumerate(specs.items()):
        start = time.perf_counter()
        got = compare(lib, with_tokenizer(carrier_bundle, spec, work / f"b{i}"), corpus)
        print(f"| {name} | {got['strings']:,} | {got['encode_mismatches']} | {got['decoded']:,} | "
              f"{got['decode_mismatches']} | {time.perf_counter() - start:.1f} |", flush=True)
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
