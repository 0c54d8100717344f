"""Peer: onnxruntime-genai (CPU EP) on a model built by its model builder.

Manual greedy token loop: ``append_tokens`` runs the prefill, each
``generate_next_token`` picks a token (and runs the forward pass for the
previous one).  ``min_length`` suppresses EOS so exactly --new-tokens tokens
come out.  Intra-op threads are set by overlaying the genai config.
"""

from __future__ import annotations

import argparse
import json
import time
from importlib.metadata import version

from _common import PEERS, Generation, parse_args, run_protocol


def add_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--model", default=str(PEERS / "genai-fp32"), help="genai model folder (genai-fp32 or genai-int4)"
    )
    ap.add_argument("--name", default=None, help="result name (default: genai-<folder name>)")
    ap.add_argument(
        "--max-length",
        type=int,
        default=0,
        help="KV cache capacity (default: prompt + new tokens); a model with a sliding window needs at least the "
        "window (Gemma 3: 512), onnxruntime's attention refuses a smaller cache",
    )


def main() -> None:
    args = parse_args(__doc__ or "", add_options)

    import onnxruntime_genai as og

    config = og.Config(args.model)
    config.clear_providers()  # CPU EP
    session = {"intra_op_num_threads": args.threads, "inter_op_num_threads": 1}
    config.overlay(json.dumps({"model": {"decoder": {"session_options": session}}}))
    model = og.Model(config)

    def generate(prompt: list[int], new_tokens: int) -> Generation:
        total = len(prompt) + new_tokens
        params = og.GeneratorParams(model)
        params.set_search_options(
            do_sample=False, max_length=max(total, args.max_length), min_length=total, batch_size=1
        )
        generator = og.Generator(model, params)
        tokens: list[int] = []
        t_start = time.perf_counter()
        generator.append_tokens(prompt)
        t_first = t_start
        for i in range(new_tokens):
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
            if i == 0:
                t_first = time.perf_counter()
        t_last = time.perf_counter()
        del generator
        return Generation(tokens, t_start, t_first, t_last)

    name = args.name or f"genai-{args.model.rstrip('/').split('/')[-1].removeprefix('genai-')}"
    versions = {"onnxruntime-genai": og.__version__, "onnxruntime": version("onnxruntime")}
    run_protocol(name, args, generate, versions)


if __name__ == "__main__":
    main()
