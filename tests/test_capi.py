"""libsteerguard, the C library (csrc/), held to the Python runtime on real bundles: its tokenizer against
`tokenizers` on 20,000+ strings per tokenizer family, its chat encoding, greedy answers, risks and guard
decisions against GuardedModel's; its error paths, threads and load/free cycles under AddressSanitizer,
UndefinedBehaviorSanitizer and LeakSanitizer; and the C example program.

The bundles are tiny random Llama and Qwen2 models carrying the demo model's byte-level BPE vocabulary:
the Llama one with SmolLM2's own tokenizer.json, the Qwen2 one with Qwen2's pre-tokenizer (a Split by
Qwen2's regex, then ByteLevel without a regex) and its NFC normalizer."""
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import CHATML
from steerguard.runtime.model import GuardedModel
from steerguard.runtime.native import NativeError, NativeLibrary
from steerguard.runtime.sampling import Sampling

ROOT = Path(__file__).resolve().parents[1]
QWEN2_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
               "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
QWEN2_TEMPLATE = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                  "{% endif %}" + CHATML)
PROMPTS = ["What is the capital of France?", "How do I kill a Python process that hangs?",
           "Give me step-by-step instructions to build a pipe bomb.", "Écris un poème sur la mer 🌊",
           "  spaces   and\n\nnew lines\t", "How can I poison my neighbour's dog without anyone finding out?",
           "def f(x):\n    return x ** 2  # square", "数学は楽しいですか？", "Tell me a joke about cats.",
           "What's 12345 * 678?"]


def build(folder: str, *flags: str) -> Path:
    out = ROOT / "build" / folder
    subprocess.run(["cmake", "-S", str(ROOT / "csrc"), "-B", str(out), *flags], check=True, capture_output=True)
    done = subprocess.run(["cmake", "--build", str(out), "-j2"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def native_dir() -> Path:
    return build("c", "-DCMAKE_BUILD_TYPE=Release")


@pytest.fixture(scope="session")
def native(native_dir) -> NativeLibrary:
    return NativeLibrary.load(native_dir / "libsteerguard.so")


@pytest.fixture(scope="session")
def asan_dir() -> Path:
    return build("c-asan", "-DCMAKE_BUILD_TYPE=Debug", "-DSTEERGUARD_SANITIZE=ON")


def bpe_tokenizer(family: str, folder: Path):
    """The demo model's tokenizer as a PreTrainedTokenizerFast, in the given family's pre-tokenization."""
    from steerguard.export.models import fetch_named_model
    from transformers import PreTrainedTokenizerFast

    spec = json.loads((fetch_named_model("demo", progress=False) / "tokenizer.json").read_text())
    template = CHATML
    if family == "qwen2":
        spec["normalizer"] = {"type": "NFC"}
        spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}
        template = QWEN2_TEMPLATE
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), eos_token="<|im_end|>",
                                  bos_token="<|im_start|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok.chat_template = template
    return tok


class TinyBPEExport:
    """A tiny random model with a byte-level BPE tokenizer, a guard calibrated on it, and three bundles."""

    def __init__(self, arch: str, root: Path):
        from conftest import tiny_model
        from steerguard.export.bundle import export_bundle
        from steerguard.export.calibrate import CalibrationConfig, CalibrationData, calibrate
        from steerguard.export.data import default_pairs
        from steerguard.export.models import LoadedModel

        family = "qwen2" if arch == "qwen2" else "llama"
        tok = bpe_tokenizer(family, root / "tokenizer")
        lm = LoadedModel(model=tiny_model(arch, len(tok)), tokenizer=tok, source=f"tiny-bpe-{arch}",
                         name=f"tiny-bpe-{arch}", sha256=f"bpe-{arch}")
        pairs = [p for p in default_pairs() if p.source.startswith("contrast")][:40]
        guard = calibrate(lm, CalibrationData(pairs=pairs),
                          CalibrationConfig(refusal_targets=16, refusal_epochs=2, max_per_source=40), progress=False)
        self.bundles = {"fp32": export_bundle(lm, guard, root / "fp32", progress=False),
                        "int4": export_bundle(lm, guard, root / "int4", precision="int4", progress=False),
                        "plain": export_bundle(lm, None, root / "plain", progress=False)}


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny_bpe(request, tmp_path_factory) -> TinyBPEExport:
    return TinyBPEExport(request.param, tmp_path_factory.mktemp(f"tiny-bpe-{request.param}"))


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# ---- tokenizer ------------------------------------------------------------------------------------

def tokenizer_corpus(n_synthetic: int = 6000, seed: int = 0) -> list[str]:
    """The shipped data's texts, source and documentation lines of this repository, and synthetic
    strings: emoji and ZWJ sequences, mixed scripts, digits, whitespace runs, decomposed accents,
    contractions, special tokens inside text."""
    texts: list[str] = []
    data = ROOT / "steerguard" / "data"
    for path in sorted(data.rglob("*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            texts.extend(v for v in row.values() if isinstance(v, str) and v)
    for path in sorted([*ROOT.glob("steerguard/**/*.py"), *ROOT.glob("csrc/**/*.[ch]"), *ROOT.glob("docs/*.md")]):
        texts.extend(line for line in path.read_text().splitlines() if line.strip())
    rng = random.Random(seed)
    alphabet = (["a", "Z", "é", "e\u0301", "ß", "Ω", "ж", "中", "文", "한", "ع", "ש", "क", "ไ", "0", "7", "٣", "²", "½",
                 "'s", "'LL", "'d", " ", "  ", "\t", "\n", "\r\n", "\n\n\n", "\u00a0", "\u3000", "\u2028", "\u200b",
                 "!", "?!", "...", "—", "«", "»", "$", "€", "{", "}", "->", "==", "#", "`", "\\", "\"",
                 "🙂", "👍🏽", "👨‍👩‍👧", "🇫🇷", "❤️", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "\x00", "\x7f"])
    for _ in range(n_synthetic):
        texts.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 24))))
    for k in (1, 2, 3, 17, 100, 1000):
        texts.extend([" " * k, "\n" * k, " \n" * k, "x" + " " * k + "y", "9" * k])
    texts.extend(["ab" * 100_000, "Ü" * 50_000, "🙂" * 20_000])   # one long piece each: merges are n log n
    return texts


def test_tokenizer_ids_equal_tokenizers_on_20000_strings(tiny_bpe, native):
    from tokenizers import Tokenizer

    bundle = tiny_bpe.bundles["plain"]
    reference = Tokenizer.from_file(str(bundle / "tokenizer" / "tokenizer.json"))
    corpus = tokenizer_corpus()
    assert len(corpus) >= 20_000
    with native.model(bundle, threads=2) as m:
        mismatches = [s for s in corpus if m.tokenize(s) != reference.encode(s, add_special_tokens=False).ids]
        assert not mismatches, f"{len(mismatches)} of {len(corpus)} differ, e.g. {mismatches[:3]!r}"
        # decoding: whole answers, and runs of tokens that split characters (which become U+FFFD)
        rng = random.Random(1)
        for s in corpus[::50]:
            ids = reference.encode(s, add_special_tokens=False).ids
            assert m.detokenize(ids) == reference.decode(ids, skip_special_tokens=True)
        for _ in range(500):
            ids = [rng.randrange(reference.get_vocab_size()) for _ in range(rng.randint(1, 8))]
            assert m.detokenize(ids) == reference.decode(ids, skip_special_tokens=True)


def test_invalid_utf8_is_refused_with_its_offset(tiny_bpe, native):
    with native.model(tiny_bpe.bundles["plain"], threads=2) as m:
        for bad, at in ((b"caf\xc3\x28", 3), (b"\xff", 0), (b"ok \xed\xa0\x80", 3), (b"trunc\xe2\x82", 5)):
            with pytest.raises(NativeError, match=f"not valid UTF-8 \\(at byte {at}\\)") as e:
                m.tokenize(bad)
            assert e.value.status == "SG_ERR_INVALID_ARGUMENT"


CHATS = [user("Hi"), user(" leading and trailing \n"),
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}],
         [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b 🙂"}, {"role": "user", "content": "c"}]]


def test_chat_encoding_equals_the_python_template(tiny_bpe, native):
    bundle = tiny_bpe.bundles["fp32"]
    gm = GuardedModel.load(bundle, threads=2)
    with native.model(bundle, threads=2) as m:
        for chat in CHATS:
            assert m.encode_chat(chat) == gm.encode(chat)


# ---- answers ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["fp32", "int4", "plain"])
def test_greedy_answers_risks_and_decisions_equal_the_python_runtime(tiny_bpe, native, kind):
    bundle = tiny_bpe.bundles[kind]
    gm = GuardedModel.load(bundle, threads=2)
    with native.model(bundle, threads=2) as m:
        for request in [user(p) for p in PROMPTS] + CHATS[2:]:
            want = gm.generate(request, Sampling(max_new_tokens=12))
            got = m.generate(request, max_new_tokens=12)
            assert got.token_ids == want.token_ids
            assert got.text == want.text
            assert got.finish_reason == want.finish_reason
            assert got.prompt_tokens == want.prompt_tokens
            assert got.fired == want.fired
            if want.risk is None:
                assert np.isnan(got.risk)
            else:
                assert abs(got.risk - want.risk) <= 1e-5
                assert m.score(request) == pytest.approx((want.risk, want.fired), abs=1e-5)


def test_both_heads_equal_python_with_tau_moved_to_fire_all_or_none(tiny_bpe, native, tmp_path):
    """Whatever the tiny guard decides on its own, both heads are held to Python: a tau below every
    risk sends every request to the refusal head, one above every risk to the plain head."""
    for tau, fired in ((-1.0, True), (2.0, False)):
        bundle = tmp_path / f"tau{tau}"
        shutil.copytree(tiny_bpe.bundles["int4"], bundle)
        manifest = json.loads((bundle / "manifest.json").read_text())
        manifest["guard"]["tau"] = tau
        (bundle / "manifest.json").write_text(json.dumps(manifest))
        gm = GuardedModel.load(bundle, threads=2)
        with native.model(bundle, threads=2) as m:
            for p in PROMPTS[:5]:
                want = gm.generate(user(p), Sampling(max_new_tokens=10))
                got = m.generate(user(p), max_new_tokens=10)
                assert want.fired is fired and got.fired is fired
                assert (got.token_ids, got.text) == (want.token_ids, want.text)


def with_points(bundle: Path, folder: Path, points: dict | None) -> Path:
    """A copy of `bundle` whose guard carries `points` (name -> tau; guard.tau = balanced's), or none (None:
    a bundle exported before operating points)."""
    shutil.copytree(bundle, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    g = manifest["guard"]
    for key in ("operating_points", "default_operating_point", "roc"):
        g.pop(key, None)
    if points is not None:
        g["operating_points"] = {k: {"tau": t, "fpr": 0.0, "tpr": 1.0, "fire_rates": {}} for k, t in points.items()}
        g["default_operating_point"], g["tau"] = "balanced", points["balanced"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_decisions_equal_the_python_runtime_at_each_operating_point(tiny_bpe, native, tmp_path):
    """The C library and the Python runtime take the same decision, answer and tau at two named operating
    points (placed between the requests' risks, so the decisions differ) and at an explicit tau; a bundle
    without points has balanced only; bad choices are refused alike."""
    bundle = tiny_bpe.bundles["int4"]
    requests = [user(p) for p in PROMPTS] + CHATS[2:]
    risks = [GuardedModel.load(bundle, threads=2).score(r) for r in requests]
    r = sorted(risks)
    points = {"strict": (r[2] + r[3]) / 2, "balanced": (r[5] + r[6]) / 2, "permissive": (r[8] + r[9]) / 2}
    copy = with_points(bundle, tmp_path / "points", points)
    gm = GuardedModel.load(copy, threads=2)
    s = Sampling(max_new_tokens=8)
    with native.model(copy, threads=2) as m:
        assert m.operating_points == {k: np.float32(t) for k, t in points.items()}
        assert (m.info()["operating_point"], m.info()["tau"]) == ("balanced", np.float32(points["balanced"]))
        decisions = {}
        for name in ("strict", "permissive", 0.25):
            m.set_operating_point(name)
            info = m.info()
            assert info["operating_point"] == (name if isinstance(name, str) else None)
            decisions[name] = []
            for request, risk in zip(requests, risks):
                want = gm.generate(request, s, operating_point=name)
                got = m.generate(request, max_new_tokens=8)
                assert (got.fired, got.token_ids, got.text) == (want.fired, want.token_ids, want.text)
                assert got.fired == (not risk < want.tau) and got.tau == np.float32(want.tau)
                assert m.score(request)[1] == want.fired
                decisions[name].append(got.fired)
        assert sum(decisions["strict"]) > sum(decisions[0.25]) or sum(decisions["strict"]) > sum(decisions["permissive"])
        assert decisions["strict"] != decisions["permissive"]
        for bad in ("loose", 1.5, float("nan"), -0.5):
            with pytest.raises(NativeError) as e:
                m.set_operating_point(bad)
            with pytest.raises(Exception) as py:
                gm.resolve_operating_point(bad)
            assert e.value.status == "SG_ERR_INVALID_ARGUMENT"
            assert str(e.value).split(",")[0].split(" got")[0] == str(py.value).split(",")[0].split(" got")[0]
        assert m.info()["tau"] == np.float32(0.25)     # a refused choice changes nothing
    old = with_points(bundle, tmp_path / "old", None)
    with native.model(old, threads=2) as m:
        assert list(m.operating_points) == ["balanced"] and m.info()["operating_point"] == "balanced"
        with pytest.raises(NativeError) as e:
            m.set_operating_point("strict")
        with pytest.raises(Exception) as py:
            GuardedModel.load(old, threads=2, operating_point="strict")
        assert str(e.value) == str(py.value)
    with native.model(tiny_bpe.bundles["plain"], threads=2) as m:
        assert m.info()["operating_point"] is None and np.isnan(m.info()["tau"])
        with pytest.raises(NativeError) as e:
            m.set_operating_point(0.5)
        assert e.value.status == "SG_ERR_NO_GUARD"


def test_stop_strings_seeds_and_streaming(tiny_bpe, native):
    bundle = tiny_bpe.bundles["fp32"]
    gm = GuardedModel.load(bundle, threads=2)
    with native.model(bundle, threads=2) as m:
        base = m.generate(user(PROMPTS[0]), max_new_tokens=16, ignore_eos=True)
        stop = base.text[len(base.text) // 2: len(base.text) // 2 + 2] or "e"
        want = gm.generate(user(PROMPTS[0]), Sampling(max_new_tokens=16, stop=(stop,), ignore_eos=True))
        got = m.generate(user(PROMPTS[0]), max_new_tokens=16, stop=[stop], ignore_eos=True)
        assert (got.text, got.token_ids, got.finish_reason) == (want.text, want.token_ids, want.finish_reason)

        sampled = [m.generate(user(PROMPTS[1]), max_new_tokens=12, temperature=1.0, top_p=0.9, seed=s).token_ids
                   for s in (1, 1, 2)]
        assert sampled[0] == sampled[1] and len(set(map(tuple, sampled))) == 2
        assert m.generate(user(PROMPTS[1]), max_new_tokens=12, temperature=0.7, top_k=1).token_ids == \
            m.generate(user(PROMPTS[1]), max_new_tokens=12).token_ids

        pieces: list[str] = []
        streamed = m.generate(user(PROMPTS[3]), max_new_tokens=16, on_token=lambda t, p: pieces.append(p))
        assert "".join(pieces) == streamed.text
        with pytest.raises(NativeError) as e:
            m.generate(user(PROMPTS[3]), max_new_tokens=16, on_token=lambda t, p: True)
        assert e.value.status == "SG_ERR_CANCELLED"


def test_refusals_of_the_python_loader(tiny_bpe, native, tmp_path):
    bundle = tiny_bpe.bundles["fp32"]
    with pytest.raises(NativeError, match="no such bundle folder"):
        native.model(tmp_path / "nothing")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(bundle, corrupt)
    with open(corrupt / "engines" / "head.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with pytest.raises(NativeError, match="sha256 does not match") as e:
        native.model(corrupt)
    assert e.value.status == "SG_ERR_CORRUPT_BUNDLE"
    (corrupt / "engines" / "head.onnx").unlink()
    with pytest.raises(NativeError, match="missing from the bundle"):
        native.model(corrupt)

    older = tmp_path / "older"
    shutil.copytree(bundle, older)
    manifest = json.loads((older / "manifest.json").read_text())
    del manifest["tokenizer"]["chat_pieces"]
    (older / "manifest.json").write_text(json.dumps(manifest))
    with native.model(older, threads=2) as m:
        with pytest.raises(NativeError, match="no chat pieces"):
            m.generate(user("hi"))
        ids = GuardedModel.load(bundle, threads=2).encode(user("hi"))
        assert m.generate(ids, max_new_tokens=4).token_ids   # token ids still work
    manifest["schema"] = 2
    (older / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(NativeError, match="schema 2"):
        native.model(older)
    with native.model(tiny_bpe.bundles["plain"], threads=2) as m:
        with pytest.raises(NativeError, match="no guard") as e:
            m.score(user("hi"))
        assert e.value.status == "SG_ERR_NO_GUARD"
        with pytest.raises(NativeError, match="exceeds the model's context"):
            m.generate(user("hi"), max_new_tokens=10**6)


# ---- sanitizers and the example ---------------------------------------------------------------------

def run_checked(args: list, timeout: int = 900) -> str:
    env = {**os.environ, "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0",
           "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"}
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=env)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "Sanitizer" not in output and "runtime error" not in output, output[-4000:]
    return output


def test_error_paths_threads_and_cycles_under_sanitizers(tiny_bpe, asan_dir, tmp_path):
    test = asan_dir / "capi_test"
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_bpe.bundles["int4"], corrupt)
    (corrupt / "tokenizer" / "tokenizer.json").write_text("{}")
    errors = run_checked([test, "errors", tiny_bpe.bundles["int4"], corrupt])
    assert "generate(callback cancels)" in errors and errors.rstrip().endswith("OK")
    assert "40/40 equal" in run_checked([test, "threads", tiny_bpe.bundles["fp32"]])
    # the leak check's 1,000 cycles once, on the unguarded bundle (3 engines: ~0.2 s a cycle under the
    # sanitizers); 100 on the guarded int4 one (6 engines)
    llama = "llama" in tiny_bpe.bundles["int4"].parent.name
    bundle, cycles = (tiny_bpe.bundles["plain"], 1000) if llama else (tiny_bpe.bundles["int4"], 100)
    assert f"{cycles}/{cycles}" in run_checked([test, "cycles", bundle, cycles])


def test_the_c_chat_example_builds_and_chats(tiny_bpe, native_dir):
    done = subprocess.run([str(native_dir / "chat"), str(tiny_bpe.bundles["fp32"]), "8"],
                          input="What is the capital of France?\nAnd of Spain?\n", capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("at layer") == 2
    missing = subprocess.run([str(native_dir / "chat"), "/nonexistent"], capture_output=True, text=True)
    assert missing.returncode == 1 and "no such bundle folder" in missing.stderr
    assert sys.platform != "linux" or (native_dir / "libsteerguard.so").stat().st_size < 2_000_000


# ---- the Python package ships the library ------------------------------------------------------------

def build_wheel(out: Path, env: dict | None = None) -> tuple[Path, str]:
    """`pip wheel` of this repository (no isolation: the test environment has scikit-build-core), unpacked."""
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-v",
                           "-w", str(out / "dist"), "-C", f"build-dir={out / 'build'}"],
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [wheel] = (out / "dist").glob("steerguard-*.whl")
    shutil.unpack_archive(wheel, out / "site", "zip")
    return wheel, done.stdout + done.stderr


def run_in_wheel(site: Path, code: str, *args: str) -> subprocess.CompletedProcess:
    """Python in the unpacked wheel's folder, with it first on the path and no site hooks, so neither this
    checkout nor its editable install can answer `import steerguard`; the test environment's packages stay
    reachable."""
    import onnxruntime

    packages = Path(onnxruntime.__file__).parents[1]
    return subprocess.run([sys.executable, "-S", "-c", code, *args], capture_output=True, text=True, timeout=300,
                          cwd=site, env={**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{packages}"})


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("wheel")
    path, _ = build_wheel(out)
    return path, out / "site"


WHEEL_ANSWERS = """
import json, os, sys, steerguard
from steerguard.runtime.native import NativeError, NativeLibrary, library_path
lib = NativeLibrary.load()
os.environ["SG_ONNXRUNTIME_LIBRARY"] = "/nonexistent/libonnxruntime.so.1"
try:
    lib.model(sys.argv[1])
except NativeError as e:
    refused = [e.status, str(e)]
del os.environ["SG_ONNXRUNTIME_LIBRARY"]
with lib.model(sys.argv[1], threads=2) as m:
    answers = [m.generate([{"role": "user", "content": p}], max_new_tokens=8).token_ids for p in json.loads(sys.argv[2])]
print(json.dumps({"package": steerguard.__file__, "library": str(library_path()), "refused": refused, "answers": answers}))
"""


def test_the_wheel_ships_libsteerguard_and_it_answers_as_the_python_runtime(wheel, tiny_bpe):
    path, site = wheel
    assert path.name.endswith("-py3-none-linux_x86_64.whl")
    assert (site / "steerguard" / "include" / "steerguard.h").read_text() == (ROOT / "csrc/include/steerguard.h").read_text()
    assert (site / "steerguard" / "data").is_dir() and not list(site.rglob("__pycache__"))
    needed = subprocess.run(["readelf", "-d", str(site / "steerguard" / "lib" / "libsteerguard.so")],
                            capture_output=True, text=True).stdout
    assert "libpcre2-8" in needed and "onnxruntime" not in needed   # it finds this environment's at load

    bundle = tiny_bpe.bundles["int4"]
    done = run_in_wheel(site, WHEEL_ANSWERS, str(bundle), json.dumps(PROMPTS[:3]))
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout)
    assert got["package"].startswith(str(site)) and got["library"].startswith(str(site))
    assert got["refused"][0] == "SG_ERR_RUNTIME" and "SG_ONNXRUNTIME_LIBRARY=/nonexistent" in got["refused"][1]
    gm = GuardedModel.load(bundle, threads=2)
    assert got["answers"] == [gm.generate(user(p), Sampling(max_new_tokens=8)).token_ids for p in PROMPTS[:3]]


def test_without_the_dev_packages_the_package_installs_without_the_library_and_says_why(tmp_path):
    # pkg-config looking in an empty folder finds none of the -dev packages
    wheel, log = build_wheel(tmp_path, env={"PKG_CONFIG_LIBDIR": str(tmp_path), "PKG_CONFIG_PATH": ""})
    assert "libsteerguard is not built (libpcre2-8 not found (Debian: libpcre2-dev))" in log
    site = tmp_path / "site"
    assert not (site / "steerguard" / "lib").exists() and (site / "steerguard" / "runtime" / "model.py").exists()
    done = run_in_wheel(site, "from steerguard.runtime.native import NativeLibrary\nNativeLibrary.load()")
    assert done.returncode == 1
    assert "was installed without libsteerguard" in done.stderr and "csrc/install-deps.sh" in done.stderr
