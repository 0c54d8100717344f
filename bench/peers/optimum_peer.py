"""Peer: optimum's ORTModelForCausalLM (onnxruntime CPU EP), fp32.

Runs on the text-generation-with-past export made by setup.sh (optimum-cli
export onnx).  Greedy ``generate``, EOS suppressed, timed by a streamer.
"""

from __future__ import annotations

import argparse
from importlib.metadata import version

from _common import PEERS, parse_args, run_protocol


def add_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default=str(PEERS / "optimum-export"), help="optimum ONNX export folder")


def main() -> None:
    args = parse_args(__doc__ or "", add_options)

    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    from _hf_generate import make_generate

    torch.set_num_threads(args.threads)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    model = ORTModelForCausalLM.from_pretrained(
        args.model, provider="CPUExecutionProvider", session_options=options, use_cache=True
    )
    versions = {
        name: version(name) for name in ("optimum-onnx", "optimum", "onnxruntime", "transformers", "torch")
    }
    run_protocol("optimum-ort-fp32", args, make_generate(model, model.config.eos_token_id), versions)


if __name__ == "__main__":
    main()
