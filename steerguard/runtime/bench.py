"""Speed of a loaded bundle: time to first token, decode tokens/s, time in each engine, peak memory,
and achieved memory bandwidth (weight bytes read per token x tokens/s) against the machine's copy
bandwidth, which is the floor for a memory-bound decoder."""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import dataclass, field

import numpy as np

from .model import GuardedModel
from .sampling import Sampling


def copy_bandwidth_gbs(mbytes: int = 256, repeats: int = 7) -> float:
    """Median GB/s of one large memory copy (read + write counted), numpy's memcpy."""
    src = np.ones(mbytes << 18, np.float32)
    dst = np.empty_like(src)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t)
    return 2 * src.nbytes / statistics.median(times) / 1e9


def decode_weight_bytes(model: GuardedModel) -> int:
    """Bytes of weights every decode step reads: the decoder engines and the head (embed reads one row)."""
    files = []
    for e in model.manifest.engine("decoder", "decode") + model.manifest.engine("head"):
        files += [e["file"], *e.get("data_files", [])]
    return sum(model.manifest.path(f).stat().st_size for f in files)


def prompt_of_length(model: GuardedModel, n_tokens: int) -> list[int]:
    """Chat-formatted ids of a user prompt of about `n_tokens` tokens (the first length >= n_tokens)."""
    text = "Tell me about the history of the printing press and how it changed Europe."
    ids = model.encode(text)
    words = 0
    while len(ids) < n_tokens:
        words += 1
        ids = model.encode(text + " Please" * words)
    return ids


@dataclass
class BenchResult:
    prompt_tokens: int
    new_tokens: int
    ttft_ms: float                  # median
    decode_tok_s: float             # median
    runs: list[dict] = field(default_factory=list)
    engine_ms_per_token: dict = field(default_factory=dict)
    peak_rss_mb: float = 0.0


def bench(model: GuardedModel, ids: list[int], new_tokens: int = 128, runs: int = 5, warmup: int = 1,
          steer: bool | None = None) -> BenchResult:
    """Median over `runs` (after `warmup`) of greedy generation of exactly `new_tokens` tokens."""
    s = Sampling(max_new_tokens=new_tokens, ignore_eos=True)
    engines = model.engines
    samples = []
    for i in range(warmup + runs):
        for e in engines:
            e.seconds, e.calls = 0.0, 0
        r = model.generate_batch([ids], s, steer=steer)[0]
        t = r.timings
        if i >= warmup:
            samples.append({"ttft_ms": 1000 * t["first_token_s"], "decode_tok_s": t["decode_tok_s"]})
    return BenchResult(
        prompt_tokens=len(ids), new_tokens=new_tokens,
        ttft_ms=statistics.median(x["ttft_ms"] for x in samples),
        decode_tok_s=statistics.median(x["decode_tok_s"] for x in samples), runs=samples,
        engine_ms_per_token={e.name: 1000 * e.seconds / new_tokens for e in engines if e.calls},
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
