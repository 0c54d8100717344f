"""Shared CLI and timing protocol for the peer runners (standard library only).

Each runner is started by its own interpreter (often a separate venv), so this
module must not import anything outside the standard library.  Thread-count
environment variables are set in :func:`parse_args`, before a runner imports
its numeric library.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

CACHE = Path(os.environ.get("STEERGUARD_CACHE", Path.home() / ".cache" / "steerguard"))
PEERS = CACHE / "peers"
HF_MODEL = CACHE / "models" / "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class Generation:
    """One greedy generation, timed with ``time.perf_counter``."""

    tokens: list[int]  # the new tokens only
    t_start: float  # just before prefill starts
    t_first: float  # first new token available
    t_last: float  # last new token available


@dataclass(frozen=True)
class RunStats:
    ttft_ms: float
    decode_tok_s: float


class Generate(Protocol):
    def __call__(self, prompt: list[int], new_tokens: int) -> Generation: ...


def parse_args(
    description: str, add_options: Callable[[argparse.ArgumentParser], None] | None = None
) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--ids-file", type=Path, required=True, help="JSON list of prompt token ids")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--tokens-out", type=Path, help="also write all new tokens of the last run (JSON)")
    if add_options is not None:
        add_options(ap)
    args = ap.parse_args()
    if args.new_tokens < 2:
        ap.error("--new-tokens must be >= 2 (decode speed needs two tokens)")
    if args.runs < 1 or args.warmup < 0:
        ap.error("need --runs >= 1 and --warmup >= 0")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    return args


def load_ids(path: Path) -> list[int]:
    ids = json.loads(path.read_text())
    if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
        raise SystemExit(f"{path}: expected a JSON list of ints")
    return ids


def stats_of(gen: Generation, new_tokens: int) -> RunStats:
    if len(gen.tokens) != new_tokens:
        raise RuntimeError(f"generated {len(gen.tokens)} tokens, expected {new_tokens}")
    return RunStats(
        ttft_ms=(gen.t_first - gen.t_start) * 1e3,
        decode_tok_s=(new_tokens - 1) / (gen.t_last - gen.t_first),
    )


def run_protocol(name: str, args: argparse.Namespace, generate: Generate, versions: dict[str, str]) -> None:
    """Warm up, time ``args.runs`` generations and print the JSON result line."""
    prompt = load_ids(args.ids_file)
    for _ in range(args.warmup):
        generate(prompt, args.new_tokens)
    runs: list[RunStats] = []
    last: Generation | None = None
    for _ in range(args.runs):
        last = generate(prompt, args.new_tokens)
        runs.append(stats_of(last, args.new_tokens))
    result = {
        "name": name,
        "ttft_ms": statistics.median(r.ttft_ms for r in runs),
        "decode_tok_s": statistics.median(r.decode_tok_s for r in runs),
        "runs": [asdict(r) for r in runs],
        "first_tokens": last.tokens[:16] if last else [],
        "prompt_tokens": len(prompt),
        "new_tokens": args.new_tokens,
        "threads": args.threads,
        "versions": versions,
    }
    if args.tokens_out is not None and last is not None:
        args.tokens_out.write_text(json.dumps(last.tokens))
    print(json.dumps(result), flush=True)
