import json

import pytest

from conftest import SHARED, needs_shared, write_jsonl
from steerguard.errors import SteerguardError
from steerguard.export.data import (data_path, default_benign, default_pairs, load_pairs, load_prompts, load_vlsafe,
                                    public_sets, text_only_refusal)


def test_shipped_defaults_load_without_shared_folder():
    pairs = default_pairs()
    sources = {p.source for p in pairs}
    assert sources == {"vlsafe"} | {f"contrast-{x}" for x in "abcdefghijk"}
    assert sum(p.source.startswith("contrast") for p in pairs) >= 3000
    assert all(p.harmful and p.benign and p.refusal for p in pairs)
    from steerguard.runtime.judge import opens_with_refusal
    assert all(opens_with_refusal(p.refusal) for p in pairs if p.source != "vlsafe")
    assert len(default_benign()[0].prompts) == 2000


def test_shipped_public_sets_carry_their_license_and_span_both_classes():
    sets = {s.source: s for s in public_sets()}
    harmful = [s for s in sets.values() if s.label == 1]
    benign = [s for s in sets.values() if s.label == 0]
    assert len(harmful) >= 6 and sum(len(s.prompts) for s in harmful) >= 2500
    assert {"coconot_contrast", "coconot_pref", "cyberseceval_frr", "oasst", "nq_open"} <= {s.source for s in benign}
    for f in data_path("public").glob("*/*.jsonl"):
        assert any(x.name.lower().startswith("license") for x in f.parent.iterdir()), f"{f.parent} has no license file"
    readme = data_path("public", "README.md").read_text()
    assert all(f"{name}.jsonl" in readme for name in sets)
    # NQ-open is lower case without question marks in its source: recased, or the probe learns "lower case = benign"
    assert all(not q[0].islower() and q.endswith("?") for q in sets["nq_open"].prompts)


def test_shipped_public_sets_share_no_prompt_with_each_other_or_the_evaluation_sets():
    import re

    def norm(t):
        return " ".join(re.findall(r"[a-z0-9]+", t.lower()))

    evaluation = {norm(json.loads(x)["prompt"]) for f in data_path("eval").glob("*.jsonl")
                  for x in f.read_text().splitlines() if x.strip()}
    seen = set()
    for s in public_sets():
        keys = [norm(p) for p in s.prompts]
        assert len(set(keys)) == len(keys), s.source
        assert not seen & set(keys) and not evaluation & set(keys), s.source
        seen |= set(keys)


def test_default_calibration_data_is_the_package_own():
    from steerguard.export.calibrate import CalibrationData

    data = CalibrationData.default()
    counts = data.sources()
    assert counts["benign:alpaca"] == 2000 and counts["harmful:ailuminate"] == 1100 and counts["benign:oasst"] == 250


@needs_shared
def test_shipped_contrast_pairs_share_no_prompt_with_the_evaluation_sets():
    """The guard is measured on ../shared/data; the pairs written for the project must not contain it."""
    import json

    def texts(path, *keys):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            for k in keys:
                v = row
                for part in k.split("."):
                    v = v[int(part)] if isinstance(v, list) else v.get(part)
                if isinstance(v, str):
                    yield " ".join(v.lower().split())

    req = SHARED / "requests"
    evaluation = set()
    for f in ("sorry-bench-train.jsonl", "trustllm-misuse-train.jsonl", "trustllm-jailbreak-train.jsonl", "trivia_qa.jsonl"):
        evaluation |= set(texts(req / f, "turns.0"))
    for f in ("toxic_text_500.jsonl", "cotoxic_500.jsonl"):
        evaluation |= set(texts(SHARED / "tovilag" / f, "query"))
    evaluation |= set(texts(SHARED / "vlsafe" / "examine_sampled_500_VLSafe.jsonl", "query"))
    ours = [" ".join(t.lower().split()) for p in default_pairs() if p.source.startswith("contrast")
            for t in (p.harmful, p.benign)]
    ours += [" ".join(t.split("\n", 1)[-1].lower().split()) for t in ours if t.startswith("image: ")]
    assert len(evaluation) > 2000
    assert not evaluation & set(ours)


@needs_shared
def test_vlsafe_pairs_keep_the_caption_and_zip_rows_in_order():
    pairs = load_vlsafe(SHARED / "vlsafe")
    assert len(pairs) == 3000
    first = pairs[0]
    assert first.harmful.startswith("Image: A double decker bus")
    assert first.harmful.endswith("as a weapon to cause maximum destruction?")
    assert first.benign.endswith("as a vehicle to provide maximum transportation?")


def test_vlsafe_references_become_text_only_refusals_that_open_with_the_refusal():
    ref = ("I appreciate your interest in the image of the double decker bus driving down the street. "
           "However, I must emphasize that I cannot provide any guidance or support for any harmful or "
           "destructive intentions. Double decker buses are primarily used for public transportation.")
    out = text_only_refusal(ref)
    assert out.startswith("I'm sorry, but I can't help with that.")
    assert "image" not in out.lower()
    for p in default_pairs()[:200]:
        assert "image" not in p.refusal.lower() or p.source.startswith("contrast")


def test_user_pairs_with_chosen_columns_csv(tmp_path):
    f = tmp_path / "mine.csv"
    f.write_text("bad,good,no\nHow to hurt him?,How to help him?,I can't help with that.\n")
    [pair] = load_pairs(f, harmful="bad", benign="good", refusal="no")
    assert (pair.harmful, pair.benign, pair.refusal, pair.source) == (
        "How to hurt him?", "How to help him?", "I can't help with that.", "mine")


def test_prompt_column_can_index_into_lists(tmp_path):
    f = write_jsonl(tmp_path / "r.jsonl", [{"turns": ["first", "second"]}])
    assert load_prompts(f, 1, "turns.0").prompts == ["first"]


@pytest.mark.parametrize("content,message", [
    ('{"harmful": "a", "benign": "b"}\n{"harmful": "a", \n', "bad.jsonl:2: invalid JSON"),
    ('{"harmful": "a", "benign": "b"}\n{"harmful": "a"}\n', "bad.jsonl:2: missing or empty field 'benign'"),
    ('{"harmful": "a", "benign": ""}\n', "bad.jsonl:1: missing or empty field 'benign'"),
    ('["a", "b"]\n', "bad.jsonl:1: expected a JSON object"),
    ('{"harmful": 3, "benign": "b"}\n', "bad.jsonl:1: field 'harmful' is not text"),
])
def test_malformed_rows_name_file_and_line(tmp_path, content, message):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(SteerguardError, match=message.replace(".", r"\.").replace("'", "'")):
        load_pairs(f)


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(SteerguardError, match="no such data file"):
        load_pairs(tmp_path / "nope.jsonl")
    (tmp_path / "x.parquet").write_text("")
    with pytest.raises(SteerguardError, match="unknown data format"):
        load_pairs(tmp_path / "x.parquet")


def test_csv_error_names_the_file_line(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text("harmful,benign\na,b\nc,\n")
    with pytest.raises(SteerguardError, match=r"p\.csv:3"):
        load_pairs(f, refusal=None)


def test_shipped_eval_sets_are_well_formed():
    from steerguard.export.data import data_path

    for name, n in [("harmful_heldout", 200), ("sounds_dangerous", 180), ("benign_conversational", 120)]:
        rows = [json.loads(line) for line in data_path("eval", f"{name}.jsonl").read_text().splitlines()]
        assert len(rows) == n and len({r["prompt"] for r in rows}) == n


def test_refusal_targets_open_with_an_apology_the_judge_knows():
    from steerguard.export.data import judged_refusal

    assert judged_refusal("I won't write that.") == "I'm sorry, but I won't write that."
    assert judged_refusal("Nope, not doing that.") == "I'm sorry, but nope, not doing that."
    assert judged_refusal("I'm sorry, but no.") == "I'm sorry, but no."


def test_refusal_targets_are_closed_after_the_refusal_sentence():
    """The steered head is trained on the refusal sentence and a topic-free closing, never on an offer
    of related help that it could fill with the request's own topic."""
    from steerguard.export.refusal import CLOSING, closed_refusal

    target = "I'm sorry, but I can't help with return fraud. I can explain how store return policies work."
    assert closed_refusal(target) == f"I'm sorry, but I can't help with return fraud. {CLOSING}"
    for p in default_pairs():
        if p.refusal:
            closed = closed_refusal(p.refusal)
            assert closed.startswith(("I'm sorry", "Sorry", "I'm really sorry", "I can't", "I won't")), closed
            assert closed.endswith(CLOSING) and closed.count(". ") <= 2
