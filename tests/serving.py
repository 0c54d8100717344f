"""A real `steerguard serve` process on a free loopback port, for the server tests and the load bench."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m steerguard serve BUNDLE ...` on 127.0.0.1; a context manager that waits for /health."""

    def __init__(self, bundle: Path, *args: str, threads: int = 2, log: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "steerguard", "--threads", str(threads), "serve", str(bundle),
                    "--port", str(self.port), *args]
        self.log = log
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Server":
        out = open(self.log, "w") if self.log else subprocess.DEVNULL
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT if self.log else subprocess.PIPE,
                                     env=env, text=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read() if self.proc.stderr else Path(self.log).read_text()
                raise RuntimeError(f"the server exited ({self.proc.returncode}): {err}")
            try:
                self.health()
                return self
            except (OSError, urllib.error.URLError):
                time.sleep(0.1)
        self.__exit__()
        raise RuntimeError("the server did not answer /health within 120 s")

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def health(self) -> dict:
        with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
            return json.loads(r.read())

    def raw(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
            timeout: float = 60) -> tuple[int, dict, bytes]:
        """One plain HTTP request (for what the openai client cannot send: broken JSON, odd headers)."""
        req = urllib.request.Request(self.url + path, data=body, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def rss_mb(self) -> float:
        """The server process's resident memory (Linux)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def wait_idle(self, timeout: float = 30) -> dict:
        """Wait until no row is in use and nothing is queued; the last /health."""
        deadline = time.time() + timeout
        while True:
            h = self.health()
            if (h["rows_in_use"] == 0 and h["queued"] == 0) or time.time() > deadline:
                return h
            time.sleep(0.05)
