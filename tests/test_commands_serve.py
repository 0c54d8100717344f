"""The serve command: loopback by default, torch-free, bad options as one line."""
import subprocess
import sys

from test_cli import one_line_error, steerguard

def test_the_server_binds_the_loopback_by_default():
    from steerguard.commands.serve import serve

    host = next(p for p in serve.params if p.name == "host")
    assert host.default == "127.0.0.1"


def test_the_server_stays_torch_free():
    code = ("import sys, steerguard.serve, steerguard.serve.app, steerguard.cli\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')]\n"
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_bad_options_are_one_line_errors(tmp_path):
    one_line_error(steerguard("serve", str(tmp_path), "--max-batch", "0"), "--max-batch")
    one_line_error(steerguard("serve", str(tmp_path), "--api-key", " "), "--api-key")
    one_line_error(steerguard("serve", str(tmp_path / "none")), "no such bundle")
