"""Bad input through the CLI: one clear line, non-zero exit, nothing half-written."""
import subprocess
import sys


from conftest import write_jsonl


def steerguard(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "steerguard", *args], capture_output=True, text=True, cwd=cwd)


def one_line_error(r, *fragments):
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ")
    for f in fragments:
        assert f in lines[0], lines[0]
    assert "Traceback" not in r.stderr


def test_help_explains_itself():
    r = steerguard("--help")
    assert r.returncode == 0
    for cmd in ("calibrate", "generate", "eval"):
        assert cmd in r.stdout
    assert "--max-per-source" in steerguard("calibrate", "--help").stdout


def test_missing_model_path(tmp_path):
    r = steerguard("calibrate", str(tmp_path / "nope"), "-o", str(tmp_path / "g"))
    one_line_error(r, "does not exist")
    assert not (tmp_path / "g").exists()


def test_a_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "m").mkdir()
    r = steerguard("calibrate", str(tmp_path / "m"), "-o", str(tmp_path / "g"))
    one_line_error(r, "not a Hugging Face model")


def test_a_file_that_is_not_a_model(tmp_path):
    (tmp_path / "weights.txt").write_text("hello")
    one_line_error(steerguard("calibrate", str(tmp_path / "weights.txt"), "-o", str(tmp_path / "g")), "is not a model")


def test_malformed_pairs_row_names_file_and_line(tmp_path):
    f = write_jsonl(tmp_path / "pairs.jsonl", [{"harmful": "a", "benign": "b"}] * 3 + [{"harmful": "x"}])
    r = steerguard("calibrate", "demo", "--pairs", str(f), "-o", str(tmp_path / "g"))
    one_line_error(r, f"{f}:4", "benign")
    assert not (tmp_path / "g").exists()


def test_missing_guard_folder(tmp_path):
    one_line_error(steerguard("generate", "demo", "--guard", str(tmp_path / "g"), "-p", "hi"), "no such guard")


def test_incomplete_guard_folder(tmp_path):
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "guard.json").write_text("{}")
    one_line_error(steerguard("generate", "demo", "--guard", str(tmp_path / "g"), "-p", "hi"), "missing")


def test_absurd_max_new_tokens():
    one_line_error(steerguard("generate", "demo", "-p", "hi", "--max-new-tokens", "-3"), "max_new_tokens")


def test_fewer_pairs_than_needed(tmp_path):
    f = write_jsonl(tmp_path / "pairs.jsonl", [{"harmful": "a", "benign": "b", "refusal": "no"}] * 3)
    r = steerguard("calibrate", "demo", "--no-defaults", "--pairs", str(f), "-o", str(tmp_path / "g"))
    one_line_error(r, "at least 8", "got 3")
    assert not (tmp_path / "g").exists()
