"""steerguard.runtime and steerguard.engines must run where torch and transformers are not installed."""
import subprocess
import sys
from pathlib import Path

import steerguard

HEAVY = ("torch", "transformers", "optimum")


def test_runtime_and_engines_never_import_torch_or_transformers():
    code = ("import sys, pkgutil, importlib, steerguard.runtime, steerguard.engines\n"
            "for pkg in (steerguard.runtime, steerguard.engines):\n"
            "    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
            "        importlib.import_module(m.name)\n"
            "from steerguard.runtime.judge import is_refusal\n"
            "assert is_refusal(\"I'm sorry, but no.\") and not is_refusal('Sure, here it is')\n"
            f"bad = [m for m in sys.modules if m.split('.')[0] in {HEAVY!r}]\n"
            "print(bad)\n"
            "sys.exit(1 if bad else 0)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_no_heavy_import_statements_in_lean_packages():
    root = Path(steerguard.__file__).parent
    for sub in ("runtime", "engines"):
        for f in (root / sub).rglob("*.py"):
            for line in f.read_text().splitlines():
                words = line.split()
                if words[:1] in (["import"], ["from"]) and len(words) > 1:
                    assert words[1].split(".")[0] not in HEAVY, f"{f}: {line}"
