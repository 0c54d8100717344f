"""Peer: Hugging Face transformers, PyTorch eager (no torch.compile), fp32 CPU.

Greedy ``model.generate``, EOS suppressed, timed by a streamer (see _hf_generate).
"""

from __future__ import annotations

import argparse

from _common import HF_MODEL, parse_args, run_protocol


def add_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default=str(HF_MODEL), help="HF model folder")
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attention implementation")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the GPU device script)")


def main() -> None:
    args = parse_args(__doc__ or "", add_options)

    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from _hf_generate import make_generate

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.float32, attn_implementation=args.attn
    ).eval().to(args.device)
    versions = {"transformers": transformers.__version__, "torch": torch.__version__}
    generate = make_generate(model, model.config.eos_token_id)
    run_protocol(f"hf-fp32-{args.attn}-{args.device}", args, generate, versions)


if __name__ == "__main__":
    main()
